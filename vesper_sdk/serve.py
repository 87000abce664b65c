"""Serve a VesperLM model over the OpenAI HTTP API: ``vesper_sdk.serve`` and ``vesper serve``.

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``
(``stream: true`` sends OpenAI's server-sent-event chunks, ending with ``data: [DONE]``),
``GET /health`` and ``GET /metrics`` (Prometheus text format).

Every token carries its log-probability in OpenAI's ``logprobs`` shape (when asked for)
and, always, the MetaHead's confidence and the regulator's flag in a ``vesper`` extension
field: ``choices[i].vesper = {"confidence": [...], "regulated": [...], "token_ids": [...]}``
with one entry per generated token (``regulated`` holds the regulator's flag, such as
``"conservative"``, or null); stream chunks carry the entries of their own tokens. The
end-of-sequence token is not a token of the answer: when the regulator ended the answer
there, ``vesper.end_regulated`` says so (``"stopped"``). The regulator is off unless the
server turns it on (``--regulator``) or the body asks: ``"regulator": true`` or
``{"threshold": 0.8, "retries": 1, ...}`` (the openai client's ``extra_body``).

Requests that arrive together are decoded together: one worker thread takes every
request waiting in the queue and decodes them as one batch through ``LLM.stream_batch``;
requests that arrive meanwhile form the next batch. Each request has its own sampling
parameters and a cancel flag, set when its client disconnects or its time runs out, and
checked by the decoding loop.

Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: bad JSON,
wrong field types and out-of-range values are 400 (never FastAPI's 422), an unknown model
is 404, a missing or wrong API key 401, a full queue 503, a request past its time 504.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from vesper_sdk._callable import make_module_callable

log = logging.getLogger("vesper_sdk.serve")

API_KEY_ENV = "VESPER_API_KEY"
MAX_CHOICES = 16  # n (or prompts x n) per request: bounds what one client can enqueue
MAX_STOP_SEQUENCES = 4  # as OpenAI
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is there


# ----------------------------------------------------------------------------- options
@dataclass
class ServeOptions:
    """Serve a model folder over the OpenAI HTTP API on http://HOST:PORT/v1.

    The folder may be a PyTorch model, a bitsandbytes-quantized one or an ONNX export.
    Binding to anything but loopback needs an API key (--api-key or $VESPER_API_KEY);
    clients then send it as "Authorization: Bearer KEY".
    """

    model_dir: str = field(metadata={
        "help": "model folder: config.json + model.safetensors + tokenizer.json, a "
                "quantized folder, or an exported ONNX folder (model.onnx)",
        "positional": True})
    host: str = field(default="127.0.0.1", metadata={
        "help": "address to bind; anything but loopback requires --api-key"})
    port: int = field(default=8000, metadata={"help": "TCP port"})
    api_key: str | None = field(default=None, metadata={
        "help": f"require 'Authorization: Bearer KEY' on /v1 and /metrics (or set "
                f"${API_KEY_ENV}, which keeps the key out of the process list)"})
    model_name: str | None = field(default=None, metadata={
        "help": "model id clients pass as 'model' (default: the folder's name)"})
    device: str = field(default="auto", metadata={
        "help": "auto (CUDA when present), cpu, cuda or cuda:N"})
    dtype: str = field(default="auto", metadata={
        "help": "weights dtype for PyTorch folders: auto (bf16 on GPU, fp32 on CPU), fp32, "
                "bf16 or fp16", "choices": ["auto", "fp32", "bf16", "fp16"]})
    max_batch_size: int = field(default=32, metadata={
        "help": "most requests decoded together in one batch"})
    max_queue: int = field(default=256, metadata={
        "help": "most requests waiting for a batch; beyond it requests get HTTP 503"})
    request_timeout: float = field(default=300.0, metadata={
        "help": "seconds a request may take, queueing included (0 = no limit); past it the "
                "generation is cancelled and the client gets HTTP 504 (or an error event)"})
    regulator: bool = field(default=False, metadata={
        "help": "apply the metacognitive regulator to every request that does not set its "
                "own 'regulator' field (conservative decoding under --threshold, "
                "satisficing stop)"})
    threshold: float = field(default=0.85, metadata={"help": "the regulator's threshold"})
    retries: int = field(default=0, metadata={
        "help": "regenerate a low-confidence answer up to N times (implies --regulator)"})
    log_level: str = field(default="info", metadata={
        "help": "uvicorn log level", "choices": ["critical", "error", "warning", "info",
                                                 "debug"]})
    compile: bool | None = field(default=None, metadata={
        "help": "torch.compile the decode step: the first batches wait tens of seconds for "
                "the compiler, later ones decode faster (default: on with CUDA, off on the "
                "CPU, where it needs a C++ compiler and gains ~1.2x; no effect on ONNX "
                "folders)"})


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

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


_UNION_TAGS = {"str", "int", "float", "bool", "none", "dict", "list"}


def _validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI's 422 list of problems -> one 400 that names the first offending field."""
    errors = exc.errors()
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
class _Body(BaseModel):
    # strict: a string where a number belongs is an error, not silently converted; extra
    # fields are accepted (OpenAI clients send some we do not use, e.g. 'user').
    model_config = ConfigDict(strict=True, extra="allow")


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


