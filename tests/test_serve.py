"""The OpenAI-compatible server: shapes, correctness against the LLM, limits and safety.

A tiny random model is served by uvicorn in a background thread on a free 127.0.0.1
port; most checks go through the official ``openai`` client, the rest through httpx.
"""

from __future__ import annotations

import importlib
import json
import socket
import sys
import threading
from pathlib import Path

import httpx
import openai
import pytest
from _fixtures_serve import (
    ControlledLLM,
    free_port,
    is_cancelled,
    launched,
    make_tiny_model,
    parse_sse,
    server_thread,
    solo_greedy,
    wait_until,
)
from prometheus_client.parser import text_string_to_metric_families

import vesper_sdk as vs
from vesper_sdk import serving as srv
from vesper_sdk.inference import LLM
from vesper_sdk.model import answer_confidence

MODEL = "tiny"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("serve") / MODEL)


@pytest.fixture(scope="module")
def llm(model_dir: Path):
    return vs.load(model_dir, device="cpu")


@pytest.fixture(scope="module", params=["plain", "pipelined"])
def any_llm(request, llm):
    """The loaded LLM, and the same one decoding a step ahead (the CUDA default)."""
    if request.param == "plain":
        return llm
    return LLM(llm.backend, llm.tokenizer, model_dir=llm.model_dir, pipeline=True)


@pytest.fixture(scope="module")
def server(llm):
    app = srv.create_app(llm)
    with server_thread(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    url, _ = server
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def prompt_ids(llm, text: str) -> list[int]:
    return [llm.tokenizer.bos_id, *llm.tokenizer.encode(text)]


def assert_error_shape(resp: httpx.Response, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


# ----------------------------------------------------------------------------- basics
def test_models_and_health(server, client) -> None:
    url, _ = server
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-5")
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL


def test_completion_matches_solo_greedy_with_logprobs(client, llm) -> None:
    prompt = "the cat sees"
    ref = solo_greedy(llm, prompt_ids(llm, prompt), 8)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                  logprobs=1)
    choice = r.choices[0]
    assert choice.text == "".join(t.text for t in ref)
    assert choice.finish_reason == "length"
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == 8
    assert lp.token_logprobs == pytest.approx([t.logprob for t in ref], abs=1e-4)
    assert all(x <= 0 for x in lp.token_logprobs)
    # Offsets count from the start of the prompt, as OpenAI's do, and never go back.
    assert lp.text_offset[0] == len(prompt)
    assert lp.text_offset == sorted(lp.text_offset)
    # Greedy: the chosen token is the most likely one, so top-1 lists exactly it.
    assert [list(d.values())[0] for d in lp.top_logprobs] == pytest.approx(
        lp.token_logprobs, abs=1e-6)
    extra = choice.model_extra["vesper"]
    assert extra["token_ids"] == [t.id for t in ref]
    assert extra["confidence"] == pytest.approx([t.confidence for t in ref], abs=1e-5)
    assert all(0.0 <= c <= 1.0 for c in extra["confidence"])
    assert extra["regulated"] == [t.regulated for t in ref] == [None] * 8  # regulator off
    # The finished choice carries the MetaHead's answer confidence, as the SDK pools it.
    assert extra["answer_confidence"] == pytest.approx(
        answer_confidence([t.answer_logit for t in ref]), abs=1e-5)
    assert r.usage.prompt_tokens == len(prompt_ids(llm, prompt))
    assert r.usage.completion_tokens == 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8


def test_completion_agrees_with_llm_generate(client, llm) -> None:
    # The server's prompt encoding must be the SDK's own: same text as LLM.generate.
    prompt = "hello world"
    expected = llm.generate(prompt, max_new_tokens=6, temperature=0.0)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
    assert r.choices[0].text == expected


def test_chat_non_streaming_logprobs_and_confidence(client, llm) -> None:
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": "what is the moon?"}]
    ids = llm.tokenizer.chat_prompt_ids(messages)
    ref = solo_greedy(llm, ids, 10)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10,
                                       temperature=0, logprobs=True, top_logprobs=1)
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == "".join(t.text for t in ref)
    content = choice.logprobs.content
    assert len(content) == 10
    for item, tok in zip(content, ref, strict=True):
        assert item.logprob == pytest.approx(tok.logprob, abs=1e-4)
        assert bytes(item.bytes) == llm.tokenizer.token_bytes(tok.id)
        assert len(item.top_logprobs) == 1
    assert choice.model_extra["vesper"]["confidence"] == pytest.approx(
        [t.confidence for t in ref], abs=1e-5)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 10


