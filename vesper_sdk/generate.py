"""Generation: ``vesper_sdk.load`` and the ``LLM`` object (generate / stream / chat).

One decoding loop serves every backend. It only calls ``DecodeBackend.forward``: the
prompt is run once (prefill, left-padded batch), then one token per step reusing the
backend's KV cache. Every token comes out as a :class:`Token` with its log-probability,
the MetaHead's confidence and stop probability, and what the metacognitive regulator
(``vesper_sdk.metacog``) did at that position.

>>> lm = vesper_sdk.load("runs/a/model")
>>> lm.generate("2+3=", max_new_tokens=8, temperature=0.0)
>>> for tok in lm.stream("Hello", max_new_tokens=32):
...     print(tok.text, tok.confidence, tok.regulated)
>>> lm.chat([{"role": "user", "content": "What is 7*6?"}], regulator=True)

Concurrent requests (the HTTP server) go through :meth:`LLM.stream_batch`, which decodes
a list of :class:`GenerationRequest` together, each with its own sampling parameters,
seed, stop strings and cancel flag.
"""

from __future__ import annotations

import codecs
import functools
import json
import logging
import sys
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F

from . import matvec
from .device import resolve_device
from .metacog import MetacognitiveRegulator, as_regulator, join_flags
from .model import CONFIG_NAME, FlyLoRALinear, Linear, ModelFolderError, VesperLM
from .tokenizer import VesperTokenizer

log = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 128
DEFAULT_TEMPERATURE = 0.8


# ----------------------------------------------------------------------------- data types
@dataclass
class TokenScore:
    """One token of a text scored by the model (teacher forcing)."""

    text: str
    id: int
    logprob: float
    confidence: float


@dataclass
class Token:
    """One generated token.

    Attributes:
        text: the text this token releases. Bytes of a character split across tokens are
            held until the character is complete (so ``text`` may be ``""`` and a later
            token carries them), as is any tail that might begin a stop string; joining
            the ``text`` of a row's tokens gives exactly the generated text.
        id: the token id.
        logprob: log-probability of this token under the model's own distribution
            (temperature 1, before top-k/top-p and repetition penalty).
        confidence: the MetaHead's confidence at the position that chose this token (the
            probability that the model's top-1 choice there is right).
        stop_prob: the stop head's probability, at that position, that the answer ends.
        regulated: ``None``, or what the metacognitive regulator did: ``"conservative"``,
            ``"stopped"``, ``"retry k"``, ``"kept first of n"`` (joined by ", ").
        finish_reason: set on a row's last token only: ``"eos"`` (the model or the
            regulator ended the answer; this token is then the end-of-sequence token, with
            ``special`` True and no text), ``"stop"`` (a stop string matched; ``text``
            stops before it) or ``"length"`` (``max_new_tokens`` reached).
        special: True for a special token (EOS, a role marker); it has no text.
        top_logprobs: ``[(id, logprob), ...]`` most likely first, when asked for.
    """

    text: str
    id: int
    logprob: float
    confidence: float
    stop_prob: float
    regulated: str | None = None
    finish_reason: str | None = None
    special: bool = False
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class GenerationRequest:
    """One prompt and its own decoding parameters, for :meth:`LLM.stream_batch`.

    ``prompt`` is token ids (use ``tokenizer.encode(text, add_bos=True)`` or
    ``tokenizer.chat_prompt_ids(messages)``) or a string (encoded with BOS). To stop a
    request early from another thread, call :meth:`cancel` (or set ``cancelled``: a bool,
    a ``threading.Event`` or a zero-argument callable returning True): the loop drops the
    row before its next token and yields nothing more for it.
    """

    prompt: Sequence[int] | str
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = DEFAULT_TEMPERATURE
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: Sequence[str] | str | None = None
    seed: int | None = None
    regulator: MetacognitiveRegulator | bool | None = None
    top_logprobs: int = 0
    ignore_eos: bool = False  # decode max_new_tokens whatever the model says (benchmarks)
    cancelled: bool | threading.Event | Callable[[], bool] = False

    def cancel(self) -> None:
        """Ask the decoding loop to drop this request (thread-safe)."""
        if isinstance(self.cancelled, threading.Event):
            self.cancelled.set()
        else:
            self.cancelled = True

    @property
    def is_cancelled(self) -> bool:
        flag = self.cancelled
        if isinstance(flag, threading.Event):
            return flag.is_set()
        if callable(flag):
            return bool(flag())
        return bool(flag)

    def validate(self) -> None:
        """Raise ValueError naming the parameter that cannot work."""
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.top_logprobs < 0:
            raise ValueError(f"top_logprobs must be >= 0, got {self.top_logprobs}")


@dataclass
class StepOutput:
    """One forward step of a decoding backend."""

    logits: torch.Tensor  # [B,S,V] float32
    confidence: torch.Tensor  # [B,S] MetaHead probability that the top-1 is right
    stop: torch.Tensor  # [B,S] probability that the response ends here
    past_key_values: Any  # the backend's own cache object, passed back unchanged

    def select_rows(self, index: torch.Tensor, past: Any) -> StepOutput:
        """The rows in ``index`` of this step, with ``past`` (the cache kept to them)."""
        return StepOutput(self.logits.index_select(0, index),
                          self.confidence.index_select(0, index),
                          self.stop.index_select(0, index), past)