class CompletionRequest(_Body):
    """Body of POST /v1/completions (OpenAI's legacy completions)."""

    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
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


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: str
    content: str | list[ContentPart] | None = None


class ChatRequest(_Body):
    """Body of POST /v1/chat/completions."""

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
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


# ----------------------------------------------------------------------------- backends
def load_backend(model_dir: str | Path, device: str = "auto", dtype: str = "auto",
                 compile: bool | None = False) -> Any:
    """Open a model folder as an LLM: PyTorch (fp32/bf16/bnb-quantized) or ONNX Runtime.

    A folder holding ``model.onnx`` is an ONNX export and runs on
    ``vesper_sdk.export.OnnxModel``; any other folder goes through ``vesper_sdk.load``
    (which rebuilds bitsandbytes int8/nf4 layers when config.json says so). ``dtype='auto'``
    uses bf16 on a GPU and fp32 on the CPU, where bf16 matmuls are slow. ``compile=None``
    compiles the decode step on CUDA only.
    """
    import torch

    from .generate import load, resolve_device

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(
            f"{model_dir} is not a folder: pass a model folder (config.json, "
            "model.safetensors, tokenizer.json) or an exported ONNX folder")
    if (model_dir / "model.onnx").is_file():
        try:
            from .export import OnnxModel
        except ImportError as exc:
            raise RuntimeError(
                f"{model_dir} is an ONNX export but ONNX Runtime support is unavailable "
                f"({exc}): pip install 'vesper-sdk[export]'") from None
        return OnnxModel(model_dir)
    dev = resolve_device(device)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if dev.type == "cuda" else None
    elif dtype in dtypes:
        torch_dtype = dtypes[dtype]
    else:
        raise ValueError(f"dtype must be auto, fp32, bf16 or fp16, got {dtype!r}")
    quantized = False
    with contextlib.suppress(OSError, json.JSONDecodeError, AttributeError):
        quantized = bool(json.loads((model_dir / "config.json").read_text()).get("quantization"))
    # Quantized layers fix their own compute dtype; casting them would undo the quantization.
    return load(model_dir, device=dev, dtype=None if quantized else torch_dtype,
                compile=dev.type == "cuda" if compile is None else compile)


def context_window(llm: Any) -> int:
    """The model's context length in tokens (PyTorch LLM, or any backend exposing it)."""
    for owner in (llm, getattr(llm, "config", None), getattr(llm, "backend", None)):
        value = getattr(owner, "max_seq_len", None) if owner is not None else None
        if isinstance(value, int) and value > 0:
            return value
    raise AttributeError(f"{type(llm).__name__} exposes no max_seq_len (context window)")


def _new_generation_request(prompt_ids: list[int], max_new_tokens: int, temperature: float,
                            top_p: float, seed: int | None, top_logprobs: int,
                            stop: Sequence[str] = (), regulator: Any = None) -> Any:
    """A ``GenerationRequest`` for ``LLM.stream_batch`` with this request's own parameters."""
    from .generate import GenerationRequest

    return GenerationRequest(prompt=list(prompt_ids), max_new_tokens=max_new_tokens,
                             temperature=temperature, top_p=top_p, seed=seed,
                             top_logprobs=top_logprobs, stop=list(stop) or None,
                             regulator=regulator, cancelled=threading.Event())


# ----------------------------------------------------------------------------- metrics
class Metrics:
    """Counters for ``GET /metrics``, written by hand in Prometheus' text format (0.0.4)."""

    ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health",
                 "/metrics")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.duration_sum: dict[str, float] = {}
        self.duration_count: dict[str, int] = {}
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.ttft_sum = 0.0
        self.ttft_count = 0
        self.batches = 0
        self.batched_generations = 0
        self.cancelled: dict[str, int] = {}

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        endpoint = path if path in self.ENDPOINTS else (
            "/v1/models" if path.startswith("/v1/models/") else "other")
        with self._lock:
            key = (endpoint, status)
            self.requests[key] = self.requests.get(key, 0) + 1
            self.duration_sum[endpoint] = self.duration_sum.get(endpoint, 0.0) + seconds
            self.duration_count[endpoint] = self.duration_count.get(endpoint, 0) + 1

    def add(self, name: str, value: float = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + value)

    def add_cancelled(self, reason: str) -> None:
        with self._lock:
            self.cancelled[reason] = self.cancelled.get(reason, 0) + 1

    def render(self, queue_size: int, active: int) -> str:
        with self._lock:
            out: list[str] = []

            def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]
                       ) -> None:
                out.append(f"# HELP {name} {help_}")
                out.append(f"# TYPE {name} {kind}")
                for labels, value in samples:
                    out.append(f"{name}{labels} {_prom_number(value)}")

            metric("vesper_requests_total", "counter", "HTTP requests by endpoint and status.",
                   [(f'{{endpoint="{e}",status="{s}"}}', n)
                    for (e, s), n in sorted(self.requests.items())])
            out.append("# HELP vesper_request_duration_seconds Time from request to last "
                       "byte, by endpoint.")
            out.append("# TYPE vesper_request_duration_seconds summary")
            for e in sorted(self.duration_count):
                out.append(f'vesper_request_duration_seconds_sum{{endpoint="{e}"}} '
                           f"{_prom_number(self.duration_sum[e])}")
                out.append(f'vesper_request_duration_seconds_count{{endpoint="{e}"}} '
                           f"{self.duration_count[e]}")
            metric("vesper_prompt_tokens_total", "counter", "Prompt tokens processed.",
                   [("", self.prompt_tokens)])
            metric("vesper_generated_tokens_total", "counter", "Tokens generated.",
                   [("", self.generated_tokens)])
            out.append("# HELP vesper_time_to_first_token_seconds Time from request to its "
                       "first generated token.")
            out.append("# TYPE vesper_time_to_first_token_seconds summary")
            out.append(f"vesper_time_to_first_token_seconds_sum {_prom_number(self.ttft_sum)}")
            out.append(f"vesper_time_to_first_token_seconds_count {self.ttft_count}")
            metric("vesper_batches_total", "counter", "Decode batches run.",
                   [("", self.batches)])
            metric("vesper_batched_generations_total", "counter",
                   "Generations decoded, summed over batches (divided by "
                   "vesper_batches_total: the mean batch size).",
                   [("", self.batched_generations)])
            metric("vesper_cancelled_generations_total", "counter",
                   "Generations cancelled before their end, by reason.",
                   [(f'{{reason="{r}"}}', n) for r, n in sorted(self.cancelled.items())])
            metric("vesper_queue_size", "gauge", "Generations waiting for a batch.",
                   [("", queue_size)])
            metric("vesper_active_generations", "gauge", "Generations in the running batch.",
                   [("", active)])
            return "\n".join(out) + "\n"


