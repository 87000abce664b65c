"""Velvet optimizer step: one Triton launch over a flat buffer, beside its torch reference.

The optimizer (:mod:`vesper_sdk.training.optim`) packs every parameter of one (device, dtype) into
a single contiguous buffer, each tensor's segment padded to a multiple of ``BLOCK``, and
keeps gradients and both Adam moments in buffers of the same layout (moments always
fp32). One launch then updates every parameter:

* ``block_seg[b]`` (int32) names the segment (parameter) that block ``b`` belongs to;
  since segments are padded to whole blocks, a block never straddles two parameters.
* ``hp[s, :]`` (fp32, ``NUM_HP`` columns, see ``HP_*``) holds segment ``s``'s
  hyperparameters for this step, resolved on the host: the parameter group's lr and
  weight decay with the adaptive scales already applied, and the bias corrections of
  the parameter's own step count.
* ``blocks`` (int32, optional) lists the blocks to update, one program each: the blocks
  of parameters that have a gradient this step. Skipped parameters cost nothing.

Whole blocks need no bounds mask, so loads and stores stay unpredicated 128-bit vectors;
only a launch whose ``n_elements`` ends inside a block (an unpadded tensor, as in the
per-tensor benchmark baseline) compiles the masked variant.

Per element the update is AdamW with decoupled weight decay, written in the same
operation order as ``torch.optim.AdamW`` (foreach) so the two agree to float rounding::

    p = p * decay                           # decay = 1 - lr * weight_decay
    m = m + (1 - beta1) * (g - m)           # torch lerp
    v = v * beta2 + (1 - beta2) * g * g
    p = p - step_size * m / (sqrt(v) / bc2_sqrt + eps)   # step_size = lr / bc1

Each element's p, g, m, v is read once and p, m, v written once: 28 bytes per fp32
parameter. Math is fp32 whatever the parameter dtype; a bf16/fp16 parameter is rounded
once (round-to-nearest-even) on the store. With ``sparse_threshold`` set, elements
whose ``|g| <= sparse_threshold`` keep their parameter and both moments (written back
unchanged, which keeps the stores vectorised).

:func:`velvet_reference` is the plain-torch version of the same step over the same
layout; the tests hold the kernel to it. On CPU tensors the kernel runs through Triton's
interpreter (slow; for tests), whether or not ``TRITON_INTERPRET=1`` was set when this
module was imported.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
import triton
import triton.language as tl

# Columns of the per-segment hyperparameter table.
HP_DECAY = 0  # 1 - lr * weight_decay
HP_ONE_MINUS_BETA1 = 1
HP_BETA2 = 2
HP_ONE_MINUS_BETA2 = 3
HP_STEP_SIZE = 4  # lr / (1 - prod(beta1_t))
HP_BC2_SQRT = 5  # sqrt(1 - beta2 ** step)
HP_EPS = 6
NUM_HP = 7

#: Elements per program. 2048 fp32 over 8 warps = 8 contiguous elements per thread per
#: tensor, i.e. two 128-bit loads: enough bytes in flight to saturate a data-center GPU's HBM.
BLOCK = 2048
NUM_WARPS = 8


@triton.jit
def _velvet_kernel(
    p_ptr,
    g_ptr,
    m_ptr,
    v_ptr,
    blocks_ptr,
    block_seg_ptr,
    hp_ptr,
    n_elements,
    sparse_threshold,
    NUM_HP: tl.constexpr,
    SPARSE: tl.constexpr,
    MASKED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    blk = tl.load(blocks_ptr + tl.program_id(0)).to(tl.int64)
    seg = tl.load(block_seg_ptr + blk).to(tl.int64)
    row = hp_ptr + seg * NUM_HP
    decay = tl.load(row + 0)
    one_minus_beta1 = tl.load(row + 1)
    beta2 = tl.load(row + 2)
    one_minus_beta2 = tl.load(row + 3)
    step_size = tl.load(row + 4)
    bc2_sqrt = tl.load(row + 5)
    eps = tl.load(row + 6)

    # int64: flat buffers of large models pass 2**31 elements.
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    if MASKED:
        mask = offs < n_elements
    else:
        mask = None

    p_raw = tl.load(p_ptr + offs, mask=mask)
    p = p_raw.to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    m_old = tl.load(m_ptr + offs, mask=mask)
    v_old = tl.load(v_ptr + offs, mask=mask)

    p = p * decay
    m = m_old + one_minus_beta1 * (g - m_old)
    v = v_old * beta2 + one_minus_beta2 * (g * g)
    # _rn: IEEE-rounded sqrt/div like torch, not the approximate PTX defaults.
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p - step_size * tl.div_rn(m, denom)

    if p_ptr.dtype.element_ty == tl.bfloat16:
        # Round to nearest even by hand: Triton's interpreter truncates on fp32->bf16,
        # and this is the same bits the GPU's cvt.rn gives, so CPU tests cover the GPU.
        bits = p.to(tl.uint32, bitcast=True)
        bits = bits + (((bits >> 16) & 1) + 0x7FFF)
        p_out = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        p_out = tl.where(p != p, p.to(tl.bfloat16), p_out)  # keep NaN a NaN
    else:
        p_out = p.to(p_ptr.dtype.element_ty)

    if SPARSE:
        # Skipped elements are written back as they were: a select, not a store mask,
        # so the stores stay full vectors.
        keep = tl.abs(g) > sparse_threshold
        p_out = tl.where(keep, p_out, p_raw)
        m = tl.where(keep, m, m_old)
        v = tl.where(keep, v, v_old)

    tl.store(p_ptr + offs, p_out, mask=mask)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)


_interpreted = None


def _kernel_for(device: torch.device):
    """The compiled kernel for GPU tensors, Triton's interpreter for CPU tensors."""
    global _interpreted
    if device.type != "cpu":
        return _velvet_kernel
    if _interpreted is None:
        from triton.runtime.interpreter import InterpretedFunction

        # .fn is the undecorated Python function whether or not TRITON_INTERPRET was set
        # at import time, so CPU tests do not depend on import order.
        _interpreted = InterpretedFunction(_velvet_kernel.fn)
    return _interpreted


