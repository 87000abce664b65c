"""Serving under load: open-loop Poisson arrivals against ``vesper serve``, per scheduler.

For each model (``--models``: ``small``, a random-init model of the 'small' preset shape
with the demo model's tokenizer; ``demo``, the bundled demo model; ``tiny`` for smoke
runs; or a model folder) and each ``vesper serve --scheduler`` (``--schedulers``), one
server runs as a subprocess on a free port; once ``GET /health`` answers and two warm-up
requests are done, it gets three loads of Poisson arrivals (open loop: a request goes out
at its arrival time whether or not earlier ones are answered): ``light`` 0.3x,
``saturating`` 1x and ``overloaded`` 2x the static scheduler's capacity, measured first
by a closed-loop burst (``--probe-concurrency`` clients sending back to back) -- or
``--rates`` in requests/s. Both schedulers get the same requests at the same times
(``--seed``): streamed ``/v1/completions`` with token-id prompts of ``--prompt-lens``
tokens, greedy, ``max_tokens`` from ``--answer-lens`` and ``ignore_eos``.

Per (model, scheduler, load): offered rate; requests sent, completed, failed (non-200, an
error event) and unfinished (still running at the drain limit); output tokens/s (tokens
streamed from the first arrival to the last answer); p50/p99 time to first token (TTFT)
and inter-token latency (ITL: every gap between streamed tokens, pooled); the mean queue
time from the server's ``/metrics``. Per model at the saturating load: p99 TTFT
static/continuous and tokens/s continuous/static (the target: at least 3x and 1.3x).

    python benchmarks/serve_load.py --device cpu                     # small and demo
    python benchmarks/serve_load.py --quick --json /tmp/sl.json --png /tmp/sl.png
    python benchmarks/serve_load.py --models demo --rates 2,6,12 --duration 20
    vesper bench --only serve_load    # writes benchmarks/results/serve_load.{json,md,png}

Prints a table last; ``--json PATH`` writes the report, ``--png PATH`` (or ``--out-dir
DIR``: ``DIR/serve_load.png``) the chart.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOADS = (("light", 0.3), ("saturating", 1.0), ("overloaded", 2.0))
SCHEDULERS = ("continuous", "static")
WORDS = ("the a of and to in is was it for on with as at by this that from they we you he "
         "she time year people way day man thing life child world school state family group "
         "country problem hand part place case week work number night point home water room "
         "money story fact month book eye job word business side kind head house").split()


# ----------------------------------------------------------------------------- models
def demo_model_dir() -> Path:
    import vesper_sdk

    return Path(vesper_sdk.__file__).resolve().parent / "assets" / "default_model"


def build_random_model(shape: str, folder: Path, seed: int = 0) -> Path:
    """A random-init model folder: the 'small' preset shape (or a tiny one for smoke
    runs) with the demo model's tokenizer, so prompts and answers are real tokens."""
    import torch

    import vesper_sdk as vs

    tok = vs.VesperTokenizer.from_file(demo_model_dir())
    ids = dict(vocab_size=tok.vocab_size, pad_token_id=tok.pad_id, bos_token_id=tok.bos_id,
               eos_token_id=tok.eos_id)
    if shape == "small":
        cfg = vs.VesperConfig.from_preset("small", max_seq_len=1024, **ids)
    else:
        cfg = vs.VesperConfig.from_preset("tiny", hidden_size=64, num_layers=2, num_heads=2,
                                          ffn_hidden_size=128, metahead_hidden_size=32,
                                          max_seq_len=256, **ids)
    torch.manual_seed(seed)
    model = vs.VesperLM(cfg)
    model.save_pretrained(folder)
    tok.save(folder)
    return folder


def resolve_models(names: list[str], work: Path, seed: int) -> dict[str, Path]:
    out = {}
    for name in names:
        if name == "demo":
            out[name] = demo_model_dir()
        elif name in ("small", "tiny"):
            out[name] = build_random_model(name, work / name, seed)
        elif Path(name).is_dir():
            out[Path(name).name] = Path(name)
        else:
            raise SystemExit(f"unknown model {name!r}: small, demo, tiny or a model folder")
    return out