def test_chat_without_logprobs_has_none(client) -> None:
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=3, temperature=0)
    assert r.choices[0].logprobs is None
    assert len(r.choices[0].model_extra["vesper"]["confidence"]) == 3


def test_chat_streaming_matches_non_streaming(client) -> None:
    messages = [{"role": "user", "content": "tell me about the river"}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12,
                                          temperature=0)
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, temperature=0, stream=True,
        logprobs=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    per_token = [c.choices[0].model_extra["vesper"] for c in chunks
                 if c.choices and c.choices[0].model_extra.get("vesper")]
    confidences = [x for v in per_token for x in v["confidence"]]
    assert confidences == pytest.approx(full.choices[0].model_extra["vesper"]["confidence"],
                                        abs=1e-5)
    # Only the choice's last chunk says the answer's confidence: the same as unstreamed.
    answer = [v["answer_confidence"] for v in per_token if "answer_confidence" in v]
    assert answer == pytest.approx([full.choices[0].model_extra["vesper"]["answer_confidence"]],
                                   abs=1e-5)
    assert sum(len(c.choices[0].logprobs.content) for c in chunks
               if c.choices and c.choices[0].logprobs) == 12
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and finishes.count("length") == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_completion_streaming_raw_sse(server, client) -> None:
    url, _ = server
    body = {"model": MODEL, "prompt": "a big tree", "max_tokens": 7, "temperature": 0,
            "stream": True, "logprobs": 0}
    resp = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(resp.text)
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"]
               for c in chunks)
    text = "".join(c["choices"][0]["text"] for c in chunks)
    full = client.completions.create(model=MODEL, prompt="a big tree", max_tokens=7,
                                     temperature=0)
    assert text == full.choices[0].text
    token_chunks = [c for c in chunks if c["choices"][0]["vesper"]["token_ids"]]
    assert len(token_chunks) == 7
    for c in token_chunks:
        lp = c["choices"][0]["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == 1
        assert len(c["choices"][0]["vesper"]["confidence"]) == 1
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_stop_sequence_cuts_the_text(client, llm) -> None:
    prompt = "the small bird"
    ref = "".join(t.text for t in solo_greedy(llm, prompt_ids(llm, prompt), 12))
    visible = [i for i, ch in enumerate(ref) if i > 0 and not ch.isspace()]
    assert visible, f"greedy output too short to test stop strings: {ref!r}"
    cut = visible[len(visible) // 2]
    stop = ref[cut:cut + 2]
    expected = ref[:ref.find(stop)]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                  stop=[stop])
    assert r.choices[0].text == expected
    assert r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12,
                                         temperature=0, stop=stop, stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_several_prompts_and_n(client, llm) -> None:
    prompts = ["the dog", "12+30="]
    r = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=5,
                                  temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for p, prompt in enumerate(prompts):
        ref = "".join(t.text for t in solo_greedy(llm, prompt_ids(llm, prompt), 5))
        assert r.choices[2 * p].text == ref and r.choices[2 * p + 1].text == ref
    assert r.usage.completion_tokens == 20


def test_sampling_uses_seed(client) -> None:
    kwargs = dict(model=MODEL, prompt="the sun", max_tokens=10, temperature=1.0, seed=1234)
    a = client.completions.create(**kwargs).choices[0].text
    b = client.completions.create(**kwargs).choices[0].text
    assert a == b


def test_top_logprobs_are_ranked_alternatives(client) -> None:
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=3)
    for item in r.choices[0].logprobs.content:
        alts = item.top_logprobs
        assert len(alts) == 3
        assert [a.logprob for a in alts] == sorted((a.logprob for a in alts), reverse=True)
        # Greedy: the chosen token is the first alternative.
        assert alts[0].token == item.token
        assert alts[0].logprob == pytest.approx(item.logprob, abs=1e-5)