def _prom_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class _MetricsMiddleware:
    """Pure ASGI middleware timing each request to its last byte and counting its status.

    Pure ASGI rather than ``@app.middleware('http')``: BaseHTTPMiddleware wraps the
    response stream and gets in the way of streaming and of disconnect detection.
    """

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.observe_request(scope.get("path", ""), status,
                                         time.perf_counter() - start)


# ----------------------------------------------------------------------------- batching
class _Done:
    """End-of-generation marker pushed after a job's last token."""


DONE = _Done()


@dataclass
class _Job:
    """One generation (one choice of one HTTP request) waiting for, or in, a batch."""

    request: Any  # GenerationRequest
    push: Callable[[Any], None]  # thread-safe: Token, DONE or an Exception
    prompt_len: int
    max_tokens: int
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: bool = False

    def cancel(self) -> None:
        """Raise the cancel flag; the decode loop drops the row before its next token."""
        self.cancelled.set()
        self.request.cancel()


class BatchScheduler:
    """One worker thread that decodes every waiting request together as one batch.

    ``submit`` enqueues jobs; the worker waits for the first, takes whatever else is
    waiting (up to ``max_batch_size``) and runs ``llm.stream_batch`` over the lot,
    routing each ``(index, token)`` back to the job at that index. Requests that arrive
    during a batch wait for the next one. Only this thread touches the model, so the
    backend needs no locking.

    A batch is left-padded to its longest prompt, and ``stream_batch`` caps every row at
    ``context - longest prompt`` new tokens; so a job joins a batch only if the batch's
    longest prompt plus its largest ``max_tokens`` still fits the context window, else it
    waits (first in line) for the next batch. No request is ever cut short by another.
    """

    def __init__(self, llm: Any, metrics: Metrics, max_batch_size: int = 32,
                 max_queue: int = 256) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.llm, self.metrics = llm, metrics
        self.context = context_window(llm)
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self._waiting: collections.deque[_Job] = collections.deque()
        self._cond = threading.Condition()
        self._active: list[_Job] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def queue_size(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return sum(not j.finished for j in list(self._active))

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        with self._cond:
            if self.alive:
                return
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="vesper-batcher",
                                            daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel everything queued or running and wait for the worker to exit."""
        self._stop.set()
        with self._cond:
            waiting, self._waiting = list(self._waiting), collections.deque()
            self._cond.notify_all()
        for job in [*waiting, *self._active]:
            job.cancel()
        for job in waiting:
            job.finished = True
            job.push(DONE)
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, jobs: Sequence[_Job]) -> None:
        """Queue a request's jobs together (so they land in the same batch when possible)."""
        self.start()
        with self._cond:
            if len(self._waiting) + len(jobs) > self.max_queue:
                raise APIError(503, f"the server is busy: {len(self._waiting)} generations "
                               "are waiting; retry shortly", type="server_error",
                               code="server_overloaded")
            self._waiting.extend(jobs)
            self._cond.notify()

    def _take_batch(self) -> list[_Job]:
        with self._cond:
            if not self._waiting:
                self._cond.wait(0.1)
            batch: list[_Job] = []
            later: collections.deque[_Job] = collections.deque()
            longest_prompt = most_tokens = 0
            for job in self._waiting:
                if job.cancelled.is_set():
                    # Cancelled while queued (client gone, timed out): answered, not decoded.
                    job.finished = True
                    job.push(DONE)
                    continue
                p = max(longest_prompt, job.prompt_len)
                t = max(most_tokens, job.max_tokens)
                if len(batch) >= self.max_batch_size or (batch and p + t > self.context):
                    later.append(job)
                    continue
                batch.append(job)
                longest_prompt, most_tokens = p, t
            self._waiting = later
            self._active = batch
            return batch

    @property
    def healthy(self) -> bool:
        """Not stopped, and the worker (once started) is still running."""
        return not self._stop.is_set() and (self._thread is None or self._thread.is_alive())

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = self._take_batch()
            if batch:
                self._decode(batch)

    def _decode(self, batch: list[_Job]) -> None:
        self.metrics.add("batches")
        self.metrics.add("batched_generations", len(batch))
        stream: Any = None
        try:
            stream = self.llm.stream_batch([job.request for job in batch])
            for index, token in stream:
                job = batch[index]
                if job.finished:
                    continue
                self.metrics.add("generated_tokens")
                job.push(token)
                if getattr(token, "finish_reason", None):
                    # The row is over: answer its request now, not when the batch ends.
                    job.finished = True
                    job.push(DONE)
                # The loop checks each cancel flag itself; this is the backstop that ends
                # the batch at once when nobody is left to read it.
                if all(j.cancelled.is_set() or j.finished for j in batch):
                    break
        except Exception as exc:  # the batch failed: every job still in it gets the error
            log.exception("decode batch of %d failed", len(batch))
            for job in batch:
                if not job.finished:
                    job.push(exc)
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):  # the worker must outlive any batch
                    close()
            for job in batch:
                if not job.finished:
                    job.finished = True
                    job.push(DONE)
            self._active = []


