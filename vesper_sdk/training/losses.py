"""The language-model loss. The MetaHead's own loss and targets live beside the head
(:func:`vesper_sdk.model.metahead.metahead_loss`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed token cross-entropy over the labels where ``mask`` is true (fp32 result)."""
    target = labels.masked_fill(~mask, IGNORE_INDEX)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
