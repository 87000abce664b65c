"""vLLM's tokenizer endpoints: ``POST /tokenize``, ``POST /detokenize``, ``GET /tokenizer_info``.

Clients that count tokens themselves use them instead of downloading a tokenizer from a
model hub: lm-evaluation-harness's ``local-completions`` (its remote tokenizer) reads
``/tokenizer_info`` for the special tokens and tokenizes each context with ``/tokenize``.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from .protocol import APIError, ChatMessage, ChatRequest, _Body


class TokenizeRequest(_Body):
    """A text (``prompt``) or a chat (``messages``, through the chat template) to tokenize."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True  # BOS before a prompt
    return_token_strs: bool = False


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int] = Field(min_length=0)


def add_tokenizer_routes(app: FastAPI, state: Any, auth: list[Any]) -> None:
    """Add the three routes to ``app`` (behind the same API key as /v1); ``state`` is the
    app's ``VesperServer`` (its tokenizer, model name and context checks)."""
    tok = state.tokenizer

    def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        if body.model is not None:
            state.check_model(body.model)
        body.check()
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "send exactly one of 'prompt' and 'messages'",
                           param="prompt", code="invalid_value")
        if body.messages is not None:
            chat = ChatRequest(model=state.model_name, messages=body.messages)
            ids = tok.chat_prompt_ids(chat.chat_messages())
        else:
            assert body.prompt is not None
            state.check_length(body.prompt, "prompt")
            # As vLLM's (HF tokenizers): a special token's name becomes that token here.
            ids = [tok.bos_id] * body.add_special_tokens + tok.encode_spelled_specials(
                body.prompt)
        out: dict[str, Any] = {"count": len(ids), "max_model_len": state.context,
                               "tokens": ids, "token_strs": None}
        if body.return_token_strs:
            out["token_strs"] = [tok.decode([t], skip_special_tokens=False) for t in ids]
        return out

    def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        if body.model is not None:
            state.check_model(body.model)
        bad = [t for t in body.tokens if not 0 <= t < tok.vocab_size]
        if bad:
            raise APIError(400, f"token ids must be in [0, {tok.vocab_size}); got {bad[0]}",
                           param="tokens", code="invalid_value")
        return {"prompt": tok.decode(body.tokens)}

    @app.post("/tokenize", dependencies=auth)
    async def tokenize_route(body: TokenizeRequest) -> dict[str, Any]:
        return await run_in_threadpool(tokenize, body)

    @app.post("/detokenize", dependencies=auth)
    async def detokenize_route(body: DetokenizeRequest) -> dict[str, Any]:
        return await run_in_threadpool(detokenize, body)

    @app.get("/tokenizer_info", dependencies=auth)
    async def tokenizer_info() -> dict[str, Any]:
        def name(tid: int) -> str:
            return tok.decode([tid], skip_special_tokens=False)

        return {"tokenizer_class": type(tok).__name__, "model_max_length": state.context,
                "vocab_size": tok.vocab_size,
                "bos_token": name(tok.bos_id), "bos_token_id": tok.bos_id,
                "eos_token": name(tok.eos_id), "eos_token_id": tok.eos_id,
                "pad_token": name(tok.pad_id), "pad_token_id": tok.pad_id,
                "add_bos_token": True, "chat_template": None}
