"""The ``vesper`` command line, built from the same option dataclasses as the Python API.

Each job module defines an options dataclass (fields with ``metadata={"help": ...}``)
and ``cli(opts) -> int``. This file only turns those dataclasses into argparse
sub-commands, so the CLI and the API cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any

# command -> (module, options dataclass, one-line description)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("vesper_sdk.training.cli", "TrainOptions", "train or fine-tune a model on your data"),
    "generate": ("vesper_sdk.inference.command", "GenerateOptions",
                 "generate text, showing each token's confidence"),
    "eval": ("vesper_sdk.eval.report", "EvalOptions",
             "perplexity and MetaHead calibration report on held-out data"),
    "calibrate": ("vesper_sdk.training.calibration", "CalibrateOptions",
                  "refit a model's MetaHead confidence on held-out data"),
    "quantize": ("vesper_sdk.quantization", "QuantizeOptions",
                 "quantize a model folder to INT8/NF4/FP4 with bitsandbytes"),
    "export": ("vesper_sdk.export.command", "ExportOptions",
               "export a model folder to ONNX (optionally INT8/INT4)"),
    "serve": ("vesper_sdk.serving", "ServeOptions", "serve a model over the OpenAI HTTP API"),
    "demo": ("vesper_sdk.demo.app", "DemoOptions",
             "the Gradio chat demo with per-token confidence"),
    "bench": ("vesper_sdk.bench", "BenchOptions", "run the benchmark suite"),
    "verify": ("vesper_sdk.verify", "VerifyOptions",
               "check a model folder, checkpoint or export for damaged files"),
}


class CLIError(Exception):
    """A usage problem; printed without a traceback, exit code 2."""


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One argparse option per dataclass field: ``--field-name`` with its type and help."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli") is False:
            continue
        tp, optional = _unwrap_optional(hints[f.name])
        help_text = f.metadata.get("help", "")
        default = (f.default if f.default is not dataclasses.MISSING
                   else f.default_factory() if f.default_factory is not dataclasses.MISSING
                   else None)
        kwargs: dict[str, Any] = {"help": help_text}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        aliases: list[str] = []
        if f.metadata.get("positional"):
            names = [f.name]
            if default is not None or optional:
                kwargs["nargs"] = "?"
                kwargs["default"] = default
        else:
            names = ["--" + f.name.replace("_", "-")]
            aliases = list(f.metadata.get("aliases", []))
            kwargs["dest"] = f.name
            kwargs["default"] = default
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                kwargs["required"] = True
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) in (list, tuple, Sequence):
            inner = typing.get_args(tp)[0] if typing.get_args(tp) else str
            kwargs["type"] = inner
            kwargs["nargs"] = "*"
        elif tp in (int, float, str):
            kwargs["type"] = tp
        else:
            kwargs["type"] = str
        if default not in (None, "", False) and tp is not bool and help_text:
            kwargs["help"] = f"{help_text} (default: {default})"
        if tp is bool and aliases:
            # A --no- form for the main name only: not four spellings of one switch.
            kwargs["help"] = f"{kwargs['help']} (also {', '.join(aliases)})"
            parser.add_argument(*names, **kwargs)
            parser.add_argument(*aliases, dest=f.name, action="store_true",
                                default=argparse.SUPPRESS, help=argparse.SUPPRESS)
            continue
        parser.add_argument(*names, *aliases, **kwargs)


def options_from_args(cls: type, args: argparse.Namespace) -> Any:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
              if f.metadata.get("cli") is not False and hasattr(args, f.name)}
    return cls(**values)


def build_parser(only: str | None = None, prog: str | None = None,
                 ) -> argparse.ArgumentParser:
    """The ``vesper`` parser; with ``only``, just that command's module is imported.

    Importing every job (torch, onnxruntime, gradio, fastapi ...) takes seconds, so
    ``main`` builds the full options of the one command it runs and lists the others
    by their descriptions. ``prog`` names that command in its usage line (e.g.
    ``vesper-export`` for the alias of ``vesper export``).
    """
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="vesper",
        description="VesperLM from training to deployment: train, generate, eval, calibrate, "
                    "quantize, export, serve, demo, bench, verify. `vesper COMMAND --help` for a "
                    "command's options.")
    parser.add_argument("--version", action="version", version=f"vesper-sdk {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, cls_name, description) in COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=description)
            continue
        try:
            module = importlib.import_module(module_name)
            cls = getattr(module, cls_name)
        except (ImportError, AttributeError) as exc:
            # A job whose optional extra is not installed still lists, with the reason.
            p = sub.add_parser(name, help=f"{description} [unavailable: {exc}]")
            p.set_defaults(_unavailable=f"`vesper {name}` is unavailable here: {exc}. "
                                        "Install the matching extra, e.g. "
                                        "pip install 'vesper-sdk[all]'")
            continue
        extra = {"prog": prog} if prog and name == only else {}
        p = sub.add_parser(name, help=description, description=(cls.__doc__ or description),
                           formatter_class=argparse.RawDescriptionHelpFormatter, **extra)
        add_dataclass_arguments(p, cls)
        if name == "export":  # `vesper-export --onnx DIR ...`, as the examples spell it
            p.add_argument("--onnx", action="store_true",
                           help="export to ONNX (the one format; optional)")
        p.set_defaults(_module=module, _cls=cls)
    return parser


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=command if command in COMMANDS else "", prog=prog)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "_unavailable", None):
        print(f"error: {args._unavailable}", file=sys.stderr)
        return 2
    try:
        opts = options_from_args(args._cls, args)
        return int(args._module.cli(opts) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (CLIError, ValueError, FileNotFoundError, RuntimeError) as exc:
        # Our errors carry the problem and the fix; a traceback would only bury them.
        print(f"error: {exc}", file=sys.stderr)
        return 2


def export_main(argv: Sequence[str] | None = None) -> int:
    """``vesper-export --onnx MODEL_DIR -o OUT_DIR ...``: the same as ``vesper export``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return main(["export", *argv], prog="vesper-export")


if __name__ == "__main__":
    raise SystemExit(main())