def _check_layout(
    p: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    block_seg: torch.Tensor,
    hp: torch.Tensor,
    blocks: torch.Tensor,
    n_elements: int,
    block: int,
) -> None:
    for name, t in (("p", p), ("g", g), ("m", m), ("v", v)):
        if t.dim() != 1 or not t.is_contiguous() or t.device != p.device:
            raise ValueError(f"{name} must be a contiguous 1-D tensor on {p.device}")
        if t.numel() < n_elements:
            raise ValueError(f"{name} has {t.numel()} elements, fewer than {n_elements}")
    if g.dtype != p.dtype:
        raise ValueError(f"grad dtype {g.dtype} differs from param dtype {p.dtype}")
    if m.dtype != torch.float32 or v.dtype != torch.float32:
        raise ValueError("moments must be float32")
    if block_seg.dtype != torch.int32 or blocks.dtype != torch.int32:
        raise ValueError("block_seg and blocks must be int32")
    if hp.dtype != torch.float32 or hp.dim() != 2 or hp.shape[1] != NUM_HP:
        raise ValueError(f"hp must be a float32 [segments, {NUM_HP}] table")
    if not hp.is_contiguous():
        raise ValueError("hp must be contiguous")
    if block & (block - 1):
        raise ValueError(f"block must be a power of two, got {block}")
    if -(-n_elements // block) > block_seg.numel():
        raise ValueError("block_seg has fewer blocks than n_elements needs")


def blocks_of_segments(block_seg: torch.Tensor, segments: Iterable[int]) -> torch.Tensor:
    """int32 indices of the blocks that belong to ``segments``: a ``blocks`` argument that
    updates those segments and skips every other one."""
    wanted = torch.tensor(sorted(set(segments)), dtype=torch.int32, device=block_seg.device)
    return torch.nonzero(torch.isin(block_seg, wanted)).flatten().to(torch.int32)


def _resolve(
    p: torch.Tensor,
    block_seg: torch.Tensor,
    blocks: torch.Tensor | None,
    n_elements: int | None,
    block: int,
) -> tuple[torch.Tensor, int]:
    n = p.numel() if n_elements is None else int(n_elements)
    if blocks is None:
        n_blocks = -(-n // block)
        blocks = torch.arange(n_blocks, dtype=torch.int32, device=block_seg.device)
    return blocks, n


def velvet_step(
    p: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    block_seg: torch.Tensor,
    hp: torch.Tensor,
    *,
    blocks: torch.Tensor | None = None,
    n_elements: int | None = None,
    block: int = BLOCK,
    sparse_threshold: float | None = None,
    num_warps: int = NUM_WARPS,
) -> None:
    """Update ``p``, ``m``, ``v`` in place with one kernel launch.

    Args:
        p, g: parameter and gradient buffers (1-D, same float dtype).
        m, v: fp32 first and second moment buffers of the same layout.
        block_seg: int32, the segment (row of ``hp``) of every block of the buffers.
        hp: fp32 ``[n_segments, NUM_HP]`` hyperparameter table (columns ``HP_*``).
        blocks: int32 indices of the blocks to update, one program each (default: every
            block up to ``n_elements``). Must not index past ``n_elements``'s last block.
        n_elements: buffer length to respect (default ``p.numel()``); a launch whose last
            block is partial uses the bounds-masked kernel variant.
        block: elements per program; segment boundaries must be multiples of it.
        sparse_threshold: if set, elements with ``|g| <= sparse_threshold`` keep their
            parameter and moments.
        num_warps: warps per program (GPU only).
    """
    blocks, n = _resolve(p, block_seg, blocks, n_elements, block)
    _check_layout(p, g, m, v, block_seg, hp, blocks, n, block)
    if blocks.numel() == 0:
        return
    kernel = _kernel_for(p.device)
    # Triton launches on the current device: make it the buffers' one (cuda:1 params
    # with cuda:0 current would otherwise be an illegal memory access).
    other_gpu = p.device.type == "cuda" and p.device.index != torch.cuda.current_device()
    with torch.cuda.device(p.device) if other_gpu else contextlib.nullcontext():
        _launch(kernel, p, g, m, v, blocks, block_seg, hp, n, block, sparse_threshold,
                num_warps)


def _launch(kernel, p, g, m, v, blocks, block_seg, hp, n, block, sparse_threshold,
            num_warps) -> None:
    kernel[(blocks.numel(),)](
        p,
        g,
        m,
        v,
        blocks,
        block_seg,
        hp,
        n,
        0.0 if sparse_threshold is None else float(sparse_threshold),
        NUM_HP=NUM_HP,
        SPARSE=sparse_threshold is not None,
        MASKED=n % block != 0,
        BLOCK=block,
        num_warps=num_warps,
        # No FMA contraction: the same roundings as torch's separate ops (and as the
        # interpreter), at no cost to a memory-bound kernel.
        enable_fp_fusion=False,
    )


def velvet_reference(
    p: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    block_seg: torch.Tensor,
    hp: torch.Tensor,
    *,
    blocks: torch.Tensor | None = None,
    n_elements: int | None = None,
    block: int = BLOCK,
    sparse_threshold: float | None = None,
) -> None:
    """Plain-torch :func:`velvet_step`: same arguments, same in-place result."""
    blocks, n = _resolve(p, block_seg, blocks, n_elements, block)
    _check_layout(p, g, m, v, block_seg, hp, blocks, n, block)
    # Per-element hyperparameters: each block's segment row, repeated over the block.
    rows = hp[block_seg.long()].repeat_interleave(block, dim=0)[:n]
    active = torch.zeros(block_seg.numel(), dtype=torch.bool, device=p.device)
    active[blocks.long()] = True
    active = active.repeat_interleave(block)[:n]
    decay, omb1, beta2, omb2, step_size, bc2_sqrt, eps = (
        rows[:, c]
        for c in (HP_DECAY, HP_ONE_MINUS_BETA1, HP_BETA2, HP_ONE_MINUS_BETA2,
                  HP_STEP_SIZE, HP_BC2_SQRT, HP_EPS)
    )
    pv, gv, mv, vv = p[:n], g[:n].float(), m[:n], v[:n]
    p32 = pv.float() * decay
    m_new = mv + omb1 * (gv - mv)
    v_new = vv * beta2 + omb2 * (gv * gv)
    p32 = p32 - step_size * (m_new / (v_new.sqrt() / bc2_sqrt + eps))
    keep = active if sparse_threshold is None else active & (gv.abs() > sparse_threshold)
    pv.copy_(torch.where(keep, p32.to(p.dtype), pv))
    mv.copy_(torch.where(keep, m_new, mv))
    vv.copy_(torch.where(keep, v_new, vv))


def random_problem(numels: list[int], dtype: torch.dtype, *, block: int = BLOCK, seed: int = 0,
                   device: str | torch.device = "cpu") -> tuple[torch.Tensor, ...]:
    """Random flat p/g/m/v buffers (segments padded to whole blocks, as the optimizer
    builds them), block_seg and a random hyperparameter table: the inputs the tests and
    the GPU checks hold the kernel to its reference on. Seeded on the CPU, so the same
    problem on any device."""
    gen = torch.Generator().manual_seed(seed)
    n_blocks = [max(1, -(-n // block)) if n else 0 for n in numels]
    total = sum(n_blocks) * block
    p = torch.randn(total, generator=gen).to(dtype)
    g = (torch.randn(total, generator=gen) * 0.1).to(dtype)
    m = torch.randn(total, generator=gen) * 0.01
    v = torch.rand(total, generator=gen) * 1e-3
    block_seg = torch.repeat_interleave(
        torch.arange(len(numels), dtype=torch.int32), torch.tensor(n_blocks)
    )
    hp = torch.empty(len(numels), NUM_HP)
    for s in range(len(numels)):
        u = torch.rand(6, generator=gen).tolist()
        lr, wd = 1e-3 + 1e-2 * u[0], 0.1 * u[1]
        beta1, beta2, step = 0.8 + 0.19 * u[2], 0.99 + 0.009 * u[3], 1 + int(20 * u[4])
        hp[s, HP_DECAY] = 1 - lr * wd
        hp[s, HP_ONE_MINUS_BETA1] = 1 - beta1
        hp[s, HP_BETA2] = beta2
        hp[s, HP_ONE_MINUS_BETA2] = 1 - beta2
        hp[s, HP_STEP_SIZE] = lr / (1 - beta1**step)
        hp[s, HP_BC2_SQRT] = (1 - beta2**step) ** 0.5
        hp[s, HP_EPS] = 1e-8 * (1 + u[5])
    return tuple(x.to(device) for x in (p, g, m, v, block_seg, hp))
