"""The decoding loop: one batch of requests from prefill to their last tokens.

It only calls ``DecodeBackend.forward``: the prompts run once (prefill, left-padded
batch), then one token per row per step reusing the backend's KV cache. Every token
comes out as a :class:`Token` with its log-probability, the MetaHead's confidence and
stop probability, and what the metacognitive regulator did at that position.
"""

from __future__ import annotations

import codecs
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch

from ..eval.regulator import ABSTAINED, MetacognitiveRegulator, as_regulator, join_flags
from ..eval.scorer import score_labels
from ..model.metahead import answer_confidence_from_sum, confidence_logit
from ..tokenizer import VesperTokenizer
from .sampling import sample
from .stops import StopScanner
from .types import DecodeBackend, GenerationRequest, PromptLogprobs, StepOutput, Token, host_scope


class _Row:
    """Decoding state of one attempt of one request."""

    def __init__(self, index: int, request: GenerationRequest, prompt_ids: list[int],
                 temperature: float, seed: int | None,
                 regulator: MetacognitiveRegulator | None, buffered: bool,
                 check: tuple[float, ...] = ()) -> None:
        self.index, self.request, self.prompt_ids = index, request, prompt_ids
        self.temperature, self.seed, self.regulator = temperature, seed, regulator
        self.buffer: list[Token] | None = [] if buffered else None
        self.params = request.params
        self.budget = request.params.max_new_tokens
        self.n = 0  # tokens generated
        self.answer_sum = 0.0  # of the tokens' MetaHead answer logits
        self.check = check  # the model's answer check (config.metahead_answer_check)
        self.confidence_sum = 0.0  # of the tokens' confidence logits, for the check
        self.ids: list[int] = []
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.scanner = StopScanner(request.params.stops)
        self.finished = self.cancelled = False
        self._generator: torch.Generator | None = None

    def generator(self, device: torch.device) -> torch.Generator:
        """This row's generator on ``device`` (where its logits are sampled)."""
        # Created on first use, so greedy rows never touch the global RNG; without a seed
        # the global RNG picks one, which torch.manual_seed makes reproducible.
        if self._generator is None:
            seed = self.seed if self.seed is not None else int(
                torch.randint(0, 2**62, (1,)).item())
            self._generator = torch.Generator(device).manual_seed(seed)
        return self._generator

    @property
    def answer_confidence(self) -> float:
        """The MetaHead's answer confidence so far (``metahead.answer_confidence``)."""
        return (answer_confidence_from_sum(self.answer_sum, self.n, self.confidence_sum,
                                           self.check) if self.n else float("-inf"))



class Attempts:
    """The regulator's retries: which attempts a request has had, and which one it keeps.

    A request whose regulator plans several attempts decodes them one after another, its
    tokens held back (``_Row.buffer``); :meth:`settle` decides, when an attempt ends,
    whether to decode the next one, release the best so far, or (``abstain_below``)
    release an abstention instead.
    """

    def __init__(self, abstain: Callable[[str, float], list[Token]] | None = None) -> None:
        self.plans: dict[Any, list] = {}
        self.done: dict[Any, list[_Row]] = {}
        self.abstain = abstain  # the tokens of an abstention (Engine.abstention_tokens)

    def settle(self, row: _Row) -> tuple[_Row | None, list[Token]]:
        """(the next attempt to decode or None, the tokens to release now) for an ended row."""
        if row.buffer is None or row.cancelled:
            return None, []
        done = self.done[row.index]
        done.append(row)
        plan, reg = self.plans[row.index], row.regulator
        assert reg is not None
        if len(done) < len(plan) and not reg.accepts(row.answer_confidence):
            nxt = plan[len(done)]
            return _Row(row.index, row.request, row.prompt_ids, nxt.temperature, nxt.seed,
                        reg, True, row.check), []
        best = max(range(len(done)), key=lambda k: done[k].answer_confidence)
        flag = reg.retry_flag(best, len(done))
        tokens = done[best].buffer or []
        for tok in tokens:
            tok.regulated = join_flags(tok.regulated, flag)
        del self.plans[row.index], self.done[row.index]
        if reg.abstains(done[best].answer_confidence) and self.abstain is not None:
            return None, self.abstain(reg.abstention, done[best].answer_confidence)
        return None, tokens


