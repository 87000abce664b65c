"""The FastAPI app: routes, authentication, error shapes and SSE streaming.

``create_app`` builds one app around one model: :class:`VesperServer` checks each body
(:mod:`.protocol`), turns it into ``GenerationRequest``s and hands them to the
:class:`~.scheduler.BatchScheduler`; the routes shape what comes back as OpenAI's JSON or
as server-sent events.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import export
from ..device import resolve_device
from ..eval.regulator import as_regulator
from ..folder import ModelFolder
from ..inference import GenerationRequest, PromptLogprobs, SamplingParams, load
from ..inference.continuous import DEFAULT_PREFILL_CHUNK
from .limits import DEFAULT_MAX_BODY_BYTES, BodyLimitMiddleware
from .metrics import CONTENT_TYPE, Metrics, MetricsMiddleware
from .protocol import (
    MAX_CHOICES,
    APIError,
    ChatRequest,
    Choice,
    CompletionRequest,
    chat_logprobs,
    completion_logprobs,
    prompt_logprobs_fields,
    sse,
    validation_error,
    vesper_fields,
)
from .scheduler import DONE, ClientGone, RequestRun, context_window, make_scheduler
from .tokenizer_routes import add_tokenizer_routes

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_backend(model_dir: str | Path, device: str = "auto", dtype: str = "auto",
                 compile: bool | None = False) -> Any:
    """Open a model folder as an LLM: PyTorch (fp32/bf16/bnb-quantized) or ONNX Runtime.

    An ONNX export runs on ``vesper_sdk.export.OnnxModel``; any other folder goes through
    ``vesper_sdk.load`` (bitsandbytes folders keep their own compute dtype).
    ``dtype='auto'`` uses bf16 on a GPU and fp32 on the CPU, where bf16 matmuls are slow.
    ``compile=None`` compiles the decode step on CUDA only.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(
            f"{model_dir} is not a folder: pass a model folder (config.json, "
            "model.safetensors, tokenizer.json) or an exported ONNX folder")
    folder = ModelFolder(model_dir)
    if folder.kind == "onnx":
        try:
            return export.OnnxModel(folder.path)
        except ImportError as exc:
            raise RuntimeError(
                f"{model_dir} is an ONNX export but ONNX Runtime support is unavailable "
                f"({exc}): pip install 'vesper-sdk[export]'") from None
    dev = resolve_device(device)
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if dev.type == "cuda" else None
    elif dtype in _DTYPES:
        torch_dtype = _DTYPES[dtype]
    else:
        raise ValueError(f"dtype must be auto, fp32, bf16 or fp16, got {dtype!r}")
    # Quantized layers fix their own compute dtype; casting them would undo the quantization.
    return load(folder.path, device=dev, dtype=torch_dtype if folder.kind == "torch" else None,
                compile=dev.type == "cuda" if compile is None else compile)


@dataclass
class _Prepared:
    """A checked request: prompts as token ids, each with its SamplingParams."""

    prompts: list[list[int]]
    prompt_texts: list[str]
    params: list[SamplingParams]  # one per prompt (max_new_tokens depends on its length)
    n: int
    want_logprobs: bool
    stream: bool
    include_usage: bool
    echo: bool = False

    @property
    def top_logprobs(self) -> int:
        return self.params[0].top_logprobs


@dataclass
class _Answer:
    """One request's choices while they generate, fed by its RequestRun."""

    run: RequestRun
    choices: list[Choice]
    prep: _Prepared

    async def events(self, request: Request, poll_disconnect: bool
                     ) -> AsyncIterator[tuple[Choice, Any]]:
        """(choice, Token | DONE | Exception) until every choice has ended."""
        poll = request.is_disconnected if poll_disconnect else None
        async for index, item in self.run.events_until_done(poll):
            yield self.choices[index], item

    def usage(self) -> dict[str, int]:
        prompt = sum(len(ids) for ids in self.prep.prompts)
        completion = sum(len(c.generated) for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}


