"""Velvet's update paths (:mod:`vesper_sdk.training.optim` picks one): the flat buffers of
the Triton path, and the ``_foreach`` and fused-AdamW updates over parameter lists.

Every path computes the same update to float rounding; see the optimizer's module
docstring for the maths.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import torch


@dataclass
class Bucket:
    """Flat buffers of every parameter of one (device, dtype), and their views."""

    device: torch.device
    dtype: torch.dtype
    params: list[torch.Tensor] = field(default_factory=list)
    group_idx: list[int] = field(default_factory=list)
    ptrs: list[int] = field(default_factory=list)  # p.data_ptr() of each view, to spot moves
    states: list[dict[str, Any] | None] = field(default_factory=list)  # self.state[p], once set
    g_views: list[torch.Tensor] = field(default_factory=list)
    m_views: list[torch.Tensor] = field(default_factory=list)
    v_views: list[torch.Tensor] = field(default_factory=list)
    p: torch.Tensor | None = None
    g: torch.Tensor | None = None
    m: torch.Tensor | None = None
    v: torch.Tensor | None = None
    block_seg: torch.Tensor | None = None
    n_blocks: list[int] = field(default_factory=list)  # blocks of each parameter
    # The blocks to launch over for the last pattern of which params had gradients.
    active_key: tuple[bool, ...] | None = None
    active_blocks: torch.Tensor | None = None

    def blocks_for(self, active: list[bool]) -> torch.Tensor:
        """int32 indices of the blocks of the active parameters, cached per pattern."""
        key = tuple(active)
        if key != self.active_key:
            seg_active = torch.tensor(active, dtype=torch.bool)
            per_block = torch.repeat_interleave(seg_active, torch.tensor(self.n_blocks))
            idx = torch.nonzero(per_block).flatten().to(torch.int32)
            self.active_blocks = idx.to(self.device)
            self.active_key = key
        assert self.active_blocks is not None
        return self.active_blocks


def build_buckets(param_groups: list[dict[str, Any]], state: dict[torch.Tensor, Any],
                  block: int) -> list[Bucket]:
    """Pack parameters, grads and moments into flat buffers and re-point them as views.

    One :class:`Bucket` per (device, dtype); each tensor is padded to whole ``block``s.
    Existing moments in ``state`` are copied in and replaced by their views.
    """
    buckets: dict[tuple[torch.device, torch.dtype], Bucket] = {}
    seen: set[int] = set()
    for gi, group in enumerate(param_groups):
        for p in group["params"]:
            if id(p) in seen:
                continue
            seen.add(id(p))
            if not p.is_floating_point():
                raise TypeError(f"VelvetOptimizer needs floating-point params, got {p.dtype}")
            b = buckets.setdefault((p.device, p.dtype), Bucket(p.device, p.dtype))
            b.params.append(p)
            b.group_idx.append(gi)
    for b in buckets.values():
        numels = [p.numel() for p in b.params]
        n_blocks = [-(-n // block) for n in numels]
        total = sum(n_blocks) * block
        b.p = torch.zeros(total, dtype=b.dtype, device=b.device)
        b.g = torch.zeros(total, dtype=b.dtype, device=b.device)
        b.m = torch.zeros(total, dtype=torch.float32, device=b.device)
        b.v = torch.zeros(total, dtype=torch.float32, device=b.device)
        b.n_blocks = n_blocks
        b.block_seg = torch.repeat_interleave(
            torch.arange(len(numels), dtype=torch.int32),
            torch.tensor(n_blocks, dtype=torch.int64),
        ).to(b.device)
        offset = 0
        for p, n, nb in zip(b.params, numels, n_blocks, strict=True):
            sl = slice(offset, offset + n)
            offset += nb * block
            p_view = b.p[sl].view(p.shape)
            g_view = b.g[sl].view(p.shape)
            m_view = b.m[sl].view(p.shape)
            v_view = b.v[sl].view(p.shape)
            p_view.copy_(p.detach())
            st = state.get(p) or None
            if st is not None:
                m_view.copy_(st["exp_avg"])
                v_view.copy_(st["exp_avg_sq"])
                st["exp_avg"], st["exp_avg_sq"] = m_view, v_view
            b.states.append(st)
            grad = p.grad
            p.data = p_view
            if grad is not None:
                g_view.copy_(grad)
                p.grad = g_view
            b.ptrs.append(p.data_ptr())
            b.g_views.append(g_view)
            b.m_views.append(m_view)
            b.v_views.append(v_view)
    return list(buckets.values())


def foreach_update(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    step_sizes: list[float],
    bc2_sqrts: list[float],
    *,
    decay: float,
    beta1: float,
    beta2: float,
    eps: float,
    sparse_threshold: float | None,
) -> None:
    """The kernel's update with ``_foreach`` ops, in ``torch.optim.AdamW``'s op order."""
    low_precision = params[0].dtype != torch.float32
    # Math in fp32 whatever the param dtype; low-precision params are rounded once at the end.
    p32 = [p.float() for p in params] if low_precision else params
    g32 = [g.float() for g in grads] if grads[0].dtype != torch.float32 else grads
    if sparse_threshold is not None:
        keep = [g.abs() > sparse_threshold for g in g32]
        before = [t.clone() for t in chain(p32, exp_avgs, exp_avg_sqs)]
    torch._foreach_mul_(p32, decay)
    torch._foreach_lerp_(exp_avgs, g32, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, g32, g32, 1.0 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bc2_sqrts)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(p32, exp_avgs, denom, [-s for s in step_sizes])
    if sparse_threshold is not None:
        for k, new, old in zip(keep * 3, chain(p32, exp_avgs, exp_avg_sqs), before, strict=True):
            new.copy_(torch.where(k, new, old))
    if low_precision:
        torch._foreach_copy_(params, p32)


def fused_update(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    states: list[dict[str, Any]],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """The same update through torch's fused AdamW kernel (fp32 tensors of one device).

    The kernel's step size is ``lr_k / (1 - beta1 ** t)`` and its decay ``1 - lr_k * wd_k``;
    Velvet's are ``lr / (1 - prod_t beta1_t)`` and ``1 - lr * wd``. So ``lr_k`` and ``wd_k``
    are solved for per (step, beta1 product): one call per distinct pair, usually one.
    """
    by_step: dict[tuple[int, float], list[int]] = defaultdict(list)
    for i, st in enumerate(states):
        by_step[(st["step"], st["beta1_prod"])].append(i)
    for (step, prod), idx in by_step.items():
        lr_k = lr * (1.0 - beta1 ** step) / (1.0 - prod)
        wd_k = lr * weight_decay / lr_k if lr_k > 0 else 0.0
        # The kernel only reads the step counts (torch's AdamW advances them beforehand).
        steps = [torch.tensor(float(step), device=params[idx[0]].device)] * len(idx)
        torch._fused_adamw_([params[i] for i in idx], [grads[i] for i in idx],
                            [exp_avgs[i] for i in idx], [exp_avg_sqs[i] for i in idx], [],
                            steps, lr=lr_k, beta1=beta1, beta2=beta2, weight_decay=wd_k,
                            eps=eps, amsgrad=False, maximize=False)
