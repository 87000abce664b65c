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
``{"threshold": 0.8, "retries": 1, ...}`` (the openai client's ``extra_body``). A request
that sets no ``temperature`` samples at ``DEFAULT_TEMPERATURE`` (0.8).

Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: bad JSON,
wrong field types and out-of-range values are 400 (never FastAPI's 422), an unknown model
is 404, a missing or wrong API key 401, a full queue 503, a request past its time 504.

Modules: ``protocol`` (request bodies -> ``SamplingParams``, answer shapes), ``scheduler``
(continuous or static batching, the worker thread, cancellation), ``app`` (the FastAPI
app, its routes, SSE), ``tokenizer_routes`` (vLLM's /tokenize, /detokenize,
/tokenizer_info), ``limits`` (the body-size limit), ``metrics`` (what ``/metrics``
reports, with prometheus_client), ``command`` (``serve``, ``ServeOptions``, ``vesper serve``).
"""

from .app import VesperServer, create_app, load_backend
from .command import API_KEY_ENV, ServeOptions, check_bind, check_port, cli, is_loopback, serve
from .metrics import Metrics
from .protocol import APIError, ChatRequest, CompletionRequest, RegulatorParams
from .scheduler import BatchScheduler, ContinuousScheduler, context_window

__all__ = ["API_KEY_ENV", "APIError", "BatchScheduler", "ChatRequest", "CompletionRequest",
           "ContinuousScheduler",
           "Metrics", "RegulatorParams", "ServeOptions", "VesperServer", "check_bind",
           "check_port", "cli", "context_window", "create_app", "is_loopback", "load_backend",
           "serve"]
