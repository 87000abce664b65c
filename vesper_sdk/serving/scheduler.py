"""Batching: one worker thread decodes every waiting request together, and cancels.

Requests that arrive together are decoded together: the worker takes every generation
waiting in the queue and decodes them as one batch through ``LLM.stream_batch``;
generations that arrive meanwhile form the next batch. Each has its own
``SamplingParams`` and a cancel flag, raised when its client disconnects or its time runs
out, and checked by the decoding loop. :class:`RequestRun` is the event loop's side of
one HTTP request: its generations' tokens, its deadline and its disconnect checks.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..inference import GenerationRequest
from .metrics import Metrics
from .protocol import APIError

log = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is there


def context_window(llm: Any) -> int:
    """The model's context length in tokens (PyTorch LLM, or any backend exposing it)."""
    for owner in (llm, getattr(llm, "config", None), getattr(llm, "backend", None)):
        value = getattr(owner, "max_seq_len", None) if owner is not None else None
        if isinstance(value, int) and value > 0:
            return value
    raise AttributeError(f"{type(llm).__name__} exposes no max_seq_len (context window)")


class _Done:
    """End-of-generation marker pushed after a job's last token."""


DONE = _Done()


@dataclass
class Job:
    """One generation (one choice of one HTTP request) waiting for, or in, a batch."""

    request: GenerationRequest  # prompt as token ids, and its own SamplingParams
    push: Callable[[Any], None]  # thread-safe: Token, DONE or an Exception
    finished: bool = False

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt)

    @property
    def max_tokens(self) -> int:
        return self.request.params.max_new_tokens

    @property
    def cancelled(self) -> bool:
        return self.request.is_cancelled

    def cancel(self) -> None:
        """Raise the cancel flag; the decode loop drops the row before its next token."""
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
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._active: list[Job] = []
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

    @property
    def healthy(self) -> bool:
        """Not stopped, and the worker (once started) is still running."""
        return not self._stop.is_set() and (self._thread is None or self._thread.is_alive())

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

    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue a request's jobs together (so they land in the same batch when possible)."""
        self.start()
        with self._cond:
            if len(self._waiting) + len(jobs) > self.max_queue:
                raise APIError(503, f"the server is busy: {len(self._waiting)} generations "
                               "are waiting; retry shortly", type="server_error",
                               code="server_overloaded")
            self._waiting.extend(jobs)
            self._cond.notify()

    def _take_batch(self) -> list[Job]:
        with self._cond:
            if not self._waiting:
                self._cond.wait(0.1)
            batch: list[Job] = []
            later: collections.deque[Job] = collections.deque()
            longest_prompt = most_tokens = 0
            for job in self._waiting:
                if job.cancelled:
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

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = self._take_batch()
            if batch:
                self._decode(batch)

    def _decode(self, batch: list[Job]) -> None:
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
                if all(j.cancelled or j.finished for j in batch):
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


class ClientGone(Exception):
    """The client of a non-streaming request disconnected; nobody reads the answer."""


def _threadsafe_push(loop: asyncio.AbstractEventLoop, events: asyncio.Queue,
                     index: int) -> Callable[[Any], None]:
    def push(item: Any) -> None:
        # The worker thread may outlive the request's loop at shutdown: drop, don't crash.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(events.put_nowait, (index, item))
    return push


class RequestRun:
    """The generations of one HTTP request while they decode, read from the event loop.

    Built on the event loop: queues one job per request (all or none: APIError 503 when
    the queue is full). ``timeout`` (seconds, 0 = none) counts from here.
    """

    def __init__(self, scheduler: BatchScheduler, requests: Sequence[GenerationRequest],
                 timeout: float) -> None:
        loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        self.jobs = [Job(r, _threadsafe_push(loop, self.events, i))
                     for i, r in enumerate(requests)]
        self.metrics, self.timeout = scheduler.metrics, timeout
        scheduler.submit(self.jobs)
        self.started = time.perf_counter()
        self.deadline = self.started + timeout if timeout > 0 else None
        self.first_token_seen = False

    def cancel(self, reason: str) -> None:
        """Stop every unfinished generation (client gone, timeout, server error)."""
        n = 0
        for job in self.jobs:
            if not job.finished and not job.cancelled:
                job.cancel()
                n += 1
        if n:
            self.metrics.add_cancelled(reason)

    async def events_until_done(self, is_disconnected: Callable[[], Awaitable[bool]] | None
                                ) -> AsyncIterator[tuple[int, Any]]:
        """Yield (index, Token | DONE | Exception) until every generation has ended.

        Raises APIError(504) past the deadline. With ``is_disconnected`` it checks for a
        client disconnect between events and raises ClientGone: a non-streaming request
        has no other way to notice one (a streaming response is cancelled by Starlette,
        which listens for the disconnect itself, so it must not poll as well).
        """
        pending = set(range(len(self.jobs)))
        next_poll = time.perf_counter() + DISCONNECT_POLL_S
        while pending:
            # Time-gated, not only when idle: tokens may keep arriving for a client that
            # has gone, and they must not hide its departure.
            if is_disconnected is not None and time.perf_counter() >= next_poll:
                next_poll = time.perf_counter() + DISCONNECT_POLL_S
                if await is_disconnected():
                    self.cancel("disconnect")
                    raise ClientGone
            wait = DISCONNECT_POLL_S
            if self.deadline is not None:
                wait = min(wait, self.deadline - time.perf_counter())
                if wait <= 0:
                    self.cancel("timeout")
                    raise APIError(504, f"the request took longer than the server's "
                                   f"{self.timeout:g} s limit and was cancelled",
                                   type="timeout_error", code="timeout")
            try:
                index, item = await asyncio.wait_for(self.events.get(), wait)
            except asyncio.TimeoutError:
                continue
            if index not in pending:
                continue
            if item is DONE:
                pending.discard(index)
            elif not isinstance(item, Exception):
                if not self.first_token_seen:
                    self.first_token_seen = True
                    self.metrics.add("ttft_count")
                    self.metrics.add("ttft_sum", time.perf_counter() - self.started)
            yield index, item
