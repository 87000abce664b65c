"""The clients people use: echo with prompt logprobs (lm-evaluation-harness's loglikelihood),
vLLM's tokenizer endpoints and sampling fields, and hostile inputs that must get a 4xx
and never hurt the requests beside them."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import httpx
import openai
import pytest
from _fixtures_serve import make_tiny_model, server_thread

import vesper_sdk as vs
from vesper_sdk import serving as srv

MODEL = "tiny-compat"
SCHEDULER = "continuous"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("compat") / MODEL)


@pytest.fixture(scope="module")
def llm(model_dir: Path):
    return vs.load(model_dir, device="cpu")


@pytest.fixture(scope="module")
def url(llm):
    # No model_name: the id is the folder's name.
    with server_thread(srv.create_app(llm, max_body_bytes=64 * 1024, scheduler=SCHEDULER)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_the_model_id_is_the_folder_name(client) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]


# ----------------------------------------------------------------------------- echo
@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_logprobs_score_the_prompt_like_llm_score(client, llm, max_tokens: int) -> None:
    text = "the cat sees a dog"
    out = client.completions.create(model=MODEL, prompt=text, max_tokens=max_tokens,
                                    echo=True, logprobs=1, temperature=0)
    choice = out.choices[0]
    lp = choice.logprobs
    ref = llm.score(text)  # each token after BOS, given the ones before it
    n_prompt = len(ref) + 1
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == \
        n_prompt + max_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for got, want in zip(lp.token_logprobs[1:n_prompt], ref, strict=True):
        assert math.isclose(got, want.logprob, abs_tol=1e-4)
    # Greedy tokens' logprobs equal their top alternative exactly (lm-eval's is_greedy).
    for tok_lp, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:], strict=True):
        assert tok_lp <= max(top.values()) + 1e-9
    if max_tokens:
        assert lp.token_logprobs[-1] == max(lp.top_logprobs[-1].values())
    assert choice.text.startswith(text)
    assert lp.text_offset[1:n_prompt] == sorted(lp.text_offset[1:n_prompt])
    assert out.usage.prompt_tokens == n_prompt


def test_echo_of_token_id_prompts_in_a_batch(url, llm) -> None:
    """lm-eval sends [[ids], [ids]] with echo, max_tokens 1, logprobs 1."""
    ids = [llm.tokenizer.encode(t) for t in ("1+2=3", "the sun and the moon")]
    body = {"model": MODEL, "prompt": ids, "max_tokens": 1, "logprobs": 1, "echo": True,
            "temperature": 0, "seed": 1234}
    resp = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    choices = sorted(resp.json()["choices"], key=lambda c: c["index"])
    for prompt, choice in zip(ids, choices, strict=True):
        assert len(choice["logprobs"]["token_logprobs"]) == len(prompt) + 1
        ref = llm.score(llm.tokenizer.decode(prompt))  # the same tokens after a BOS
        # Without a BOS the first token has no logprob; the others are scored given it.
        assert choice["logprobs"]["token_logprobs"][0] is None
        assert all(isinstance(x, float) for x in choice["logprobs"]["token_logprobs"][1:])
        assert len(ref) == len(prompt)


def test_echo_streams_the_prompt_first(url) -> None:
    body = {"model": MODEL, "prompt": "hello world", "max_tokens": 3, "echo": True,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as resp:
        data = [json.loads(line[6:]) for line in resp.iter_lines()
                if line.startswith("data: {")]
    assert data[0]["choices"][0]["text"] == "hello world"
    assert sum(1 for d in data[1:] if d["choices"] and d["choices"][0]["text"]) >= 1


# ----------------------------------------------------------------------------- vLLM
def test_tokenize_detokenize_and_tokenizer_info(url, llm) -> None:
    tok = llm.tokenizer
    info = httpx.get(f"{url}/tokenizer_info").json()
    assert info["eos_token_id"] == tok.eos_id and info["model_max_length"] == llm.max_seq_len
    # lm-eval reads the special tokens' ids back through /tokenize.
    for name, tid in ((info["eos_token"], tok.eos_id), (info["bos_token"], tok.bos_id)):
        got = httpx.post(f"{url}/tokenize", json={"prompt": name, "add_special_tokens": False})
        assert got.json()["tokens"] == [tid]
    out = httpx.post(f"{url}/tokenize", json={"model": MODEL, "prompt": "the cat",
                                               "return_token_strs": True}).json()
    assert out["tokens"] == [tok.bos_id, *tok.encode("the cat")]
    assert out["count"] == len(out["tokens"]) and out["max_model_len"] == llm.max_seq_len
    assert "".join(out["token_strs"][1:]) == "the cat"
    chat = httpx.post(f"{url}/tokenize", json={"messages": [{"role": "user", "content": "hi"}]})
    assert chat.json()["tokens"] == tok.chat_prompt_ids([{"role": "user", "content": "hi"}])
    back = httpx.post(f"{url}/detokenize", json={"tokens": tok.encode("the cat")}).json()
    assert back == {"prompt": "the cat"}
    assert httpx.post(f"{url}/detokenize", json={"tokens": [10**6]}).status_code == 400
    assert httpx.post(f"{url}/tokenize", json={"prompt": "x", "model": "other"}
                      ).status_code == 404


def test_vllm_sampling_fields_are_honoured(client, llm) -> None:
    base = dict(model=MODEL, prompt="hello", max_tokens=6, temperature=0)
    forced = client.completions.create(**base, logit_bias={"7": 100})
    assert forced.choices[0].model_extra["vesper"]["token_ids"] == [7] * 6
    extra = client.completions.create(**base, extra_body=dict(
        top_k=5, min_p=0.1, repetition_penalty=1.3, ignore_eos=True, min_tokens=2))
    assert extra.usage.completion_tokens == 6
    plain = client.completions.create(**base).choices[0].model_extra["vesper"]["token_ids"]
    penalised = client.completions.create(**base, frequency_penalty=2.0, presence_penalty=1.0)
    assert len(set(penalised.choices[0].model_extra["vesper"]["token_ids"])) > len(set(plain))
    chat = client.chat.completions.create(model=MODEL, max_tokens=3, temperature=0,
                                          messages=[{"role": "user", "content": "hi"}],
                                          response_format={"type": "text"})
    assert chat.choices[0].finish_reason


# ----------------------------------------------------------------------------- hostile
def test_a_bad_seed_fails_alone_among_good_requests(url) -> None:
    async def go() -> list[int]:
        async with httpx.AsyncClient(timeout=60) as http:
            bodies = [{"model": MODEL, "prompt": f"the cat {i}", "max_tokens": 4,
                       "temperature": 1.0, "seed": i} for i in range(11)]
            bodies.insert(5, {**bodies[0], "seed": 2**70})
            resps = await asyncio.gather(*(http.post(f"{url}/v1/completions", json=b)
                                           for b in bodies))
            return [r.status_code for r in resps]

    codes = asyncio.run(go())
    assert codes[5] == 400 and codes[:5] + codes[6:] == [200] * 11


@pytest.mark.parametrize("body", [
    {"messages": [{"role": "user", "content": "a\ud800b"}]},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]},
    {"messages": [{"role": "user", "content": "hi"}], "stop": ["\ud800"]},
    {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
    {"messages": [{"role": "user", "content": "hi"}],
     "response_format": {"type": "json_schema"}},
    {"messages": [{"role": "user", "content": "hi"}], "tool_choice": "auto"},
])
def test_hostile_chat_bodies_are_400(url, body: dict) -> None:
    # json.dumps keeps lone surrogates as \ud800 escapes: valid JSON, invalid Unicode.
    resp = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                      content=json.dumps({"model": MODEL, "max_tokens": 2, **body}),
                      headers={"content-type": "application/json"})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"]


def test_a_body_over_the_limit_is_413_and_the_server_carries_on(url) -> None:
    big = {"model": MODEL, "prompt": "a " * 40_000, "max_tokens": 1}  # ~80 kB > 64 kB
    resp = httpx.post(f"{url}/v1/completions", json=big, timeout=60)
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(100):
            yield b" " * 1024

    resp = httpx.post(f"{url}/v1/completions", content=chunks(), timeout=60,
                      headers={"content-type": "application/json"})
    assert resp.status_code == 413
    assert httpx.get(f"{url}/health").status_code == 200


def test_a_prompt_too_long_for_the_context_is_refused_before_tokenizing(url, llm) -> None:
    text = "x" * (llm.max_seq_len * 64)  # under the body limit, over any tokenization
    resp = httpx.post(f"{url}/v1/completions", timeout=60,
                      json={"model": MODEL, "prompt": text, "max_tokens": 1})
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "context_length_exceeded"


def test_served_model_name_option() -> None:
    opts = srv.ServeOptions(model_dir="x")
    assert opts.served_model_name is None and opts.scheduler == "auto"


def test_a_short_request_finishes_during_a_long_stream(url) -> None:
    """Continuous batching over HTTP: the short request does not wait for the long one."""
    order: list[str] = []

    async def go() -> None:
        async with httpx.AsyncClient(timeout=120) as http:
            first_chunk = asyncio.Event()

            async def long() -> None:
                body = {"model": MODEL, "prompt": "the cat", "max_tokens": 200,
                        "temperature": 0, "stream": True, "ignore_eos": True}
                async with http.stream("POST", f"{url}/v1/completions", json=body) as resp:
                    async for line in resp.aiter_lines():
                        if line.startswith("data: {"):
                            first_chunk.set()
                order.append("long")

            async def short() -> None:
                await first_chunk.wait()
                resp = await http.post(f"{url}/v1/completions", json={
                    "model": MODEL, "prompt": "hello", "max_tokens": 2, "temperature": 0})
                assert resp.status_code == 200
                order.append("short")

            await asyncio.gather(long(), short())

    asyncio.run(go())
    assert order == ["short", "long"]


def test_the_regulator_abstains_through_the_api(client) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
        temperature=0, extra_body={"regulator": {"abstain_below": 1.0, "threshold": 0.0}})
    choice = reply.choices[0]
    assert choice.message.content == "I'm not sure." and choice.finish_reason == "stop"
    assert set(choice.model_extra["vesper"]["regulated"]) == {"abstained"}


def test_prefix_reuse_shows_in_metrics(url) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    def counters() -> dict[str, float]:
        text = httpx.get(f"{url}/metrics").text
        return {s.name: s.value for f in text_string_to_metric_families(text)
                for s in f.samples if s.name.startswith("vesper_prefix_cache")}

    before = counters()
    system = {"role": "system", "content": "the cat sees a dog and the sun and the moon"}
    for question in ("hello world", "the river"):
        body = {"model": MODEL, "max_tokens": 2, "temperature": 0,
                "messages": [system, {"role": "user", "content": question}]}
        assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).status_code == 200
    after = counters()
    # The second chat's system prompt came from the first one's slot.
    assert after["vesper_prefix_cache_hits_total"] - before["vesper_prefix_cache_hits_total"] >= 8
    assert after["vesper_prefix_cache_queries_total"] > before["vesper_prefix_cache_queries_total"]
    assert 0 < after["vesper_prefix_cache_hit_rate"] <= 1
