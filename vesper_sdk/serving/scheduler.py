"""Scheduling: one worker thread owns the model and decodes what the requests queue.

:class:`ContinuousScheduler` (the default) batches continuously: a generation joins the
running batch at the next step and leaves it when done. :class:`BatchScheduler`
(``--scheduler static``) decodes whatever is waiting as one batch, and what arrives
meanwhile waits for the next. Each generation has its own ``SamplingParams`` and a cancel
flag, raised when its client disconnects or its time runs out. :class:`RequestRun` is the
event loop's side of one HTTP request: its generations' tokens, its deadline, its
disconnect checks and its latency metrics.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..inference import GenerationRequest, Token
from ..inference.continuous import DEFAULT_PREFILL_CHUNK, SlotEngine, supports_slots
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
    push: Callable[[Any], None]  # thread-safe: Token, PromptLogprobs, DONE or an Exception
    finished: bool = False
    submitted: float = field(default_factory=time.perf_counter)

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

    def end(self) -> None:
        if not self.finished:
            self.finished = True
            self.push(DONE)


class Scheduler(abc.ABC):
    """One worker thread that owns the model and decodes what ``submit`` queues.

    The queue, its limit, start and stop are shared; :class:`ContinuousScheduler` and
    :class:`BatchScheduler` decide how queued generations become decode steps. Only the
    worker touches the model, so the backend needs no locking.
    """

    name = ""

    def __init__(self, llm: Any, metrics: Metrics, max_batch_size: int = 32,
                 max_queue: int = 256) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.llm, self.metrics = llm, metrics
        self.context = context_window(llm)
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        metrics.watch(lambda: self.active, lambda: self.queue_size)

    @property
    def queue_size(self) -> int:
        return len(self._waiting)

    @property
    @abc.abstractmethod
    def active(self) -> int:
        """Generations admitted and not yet over."""

    @abc.abstractmethod
    def _running_jobs(self) -> list[Job]:
        """The jobs the worker holds now (to cancel at shutdown)."""

    @abc.abstractmethod
    def _run(self) -> None:
        """The worker thread's loop, until ``_stop`` is set."""

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
            self._thread = threading.Thread(target=self._run, name=f"vesper-{self.name}",
                                            daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel everything queued or running and wait for the worker to exit."""
        self._stop.set()
        with self._cond:
            waiting, self._waiting = list(self._waiting), collections.deque()
            self._cond.notify_all()
        for job in [*waiting, *self._running_jobs()]:
            job.cancel()
        for job in waiting:
            job.end()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue a request's jobs together (so they start together when possible)."""
        self.start()
        with self._cond:
            if len(self._waiting) + len(jobs) > self.max_queue:
                raise APIError(503, f"the server is busy: {len(self._waiting)} generations "
                               "are waiting; retry shortly", type="server_error",
                               code="server_overloaded")
            self._waiting.extend(jobs)
            self._cond.notify()

    def _deliver(self, job: Job, item: Any) -> None:
        if job.finished:
            return
        if isinstance(item, Token):
            self.metrics.observe_token(item)
        job.push(item)
        if getattr(item, "finish_reason", None):
            job.end()  # the row is over: answer its request now, not when the batch ends


class ContinuousScheduler(Scheduler):
    """Continuous batching (:class:`~vesper_sdk.inference.continuous.SlotEngine`): a
    generation is admitted into a free slot at the next step boundary, prefilled in
    chunks of ``prefill_chunk`` tokens between decode steps, joins the running batch and
    leaves it when done. No generation waits for another's end, only for a free slot
    (``max_batch_size`` slots)."""

    name = "continuous"

    def __init__(self, llm: Any, metrics: Metrics, max_batch_size: int = 32,
                 max_queue: int = 256, prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> None:
        super().__init__(llm, metrics, max_batch_size, max_queue)
        self.engine = SlotEngine(llm, max_batch_size, prefill_chunk)
        self._jobs: dict[int, Job] = {}
        self._next_key = 0

    @property
    def active(self) -> int:
        return len(self._jobs)

    def _running_jobs(self) -> list[Job]:
        return list(self._jobs.values())

    def _admit(self) -> None:
        """Move queued generations into free slots (waiting a little when idle)."""
        with self._cond:
            if not self._waiting and not self.engine.busy:
                self._cond.wait(0.1)
            taken: list[Job] = []
            while self._waiting and len(taken) < self.engine.free_slots:
                taken.append(self._waiting.popleft())
        for job in taken:
            if job.cancelled:  # client gone or timed out while queued: answered, not run
                job.end()
                continue
            key, self._next_key = self._next_key, self._next_key + 1
            hits, queried = self.engine.reused_tokens, self.engine.prompt_tokens
            try:
                self.engine.add(key, job.request)
            except Exception as exc:  # this request cannot run; its neighbours can
                job.push(exc)
                job.end()
                continue
            self.metrics.observe_prefix(self.engine.prompt_tokens - queried,
                                        self.engine.reused_tokens - hits)
            self.metrics.queue_time.observe(time.perf_counter() - job.submitted)
            self._jobs[key] = job

    def _run(self) -> None:
        while not self._stop.is_set():
            self._admit()
            if not self.engine.busy:
                continue
            try:
                events, ended = self.engine.step()
            except Exception as exc:  # the step failed: every generation in it gets the error
                log.exception("decode step over %d generations failed", len(self._jobs))
                for key in self.engine.reset():
                    job = self._jobs.pop(key)
                    job.push(exc)
                    job.end()
                continue
            self.metrics.steps.inc()
            for key, item in events:
                self._deliver(self._jobs[key], item)
            for key in ended:
                self._jobs.pop(key).end()


class BatchScheduler(Scheduler):
    """Static batching (``--scheduler static``): the worker takes every waiting generation
    (up to ``max_batch_size``) and decodes them as one batch through ``llm.stream_batch``;
    generations that arrive meanwhile wait for the next batch. Works with any backend
    (ONNX Runtime too).

    A batch is left-padded to its longest prompt, and ``stream_batch`` caps every row at
    ``context - longest prompt`` new tokens; so a job joins a batch only if the batch's
    longest prompt plus its largest ``max_tokens`` still fits the context window, else it
    waits (first in line) for the next batch. No request is ever cut short by another.
    """

    name = "static"

    def __init__(self, llm: Any, metrics: Metrics, max_batch_size: int = 32,
                 max_queue: int = 256) -> None:
        super().__init__(llm, metrics, max_batch_size, max_queue)
        self._active: list[Job] = []

    @property
    def active(self) -> int:
        return sum(not j.finished for j in list(self._active))

    def _running_jobs(self) -> list[Job]:
        return list(self._active)

    def _take_batch(self) -> list[Job]:
        with self._cond:
            if not self._waiting:
                self._cond.wait(0.1)
            batch: list[Job] = []
            later: collections.deque[Job] = collections.deque()
            longest_prompt = most_tokens = 0
            for job in self._waiting:
                if job.cancelled:
                    job.end()  # cancelled while queued (client gone, timed out)
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
        now = time.perf_counter()
        for job in batch:
            self.metrics.queue_time.observe(now - job.submitted)
        return batch

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = self._take_batch()
            if batch:
                self._decode(batch)

    def _decode(self, batch: list[Job]) -> None:
        self.metrics.steps.inc()
        stream: Any = None
        try:
            stream = self.llm.stream_batch([job.request for job in batch])
            for index, item in stream:
                self._deliver(batch[index], item)
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
                job.end()
            self._active = []


SCHEDULERS = {"continuous": ContinuousScheduler, "static": BatchScheduler}


def make_scheduler(kind: str, llm: Any, metrics: Metrics, max_batch_size: int,
                   max_queue: int, prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> Scheduler:
    """The scheduler ``kind`` names: ``continuous``, ``static``, or ``auto`` (continuous
    where the backend allows it: a PyTorch model; static for ONNX Runtime)."""
    if kind == "auto":
        kind = "continuous" if supports_slots(llm) else "static"
    if kind == "continuous":
        if not supports_slots(llm):
            raise ValueError("--scheduler continuous needs a PyTorch model folder; an ONNX "
                             "export is served with --scheduler static (or auto)")
        return ContinuousScheduler(llm, metrics, max_batch_size, max_queue, prefill_chunk)
    if kind == "static":
        return BatchScheduler(llm, metrics, max_batch_size, max_queue)
    raise ValueError(f"unknown scheduler {kind!r}: choose auto, continuous or static")


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

    def __init__(self, scheduler: Scheduler, requests: Sequence[GenerationRequest],
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
        self.last_token: dict[int, float] = {}

    def cancel(self, reason: str) -> None:
        """Stop every unfinished generation (client gone, timeout, server error)."""
        n = 0
        for job in self.jobs:
            if not job.finished and not job.cancelled:
                job.cancel()
                n += 1
        if n:
            self.metrics.cancelled.labels(reason).inc()

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
                if not pending:
                    self.metrics.e2e.observe(time.perf_counter() - self.started)
            elif isinstance(item, Token):
                now = time.perf_counter()
                if not self.first_token_seen:
                    self.first_token_seen = True
                    self.metrics.ttft.observe(now - self.started)
                if index in self.last_token:
                    self.metrics.itl.observe(now - self.last_token[index])
                self.last_token[index] = now
            yield index, item