# ----------------------------------------------------------------------------- one choice
# Token.finish_reason (SDK) -> OpenAI's finish_reason.
_FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


@dataclass
class _Choice:
    """What one choice has produced so far: tokens, text, finish reason."""

    index: int
    job: _Job
    prompt_text: str
    tokens: list[Any] = field(default_factory=list)  # visible tokens (no EOS)
    text: str = ""
    finish_reason: str | None = None
    end_regulated: str | None = None
    text_offsets: list[int] = field(default_factory=list)

    def add(self, token: Any) -> bool:
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


# ----------------------------------------------------------------------------- the app
@dataclass
class _Prepared:
    """A validated request: prompts as token ids and the generation parameters."""

    prompts: list[list[int]]
    prompt_texts: list[str]
    max_tokens: list[int]
    n: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    regulator: Any
    top_logprobs: int
    want_logprobs: bool
    stream: bool
    include_usage: bool


class VesperServer:
    """The state behind one app: the model, its batcher, metrics and limits."""

    def __init__(self, llm: Any, model_name: str, api_key: str | None,
                 max_batch_size: int, max_queue: int, request_timeout: float,
                 regulator: Any = None) -> None:
        from .metacog import as_regulator

        self.llm = llm
        self.regulator = as_regulator(regulator)
        self.tokenizer = llm.tokenizer
        self.model_name = model_name
        self.api_key = api_key
        self.request_timeout = request_timeout
        self.context = context_window(llm)
        self.metrics = Metrics()
        self.scheduler = BatchScheduler(llm, self.metrics, max_batch_size, max_queue)
        self.created = int(time.time())

    # --- checks ------------------------------------------------------------------
    def check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            raise APIError(401, "missing API key: send 'Authorization: Bearer KEY'",
                           code="invalid_api_key")
        # compare_digest: no timing side channel on how much of the key matched.
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "incorrect API key provided", code="invalid_api_key")

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"the model '{name}' does not exist; this server serves "
                           f"'{self.model_name}' (see GET /v1/models)", param="model",
                           code="model_not_found")

    def _bounded(self, prompt_len: int, max_tokens: int | None, default: int | None,
                 what: str) -> int:
        """max_tokens within the context window, or a 400 that says what to shorten."""
        room = self.context - prompt_len
        if room < 1:
            raise APIError(400, f"this model's maximum context length is {self.context} "
                           f"tokens, but the {what} alone takes {prompt_len}: shorten it",
                           param=what, code="context_length_exceeded")
        if max_tokens is None:
            return room if default is None else min(default, room)
        if max_tokens > room:
            raise APIError(400, f"this model's maximum context length is {self.context} "
                           f"tokens; you asked for {prompt_len + max_tokens} ({prompt_len} in "
                           f"the {what}, {max_tokens} in the completion): reduce max_tokens "
                           f"to at most {room} or shorten the {what}",
                           param="max_tokens", code="context_length_exceeded")
        return max_tokens

    def _regulator(self, value: bool | RegulatorParams | None) -> Any:
        """The regulator for one request: the server's default unless the body says."""
        if value is None:
            return self.regulator
        if value is False:
            return None
        from .metacog import MetacognitiveRegulator

        if value is True:
            return self.regulator or MetacognitiveRegulator()
        return MetacognitiveRegulator(**value.model_dump())

    @staticmethod
    def _stops(stop: str | list[str] | None) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise APIError(400, f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, "
                           f"got {len(stops)}", param="stop", code="invalid_value")
        return stops

    # Fields we accept only at their neutral value: honouring a penalty or best_of by
    # ignoring it would silently change what the client gets.
    _NEUTRAL: dict[str, tuple[Any, ...]] = {
        "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "best_of": (None, 1),
        "suffix": (None, ""), "echo": (False,)}

    @classmethod
    def _unsupported(cls, body: _Body, names: Sequence[str]) -> None:
        for name in names:
            if getattr(body, name, None) not in cls._NEUTRAL[name]:
                raise APIError(400, f"'{name}' is not supported by this server",
                               param=name, code="unsupported_parameter")

    # --- preparing ----------------------------------------------------------------
    def prepare_completion(self, body: CompletionRequest) -> _Prepared:
        self.check_model(body.model)
        self._unsupported(body, ("presence_penalty", "frequency_penalty", "best_of",
                                 "suffix", "echo"))
        p = body.prompt
        if isinstance(p, str):
            raw: list[str | list[int]] = [p]
        elif not p:
            raise APIError(400, "'prompt' must not be empty", param="prompt",
                           code="invalid_value")
        elif isinstance(p[0], int):
            raw = [list(p)]  # type: ignore[arg-type]
        else:
            raw = list(p)  # type: ignore[arg-type]
        if len(raw) * body.n > MAX_CHOICES:
            raise APIError(400, f"prompts x n must be at most {MAX_CHOICES}, got "
                           f"{len(raw) * body.n}", param="n", code="invalid_value")
        vocab = self.tokenizer.vocab_size
        prompts, texts, limits = [], [], []
        for item in raw:
            if isinstance(item, str):
                ids = [self.tokenizer.bos_id, *self.tokenizer.encode(item)]
                text = item
            else:
                if not item or any(not 0 <= t < vocab for t in item):
                    raise APIError(400, f"token-id prompts must be non-empty lists of ids in "
                                   f"[0, {vocab})", param="prompt", code="invalid_value")
                ids, text = list(item), self.tokenizer.decode(item)
            prompts.append(ids)
            texts.append(text)
            limits.append(self._bounded(len(ids), body.max_tokens,
                                        16 if "max_tokens" not in body.model_fields_set
                                        else None, "prompt"))
        return _Prepared(
            prompts=prompts, prompt_texts=texts, max_tokens=limits, n=body.n,
            temperature=body.temperature, top_p=body.top_p, seed=body.seed,
            stop=self._stops(body.stop), regulator=self._regulator(body.regulator),
            top_logprobs=body.logprobs or 0,
            want_logprobs=body.logprobs is not None, stream=body.stream,
            include_usage=bool(body.stream_options and body.stream_options.include_usage))

    def prepare_chat(self, body: ChatRequest) -> _Prepared:
        self.check_model(body.model)
        self._unsupported(body, ("presence_penalty", "frequency_penalty"))
        messages = []
        for i, msg in enumerate(body.messages):
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
        ids = self.tokenizer.chat_prompt_ids(messages)
        requested = body.max_completion_tokens or body.max_tokens
        limit = self._bounded(len(ids), requested, None, "messages")
        return _Prepared(
            prompts=[ids], prompt_texts=[""], max_tokens=[limit], n=body.n,
            temperature=body.temperature, top_p=body.top_p, seed=body.seed,
            stop=self._stops(body.stop), regulator=self._regulator(body.regulator),
            top_logprobs=(body.top_logprobs or 0) if body.logprobs else 0,
            want_logprobs=body.logprobs, stream=body.stream,
            include_usage=bool(body.stream_options and body.stream_options.include_usage))

    # --- running --------------------------------------------------------------------
    def start(self, prep: _Prepared) -> _Run:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        choices: list[_Choice] = []
        for p, (ids, text, limit) in enumerate(zip(prep.prompts, prep.prompt_texts,
                                                   prep.max_tokens, strict=True)):
            for k in range(prep.n):
                index = p * prep.n + k
                # Distinct seeds for the n samples of one prompt, so they can differ.
                seed = None if prep.seed is None else prep.seed + k
                request = _new_generation_request(ids, limit, prep.temperature, prep.top_p,
                                                  seed, prep.top_logprobs, prep.stop,
                                                  prep.regulator)
                job = _Job(request, _threadsafe_push(loop, events, index), len(ids), limit)
                choices.append(_Choice(index, job, text))
        self.scheduler.submit([c.job for c in choices])
        self.metrics.add("prompt_tokens", sum(len(ids) for ids in prep.prompts) * prep.n)
        return _Run(self, choices, events)