def test_regulator_flags_reach_the_client(client) -> None:
    # threshold 1.0: every position is under it, so every token is decoded conservatively.
    r = client.completions.create(model=MODEL, prompt="the cat", max_tokens=5, temperature=1.0,
                                  seed=3, extra_body={"regulator": {"threshold": 1.0,
                                                                    "satisfice": False}})
    assert r.choices[0].model_extra["vesper"]["regulated"] == ["conservative"] * 5
    plain = client.completions.create(model=MODEL, prompt="the cat", max_tokens=5,
                                      temperature=1.0, seed=3)
    assert plain.choices[0].model_extra["vesper"]["regulated"] == [None] * 5
    # Satisficing stop as soon as allowed: the answer ends with the regulator's EOS, which
    # shows as finish_reason "stop" and vesper.end_regulated, not as text; like vLLM, the
    # completion's logprobs and usage count it.
    stop_now = {"threshold": 0.0, "stop_threshold": 0.0}
    r = client.completions.create(model=MODEL, prompt="the cat", max_tokens=20, temperature=0,
                                  logprobs=0, extra_body={"regulator": stop_now})
    choice = r.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.model_extra["vesper"]["end_regulated"] == "stopped"
    assert r.usage.completion_tokens == len(choice.logprobs.tokens) == 2
    assert choice.logprobs.tokens[-1] == "<|eos|>" and choice.text == choice.logprobs.tokens[0]
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=20,
        temperature=0, stream=True, extra_body={"regulator": stop_now}))
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].choices[0].model_extra["vesper"]["end_regulated"] == "stopped"


def test_bad_regulator_field_is_400(server) -> None:
    url, _ = server
    for reg in ({"threshold": 2}, {"retries": "two"}, {"treshold": 0.5}, "yes"):
        resp = httpx.post(f"{url}/v1/completions",
                          json={"model": MODEL, "prompt": "hi", "regulator": reg})
        assert_error_shape(resp, 400)


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("body, param", [
    ('{"model": "tiny", "prompt": "hi", ', None),  # malformed JSON
    ('[1, 2]', None),
    ('{"model": "tiny", "prompt": "hi", "max_tokens": "5"}', "max_tokens"),
    ('{"model": "tiny", "prompt": "hi", "temperature": "hot"}', "temperature"),
    ('{"model": "tiny", "prompt": "hi", "temperature": 3.5}', "temperature"),
    ('{"model": "tiny", "prompt": "hi", "max_tokens": 0}', "max_tokens"),
    ('{"model": "tiny", "prompt": "hi", "stream": "yes"}', "stream"),
    ('{"model": "tiny", "prompt": 7}', "prompt"),
    ('{"model": "tiny"}', "prompt"),
    ('{"model": "tiny", "prompt": [99999]}', "prompt"),
    ('{"model": "tiny", "prompt": "hi", "n": 99}', "n"),
    ('{"model": "tiny", "prompt": "hi", "seed": 1180591620717411303424}', "seed"),
    ('{"model": "tiny", "prompt": "hi", "seed": -9223372036854775809}', "seed"),
    ('{"model": "tiny", "prompt": "hi", "logit_bias": {"abc": 1}}', "logit_bias"),
    ('{"model": "tiny", "prompt": "hi", "logit_bias": {"3": 500}}', "logit_bias"),
    ('{"model": "tiny", "prompt": "hi", "response_format": {"type": "json_object"}}',
     "response_format"),
    ('{"model": "tiny", "prompt": "hi", "tools": [{"type": "function"}]}', "tools"),
    ('{"model": "tiny", "prompt": "a\\ud800b"}', "prompt"),
    ('{"model": "tiny", "prompt": "hi", "best_of": 3}', "best_of"),
    ('{"model": "tiny", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}', "stop"),
])
def test_bad_completion_requests_are_400(server, body: str, param: str | None) -> None:
    url, _ = server
    resp = httpx.post(f"{url}/v1/completions", content=body,
                      headers={"content-type": "application/json"})
    err = assert_error_shape(resp, 400)
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] is not None and err["param"].startswith(param), err


