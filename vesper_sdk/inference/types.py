"""What the decoding loop hands out and takes in: tokens, requests, backend steps."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .sampling import SamplingParams


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
        answer_logit: the MetaHead's answer logit at that position; an answer's
            confidence is ``vesper_sdk.model.answer_confidence`` of its tokens'.
        answer_confidence: that answer confidence over the row's tokens so far, this one
            included (on a row's last token: the whole answer's), as the engine pools it
            with the model's answer check, if it has one.
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
    answer_logit: float = 0.0
    answer_confidence: float = 0.5


@dataclass
class PromptLogprobs:
    """A request's prompt scored by the model (``SamplingParams.prompt_logprobs``).

    Per prompt token: ``logprobs`` its log-probability given the tokens before it (None
    for the first, which nothing predicts) and ``top`` the ``[(id, logprob), ...]`` most
    likely there (None for the first). Streamed before the request's first token.
    """

    ids: list[int]
    logprobs: list[float | None]
    top: list[list[tuple[int, float]] | None]


@dataclass
class GenerationRequest:
    """One prompt and its own :class:`SamplingParams`, for :meth:`LLM.stream_batch`.

    ``prompt`` is token ids (use ``tokenizer.encode(text, add_bos=True)`` or
    ``tokenizer.chat_prompt_ids(messages)``) or a string (encoded with BOS). To stop a
    request early from another thread, call :meth:`cancel` (or set ``cancelled``: a bool,
    a ``threading.Event`` or a zero-argument callable returning True): the loop drops the
    row before its next token and yields nothing more for it.
    """

    prompt: Sequence[int] | str
    params: SamplingParams = field(default_factory=SamplingParams)
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


# The model's per-position outputs a decoding step hands on, by name (an ONNX export's
# output names).
HEAD_OUTPUTS = ("logits", "confidence", "stop", "answer", "logsumexp")
# An export's output after them: the top-1 token's log-probability, i.e. a greedy token's
# own. The onnxruntime-genai loop reads it instead of copying the logits out each step.
TOP_LOGPROB = "top_logprob"


@dataclass
class StepOutput:
    """One forward step of a decoding backend."""

    logits: torch.Tensor  # [B,S,V] float32
    confidence: torch.Tensor  # [B,S] MetaHead probability that the top-1 is right
    stop: torch.Tensor  # [B,S] probability that the response ends here
    past_key_values: Any  # the backend's own cache object, passed back unchanged
    answer: torch.Tensor  # [B,S] MetaHead answer logit (pooled by answer_confidence)
    # [B,S] the logits' log-sum-exp (a token's log-probability is its logit minus it), when
    # the model computed it; else the decoding loop takes the log-softmax itself.
    logsumexp: torch.Tensor | None = None

    def select_rows(self, index: torch.Tensor, past: Any) -> StepOutput:
        """The rows in ``index`` of this step, with ``past`` (the cache kept to them)."""
        return StepOutput(self.logits.index_select(0, index),
                          self.confidence.index_select(0, index),
                          self.stop.index_select(0, index), past,
                          self.answer.index_select(0, index),
                          None if self.logsumexp is None
                          else self.logsumexp.index_select(0, index))

    @classmethod
    def from_heads(cls, heads: Sequence[Any], past: Any) -> StepOutput:
        """A step from its :data:`HEAD_OUTPUTS` (arrays or tensors) in that order, as
        many as the graph has. Three (an ONNX export made before the answer row): the
        answer logit is then the confidence logit, what an unfitted answer row gives; four:
        no log-sum-exp (an export from before it, or a model without logit features)."""
        t = [h if isinstance(h, torch.Tensor) else torch.from_numpy(h) for h in heads]
        if len(t) == 3:
            t.append(torch.logit(t[1].double()).to(t[1].dtype))
        logits, confidence, stop, answer, *rest = t
        return cls(logits, confidence, stop, past, answer, rest[0] if rest else None)


class DecodeBackend(Protocol):
    """What the decoding loop needs from a model: PyTorch, quantized or ONNX Runtime.

    Optional extras: ``reorder_cache(past, index) -> past | None`` keeping only the batch
    rows in ``index`` (a LongTensor); with it, rows that finish early stop costing compute.
    ``reserve(positions)``: the positions per row the next prefill's rows will reach, for
    a backend that sizes its cache once.
    ``host_threads``: how many threads torch may use for the host-side work between steps
    (sampling), for a backend whose own threads need the cores (None: torch's setting).
    """

    vocab_size: int
    max_seq_len: int
    device: torch.device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor, past_key_values: Any) -> StepOutput:
        """input_ids/position_ids [B,S], attention_mask [B,past+S]; past None at prefill."""
        ...


@contextlib.contextmanager
def host_scope(backend: DecodeBackend) -> Iterator[None]:
    """Inference mode, with torch's threads capped at the backend's ``host_threads`` (and
    put back after, so code between a generator's steps keeps the caller's setting)."""
    cap, before = getattr(backend, "host_threads", None), torch.get_num_threads()
    with torch.inference_mode():
        if cap is None or cap >= before:
            yield
            return
        torch.set_num_threads(cap)
        try:
            yield
        finally:
            torch.set_num_threads(before)
