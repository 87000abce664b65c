"""ONNX export and the ONNX Runtime runner, installed as ``vesper_sdk.export``.

>>> from vesper_sdk.export import export_onnx, OnnxModel
>>> export_onnx("runs/a/model", "runs/a-onnx", quantize="int4")
>>> OnnxModel("runs/a-onnx").generate("Hello", max_new_tokens=16)

Names resolve on first use, so ``import vesper_sdk.export`` does not import onnx,
onnxruntime or onnxscript (the ``export`` extra).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "export_onnx": ("vesper_sdk.export.onnx_export", "export_onnx"),
    "ExportOptions": ("vesper_sdk.export.onnx_export", "ExportOptions"),
    "ExportError": ("vesper_sdk.export.onnx_export", "ExportError"),
    "check_parity": ("vesper_sdk.export.onnx_export", "check_parity"),
    "OnnxModel": ("vesper_sdk.export.runner", "OnnxModel"),
    "OnnxBackend": ("vesper_sdk.export.runner", "OnnxBackend"),
    "register_optimum": ("vesper_sdk.export.runner", "register_optimum"),
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'vesper_sdk.export' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    value = getattr(importlib.import_module(module_name), attr)
    globals()[name] = value
    return value