def _threadsafe_push(loop: asyncio.AbstractEventLoop, events: asyncio.Queue,
                     index: int) -> Callable[[Any], None]:
    def push(item: Any) -> None:
        # The worker thread may outlive the request's loop at shutdown: drop, don't crash.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(events.put_nowait, (index, item))
    return push


class _ClientGone(Exception):
    """The client of a non-streaming request disconnected; nobody reads the answer."""


class _Run:
    """The choices of one HTTP request while they generate, read from the event loop."""

    def __init__(self, server: VesperServer, choices: list[_Choice],
                 events: asyncio.Queue) -> None:
        self.server, self.choices, self.events = server, choices, events
        self.started = time.perf_counter()
        self.deadline = (self.started + server.request_timeout
                         if server.request_timeout > 0 else None)
        self.first_token_seen = False

    def cancel(self, reason: str) -> None:
        """Stop every unfinished choice (client gone, timeout, server error)."""
        n = 0
        for c in self.choices:
            if not c.job.finished and not c.job.cancelled.is_set():
                c.job.cancel()
                n += 1
        if n:
            self.server.metrics.add_cancelled(reason)

    async def events_until_done(self, request: Request, poll_disconnect: bool
                                ) -> AsyncIterator[tuple[_Choice, Any]]:
        """Yield (choice, Token | DONE | Exception) until every choice has ended.

        Raises APIError(504) past the deadline. With ``poll_disconnect`` it checks for a
        client disconnect between events and raises _ClientGone: a non-streaming request
        has no other way to notice one (a streaming response is cancelled by Starlette,
        which listens for the disconnect itself, so it must not poll as well).
        """
        pending = {c.index for c in self.choices}
        by_index = {c.index: c for c in self.choices}
        next_poll = time.perf_counter() + DISCONNECT_POLL_S
        while pending:
            # Time-gated, not only when idle: tokens may keep arriving for a client that
            # has gone, and they must not hide its departure.
            if poll_disconnect and time.perf_counter() >= next_poll:
                next_poll = time.perf_counter() + DISCONNECT_POLL_S
                if await request.is_disconnected():
                    self.cancel("disconnect")
                    raise _ClientGone
            wait = DISCONNECT_POLL_S
            if self.deadline is not None:
                wait = min(wait, self.deadline - time.perf_counter())
                if wait <= 0:
                    self.cancel("timeout")
                    raise APIError(504, f"the request took longer than the server's "
                                   f"{self.server.request_timeout:g} s limit and was "
                                   "cancelled", type="timeout_error", code="timeout")
            try:
                index, item = await asyncio.wait_for(self.events.get(), wait)
            except asyncio.TimeoutError:
                continue
            choice = by_index[index]
            if index not in pending:
                continue
            if item is DONE:
                pending.discard(index)
            elif not isinstance(item, Exception):
                if not self.first_token_seen:
                    self.first_token_seen = True
                    self.server.metrics.add("ttft_count")
                    self.server.metrics.add("ttft_sum", time.perf_counter() - self.started)
            yield choice, item

    def usage(self, prep: _Prepared) -> dict[str, int]:
        prompt = sum(len(ids) for ids in prep.prompts)
        completion = sum(len(c.tokens) for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}