@pytest.mark.parametrize("body", [
    {"model": MODEL, "messages": []},
    {"model": MODEL, "messages": "hello"},
    {"model": MODEL, "messages": [{"role": "user"}]},
    {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]},
    {"model": MODEL, "messages": [{"role": "user", "content": 5}]},
    {"model": MODEL, "messages": [{"role": "user",
                                   "content": [{"type": "image_url", "image_url": {}}]}]},
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 50},
])
def test_bad_chat_requests_are_400(server, body: dict) -> None:
    url, _ = server
    assert_error_shape(httpx.post(f"{url}/v1/chat/completions", json=body), 400)


def test_context_window_limits(server, client, llm) -> None:
    url, _ = server
    ctx = llm.config.max_seq_len
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=ctx)
    assert exc.value.code == "context_length_exceeded"
    long_prompt = " ".join(["the cat sees the dog"] * ctx)
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL,
                                       messages=[{"role": "user", "content": long_prompt}])
    assert exc.value.code == "context_length_exceeded"
    # The largest max_tokens that fits is accepted (and comes back as exactly that many).
    room = ctx - len(prompt_ids(llm, "hi"))
    r = client.completions.create(model=MODEL, prompt="hi", max_tokens=room, temperature=0)
    assert r.usage.completion_tokens == room
    # Without max_tokens a chat answer may fill the rest of the window, and no more.
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       temperature=0)
    assert r.usage.total_tokens <= ctx


def test_unknown_model_and_route(server, client) -> None:
    url, _ = server
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="gpt-4o",
                                       messages=[{"role": "user", "content": "hi"}])
    assert exc.value.code == "model_not_found"
    assert_error_shape(httpx.get(f"{url}/v2/nothing"), 404)
    assert_error_shape(httpx.get(f"{url}/v1/completions"), 405)


# ----------------------------------------------------------------------------- safety
def test_api_key_is_enforced(llm) -> None:
    app = srv.create_app(llm, api_key="s3cret", model_name=MODEL)
    with server_thread(app) as url:
        assert_error_shape(httpx.get(f"{url}/v1/models"), 401, "invalid_api_key")
        bad = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"})
        assert_error_shape(bad, 401, "invalid_api_key")
        assert_error_shape(httpx.get(f"{url}/metrics"), 401)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model=MODEL, prompt="hi", max_tokens=2).choices
        assert httpx.get(f"{url}/health").status_code == 200  # probes carry no key


