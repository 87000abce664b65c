"""The OpenAI protocol: request bodies, their checks, and the shape of the answers.

Each request model turns into :class:`~vesper_sdk.inference.SamplingParams` with
``to_sampling_params``; nothing here knows the app, its routes or the scheduler. A request
that sets no ``temperature`` samples at ``DEFAULT_TEMPERATURE`` (0.8), as the Python API,
``vesper generate`` and the demo do.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..eval.regulator import MetacognitiveRegulator
from ..inference import DEFAULT_TEMPERATURE, PromptLogprobs, SamplingParams, Token

MAX_CHOICES = 16  # n (or prompts x n) per request: bounds what one client can enqueue
MAX_STOP_SEQUENCES = 4  # as OpenAI


# ----------------------------------------------------------------------------- errors
class APIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code = param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    @property
    def headers(self) -> dict[str, str] | None:
        return {"WWW-Authenticate": "Bearer"} if self.status == 401 else None


_UNION_TAGS = {"str", "int", "float", "bool", "none", "dict", "list"}


def validation_error(errors: Sequence[dict[str, Any]]) -> APIError:
    """Pydantic's list of problems (FastAPI's 422) -> one 400 naming the first bad field."""
    if not errors:
        return APIError(400, "invalid request body")
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    if err.get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON: "
                        f"{err.get('ctx', {}).get('error', err.get('msg'))}",
                        code="invalid_json")
    # Drop pydantic's union branch names (e.g. 'str', 'list[int]') from the field path.
    param = ".".join(p for p in loc if p not in _UNION_TAGS and "[" not in p)
    msg = err.get("msg", "invalid value")
    if err.get("type") == "missing":
        return APIError(400, f"'{param}' is a required field", param=param or None,
                        code="missing_required_parameter")
    if len(errors) > 1 and all(e.get("loc", ())[:len(err["loc"]) - 1] == err["loc"][:-1]
                               for e in errors):
        msg = "; ".join(sorted({e.get("msg", "") for e in errors}))  # union: all branches
    return APIError(400, f"invalid value for '{param or 'body'}': {msg}",
                    param=param or None, code="invalid_value")


# ----------------------------------------------------------------------------- request bodies
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes
MAX_LOGIT_BIAS = 300  # entries: bounds the work one request can ask for


def check_text(value: Any, param: str) -> None:
    """400 for a string that is not valid Unicode (a lone surrogate such as "\\ud800" is
    valid JSON but cannot be encoded, so it would fail deep in tokenization)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise APIError(400, f"'{param}' is not valid Unicode (a lone surrogate at "
                           f"character {exc.start}): send UTF-8 text", param=param,
                           code="invalid_value") from None
    elif isinstance(value, list | tuple):
        for v in value:
            check_text(v, param)
    elif isinstance(value, dict):
        for k, v in value.items():
            check_text(k, param)
            check_text(v, param)
    elif isinstance(value, BaseModel):
        for name, v in value:
            check_text(v, f"{param}.{name}")


class _Body(BaseModel):
    # strict: a string where a number belongs is an error, not silently converted; extra
    # fields are accepted (OpenAI clients send some we do not use, e.g. 'user').
    model_config = ConfigDict(strict=True, extra="allow")

    def check(self) -> None:
        """400 for text that is not valid Unicode, anywhere in the body."""
        for name, value in self:
            check_text(value, name)
        for name, value in (self.model_extra or {}).items():
            check_text(value, name)


class StreamOptions(_Body):
    include_usage: bool = False


class RegulatorParams(_Body):
    """Per-request settings of the metacognitive regulator (extension field ``regulator``)."""

    model_config = ConfigDict(strict=True, extra="forbid")  # a typo must not pass silently

    threshold: float = Field(0.85, ge=0.0, le=1.0)
    retries: int = Field(0, ge=0, le=3)
    conservative_temperature: float = Field(0.0, ge=0.0, le=2.0)
    stop_threshold: float = Field(0.5, ge=0.0, le=1.0)
    satisfice: bool = True
    abstain_below: float | None = Field(None, ge=0.0, le=1.0)


def regulator_for(value: bool | RegulatorParams | None, default: Any) -> Any:
    """The regulator of one request: the server's ``default`` unless the body sets one."""
    if value is None:
        return default
    if value is False:
        return None
    if value is True:
        return default or MetacognitiveRegulator()
    return MetacognitiveRegulator(**value.model_dump())