# ----------------------------------------------------------------------------- shaping
def _token_str(tokenizer: Any, token: Any) -> str:
    """The token as OpenAI shows it: its text, or its raw bytes when not valid UTF-8 alone."""
    raw = tokenizer.token_bytes(token.id)
    try:
        return raw.decode("utf-8") if raw else token.text
    except UnicodeDecodeError:
        return "".join(f"\\x{b:02x}" for b in raw) if not token.text else token.text


def _alternatives(tokenizer: Any, token: Any, k: int) -> list[tuple[str, float, bytes]]:
    """Up to k (token, logprob, bytes) alternatives at this position, most likely first."""
    out = []
    for tid, lp in list(getattr(token, "top_logprobs", None) or [])[:k]:
        raw = tokenizer.token_bytes(int(tid))
        text = (raw.decode("utf-8", errors="backslashreplace") if raw
                else tokenizer.decode([int(tid)], skip_special_tokens=False))
        out.append((text, float(lp), raw))
    return out


def _vesper_fields(tokens: Sequence[Any], end_regulated: str | None = None) -> dict[str, Any]:
    """The extension field: per token confidence, regulator flag (or null) and id."""
    fields: dict[str, Any] = {
        "confidence": [round(float(t.confidence), 6) for t in tokens],
        "regulated": [getattr(t, "regulated", None) or None for t in tokens],
        "token_ids": [int(t.id) for t in tokens]}
    if end_regulated:
        fields["end_regulated"] = end_regulated
    return fields


def _completion_logprobs(tokenizer: Any, tokens: Sequence[Any], offsets: Sequence[int],
                         k: int) -> dict[str, list]:
    return {
        "tokens": [_token_str(tokenizer, t) for t in tokens],
        "token_logprobs": [float(t.logprob) for t in tokens],
        "top_logprobs": [{a: lp for a, lp, _ in _alternatives(tokenizer, t, k)}
                         for t in tokens] if k else None,
        "text_offset": list(offsets),
    }


def _chat_logprobs(tokenizer: Any, tokens: Sequence[Any], k: int) -> dict[str, list]:
    return {"content": [
        {"token": _token_str(tokenizer, t), "logprob": float(t.logprob),
         "bytes": list(tokenizer.token_bytes(t.id)),
         "top_logprobs": [{"token": a, "logprob": lp, "bytes": list(b)}
                          for a, lp, b in _alternatives(tokenizer, t, k)]}
        for t in tokens], "refusal": None}


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