def model_info(folder: Path) -> dict[str, Any]:
    cfg = json.loads((folder / "config.json").read_text())
    keys = ("hidden_size", "num_layers", "num_heads", "ffn_hidden_size", "vocab_size",
            "max_seq_len")
    return {k: cfg.get(k) for k in keys}


# ---------------------------------------------------------------------------- requests
@dataclass
class Job:
    prompt: list[int]
    max_tokens: int


def make_jobs(folder: Path, n: int, prompt_lens: tuple[int, int], answer_lens: tuple[int, int],
              seed: int) -> list[Job]:
    """``n`` requests: BOS + text of random words cut to a length, and an answer length;
    both clipped so prompt + answer fits the model's context."""
    import vesper_sdk as vs

    tok = vs.VesperTokenizer.from_file(folder)
    context = int(json.loads((folder / "config.json").read_text()).get("max_seq_len", 1024))
    rng = random.Random(seed)
    jobs = []
    for _ in range(n):
        plen = rng.randint(*prompt_lens)
        alen = rng.randint(*answer_lens)
        alen = max(1, min(alen, context // 2))
        plen = max(2, min(plen, context - alen))
        ids: list[int] = [tok.bos_id]
        while len(ids) < plen:
            ids += tok.encode(" ".join(rng.choice(WORDS) for _ in range(64)))
        jobs.append(Job(ids[:plen], alen))
    return jobs


def poisson_arrivals(rate: float, duration: float, max_requests: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    t, out = 0.0, []
    while len(out) < max_requests:
        t += rng.expovariate(rate)
        if t > duration and out:
            break
        out.append(t)
    return out


@dataclass
class Result:
    """One request as the client saw it (seconds from its send)."""

    sent: float = 0.0
    status: int = 0
    error: str | None = None
    done: bool = False
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0
    end: float = 0.0
    finish: str | None = None


async def stream_request(client: Any, server: Server, job: Job, result: Result) -> None:
    body = {"model": server.model, "prompt": job.prompt, "max_tokens": job.max_tokens,
            "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    last = t0
    usage_tokens = None
    try:
        async with client.stream("POST", server.url + "/v1/completions", json=body) as resp:
            result.status = resp.status_code
            if resp.status_code != 200:
                result.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    result.done = result.error is None
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = str(event["error"])[:200]
                    continue
                if event.get("usage"):
                    usage_tokens = event["usage"].get("completion_tokens")
                for choice in event.get("choices") or []:
                    ids = (choice.get("vesper") or {}).get("token_ids")
                    k = len(ids) if ids is not None else int(bool(choice.get("text")))
                    if k:
                        now = time.perf_counter()
                        if result.ttft is None:
                            result.ttft = now - t0
                        else:
                            result.gaps += [(now - last) / k] * k
                        last = now
                        result.tokens += k
                    result.finish = choice.get("finish_reason") or result.finish
            if not result.done and result.error is None:
                result.error = "the stream ended without data: [DONE]"
    except Exception as exc:  # connection refused/reset: a failed request, not a crash
        result.error = f"{type(exc).__name__}: {exc}"[:200]
    finally:
        result.end = time.perf_counter() - t0
        if usage_tokens is not None and result.done:
            result.tokens = max(result.tokens, int(usage_tokens))


def _client() -> Any:
    import httpx

    return httpx.AsyncClient(timeout=httpx.Timeout(None), limits=httpx.Limits(
        max_connections=None, max_keepalive_connections=None))


async def open_loop(server: Server, jobs: list[Job], arrivals: list[float], drain_s: float
                    ) -> tuple[list[Result], float]:
    """Send job i at arrivals[i] s; wait at most drain_s after the last arrival.
    Returns the results (times relative to the first arrival) and the wall time."""
    results = [Result() for _ in arrivals]
    async with _client() as client:
        start = time.perf_counter() + 0.05

        async def one(i: int) -> None:
            await asyncio.sleep(max(0.0, start + arrivals[i] - time.perf_counter()))
            results[i].sent = time.perf_counter() - start
            await stream_request(client, server, jobs[i % len(jobs)], results[i])

        tasks = [asyncio.create_task(one(i)) for i in range(len(arrivals))]
        _, pending = await asyncio.wait(tasks, timeout=arrivals[-1] + 0.05 + drain_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    ends = [r.sent + r.end for r in results]
    return results, max(ends) - min(r.sent for r in results)


async def closed_loop(server: Server, jobs: list[Job], concurrency: int, total: int
                      ) -> tuple[list[Result], float]:
    """``concurrency`` clients each sending the next job as soon as theirs is answered,
    until ``total`` requests have been sent; returns results and wall time."""
    results: list[Result] = []
    it = iter(range(total))
    async with _client() as client:
        t0 = time.perf_counter()

        async def worker() -> None:
            for i in it:
                r = Result(sent=time.perf_counter() - t0)
                results.append(r)
                await stream_request(client, server, jobs[i % len(jobs)], r)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return results, time.perf_counter() - t0


# ------------------------------------------------------------------------------ servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``vesper serve`` in a subprocess (same process group: a killed benchmark takes it
    along), its output in a log file; ``url`` once ``/health`` answers 200."""

    def __init__(self, cmd: list[str], port: int, log: Path, health_timeout: float = 180):
        self.cmd, self.port, self.log_path = cmd, port, log
        self.model = ""  # the id it serves, from GET /v1/models
        self.url = f"http://127.0.0.1:{port}"
        self.health_timeout = health_timeout
        self.proc: subprocess.Popen | None = None
        self.start_s = 0.0

    def __enter__(self) -> Server:
        return self

    def start(self) -> Server:
        import httpx

        t0 = time.perf_counter()
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        while time.perf_counter() - t0 < self.health_timeout:
            if self.proc.poll() is not None:
                self.close()
                raise RuntimeError(f"server exited with {self.proc.returncode}: "
                                   f"{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    self.start_s = time.perf_counter() - t0
                    self.model = httpx.get(self.url + "/v1/models").json()["data"][0]["id"]
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.close()
        raise RuntimeError(f"no /health within {self.health_timeout:.0f} s: {self.log_tail()}")

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self, lines: int = 8) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").strip()
                              .splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def queue_counters(self) -> tuple[float, float] | None:
        """(sum, count) of the first '*queue*_seconds' summary in /metrics, if any."""
        import httpx

        try:
            text = httpx.get(self.url + "/metrics", timeout=5).text
        except httpx.HTTPError:
            return None
        found: dict[str, float] = {}
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if "queue" in name and name.endswith(("_seconds_sum", "_seconds_count")):
                found.setdefault(name.rsplit("_", 1)[1], float(value.split()[0]))
        return (found["sum"], found["count"]) if len(found) == 2 else None


# -------------------------------------------------------------------------------- stats
def pct(xs: list[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation), or None without data."""
    if not xs:
        return None
    xs = sorted(xs)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _ms(x: float | None) -> float | None:
    return None if x is None else round(1000 * x, 2)


def summarize(results: list[Result], wall: float) -> dict[str, Any]:
    done = [r for r in results if r.done]
    failed = [r for r in results if r.error is not None]
    gaps = [g for r in done for g in r.gaps]
    ttft = [r.ttft for r in done if r.ttft is not None]
    tokens = sum(r.tokens for r in results)
    return {
        "sent": len(results), "completed": len(done), "errors": len(failed),
        "unfinished": len(results) - len(done) - len(failed),
        "error_example": failed[0].error if failed else None,
        "wall_s": round(wall, 2), "output_tokens": tokens,
        "output_tok_s": round(tokens / wall, 2) if wall > 0 else None,
        "request_rps": round(len(done) / wall, 3) if wall > 0 else None,
        "mean_completion_tokens": round(sum(r.tokens for r in done) / len(done), 1)
        if done else None,
        "stopped_early": sum(r.finish == "stop" for r in done),
        "ttft_p50_ms": _ms(pct(ttft, 50)), "ttft_p99_ms": _ms(pct(ttft, 99)),
        "itl_p50_ms": _ms(pct(gaps, 50)), "itl_p99_ms": _ms(pct(gaps, 99)),
        "e2e_p50_ms": _ms(pct([r.end for r in done], 50)),
    }


def compare(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model at the saturating load: static vs continuous, against the issue's target."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        pick = {r["scheduler"]: r for r in rows
                if r["model"] == model and r["load"] == "saturating"}
        s, c = pick.get("static"), pick.get("continuous")
        if not (s and c and c.get("ttft_p99_ms") and s.get("output_tok_s")):
            continue
        ttft = s["ttft_p99_ms"] / c["ttft_p99_ms"] if s.get("ttft_p99_ms") else None
        tput = c["output_tok_s"] / s["output_tok_s"]
        out.append({"model": model, "load": "saturating",
                    "ttft_p99_static_over_continuous": ttft and round(ttft, 2),
                    "tok_s_continuous_over_static": round(tput, 2),
                    "meets_target": bool(ttft and ttft >= 3.0 and tput >= 1.3)})
    return out


# ------------------------------------------------------------------------------ running
def server_command(scheduler: str, folder: Path, port: int, args: argparse.Namespace
                   ) -> list[str]:
    """``vesper serve`` of ``folder`` with ``scheduler`` (the model name is left as is: the
    client reads it from GET /v1/models)."""
    cmd = [args.python, "-m", "vesper_sdk.cli", "serve", str(folder), "--port", str(port),
           "--log-level", "warning", "--compile" if args.compile else "--no-compile",
           *args.server_arg]
    if args.device != "auto":
        cmd += ["--device", args.device]
    if args.max_batch_size:
        cmd += ["--max-batch-size", str(args.max_batch_size)]
    return [*cmd, "--scheduler", scheduler]


def run_model(name: str, folder: Path, args: argparse.Namespace, work: Path,
              rows: list[dict[str, Any]], notes: list[dict[str, Any]]) -> dict[str, Any]:
    """Every scheduler x load on one model; static first (it measures the capacity)."""
    info: dict[str, Any] = {"folder": str(folder), **model_info(folder)}
    probe_jobs = make_jobs(folder, max(args.probe_requests, 8), args.prompt_lens,
                           args.answer_lens, args.seed + 1)
    capacity = None
    for backend in sorted(args.schedulers, key=lambda s: s != "static"):
        port = free_port()
        server = Server(server_command(backend, folder, port, args), port,
                        work / f"{name}-{backend}.log")
        try:
            server.start()
        except (RuntimeError, OSError) as exc:
            notes.append({"model": name, "scheduler": backend, "error": str(exc)[-500:]})
            continue
        with server:
            print(f"[{name}/{backend}] server up in {server.start_s:.1f} s", flush=True)
            asyncio.run(closed_loop(server, probe_jobs[-4:], 2, 4))  # warm-up
            if capacity is None and args.rates is None:
                res, wall = asyncio.run(closed_loop(server, probe_jobs, args.probe_concurrency,
                                                    args.probe_requests))
                ok = [r for r in res if r.done]
                capacity = len(ok) / wall if ok else None
                info["probe"] = {"scheduler": backend, "concurrency": args.probe_concurrency,
                                 **summarize(res, wall)}
                info["capacity_rps"] = capacity and round(capacity, 3)
                print(f"[{name}/{backend}] capacity {capacity or 0:.2f} req/s (closed loop, "
                      f"{args.probe_concurrency} clients, {len(ok)} requests in {wall:.1f} s)",
                      flush=True)
                if not capacity:
                    notes.append({"model": name, "error": "capacity probe completed nothing: "
                                  f"{info['probe'].get('error_example')}"})
                    return info
            loads = ([(f"rate{i + 1}", None, r) for i, r in enumerate(args.rates)]
                     if args.rates else [(n, f, f * capacity) for n, f in LOADS])
            for li, (load, factor, rate) in enumerate(loads):
                arrivals = poisson_arrivals(rate, args.duration, args.max_requests,
                                            args.seed + 100 * li)
                jobs = make_jobs(folder, len(arrivals), args.prompt_lens, args.answer_lens,
                                 args.seed + 100 * li + 7)
                before = server.queue_counters()
                res, wall = asyncio.run(open_loop(server, jobs, arrivals,
                                                  args.drain_factor * args.duration + 5))
                after = server.queue_counters()
                row = {"model": name, "scheduler": backend, "load": load,
                       "load_factor": factor, "offered_rps": round(rate, 3),
                       **summarize(res, wall)}
                if before and after and after[1] > before[1]:
                    row["queue_mean_ms"] = _ms((after[0] - before[0]) / (after[1] - before[1]))
                rows.append(row)
                print(f"[{name}/{backend}] {load}: {rate:.2f} req/s offered, "
                      f"{row['completed']}/{row['sent']} done, {row['output_tok_s']} tok/s, "
                      f"TTFT p99 {row['ttft_p99_ms']} ms", flush=True)
    return info


# ------------------------------------------------------------------------------- output
COLUMNS = (("model", "model", "{}"), ("scheduler", "sched", "{}"), ("load", "load", "{}"),
           ("offered_rps", "req/s", "{:.2f}"), ("completed", "done", "{}"),
           ("errors", "err", "{}"), ("unfinished", "unfin", "{}"),
           ("output_tok_s", "tok/s", "{:.1f}"), ("ttft_p50_ms", "TTFT p50", "{:.0f}"),
           ("ttft_p99_ms", "TTFT p99", "{:.0f}"), ("itl_p50_ms", "ITL p50", "{:.1f}"),
           ("itl_p99_ms", "ITL p99", "{:.1f}"), ("queue_mean_ms", "queue ms", "{:.0f}"))


def table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    cells = [[h for _, h, _ in COLUMNS]]
    for r in rows:
        cells.append([fmt.format(r[k]) if r.get(k) is not None else "-"
                      for k, _, fmt in COLUMNS])
    if markdown:
        lines = ["| " + " | ".join(c) + " |" for c in cells]
        return "\n".join([lines[0], "|" + "---|" * len(COLUMNS), *lines[1:]])
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(c, widths, strict=True))
                     for c in cells)


def comparison_lines(comps: list[dict[str, Any]]) -> list[str]:
    return [f"{c['model']} at saturating load: p99 TTFT static/continuous "
            f"{c['ttft_p99_static_over_continuous']}x (target >= 3), tokens/s "
            f"continuous/static {c['tok_s_continuous_over_static']}x (target >= 1.3): "
            f"{'met' if c['meets_target'] else 'not met'}" for c in comps]


def chart(report: dict[str, Any], path: Path) -> Path:
    """Three panels against the offered load: output tokens/s, p99 TTFT, p99 ITL."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    rows = [r for r in report["rows"] if r.get("completed")]
    by_factor = all(r.get("load_factor") is not None for r in rows)
    xkey = "load_factor" if by_factor else "offered_rps"
    fig = Figure(figsize=(13, 4), dpi=110)
    panels = (("output_tok_s", "output tokens/s (higher is better)", False),
              ("ttft_p99_ms", "p99 time to first token, ms", True),
              ("itl_p99_ms", "p99 inter-token latency, ms", True))
    colors = {"continuous": "#1f5fbf", "static": "#8c8c8c"}
    styles = ["-o", "--s", ":^", "-.d"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    for i, (key, title, log) in enumerate(panels):
        ax = fig.add_subplot(1, 3, i + 1)
        for m, model in enumerate(models):
            for sched in dict.fromkeys(r["scheduler"] for r in rows):
                pts = sorted((r[xkey], r[key]) for r in rows if r["model"] == model
                             and r["scheduler"] == sched and r.get(key) is not None)
                if pts:
                    ax.plot(*zip(*pts, strict=True), styles[m % len(styles)],
                            color=colors.get(sched, "#e07b1a"), label=f"{model}, {sched}")
        if log:
            ax.set_yscale("log")
            for axis_fmt in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
                axis_fmt(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("offered load (x static capacity)" if by_factor else
                      "offered requests/s")
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7)
    m = report.get("machine", {})
    where = m.get("gpu") or f"{m.get('cpu', '?')} ({m.get('cpu_cores', '?')} cores)"
    fig.suptitle(f"vesper serve under Poisson load: continuous vs static batching\n"
                 f"{where}; {report.get('date', '')[:10]}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _pair(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(",")
    return int(lo), int(hi or lo)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="small,demo",
                    help="comma-separated: small, demo, tiny or model folders")
    ap.add_argument("--schedulers", default=",".join(SCHEDULERS),
                    help="comma-separated: continuous, static")
    ap.add_argument("--device", default="auto", help="vesper serve --device")
    ap.add_argument("--rates", default=None,
                    help="comma-separated requests/s instead of 0.3/1/2 x measured capacity")
    ap.add_argument("--duration", type=float, default=20.0,
                    help="seconds of arrivals per load point")
    ap.add_argument("--max-requests", type=int, default=200, help="cap on requests per point")
    ap.add_argument("--drain-factor", type=float, default=2.0,
                    help="after the last arrival, wait at most this x duration (+5 s) for "
                         "answers; later ones count as unfinished")
    ap.add_argument("--prompt-lens", type=_pair, default=(8, 200), help="MIN,MAX tokens")
    ap.add_argument("--answer-lens", type=_pair, default=(8, 128), help="MIN,MAX tokens")
    ap.add_argument("--probe-concurrency", type=int, default=32,
                    help="clients of the closed-loop capacity probe (static server)")
    ap.add_argument("--probe-requests", type=int, default=96,
                    help="requests of the capacity probe")
    ap.add_argument("--max-batch-size", type=int, default=None,
                    help="vesper serve --max-batch-size (default: the server's)")
    ap.add_argument("--compile", action="store_true",
                    help="let the server torch.compile its decode step (default --no-compile: "
                         "compiles during the load would swamp the latencies)")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra vesper serve argument (repeat the option for each)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: the tiny model, short prompts and answers, 2 s per point")
    ap.add_argument("--json", type=Path, default=None, help="write the report here")
    ap.add_argument("--png", type=Path, default=None, help="write the chart here")
    ap.add_argument("--out-dir", type=Path, default=None,
                    help="write the chart as DIR/serve_load.png (what vesper bench passes)")
    ap.add_argument("--python", default=sys.executable, help="interpreter that runs the server")
    args = ap.parse_args(argv)
    if args.quick:
        defaults = ap.parse_args([])
        for key, value in (("models", "tiny"), ("duration", 2.0), ("max_requests", 24),
                           ("prompt_lens", (4, 32)), ("answer_lens", (4, 16)),
                           ("probe_concurrency", 4), ("probe_requests", 8),
                           ("drain_factor", 1.0)):
            if getattr(args, key) == getattr(defaults, key):
                setattr(args, key, value)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.schedulers = [s.strip() for s in args.schedulers.split(",") if s.strip()]
    bad = [s for s in args.schedulers if s not in SCHEDULERS]
    if bad:
        ap.error(f"unknown scheduler(s) {bad}: choose from {', '.join(SCHEDULERS)}")
    args.rates = [float(r) for r in args.rates.split(",")] if args.rates else None
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    notes: list[dict[str, Any]] = []
    models: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="vesper-serve-load-") as tmp:
        work = Path(tmp)
        for name, folder in resolve_models(args.models, work, args.seed).items():
            models[name] = run_model(name, folder, args, work, rows, notes)
    try:
        from vesper_sdk.benchmarks import suite

        machine, versions = suite.machine_info(args.device), suite.package_versions()
    except Exception as exc:  # the figures still count without their context
        machine, versions = {"error": str(exc)}, {"python": platform.python_version()}
    comps = compare(rows)
    report = {
        "benchmark": "serve_load",
        "command": " ".join(["python", *sys.argv]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine,
        "versions": versions,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                     if k not in ("json", "png", "out_dir", "python")},
        "models": models, "rows": rows, "comparisons": comps, "notes": notes,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    report["markdown"] = "\n\n".join(
        ["## Load points (latencies in ms)", table(rows, markdown=True),
         *(["## Saturating load: continuous vs static", "\n".join(
             f"- {line}" for line in comparison_lines(comps))] if comps else []),
         *(["## Notes", "\n".join(f"- {json.dumps(n)}" for n in notes)] if notes else [])])
    png = args.png or (args.out_dir / "serve_load.png" if args.out_dir else None)
    if png is not None and rows:
        report["png"] = str(chart(report, png))
        print(f"wrote {png}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    for n in notes:
        print(f"note: {json.dumps(n)}")
    for name, info in models.items():
        if info.get("capacity_rps"):
            print(f"{name}: static capacity {info['capacity_rps']} req/s "
                  f"({info['num_layers']} layers, hidden {info['hidden_size']})")
    for line in comparison_lines(comps):
        print(line)
    print(f"\nserve load, {machine.get('gpu') or machine.get('cpu', '?')}, "
          f"{report['wall_s']} s; latencies in ms")
    print(table(rows))
    return 0 if rows and not any("error" in n for n in notes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