def test_refuses_public_bind_without_key(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv(srv.API_KEY_ENV, raising=False)
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        srv.check_bind(host, None)
    for host in ("0.0.0.0", "::", "192.168.1.10", "example.org"):
        with pytest.raises(ValueError, match="API key"):
            srv.check_bind(host, None)
        srv.check_bind(host, "k")
    # The check runs before the model loads: a missing folder is not what is reported.
    with pytest.raises(ValueError, match="--api-key"):
        srv.serve(tmp_path / "missing", host="0.0.0.0", port=1)
    from vesper_sdk.cli import main

    assert main(["serve", str(tmp_path / "missing"), "--host", "0.0.0.0"]) == 2
    assert "without an API key" in capsys.readouterr().err


def test_a_port_that_cannot_be_bound_is_refused_before_the_model_loads(
        tmp_path: Path, capsys) -> None:
    from vesper_sdk.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=f"cannot listen on 127.0.0.1:{port}"):
            srv.check_port("127.0.0.1", port)
        # A missing model folder is not what is reported: the port is checked first.
        assert main(["serve", str(tmp_path / "missing"), "--port", str(port)]) == 2
        assert "another --port" in capsys.readouterr().err
    srv.check_port("127.0.0.1", port)  # free again
    assert main(["serve", str(tmp_path / "missing"), "--port", "99999"]) == 2
    assert "out of range" in capsys.readouterr().err
    with pytest.raises(ValueError, match="cannot resolve --host"):
        srv.check_port("no-such-host.invalid", 8000)


def test_vs_serve_is_callable_whatever_the_import_order() -> None:
    # vs.serve is the function in the design; importing the submodule must not break it.
    assert callable(vs.serve)
    importlib.import_module("vesper_sdk.serving")
    assert callable(vs.serve)
    with pytest.raises(ValueError, match="API key"):
        vs.serve("nowhere", host="0.0.0.0")


def test_vesper_serve_command_end_to_end(model_dir: Path) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "vesper_sdk.cli", "serve", str(model_dir), "--port",
           str(port), "--api-key", "k3y", "--served-model-name", "vesper-tiny", "--device", "cpu"]
    with launched(cmd, "serving") as line:
        assert f"http://127.0.0.1:{port}/v1" in line and "API key required" in line
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _up(url), what="the server to answer /health")
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k3y", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["vesper-tiny"]
        # Greedy: sampled at the default temperature 1, a random model may draw EOS early.
        r = client.chat.completions.create(model="vesper-tiny", max_tokens=3, temperature=0,
                                           messages=[{"role": "user", "content": "hi"}])
        assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_serve_cli_options() -> None:
    from vesper_sdk.cli import build_parser

    args = build_parser().parse_args(["serve", "runs/a", "--host", "0.0.0.0", "--port", "9000",
                                      "--api-key", "k", "--request-timeout", "5"])
    opts = args._cls(**{k: getattr(args, k) for k in args._cls.__dataclass_fields__})
    assert isinstance(opts, srv.ServeOptions)
    assert (opts.model_dir, opts.host, opts.port, opts.api_key, opts.request_timeout) == (
        "runs/a", "0.0.0.0", 9000, "k", 5.0)


def test_request_timeout_cancels_generation(llm) -> None:
    slow = ControlledLLM(llm, delay=0.05)
    app = srv.create_app(slow, model_name=MODEL, request_timeout=0.3)
    with server_thread(app) as url:
        resp = httpx.post(f"{url}/v1/completions", timeout=60,
                          json={"model": MODEL, "prompt": "hi", "max_tokens": 200,
                                "temperature": 0})
        err = assert_error_shape(resp, 504, "timeout")
        assert "limit" in err["message"]
        (request,) = slow.requests
        wait_until(lambda: is_cancelled(request), what="the cancel flag")
        # Streaming: headers are already sent, so the error arrives as an event.
        resp = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                          json={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                "max_tokens": 200, "stream": True, "temperature": 0})
        events = parse_sse(resp.text)
        assert events[-1] == "[DONE]"
        assert events[-2]["error"]["code"] == "timeout"
        wait_until(lambda: app.state.vesper.scheduler.active == 0, what="an idle batcher")
        assert all(slow.yielded.get(id(r), 0) < 200 for r in slow.requests)