# ----------------------------------------------------------------------------- create_app
def create_app(llm_or_dir: Any, *, api_key: str | None = None, model_name: str | None = None,
               max_batch_size: int = 32, max_queue: int = 256, request_timeout: float = 300.0,
               regulator: Any = None, device: str = "auto", dtype: str = "auto",
               compile: bool | None = False) -> FastAPI:
    """The FastAPI app serving one model (an LLM-like object or a model folder).

    ``llm_or_dir`` may be anything with ``tokenizer``, a context window (``max_seq_len``
    on itself or its ``config``) and ``stream_batch(requests)``: the PyTorch ``LLM``, an
    ``OnnxModel``, or a test double. ``regulator`` (a MetacognitiveRegulator, True for its
    defaults, or None) applies to requests that do not set the ``regulator`` field.
    """
    if isinstance(llm_or_dir, (str, Path)):
        model_dir: Path | None = Path(llm_or_dir)
        llm = load_backend(model_dir, device=device, dtype=dtype, compile=compile)
    else:
        llm = llm_or_dir
        model_dir = getattr(llm, "model_dir", None)
    if model_name is None:
        model_name = Path(model_dir).resolve().name if model_dir else "vesper"
    state = VesperServer(llm, model_name, api_key, max_batch_size, max_queue,
                         request_timeout, regulator)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.scheduler.start()
        yield
        # Give up on running generations at shutdown, off the loop (join blocks).
        await asyncio.get_running_loop().run_in_executor(None, state.scheduler.stop)

    app = FastAPI(title="VesperLM (OpenAI-compatible API)", lifespan=lifespan,
                  docs_url=None, redoc_url=None)  # the docs pages would fetch JS from a CDN
    app.state.vesper = state
    app.add_middleware(_MetricsMiddleware, metrics=state.metrics)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, str(exc.detail), code=kind).response()

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return APIError(500, f"internal server error: {type(exc).__name__}",
                        type="server_error", code="internal_error").response()

    auth = [Depends(state.check_auth)]

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = state.scheduler.healthy
        return JSONResponse({"status": "ok" if ok else "unavailable",
                             "model": state.model_name,
                             "queue_size": state.scheduler.queue_size,
                             "active": state.scheduler.active},
                            status_code=200 if ok else 503)

    @app.get("/metrics", dependencies=auth, response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(
            state.metrics.render(state.scheduler.queue_size, state.scheduler.active),
            media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card() -> dict[str, Any]:
        return {"id": state.model_name, "object": "model", "created": state.created,
                "owned_by": "vesper", "context_length": state.context}

    @app.get("/v1/models", dependencies=auth)
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", dependencies=auth)
    async def get_model(model_id: str) -> dict[str, Any]:
        state.check_model(model_id)
        return model_card()

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        prep = state.prepare_completion(body)
        run = state.start(prep)
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if prep.stream:
            return _streaming(run, request, _completion_chunks(state, run, prep, rid, created,
                                                               request))
        if not await _collect(run, request):
            return JSONResponse({}, status_code=499)  # client gone; nobody will read it
        choices = []
        for c in run.choices:
            choices.append({
                "index": c.index, "text": c.text, "finish_reason": c.finish_reason,
                "logprobs": _completion_logprobs(state.tokenizer, c.tokens, c.text_offsets,
                                                 prep.top_logprobs)
                if prep.want_logprobs else None,
                "vesper": _vesper_fields(c.tokens, c.end_regulated)})
        return {"id": rid, "object": "text_completion", "created": created,
                "model": state.model_name, "choices": choices, "usage": run.usage(prep)}

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        prep = state.prepare_chat(body)
        run = state.start(prep)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if prep.stream:
            return _streaming(run, request, _chat_chunks(state, run, prep, rid, created,
                                                         request))
        if not await _collect(run, request):
            return JSONResponse({}, status_code=499)
        choices = []
        for c in run.choices:
            choices.append({
                "index": c.index, "message": {"role": "assistant", "content": c.text},
                "finish_reason": c.finish_reason,
                "logprobs": _chat_logprobs(state.tokenizer, c.tokens, prep.top_logprobs)
                if prep.want_logprobs else None,
                "vesper": _vesper_fields(c.tokens, c.end_regulated)})
        return {"id": rid, "object": "chat.completion", "created": created,
                "model": state.model_name, "choices": choices, "usage": run.usage(prep)}

    return app


async def _collect(run: _Run, request: Request) -> bool:
    """Run a non-streaming request to its end; False if its client went away."""
    try:
        async for choice, item in run.events_until_done(request, poll_disconnect=True):
            if isinstance(item, Exception):
                raise APIError(500, f"generation failed: {item}", type="server_error",
                               code="generation_failed")
            if item is DONE:
                choice.end()
            else:
                choice.add(item)
    except _ClientGone:
        return False
    except BaseException:
        run.cancel("error")  # timeouts and disconnects have cancelled (and counted) already
        raise
    return True


def _streaming(run: _Run, request: Request, chunks: AsyncIterator[str]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            # Reached on normal end (no-op), and when Starlette cancels us because the
            # client went away: the generation stops with it.
            run.cancel("disconnect")

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _stream_events(run: _Run, request: Request
                         ) -> AsyncIterator[tuple[_Choice, str | None, Any, bool]]:
    """(choice, text to send, token or None, finished?) per event; errors become APIError."""
    async for choice, item in run.events_until_done(request, poll_disconnect=False):
        if isinstance(item, Exception):
            raise APIError(500, f"generation failed: {item}", type="server_error",
                           code="generation_failed")
        if item is DONE:
            if choice.finish_reason is None:  # no finishing token came (cancel, error)
                choice.end()
                yield choice, "", None, True
        else:
            finished = choice.add(item)
            visible = None if getattr(item, "special", False) else item
            yield choice, item.text, visible, finished


async def _completion_chunks(state: VesperServer, run: _Run, prep: _Prepared, rid: str,
                             created: int, request: Request) -> AsyncIterator[str]:
    def chunk(choice_payload: dict | None, usage: dict | None = None) -> str:
        return _sse({"id": rid, "object": "text_completion", "created": created,
                     "model": state.model_name,
                     "choices": [choice_payload] if choice_payload else [],
                     **({"usage": usage} if usage is not None else {})})

    try:
        async for choice, text, token, finished in _stream_events(run, request):
            tokens = [token] if token is not None else []
            offsets = choice.text_offsets[-1:] if token is not None else []
            if not tokens and not text and not finished:
                continue
            yield chunk({
                "index": choice.index, "text": text or "",
                "logprobs": _completion_logprobs(state.tokenizer, tokens, offsets,
                                                 prep.top_logprobs)
                if prep.want_logprobs and tokens else None,
                "finish_reason": choice.finish_reason if finished else None,
                "vesper": _vesper_fields(tokens, choice.end_regulated if finished else None)})
        if prep.include_usage:
            yield chunk(None, run.usage(prep))
    except APIError as exc:
        yield _sse(exc.body())
    yield _sse("[DONE]")


async def _chat_chunks(state: VesperServer, run: _Run, prep: _Prepared, rid: str,
                       created: int, request: Request) -> AsyncIterator[str]:
    def chunk(choice_payload: dict | None, usage: dict | None = None) -> str:
        return _sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                     "model": state.model_name,
                     "choices": [choice_payload] if choice_payload else [],
                     **({"usage": usage} if usage is not None else {})})

    # OpenAI opens each choice with a role-only delta.
    for c in run.choices:
        yield chunk({"index": c.index, "delta": {"role": "assistant", "content": ""},
                     "logprobs": None, "finish_reason": None})
    try:
        async for choice, text, token, finished in _stream_events(run, request):
            tokens = [token] if token is not None else []
            if tokens or text:
                yield chunk({
                    "index": choice.index, "delta": {"content": text or ""},
                    "logprobs": _chat_logprobs(state.tokenizer, tokens, prep.top_logprobs)
                    if prep.want_logprobs and tokens else None,
                    "finish_reason": None, "vesper": _vesper_fields(tokens)})
            if finished:
                end: dict[str, Any] = {"index": choice.index, "delta": {}, "logprobs": None,
                                       "finish_reason": choice.finish_reason}
                if choice.end_regulated:
                    end["vesper"] = _vesper_fields([], choice.end_regulated)
                yield chunk(end)
        if prep.include_usage:
            yield chunk(None, run.usage(prep))
    except APIError as exc:
        yield _sse(exc.body())
    yield _sse("[DONE]")


# ----------------------------------------------------------------------------- entry points
def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname: it may resolve to a public interface


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse to expose an unauthenticated server beyond this machine."""
    if not api_key and not is_loopback(host):
        raise ValueError(
            f"refusing to serve on {host} without an API key: anyone who can reach this "
            f"address could use the model. Pass --api-key KEY (or set ${API_KEY_ENV}), or "
            "bind to 127.0.0.1")


def check_port(host: str, port: int) -> None:
    """Refuse a port out of range, or one this host cannot listen on, before the model
    loads (uvicorn would report either only after it, with three tracebacks)."""
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range: pass --port between 1 and 65535")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
    except OSError as exc:
        raise ValueError(f"cannot resolve --host {host} ({exc.strerror or exc}): pass an "
                         "address such as 127.0.0.1 or 0.0.0.0") from None
    try:
        with socket.socket(family, kind, proto) as probe:
            # As uvicorn binds: a port left in TIME_WAIT by a previous server is free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:
        raise ValueError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): pass "
                         "another --port, or stop what is using this one") from None


def serve(model_dir: str | Path, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, *, model_name: str | None = None, device: str = "auto",
          dtype: str = "auto", max_batch_size: int = 32, max_queue: int = 256,
          request_timeout: float = 300.0, regulator: Any = None,
          log_level: str = "info", compile: bool | None = None) -> None:
    """Serve ``model_dir`` over the OpenAI HTTP API until interrupted (blocks).

    ``api_key`` defaults to ``$VESPER_API_KEY``; it is required when ``host`` is not a
    loopback address.
    """
    import uvicorn

    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    check_bind(host, api_key)  # before the (slow) model load
    check_port(host, port)
    app = create_app(model_dir, api_key=api_key, model_name=model_name,
                     max_batch_size=max_batch_size, max_queue=max_queue,
                     request_timeout=request_timeout, regulator=regulator, device=device,
                     dtype=dtype, compile=compile)
    state: VesperServer = app.state.vesper
    shown = f"[{host}]" if ":" in host else host
    compiled = getattr(getattr(state.llm, "backend", None), "compile", False)
    print(f"serving '{state.model_name}' ({context_window(state.llm)}-token context) on "
          f"http://{shown}:{port}/v1" + (" (API key required)" if api_key else "")
          + ("; decode step compiled: the first batches wait for torch.compile"
             if compiled else ""), flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


def cli(opts: ServeOptions) -> int:
    """``vesper serve``: run the server with the options from the command line."""
    regulator = None
    if opts.regulator or opts.retries:
        from .metacog import MetacognitiveRegulator

        regulator = MetacognitiveRegulator(threshold=opts.threshold, retries=opts.retries)
    serve(opts.model_dir, host=opts.host, port=opts.port, api_key=opts.api_key,
          model_name=opts.model_name, device=opts.device, dtype=opts.dtype,
          max_batch_size=opts.max_batch_size, max_queue=opts.max_queue,
          request_timeout=opts.request_timeout, regulator=regulator,
          log_level=opts.log_level, compile=opts.compile)
    return 0


__all__ = ["APIError", "BatchScheduler", "Metrics", "ServeOptions", "check_bind", "check_port",
           "cli", "context_window", "create_app", "is_loopback", "load_backend", "serve"]


make_module_callable(__name__, serve)