class Engine:
    """Decodes batches of :class:`GenerationRequest` over one backend and tokenizer.

    ``pipeline`` (default: on when the backend is on CUDA) launches each decode step
    before the previous step's tokens are turned into text, so that on an asynchronous
    device the host's share of a token (copying its values out, decoding, stop strings)
    overlaps the device's next step. The tokens are the same; when every row ends, the
    step launched ahead is thrown away. Off elsewhere: on the CPU nothing is asynchronous,
    so it would only add that wasted step.
    """

    def __init__(self, backend: DecodeBackend, tokenizer: VesperTokenizer,
                 pipeline: bool | None = None) -> None:
        self.backend, self.tokenizer = backend, tokenizer
        self.special = frozenset(tokenizer.special_ids)
        self._bytes: dict[int, bytes] = {}
        self.pipeline = backend.device.type == "cuda" if pipeline is None else pipeline

    @property
    def max_seq_len(self) -> int:
        return self.backend.max_seq_len

    @property
    def answer_check(self) -> tuple[float, ...]:
        """``config.metahead_answer_check``, read per request (a calibration may change it)."""
        config = getattr(self.backend, "config", None)
        return tuple(getattr(config, "metahead_answer_check", ()) or ())

    @property
    def device(self) -> torch.device:
        return self.backend.device

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
            r.params.validate()
        attempts = Attempts(self.abstention_tokens)
        rows = [self.new_row(i, req, attempts) for i, req in enumerate(reqs)]
        while rows:
            for row, item in self._decode(rows):
                if row.buffer is None or not isinstance(item, Token):
                    yield row.index, item
                else:
                    row.buffer.append(item)
            retry: list[_Row] = []
            for row in rows:
                nxt, tokens = attempts.settle(row)
                if nxt is not None:
                    retry.append(nxt)
                for tok in tokens:
                    yield row.index, tok
            rows = retry

    def new_row(self, index: Any, request: GenerationRequest, attempts: Attempts) -> _Row:
        """The first attempt of ``request`` (its regulator's plan noted in ``attempts``)."""
        reg = as_regulator(request.params.regulator)
        ids = self.prompt_ids(request.prompt)
        plan = reg.plan(request.params.temperature, request.params.seed) if reg else None
        buffered = bool(reg and plan and reg.holds_answers)
        if buffered:
            attempts.plans[index] = plan
            attempts.done[index] = []
        return _Row(index, request, ids, request.params.temperature, request.params.seed,
                    reg, buffered, self.answer_check)

    # --- the loop --------------------------------------------------------------------
    def prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_bos=True)
        else:
            ids = [int(t) for t in prompt] or [self.tokenizer.bos_id]
        if len(ids) >= self.max_seq_len:
            raise ValueError(f"the prompt has {len(ids)} tokens but the model's context is "
                             f"{self.max_seq_len}: shorten it to leave room for the answer")
        return ids

    def abstention_tokens(self, text: str, confidence: float) -> list[Token]:
        """``text`` as the tokens of an abstention: not sampled (logprob 0), each with the
        withheld answer's answer ``confidence``, flagged ``"abstained"``; the last ends it."""
        ids = self.tokenizer.encode(text) or [self.tokenizer.eos_id]
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        c = min(max(confidence, 1e-9), 1 - 1e-9)  # the same answer confidence, pooled
        tokens = [Token(decoder.decode(self.token_bytes(t)), t, 0.0, confidence, 0.0,
                        ABSTAINED, answer_logit=math.log(c / (1 - c)),
                        answer_confidence=confidence) for t in ids]
        tokens[-1].text += decoder.decode(b"", final=True)
        tokens[-1].finish_reason = "stop"
        return tokens

    def token_bytes(self, idx: int) -> bytes:
        b = self._bytes.get(idx)
        if b is None:
            b = self._bytes[idx] = self.tokenizer.token_bytes(idx)
        return b

    def live_rows(self, rows: list[_Row]) -> tuple[int, list[_Row]]:
        """(the longest prompt, the rows with work to do): each row's budget cut to the room
        the longest prompt leaves; the rest are marked finished (or cancelled)."""
        p_len = max(len(r.prompt_ids) for r in rows)
        for r in rows:
            r.budget = min(r.budget, self.max_seq_len - p_len)
        live = [r for r in rows if (r.budget > 0 or r.params.prompt_logprobs is not None)
                and not r.request.is_cancelled]
        for r in rows:
            if r not in live:
                r.finished, r.cancelled = True, r.request.is_cancelled
        return p_len, live

    def _decode(self, rows: list[_Row]) -> Iterator[tuple[_Row, Token | PromptLogprobs]]:
        """Run ``rows`` to completion as one batch: one prefill, then one token per step."""
        backend, dev = self.backend, self.device
        p_len, rows = self.live_rows(rows)
        if not rows:
            return
        b, steps = len(rows), max(0, *(r.budget for r in rows))
        pad = self.tokenizer.pad_id
        with host_scope(backend):
            ids = torch.full((b, p_len), pad, dtype=torch.long)
            # The whole mask is built once; each step passes a growing view of it.
            mask = torch.ones((b, p_len + steps), dtype=torch.long)
            for i, r in enumerate(rows):
                n = len(r.prompt_ids)
                ids[i, p_len - n:] = torch.tensor(r.prompt_ids)
                mask[i, : p_len - n] = 0
            pos = (mask[:, :p_len].cumsum(-1) - 1).clamp(min=0)
            ids, mask, pos = ids.to(dev), mask.to(dev), pos.to(dev)
            if hasattr(backend, "reserve"):  # a cache sized once, not grown while decoding
                backend.reserve(p_len + steps)
            out = backend.forward(ids, mask[:, :p_len], pos, None)
            past = out.past_key_values
            pos = pos[:, -1:] + 1
            scored = []
            for i, r in enumerate(rows):
                if r.params.prompt_logprobs is not None:
                    n = len(r.prompt_ids)
                    scored.append((r, prompt_logprobs(out.logits[i, p_len - n:p_len - 1],
                                                      r.prompt_ids, r.params.prompt_logprobs)))
                if r.budget <= 0:  # scoring the prompt only (echo with no new token)
                    r.finished = True
            state = _BatchState(self, rows, dev)
            choice = state.choose(out)
        yield from scored
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
                with host_scope(backend):
                    ahead = launch()
            with host_scope(backend):
                emitted = state.emit(choice)
            yield from emitted
            if not state.any_live():
                return
            with host_scope(backend):
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


