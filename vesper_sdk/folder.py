"""``ModelFolder``: the one place that knows what kind a model folder is and what it holds.

A folder is one of three kinds: ``torch`` (config.json + model.safetensors), ``bnb``
(the same with a ``quantization`` block in config.json, bitsandbytes layers) or ``onnx``
(an export: model.onnx beside its config). Every loader (generate, serve, eval,
calibrate, quantize, export, the demo) asks this class rather than looking for files.
It reads files only; building the model is its loader's job (``vs.load``,
``VesperLM.from_pretrained``, ``quantization.load_quantized``), so every module can use it.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from .config import ConfigError, VesperConfig, run_folder_hint
from .integrity import verify_file
from .model.files import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    ModelFolderError,
    load_state_checked,
    load_weights,
)
from .tokenizer import TOKENIZER_NAME, VesperTokenizer

ONNX_NAME = "model.onnx"
Kind = Literal["torch", "bnb", "onnx"]

__all__ = ["CONFIG_NAME", "ONNX_NAME", "TOKENIZER_NAME", "WEIGHTS_NAME", "Kind", "ModelFolder",
           "ModelFolderError", "load_state_checked", "load_weights"]


class ModelFolder:
    """A model folder on disk: its kind, config, tokenizer and files.

    Raises :class:`ModelFolderError` naming the folder and the fix when it is not a model
    folder (with "Did you mean runs/a/model?" when given a training run's folder).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise ModelFolderError(
                f"{self.path} is not a folder: pass a model folder (config.json, "
                f"model.safetensors, tokenizer.json) or an ONNX export"
                f"{run_folder_hint(self.path)}")
        if not (self.path / CONFIG_NAME).is_file() and not self.onnx_path.is_file():
            raise ModelFolderError(
                f"{self.path} is not a model folder: {CONFIG_NAME} is missing (and there is no "
                f"{ONNX_NAME}). Pass the folder written by `vesper train` or "
                f"model.save_pretrained.{run_folder_hint(self.path)}")

    @property
    def onnx_path(self) -> Path:
        return self.path / ONNX_NAME

    @cached_property
    def config_data(self) -> dict[str, Any]:
        """config.json as a dict ({} for an export that has none)."""
        path = self.path / CONFIG_NAME
        if not path.is_file():
            return {}
        verify_file(path)
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelFolderError(f"{path} is not valid JSON ({exc}): restore it from the "
                                   "run's checkpoint or re-save the model") from None
        if not isinstance(data, dict):
            raise ModelFolderError(f"{path} must hold a JSON object")
        return data

    @property
    def kind(self) -> Kind:
        if self.onnx_path.is_file():
            return "onnx"
        return "bnb" if self.quantization else "torch"

    @property
    def quantization(self) -> dict[str, Any] | None:
        """The ``quantization`` block of config.json (bitsandbytes folders), else None."""
        quant = self.config_data.get("quantization")
        return quant if isinstance(quant, dict) else None

    @cached_property
    def config(self) -> VesperConfig:
        try:
            return VesperConfig.from_dict(self.config_data)
        except (ConfigError, TypeError) as exc:
            raise ModelFolderError(f"{self.path / CONFIG_NAME}: {exc}") from None

    def tokenizer(self) -> VesperTokenizer:
        return VesperTokenizer.from_file(self.path)

    def __repr__(self) -> str:
        return f"ModelFolder({str(self.path)!r}, kind={self.kind!r})"
