"""The arithmetic a run uses: fp32, or bf16 / fp16 autocast on a GPU."""

from __future__ import annotations

import contextlib

import torch


def resolve_precision(opt: str, device: torch.device) -> str:
    """'auto' -> bf16 on a GPU that has it, else fp16 on GPU, fp32 on CPU."""
    if opt == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if opt == "fp16" and device.type != "cuda":
        raise ValueError("precision='fp16' needs a CUDA GPU: use 'fp32' (or 'bf16') on CPU")
    return opt


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context for ``precision`` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)
