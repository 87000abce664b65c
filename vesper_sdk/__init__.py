"""vesper-sdk: train, quantize, export, serve and chat with VesperLM models.

>>> import vesper_sdk as vs
>>> cfg = vs.VesperConfig.from_preset("tiny", vocab_size=4096)
>>> model = vs.VesperLM(cfg)

Heavy entry points (train, calibrate, quantize, export_onnx, serve) import their dependencies only
when called, so ``import vesper_sdk`` stays fast and works without the optional extras.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from .config import ConfigError, VesperConfig
from .model import ModelFolderError, VesperLM, VesperOutput
from .tokenizer import VesperTokenizer

__version__ = "0.1.0"

# kernels/, export/, demo/ and benchmarks/ sit at the repo's top level with no __init__.py: a
# folder without one is only a namespace portion, which any installed regular package of the same
# name beats, so with the repo root on sys.path (`python -m pytest`, `python -c` there) they never
# hide PyPI's `kernels` (which transformers imports), `export`, `demo` or `benchmarks`. A wheel
# installs them under vesper_sdk/; from a source checkout (setuptools' editable finder does not
# resolve namespaces nested in a regular package) they are found through the repo root below.
_ROOT = Path(__file__).resolve().parent.parent
if not (Path(__file__).parent / "kernels").is_dir() and (_ROOT / "kernels").is_dir():
    __path__.append(str(_ROOT))  # noqa: F821 (a package's own __path__)

from .export import api as _export_api  # noqa: E402 (needs __path__ above)

_export_api.install()

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
