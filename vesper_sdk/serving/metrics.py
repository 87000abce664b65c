"""What ``GET /metrics`` reports: request, token, batch and cancellation counters.

Written by hand in Prometheus' text format (0.0.4), so serving needs no client library.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any


class Metrics:
    """The server's counters; the worker thread and the event loop both write them."""

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
