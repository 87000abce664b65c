"""The small public API: every documented entry point exists, is callable and documented."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import vesper_sdk as vs
import vesper_sdk.demo.app  # noqa: F401  (DEFAULT_MODEL_DIR)
from vesper_sdk import cli

API = ["train", "load", "calibrate", "quantize", "export_onnx", "serve"]


def test_public_functions_stay_callable_after_their_modules_are_imported():
    # Importing the modules the CLI imports leaves the public names functions.
    for mod in ("vesper_sdk.training.cli", "vesper_sdk.training.calibration",
                "vesper_sdk.quantization", "vesper_sdk.serving"):
        importlib.import_module(mod)
    for name in API:
        assert callable(getattr(vs, name)), name
        assert getattr(vs, name).__doc__, f"vs.{name} has no docstring"


def test_onnx_runner_is_reachable_as_documented():
    assert callable(vs.export.OnnxModel)


def test_every_cli_command_is_available_with_this_install(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for command in cli.COMMANDS:
        assert command in text
    # The full parser imports every job: none may be missing its dependencies here.
    assert "unavailable" not in cli.build_parser().format_help()


def test_cli_imports_only_the_command_it_runs():
    code = ("import sys\nfrom vesper_sdk import cli\n"
            "try:\n    cli.main(['eval', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('gradio', 'fastapi', 'onnxruntime',"
            " 'vesper_sdk.training.trainer') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_cli_options_come_from_the_api_dataclasses(capsys):
    from vesper_sdk.training import TrainOptions

    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    import dataclasses

    for f in dataclasses.fields(TrainOptions):
        if f.metadata.get("cli") is False or f.metadata.get("positional"):
            continue
        assert "--" + f.name.replace("_", "-") in text, f.name


def test_unknown_command_exits_non_zero():
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["frobnicate"])
    assert exit_info.value.code == 2


def test_load_opens_an_exported_onnx_folder(tmp_path):
    lm = vs.load(vs.demo.app.DEFAULT_MODEL_DIR)
    vs.export_onnx(lm.model_dir, tmp_path / "onnx")
    onnx_lm = vs.load(tmp_path / "onnx")
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    assert onnx_lm.chat(prompt, max_new_tokens=8, temperature=0.0) == lm.chat(
        prompt, max_new_tokens=8, temperature=0.0)


def test_bundled_demo_model_ships_in_the_package_and_is_small():
    folder = vs.demo.app.DEFAULT_MODEL_DIR
    size = sum(p.stat().st_size for p in folder.iterdir())
    assert size <= 20 * 1024 * 1024
    lm = vs.load(folder, device="cpu")
    tokens = list(lm.stream("What is 2+2?", max_new_tokens=4, temperature=0.0))
    assert tokens and all(0.0 <= t.confidence <= 1.0 for t in tokens)
