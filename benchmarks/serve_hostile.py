"""Hostile inputs against a running ``vesper serve``: status codes, and /health meanwhile.

Starts ``vesper serve MODEL`` (the bundled demo model by default) and sends what broke
the server before: a ``seed`` of 2**70 among eleven normal requests, lone surrogates in
messages, a 50 MB body, a 5 MB prompt, fields the server does not implement
(``response_format``, ``tools``), a bad ``logit_bias``, truncated JSON. Every answer must
be a 4xx (or a 200 for the normal requests); while the 5 MB prompts are being refused,
``GET /health`` is timed from another connection.

    python benchmarks/serve_hostile.py [--model DIR] [--json PATH]

Prints one row per input (status codes seen) and the /health latencies; exits 1 on any
5xx or a failed normal request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from vesper_sdk.benchmarks.serve_load import Server, free_port

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "vesper_sdk" / "assets" / "default_model"
NAME = "hostile"


def server_command(model: Path, port: int) -> list[str]:
    vesper = Path(sys.executable).with_name("vesper")
    return [str(vesper), "serve", str(model), "--port", str(port), "--served-model-name",
            NAME, "--device", "cpu", "--log-level", "warning"]


def chat(content: str, **extra) -> dict:
    return {"model": NAME, "max_tokens": 4, "messages": [{"role": "user", "content": content}],
            **extra}


async def run(url: str) -> dict:
    rows: list[dict] = []
    async with httpx.AsyncClient(timeout=300) as http:
        async def post(path: str, body: dict | None = None, content: bytes | None = None,
                       ) -> int:
            if content is None:
                content = json.dumps(body).encode()
            r = await http.post(url + path, content=content,
                                headers={"content-type": "application/json"})
            return r.status_code

        def row(name: str, codes: list[int], expect: str) -> None:
            rows.append({"input": name, "codes": codes, "expect": expect})

        # A huge seed among normal requests: it alone fails.
        bodies = [{"model": NAME, "prompt": f"2+{i}=", "max_tokens": 8, "seed": i,
                   "temperature": 1.0} for i in range(11)]
        bodies.insert(3, {**bodies[0], "seed": 2**70})
        codes = await asyncio.gather(*(post("/v1/completions", b) for b in bodies))
        row("seed 2**70 (request 4 of 12)", [codes[3]], "4xx")
        row("the 11 normal requests beside it", codes[:3] + codes[4:], "200")
        # Lone surrogates: valid JSON escapes, invalid Unicode.
        row("lone surrogate in a message", [await post("/v1/chat/completions",
                                                        chat("a\ud800b"))], "4xx")
        row("lone surrogate in a stop string", [await post(
            "/v1/chat/completions", chat("hi", stop=["\udfff"]))], "4xx")
        row("response_format json_object", [await post(
            "/v1/chat/completions", chat("hi", response_format={"type": "json_object"}))],
            "4xx")
        row("tools", [await post("/v1/chat/completions", chat("hi", tools=[
            {"type": "function", "function": {"name": "f"}}]))], "4xx")
        row("logit_bias on a token id out of range", [await post(
            "/v1/chat/completions", chat("hi", logit_bias={"99999999": 5}))], "4xx")
        row("truncated JSON", [await post("/v1/completions", content=b'{"model": "ho')],
            "4xx")
        row("prompt of 10**6 token ids", [await post("/v1/completions", {
            "model": NAME, "prompt": [5] * 10**6, "max_tokens": 1})], "4xx")
        # 50 MB body, then 5 MB prompts while /health is polled from another connection.
        big = json.dumps(chat("x" * 50 * 2**20)).encode()
        t0 = time.perf_counter()
        row("50 MB body", [await post("/v1/chat/completions", content=big)], "4xx")
        fifty_s = time.perf_counter() - t0
        five = json.dumps({"model": NAME, "prompt": "word " * (2**20), "max_tokens": 1}
                          ).encode()
        health: list[float] = []
        stop = asyncio.Event()

        async def poll() -> None:
            async with httpx.AsyncClient(timeout=30) as other:
                while not stop.is_set():
                    t = time.perf_counter()
                    await other.get(url + "/health")
                    health.append(time.perf_counter() - t)
                    await asyncio.sleep(0.01)

        # Just under the 4 MB body limit: parsed, then refused by its length in bytes
        # (more than the context window can hold whatever its tokens) before tokenizing.
        under = json.dumps({"model": NAME, "prompt": "word " * 800_000, "max_tokens": 1}
                           ).encode()
        poller = asyncio.create_task(poll())
        five_codes = [await post("/v1/completions", content=five) for _ in range(10)]
        under_codes = [await post("/v1/completions", content=under) for _ in range(10)]
        stop.set()
        await poller
        row("5 MB prompt (x10)", five_codes, "4xx")
        row("3.9 MB prompt (x10, under the body limit)", under_codes, "4xx")
    return {"rows": rows, "health_ms": [round(h * 1000, 2) for h in health],
            "fifty_mb_s": round(fifty_s, 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=DEMO, help="model folder to serve")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    port = free_port()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory() as tmp, Server(
            server_command(args.model, port), port, Path(tmp) / "serve.log",
            health_timeout=120).start() as server:
        result = asyncio.run(run(server.url))
        alive = httpx.get(server.url + "/health", timeout=5).status_code == 200
    bad = 0
    print(f"{'input':<40} {'status codes':<28} expected")
    for r in result["rows"]:
        ok = all((c == 200) if r["expect"] == "200" else (400 <= c < 500) for c in r["codes"])
        bad += not ok
        print(f"{r['input']:<40} {','.join(map(str, sorted(set(r['codes'])))):<28} "
              f"{r['expect']}{'' if ok else '  <-- FAIL'}")
    h = result["health_ms"]
    fivexx = sum(c >= 500 for r in result["rows"] for c in r["codes"])
    result.update(server_errors=fivexx, alive_after=alive, health_polls=len(h),
                  health_p50_ms=statistics.median(h) if h else None,
                  health_max_ms=max(h) if h else None)
    print(f"5xx answers: {fivexx}; server alive after: {alive}; 50 MB body answered in "
          f"{result['fifty_mb_s']} s")
    if h:
        print(f"/health while 5 MB and 3.9 MB prompts were refused: {len(h)} polls, p50 "
              f"{result['health_p50_ms']:.1f} ms, max {result['health_max_ms']:.1f} ms")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 1 if bad or fivexx or not alive else 0


if __name__ == "__main__":
    sys.exit(main())
