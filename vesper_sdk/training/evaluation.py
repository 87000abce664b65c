"""Validation during training: loss, perplexity, top-1 accuracy, MetaHead loss and ECE.

Every process scores its share of the same validation blocks; the sums are all-reduced,
so the figures do not depend on the number of processes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist

from ..eval.metrics import bin_index, ece_from_bin_sums
from ..eval.scorer import score_labels
from ..model import VesperLM
from ..model.metahead import metahead_loss, metahead_targets
from .data import TokenCache, get_batch
from .distributed import DistInfo

ECE_BINS = 15


class CalibrationMeter:
    """Expected calibration error of the MetaHead confidence, summed as batches come (on
    the device, in sums that all-reduce across processes); the bins and the formula are
    :mod:`vesper_sdk.eval.metrics`', so it equals ``expected_calibration_error`` on the
    same values."""

    def __init__(self, bins: int = ECE_BINS, device: torch.device | str = "cpu") -> None:
        self.bins = bins
        self.stats = torch.zeros(3, bins, dtype=torch.float64, device=device)

    def update(self, confidence: torch.Tensor, correct: torch.Tensor, mask: torch.Tensor) -> None:
        """Add the positions where ``mask`` is true."""
        conf = confidence[mask].double()
        idx = bin_index(conf, self.bins)
        ones = torch.ones_like(conf)
        self.stats[0].index_add_(0, idx, ones)
        self.stats[1].index_add_(0, idx, conf)
        self.stats[2].index_add_(0, idx, correct[mask].double())

    def ece(self) -> float:
        """sum over bins of (bin share) x |accuracy - mean confidence|; NaN when empty."""
        return ece_from_bin_sums(*self.stats.cpu().numpy())


@torch.no_grad()
def evaluate_blocks(model: VesperLM, cache: TokenCache, blocks: np.ndarray, seq_len: int,
                    batch_size: int, eos_id: int, device: torch.device, d: DistInfo,
                    autocast: Callable[[], contextlib.AbstractContextManager],
                    ) -> dict[str, float]:
    """Validation loss, perplexity, top-1 accuracy, MetaHead loss and ECE (15 bins) over
    ``blocks`` (the whole group's); this rank scores every ``d.world``-th of them."""
    was_training = model.training
    model.eval()
    mine = blocks[d.rank::d.world]
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    meter = CalibrationMeter(ECE_BINS, device)
    for i in range(0, len(mine), batch_size):
        x, y, m = (t.to(device) for t in get_batch(cache, mine[i:i + batch_size], seq_len))
        with autocast():
            out = model(x)
        targets = metahead_targets(out.logits, y, eos_id)
        sums[0] += -(score_labels(out.logits, y).logprob * m).sum().double()
        sums[1] += m.sum()
        sums[2] += (targets.correct & m).sum()
        sums[3] += metahead_loss(out, y, m, eos_id, normalizer=1.0, targets=targets).double()
        meter.update(out.confidence.float(), targets.correct, m)
    stats = torch.cat([sums, meter.stats.reshape(-1)])
    if d.world > 1:
        dist.all_reduce(stats)
    sums = stats[:4]
    meter.stats = stats[4:].reshape(3, ECE_BINS)
    model.train(was_training)
    n = max(float(sums[1]), 1.0)
    loss = float(sums[0]) / n
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)),
            "val_acc": float(sums[2]) / n, "val_meta_loss": float(sums[3]) / n,
            "val_ece": meter.ece()}