def score_prompt(logits: torch.Tensor, targets: Sequence[int], k: int,
                 ) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """Log-probabilities of ``targets`` under ``logits`` [S,V] (position j predicts
    ``targets[j]``), and the ``k`` most likely (id, logprob) at each position."""
    if not len(targets):
        return [], []
    logits = logits[:len(targets)].float()
    labels = torch.tensor(list(targets), device=logits.device)
    lps = score_labels(logits, labels).logprob.tolist()
    if not k:
        return lps, [[] for _ in lps]
    vals, idx = logits.log_softmax(-1).topk(k, dim=-1)
    return lps, [list(zip(i, v, strict=True)) for i, v in zip(idx.tolist(), vals.tolist(),
                                                              strict=True)]


def prompt_logprobs(logits: torch.Tensor, ids: Sequence[int], k: int) -> PromptLogprobs:
    """A whole prompt scored: ``logits`` [len(ids) - 1, V] at the positions before ids[1:]."""
    lps, tops = score_prompt(logits, ids[1:], k)
    return PromptLogprobs(list(ids), [None, *lps], [None, *tops])


class _Choice(NamedTuple):
    """One step's token choice (:meth:`_BatchState.choose`), before it becomes Tokens."""

    decisions: list[Any]  # per row: the regulator's decision, or None
    host: list[list[Any]] | torch.Tensor  # ids, logprobs, confidences, stops, answer logits
    ready: torch.cuda.Event | None  # recorded after ``host``'s copy from the device
    top: list[Any] | None  # per row: (ids, logprobs) of its top_logprobs


