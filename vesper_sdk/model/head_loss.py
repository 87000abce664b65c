"""The LM head's cross-entropy, with the MetaHead's logit statistics and targets, a chunk
of rows at a time: a training step never holds the [tokens, vocabulary] logits.

Liger-Kernel's fused linear cross-entropy is the model. Each chunk's logits are made,
reduced once over the vocabulary (log-sum-exp, top-5, entropy, the label's logit) and
dropped; as the loss is a sum of per-token terms, its gradient with respect to the
chunk's logits, ``(softmax - one_hot(label)) * mask``, is known there too, so the
gradients for the chunk's hidden states and for the head's weight are made in the same
pass and the backward only scales them. The plain path (full logits, then
``F.cross_entropy``, :func:`~.metahead.logit_statistics` and
:func:`~.metahead.metahead_targets`) computes the same figures; the tests hold the two
equal, loss and gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .metahead import MetaTargets, logit_features_from_top2, metahead_targets_from_top

IGNORE_INDEX = -100
# Rows per chunk: as many as keep one chunk's fp32 logits under this many bytes.
CHUNK_BYTES = 128 * 2**20


@dataclass
class HeadLoss:
    """What a training step needs from the LM head, without its logits.

    lm_loss_sum: the summed token cross-entropy over the scored positions (fp32, with a
    gradient); statistics [..., 4]: :func:`~.metahead.logit_statistics` (no gradient; None
    from the full-logits path of a model whose MetaHead reads no logit features);
    targets: the MetaHead's :class:`~.metahead.MetaTargets`.
    """

    lm_loss_sum: torch.Tensor
    statistics: torch.Tensor | None
    targets: MetaTargets


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed token cross-entropy over the labels where ``mask`` is true (fp32 result)."""
    target = labels.masked_fill(~mask, IGNORE_INDEX)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def chunk_rows_for(vocab_size: int, budget: int = CHUNK_BYTES) -> int:
    """Rows of fp32 logits that fit in ``budget`` bytes (at least one), a multiple of 64
    where that many fit (the matrix units' tile)."""
    rows = budget // (4 * vocab_size)
    return rows - rows % 64 if rows >= 64 else max(1, rows)


def head_loss(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
              mask: torch.Tensor, eos_id: int, chunk_rows: int | None = None) -> HeadLoss:
    """The LM loss, logit statistics and MetaHead targets of ``F.linear(h, weight)``
    without materialising it: h [..., D], weight [V, D], labels and mask [...].

    ``chunk_rows`` rows at a time (default :func:`chunk_rows_for` the vocabulary). Under
    autocast the logits are made in its dtype and reduced in fp32, as the plain path does.
    """
    lead = labels.shape
    if h.shape[:-1] != lead or mask.shape != lead:
        raise ValueError(f"hidden states {tuple(h.shape)}, labels {tuple(lead)} and mask "
                         f"{tuple(mask.shape)} must share their leading dimensions")
    rows = chunk_rows or chunk_rows_for(weight.shape[0])
    loss, stats, top5 = _HeadLoss.apply(h.reshape(-1, h.shape[-1]), weight,
                                        labels.reshape(-1), mask.reshape(-1), rows)
    targets = metahead_targets_from_top(top5.view(*lead, top5.shape[-1]), labels, eos_id)
    return HeadLoss(loss, stats.view(*lead, stats.shape[-1]), targets)


class _HeadLoss(torch.autograd.Function):
    """(loss sum, statistics [N, 4], top-5 indices [N, 5]) of the chunked head; the
    gradients are made in the forward pass (see the module docstring)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                mask: torch.Tensor, rows: int):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n = h.shape[0]
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        stats = torch.empty((n, 4), dtype=torch.float32, device=h.device)
        top5 = torch.empty((n, min(5, weight.shape[0])), dtype=torch.long, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        # fp32 whatever the weight's dtype: chunks' products are summed here.
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if need_w else None
        for i in range(0, n, rows):
            hc, yc, mc = h[i:i + rows], labels[i:i + rows], mask[i:i + rows]
            logits = F.linear(hc, weight)
            z = logits.float()
            lse = torch.logsumexp(z, dim=-1)
            top = z.topk(top5.shape[1], dim=-1)
            top5[i:i + rows] = top.indices
            p = torch.softmax(z, dim=-1)
            entropy = lse - (p * z).sum(-1)
            stats[i:i + rows] = logit_features_from_top2(
                top.values[:, 0], top.values[:, 1] if top5.shape[1] > 1 else top.values[:, 0],
                entropy, lse)
            label_logit = z.gather(1, yc.clamp(min=0)[:, None])[:, 0]
            loss += ((lse - label_logit) * mc).sum()
            if grad_h is None and grad_w is None:
                continue
            # d(sum of masked -log p[label]) / d logits, in place over the softmax.
            p.scatter_add_(1, yc.clamp(min=0)[:, None],
                           torch.full_like(label_logit[:, None], -1.0))
            # In the logits' dtype, as autograd would bring it to the head's matmuls (under
            # autocast these cast the weight themselves, once per step).
            dz = (p * mc[:, None].to(p.dtype)).to(logits.dtype)
            if grad_h is not None:
                grad_h[i:i + rows] = dz @ weight
            if grad_w is not None:
                grad_w += dz.t() @ hc
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(stats, top5)
        return loss, stats, top5

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_stats, _grad_top5):
        grad_h, grad_w = ctx.saved_tensors
        gh = None if grad_h is None else grad_h * grad_loss.to(grad_h.dtype)
        gw = None if grad_w is None else (grad_w * grad_loss).to(ctx.weight_dtype)
        return gh, gw, None, None, None
