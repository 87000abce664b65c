"""vesper-sdk: train, quantize, export, serve and chat with VesperLM models.

>>> import vesper_sdk as vs
>>> cfg = vs.VesperConfig.from_preset("tiny", vocab_size=4096)
>>> model = vs.VesperLM(cfg)

Heavy entry points (train, calibrate, quantize, export_onnx, serve) import their dependencies only
when called, so ``import vesper_sdk`` stays fast and works without the optional extras.
"""

from __future__ import annotations

import importlib
from typing import Any

from .config import ConfigError, VesperConfig
from .model import ModelFolderError, VesperLM, VesperOutput
from .tokenizer import VesperTokenizer

__version__ = "0.1.0"

# name -> (module, attribute), resolved on first use.
_LAZY = {
    "load": ("vesper_sdk.generate", "load"),
    "LLM": ("vesper_sdk.generate", "LLM"),
    "train": ("vesper_sdk.train", "train"),
    "TrainOptions": ("vesper_sdk.train", "TrainOptions"),
    "VelvetOptimizer": ("vesper_sdk.optim", "VelvetOptimizer"),
    "quantize": ("vesper_sdk.quantize", "quantize"),
    "calibrate": ("vesper_sdk.calibrate", "calibrate"),
    "export_onnx": ("vesper_sdk.export.onnx_export", "export_onnx"),
    "serve": ("vesper_sdk.serve", "serve"),
    "export": ("vesper_sdk.export", None),
    "kernels": ("vesper_sdk.kernels", None),
}

__all__ = ["ConfigError", "ModelFolderError", "VesperConfig", "VesperLM", "VesperOutput",
           "VesperTokenizer", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'vesper_sdk' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value
