"""The public names of ``vesper_sdk.export``, resolved on first use.

>>> from vesper_sdk.export import export_onnx, OnnxModel
>>> export_onnx("runs/a/model", "runs/a-onnx", quantize="int4")
>>> OnnxModel("runs/a-onnx").generate("Hello", max_new_tokens=16)

``vesper_sdk.export`` is a folder without ``__init__.py`` (see ``vesper_sdk/__init__.py``), so
these names are attached to it by :func:`install`; ``import vesper_sdk.export`` still imports
none of onnx, onnxruntime or onnxscript (the ``export`` extra) until a name is used.
"""

from __future__ import annotations

import importlib

from ..lazy import lazy_names

_LAZY: dict[str, tuple[str, str | None]] = {
    "export_onnx": ("vesper_sdk.export.onnx_export", "export_onnx"),
    "ExportOptions": ("vesper_sdk.export.command", "ExportOptions"),
    "ExportError": ("vesper_sdk.export.onnx_export", "ExportError"),
    "check_parity": ("vesper_sdk.export.onnx_export", "check_parity"),
    "OnnxModel": ("vesper_sdk.inference.llm", "load_onnx"),
    "OnnxBackend": ("vesper_sdk.export.runner", "OnnxBackend"),
    "register_optimum": ("vesper_sdk.export.runner", "register_optimum"),
}


def install() -> None:
    """Give the ``vesper_sdk.export`` namespace its public names (PEP 562 ``__getattr__``)."""
    package = importlib.import_module("vesper_sdk.export")
    package.__getattr__ = lazy_names("vesper_sdk.export", _LAZY)
    package.__all__ = list(_LAZY)
    package.__doc__ = __doc__
