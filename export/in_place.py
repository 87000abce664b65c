"""Decoding an in-place KV export (``export_onnx(..., in_place_kv=True)``) with ONNX Runtime.

The graph's attention is ONNX Runtime's GroupQueryAttention: given the past buffers
[B,H,C,D] and the same buffers bound as its present outputs, it writes each step's keys
and values into them at each row's own length, so no step copies the cache (the plain
export's attention returns a new, longer cache every step). Rows are ragged on the right:
row b's tokens sit at positions 0..len_b-1. The decoding loop pads prompts on the left, so
the prefill is shifted to the right layout and its outputs back.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..inference.types import StepOutput

# Positions per row past the prompt allocated at a prefill the caller did not size
# (OnnxBackend.reserve); doubled when a step needs more.
MIN_CAPACITY = 64


class InPlaceCache:
    """The KV buffers between steps (numpy arrays and the OrtValues over the same memory)
    and each row's length."""

    def __init__(self, arrays: list[np.ndarray], lengths: np.ndarray) -> None:
        import onnxruntime as ort

        self.arrays, self.lengths = arrays, lengths
        self.values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
        self.decode: _DecodeBinding | None = None  # made at this cache's first decode step

    @property
    def capacity(self) -> int:
        return self.arrays[0].shape[2]

    @classmethod
    def empty(cls, tensors: int, batch: int, heads: int, head_dim: int,
              capacity: int) -> InPlaceCache:
        return cls([np.zeros((batch, heads, capacity, head_dim), np.float32)
                    for _ in range(tensors)], np.zeros(batch, np.int64))

    def with_capacity(self, need: int, limit: int) -> InPlaceCache:
        """This cache, or a copy in buffers large enough for ``need`` positions."""
        if need <= self.capacity:
            return self
        capacity = min(max(need, 2 * self.capacity), max(limit, need))
        grown = []
        for a in self.arrays:
            b = np.zeros((*a.shape[:2], capacity, a.shape[3]), np.float32)
            b[:, :, :a.shape[2]] = a
            grown.append(b)
        return InPlaceCache(grown, self.lengths)

    def bound(self, backend: Any) -> Any:
        """A new IO binding of ``backend``'s session with these buffers as both its past
        inputs and its present outputs (ONNX Runtime then writes them in place)."""
        binding = backend.session.io_binding()
        for name, value in zip(backend._past_names, self.values, strict=True):
            binding.bind_ortvalue_input(name, value)
        for name, value in zip(backend._present_names, self.values, strict=True):
            binding.bind_ortvalue_output(name, value)
        return binding

    def rows(self, index: np.ndarray) -> InPlaceCache:
        return InPlaceCache([np.ascontiguousarray(a[index]) for a in self.arrays],
                            self.lengths[index])


