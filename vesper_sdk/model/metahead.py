"""The MetaHead: per-token confidence, stop and error class from the final hidden state
and three statistics of the LM's own next-token distribution."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VesperConfig
from .flylora import Linear

N_LOGIT_FEATURES = 3


def logit_features(logits: torch.Tensor, chunk_rows: int = 1024) -> torch.Tensor:
    """What the LM's own distribution says about its top-1, [..., V] -> [..., 3], no grad.

    The top-1 log-probability, the top-1 minus top-2 logit margin and the entropy: the
    max-softmax baseline is the first of them, so the MetaHead starts from it and learns
    what the hidden state adds. Eagerly, rows go ``chunk_rows`` at a time, so a training
    batch never holds more than that many fp32 rows of softmax temporaries.
    """
    with torch.no_grad():
        flat = logits.reshape(-1, logits.shape[-1])
        tracing = torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()
        if tracing or flat.shape[0] <= chunk_rows:
            out = _logit_features(flat)
        else:
            out = torch.cat([_logit_features(flat[i:i + chunk_rows])
                             for i in range(0, flat.shape[0], chunk_rows)])
        return out.view(*logits.shape[:-1], 3)


def _logit_features(logits: torch.Tensor) -> torch.Tensor:
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1)
    if torch.compiler.is_compiling() and not torch.onnx.is_in_onnx_export():
        # topk's values by two max-reductions the compiler fuses with the others over the
        # vocabulary (topk is a separate radix-select); a repeated maximum is its own
        # runner-up, as with topk.
        first = z.amax(-1)
        is_first = z == first.unsqueeze(-1)
        runner_up = torch.where(is_first, float("-inf"), z).amax(-1)
        second = torch.where(is_first.sum(-1) > 1, first, runner_up)
    else:
        top2 = z.topk(2, dim=-1).values
        first, second = top2[..., 0], top2[..., 1]
    entropy = lse - (z.softmax(-1) * z).sum(-1)
    return torch.stack((first - lse, first - second, entropy), -1)


class MetaHead(nn.Module):
    """Per-token self-assessment from the final hidden state and the LM's own logits.

    Five logits: confidence (is my top-1 right?), stop (does the response end here?),
    and a 3-way error class (right / label in my top-5 / miss). ``calibration`` holds
    (scale, bias) applied to the confidence logit (Platt scaling); (1, 0) leaves it as
    is. After training, the confidence row of ``out`` is refitted on held-out tokens
    (:func:`vesper_sdk.metacog.fit_confidence`, which folds the scaling into the row).
    """

    def __init__(self, cfg: VesperConfig) -> None:
        super().__init__()
        self.use_logits = cfg.metahead_logit_features
        extra = N_LOGIT_FEATURES if self.use_logits else 0
        self.fc = Linear(cfg.hidden_size + extra, cfg.metahead_hidden_size)
        self.out = Linear(cfg.metahead_hidden_size, 5)
        self.register_buffer("calibration", torch.tensor([1.0, 0.0]))

    def forward(self, h: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return self.out(self.activations(h, logits))

    def activations(self, h: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """What the output layer reads (the hidden layer), e.g. to refit the confidence
        row on held-out tokens (:func:`vesper_sdk.metacog.fit_confidence`)."""
        if self.use_logits:
            h = torch.cat((h, logit_features(logits).to(h.dtype)), dim=-1)
        return F.gelu(self.fc(h))

    def confidence(self, meta: torch.Tensor) -> torch.Tensor:
        """Calibrated probability that the top-1 is right, from the raw meta logits."""
        scale, bias = self.calibration.to(meta.dtype).unbind()
        return torch.sigmoid(meta[..., 0] * scale + bias)