def stop_sequences(stop: str | list[str] | None) -> list[str]:
    """The ``stop`` field as a list, or a 400 when it holds too many."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_SEQUENCES:
        raise APIError(400, f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, "
                       f"got {len(stops)}", param="stop", code="invalid_value")
    return stops


def _unsupported(name: str, why: str) -> APIError:
    return APIError(400, f"'{name}' is not supported by this server: {why}", param=name,
                    code="unsupported_parameter")


class _Sampling(_Body):
    """The sampling fields both endpoints share: OpenAI's, vLLM's extras (``top_k``,
    ``min_p``, ``repetition_penalty``, ``ignore_eos``, ``min_tokens``) and ours
    (``regulator``). ``temperature`` defaults to ``DEFAULT_TEMPERATURE`` (0.8); 0 is
    greedy."""

    model: str
    temperature: float = Field(DEFAULT_TEMPERATURE, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    top_k: int = Field(0, ge=-1)  # vLLM: -1 or 0 = off
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    regulator: bool | RegulatorParams | None = None  # extension: see RegulatorParams

    def check_supported(self, vocab_size: int) -> None:
        """400 for what this server does not do (rather than silently ignoring it), and for
        invalid Unicode anywhere in the body."""
        self.check()
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise _unsupported("response_format", "structured output (JSON mode, JSON "
                               "schema) is not implemented; omit it or send {\"type\": "
                               "\"text\"}")
        if self.tools:
            raise _unsupported("tools", "tool calling is not implemented; omit 'tools'")
        extra = self.model_extra or {}
        for name in ("tool_choice", "functions", "function_call"):
            if extra.get(name) not in (None, "none", [], {}):
                raise _unsupported(name, "tool calling is not implemented")
        self.bias_ids(vocab_size)

    def bias_ids(self, vocab_size: int) -> dict[int, float] | None:
        """``logit_bias`` with token ids as ints (OpenAI sends them as strings), checked."""
        if not self.logit_bias:
            return None
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise APIError(400, f"logit_bias may hold at most {MAX_LOGIT_BIAS} tokens",
                           param="logit_bias", code="invalid_value")
        out = {}
        for key, bias in self.logit_bias.items():
            if not key.isdigit() or int(key) >= vocab_size or not -100 <= bias <= 100:
                raise APIError(400, f"logit_bias maps token ids (0..{vocab_size - 1}) to "
                               f"values in [-100, 100]; got {key!r}: {bias}",
                               param="logit_bias", code="invalid_value")
            out[int(key)] = float(bias)
        return out

    def sampling_params(self, max_new_tokens: int, regulator: Any, top_logprobs: int,
                        vocab_size: int, prompt_logprobs: int | None = None,
                        ) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=max_new_tokens, temperature=self.temperature, top_p=self.top_p,
            top_k=max(self.top_k, 0), min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            logit_bias=self.bias_ids(vocab_size), min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos, stop=stop_sequences(self.stop) or None,
            seed=self.seed, regulator=regulator_for(self.regulator, regulator),
            top_logprobs=top_logprobs, prompt_logprobs=prompt_logprobs)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    """Body of POST /v1/completions (OpenAI's legacy completions).

    ``echo`` returns the prompt before the completion, and with ``logprobs`` the prompt's
    own tokens scored (the first has none): what lm-evaluation-harness's loglikelihood
    tasks read. ``max_tokens`` may then be 0 (score the prompt only).
    """

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    def check_supported(self, vocab_size: int) -> None:
        super().check_supported(vocab_size)
        if self.best_of not in (None, 1):
            raise _unsupported("best_of", "use n")
        if self.suffix:
            raise _unsupported("suffix", "insertion is not implemented")
        if self.max_tokens == 0 and not self.echo:
            raise APIError(400, "max_tokens must be >= 1 (0 only with echo, to score the "
                           "prompt)", param="max_tokens", code="invalid_value")

    def to_sampling_params(self, max_new_tokens: int, regulator: Any = None,
                           vocab_size: int = 0) -> SamplingParams:
        """This request's sampling settings.

        ``max_new_tokens``: ``max_tokens`` once bounded by the context window (the server
        knows the prompt's length); ``regulator``: the server's default, used unless the
        body's ``regulator`` field says otherwise. Raises APIError (400) for too many stop
        sequences.
        """
        scored = self.logprobs if self.echo and self.logprobs is not None else None
        return self.sampling_params(max_new_tokens, regulator, self.logprobs or 0,
                                    vocab_size, prompt_logprobs=scored)

    @property
    def want_logprobs(self) -> bool:
        return self.logprobs is not None

    @property
    def default_max_tokens(self) -> int | None:
        """16 when the body leaves max_tokens out; an explicit null means "to the context"."""
        return 16 if "max_tokens" not in self.model_fields_set else None


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: str
    content: str | list[ContentPart] | None = None


class ChatRequest(_Sampling):
    """Body of POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def to_sampling_params(self, max_new_tokens: int, regulator: Any = None,
                           vocab_size: int = 0) -> SamplingParams:
        """This request's sampling settings: see ``CompletionRequest.to_sampling_params``."""
        return self.sampling_params(max_new_tokens, regulator,
                                    (self.top_logprobs or 0) if self.logprobs else 0,
                                    vocab_size)

    @property
    def want_logprobs(self) -> bool:
        return self.logprobs

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def chat_messages(self) -> list[dict[str, str]]:
        """The messages as the chat template takes them (text only), or a 400."""
        messages = []
        for i, msg in enumerate(self.messages):
            role = "system" if msg.role == "developer" else msg.role
            if role not in ("system", "user", "assistant"):
                raise APIError(400, f"messages[{i}].role {msg.role!r} is not supported: use "
                               "system, user or assistant", param=f"messages.{i}.role",
                               code="invalid_value")
            content = msg.content
            if content is None and role != "assistant":  # only assistant turns may omit it
                raise APIError(400, f"messages[{i}].content is required for role {role!r}",
                               param=f"messages.{i}.content",
                               code="missing_required_parameter")
            if isinstance(content, list):
                parts = []
                for j, part in enumerate(content):
                    if part.type != "text" or part.text is None:
                        raise APIError(400, f"messages[{i}].content[{j}] has type "
                                       f"{part.type!r}: only text parts are supported",
                                       param=f"messages.{i}.content.{j}",
                                       code="invalid_value")
                    parts.append(part.text)
                content = "".join(parts)
            messages.append({"role": role, "content": content or ""})
        return messages


# ----------------------------------------------------------------------------- answers
# Token.finish_reason (SDK) -> OpenAI's finish_reason.
_FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


@dataclass
class Choice:
    """What one choice has produced so far: tokens, text, finish reason."""

    index: int
    prompt_text: str
    tokens: list[Token] = field(default_factory=list)  # visible tokens (no EOS)
    prompt_scores: PromptLogprobs | None = None  # the prompt's own logprobs (echo)
    end_token: Token | None = None  # the end-of-sequence token, when one ended it
    echoed: bool = False  # the prompt was streamed back (echo)
    text: str = ""
    finish_reason: str | None = None
    end_regulated: str | None = None
    text_offsets: list[int] = field(default_factory=list)

    def add(self, token: Token) -> bool:
        """Record a token (its text is already cut at stop strings); True if it ends."""
        if getattr(token, "special", False):
            # The end-of-sequence token has no text; what the regulator did there ("stopped")
            # is reported once for the choice instead of as a token.
            self.end_regulated = token.regulated or None
            self.end_token = token
        else:
            self.text_offsets.append(len(self.prompt_text) + len(self.text))
            self.tokens.append(token)
            self.text += token.text
        if token.finish_reason:
            self.finish_reason = _FINISH.get(token.finish_reason, "stop")
            return True
        return False

    @property
    def generated(self) -> list[Token]:
        """Every generated token, the end-of-sequence one included (as vLLM reports them:
        a loglikelihood client counts one generated entry after the echoed prompt)."""
        return self.tokens + [self.end_token] if self.end_token else self.tokens

    @property
    def generated_offsets(self) -> list[int]:
        """``text_offset`` of each of :attr:`generated` (the end token's: the text's end)."""
        end = [len(self.prompt_text) + len(self.text)] if self.end_token else []
        return self.text_offsets + end

    def end(self) -> None:
        """The backend ended this generation without a finish reason (cancel, error)."""
        if self.finish_reason is None:
            self.finish_reason = "length"


def _token_str(tokenizer: Any, token: Token) -> str:
    """The token as OpenAI shows it: its text, or its raw bytes when not valid UTF-8 alone;
    a special token by its name (as in ``top_logprobs``)."""
    raw = tokenizer.token_bytes(token.id)
    if not raw:
        return _id_str(tokenizer, token.id, raw)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "".join(f"\\x{b:02x}" for b in raw) if not token.text else token.text


def _alternatives(tokenizer: Any, token: Token, k: int) -> list[tuple[str, float, bytes]]:
    """Up to k (token, logprob, bytes) alternatives at this position, most likely first."""
    out = []
    for tid, lp in list(getattr(token, "top_logprobs", None) or [])[:k]:
        raw = tokenizer.token_bytes(int(tid))
        text = (raw.decode("utf-8", errors="backslashreplace") if raw
                else tokenizer.decode([int(tid)], skip_special_tokens=False))
        out.append((text, float(lp), raw))
    return out


def vesper_fields(tokens: Sequence[Token], end_regulated: str | None = None,
                  answer: Sequence[Token] | None = None) -> dict[str, Any]:
    """The extension field: per token confidence, regulator flag (or null) and id; with
    ``answer`` (every generated token of a finished choice, the end token included), the
    MetaHead's ``answer_confidence``."""
    fields: dict[str, Any] = {
        "confidence": [round(float(t.confidence), 6) for t in tokens],
        "regulated": [getattr(t, "regulated", None) or None for t in tokens],
        "token_ids": [int(t.id) for t in tokens]}
    if end_regulated:
        fields["end_regulated"] = end_regulated
    if answer is not None:
        # The engine pools it as it goes (with the model's answer check): the last token's.
        fields["answer_confidence"] = round(
            float(getattr(answer[-1], "answer_confidence", 0.5)) if answer else 0.5, 6)
    return fields


def completion_logprobs(tokenizer: Any, tokens: Sequence[Token], offsets: Sequence[int],
                        k: int) -> dict[str, list]:
    return {
        "tokens": [_token_str(tokenizer, t) for t in tokens],
        "token_logprobs": [float(t.logprob) for t in tokens],
        "top_logprobs": [{a: lp for a, lp, _ in _alternatives(tokenizer, t, k)}
                         for t in tokens] if k else None,
        "text_offset": list(offsets),
    }


def prompt_logprobs_fields(tokenizer: Any, scores: PromptLogprobs, k: int
                           ) -> dict[str, list]:
    """The prompt's tokens in ``completion_logprobs``' shape (echo), offsets from 0.

    The first token's logprob and alternatives are null (nothing predicts it), as
    OpenAI's and vLLM's. The alternatives come from the same log-softmax as the token's own
    logprob, so a greedy token's logprob equals its top alternative's exactly.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    tokens, offsets, seen = [], [], 0
    for tid in scores.ids:
        offsets.append(seen)
        raw = tokenizer.token_bytes(tid)
        tokens.append(_id_str(tokenizer, tid, raw))
        seen += len(decoder.decode(raw))
    top = [None if alts is None else {_id_str(tokenizer, a, tokenizer.token_bytes(a)): lp
                                      for a, lp in alts[:k]} for alts in scores.top]
    return {"tokens": tokens, "token_logprobs": list(scores.logprobs),
            "top_logprobs": top if k else None, "text_offset": offsets}


def _id_str(tokenizer: Any, tid: int, raw: bytes) -> str:
    if not raw:  # a special token: its name
        return tokenizer.decode([tid], skip_special_tokens=False)
    return raw.decode("utf-8", errors="backslashreplace")


def chat_logprobs(tokenizer: Any, tokens: Sequence[Token], k: int) -> dict[str, list]:
    return {"content": [
        {"token": _token_str(tokenizer, t), "logprob": float(t.logprob),
         "bytes": list(tokenizer.token_bytes(t.id)),
         "top_logprobs": [{"token": a, "logprob": lp, "bytes": list(b)}
                          for a, lp, b in _alternatives(tokenizer, t, k)]}
        for t in tokens], "refusal": None}


def sse(payload: dict[str, Any] | str) -> str:
    """One server-sent event: a JSON payload, or the final ``[DONE]``."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"
