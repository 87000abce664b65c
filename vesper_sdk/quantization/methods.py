"""The quantization method protocol and its registry, ``METHODS``.

A method replaces the *base product* ``x @ W.T`` of a linear layer with a module that
holds ``W`` quantized. Everything else (which layers, the FlyLoRA branch, the folder)
is the same for every method and lives in ``api.py``.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn


class QuantizeError(ValueError):
    """A quantization request cannot be carried out; the message names the problem and fix."""


class QuantMethod(Protocol):
    """One way to quantize a linear map; ``METHODS`` maps ``name`` to an instance.

    Saving is the layer's own ``state_dict()`` (stored in ``model.safetensors`` under
    the layer's prefix); ``load_linear`` must rebuild the layer from exactly those keys.
    """

    name: str  # the --method value and config.json's quantization.method
    library: str  # config.json's quantization.library
    description: str

    def version(self) -> str:
        """Version of the library that quantizes, recorded in config.json."""
        ...

    def settings(self) -> dict[str, Any]:
        """The method's parameters, recorded in config.json's quantization block."""
        ...

    def quantize_linear(self, weight: torch.Tensor, device: torch.device) -> nn.Module:
        """A module computing ``x @ weight.T`` ([out, in], no bias), quantized on ``device``."""
        ...

    def load_linear(self, in_features: int, out_features: int,
                    tensors: dict[str, torch.Tensor], device: torch.device,
                    where: str) -> nn.Module:
        """Rebuild ``quantize_linear``'s module from its saved tensors (keys relative to
        the layer); raise ModelFolderError naming ``where`` when they are missing or damaged.
        """
        ...


METHODS: dict[str, QuantMethod] = {}


def register(method: QuantMethod) -> QuantMethod:
    """Add ``method`` to ``METHODS`` under its name; returns it."""
    METHODS[method.name] = method
    return method


def check_method(method: str) -> str:
    """Return ``method`` if supported, else raise QuantizeError listing the choices."""
    if method not in METHODS:
        raise QuantizeError(
            f"unknown quantization method {method!r}: choose one of {', '.join(METHODS)} "
            "(int8 = LLM.int8, nf4/fp4 = 4-bit); ONNX int8/int4 is `vesper export --quantize`")
    return method


def supported() -> str:
    """``"bitsandbytes int8, nf4, fp4"``: the registered methods grouped by library."""
    by_library: dict[str, list[str]] = {}
    for method in METHODS.values():
        by_library.setdefault(method.library, []).append(method.name)
    return "; ".join(f"{lib} {', '.join(names)}" for lib, names in by_library.items())