class DecodeBackend(Protocol):
    """What the decoding loop needs from a model: PyTorch, quantized or ONNX Runtime.

    Optional extra: ``reorder_cache(past, index) -> past | None`` keeping only the batch
    rows in ``index`` (a LongTensor); with it, rows that finish early stop costing compute.
    """

    vocab_size: int
    max_seq_len: int
    device: torch.device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor, past_key_values: Any) -> StepOutput:
        """input_ids/position_ids [B,S], attention_mask [B,past+S]; past None at prefill."""
        ...


# ----------------------------------------------------------------------------- torch backend
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


def _one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         mask: torch.Tensor) -> torch.Tensor:
    """Attention of one new query over the whole static cache, as two small products.

    ``F.scaled_dot_product_attention`` with a mask picks a tiled kernel made for long
    queries: on an H200 it took 118 us per layer for this one-row case, 59 % of the
    step's GPU time. The plain math reads the cache once (scores in fp32).
    """
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.matmul(probs.to(v.dtype), v)


def _static_decode_step(model: VesperLM, input_ids: torch.Tensor, position_ids: torch.Tensor,
                        write_index: torch.Tensor, key_mask: torch.Tensor,
                        keys: list[torch.Tensor], values: list[torch.Tensor],
                        length: int | None = None, padded: bool = True,
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decode step over a static cache, built from the model's own modules.

    Equal to ``VesperLM.forward`` for one new token (tests check this on CPU); the only
    difference is where K/V go: written in place at ``write_index`` (and that slot of
    ``key_mask`` switched on) instead of concatenated, so every shape is fixed and the
    step can run as a CUDA graph. ``length`` (steps not recorded as a graph) attends
    over the first ``length`` slots instead of all, through SDPA, with ``key_mask`` only
    where some row is ``padded``.
    """
    x = model.embed(input_ids)
    b, s, _ = x.shape
    # Every row sees the new token, padding rows of the bucket too (no empty softmax).
    key_mask.index_fill_(1, write_index, True)
    attn_mask = key_mask[:, None, None, :length] if padded or length is None else None
    rope = model.rope.table(position_ids, x.dtype)
    for i, block in enumerate(model.blocks):
        attn = block.attn
        q, k, v = attn.project_qkv(block.attn_norm(x), rope)
        keys[i].index_copy_(2, write_index, k)
        values[i].index_copy_(2, write_index, v)
        if length is None:
            y = _one_query_attention(q, keys[i], values[i], attn_mask)
        else:
            y = F.scaled_dot_product_attention(q, keys[i].narrow(2, 0, length),
                                               values[i].narrow(2, 0, length), attn_mask)
        x = x + attn.o_proj(y.transpose(1, 2).reshape(b, s, -1))
        h = block.ffn(block.ffn_norm(x))
        x = x + (h[0] if isinstance(h, tuple) else h)
    logits, meta = model.heads(model.norm(x))
    return logits.float(), model.metahead.confidence(meta), torch.sigmoid(meta[..., 1])


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
    return all(type(m) in (Linear, FlyLoRALinear) for m in model.modules()
               if isinstance(m, torch.nn.Linear | FlyLoRALinear))


class TorchBackend:
    """DecodeBackend over a VesperLM (fp32, bf16 or bitsandbytes-quantized layers).

    CPU: every dense weight gets a threaded matrix-vector product for the decode steps
    (:mod:`vesper_sdk.matvec`, ``matvec_parts`` column blocks; 0 leaves the model
    untouched; the gate and up FlyLoRA layers of a feed-forward share one). That copy
    doubles the memory the weights take. Dense models of plain layers decode over a
    static KV cache (below), eagerly, attending only the filled slots: no cache is
    concatenated per token, and a batch without padding takes no mask.

    CUDA (dense models of plain layers): decode steps run over a preallocated static KV
    cache (``max_seq_len`` long, batch rounded up to a power of two). With
    ``cuda_graph`` (the default there) each step is recorded once as a CUDA graph per
    cache buffer set and then replayed: one launch per token instead of one per
    operation, which is what a small model's decode is bound by. With ``compile`` (off
    by default: the first generation of each batch size then waits tens of seconds for
    the compiler; ``vesper serve`` turns it on) the recorded step is first compiled by
    ``torch.compile``: fewer, fused kernels, about 1.4x the tokens/s at batch 1 on an
    H200. Whatever fails (compiling, then recording) is logged as a warning and
    decoding carries on without it. The prefill always runs the model's own forward.
    The static cache keeps the padding the prefill's mask gave and attends every decoded
    token (the decoding loop's mask only grows by ones). ``static_cache=False`` decodes
    with ``VesperLM.forward`` and its growing cache instead (bitsandbytes and MoE models
    always do; the tests compare the two).

    CPU with ``compile``: the same static-cache step, compiled (the threaded products
    stay whole operators), attending the filled slots only; about 1.2x the eager
    tokens/s on the 'small' shape here, after ~20 s of compiling.

    ``pair_ffn`` (default: on for CUDA; on a CPU the threaded products pair them
    already, unless ``matvec_parts=0``): each feed-forward's gate and up FlyLoRA layers
    decode as one stacked pair (:func:`matvec.attach_pairs`), fewer kernels per step for
    a stacked copy of their weights (the gate and up weights' memory again). On an H100,
    batch 1, the compiled graph step went from 1,340 to 1,660 tokens/s with it, same
    tokens (``benchmarks/gpu_checks.py --checks decode``). Copies are checked against
    their weights at each generation; a changed weight is copied again and the CUDA
    graphs recorded over the old copy are recorded anew.
    """

    def __init__(self, model: VesperLM, *, matvec_parts: int = matvec.DEFAULT_PARTS,
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
        # The CPU's threaded products pair them already (matvec_parts > 0).
        self.pair_ffn = pair_ffn and not (self.device.type == "cpu" and matvec_parts > 0)
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
        if self.device.type == "cpu":
            matvec.attach(self.model, self.matvec_parts)
        if self.pair_ffn:
            matvec.attach_pairs(self.model)
        self._products = matvec.products(self.model)
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
        return StepOutput(logits, out.confidence, out.stop, past)

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
        return tuple((k.index_select(0, index), v.index_select(0, index)) for k, v in past)

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
        logits, conf, stop = self._run_static(bufs, input_ids, position_ids, t, cache.padded)
        cache.length = t + 1
        return StepOutput(logits[:b], conf[:b], stop[:b], cache)

    def _run_static(self, bufs: _StaticBuffers, input_ids: torch.Tensor,
                    position_ids: torch.Tensor, t: int, padded: bool,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
        return _static_decode_step(self.model, *args, length=t + 1, padded=padded)

    def _call_step(self, args: tuple, length: int | None = None, padded: bool = True,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The step, compiled when ``compile`` holds; ``length`` and ``padded`` as in
        _static_decode_step.

        The compiler sees lengths change and makes them symbolic after one recompile (its
        automatic dynamic shapes), so a generation compiles about twice, not per token.
        """
        # Weights changed in place since the products copied them (the compiled step
        # cannot see that): copy them again and recompile.
        self._refresh_if_stale()
        if self._step is None or self._step_lengths != (length is not None):
            # Fixed shapes for a CUDA graph (the whole capacity, length None).
            eager = functools.partial(_static_decode_step, self.model)
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
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


# ----------------------------------------------------------------------------- decoding
class _StopScanner:
    """Cuts text at the first stop string, holding back a tail that may begin one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """Add ``piece``; return (text safe to release, whether a stop string matched)."""
        if not self.stops:
            return piece, False
        text = self.held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return text[:min(hits)], True
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), keep, -1):
                if text.endswith(s[:n]):
                    keep = n
                    break
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


class _Row:
    """Decoding state of one attempt of one request."""

    def __init__(self, index: int, request: GenerationRequest, prompt_ids: list[int],
                 temperature: float, seed: int | None,
                 regulator: MetacognitiveRegulator | None, buffered: bool) -> None:
        self.index = index
        self.request = request
        self.prompt_ids = prompt_ids
        self.temperature = temperature
        self.seed = seed
        self.regulator = regulator
        self.buffer: list[Token] | None = [] if buffered else None
        self.budget = request.max_new_tokens
        self.n = 0  # tokens generated
        self.conf_sum = 0.0
        self.ids: list[int] = []
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.scanner = _StopScanner([request.stop] if isinstance(request.stop, str)
                                    else list(request.stop or ()))
        self.finished = False
        self.cancelled = False
        self._generator: torch.Generator | None = None

    @property
    def generator(self) -> torch.Generator:
        # Created on first use, so greedy rows never touch the global RNG; without a seed
        # the global RNG picks one, which torch.manual_seed makes reproducible.
        if self._generator is None:
            seed = self.seed if self.seed is not None else int(
                torch.randint(0, 2**62, (1,)).item())
            self._generator = torch.Generator().manual_seed(seed)
        return self._generator

    @property
    def mean_confidence(self) -> float:
        return self.conf_sum / self.n if self.n else float("-inf")


def _sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
            generator: torch.Generator) -> int:
    """Draw one token id from a [V] logits row (CPU) with temperature, top-k and top-p."""
    x = logits.float() / temperature
    if 0 < top_k < x.numel():
        kth = torch.topk(x, top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = sorted_x.softmax(-1)
        # Drop a token when the tokens before it already hold top_p of the mass.
        drop = probs.cumsum(-1) - probs > top_p
        drop[0] = False
        x = x.scatter(0, order, sorted_x.masked_fill(drop, float("-inf")))
    probs = x.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())


class LLM:
    """A model and its tokenizer, ready to generate: ``vesper_sdk.load(dir)`` returns one.

    ``LLM(model_or_backend, tokenizer)`` wraps a ``VesperLM`` (through
    :class:`TorchBackend`) or any :class:`DecodeBackend` (ONNX Runtime, ...): the same
    decoding loop, sampling and regulator run over all of them.

    ``pipeline`` (default: on when the backend is on CUDA) launches each decode step
    before the previous step's tokens are turned into text, so that on an asynchronous
    device the host's share of a token (copying its values out, decoding, stop strings)
    overlaps the device's next step. The tokens are the same; when every row ends, the
    step launched ahead is thrown away. On an H100, batch 1, the compiled graph step
    went from 1,340 to 1,530 tokens/s with it, and to 1,840 with ``pair_ffn`` too
    (``benchmarks/gpu_checks.py --checks decode``). Off elsewhere: on the CPU nothing is
    asynchronous, so it would only add that wasted step.
    """

    def __init__(self, model: VesperLM | DecodeBackend, tokenizer: VesperTokenizer,
                 model_dir: str | Path | None = None, pipeline: bool | None = None) -> None:
        backend = TorchBackend(model) if isinstance(model, VesperLM) else model
        if tokenizer.vocab_size > backend.vocab_size:
            raise ModelFolderError(
                f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                f"{backend.vocab_size}: they do not belong together")
        self.backend = backend
        self.model: VesperLM | None = getattr(backend, "model", None)
        self.tokenizer = tokenizer
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self._special = frozenset(tokenizer.special_ids)
        self._bytes: dict[int, bytes] = {}
        self.pipeline = backend.device.type == "cuda" if pipeline is None else pipeline

    @property
    def device(self) -> torch.device:
        return self.backend.device

    @property
    def config(self) -> Any:
        return getattr(self.backend, "config", None) or getattr(self.model, "config", None)

    @property
    def max_seq_len(self) -> int:
        return self.backend.max_seq_len

    # --- scoring ---------------------------------------------------------------------
    def score(self, text: str) -> list[TokenScore]:
        """Each token of ``text`` with its log-probability and the MetaHead's confidence.

        The confidence shown for a token is what the model said at the position that
        predicted it: how sure it was that its own top-1 guess there was right.
        """
        ids = [self.tokenizer.bos_id, *self.tokenizer.encode(text)]
        x = torch.tensor([ids], device=self.device)
        with torch.inference_mode():
            out = self.backend.forward(x, torch.ones_like(x), torch.arange(len(ids))[None]
                                       .to(self.device), None)
            logp = out.logits[0, :-1].float().log_softmax(-1)
            target = x[0, 1:].to(logp.device)
            lp = logp.gather(-1, target[:, None])[:, 0].tolist()
            conf = out.confidence[0, :-1].float().tolist()
        return [TokenScore(self.tokenizer.decode([t], skip_special_tokens=False), t, lp[i],
                           conf[i]) for i, t in enumerate(target.tolist())]

    # --- the public generation API ---------------------------------------------------
    def request(self, prompt: str | Sequence[int] | None = None,
                messages: Sequence[dict] | None = None, **params: Any) -> GenerationRequest:
        """A :class:`GenerationRequest` from a prompt (text or ids) or chat messages."""
        if (prompt is None) == (messages is None):
            raise ValueError("pass exactly one of prompt= and messages=")
        ids = self.tokenizer.chat_prompt_ids(messages) if messages is not None else prompt
        return GenerationRequest(prompt=ids, **params)

    def generate(self, prompt: str | Sequence[str], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 temperature: float = DEFAULT_TEMPERATURE, top_k: int = 0, top_p: float = 1.0,
                 repetition_penalty: float = 1.0, stop: Sequence[str] | str | None = None,
                 seed: int | None = None, regulator: MetacognitiveRegulator | bool | None = None,
                 ) -> str | list[str]:
        """Continue ``prompt`` (a string, or a list of strings decoded as one batch).

        ``temperature=0.0`` is greedy; ``top_k=0`` and ``top_p=1.0`` are off; a
        ``repetition_penalty`` > 1 discourages tokens already in the prompt or answer
        (CTRL-style). EOS or any ``stop`` string ends a row (the stop string is not
        returned). ``seed`` makes sampling reproducible (row i of a batch uses seed + i).
        ``regulator``: a :class:`~vesper_sdk.metacog.MetacognitiveRegulator`, ``True`` for
        its defaults, or None. Returns the generated text (a list for a list of prompts).
        """
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        tokens = self.generate_tokens(prompts, max_new_tokens=max_new_tokens,
                                      temperature=temperature, top_k=top_k, top_p=top_p,
                                      repetition_penalty=repetition_penalty, stop=stop,
                                      seed=seed, regulator=regulator)
        texts = ["".join(t.text for t in row) for row in tokens]
        return texts[0] if single else texts

    def generate_tokens(self, prompts: Sequence[str | Sequence[int]], **params: Any,
                        ) -> list[list[Token]]:
        """Like :meth:`generate` for a batch, returning every row's :class:`Token` list."""
        seed = params.pop("seed", None)
        requests = [GenerationRequest(prompt=p, seed=None if seed is None else seed + i,
                                      **params) for i, p in enumerate(prompts)]
        out: list[list[Token]] = [[] for _ in requests]
        for i, tok in self.stream_batch(requests):
            out[i].append(tok)
        return out

    def stream(self, prompt: str | Sequence[int], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
               temperature: float = DEFAULT_TEMPERATURE, top_k: int = 0, top_p: float = 1.0,
               repetition_penalty: float = 1.0, stop: Sequence[str] | str | None = None,
               seed: int | None = None, regulator: MetacognitiveRegulator | bool | None = None,
               ) -> Iterator[Token]:
        """Yield :class:`Token` objects as they are generated (see :meth:`generate`).

        Text never breaks a UTF-8 character: a token that ends mid-character releases
        ``""`` and the next one carries the whole character. With regulator retries on,
        the answer arrives once its attempts are done (an attempt cannot be taken back).
        """
        req = GenerationRequest(prompt=prompt, max_new_tokens=max_new_tokens,
                                temperature=temperature, top_k=top_k, top_p=top_p,
                                repetition_penalty=repetition_penalty, stop=stop, seed=seed,
                                regulator=regulator)
        for _, tok in self.stream_batch([req]):
            yield tok

    def chat(self, messages: Sequence[dict], **params: Any) -> str:
        """The assistant's reply to ``messages`` (role/content dicts), via the chat template.

        Takes the keyword arguments of :meth:`generate`.
        """
        return "".join(t.text for t in self.chat_stream(messages, **params))

    def chat_stream(self, messages: Sequence[dict], **params: Any) -> Iterator[Token]:
        """Stream the assistant's reply to ``messages`` (see :meth:`stream`)."""
        return self.stream(self.tokenizer.chat_prompt_ids(messages), **params)

    def stream_batch(self, requests: Sequence[GenerationRequest],
                     ) -> Iterator[tuple[int, Token]]:
        """Decode several requests as one batch; yield ``(request index, Token)``.

        Contract (what the HTTP server relies on):

        - Each request keeps its own prompt, ``max_new_tokens``, temperature, top-k/top-p,
          repetition penalty, stop strings, seed and regulator. A row's tokens depend only
          on its own request: the same request decoded alone gives the same tokens (up to
          float rounding between batch shapes), and its seed drives its own generator.
        - Tokens are yielded as soon as each step is done, in request order within a
          step; rows finish independently, and a finished row's last token has
          ``finish_reason`` set (``"eos"``, ``"stop"`` or ``"length"``).
        - A cancelled request (:meth:`GenerationRequest.cancel`, checked before each
          step) gets no further token and no end marker; the others go on.
        - A request whose regulator has retries yields its tokens only when its attempts
          are done (they are decoded in later rounds, batched together).
        - Prompts are left-padded to the longest one; a row's room is therefore
          ``min(max_new_tokens, max_seq_len - longest prompt)``.

        The generator holds no grad or inference mode across its ``yield``s, so the caller
        may do anything between tokens; closing it early frees the batch.
        """
        reqs = list(requests)
        for r in reqs:
            r.validate()
        plans: dict[int, list] = {}
        rows: list[_Row] = []
        for i, req in enumerate(reqs):
            reg = as_regulator(req.regulator)
            ids = self._prompt_ids(req.prompt)
            plan = reg.plan(req.temperature, req.seed) if reg else None
            buffered = bool(plan and len(plan) > 1)
            if buffered:
                plans[i] = plan
            rows.append(_Row(i, req, ids, req.temperature, req.seed, reg, buffered))
        attempts: dict[int, list[_Row]] = {i: [] for i in plans}
        while rows:
            for row, tok in self._decode(rows):
                if row.buffer is None:
                    yield row.index, tok
                else:
                    row.buffer.append(tok)
            retry: list[_Row] = []
            for row in rows:
                if row.buffer is None or row.cancelled:
                    continue
                done = attempts[row.index]
                done.append(row)
                plan = plans[row.index]
                reg = row.regulator
                assert reg is not None
                if len(done) < len(plan) and not reg.accepts(row.mean_confidence):
                    nxt = plan[len(done)]
                    retry.append(_Row(row.index, row.request, row.prompt_ids, nxt.temperature,
                                      nxt.seed, reg, True))
                    continue
                best = max(range(len(done)), key=lambda k: done[k].mean_confidence)
                flag = reg.retry_flag(best, len(done))
                for tok in done[best].buffer or []:
                    tok.regulated = join_flags(tok.regulated, flag)
                    yield row.index, tok
            rows = retry

    # --- the loop --------------------------------------------------------------------
    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_bos=True)
        else:
            ids = [int(t) for t in prompt] or [self.tokenizer.bos_id]
        if len(ids) >= self.max_seq_len:
            raise ValueError(f"the prompt has {len(ids)} tokens but the model's context is "
                             f"{self.max_seq_len}: shorten it to leave room for the answer")
        return ids

    def _token_bytes(self, idx: int) -> bytes:
        b = self._bytes.get(idx)
        if b is None:
            b = self._bytes[idx] = self.tokenizer.token_bytes(idx)
        return b

    def _decode(self, rows: list[_Row]) -> Iterator[tuple[_Row, Token]]:
        """Run ``rows`` to completion as one batch: one prefill, then one token per step."""
        backend, dev = self.backend, self.device
        p_len = max(len(r.prompt_ids) for r in rows)
        for r in rows:
            r.budget = min(r.budget, self.max_seq_len - p_len)
        live = [r for r in rows if r.budget > 0 and not r.request.is_cancelled]
        for r in rows:
            if r not in live:
                r.finished, r.cancelled = True, r.request.is_cancelled
        if not live:
            return
        rows = live
        b, steps = len(rows), max(r.budget for r in rows)
        pad = self.tokenizer.pad_id
        with torch.inference_mode():
            ids = torch.full((b, p_len), pad, dtype=torch.long)
            # The whole mask is built once; each step passes a growing view of it.
            mask = torch.ones((b, p_len + steps), dtype=torch.long)
            for i, r in enumerate(rows):
                n = len(r.prompt_ids)
                ids[i, p_len - n:] = torch.tensor(r.prompt_ids)
                mask[i, : p_len - n] = 0
            pos = (mask[:, :p_len].cumsum(-1) - 1).clamp(min=0)
            ids, mask, pos = ids.to(dev), mask.to(dev), pos.to(dev)
            out = backend.forward(ids, mask[:, :p_len], pos, None)
            past = out.past_key_values
            pos = pos[:, -1:] + 1
            state = _BatchState(self, rows, dev)
            choice = state.choose(out)
        t = p_len

        def launch() -> StepOutput:  # the next step, from the tokens chosen last
            nonlocal t, past, pos
            t += 1
            step = backend.forward(state.next_input(), mask[:, :t], pos, past)
            past, pos = step.past_key_values, pos + 1
            return step

        while True:
            ahead = None
            if self.pipeline and state.may_continue():
                # Launch the next step before this one's tokens reach the host: the device
                # computes while the host decodes text. Wasted if every row ends here.
                with torch.inference_mode():
                    ahead = launch()
            with torch.inference_mode():
                emitted = state.emit(choice)
            yield from emitted
            if not state.any_live():
                return
            with torch.inference_mode():
                keep = state.compact_index()
                if keep is not None and hasattr(backend, "reorder_cache"):
                    new_past = backend.reorder_cache(past, keep)
                    if new_past is not None:
                        past = new_past
                        keep_dev = keep.to(dev)
                        mask, pos = mask.index_select(0, keep_dev), pos.index_select(0, keep_dev)
                        state.compact(keep)
                        if ahead is not None:  # computed for the rows before compaction
                            ahead = ahead.select_rows(keep_dev, past)
                choice = state.choose(ahead if ahead is not None else launch())

    def __repr__(self) -> str:
        what = self.config if self.config is not None else self.backend
        return f"LLM({self.model_dir or 'in memory'}, {what!r})"


class _Choice(NamedTuple):
    """One step's token choice (:meth:`_BatchState.choose`), before it becomes Tokens."""

    decisions: list[Any]  # per row: the regulator's decision, or None
    host: list[list[Any]] | torch.Tensor  # ids, logprobs, confidences, stop probabilities
    ready: torch.cuda.Event | None  # recorded after ``host``'s copy from the device
    top: list[Any] | None  # per row: (ids, logprobs) of its top_logprobs


class _BatchState:
    """Per-step token choice and bookkeeping for the rows of one batch."""

    def __init__(self, llm: LLM, rows: list[_Row], device: torch.device) -> None:
        self.llm, self.rows, self.device = llm, rows, device
        self.eos = llm.tokenizer.eos_id
        self.special = llm._special
        self.next_ids: torch.Tensor | None = None
        vocab = llm.backend.vocab_size
        self.penalised = any(r.request.repetition_penalty != 1.0 for r in rows)
        self.seen: torch.Tensor | None = None
        if self.penalised:
            self.seen = torch.zeros((len(rows), vocab), dtype=torch.bool, device=device)
            for i, r in enumerate(rows):
                self.seen[i, torch.tensor(r.prompt_ids, device=device)] = True
        self._refresh()

    def _refresh(self) -> None:
        rows = self.rows
        self.any_regulator = any(r.regulator is not None for r in rows)
        self.any_top = max(r.request.top_logprobs for r in rows) if rows else 0
        if self.penalised:
            self.penalty = torch.tensor([r.request.repetition_penalty for r in rows],
                                        device=self.device)[:, None]

    def any_live(self) -> bool:
        return any(not r.finished for r in self.rows)

    def any_finished(self) -> bool:
        return any(r.finished for r in self.rows)

    def may_continue(self) -> bool:
        """Whether a row may need a token after the one chosen last (its budget allows)."""
        return any(not r.finished and r.n + 1 < r.budget for r in self.rows)

    def compact_index(self) -> torch.Tensor | None:
        """Indices of unfinished rows when some row has finished, else None."""
        if not self.any_finished():
            return None
        return torch.tensor([i for i, r in enumerate(self.rows) if not r.finished])

    def compact(self, keep: torch.Tensor) -> None:
        idx = keep.tolist()
        self.rows = [self.rows[i] for i in idx]
        keep_dev = keep.to(self.device)
        if self.next_ids is not None:
            self.next_ids = self.next_ids.index_select(0, keep_dev)
        if self.seen is not None:
            self.seen = self.seen.index_select(0, keep_dev)
        self._refresh()

    def next_input(self) -> torch.Tensor:
        assert self.next_ids is not None
        return self.next_ids[:, None]

    def choose(self, out: StepOutput) -> _Choice:
        """Choose every row's next token from ``out`` (the next step's input, on the
        device); :meth:`emit` turns the choice into Tokens.

        On CUDA, the values the host needs travel in one copy that :meth:`emit` waits for,
        so the next step can be launched in between (``LLM.pipeline``).
        """
        rows = self.rows
        logits = out.logits[:, -1, :]
        if logits.dtype != torch.float32:
            logits = logits.float()
        conf_t, stop_t = out.confidence[:, -1].float(), out.stop[:, -1].float()
        # Regulator decisions come first: they change how the token is chosen.
        decisions: list[Any] = [None] * len(rows)
        temps = [r.temperature for r in rows]
        if self.any_regulator:
            conf_l, stop_l = conf_t.tolist(), stop_t.tolist()
            for i, r in enumerate(rows):
                if r.regulator is None or r.finished:
                    continue
                if r.request.is_cancelled:
                    continue
                d = r.regulator.regulate_step(conf_l[i], stop_l[i], r.n,
                                              r.conf_sum / r.n if r.n else None)
                decisions[i] = d
                if d.conservative:
                    temps[i] = min(temps[i], r.regulator.conservative_temperature)
        scores = logits
        if self.penalised:
            assert self.seen is not None
            pen = torch.where(logits > 0, logits / self.penalty, logits * self.penalty)
            scores = torch.where(self.seen, pen, logits)
        chosen = scores.argmax(-1)
        sampled = [i for i, r in enumerate(rows) if temps[i] > 0 and not r.finished]
        forced = [i for i, d in enumerate(decisions) if d is not None and d.stop]
        if sampled or forced:
            chosen_l = chosen.tolist()
            cpu_scores = scores.cpu() if sampled and scores.device.type != "cpu" else scores
            for i in sampled:
                req = rows[i].request
                chosen_l[i] = _sample(cpu_scores[i], temps[i], req.top_k, req.top_p,
                                      rows[i].generator)
            for i in forced:
                if chosen_l[i] not in self.special and not rows[i].request.ignore_eos:
                    chosen_l[i] = self.eos
                else:
                    decisions[i] = None  # the model ended (or must not end) on its own
            chosen = torch.tensor(chosen_l, device=logits.device)
        # One log_softmax, not logsumexp and a subtraction: ~5 vs ~15 us a step on the CPU.
        logprobs = logits.log_softmax(-1)
        lp = logprobs.gather(1, chosen[:, None])[:, 0]
        ready: torch.cuda.Event | None = None
        host: list[list[Any]] | torch.Tensor
        if logits.device.type == "cpu":  # already on the host: no stack to build
            host = [chosen.tolist(), lp.tolist(), conf_t.tolist(), stop_t.tolist()]
        else:  # one transfer to the host for the whole step; on CUDA, emit waits for it
            cuda = logits.device.type == "cuda"
            host = torch.stack([chosen.to(lp.dtype), lp, conf_t, stop_t]).to(
                "cpu", non_blocking=cuda)
            if cuda:
                ready = torch.cuda.Event()
                ready.record()
        top: list[Any] | None = None
        if self.any_top:
            vals, idx = torch.topk(logprobs, self.any_top, dim=-1)
            top = list(zip(idx.tolist(), vals.tolist(), strict=True))
        if self.seen is not None:
            self.seen[torch.arange(len(rows), device=self.seen.device), chosen] = True
        if self.any_finished():  # finished rows (kept by a static cache) are fed padding
            self.next_ids = torch.where(
                torch.tensor([not r.finished for r in rows], device=chosen.device), chosen,
                torch.full_like(chosen, self.llm.tokenizer.pad_id))
        else:  # no host-to-device copy on the common step
            self.next_ids = chosen
        return _Choice(decisions, host, ready, top)

    def emit(self, choice: _Choice) -> list[tuple[_Row, Token]]:
        """The Tokens of a :meth:`choose` (waiting for its values to reach the host)."""
        rows, decisions, top = self.rows, choice.decisions, choice.top
        if choice.ready is not None:
            choice.ready.synchronize()
        host = choice.host
        ids_h, lp_h, conf_h, stop_h = host.tolist() if isinstance(host, torch.Tensor) else host
        emitted: list[tuple[_Row, Token]] = []
        for i, r in enumerate(rows):
            if r.finished:
                continue
            if r.request.is_cancelled:
                r.finished = r.cancelled = True
                continue
            d = decisions[i]
            tok = self._token(r, int(ids_h[i]), lp_h[i], conf_h[i], stop_h[i],
                              d.flag if d is not None else None)
            if top is not None and r.request.top_logprobs:
                k = r.request.top_logprobs
                tok.top_logprobs = list(zip(top[i][0][:k], top[i][1][:k], strict=True))
            emitted.append((r, tok))
        return emitted

    def _token(self, r: _Row, tid: int, logprob: float, conf: float, stop: float,
               flag: str | None) -> Token:
        r.n += 1
        r.conf_sum += conf
        r.ids.append(tid)
        special = tid in self.special
        finish = None
        if special and not r.request.ignore_eos:
            text, _ = r.scanner.feed(r.decoder.decode(b"", final=True))
            text += r.scanner.flush()
            finish = "eos"
        else:
            text, matched = r.scanner.feed(r.decoder.decode(self.llm._token_bytes(tid)))
            if matched:
                finish = "stop"
            elif r.n >= r.budget:
                tail, matched = r.scanner.feed(r.decoder.decode(b"", final=True))
                text += tail if matched else tail + r.scanner.flush()
                finish = "stop" if matched else "length"
        if finish is not None:
            r.finished = True
        return Token(text, tid, logprob, conf, stop, flag, finish, special)


# ----------------------------------------------------------------------------- load
def load(model_dir: str | Path, device: str | torch.device | None = "auto",
         dtype: torch.dtype | None = None, compile: bool = False) -> LLM:
    """Load a model folder (config.json, model.safetensors, tokenizer.json) ready to use.

    Quantized folders (a ``quantization`` block in config.json) are rebuilt with their
    quantized layers; an exported folder (``model.onnx``) runs on ONNX Runtime;
    ``device='auto'`` picks CUDA when present. ``compile=True`` compiles the decode step
    with ``torch.compile`` (CUDA or CPU; see :class:`TorchBackend`): worth it for a
    long-running process, not for one answer.
    """
    model_dir = Path(model_dir)
    if (model_dir / "model.onnx").is_file():
        # An exported folder: the same LLM API over ONNX Runtime.
        from vesper_sdk.export import OnnxModel

        return OnnxModel(model_dir)
    dev = resolve_device(device)
    config_path = model_dir / CONFIG_NAME
    quant = None
    if config_path.is_file():
        try:
            quant = json.loads(config_path.read_text()).get("quantization")
        except json.JSONDecodeError:
            quant = None  # from_pretrained reports the damage with the file's name
    if quant:
        from .quantize import load_quantized

        model = load_quantized(model_dir, device=dev)
    else:
        model = VesperLM.from_pretrained(model_dir, map_location=dev)
        if dtype is not None:
            model = model.to(dtype)
    tokenizer = VesperTokenizer.from_file(model_dir)
    return LLM(TorchBackend(model, compile=compile), tokenizer, model_dir)


# ----------------------------------------------------------------------------- CLI
@dataclass
class GenerateOptions:
    """Generate text from a model folder, showing each token's confidence.

    Examples:
      vesper generate runs/a/model --prompt "2+3=" --temperature 0
      vesper generate runs/a/model --chat --prompt "What is 7*6?" --regulator --retries 2
      echo "Once upon a time" | vesper generate runs/a/model --max-new-tokens 64 --json
    """

    model_dir: str = field(metadata={"help": "model folder (config.json, model.safetensors, "
                                             "tokenizer.json)", "positional": True})
    prompt: str | None = field(default=None, metadata={
        "help": "the prompt (default: read standard input)"})
    chat: bool = field(default=False, metadata={
        "help": "treat the prompt as a user message and answer it with the chat template"})
    system: str | None = field(default=None, metadata={"help": "system message (with --chat)"})
    max_new_tokens: int = field(default=DEFAULT_MAX_NEW_TOKENS, metadata={
        "help": "most tokens to generate"})
    temperature: float = field(default=DEFAULT_TEMPERATURE, metadata={
        "help": "sampling temperature; 0 = greedy"})
    top_k: int = field(default=0, metadata={"help": "keep the k most likely tokens (0 = off)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass (1 = off)"})
    repetition_penalty: float = field(default=1.0, metadata={
        "help": "> 1 discourages repeating tokens"})
    stop: list[str] = field(default_factory=list, metadata={
        "help": "stop strings (the text ends before the first one)"})
    seed: int | None = field(default=None, metadata={"help": "seed for reproducible sampling"})
    regulator: bool = field(default=False, metadata={
        "help": "turn on the metacognitive regulator (conservative decoding under the "
                "threshold, satisficing stop)"})
    threshold: float = field(default=0.85, metadata={"help": "the regulator's threshold"})
    retries: int = field(default=0, metadata={
        "help": "regenerate a low-confidence answer up to N times (implies --regulator)"})
    confidence: bool = field(default=False, metadata={
        "help": "after the text, print a table: each token, its logprob and confidence"})
    json: bool = field(default=False, metadata={
        "help": "print one JSON object per token instead of plain text"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    compile: bool = field(default=False, metadata={
        "help": "torch.compile the decode step: faster tokens (CPU ~1.2x, CUDA ~1.4x) "
                "after a wait of tens of seconds for the compiler"})


def cli(opts: GenerateOptions) -> int:
    """``vesper generate``: stream the answer to stdout."""
    prompt = opts.prompt
    if prompt is None:
        if sys.stdin.isatty():  # else a bare `vesper generate DIR` looks like a hang
            print("reading the prompt from standard input (end it with Ctrl-D), or pass "
                  "--prompt TEXT", file=sys.stderr, flush=True)
        prompt = sys.stdin.read()
        if not prompt.strip():
            raise ValueError("no prompt: standard input was empty. Pass --prompt TEXT or "
                             "pipe text in (--prompt '' starts from nothing on purpose)")
    lm = load(opts.model_dir, device=opts.device, compile=opts.compile)
    if getattr(lm.backend, "compile", False):
        # Said up front: otherwise the first token's wait looks like a hang.
        print("note: --compile: the first tokens wait for torch.compile (tens of seconds the "
              "first time; its cache makes later runs quicker)", file=sys.stderr, flush=True)
    regulator = None
    if opts.regulator or opts.retries:
        regulator = MetacognitiveRegulator(threshold=opts.threshold, retries=opts.retries)
    params = dict(max_new_tokens=opts.max_new_tokens, temperature=opts.temperature,
                  top_k=opts.top_k, top_p=opts.top_p,
                  repetition_penalty=opts.repetition_penalty, stop=opts.stop or None,
                  seed=opts.seed, regulator=regulator)
    if opts.chat:
        messages = ([{"role": "system", "content": opts.system}] if opts.system else [])
        messages.append({"role": "user", "content": prompt})
        tokens = lm.chat_stream(messages, **params)
    else:
        tokens = lm.stream(prompt, **params)
    seen: list[Token] = []
    for tok in tokens:
        seen.append(tok)
        if opts.json:
            print(json.dumps({"text": tok.text, "id": tok.id, "logprob": round(tok.logprob, 5),
                              "confidence": round(tok.confidence, 5),
                              "stop_prob": round(tok.stop_prob, 5),
                              "regulated": tok.regulated, "finish_reason": tok.finish_reason},
                             ensure_ascii=False), flush=True)
        else:
            sys.stdout.write(tok.text)
            sys.stdout.flush()
    if not opts.json:
        sys.stdout.write("\n")
    if opts.confidence and not opts.json:
        print(f"{'token':<16} {'id':>6} {'logprob':>8} {'conf':>6} {'stop':>6}  regulated")
        for tok in seen:
            shown = (lm.tokenizer.id_to_token(tok.id) or "?") if tok.special else repr(
                lm.tokenizer.token_bytes(tok.id).decode("utf-8", "replace"))
            print(f"{shown[:16]:<16} {tok.id:>6} {tok.logprob:>8.3f} {tok.confidence:>6.3f} "
                  f"{tok.stop_prob:>6.3f}  {tok.regulated or ''}")
        if seen:
            mean = sum(t.confidence for t in seen) / len(seen)
            print(f"{len(seen)} tokens, mean confidence {mean:.3f}"
                  + (f", finish: {seen[-1].finish_reason}" if seen[-1].finish_reason else ""))
    return 0
