"""``vesper train`` and ``python -m vesper_sdk.training`` (what ``torchrun`` runs)."""

from __future__ import annotations

import argparse
import os
import sys

from ..cli import add_dataclass_arguments, options_from_args
from .loop import run
from .options import TrainOptions

__all__ = ["TrainOptions", "cli", "main"]  # TrainOptions: `vesper train` builds its parser


def cli(opts: TrainOptions) -> int:
    """``vesper train``: run, then print where everything went. Exit 130 if interrupted."""
    result = run(opts)
    if int(os.environ.get("RANK", "0")) != 0:
        return 130 if result.interrupted else 0  # rank 0 reports for the group
    lines = [f"steps: {result.steps}  final train loss: {result.final_loss}"]
    if result.metrics:
        # Named by its step: after an interrupt the last evaluation may be long past.
        at = "" if result.metrics_step is None else f" at step {result.metrics_step}"
        lines.append(f"validation{at}: "
                     + ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items()))
    if result.model_dir:
        lines.append(f"model: {result.model_dir}  (vesper generate {result.model_dir} ...)")
    if result.checkpoint:
        lines.append(f"last checkpoint: {result.checkpoint}")
    if result.best_checkpoint:
        lines.append(f"best checkpoint: {result.best_checkpoint} "
                     f"(val_loss {result.best_val_loss:.4f})")
    lines.append(f"metrics: {result.metrics_path}")
    if result.loss_curve:
        lines.append(f"loss curve: {result.loss_curve}")
    print("\n".join(lines))
    return 130 if result.interrupted else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m vesper_sdk.training ...`` (what torchrun runs): the options of
    ``vesper train``."""
    parser = argparse.ArgumentParser(
        prog="python -m vesper_sdk.training", description=TrainOptions.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_arguments(parser, TrainOptions)
    args = parser.parse_args(argv)
    try:
        return cli(options_from_args(TrainOptions, args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        # DataError, TrainingError, ConfigError: the message carries the fix.
        print(f"error: {exc}", file=sys.stderr)
        return 2
