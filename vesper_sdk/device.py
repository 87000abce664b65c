"""Where a model runs: the one place that turns 'auto' into a device, and what its
matrix units can do (the denominator of MFU figures)."""

from __future__ import annotations

import time

import torch


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' (or None) -> CUDA when present, else CPU; anything else as torch reads it."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def matmul_peak_tflops(device: torch.device, n: int = 8192, reps: int = 10) -> float:
    """The bf16 n x n x n matmul rate this GPU reaches (TFLOP/s), measured now: what a
    model FLOP/s figure is divided by for MFU. Thirteen 8192^3 products: well under a
    second on a data-centre GPU."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12
