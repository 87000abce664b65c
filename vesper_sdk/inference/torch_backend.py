"""``TorchBackend``: the decoding loop's backend over a PyTorch VesperLM."""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..model import FlyLoRALinear, StaticCache, VesperLM
from .decode_swaps import (
    MatVecLinear,
    Parts,
    apply_cpu_decode,
    apply_pair_ffn,
    decode_products,
    remove_decode_swaps,
)
from .types import StepOutput

log = logging.getLogger(__name__)


class _StaticBuffers:
    """Preallocated K/V buffers [B,H,C,D] per layer and a key mask [B,C] for one batch size.

    ``zeroed``: a step over the whole capacity (a CUDA graph) reads every slot, so they
    start at zero (masked out, but finite); one over the filled slots only never reads
    the rest, which then takes no memory until written.
    """

    def __init__(self, model: VesperLM, batch: int, capacity: int, zeroed: bool = True,
                 ) -> None:
        cfg = model.config
        shape = (batch, cfg.num_heads, capacity, cfg.head_dim)
        dev, dt = model.device, model.dtype
        new = torch.zeros if zeroed else torch.empty
        self.keys = [new(shape, device=dev, dtype=dt) for _ in range(cfg.num_layers)]
        self.values = [new(shape, device=dev, dtype=dt) for _ in range(cfg.num_layers)]
        self.key_mask = torch.zeros((batch, capacity), dtype=torch.bool, device=dev)
        # The decode step recorded as a CUDA graph over these buffers (their addresses are
        # baked into it), on the first step that uses them: see TorchBackend._replay.
        self.graph: _DecodeGraph | None = None


class _DecodeGraph:
    """A decode step recorded as a CUDA graph: its static inputs and outputs."""

    def __init__(self, bufs: _StaticBuffers) -> None:
        rows, dev = bufs.key_mask.shape[0], bufs.key_mask.device
        self.ids = torch.zeros((rows, 1), dtype=torch.long, device=dev)
        self.pos = torch.zeros((rows, 1), dtype=torch.long, device=dev)
        self.write = torch.zeros((1,), dtype=torch.long, device=dev)
        self.args = (self.ids, self.pos, self.write, bufs.key_mask, bufs.keys, bufs.values)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: tuple[torch.Tensor, ...] = ()
        self.epoch = -1  # TorchBackend._epoch when recorded: its products' copies then


class _StaticCache:
    """The cache object a static-cache generation passes around: buffers + filled length.

    ``rows`` real rows sit at the top of ``buffers``. Under CUDA graphs (a graph per
    buffer set) their batch is a power of two, so that graphs are recorded once per
    bucket, not once per batch size, and they go back to the backend's ``pool`` when
    the generation lets go of this object; otherwise they are freed with it.
    """

    def __init__(self, buffers: _StaticBuffers, rows: int, length: int,
                 pool: list[_StaticBuffers] | None = None, padded: bool = True) -> None:
        self.buffers, self.rows, self.length = buffers, rows, length
        # Whether any row has padding in its cache (else no row needs a key mask).
        self.padded = padded
        if pool is not None:
            weakref.finalize(self, pool.append, buffers)


def _bucket(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _static_step(model: VesperLM, input_ids: torch.Tensor, position_ids: torch.Tensor,
                 write_index: torch.Tensor, key_mask: torch.Tensor, keys: list[torch.Tensor],
                 values: list[torch.Tensor], length: int | None = None, padded: bool = True,
                 ) -> tuple[torch.Tensor, ...]:
    """One decode step of ``VesperLM.forward`` over a :class:`StaticCache` of these buffers.

    Tensors in, tensors out, so that ``torch.compile`` and CUDA graphs can take the step
    whole; ``length`` and ``padded`` as in :class:`StaticCache`. Out: logits, confidence,
    stop, answer and, from a model with logit features, the logits' log-sum-exp.
    """
    cache = StaticCache(keys, values, key_mask, write_index, length, padded)
    out = model(input_ids, position_ids=position_ids, past_key_values=cache, use_cache=True)
    heads = (out.logits.float(), out.confidence, out.stop, out.answer)
    return heads if out.logsumexp is None else (*heads, out.logsumexp)


def _compile_options(device: torch.device) -> dict[str, Any]:
    """torch.compile options for the decode step.

    On the CPU, where the step is called once per token (no CUDA graph replays it),
    checking the model's modules before each call took ~450 us of a ~6 ms step ('small'):
    the guards on nn.Modules are skipped. The model object and its structure are fixed
    for a backend's life; its weights are read at each call, and the one copy of them
    (the threaded products) is checked by TorchBackend._call_step.
    """
    skip = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)
    return {"guard_filter_fn": skip} if device.type == "cpu" and skip is not None else {}