def test_client_disconnect_stops_generation(any_llm) -> None:
    slow = ControlledLLM(any_llm, delay=0.02)
    app = srv.create_app(slow, model_name=MODEL)
    state = app.state.vesper
    max_tokens = 200  # ~4 s of decoding at this delay if nothing stopped it
    with server_thread(app) as url:
        body = {"model": MODEL, "prompt": "the cat", "max_tokens": max_tokens, "stream": True,
                "temperature": 0}
        with httpx.Client(timeout=60) as http, http.stream(
                "POST", f"{url}/v1/completions", json=body) as resp:
            lines = resp.iter_lines()
            got = [line for _, line in zip(range(6), lines, strict=False)]
            assert any(line.startswith("data: ") for line in got)
        # Leaving the block closed the connection mid-stream.
        (request,) = slow.requests
        wait_until(lambda: is_cancelled(request), what="the cancel flag after disconnect")
        wait_until(lambda: state.scheduler.active == 0, what="the generation to stop")
        assert slow.yielded[id(request)] < max_tokens
        # Non-streaming: the server notices between tokens too.
        body["stream"] = False
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json=body, timeout=0.5)
        wait_until(lambda: len(slow.requests) == 2 and is_cancelled(slow.requests[1]),
                   what="the non-streaming request's cancel flag")
        wait_until(lambda: state.scheduler.active == 0, what="the generation to stop")
        assert slow.yielded[id(slow.requests[1])] < max_tokens
        metrics = httpx.get(f"{url}/metrics").text
        assert 'vesper_cancelled_generations_total{reason="disconnect"} 2' in metrics


def test_backend_failure_is_reported_and_survived(llm) -> None:
    class FailsOnce(ControlledLLM):
        failed = False

        def stream_batch(self, requests):
            if not self.failed:
                self.failed = True
                raise RuntimeError("device fell over")
            yield from super().stream_batch(requests)

    app = srv.create_app(FailsOnce(llm), model_name=MODEL)
    with server_thread(app) as url:
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 3, "temperature": 0}
        err = assert_error_shape(httpx.post(f"{url}/v1/completions", json=body), 500)
        assert err["type"] == "server_error" and "device fell over" in err["message"]
        assert httpx.get(f"{url}/health").json()["status"] == "ok"
        ok = httpx.post(f"{url}/v1/completions", json=body)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


# ----------------------------------------------------------------------------- batching
def test_concurrent_requests_are_batched_without_crosstalk(llm, any_llm) -> None:
    gate = threading.Event()
    held = ControlledLLM(any_llm, gate=gate)
    app = srv.create_app(held, model_name=MODEL)
    prompts = ["the cat", "12+7=", "a blue river", "hello", "the moon and the star",
               "fast bird"]
    lengths = [3, 9, 6, 12, 4, 8]  # different lengths: short ones finish first
    refs = ["".join(t.text for t in solo_greedy(llm, prompt_ids(llm, p), n))
            for p, n in zip(prompts, lengths, strict=True)]
    assert len(set(refs)) == len(refs), "the prompts must give distinct outputs"
    results: dict[int, str] = {}
    with server_thread(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)

        def ask(i: int) -> None:
            r = client.completions.create(model=MODEL, prompt=prompts[i], temperature=0,
                                          max_tokens=lengths[i])
            results[i] = r.choices[0].text

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        threads[0].start()
        # The first request holds the worker; the others pile up in the queue behind it.
        wait_until(lambda: len(held.batches) == 1, what="the first batch")
        for t in threads[1:]:
            t.start()
        wait_until(lambda: app.state.vesper.scheduler.queue_size == len(prompts) - 1,
                   what="the queue to fill")
        gate.set()
        for t in threads:
            t.join(60)
    assert [len(b) for b in held.batches] == [1, len(prompts) - 1]
    assert [results[i] for i in range(len(prompts))] == refs