class VesperServer:
    """The state behind one app: the model, its batcher, metrics and limits."""

    def __init__(self, llm: Any, model_name: str, api_key: str | None,
                 max_batch_size: int, max_queue: int, request_timeout: float,
                 regulator: Any = None, scheduler: str = "auto",
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> None:
        self.llm = llm
        self.regulator = as_regulator(regulator)
        self.tokenizer = llm.tokenizer
        self.model_name = model_name
        self.api_key = api_key
        self.request_timeout = request_timeout
        self.context = context_window(llm)
        self.metrics = Metrics()
        self.scheduler = make_scheduler(scheduler, llm, self.metrics, max_batch_size,
                                        max_queue, prefill_chunk)
        self.created = int(time.time())
        self.max_token_bytes = max(
            [len(self.tokenizer.token_bytes(i)) for i in range(self.tokenizer.vocab_size)]
            + [1])

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

    # --- preparing ----------------------------------------------------------------
    def prepare_completion(self, body: CompletionRequest) -> _Prepared:
        self.check_model(body.model)
        body.check_supported(self.tokenizer.vocab_size)
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
                self.check_length(item, "prompt")
                ids = [self.tokenizer.bos_id, *self.tokenizer.encode(item)]
                text = item
            else:
                if not item or any(not 0 <= t < vocab for t in item):
                    raise APIError(400, f"token-id prompts must be non-empty lists of ids in "
                                   f"[0, {vocab})", param="prompt", code="invalid_value")
                ids, text = list(item), self.tokenizer.decode(item)
            prompts.append(ids)
            texts.append(text)
            limits.append(self._bounded(len(ids), body.max_tokens, body.default_max_tokens,
                                        "prompt"))
        return _Prepared(
            prompts=prompts, prompt_texts=texts,
            params=[body.to_sampling_params(limit, self.regulator, vocab) for limit in limits],
            n=body.n, want_logprobs=body.want_logprobs, stream=body.stream,
            include_usage=body.include_usage, echo=body.echo)

    def prepare_chat(self, body: ChatRequest) -> _Prepared:
        self.check_model(body.model)
        body.check_supported(self.tokenizer.vocab_size)
        messages = body.chat_messages()
        self.check_length("".join(m["content"] for m in messages), "messages")
        ids = self.tokenizer.chat_prompt_ids(messages)
        limit = self._bounded(len(ids), body.requested_max_tokens, None, "messages")
        return _Prepared(
            prompts=[ids], prompt_texts=[""],
            params=[body.to_sampling_params(limit, self.regulator,
                                            self.tokenizer.vocab_size)], n=body.n,
            want_logprobs=body.want_logprobs, stream=body.stream,
            include_usage=body.include_usage)

    def check_length(self, text: str, what: str) -> None:
        """400 for a text that cannot fit the context window, before tokenizing it: no
        token covers more than ``max_token_bytes`` bytes, so more bytes than
        context x that are more tokens than the context holds."""
        size = len(text.encode("utf-8"))
        if size > self.context * self.max_token_bytes:
            raise APIError(400, f"this model's maximum context length is {self.context} "
                           f"tokens, and the {what} ({size} bytes of text) is longer than "
                           f"that whatever its tokens: shorten it", param=what,
                           code="context_length_exceeded")

    # --- running --------------------------------------------------------------------
    def start(self, prep: _Prepared) -> _Answer:
        """Queue the request's n x prompts generations (APIError 503 when the queue is full)."""
        requests, choices = [], []
        for ids, text, params in zip(prep.prompts, prep.prompt_texts, prep.params,
                                     strict=True):
            for k in range(prep.n):
                # Distinct seeds for the n samples of one prompt, so they can differ (kept
                # in the generator's 64-bit range).
                seed = None if params.seed is None else (params.seed + k) % 2**64
                requests.append(GenerationRequest(prompt=list(ids),
                                                  params=params.replace(seed=seed),
                                                  cancelled=threading.Event()))
                choices.append(Choice(len(choices), text))
        run = RequestRun(self.scheduler, requests, self.request_timeout)
        self.metrics.prompt_tokens.inc(sum(len(ids) for ids in prep.prompts) * prep.n)
        return _Answer(run, choices, prep)


def _error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def create_app(llm_or_dir: Any, *, api_key: str | None = None, model_name: str | None = None,
               max_batch_size: int = 32, max_queue: int = 256, request_timeout: float = 300.0,
               regulator: Any = None, device: str = "auto", dtype: str = "auto",
               compile: bool | None = False, scheduler: str = "auto",
               prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI app serving one model (an LLM-like object or a model folder).

    ``llm_or_dir`` may be anything with ``tokenizer``, a context window (``max_seq_len``
    on itself or its ``config``) and ``stream_batch(requests)``: the PyTorch ``LLM``, an
    ``OnnxModel``, or a test double. ``regulator`` (a MetacognitiveRegulator, True for its
    defaults, or None) applies to requests that do not set the ``regulator`` field.
    ``scheduler``: ``continuous`` (a PyTorch model), ``static`` (any), or ``auto`` (the
    first where it can run). ``model_name``: the id clients send as ``model`` (default:
    the folder's name).
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
                         request_timeout, regulator, scheduler, prefill_chunk)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.scheduler.start()
        yield
        # Give up on running generations at shutdown, off the loop (join blocks).
        await asyncio.get_running_loop().run_in_executor(None, state.scheduler.stop)

    app = FastAPI(title="VesperLM (OpenAI-compatible API)", lifespan=lifespan,
                  docs_url=None, redoc_url=None)  # the docs pages would fetch JS from a CDN
    app.state.vesper = state
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(validation_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed",
                413: "request_too_large"}.get(exc.status_code)
        return _error_response(APIError(exc.status_code, str(exc.detail), code=kind))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return _error_response(APIError(500, f"internal server error: {type(exc).__name__}",
                                        type="server_error", code="internal_error"))

    auth = [Depends(state.check_auth)]

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = state.scheduler.healthy
        return JSONResponse({"status": "ok" if ok else "unavailable",
                             "model": state.model_name,
                             "queue_size": state.scheduler.queue_size,
                             "active": state.scheduler.active},
                            status_code=200 if ok else 503)

    @app.get("/metrics", dependencies=auth)
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    add_tokenizer_routes(app, state, auth)

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
        # Tokenizing a long prompt takes a while: off the event loop, so that /health and
        # the other clients' streams keep going meanwhile.
        answer = state.start(await run_in_threadpool(state.prepare_completion, body))
        prep = answer.prep
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if prep.stream:
            return _streaming(answer, _completion_chunks(state, answer, rid, created,
                                                         request))
        if not await _collect(answer, request):
            return JSONResponse({}, status_code=499)  # client gone; nobody will read it
        choices = []
        for c in answer.choices:
            choices.append({
                "index": c.index, "text": (c.prompt_text if prep.echo else "") + c.text,
                "finish_reason": c.finish_reason,
                "logprobs": _completion_logprobs(state, c, prep)
                if prep.want_logprobs else None,
                "vesper": vesper_fields(c.tokens, c.end_regulated, c.generated)})
        return {"id": rid, "object": "text_completion", "created": created,
                "model": state.model_name, "choices": choices, "usage": answer.usage()}

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        answer = state.start(await run_in_threadpool(state.prepare_chat, body))
        prep = answer.prep
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if prep.stream:
            return _streaming(answer, _chat_chunks(state, answer, rid, created, request))
        if not await _collect(answer, request):
            return JSONResponse({}, status_code=499)
        choices = []
        for c in answer.choices:
            choices.append({
                "index": c.index, "message": {"role": "assistant", "content": c.text},
                "finish_reason": c.finish_reason,
                "logprobs": chat_logprobs(state.tokenizer, c.tokens, prep.top_logprobs)
                if prep.want_logprobs else None,
                "vesper": vesper_fields(c.tokens, c.end_regulated, c.generated)})
        return {"id": rid, "object": "chat.completion", "created": created,
                "model": state.model_name, "choices": choices, "usage": answer.usage()}

    return app


def _completion_logprobs(state: VesperServer, choice: Choice, prep: _Prepared,
                         ) -> dict[str, list]:
    """``logprobs`` of a completion choice: the generated tokens', after the prompt's own
    when echoed (lm-evaluation-harness reads the prompt's part for loglikelihoods)."""
    out = completion_logprobs(state.tokenizer, choice.generated, choice.generated_offsets,
                              prep.top_logprobs)
    if not prep.echo or choice.prompt_scores is None:
        return out
    head = prompt_logprobs_fields(state.tokenizer, choice.prompt_scores, prep.top_logprobs)
    return {k: (head[k] or []) + (out[k] or []) if out[k] is not None or head[k] is not None
            else None for k in out}


async def _collect(answer: _Answer, request: Request) -> bool:
    """Run a non-streaming request to its end; False if its client went away."""
    try:
        async for choice, item in answer.events(request, poll_disconnect=True):
            if isinstance(item, Exception):
                raise APIError(500, f"generation failed: {item}", type="server_error",
                               code="generation_failed")
            if item is DONE:
                choice.end()
            elif isinstance(item, PromptLogprobs):
                choice.prompt_scores = item
            else:
                choice.add(item)
    except ClientGone:
        return False
    except BaseException:
        # Timeouts and disconnects have cancelled (and counted) already.
        answer.run.cancel("error")
        raise
    return True


def _streaming(answer: _Answer, chunks: AsyncIterator[str]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            # Reached on normal end (no-op), and when Starlette cancels us because the
            # client went away: the generation stops with it.
            answer.run.cancel("disconnect")

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _stream_events(answer: _Answer, request: Request
                         ) -> AsyncIterator[tuple[Choice, str | None, Any, bool]]:
    """(choice, text to send, token or None, finished?) per event; errors become APIError."""
    async for choice, item in answer.events(request, poll_disconnect=False):
        if isinstance(item, Exception):
            raise APIError(500, f"generation failed: {item}", type="server_error",
                           code="generation_failed")
        if isinstance(item, PromptLogprobs):
            choice.prompt_scores = item
            yield choice, "", None, False
        elif item is DONE:
            if choice.finish_reason is None:  # no finishing token came (cancel, error)
                choice.end()
                yield choice, "", None, True
        else:
            finished = choice.add(item)
            visible = None if getattr(item, "special", False) else item
            yield choice, item.text, visible, finished


def _chunker(state: VesperServer, rid: str, obj: str, created: int
             ) -> Callable[..., str]:
    """An SSE chunk of this response: one choice's payload, or the usage alone."""

    def chunk(choice_payload: dict | None, usage: dict | None = None) -> str:
        return sse({"id": rid, "object": obj, "created": created, "model": state.model_name,
                    "choices": [choice_payload] if choice_payload else [],
                    **({"usage": usage} if usage is not None else {})})
    return chunk


async def _completion_chunks(state: VesperServer, answer: _Answer, rid: str, created: int,
                             request: Request) -> AsyncIterator[str]:
    prep = answer.prep
    chunk = _chunker(state, rid, "text_completion", created)
    if prep.echo and not prep.want_logprobs:  # the prompt first, as its own chunk
        for c in answer.choices:
            c.echoed = True
            yield chunk({"index": c.index, "text": c.prompt_text, "logprobs": None,
                         "finish_reason": None})
    try:
        async for choice, text, token, finished in _stream_events(answer, request):
            if prep.echo and not choice.echoed and choice.prompt_scores is not None:
                choice.echoed = True  # the prompt, scored: came before any token
                yield chunk({"index": choice.index, "text": choice.prompt_text,
                             "logprobs": prompt_logprobs_fields(
                                 state.tokenizer, choice.prompt_scores, prep.top_logprobs),
                             "finish_reason": None})
            tokens = [token] if token is not None else []
            offsets = choice.text_offsets[-1:] if token is not None else []
            if not tokens and not text and not finished:
                continue
            yield chunk({
                "index": choice.index, "text": text or "",
                "logprobs": completion_logprobs(state.tokenizer, tokens, offsets,
                                                prep.top_logprobs)
                if prep.want_logprobs and tokens else None,
                "finish_reason": choice.finish_reason if finished else None,
                "vesper": vesper_fields(tokens, choice.end_regulated if finished else None,
                                        choice.generated if finished else None)})
        if prep.include_usage:
            yield chunk(None, answer.usage())
    except APIError as exc:
        yield sse(exc.body())
    yield sse("[DONE]")


async def _chat_chunks(state: VesperServer, answer: _Answer, rid: str, created: int,
                       request: Request) -> AsyncIterator[str]:
    prep = answer.prep
    chunk = _chunker(state, rid, "chat.completion.chunk", created)
    # OpenAI opens each choice with a role-only delta.
    for c in answer.choices:
        yield chunk({"index": c.index, "delta": {"role": "assistant", "content": ""},
                     "logprobs": None, "finish_reason": None})
    try:
        async for choice, text, token, finished in _stream_events(answer, request):
            tokens = [token] if token is not None else []
            if tokens or text:
                yield chunk({
                    "index": choice.index, "delta": {"content": text or ""},
                    "logprobs": chat_logprobs(state.tokenizer, tokens, prep.top_logprobs)
                    if prep.want_logprobs and tokens else None,
                    "finish_reason": None, "vesper": vesper_fields(tokens)})
            if finished:
                end: dict[str, Any] = {"index": choice.index, "delta": {}, "logprobs": None,
                                       "finish_reason": choice.finish_reason}
                end["vesper"] = vesper_fields([], choice.end_regulated, choice.generated)
                yield chunk(end)
        if prep.include_usage:
            yield chunk(None, answer.usage())
    except APIError as exc:
        yield sse(exc.body())
    yield sse("[DONE]")
