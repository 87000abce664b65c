"""Continuous batching: requests join a running batch at a step boundary and leave when done.

:class:`SlotEngine` keeps one KV slot per request in a cache allocated once
([slots, H, C, D] per layer, ``C`` the context window). Each :meth:`SlotEngine.step`:

1. prefills waiting requests, at most ``prefill_chunk`` prompt tokens per step (a long
   prompt takes several steps, so the running rows are never stalled by more than one
   chunk), each into its own slot;
2. a request whose prompt is done gets its first token and joins the running batch;
3. runs one decode step over every running row (a :class:`~vesper_sdk.model.SlotCache`:
   each row at its own position) and lets the rows that finished leave.

Rows run through ``VesperLM.forward`` like every other path, and choose tokens with the
decoding loop's own per-row state (``engine._BatchState``): sampling, penalties, stop
strings and the regulator behave as in ``LLM.stream_batch``.

Running rows sit in slots ``0..n-1`` (a decode step reads a view, no copy); a row that
joins or leaves swaps its slot with a neighbour's. A slot keeps its tokens' keys and
values after its request ends: a new prompt that starts with tokens some slot holds (a
system prompt, the earlier turns of a chat) copies them instead of computing them again
(prefix reuse; ``reused_tokens / prompt_tokens`` is the hit rate).
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..model import DynamicCache, SlotCache
from .engine import Attempts, Engine, _BatchState, _Row, score_prompt
from .types import GenerationRequest, PromptLogprobs, StepOutput, Token

DEFAULT_PREFILL_CHUNK = 256


def supports_slots(llm: Any) -> bool:
    """Whether ``llm`` (an LLM) can batch continuously: a PyTorch model behind it."""
    backend = getattr(llm, "backend", None)
    return getattr(backend, "model", None) is not None and hasattr(llm, "engine")


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class _Prefill:
    """A request whose prompt is being written into its slot."""

    row: _Row
    slot: int
    done: int  # prompt positions already in the slot
    logprobs: list[float | None] = field(default_factory=list)
    top: list[list[tuple[int, float]] | None] = field(default_factory=list)


class SlotEngine:
    """Continuous batching over an ``LLM``'s PyTorch model: see the module docstring.

    ``add(key, request)`` queues a request (``free_slots`` must be > 0); ``step()`` does
    one step of work and returns ``(events, ended)``: ``(key, Token | PromptLogprobs)``
    in order, and the keys whose requests are over (finished, cancelled or scored only).
    Only one thread may call them.
    """

    def __init__(self, llm: Any, slots: int, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 ) -> None:
        if not supports_slots(llm):
            raise ValueError("continuous batching needs a PyTorch model (not an ONNX export)")
        if slots < 1 or prefill_chunk < 1:
            raise ValueError("slots and prefill_chunk must be >= 1")
        self.engine: Engine = llm.engine
        self.backend = self.engine.backend
        model = self.backend.model
        cfg = model.config
        self.context, self.slots, self.chunk = cfg.max_seq_len, slots, prefill_chunk
        self.device = model.device
        shape = (slots, cfg.num_heads, self.context, cfg.head_dim)
        # Zeros, not empty: a step attends over the longest row's length, so shorter rows
        # read slots they never wrote (masked out, but they must be finite).
        self.keys = [torch.zeros(shape, dtype=model.dtype, device=self.device)
                     for _ in range(cfg.num_layers)]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.key_mask = torch.zeros((slots, self.context), dtype=torch.bool,
                                    device=self.device)
        self.cached: list[list[int]] = [[] for _ in range(slots)]  # valid tokens per slot
        self.used = [0] * slots  # when each slot last served (least recently used first)
        self.tick = 0
        self.n = 0  # running rows, in slots 0..n-1, aligned with self.state.rows
        self.state: _BatchState | None = None
        self.prefills: collections.deque[_Prefill] = collections.deque()
        self.attempts = Attempts(self.engine.abstention_tokens)
        self.prompt_tokens = 0
        self.reused_tokens = 0

    # --- bookkeeping -----------------------------------------------------------------
    @property
    def free_slots(self) -> int:
        return self.slots - self.n - len(self.prefills)

    @property
    def busy(self) -> bool:
        return bool(self.n or self.prefills)

    @property
    def running(self) -> int:
        return self.n

    def _swap(self, a: int, b: int) -> None:
        """Exchange slots a and b: their keys, values, masks and tokens."""
        if a == b:
            return
        m = max(len(self.cached[a]), len(self.cached[b]))
        if m:
            ab = torch.tensor([a, b], device=self.device)
            ba = torch.tensor([b, a], device=self.device)
            for buf in (*self.keys, *self.values):
                buf[ab, :, :m] = buf[ba, :, :m]
            self.key_mask[ab] = self.key_mask[ba]
        self.cached[a], self.cached[b] = self.cached[b], self.cached[a]
        self.used[a], self.used[b] = self.used[b], self.used[a]
        for pf in self.prefills:
            if pf.slot in (a, b):
                pf.slot = b if pf.slot == a else a

    def reset(self) -> list[Any]:
        """Drop every request (after a failed step) and forget every slot; their keys."""
        keys = [r.index for r in (self.state.rows if self.state else [])]
        keys += [pf.row.index for pf in self.prefills]
        self.state, self.n = None, 0
        self.prefills.clear()
        self.attempts = Attempts(self.engine.abstention_tokens)
        self.cached = [[] for _ in range(self.slots)]
        self.key_mask.zero_()
        return keys

    # --- requests in -----------------------------------------------------------------
    def add(self, key: Any, request: GenerationRequest) -> None:
        """Queue ``request`` under ``key``; ValueError for a request that cannot run."""
        if self.free_slots < 1:
            raise RuntimeError("no free slot: wait for free_slots > 0")
        request.params.validate()
        if not self.busy:  # between generations: are the decode swaps' copies current?
            self.backend._refresh_if_stale()
        self._admit(self.engine.new_row(key, request, self.attempts))

    def _admit(self, row: _Row) -> None:
        prompt = row.prompt_ids
        row.budget = min(row.budget, self.context - len(prompt))
        reserved = {pf.slot for pf in self.prefills}
        free = [j for j in range(self.n, self.slots) if j not in reserved]
        source, reuse = -1, 0
        if row.params.prompt_logprobs is None:  # scoring the prompt needs every position
            for j in range(self.slots):
                m = min(common_prefix(self.cached[j], prompt), len(prompt) - 1)
                if m > reuse or (m == reuse and m and j in free and source not in free):
                    source, reuse = j, m
        target = source if source in free else min(free, key=lambda j: self.used[j])
        if reuse and source != target:
            for buf in (*self.keys, *self.values):
                buf[target, :, :reuse] = buf[source, :, :reuse]
        self.key_mask[target, reuse:] = False
        self.key_mask[target, :reuse] = True
        self.cached[target] = list(prompt[:reuse])
        self.tick += 1
        self.used[target] = self.tick
        self.prompt_tokens += len(prompt)
        self.reused_tokens += reuse
        self.prefills.append(_Prefill(row, target, reuse))

    # --- one step --------------------------------------------------------------------
    def step(self) -> tuple[list[tuple[Any, Token | PromptLogprobs]], list[Any]]:
        """Prefill up to ``prefill_chunk`` prompt tokens, then one decode step for all."""
        events: list[tuple[Any, Token | PromptLogprobs]] = []
        ended: list[Any] = []
        with torch.inference_mode():
            self._prefill(events, ended)
            if self.n:
                self._decode(events, ended)
        return events, ended

    def _prefill(self, events: list, ended: list) -> None:
        for pf in [pf for pf in self.prefills if pf.row.request.is_cancelled]:
            self.prefills.remove(pf)
            pf.row.finished = pf.row.cancelled = True
            self._finish(pf.row, events, ended)
        budget = self.chunk
        while budget > 0 and self.prefills:
            pf = self.prefills[0]
            take = min(budget, len(pf.row.prompt_ids) - pf.done)
            out = self._prefill_chunk(pf, take)
            budget -= take
            if pf.done < len(pf.row.prompt_ids):
                return  # the rest of this prompt in the next steps
            self.prefills.popleft()
            row = pf.row
            if row.params.prompt_logprobs is not None:
                events.append((row.index, PromptLogprobs(list(row.prompt_ids), pf.logprobs,
                                                         pf.top)))
            if row.budget <= 0:  # scoring the prompt only
                row.finished = True
                self._finish(row, events, ended)
                continue
            first = _BatchState(self.engine, [row], self.device)
            last = StepOutput(out.logits[:, -1:], out.confidence[:, -1:], out.stop[:, -1:],
                              None, out.answer[:, -1:],
                              None if out.logsumexp is None else out.logsumexp[:, -1:])
            for r, tok in first.emit(first.choose(last)):
                self._emit(r, tok, events)
            if row.finished:
                self._finish(row, events, ended)
                continue
            self._swap(pf.slot, self.n)  # join the running rows, in slot n
            self.n += 1
            if self.state is None:
                self.state = first
            else:
                self.state.extend(first)

    def _prefill_chunk(self, pf: _Prefill, take: int) -> StepOutput:
        """Run prompt positions [done, done + take) into the slot; the step's output."""
        s, p, ids = pf.slot, pf.done, pf.row.prompt_ids
        past = DynamicCache([(k[s:s + 1, :, :p], v[s:s + 1, :, :p])
                             for k, v in zip(self.keys, self.values, strict=True)]
                            if p else ())
        x = torch.tensor([ids[p:p + take]], device=self.device)
        pos = torch.arange(p, p + take, device=self.device)[None]
        out = self.backend.forward(x, None, pos, past)
        for layer, (k, v) in enumerate(out.past_key_values):
            self.keys[layer][s, :, p:p + take] = k[0, :, p:p + take]
            self.values[layer][s, :, p:p + take] = v[0, :, p:p + take]
        self.key_mask[s, :p + take] = True
        self.cached[s] = list(ids[:p + take])
        k_top = pf.row.params.prompt_logprobs
        if k_top is not None:
            if not p:
                pf.logprobs.append(None)
                pf.top.append(None)
            lps, tops = score_prompt(out.logits[0], ids[p + 1:p + take + 1], k_top)
            pf.logprobs.extend(lps)
            pf.top.extend(tops)
        pf.done = p + take
        return out

    def _decode(self, events: list, ended: list) -> None:
        state, n = self.state, self.n
        assert state is not None
        fed = state.next_input()
        lengths = [len(self.cached[i]) for i in range(n)]
        write = torch.tensor(lengths, device=self.device)
        cache = SlotCache([k[:n] for k in self.keys], [v[:n] for v in self.values],
                          self.key_mask[:n], write, max(lengths) + 1)
        out = self.backend.forward(fed, None, write[:, None], cache)
        for i, tid in enumerate(fed[:, 0].tolist()):
            self.cached[i].append(tid)
        for r, tok in state.emit(state.choose(out)):
            self._emit(r, tok, events)
        gone = [i for i, r in enumerate(state.rows) if r.finished]
        if not gone:
            return
        keep = list(range(n))
        for i in reversed(gone):  # each leaver swaps with the last running row
            self._swap(i, len(keep) - 1)
            keep[i] = keep[-1]
            keep.pop()
        left = [state.rows[i] for i in gone]
        self.n = len(keep)
        if keep:
            state.compact(torch.tensor(keep))
        else:
            self.state = None
        for r in left:
            self._finish(r, events, ended)

    def _emit(self, row: _Row, tok: Token, events: list) -> None:
        if row.buffer is None:
            events.append((row.index, tok))
        else:  # an attempt of the regulator: released once its attempts are settled
            row.buffer.append(tok)

    def _finish(self, row: _Row, events: list, ended: list) -> None:
        nxt, tokens = self.attempts.settle(row)
        events.extend((row.index, tok) for tok in tokens)
        if nxt is not None:
            self._admit(nxt)  # its slot was just freed; the prompt is reused from it
        else:
            ended.append(row.index)
