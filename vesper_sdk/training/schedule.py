"""The learning-rate schedule: linear warmup, then cosine, linear or constant."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any


@dataclass
class LRSchedule:
    """Linear warmup to ``base_lr``, then cosine / linear decay to ``min_ratio * base_lr``
    at ``total`` steps, or constant. Stateless: the lr is a function of the step."""

    kind: str
    base_lr: float
    warmup: int
    total: int
    min_ratio: float = 0.1

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.base_lr * (step + 1) / self.warmup
        if self.kind == "constant":
            return self.base_lr
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        if self.kind == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            factor = 1.0 - progress
        return self.base_lr * (self.min_ratio + (1.0 - self.min_ratio) * factor)

    def state_dict(self) -> dict[str, Any]:
        """The schedule's parameters (saved in checkpoints for the record)."""
        return dataclasses.asdict(self)