class _BatchState:
    """Per-step token choice and bookkeeping for the rows of one batch."""

    def __init__(self, engine: Engine, rows: list[_Row], device: torch.device) -> None:
        self.engine, self.rows, self.device = engine, rows, device
        self.eos = engine.tokenizer.eos_id
        self.special = engine.special
        self.vocab = engine.backend.vocab_size
        self.next_ids: torch.Tensor | None = None
        # Per row [B,V], built only when some row needs them: tokens seen in the prompt or
        # answer (repetition penalty), the answer's token counts (presence and frequency
        # penalties), and the logit bias.
        self.seen = self._rows_tensor(
            rows, lambda r: r.params.repetition_penalty != 1.0, torch.bool,
            lambda t, r: t.index_fill_(0, torch.tensor(r.prompt_ids, device=device), True))
        self.counts = self._rows_tensor(rows, lambda r: r.params.penalises_output,
                                        torch.float32, None)
        self.bias = self._rows_tensor(rows, lambda r: bool(r.params.logit_bias),
                                      torch.float32, _fill_bias)
        self._refresh()

    def _rows_tensor(self, rows: list[_Row], needed: Callable[[_Row], bool],
                     dtype: torch.dtype, fill: Callable[[torch.Tensor, _Row], Any] | None,
                     ) -> torch.Tensor | None:
        if not any(needed(r) for r in rows):
            return None
        out = torch.zeros((len(rows), self.vocab), dtype=dtype, device=self.device)
        if fill is not None:
            for i, r in enumerate(rows):
                fill(out[i], r)
        return out

    def _refresh(self) -> None:
        rows = self.rows
        self.any_regulator = any(r.regulator is not None for r in rows)
        self.any_top = max((r.params.top_logprobs for r in rows), default=0)
        self.any_min_tokens = any(r.params.min_tokens for r in rows)
        if self.seen is not None:
            self.penalty = torch.tensor([r.params.repetition_penalty for r in rows],
                                        device=self.device)[:, None]
        if self.counts is not None:
            self.presence = torch.tensor([r.params.presence_penalty for r in rows],
                                         device=self.device)[:, None]
            self.frequency = torch.tensor([r.params.frequency_penalty for r in rows],
                                          device=self.device)[:, None]

    def extend(self, other: _BatchState) -> None:
        """Append ``other``'s rows (each with its next token chosen) after these."""
        n, m = len(self.rows), len(other.rows)

        def cat(a: torch.Tensor | None, b: torch.Tensor | None, dtype: torch.dtype,
                ) -> torch.Tensor | None:
            if a is None and b is None:
                return None
            a = a if a is not None else torch.zeros((n, self.vocab), dtype=dtype,
                                                   device=self.device)
            b = b if b is not None else torch.zeros((m, self.vocab), dtype=dtype,
                                                   device=self.device)
            return torch.cat([a, b])

        self.seen = cat(self.seen, other.seen, torch.bool)
        self.counts = cat(self.counts, other.counts, torch.float32)
        self.bias = cat(self.bias, other.bias, torch.float32)
        if self.next_ids is not None and other.next_ids is not None:
            self.next_ids = torch.cat([self.next_ids, other.next_ids])
        else:
            self.next_ids = other.next_ids if self.next_ids is None else self.next_ids
        self.rows = self.rows + other.rows
        self._refresh()

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
        for name in ("seen", "counts", "bias"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, keep_dev))
        self._refresh()

    def next_input(self) -> torch.Tensor:
        assert self.next_ids is not None
        return self.next_ids[:, None]

    def choose(self, out: StepOutput) -> _Choice:
        """Choose every row's next token from ``out`` (the next step's input, on the
        device); :meth:`emit` turns the choice into Tokens. On CUDA, the values the host
        needs travel in one copy that :meth:`emit` waits for, so the next step can be
        launched in between (``LLM.pipeline``)."""
        rows = self.rows
        logits = out.logits[:, -1, :].float()  # a no-op for fp32 logits
        conf_t, stop_t = out.confidence[:, -1].float(), out.stop[:, -1].float()
        answer_t = out.answer[:, -1].float()
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
                                              r.answer_confidence if r.n else None)
                decisions[i] = d
                if d.conservative:
                    temps[i] = min(temps[i], r.regulator.conservative_temperature)
        scores = self._processed(logits)
        # numpy's argmax is vectorised where torch's CPU kernel is not.
        chosen = (torch.from_numpy(scores.numpy().argmax(-1)) if scores.device.type == "cpu"
                  else scores.argmax(-1))
        sampled = [i for i, r in enumerate(rows) if temps[i] > 0 and not r.finished]
        forced = [i for i, d in enumerate(decisions) if d is not None and d.stop]
        if sampled or forced:
            chosen_l = chosen.tolist()
            if sampled:
                picked = sample(scores[torch.tensor(sampled, device=scores.device)],
                                [temps[i] for i in sampled],
                                [rows[i].params.top_k for i in sampled],
                                [rows[i].params.top_p for i in sampled],
                                [rows[i].generator(scores.device) for i in sampled],
                                [rows[i].params.min_p for i in sampled])
                for i, tid in zip(sampled, picked, strict=True):
                    chosen_l[i] = tid
            for i in forced:
                if chosen_l[i] not in self.special and not rows[i].params.ignore_eos:
                    chosen_l[i] = self.eos
                else:
                    decisions[i] = None  # the model ended (or must not end) on its own
            chosen = torch.tensor(chosen_l, device=logits.device)
        # The model's log-sum-exp (computed on the way to its features) saves a pass over
        # the vocabulary; with top_logprobs, both come from one log_softmax, so a greedy
        # token's log-probability is exactly its top alternative's (lm-eval's is_greedy).
        logprobs = (logits.log_softmax(-1) if self.any_top or out.logsumexp is None
                    else None)
        if logprobs is None:
            lp = logits.gather(1, chosen[:, None])[:, 0] - out.logsumexp[:, -1].float()
        else:
            lp = logprobs.gather(1, chosen[:, None])[:, 0]
        ready: torch.cuda.Event | None = None
        host: list[list[Any]] | torch.Tensor
        if logits.device.type == "cpu":  # already on the host: no stack to build
            host = [chosen.tolist(), lp.tolist(), conf_t.tolist(), stop_t.tolist(),
                    answer_t.tolist()]
        else:  # one transfer to the host for the whole step; on CUDA, emit waits for it
            cuda = logits.device.type == "cuda"
            host = torch.stack([chosen.to(lp.dtype), lp, conf_t, stop_t, answer_t]).to(
                "cpu", non_blocking=cuda)
            if cuda:
                ready = torch.cuda.Event()
                ready.record()
        top: list[Any] | None = None
        if logprobs is not None and self.any_top:
            vals, idx = torch.topk(logprobs, self.any_top, dim=-1)
            top = list(zip(idx.tolist(), vals.tolist(), strict=True))
        if self.seen is not None or self.counts is not None:  # penalties in use
            at = torch.arange(len(rows), device=chosen.device)
            if self.seen is not None:
                self.seen[at, chosen] = True
            if self.counts is not None:
                self.counts[at, chosen] += 1.0
        if self.any_finished():  # finished rows (kept by a static cache) are fed padding
            self.next_ids = torch.where(
                torch.tensor([not r.finished for r in rows], device=chosen.device), chosen,
                torch.full_like(chosen, self.engine.tokenizer.pad_id))
        else:  # no host-to-device copy on the common step
            self.next_ids = chosen
        return _Choice(decisions, host, ready, top)

    def _processed(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits every row chooses from: logit bias, penalties, ``min_tokens``."""
        scores = logits
        if self.bias is not None:
            scores = scores + self.bias
        if self.seen is not None:
            pen = torch.where(scores > 0, scores / self.penalty, scores * self.penalty)
            scores = torch.where(self.seen, pen, scores)
        if self.counts is not None:
            scores = (scores - self.frequency * self.counts
                      - self.presence * (self.counts > 0).to(scores.dtype))
        if self.any_min_tokens:
            early = [i for i, r in enumerate(self.rows) if r.n < r.params.min_tokens]
            if early:
                scores = scores.clone() if scores is logits else scores
                special = torch.tensor(sorted(self.special), device=scores.device)
                rows = torch.tensor(early, device=scores.device)
                scores[rows[:, None], special[None, :]] = float("-inf")
        return scores

    def emit(self, choice: _Choice) -> list[tuple[_Row, Token]]:
        """The Tokens of a :meth:`choose` (waiting for its values to reach the host)."""
        rows, decisions, top = self.rows, choice.decisions, choice.top
        if choice.ready is not None:
            choice.ready.synchronize()
        host = choice.host
        ids_h, lp_h, conf_h, stop_h, answer_h = (host.tolist() if isinstance(host, torch.Tensor)
                                                 else host)
        emitted: list[tuple[_Row, Token]] = []
        for i, r in enumerate(rows):
            if r.finished:
                continue
            if r.request.is_cancelled:
                r.finished = r.cancelled = True
                continue
            d = decisions[i]
            tok = self._token(r, int(ids_h[i]), lp_h[i], conf_h[i], stop_h[i], answer_h[i],
                              d.flag if d is not None else None)
            if top is not None and r.params.top_logprobs:
                k = r.params.top_logprobs
                tok.top_logprobs = list(zip(top[i][0][:k], top[i][1][:k], strict=True))
            emitted.append((r, tok))
        return emitted

    def _token(self, r: _Row, tid: int, logprob: float, conf: float, stop: float,
               answer: float, flag: str | None) -> Token:
        r.n += 1
        r.answer_sum += answer
        if r.check:
            r.confidence_sum += confidence_logit(conf)
        r.ids.append(tid)
        special = tid in self.special
        finish = None
        if special and not r.params.ignore_eos:
            text, _ = r.scanner.feed(r.decoder.decode(b"", final=True))
            text += r.scanner.flush()
            finish = "eos"
        else:
            text, matched = r.scanner.feed(r.decoder.decode(self.engine.token_bytes(tid)))
            if matched:
                finish = "stop"
            elif r.n >= r.budget:
                tail, matched = r.scanner.feed(r.decoder.decode(b"", final=True))
                text += tail if matched else tail + r.scanner.flush()
                finish = "stop" if matched else "length"
        if finish is not None:
            r.finished = True
        return Token(text, tid, logprob, conf, stop, flag, finish, special,
                     answer_logit=answer, answer_confidence=r.answer_confidence)


def _fill_bias(row: torch.Tensor, r: _Row) -> None:
    """Write a row's ``logit_bias`` ({token id: bias}) into its [V] tensor."""
    bias = r.params.logit_bias or {}
    ids = [t for t in bias if t < row.shape[0]]
    if ids:
        row[torch.tensor(ids, device=row.device)] = torch.tensor(
            [float(bias[t]) for t in ids], device=row.device)
