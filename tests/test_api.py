"""The small public API: every documented entry point exists, is callable and documented."""

from __future__ import annotations

import importlib

import pytest

import vesper_sdk as vs
from vesper_sdk import cli

API = ["train", "load", "quantize", "export_onnx", "serve"]


def test_public_functions_stay_callable_after_their_modules_are_imported():
    # Importing vesper_sdk.train (as the CLI does) binds the module to vs.train.
    for mod in ("vesper_sdk.train", "vesper_sdk.quantize", "vesper_sdk.serve"):
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
    assert "unavailable" not in text


def test_cli_options_come_from_the_api_dataclasses(capsys):
    from vesper_sdk.train import TrainOptions

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
