"""Shared helpers for the serving and demo tests: a tiny model folder and a server thread.

Kept out of conftest.py on purpose (other test files own that); the serve/demo test
modules import it directly (pytest puts ``tests/`` on sys.path for rootless test dirs).
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

import vesper_sdk as vs

WORDS = ("the cat dog sun moon star red blue green small big fast slow runs jumps sees "
         "likes a an and or but is was will can river tree house bird fish light night "
         "day hello world model token answer question yes no maybe").split()


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    """A few hundred short strings: words, sums and chat-like lines (BPE training text)."""
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        if i % 3 == 0:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            texts.append(f"{a}+{b}={a + b}")
        else:
            texts.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + ".")
    return texts


def make_tiny_model(directory: Path, seed: int = 0, max_seq_len: int = 256) -> Path:
    """Write a tiny random VesperLM model folder (config, weights, tokenizer) and return it.

    The MetaHead's output layer gets a wide init so that the confidences of a random model
    spread over (0, 1) instead of all sitting at 0.5: the colour scale and the min/mean
    statistics then have something to show. Attention gets a wider init too, so greedy
    outputs depend on more of the prompt than its last token.
    """
    torch.manual_seed(seed)
    tok = vs.VesperTokenizer.train(corpus(), vocab_size=512, min_frequency=1)
    cfg = vs.VesperConfig.from_preset(
        "tiny", hidden_size=64, num_layers=2, num_heads=2, ffn_hidden_size=128,
        vocab_size=tok.vocab_size, max_seq_len=max_seq_len, metahead_hidden_size=32,
        pad_token_id=tok.pad_id, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    model = vs.VesperLM(cfg)
    with torch.no_grad():
        model.metahead.out.weight.normal_(0.0, 1.0)
        for block in model.blocks:
            block.attn.qkv.weight.normal_(0.0, 0.2)
        # Zero rows for the special tokens and for tokens that are not printable ASCII:
        # with tied embeddings their logits are then 0 while some other token always
        # scores higher, so answers are readable words (a random model would otherwise
        # emit <|user|>, which prints as nothing, and stray UTF-8 bytes, which print as
        # U+FFFD). Lengths are then set by max_tokens and stop strings, never by EOS.
        unreadable = [i for i in range(tok.vocab_size) if i in tok.special_ids
                      or not all(32 <= b < 127 for b in tok.token_bytes(i))]
        model.embed.weight[unreadable] = 0.0
        # The stop head starts well below 0.5, so the regulator's satisficing stop (stop
        # probability >= 0.5) only fires when a test lowers stop_threshold on purpose.
        model.metahead.out.bias[1] = -4.0
    model.save_pretrained(directory)
    tok.save(directory)
    return directory


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago (for servers that bind themselves)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_thread(app: Any, log_level: str = "warning") -> Iterator[str]:
    """Run an ASGI app under uvicorn in a background thread; yields its base URL.

    The socket is bound here and handed to uvicorn, so there is no window in which
    another process could take the port.
    """
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


# ----------------------------------------------------------------------------- LLM doubles
def generation_request(prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
                       seed: int | None = None) -> Any:
    """A GenerationRequest with the server's defaults for everything else."""
    from vesper_sdk.inference import GenerationRequest, SamplingParams

    return GenerationRequest(prompt=list(prompt_ids),
                             params=SamplingParams(max_new_tokens=max_new_tokens,
                                                   temperature=temperature, seed=seed))


def solo_greedy(llm: Any, prompt_ids: list[int], max_new_tokens: int) -> list[Any]:
    """The visible tokens ``llm`` produces for this prompt alone (a batch of one), greedily."""
    req = generation_request(prompt_ids, max_new_tokens)
    return [tok for _, tok in llm.stream_batch([req]) if not tok.special]


def is_cancelled(request: Any) -> bool:
    """Whether a GenerationRequest's cancel flag is raised."""
    return bool(request.is_cancelled)


class ControlledLLM:
    """Wraps a real LLM for tests: records requests, can slow tokens down or hold batches.

    ``delay`` sleeps after each token (so a generation lasts long enough to be cancelled);
    ``gate`` (an Event) holds the first batch before its first token until it is set, so
    a test can let requests pile up in the queue and see them batched together.
    """

    def __init__(self, llm: Any, delay: float = 0.0, gate: threading.Event | None = None
                 ) -> None:
        self.llm, self.delay, self.gate = llm, delay, gate
        self.tokenizer = llm.tokenizer
        self.config = llm.config
        self.model_dir = llm.model_dir
        self.batches: list[list[Any]] = []
        self.yielded: dict[int, int] = {}
        self._lock = threading.Lock()

    def stream_batch(self, requests: list[Any]) -> Iterator[tuple[int, Any]]:
        with self._lock:
            first = not self.batches
            self.batches.append(list(requests))
        if first and self.gate is not None:
            self.gate.wait(60)
        for index, token in self.llm.stream_batch(requests):
            key = id(requests[index])
            self.yielded[key] = self.yielded.get(key, 0) + 1
            if self.delay:
                time.sleep(self.delay)
            yield index, token

    @property
    def requests(self) -> list[Any]:
        return [r for batch in self.batches for r in batch]


def wait_until(predicate: Any, timeout: float = 30.0, what: str = "condition") -> None:
    """Poll ``predicate`` until true; fail (not hang) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def parse_sse(text: str) -> list[Any]:
    """The payloads of an SSE body: JSON objects, and the final '[DONE]' as a string.

    Strict: every non-empty line must be a ``data: `` line, so a malformed stream fails.
    """
    import json

    events = []
    for line in text.split("\n"):
        if not line:
            continue
        assert line.startswith("data: "), f"not an SSE data line: {line!r}"
        data = line[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


@contextlib.contextmanager
def launched(cmd: list[str], marker: str, cwd: Path | None = None,
             timeout: float = 120.0) -> Iterator[str]:
    """Run a server command in a subprocess; yield the stdout line containing ``marker``.

    The process is ours: it is terminated (then killed if need be) on the way out.
    """
    import os
    import queue
    import subprocess

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"{cmd[:4]} printed no {marker!r} line: {seen}") from None
            if line is None:
                raise AssertionError(f"{cmd[:4]} exited ({proc.wait()}): {''.join(seen)}")
            seen.append(line)
            if marker in line:
                yield line.strip()
                return
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
