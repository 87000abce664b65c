"""Load: 32 concurrent streaming clients against one server, all answered correctly.

Half ask /v1/completions and half /v1/chat/completions, each with its own prompt and
length. Every stream must be well-formed SSE in OpenAI's chunk format ending with
``data: [DONE]``, carry exactly its own greedy output (the same tokens as the prompt
decoded alone: no request ever receives another's tokens), and the server must still
answer afterwards. Bounded: tiny model, at most 8 new tokens per client.
"""

from __future__ import annotations

import asyncio
import importlib
import random

import httpx
import pytest
from _fixtures_serve import make_tiny_model, parse_sse, server_thread, solo_greedy

import vesper_sdk as vs

srv = importlib.import_module("vesper_sdk.serving")
CLIENTS = 32
MODEL = "tiny"


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory):
    return vs.load(make_tiny_model(tmp_path_factory.mktemp("load") / MODEL), device="cpu")


def make_jobs(llm) -> list[dict]:
    """32 distinct requests with their expected (solo, greedy) token ids and text."""
    rng = random.Random(7)
    words = "the cat dog sun moon star river tree bird fish light night".split()
    jobs = []
    for i in range(CLIENTS):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 6))) + f" {i}"
        max_tokens = rng.randint(3, 8)
        if i % 2:
            messages = [{"role": "user", "content": text}]
            ids = llm.tokenizer.chat_prompt_ids(messages)
            body = {"messages": messages}
            path = "/v1/chat/completions"
        else:
            ids = [llm.tokenizer.bos_id, *llm.tokenizer.encode(text)]
            body = {"prompt": text}
            path = "/v1/completions"
        ref = solo_greedy(llm, ids, max_tokens)
        body.update(model=MODEL, max_tokens=max_tokens, temperature=0, stream=True,
                    stream_options={"include_usage": True})
        jobs.append({"path": path, "body": body, "ids": [t.id for t in ref],
                     "text": "".join(t.text for t in ref)})
    return jobs


def check_stream(job: dict, events: list) -> None:
    """Well-formed chunks whose tokens and text are exactly the job's own."""
    assert events and events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    chunks = events[:-1]
    chat = job["path"].endswith("chat/completions")
    kind = "chat.completion.chunk" if chat else "text_completion"
    assert all(isinstance(c, dict) and "error" not in c for c in chunks), chunks
    assert {c["object"] for c in chunks} == {kind}
    assert len({c["id"] for c in chunks}) == 1 and all(c["model"] == MODEL for c in chunks)
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len(job["ids"])
    body = [c["choices"][0] for c in chunks[:-1]]
    assert all(ch["index"] == 0 for ch in body)
    text = "".join((ch["delta"].get("content") or "") if chat else ch["text"] for ch in body)
    ids = [i for ch in body for i in ch.get("vesper", {}).get("token_ids", [])]
    assert ids == job["ids"]
    assert text == job["text"]
    assert [ch["finish_reason"] for ch in body if ch["finish_reason"]] == ["length"]


@pytest.mark.parametrize("scheduler", ["continuous", "static"])
def test_32_concurrent_streaming_clients(llm, scheduler: str) -> None:
    jobs = make_jobs(llm)
    assert len({tuple(j["ids"]) for j in jobs}) > CLIENTS // 2, "outputs must differ"
    app = srv.create_app(llm, model_name=MODEL, max_batch_size=16, scheduler=scheduler)

    async def one(http: httpx.AsyncClient, url: str, job: dict) -> list:
        lines = []
        async with http.stream("POST", url + job["path"], json=job["body"]) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            async for line in resp.aiter_lines():
                lines.append(line)
        return parse_sse("\n".join(lines))

    async def all_clients(url: str) -> list:
        limits = httpx.Limits(max_connections=CLIENTS + 4)
        async with httpx.AsyncClient(timeout=60, limits=limits) as http:
            return await asyncio.gather(*(one(http, url, job) for job in jobs))

    with server_thread(app) as url:
        results = asyncio.run(all_clients(url))
        for job, events in zip(jobs, results, strict=True):
            check_stream(job, events)
        # Still up, still right, and the requests were decoded in shared batches.
        assert httpx.get(f"{url}/health").json()["status"] == "ok"
        again = httpx.post(f"{url}{jobs[0]['path']}", json={**jobs[0]["body"], "stream": False},
                           timeout=60).json()
        assert again["choices"][0]["vesper"]["token_ids"] == jobs[0]["ids"]
        metrics = httpx.get(f"{url}/metrics").text
    state = app.state.vesper
    steps = state.metrics.steps._value.get()
    tokens = sum(len(j["ids"]) for j in jobs) + len(jobs[0]["ids"])
    # Shared work: far fewer steps (continuous) or batches (static) than tokens or requests.
    assert steps < (tokens / 2 if scheduler == "continuous" else CLIENTS + 1)
    assert ('vesper_requests_total{endpoint="/v1/chat/completions",status="200"} '
            f"{CLIENTS // 2}") in metrics
    assert state.scheduler.queue_size == 0 and state.scheduler.active == 0

