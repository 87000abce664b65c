"""What ``GET /metrics`` reports, with ``prometheus_client``: latencies, tokens, load, and
what only this server knows (each token's confidence, the regulator's actions, prefix reuse).

Names follow vLLM's where they mean the same (time to first token, inter-token latency,
queue time, end-to-end latency, running and waiting requests), prefixed ``vesper_``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_STEP = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0,
         2.5)
_CONFIDENCE = tuple(i / 10 for i in range(1, 11))
_REGULATOR_ACTIONS = ("conservative", "stopped", "retry", "kept")


class Metrics:
    """The server's metrics, in a registry of its own (one per app, so tests and several
    apps in one process never share counters). Thread-safe: the worker thread and the
    event loop both write them."""

    ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health",
                 "/metrics", "/tokenize", "/detokenize", "/tokenizer_info")

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("vesper_requests", "HTTP requests by endpoint and status.",
                                ["endpoint", "status"], registry=r)
        self.request_duration = Histogram(
            "vesper_request_duration_seconds", "Time from request to last byte, by endpoint.",
            ["endpoint"], buckets=_LATENCY, registry=r)
        self.e2e = Histogram("vesper_e2e_request_latency_seconds",
                             "Generation requests: time from arrival to their last token.",
                             buckets=_LATENCY, registry=r)
        self.ttft = Histogram("vesper_time_to_first_token_seconds",
                              "Time from a request's arrival to its first generated token.",
                              buckets=_LATENCY, registry=r)
        self.itl = Histogram("vesper_inter_token_latency_seconds",
                             "Time between two tokens of one generation.", buckets=_STEP,
                             registry=r)
        self.queue_time = Histogram("vesper_request_queue_time_seconds",
                                    "Time a generation waited before its prefill began.",
                                    buckets=_LATENCY, registry=r)
        self.prompt_tokens = Counter("vesper_prompt_tokens", "Prompt tokens received.",
                                     registry=r)
        self.generated_tokens = Counter("vesper_generated_tokens", "Tokens generated.",
                                        registry=r)
        self.confidence = Histogram(
            "vesper_token_confidence", "The MetaHead's confidence of each generated token.",
            buckets=_CONFIDENCE, registry=r)
        self.regulator = Counter(
            "vesper_regulator_actions", "Tokens the metacognitive regulator acted on, by "
            "action (conservative decoding, stopped, retry, kept an earlier attempt).",
            ["action"], registry=r)
        self.cancelled = Counter("vesper_cancelled_generations",
                                 "Generations cancelled before their end, by reason.",
                                 ["reason"], registry=r)
        self.steps = Counter("vesper_engine_steps", "Decode steps (continuous) or batches "
                             "(static) run.", registry=r)
        self.prefix_queries = Counter(
            "vesper_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
            registry=r)
        self.prefix_hits = Counter(
            "vesper_prefix_cache_hits", "Prompt tokens found in the prefix cache (reused, "
            "not computed again).", registry=r)
        self.prefix_hit_rate = Gauge(
            "vesper_prefix_cache_hit_rate", "prefix_cache_hits / prefix_cache_queries since "
            "start.", registry=r)
        self.prefix_hit_rate.set_function(self._hit_rate)
        self.running = Gauge("vesper_num_requests_running",
                             "Generations being decoded.", registry=r)
        self.waiting = Gauge("vesper_num_requests_waiting",
                             "Generations waiting for a slot or a batch.", registry=r)
        for action in _REGULATOR_ACTIONS:  # present at 0 from the start
            self.regulator.labels(action)

    def _hit_rate(self) -> float:
        queried = self.prefix_queries._value.get()
        return self.prefix_hits._value.get() / queried if queried else 0.0

    def watch(self, running: Callable[[], int], waiting: Callable[[], int]) -> None:
        """Read the running and waiting gauges from the scheduler at each scrape."""
        self.running.set_function(running)
        self.waiting.set_function(waiting)

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        endpoint = path if path in self.ENDPOINTS else (
            "/v1/models" if path.startswith("/v1/models/") else "other")
        self.requests.labels(endpoint, str(status)).inc()
        self.request_duration.labels(endpoint).observe(seconds)

    def observe_token(self, token: Any) -> None:
        """A generated token: counted, its confidence binned, its regulator flags counted."""
        self.generated_tokens.inc()
        self.confidence.observe(float(token.confidence))
        for flag in (getattr(token, "regulated", None) or "").split(", "):
            if flag:
                self.regulator.labels(flag.split(" ")[0]).inc()

    def observe_prefix(self, queried: int, hits: int) -> None:
        self.prefix_queries.inc(queried)
        self.prefix_hits.inc(hits)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
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
