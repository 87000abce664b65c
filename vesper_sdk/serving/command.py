"""``vesper serve`` and ``vesper_sdk.serve``: options, the bind checks, and uvicorn."""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..eval.regulator import MetacognitiveRegulator
from .app import VesperServer, create_app
from .scheduler import context_window

API_KEY_ENV = "VESPER_API_KEY"


@dataclass
class ServeOptions:
    """Serve a model folder over the OpenAI HTTP API on http://HOST:PORT/v1.

    The folder may be a PyTorch model, a bitsandbytes-quantized one or an ONNX export.
    Binding to anything but loopback needs an API key (--api-key or $VESPER_API_KEY);
    clients then send it as "Authorization: Bearer KEY". A request that sets no
    temperature samples at 0.8 (vesper_sdk.inference.DEFAULT_TEMPERATURE); 0 is greedy.
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
    served_model_name: str | None = field(default=None, metadata={
        "help": "model id clients pass as 'model' and /v1/models lists (default: the "
                "folder's name)"})
    device: str = field(default="auto", metadata={
        "help": "auto (CUDA when present), cpu, cuda or cuda:N"})
    dtype: str = field(default="auto", metadata={
        "help": "weights dtype for PyTorch folders: auto (bf16 on GPU, fp32 on CPU), fp32, "
                "bf16 or fp16", "choices": ["auto", "fp32", "bf16", "fp16"]})
    scheduler: str = field(default="auto", metadata={
        "help": "continuous: a request joins the running batch at the next step and leaves "
                "it when done, reusing cached prompt prefixes (PyTorch folders); static: "
                "waiting requests are decoded together as one batch and new ones wait for "
                "it to end (any folder, ONNX too); auto: continuous where it can run",
        "choices": ["auto", "continuous", "static"]})
    max_batch_size: int = field(default=32, metadata={
        "help": "most requests decoded together (continuous: KV slots, allocated once at "
                "start: each holds a whole context window)"})
    prefill_chunk: int = field(default=256, metadata={
        "help": "continuous: most prompt tokens prefilled per step; a longer prompt is "
                "prefilled over several steps, so running answers never stall for long"})
    max_body_mb: float = field(default=4.0, metadata={
        "help": "largest request body in MB; a larger one gets HTTP 413 before it is read"})
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
    abstain_below: float | None = field(default=None, metadata={
        "help": "answer \"I'm not sure.\" instead of an answer whose answer confidence (the "
                "MetaHead's) is under this (implies --regulator)"})
    log_level: str = field(default="info", metadata={
        "help": "uvicorn log level", "choices": ["critical", "error", "warning", "info",
                                                 "debug"]})
    compile: bool | None = field(default=None, metadata={
        "help": "torch.compile the decode step: the first batches wait tens of seconds for "
                "the compiler, later ones decode faster (default: on with CUDA, off on the "
                "CPU, where it needs a C++ compiler and gains little; no effect on ONNX "
                "folders)"})


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
          api_key: str | None = None, *, served_model_name: str | None = None,
          device: str = "auto", dtype: str = "auto", max_batch_size: int = 32,
          max_queue: int = 256, request_timeout: float = 300.0, regulator: Any = None,
          log_level: str = "info", compile: bool | None = None, scheduler: str = "auto",
          prefill_chunk: int = 256, max_body_mb: float = 4.0) -> None:
    """Serve ``model_dir`` over the OpenAI HTTP API until interrupted (blocks).

    ``api_key`` defaults to ``$VESPER_API_KEY``; it is required when ``host`` is not a
    loopback address. The other options are ``vesper serve``'s (``ServeOptions``).
    """
    import uvicorn  # the serve extra's; needed only once a server listens

    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    check_bind(host, api_key)  # before the (slow) model load
    check_port(host, port)
    if max_body_mb <= 0 or prefill_chunk < 1:
        raise ValueError("--max-body-mb must be > 0 and --prefill-chunk >= 1")
    app = create_app(model_dir, api_key=api_key, model_name=served_model_name,
                     max_batch_size=max_batch_size, max_queue=max_queue,
                     request_timeout=request_timeout, regulator=regulator, device=device,
                     dtype=dtype, compile=compile, scheduler=scheduler,
                     prefill_chunk=prefill_chunk, max_body_bytes=int(max_body_mb * 2**20))
    state: VesperServer = app.state.vesper
    shown = f"[{host}]" if ":" in host else host
    compiled = getattr(getattr(state.llm, "backend", None), "compile", False)
    print(f"serving '{state.model_name}' ({context_window(state.llm)}-token context) on "
          f"http://{shown}:{port}/v1" + (" (API key required)" if api_key else "")
          + f", {state.scheduler.name} batching"
          + ("; decode step compiled: the first batches wait for torch.compile"
             if compiled and state.scheduler.name == "static" else ""), flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


def cli(opts: ServeOptions) -> int:
    """``vesper serve``: run the server with the options from the command line."""
    regulator = None
    if opts.regulator or opts.retries or opts.abstain_below is not None:
        regulator = MetacognitiveRegulator(threshold=opts.threshold, retries=opts.retries,
                                           abstain_below=opts.abstain_below)
    serve(opts.model_dir, host=opts.host, port=opts.port, api_key=opts.api_key,
          served_model_name=opts.served_model_name, device=opts.device, dtype=opts.dtype,
          max_batch_size=opts.max_batch_size, max_queue=opts.max_queue,
          request_timeout=opts.request_timeout, regulator=regulator,
          log_level=opts.log_level, compile=opts.compile, scheduler=opts.scheduler,
          prefill_chunk=opts.prefill_chunk, max_body_mb=opts.max_body_mb)
    return 0