def _plain_layers(model: VesperLM) -> bool:
    """Dense model of plain torch layers (no MoE routing, no bitsandbytes): compilable."""
    if model.config.num_experts:
        return False
    return all(type(m) in (nn.Linear, MatVecLinear, FlyLoRALinear) for m in model.modules()
               if isinstance(m, nn.Linear | FlyLoRALinear))


class TorchBackend:
    """DecodeBackend over a VesperLM (fp32, bf16 or bitsandbytes-quantized layers).

    CPU: the decode swaps (:func:`apply_cpu_decode`) give every dense weight a threaded
    matrix-vector product for the decode steps (``matvec_parts`` column blocks; ``"auto"``,
    the default, measures per weight shape which count is fastest on this machine, once per
    process (:func:`~vesper_sdk.inference.decode_swaps.measured_parts`); 0 leaves the
    model untouched; the gate and up FlyLoRA layers of a feed-forward share one).
    That copy doubles the memory the weights take. Dense models of plain layers decode over a
    static KV cache (below), eagerly, attending only the filled slots: no cache is
    concatenated per token, and a batch without padding takes no mask.

    CUDA (dense models of plain layers): decode steps run over a preallocated static KV
    cache (``max_seq_len`` long, batch rounded up to a power of two). With
    ``cuda_graph`` (the default there) each step is recorded once as a CUDA graph per
    cache buffer set and then replayed: one launch per token instead of one per
    operation, which is what a small model's decode is bound by. With ``compile`` (off
    by default: the first generation of each batch size then waits tens of seconds for
    the compiler; ``vesper serve`` turns it on) the recorded step is first compiled by
    ``torch.compile``: fewer, fused kernels. Whatever fails (compiling, then recording)
    is logged as a warning and decoding carries on without it. The prefill always runs the
    model's own forward.
    The static cache keeps the padding the prefill's mask gave and attends every decoded
    token (the decoding loop's mask only grows by ones). ``static_cache=False`` decodes
    with ``VesperLM.forward`` and its growing cache instead (bitsandbytes and MoE models
    always do; the tests compare the two).

    CPU with ``compile``: the same static-cache step, compiled (the threaded products
    stay whole operators), attending the filled slots only, after tens of seconds of
    compiling.

    ``pair_ffn`` (default: on for CUDA; on a CPU the threaded products pair them
    already, unless ``matvec_parts=0``): each feed-forward's gate and up FlyLoRA layers
    decode as one stacked pair (:func:`apply_pair_ffn`), fewer kernels per step for
    a stacked copy of their weights (the gate and up weights' memory again). Copies are
    checked against their weights at each generation; a changed weight is copied again and
    the CUDA graphs recorded over the old copy are recorded anew.
    """

    def __init__(self, model: VesperLM, *, matvec_parts: Parts = "auto",
                 static_cache: bool | None = None, compile: bool = False,
                 cuda_graph: bool | None = None, pair_ffn: bool | None = None) -> None:
        self.model = model.eval()
        self.config = model.config
        self.vocab_size = model.config.vocab_size
        self.max_seq_len = model.config.max_seq_len
        cuda = self.device.type == "cuda"
        self.matvec_parts = matvec_parts
        if pair_ffn is None:  # measured faster on CUDA only
            pair_ffn = cuda
        # The CPU's threaded products pair them already (matvec_parts not 0).
        self.pair_ffn = pair_ffn and not (self.device.type == "cpu" and matvec_parts != 0)
        self._epoch = 0  # bumped whenever the products are copied again
        self._attach()
        if static_cache is None:
            static_cache = self.device.type in ("cuda", "cpu") and _plain_layers(model)
        self.static_cache = bool(static_cache)
        self.compile = bool(compile) and self.static_cache  # only the static step compiles
        self.cuda_graph = (self.static_cache and cuda) if cuda_graph is None else bool(
            cuda_graph)
        if self.cuda_graph and not (cuda and self.static_cache):
            raise ValueError("cuda_graph=True needs a model on a CUDA device and "
                             "static_cache=True")
        self._step: Callable[..., Any] | None = None
        self._step_lengths = False  # whether _step was made for calls with a length
        self._pools: dict[int, list[_StaticBuffers]] = {}

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _attach(self) -> None:
        """(Re)make the decode products: the CPU's threaded ones, or the GPU's pairs."""
        remove_decode_swaps(self.model)
        if self.device.type == "cpu":
            apply_cpu_decode(self.model, self.matvec_parts)
        if self.pair_ffn:
            apply_pair_ffn(self.model)
        self._products = decode_products(self.model)
        self._epoch += 1

    def _refresh_if_stale(self) -> None:
        """Copy the products again if a weight changed in place since they were made (a
        stale product leaves its layer to F.linear; a compiled step or a CUDA graph
        would read the old copy): a new step is then compiled, new graphs recorded."""
        if self._products and any(p.is_stale() for p in self._products):
            self._attach()
            self._step = None

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor, past_key_values: Any) -> StepOutput:
        """One step; see :class:`DecodeBackend`."""
        if isinstance(past_key_values, _StaticCache):
            return self._static_forward(input_ids, position_ids, past_key_values)
        if past_key_values is None:  # a new generation: are the products' copies current?
            self._refresh_if_stale()
        out = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, use_cache=True)
        past = out.past_key_values
        if self.static_cache and past_key_values is None:
            past = self._to_static(past, attention_mask)
        logits = out.logits if out.logits.dtype == torch.float32 else out.logits.float()
        return StepOutput(logits, out.confidence, out.stop, past, out.answer, out.logsumexp)

    def reorder_cache(self, past: Any, index: torch.Tensor) -> Any:
        """Keep only the batch rows in ``index`` (None under CUDA graphs: fixed shapes, so
        finished rows stay, fed padding). Rare (when rows finish); each step after it
        then carries only the live rows, which on a CPU at large batch is compute."""
        index = index.to(self.device)
        if isinstance(past, _StaticCache):
            if self.cuda_graph:
                return None
            t, bufs = past.length, past.buffers
            kept = [(k[:, :, :t].index_select(0, index), v[:, :, :t].index_select(0, index))
                    for k, v in zip(bufs.keys, bufs.values, strict=True)]
            return self._fill_static(kept, bufs.key_mask[:, :t].index_select(0, index))
        return past.index_select(index)

    # --- static cache (CUDA graphs) -------------------------------------------------
    def _to_static(self, past: Any, attention_mask: torch.Tensor) -> _StaticCache:
        return self._fill_static(past, attention_mask.bool())

    def _fill_static(self, past: Any, key_mask: torch.Tensor) -> _StaticCache:
        """A static cache holding ``past`` (per layer (k, v) [B,H,T,D]), key mask [B,T]."""
        b, _, t, _ = past[0][0].shape
        if self.cuda_graph:
            # Graphs are recorded per buffer set: batch sizes share them in powers of two,
            # and the sets are kept for reuse. A set still held by an unfinished generation
            # is not in the pool, so two interleaved streams never share one.
            pool: list[_StaticBuffers] | None = self._pools.setdefault(_bucket(b), [])
            bufs = pool.pop() if pool else _StaticBuffers(self.model, _bucket(b),
                                                          self.max_seq_len)
        else:
            # Fresh buffers, untouched beyond what this generation writes, freed with it:
            # kept per batch size, a server's cache would grow to every size it has seen.
            pool, bufs = None, _StaticBuffers(self.model, b, self.max_seq_len, zeroed=False)
        for (k, v), kb, vb in zip(past, bufs.keys, bufs.values, strict=True):
            kb[:b, :, :t].copy_(k)
            vb[:b, :, :t].copy_(v)
        bufs.key_mask.zero_()
        bufs.key_mask[:b, :t] = key_mask
        return _StaticCache(bufs, b, t, pool, padded=not bool(key_mask.all()))

    def _static_forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                        cache: _StaticCache) -> StepOutput:
        b, s = input_ids.shape
        t = cache.length
        if s != 1 or t + 1 > self.max_seq_len or b != cache.rows:
            raise ValueError("the static cache decodes one token per row at a time within "
                             f"max_seq_len={self.max_seq_len}")
        bufs = cache.buffers
        bucket = bufs.key_mask.shape[0]
        if bucket > b:
            fill = input_ids.new_zeros(bucket - b, 1)
            input_ids = torch.cat([input_ids, fill])
            position_ids = torch.cat([position_ids, fill])
        logits, conf, stop, answer, *lse = self._run_static(bufs, input_ids, position_ids, t,
                                                            cache.padded)
        cache.length = t + 1
        return StepOutput(logits[:b], conf[:b], stop[:b], cache, answer[:b],
                          lse[0][:b] if lse else None)

    def _run_static(self, bufs: _StaticBuffers, input_ids: torch.Tensor,
                    position_ids: torch.Tensor, t: int, padded: bool,
                    ) -> tuple[torch.Tensor, ...]:
        if self.cuda_graph:
            try:
                return self._replay(bufs, input_ids, position_ids, t)
            except Exception as exc:  # recording failed: stay correct, go without graphs
                log.warning("recording the decode step as a CUDA graph failed (%s: %s); "
                            "decoding without graphs", type(exc).__name__, exc)
                self.cuda_graph, bufs.graph = False, None
        args = (input_ids, position_ids, torch.tensor([t], device=self.device),
                bufs.key_mask, bufs.keys, bufs.values)
        # Attending only the filled slots is cheaper than the whole capacity; a CUDA
        # graph needs the fixed shapes of the whole capacity, nothing else does.
        if self.compile:
            return self._call_step(args, length=t + 1, padded=padded)
        return _static_step(self.model, *args, length=t + 1, padded=padded)

    def _call_step(self, args: tuple, length: int | None = None, padded: bool = True,
                   ) -> tuple[torch.Tensor, ...]:
        """The step, compiled when ``compile`` holds; ``length`` and ``padded`` as in
        :class:`StaticCache`.

        The compiler sees lengths change and makes them symbolic after one recompile (its
        automatic dynamic shapes), so a generation compiles about twice, not per token.
        """
        # Weights changed in place since the products copied them (the compiled step
        # cannot see that): copy them again and recompile.
        self._refresh_if_stale()
        if self._step is None or self._step_lengths != (length is not None):
            # Fixed shapes for a CUDA graph (the whole capacity, length None).
            eager = functools.partial(_static_step, self.model)
            self._step = torch.compile(eager, dynamic=None if length else False,
                                       options=_compile_options(self.device)) \
                if self.compile else eager
            self._step_lengths = length is not None
        try:
            return self._step(*args, length=length, padded=padded)
        except Exception as exc:  # compiler failure: stay correct, go eager
            if not self.compile:
                raise
            log.warning("torch.compile of the decode step failed (%s: %s); decoding "
                        "eagerly", type(exc).__name__, exc)
            self.compile, self._step = False, None
            return self._call_step(args, length, padded)

    def _replay(self, bufs: _StaticBuffers, input_ids: torch.Tensor,
                position_ids: torch.Tensor, t: int,
                ) -> tuple[torch.Tensor, ...]:
        g = bufs.graph
        if g is None:
            g = bufs.graph = _DecodeGraph(bufs)
        g.ids.copy_(input_ids)
        g.pos.copy_(position_ids)
        g.write.fill_(t)
        if g.graph is None or g.epoch != self._epoch:
            self._record(g)
        assert g.graph is not None
        g.graph.replay()
        # The next replay overwrites the graph's outputs: hand out copies.
        return tuple(o.clone() for o in g.outputs)  # type: ignore[return-value]

    def _record(self, g: _DecodeGraph) -> None:
        # Warm up on a side stream first (as torch.cuda.graph asks; it also compiles). The
        # warm-up runs the very step about to be replayed, so its writes to the cache
        # are the step's own.
        main = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            for _ in range(2):
                self._call_step(g.args)
        main.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self._call_step(g.args)
        g.graph, g.outputs, g.epoch = graph, tuple(outputs), self._epoch
