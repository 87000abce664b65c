"""Velvet: AdamW with a loss-adaptive learning rate and beta1, in one Triton launch per step.

>>> opt = VelvetOptimizer(model.parameters(), lr=5e-4)
>>> loss.backward()
>>> opt.set_loss(loss.item(), vocab_size)   # optional: drives the adaptive scales
>>> opt.step(); opt.zero_grad()

**Maths.** AdamW (decoupled weight decay ``p -= lr * wd * p``, bias-corrected moments),
with two scales taken from the last training loss given to :meth:`VelvetOptimizer.set_loss`
(a cross-entropy in nats over a vocabulary of ``V`` tokens). Both use the normalised
entropy ``h = loss / ln V`` (``= ln(ppl) / ln V``: 1 for a uniform guess, 0 for a perfect
model):

* entropy-adaptive learning rate: ``lr_scale = clamp(0.7 + 0.6 * h, 0.7, 1.3)``. A model
  that is still near-uniform (``h ~ 1``) takes steps 1.3x the configured lr; one that has
  learned most of the signal (``h < 0.5``) slows towards 0.7x.
* perplexity-guided beta1 (opt-in, ``perplexity_guided=True``): ``beta1_scale =
  clamp(1 + 0.1 * tanh(2 * (h - 0.5)), 0.7, 1.3)`` and ``beta1 = min(beta1 * beta1_scale,
  0.999)``. While perplexity is high the gradients are noisy, so momentum averages over
  more steps (0.9 -> ~0.97 at ``h = 1``); as perplexity falls it reacts faster (~0.87 at
  ``h = 0.3``). The gentle slope keeps beta1 off the 0.999 cap for the default 0.9.
  Off by default: on plain text it trails AdamW in ``benchmarks/convergence.py``, which
  compares both scales with AdamW on plain text and on the built-in skills corpus.

Both scales are monotone in the loss, always within [0.7, 1.3], and a non-finite loss
(or never calling ``set_loss``) resets both to 1.0, where Velvet *is* AdamW. Each scale
is applied exactly once, on every path: ``lr_scale`` multiplies the group's lr (which the
decoupled weight decay then uses, as AdamW does), ``beta1_scale`` the group's beta1. Since
beta1 may change between steps, the first-moment bias correction is
``1 - prod_t beta1_t`` (which is ``1 - beta1 ** t`` when beta1 is constant).

**Sparse-aware mode** (``sparse_aware=True``): elements whose gradient is zero
(``|g| <= sparse_threshold``, default 0) are not touched at all -- parameter, weight decay
and both moments -- like lazy/SparseAdam, so rows of an embedding that a batch never saw
keep their state. The rule reads the gradient, not the value, so a zero-initialised
tensor (LoRA ``B``) receives non-zero gradients and trains normally. Bias corrections
follow the tensor's step count, as in torch's SparseAdam.

**Implementations** (``impl``), same numbers to float rounding (the update paths
themselves are in :mod:`vesper_sdk.training.velvet_update`):

* ``"triton"``: every parameter of one (device, dtype) lives in one flat buffer (each
  tensor padded to whole kernel blocks), with its ``.data`` (and ``.grad``) re-pointed to
  a view of it; gradients and fp32 moments share that layout, and one kernel launch per
  (device, dtype) updates all of them, 28 bytes of traffic per fp32 parameter. Per-group
  lr / weight decay and per-parameter bias corrections come from a small table built on
  the host each step. On CPU tensors the kernel runs in Triton's interpreter (tests).
* ``"fused"``: torch's own fused AdamW kernel (what ``torch.optim.AdamW(fused=True)``
  runs: one pass over each tensor), with Velvet's step folded into its arguments: the
  step size ``lr / (1 - prod beta1)`` into its lr (which divides by ``1 - beta1 ** t``),
  and its weight decay rescaled so that ``lr * weight_decay`` is unchanged. fp32
  parameters only; bf16/fp16 parameters (fp32 moments) and the sparse-aware mode take
  the ``"foreach"`` ops. ``benchmarks/optimizer.py`` times it against ``"foreach"``.
* ``"foreach"``: torch ``_foreach_*`` ops over the parameter lists, the same operation
  order as ``torch.optim.AdamW(foreach=True)``.
* ``"auto"`` (default): ``"triton"`` when every parameter is on a GPU and triton imports,
  else ``"fused"``.

Parameters keep fp32 moments whatever their dtype; a bf16/fp16 parameter is updated in
fp32 and rounded once (nearest-even).

**Gradients on the triton path.** After a step each ``p.grad`` is a view into the flat
gradient buffer, so ``zero_grad(set_to_none=False)`` (one memset) plus autograd's in-place
accumulation, ``clip_grad_norm_`` and DDP's default ``gradient_as_bucket_view=False``
(which copies reduced gradients into the existing ``.grad``) all write straight into it:
no extra traffic. A ``.grad`` that is not that view -- after ``zero_grad(set_to_none=True)``
(the torch default), a user assignment, or DDP with ``gradient_as_bucket_view=True``
(which re-points ``.grad`` into its own buckets) -- is copied into the flat buffer at the
next step (8 more bytes per fp32 parameter) and the view put back; results are the same.
A parameter whose ``.grad`` is None is skipped, its state untouched, as in torch.

**Caveats of the triton path.** Create the optimizer after moving the model to its
device; if a parameter's ``.data`` is replaced later (``model.to()``, ``p.data = ...``),
the next step notices and re-packs. Parameters come back contiguous. State tensors
(``exp_avg``, ``exp_avg_sq``) are views of the flat moment buffers: ``torch.save`` stores
each buffer once; formats that refuse shared storage (safetensors) need ``.clone()``.
FSDP manages its own flat parameters: use ``impl="foreach"`` there.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from collections import defaultdict
from collections.abc import Iterable
from itertools import chain
from typing import Any, Literal

import numpy as np
import torch
from torch.optim import Optimizer

from .velvet_update import Bucket, build_buckets, foreach_update, fused_update

__all__ = [
    "BETA1_MAX",
    "SCALE_MAX",
    "SCALE_MIN",
    "VelvetOptimizer",
    "entropy_lr_scale",
    "perplexity_beta1_scale",
]

Impl = Literal["auto", "triton", "fused", "foreach"]

SCALE_MIN = 0.7
SCALE_MAX = 1.3
BETA1_MAX = 0.999

_DEFAULT_BLOCK = 2048  # keep equal to vesper_sdk.kernels.velvet.BLOCK (not imported: no triton)
_NUM_HP = 7  # columns of the kernel's hyperparameter table (kernels/velvet.py, HP_*)
_UNUSED_ROW = (1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0)  # a skipped segment's row: never read


def _clamp(x: float) -> float:
    return min(max(x, SCALE_MIN), SCALE_MAX)


def _normalised_entropy(loss: float, vocab_size: int) -> float:
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be at least 2, got {vocab_size}")
    return loss / math.log(vocab_size)


def entropy_lr_scale(loss: float, vocab_size: int) -> float:
    """Learning-rate scale ``clamp(0.7 + 0.6 * loss / ln V, 0.7, 1.3)``; 1.0 if not finite."""
    if not math.isfinite(loss):
        return 1.0
    return _clamp(SCALE_MIN + 0.6 * _normalised_entropy(loss, vocab_size))


def perplexity_beta1_scale(loss: float, vocab_size: int) -> float:
    """Beta1 scale ``clamp(1 + 0.1 * tanh(2 * (ln(ppl) / ln V - 0.5)), 0.7, 1.3)``.

    ``ln(ppl)`` is the cross-entropy ``loss`` itself. Returns 1.0 for a non-finite loss.
    """
    if not math.isfinite(loss):
        return 1.0
    return _clamp(1.0 + 0.1 * math.tanh(2.0 * (_normalised_entropy(loss, vocab_size) - 0.5)))


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _kernel_importable() -> bool:
    """Whether the Triton kernel imports; "auto" falls back to fused (with a warning) if not."""
    if not _triton_available():
        return False
    try:
        from vesper_sdk.kernels import velvet  # noqa: F401 (optional: imports triton)
    except Exception as exc:  # a broken triton install must not stop training
        warnings.warn(f"VelvetOptimizer: Triton kernel unavailable ({exc}); using fused",
                      RuntimeWarning, stacklevel=3)
        return False
    return True


class VelvetOptimizer(Optimizer):
    """AdamW with entropy-adaptive lr, perplexity-guided beta1 and one fused update kernel.

    See the module docstring for the formulas, the sparse-aware rule and the flat-buffer
    design. With ``entropy_adaptive=False, perplexity_guided=False`` (or before any
    :meth:`set_loss`) it computes ``torch.optim.AdamW`` with the same hyperparameters.

    Args:
        params: parameters or parameter groups (groups may set ``lr``, ``betas``, ``eps``,
            ``weight_decay``).
        lr: learning rate (before ``lr_scale``).
        betas: ``(beta1, beta2)``; beta1 before ``beta1_scale``.
        eps: added to the bias-corrected ``sqrt(v)``.
        weight_decay: decoupled weight decay (``p -= lr * weight_decay * p``).
        entropy_adaptive: scale lr by :func:`entropy_lr_scale` of the last loss.
        perplexity_guided: scale beta1 by :func:`perplexity_beta1_scale` of the last loss
            (off by default: see the module docstring).
        sparse_aware: leave elements with ``|grad| <= sparse_threshold`` untouched.
        sparse_threshold: gradient magnitude at or below which an element is skipped.
        impl: ``"auto"``, ``"triton"`` (flat buffers, one launch per device and dtype),
            ``"fused"`` (torch's fused AdamW kernel) or ``"foreach"``.
        block_size: elements per kernel program on the triton path (a power of two);
            every parameter is padded to a multiple of it.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 5e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-3,
        entropy_adaptive: bool = True,
        perplexity_guided: bool = False,
        sparse_aware: bool = False,
        *,
        sparse_threshold: float = 0.0,
        impl: Impl = "auto",
        block_size: int = _DEFAULT_BLOCK,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"invalid learning rate: {lr}")
        if not eps >= 0.0:
            raise ValueError(f"invalid eps: {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas: {betas}")
        if not weight_decay >= 0.0:
            raise ValueError(f"invalid weight_decay: {weight_decay}")
        if not sparse_threshold >= 0.0:
            raise ValueError(f"invalid sparse_threshold: {sparse_threshold}")
        if impl not in ("auto", "triton", "fused", "foreach"):
            raise ValueError(f"impl must be 'auto', 'triton', 'fused' or 'foreach', got "
                             f"{impl!r}")
        if block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
        self.entropy_adaptive = bool(entropy_adaptive)
        self.perplexity_guided = bool(perplexity_guided)
        self.sparse_aware = bool(sparse_aware)
        self.sparse_threshold = float(sparse_threshold)
        self.impl: Impl = impl
        self.block_size = int(block_size)
        self._raw_lr_scale = 1.0
        self._raw_beta1_scale = 1.0
        self.last_loss: float | None = None
        self._buckets: list[Bucket] | None = None
        self._resolved_impl: str | None = None
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    # ----------------------------------------------------------------- adaptive scales

    @property
    def lr_scale(self) -> float:
        """Scale applied to every group's lr at the next step (1.0 when disabled)."""
        return self._raw_lr_scale if self.entropy_adaptive else 1.0

    @property
    def beta1_scale(self) -> float:
        """Scale applied to every group's beta1 at the next step (1.0 when disabled)."""
        return self._raw_beta1_scale if self.perplexity_guided else 1.0

    def set_loss(self, loss: float | torch.Tensor, vocab_size: int) -> None:
        """Feed the latest training loss (mean token cross-entropy, nats) to the scales.

        A tensor is read with ``.item()`` (a device sync); pass the float you already log
        to avoid it. A non-finite loss resets both scales to 1.0.
        """
        value = float(loss.detach().float().item()) if torch.is_tensor(loss) else float(loss)
        self.last_loss = value
        self._raw_lr_scale = entropy_lr_scale(value, vocab_size)
        self._raw_beta1_scale = perplexity_beta1_scale(value, vocab_size)

    def _group_hparams(self, group: dict[str, Any]) -> tuple[float, float, float, float, float]:
        """(lr, beta1, beta2, eps, weight_decay) of a group for this step, scales applied once."""
        beta1, beta2 = (float(b) for b in group["betas"])
        if self.perplexity_guided:
            # Never above 0.999 through scaling (nor below a beta1 configured higher).
            beta1 = min(beta1 * self.beta1_scale, max(BETA1_MAX, beta1))
        lr = float(group["lr"]) * self.lr_scale
        return lr, beta1, beta2, float(group["eps"]), float(group["weight_decay"])

    # ------------------------------------------------------------------------ stepping

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One update of every parameter that has a gradient; returns ``closure()`` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        impl = self._impl()
        if impl == "triton":
            self._step_flat()
        else:
            self._step_foreach(fused=impl == "fused")
        return loss

    def _impl(self) -> str:
        if self._resolved_impl is None:
            params = [p for g in self.param_groups for p in g["params"]]
            if self.impl == "triton":
                if not _triton_available():
                    raise ImportError("impl='triton' needs triton: "
                                      "pip install 'vesper-sdk[triton]'")
                self._resolved_impl = "triton"
            elif self.impl == "auto":
                on_gpu = bool(params) and all(p.device.type == "cuda" for p in params)
                self._resolved_impl = "triton" if on_gpu and _kernel_importable() else "fused"
            else:
                self._resolved_impl = self.impl
        return self._resolved_impl

    def _init_state(self, p: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        state["step"] = 0
        state["beta1_prod"] = 1.0
        state["exp_avg"] = m
        state["exp_avg_sq"] = v
        return state

    # foreach path ----------------------------------------------------------------------

    def _step_foreach(self, fused: bool = False) -> None:
        thr = self.sparse_threshold if self.sparse_aware else None
        for group in self.param_groups:
            lr, beta1, beta2, eps, wd = self._group_hparams(group)
            lists: dict[tuple[torch.device, torch.dtype], tuple[list, ...]] = defaultdict(
                lambda: ([], [], [], [], [], [])
            )
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("VelvetOptimizer does not support sparse gradients")
                state = self.state[p]
                if not state:
                    zeros = torch.zeros_like(p, dtype=torch.float32,
                                             memory_format=torch.preserve_format)
                    state = self._init_state(p, zeros, zeros.clone())
                state["step"] += 1
                state["beta1_prod"] *= beta1
                ps, gs, ms, vs, step_sizes, bc2_sqrts = lists[(p.device, p.dtype)]
                ps.append(p)
                gs.append(p.grad)
                ms.append(state["exp_avg"])
                vs.append(state["exp_avg_sq"])
                step_sizes.append(lr / (1.0 - state["beta1_prod"]))
                bc2_sqrts.append((1.0 - beta2 ** state["step"]) ** 0.5)
            for ps, gs, ms, vs, step_sizes, bc2_sqrts in lists.values():
                if fused and thr is None and ps[0].dtype == torch.float32:
                    # The kernel walks each tensor's memory in order: it needs p, g, m and v
                    # laid out alike (a transposed parameter with a dense .grad is not).
                    alike = [all(t.is_contiguous() for t in tensors)
                             for tensors in zip(ps, gs, ms, vs, strict=True)]
                    on = [i for i, ok in enumerate(alike) if ok]
                    if on:
                        fused_update(*([x[i] for i in on] for x in (ps, gs, ms, vs)),
                                      [self.state[ps[i]] for i in on], lr=lr, beta1=beta1,
                                      beta2=beta2, eps=eps, weight_decay=wd)
                    ps, gs, ms, vs, step_sizes, bc2_sqrts = (
                        [x[i] for i, ok in enumerate(alike) if not ok]
                        for x in (ps, gs, ms, vs, step_sizes, bc2_sqrts))
                    if not ps:
                        continue
                foreach_update(ps, gs, ms, vs, step_sizes, bc2_sqrts, decay=1.0 - lr * wd,
                                beta1=beta1, beta2=beta2, eps=eps, sparse_threshold=thr)

    # flat (triton) path ----------------------------------------------------------------

    def _step_flat(self) -> None:
        from vesper_sdk.kernels import velvet as _velvet  # optional: imports triton

        if self._buckets is None or self._layout_moved():
            self._build_buckets()
        assert self._buckets is not None
        hparams = [self._group_hparams(g) for g in self.param_groups]
        thr = self.sparse_threshold if self.sparse_aware else None
        # Rows of the kernel's table depend only on (group, step, beta1 product): compute
        # each distinct one once per step (usually one per group).
        row_cache: dict[tuple[int, int, float], tuple[float, ...]] = {}
        for b in self._buckets:
            rows: list[float] = []
            active: list[bool] = []
            copy_dst: list[torch.Tensor] = []
            copy_src: list[torch.Tensor] = []
            for i, p in enumerate(b.params):
                grad = p.grad
                active.append(grad is not None)
                if grad is None:
                    rows.extend(_UNUSED_ROW)
                    continue
                g_view = b.g_views[i]
                if grad is not g_view:
                    # A fresh .grad (zero_grad(set_to_none=True), DDP bucket views, user
                    # assignment): copy it in and point .grad back at the flat buffer.
                    if grad.is_sparse:
                        raise RuntimeError("VelvetOptimizer does not support sparse gradients")
                    copy_dst.append(g_view)
                    copy_src.append(grad)
                    p.grad = g_view
                state = b.states[i]
                if state is None:
                    state = b.states[i] = self._init_state(p, b.m_views[i], b.v_views[i])
                gi = b.group_idx[i]
                lr, beta1, beta2, eps, wd = hparams[gi]
                step = state["step"] = state["step"] + 1
                b1_prod = state["beta1_prod"] = state["beta1_prod"] * beta1
                key = (gi, step, b1_prod)
                row = row_cache.get(key)
                if row is None:
                    row = row_cache[key] = (
                        1.0 - lr * wd,
                        1.0 - beta1,
                        beta2,
                        1.0 - beta2,
                        lr / (1.0 - b1_prod),
                        (1.0 - beta2**step) ** 0.5,
                        eps,
                    )
                rows.extend(row)
            if copy_dst:
                torch._foreach_copy_(copy_dst, copy_src)
            if not any(active):
                continue
            # Through numpy: torch.tensor(list) converts a few thousand floats one by one.
            hp = torch.from_numpy(np.asarray(rows, dtype=np.float32).reshape(-1, _NUM_HP))
            if b.device.type == "cuda":
                # Pinned + non_blocking: no host/device sync, so steps queue back to back.
                hp = hp.pin_memory().to(b.device, non_blocking=True)
            _velvet.velvet_step(b.p, b.g, b.m, b.v, b.block_seg, hp, blocks=b.blocks_for(active),
                                block=self.block_size, sparse_threshold=thr)

    def _layout_moved(self) -> bool:
        """True when some parameter's ``.data`` no longer is its view of the flat buffer."""
        assert self._buckets is not None
        return any([p.data_ptr() for p in b.params] != b.ptrs for b in self._buckets)

    def _build_buckets(self) -> None:
        self._buckets = build_buckets(self.param_groups, self.state, self.block_size)

    # ------------------------------------------------------------- torch.optim plumbing

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As :meth:`torch.optim.Optimizer.zero_grad`; with ``set_to_none=False`` on the
        triton path, gradients that are views of the flat buffer are zeroed by one memset."""
        if set_to_none or not self._buckets:
            super().zero_grad(set_to_none=set_to_none)
            return
        for b in self._buckets:
            assert b.g is not None
            b.g.zero_()  # segments whose .grad is elsewhere are overwritten before use
            for p, g_view in zip(b.params, b.g_views, strict=True):
                grad = p.grad
                if grad is None or grad is g_view:
                    continue
                if grad.grad_fn is not None:
                    grad.detach_()
                else:
                    grad.requires_grad_(False)
                grad.zero_()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As :meth:`torch.optim.Optimizer.add_param_group`; the flat layout is rebuilt."""
        super().add_param_group(param_group)
        self._buckets = None
        self._resolved_impl = None

    def state_dict(self) -> dict[str, Any]:
        """Torch's state dict plus the current adaptive scales (key ``"velvet"``)."""
        sd = super().state_dict()
        sd["velvet"] = {
            "lr_scale": self._raw_lr_scale,
            "beta1_scale": self._raw_beta1_scale,
            "last_loss": self.last_loss,
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state from :meth:`state_dict` (or from ``torch.optim.AdamW``).

        Moments are kept fp32 (torch would cast them to each parameter's dtype) and
        copied, so the optimizer never aliases ``state_dict``'s tensors.
        """
        state_dict = dict(state_dict)
        scales = state_dict.pop("velvet", None)
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        id_map = dict(zip(
            chain.from_iterable(g["params"] for g in state_dict["param_groups"]),
            chain.from_iterable(g["params"] for g in self.param_groups),
            strict=True,
        ))
        for key, saved in saved_state.items():
            p = id_map.get(key)
            if p is None:
                continue
            state = self.state[p]
            step = saved.get("step", 0)
            state["step"] = int(step.item() if torch.is_tensor(step) else step)
            if "beta1_prod" not in saved:  # e.g. an AdamW state: constant beta1 so far
                beta1 = next(g for g in self.param_groups if any(q is p for q in g["params"]))
                state["beta1_prod"] = float(beta1["betas"][0]) ** state["step"]
            for name in ("exp_avg", "exp_avg_sq"):
                if name in saved:
                    state[name] = saved[name].to(device=p.device, dtype=torch.float32,
                                                 copy=True)
        if scales is not None:
            self._raw_lr_scale = float(scales["lr_scale"])
            self._raw_beta1_scale = float(scales["beta1_scale"])
            self.last_loss = scales.get("last_loss")
        self._buckets = None
        self._resolved_impl = None

    _CONFIG = ("entropy_adaptive", "perplexity_guided", "sparse_aware", "sparse_threshold",
               "impl", "block_size", "_raw_lr_scale", "_raw_beta1_scale", "last_loss")

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update({name: getattr(self, name) for name in self._CONFIG})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # Flat buffers are not part of the pickled state: re-pack at the next step.
        self.__dict__.setdefault("_buckets", None)
        self.__dict__.setdefault("_resolved_impl", None)