def test_batches_never_cut_a_request_short(llm) -> None:
    # stream_batch pads to the longest prompt and caps every row at context - longest
    # prompt: a long prompt must not share a batch with a request that needs the room.
    gate = threading.Event()
    held = ControlledLLM(llm, gate=gate)
    app = srv.create_app(held, model_name=MODEL)
    ctx = llm.config.max_seq_len
    short = prompt_ids(llm, "hi")
    long_ids = [llm.tokenizer.bos_id] + [short[-1]] * (ctx - 21)
    wants = ctx - len(short)  # the whole window
    results: dict[str, int] = {}
    with server_thread(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)

        def ask(name: str, prompt, max_tokens: int) -> None:
            r = client.completions.create(model=MODEL, prompt=prompt, temperature=0,
                                          max_tokens=max_tokens)
            results[name] = r.usage.completion_tokens

        first = threading.Thread(target=ask, args=("first", "x", 2))
        first.start()
        wait_until(lambda: len(held.batches) == 1, what="the first batch")
        threads = [threading.Thread(target=ask, args=("short", short, wants)),
                   threading.Thread(target=ask, args=("long", long_ids, 20))]
        for n, t in enumerate(threads, start=1):
            t.start()  # one at a time, so the queue order is known
            wait_until(lambda n=n: app.state.vesper.scheduler.queue_size == n,
                       what="the request to queue")
        gate.set()
        for t in [first, *threads]:
            t.join(60)
    assert results == {"first": 2, "short": wants, "long": 20}
    assert [len(b) for b in held.batches] == [1, 1, 1]


# ----------------------------------------------------------------------------- metrics
def test_metrics_prometheus_text(server, client) -> None:
    url, _ = server
    client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    httpx.post(f"{url}/v1/completions", content="{")
    text = httpx.get(f"{url}/metrics").text
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):  # parses, or raises
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            values[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    assert values['vesper_requests_total{endpoint="/v1/completions",status="200"}'] >= 1
    assert values['vesper_requests_total{endpoint="/v1/completions",status="400"}'] >= 1
    assert values["vesper_generated_tokens_total"] >= 2
    assert values["vesper_prompt_tokens_total"] >= 2
    assert values['vesper_request_duration_seconds_count{endpoint="/v1/completions"}'] >= 2
    assert values["vesper_num_requests_waiting"] == 0
    assert values["vesper_num_requests_running"] == 0
    assert values["vesper_engine_steps_total"] >= 1
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds",
                 "request_queue_time_seconds", "e2e_request_latency_seconds",
                 "token_confidence"):
        assert values[f"vesper_{name}_count"] >= 1, name
    # Every generated token's confidence is binned: the histogram counts them all.
    assert values["vesper_token_confidence_count"] == values["vesper_generated_tokens_total"]
    assert values['vesper_regulator_actions_total{action="stopped"}'] >= 0  # always exported
    assert 0.0 <= values["vesper_prefix_cache_hit_rate"] <= 1.0


# ----------------------------------------------------------------------------- backends
def test_quantized_folder_serves(model_dir: Path, tmp_path: Path) -> None:
    quantize = importlib.import_module("vesper_sdk.quantization").quantize
    q_dir = quantize(model_dir, method="int8", out_dir=tmp_path / "tiny-int8", verbose=False)
    app = srv.create_app(q_dir, device="cpu")
    with server_thread(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        r = client.completions.create(model="tiny-int8", prompt="the dog", max_tokens=4,
                                      temperature=0, logprobs=0)
        assert r.usage.completion_tokens == 4
        assert len(r.choices[0].model_extra["vesper"]["confidence"]) == 4
        cfg = json.loads((q_dir / "config.json").read_text())
        assert cfg["quantization"]["method"] == "int8"


def test_onnx_folder_goes_to_onnx_runtime(tmp_path: Path, monkeypatch) -> None:
    import vesper_sdk.export as export_pkg

    folder = tmp_path / "onnx"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"")
    opened = []

    class FakeOnnxModel:
        def __init__(self, path) -> None:
            opened.append(Path(path))

    monkeypatch.setattr(export_pkg, "OnnxModel", FakeOnnxModel, raising=False)
    assert isinstance(srv.load_backend(folder), FakeOnnxModel)
    assert opened == [folder]
    with pytest.raises(FileNotFoundError):
        srv.load_backend(tmp_path / "absent")
