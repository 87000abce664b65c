"""A run's record: ``metrics.jsonl`` rows, the loss-curve PNG, and peak memory."""

from __future__ import annotations

import io
import json
import math
import resource
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write_file


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` ([] when there is none)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_loss_curve(metrics_path: str | Path, out_path: str | Path) -> Path | None:
    """Plot training and validation loss from ``metrics.jsonl`` into a PNG (Agg backend)."""
    rows = read_metrics(Path(metrics_path))
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r and math.isfinite(r["loss"])]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if not train and not val:
        return None
    import matplotlib  # heavy: loaded only when a curve is drawn

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_file(out_path, buf.getvalue())


def peak_memory(device: torch.device) -> tuple[str, float]:
    """(name, MiB) of the peak memory since the last call: CUDA allocations on a GPU (the
    peak is reset), else the process's peak resident set."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
        return "peak_cuda_mb", round(peak, 1)
    # ru_maxrss is in KiB on Linux: the process's peak resident set so far.
    return "peak_rss_mb", round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