def _shift(t: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Row b of t [B,S,...] moved by shift[b] positions to the right (negative: left);
    positions moved in from outside repeat the edge (they are padding)."""
    s = t.shape[1]
    index = (torch.arange(s) - shift[:, None]).clamp(0, s - 1)
    return t.gather(1, index.view(*index.shape, *([1] * (t.dim() - 2))).expand(t.shape))


class _DecodeBinding:
    """The IO binding of one cache's decode steps (one token per row), bound once: the
    buffers as past and present, the token ids, and the outputs into arrays of their own.

    The key mask is bound once too, as wide as the buffers: the operator reads each row's
    length from it (its count of ones) and attends that many positions, so the zeros past
    them cost nothing, and every step runs on the same shapes. Rebinding everything and
    wrapping every output each step cost the host more than a tenth of a step ('small',
    int4, batch 1). A grown or reordered cache is a new object, with its own.
    """

    def __init__(self, backend: Any, cache: InPlaceCache) -> None:
        import onnxruntime as ort

        b = len(cache.lengths)
        self.binding = cache.bound(backend)
        self.ids = np.zeros((b, 1), np.int64)
        inputs = {"input_ids": self.ids}
        if backend.has_position_ids:  # unused by the operator, which counts positions itself
            inputs["position_ids"] = np.zeros((b, 1), np.int64)
        self._inputs = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in inputs.items()}
        for name, value in self._inputs.items():
            self.binding.bind_ortvalue_input(name, value)
        self.outputs = [np.empty((b, 1, backend.vocab_size) if name == "logits" else (b, 1),
                                 np.float32) for name in backend._head_names]
        for name, out in zip(backend._head_names, self.outputs, strict=True):
            self.binding.bind_output(name, "cpu", 0, np.float32, list(out.shape),
                                     out.ctypes.data)
        # Every row's key mask over the whole buffer, bound over the same memory: a step
        # sets each row's new position in place.
        self.mask = (np.arange(cache.capacity)[None, :] < cache.lengths[:, None]).astype(
            np.int64)
        self._mask_value = ort.OrtValue.ortvalue_from_numpy(self.mask)
        self.binding.bind_ortvalue_input("attention_mask", self._mask_value)
        self.rows = np.arange(b)


def in_place_step(backend: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  past: InPlaceCache | None) -> StepOutput:
    """One step of ``backend`` (an OnnxBackend over an in-place export); ``past`` None is
    the prefill, whose prompts are left-padded as ``attention_mask`` says."""
    b, s = input_ids.shape
    if past is not None and s == 1:
        past = past.with_capacity(int(past.lengths.max()) + 1, backend.config.max_seq_len)
        return _decode_step(backend, input_ids, past)
    cfg = backend.config
    shift = None
    if past is None:
        lens = attention_mask.sum(-1).cpu()
        shift = s - lens  # left padding of each row
        if bool(shift.any()):
            input_ids = _shift(input_ids.cpu(), -shift)
        else:
            shift = None
        # What the caller said the rows will reach (OnnxBackend.reserve), else room to grow.
        need = max(s + MIN_CAPACITY, backend.reserved)
        backend.reserved = 0  # for this prefill only
        past = InPlaceCache.empty(len(backend._past_names), b, cfg.num_heads, cfg.head_dim,
                                  min(need, max(cfg.max_seq_len, s)))
        new_lens = lens.numpy().astype(np.int64)
    elif b > 1:
        raise ValueError(
            f"an in-place KV export takes several new tokens ({s}) on a cache one row at a "
            "time (ONNX Runtime's GroupQueryAttention): feed one token per step, one row at "
            "a time, or use the plain export")
    else:
        new_lens = past.lengths + s
    width = int(new_lens.max())
    past = past.with_capacity(width, cfg.max_seq_len)
    mask = (np.arange(width)[None, :] < new_lens[:, None]).astype(np.int64)
    binding = past.bound(backend)
    binding.bind_cpu_input("input_ids", int64_array(input_ids))
    binding.bind_cpu_input("attention_mask", mask)
    if backend.has_position_ids:
        binding.bind_cpu_input("position_ids", np.zeros((b, s), np.int64))
    for name in backend._head_names:
        binding.bind_output(name, "cpu")
    backend.session.run_with_iobinding(binding)
    # Bound after the cache's outputs: the last ones.
    heads = [torch.from_numpy(o.numpy())
             for o in binding.get_outputs()[-len(backend._head_names):]]
    if shift is not None:  # back to the loop's left padding
        heads = [_shift(t, shift) for t in heads]
    past.lengths = new_lens
    past.decode = None  # its key mask no longer says each row's length: rebuilt if needed
    return StepOutput.from_heads(heads, past)


def _decode_step(backend: Any, input_ids: torch.Tensor, past: InPlaceCache) -> StepOutput:
    """A step of one token per row, through the cache's own :class:`_DecodeBinding`."""
    d = past.decode
    if d is None:
        d = past.decode = _DecodeBinding(backend, past)
    d.ids[:] = int64_array(input_ids)
    new_lens = past.lengths + 1
    d.mask[d.rows, new_lens - 1] = 1  # the bound mask, written in place
    backend.session.run_with_iobinding(d.binding)
    past.lengths = new_lens
    # Copies: the arrays are written again by the next step, and a caller may keep these.
    return StepOutput.from_heads([o.copy() for o in d.outputs], past)


def int64_array(t: torch.Tensor) -> np.ndarray:
    """An ONNX int64 input from a tensor: zero-copy for the usual CPU int64 tensors, a cast
    only when the caller used int32/bool."""
    if t.dtype != torch.int64:
        t = t.to(torch.int64)
    return t.detach().cpu().contiguous().numpy()
