"""The OpenAI protocol: request bodies, their checks, and the shape of the answers.

Each request model turns into :class:`~vesper_sdk.inference.SamplingParams` with
``to_sampling_params``; nothing here knows the app, its routes or the scheduler. A request
that sets no ``temperature`` samples at ``DEFAULT_TEMPERATURE`` (0.8), as the Python API,
``vesper generate`` and the demo do.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from ..eval.regulator import MetacognitiveRegulator
from ..inference import DEFAULT_TEMPERATURE, SamplingParams, Token

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
# Fields accepted only at their neutral value: honouring a penalty or best_of by ignoring
# it would silently change what the client gets.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "best_of": (None, 1),
    "suffix": (None, ""), "echo": (False,)}


class _Body(BaseModel):
    # strict: a string where a number belongs is an error, not silently converted; extra
    # fields are accepted (OpenAI clients send some we do not use, e.g. 'user').
    model_config = ConfigDict(strict=True, extra="allow")

    unsupported: ClassVar[tuple[str, ...]] = ()

    def check_supported(self) -> None:
        """400 for a field this server does not implement, set to a non-neutral value."""
        for name in self.unsupported:
            if getattr(self, name, None) not in _NEUTRAL[name]:
                raise APIError(400, f"'{name}' is not supported by this server",
                               param=name, code="unsupported_parameter")


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


class CompletionRequest(_Body):
    """Body of POST /v1/completions (OpenAI's legacy completions).

    ``temperature`` defaults to ``DEFAULT_TEMPERATURE`` (0.8); 0 is greedy.
    """

    unsupported: ClassVar[tuple[str, ...]] = ("presence_penalty", "frequency_penalty",
                                              "best_of", "suffix", "echo")

    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    temperature: float = Field(DEFAULT_TEMPERATURE, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None
    regulator: bool | RegulatorParams | None = None  # extension: see RegulatorParams

    def to_sampling_params(self, max_new_tokens: int, regulator: Any = None
                           ) -> SamplingParams:
        """This request's sampling settings.

        ``max_new_tokens``: ``max_tokens`` once bounded by the context window (the server
        knows the prompt's length); ``regulator``: the server's default, used unless the
        body's ``regulator`` field says otherwise. Raises APIError (400) for too many stop
        sequences.
        """
        return SamplingParams(
            max_new_tokens=max_new_tokens, temperature=self.temperature, top_p=self.top_p,
            stop=stop_sequences(self.stop) or None, seed=self.seed,
            regulator=regulator_for(self.regulator, regulator),
            top_logprobs=self.logprobs or 0)

    @property
    def want_logprobs(self) -> bool:
        return self.logprobs is not None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

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


class ChatRequest(_Body):
    """Body of POST /v1/chat/completions.

    ``temperature`` defaults to ``DEFAULT_TEMPERATURE`` (0.8); 0 is greedy.
    """

    unsupported: ClassVar[tuple[str, ...]] = ("presence_penalty", "frequency_penalty")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(DEFAULT_TEMPERATURE, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    regulator: bool | RegulatorParams | None = None  # extension: see RegulatorParams

    def to_sampling_params(self, max_new_tokens: int, regulator: Any = None
                           ) -> SamplingParams:
        """This request's sampling settings: see ``CompletionRequest.to_sampling_params``."""
        return SamplingParams(
            max_new_tokens=max_new_tokens, temperature=self.temperature, top_p=self.top_p,
            stop=stop_sequences(self.stop) or None, seed=self.seed,
            regulator=regulator_for(self.regulator, regulator),
            top_logprobs=(self.top_logprobs or 0) if self.logprobs else 0)

    @property
    def want_logprobs(self) -> bool:
        return self.logprobs

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

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
        else:
            self.text_offsets.append(len(self.prompt_text) + len(self.text))
            self.tokens.append(token)
            self.text += token.text
        if token.finish_reason:
            self.finish_reason = _FINISH.get(token.finish_reason, "stop")
            return True
        return False

    def end(self) -> None:
        """The backend ended this generation without a finish reason (cancel, error)."""
        if self.finish_reason is None:
            self.finish_reason = "length"


def _token_str(tokenizer: Any, token: Token) -> str:
    """The token as OpenAI shows it: its text, or its raw bytes when not valid UTF-8 alone."""
    raw = tokenizer.token_bytes(token.id)
    try:
        return raw.decode("utf-8") if raw else token.text
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


def vesper_fields(tokens: Sequence[Token], end_regulated: str | None = None) -> dict[str, Any]:
    """The extension field: per token confidence, regulator flag (or null) and id."""
    fields: dict[str, Any] = {
        "confidence": [round(float(t.confidence), 6) for t in tokens],
        "regulated": [getattr(t, "regulated", None) or None for t in tokens],
        "token_ids": [int(t.id) for t in tokens]}
    if end_regulated:
        fields["end_regulated"] = end_regulated
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
