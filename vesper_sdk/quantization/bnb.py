"""bitsandbytes methods: LLM.int8 (``int8``), 4-bit NormalFloat (``nf4``) and float (``fp4``).

bitsandbytes is an optional extra (``pip install 'vesper-sdk[quantize]'``), imported when
a layer is first quantized or loaded, so this module imports without it.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from ..model import FlyLoRALinear, ModelFolderError
from .methods import QuantizeError, register

# LLM.int8's outlier threshold: activation columns above it run in 16-bit (the paper's 6.0).
INT8_THRESHOLD = 6.0
# bitsandbytes' default 4-bit block; statistics double-quantized (QLoRA) to save 0.37 bit/w.
BLOCKSIZE_4BIT = 64


class QuantizedFlyLoRALinear(FlyLoRALinear):
    """FlyLoRALinear whose base product is a quantized layer (``base``); ``forward`` is
    inherited, so the rest of the layer's math is FlyLoRALinear's own.

    The low-rank branch (frozen sparse ``lora_A``, ``lora_B``, ``balance_bias``) and the
    top-k rank selection (``rank_mask``, inherited, so there is one definition of it)
    stay in full precision: rounding ``A`` would change which ranks fire, not just by
    how much.
    """

    def __init__(self, src: FlyLoRALinear, base: nn.Module) -> None:
        nn.Module.__init__(self)  # not FlyLoRALinear.__init__: no fp weight, no new random A
        self.in_features, self.out_features = src.in_features, src.out_features
        self.rank, self.topk = src.rank, src.topk
        self.bias_update_rate, self.scaling = src.bias_update_rate, src.scaling
        self.base = base
        self.lora_B = src.lora_B
        self.register_buffer("lora_A", src.lora_A)
        self.register_buffer("balance_bias", src.balance_bias)
        self.register_buffer("rank_load", torch.zeros(src.rank, device=src.lora_A.device),
                             persistent=False)

    def base_product(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x)

    def freeze_base(self) -> None:
        """The quantized base is frozen already (bitsandbytes weights have no gradient)."""


class _QuietBnb(logging.Filter):
    """Drop two bitsandbytes log lines that are expected here and only alarm users."""

    DROP = ("inputs will be cast from",  # LLM.int8 computes in fp16 by design
            "kernels-community")  # an optional hub kernel; nothing is downloaded at run time

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(d in str(record.msg) for d in self.DROP)


def _bnb() -> Any:
    for name in ("bitsandbytes.autograd._functions", "bitsandbytes.backends.cpu.ops"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _QuietBnb) for f in logger.filters):
            logger.addFilter(_QuietBnb())
    try:
        import bitsandbytes as bnb  # optional extra: only quantizing needs it
    except ImportError as exc:  # pragma: no cover - the extra is installed in dev
        raise QuantizeError(
            f"bitsandbytes is not installed ({exc}): pip install 'vesper-sdk[quantize]'"
        ) from None
    return bnb


def _damaged(where: str, method: str, exc: Exception) -> ModelFolderError:
    return ModelFolderError(
        f"{where}: the {method} tensors of this layer are missing or damaged ({exc}); "
        "re-run `vesper quantize` on the full-precision folder")


class _BitsAndBytes(ABC):
    """What the bitsandbytes methods share: library, version, the host-copy quantize."""

    library = "bitsandbytes"
    name: str

    def version(self) -> str:
        return _bnb().__version__

    @abstractmethod
    def _new_layer(self, in_features: int, out_features: int) -> nn.Module:
        """An empty bitsandbytes layer of this method (on the meta device)."""

    @abstractmethod
    def _param(self, weight: torch.Tensor, layer: nn.Module) -> nn.Parameter:
        """``weight`` as this method's bitsandbytes parameter (quantized when moved)."""

    def quantize_linear(self, weight: torch.Tensor, device: torch.device) -> nn.Module:
        out_features, in_features = weight.shape
        layer = self._new_layer(in_features, out_features)
        # From a host copy: bitsandbytes quantizes when a parameter moves off the CPU copy,
        # and the result lands on ``device`` (int8: row absmax -> int8 + SCB; 4-bit: blocks).
        w = weight.detach().float().cpu().contiguous()
        layer.weight = self._param(w, layer).to(device)
        return layer


class Int8Method(_BitsAndBytes):
    """LLM.int8(): int8 weights with per-row scales (``SCB``), fp16 outlier columns."""

    name = "int8"
    description = "LLM.int8() (bitsandbytes Linear8bitLt, int8 weights with per-row scales)"

    def settings(self) -> dict[str, Any]:
        return {"threshold": INT8_THRESHOLD}

    def _new_layer(self, in_features: int, out_features: int) -> nn.Module:
        # Built on the meta device: the weight is assigned right after, no fp copy is allocated.
        return _bnb().nn.Linear8bitLt(in_features, out_features, bias=False,
                                      has_fp16_weights=False, threshold=INT8_THRESHOLD,
                                      device="meta")

    def _param(self, weight: torch.Tensor, layer: nn.Module) -> nn.Parameter:
        return _bnb().nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)

    def load_linear(self, in_features: int, out_features: int,
                    tensors: dict[str, torch.Tensor], device: torch.device,
                    where: str) -> nn.Module:
        layer = self._new_layer(in_features, out_features)
        try:
            weight = tensors["weight"].to(device)
            if weight.dtype != torch.int8 or tuple(weight.shape) != (out_features, in_features):
                raise KeyError("weight")
            param = _bnb().nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
            # Int8Params keeps the int8 matrix (CB) and its row scales (SCB) beside .data.
            param.CB, param.SCB = weight, tensors["SCB"].to(device).float()
            layer.weight = param
        except KeyError as exc:
            raise _damaged(where, self.name, exc) from None
        return layer


class FourBitMethod(_BitsAndBytes):
    """bitsandbytes Linear4bit with block-wise absmax, ``quant_type`` ``nf4`` or ``fp4``."""

    def __init__(self, quant_type: str, description: str) -> None:
        self.name = quant_type
        self.description = description

    def settings(self) -> dict[str, Any]:
        return {"blocksize": BLOCKSIZE_4BIT, "compress_statistics": True}

    def _new_layer(self, in_features: int, out_features: int) -> nn.Module:
        return _bnb().nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=None,
                                    compress_statistics=True, quant_type=self.name,
                                    device="meta")

    def _param(self, weight: torch.Tensor, layer: nn.Module) -> nn.Parameter:
        return _bnb().nn.Params4bit(weight, requires_grad=False, blocksize=BLOCKSIZE_4BIT,
                                    compress_statistics=True, quant_type=self.name,
                                    module=layer)

    def load_linear(self, in_features: int, out_features: int,
                    tensors: dict[str, torch.Tensor], device: torch.device,
                    where: str) -> nn.Module:
        layer = self._new_layer(in_features, out_features)
        try:
            weight = tensors["weight"].to(device)
            stats = {k[len("weight."):]: v for k, v in tensors.items()
                     if k.startswith("weight.")}
            layer.weight = _bnb().nn.Params4bit.from_prequantized(
                data=weight, quantized_stats=stats, requires_grad=False, device=device,
                module=layer)
            if layer.weight.quant_state.quant_type != self.name:
                raise KeyError(f"weight.quant_state.bitsandbytes__{self.name}")
        except KeyError as exc:
            raise _damaged(where, self.name, exc) from None
        return layer


register(Int8Method())
register(FourBitMethod("nf4", "4-bit NormalFloat (bitsandbytes Linear4bit, block-wise absmax)"))
register(FourBitMethod("fp4", "4-bit float (bitsandbytes Linear4bit, block-wise absmax)"))
