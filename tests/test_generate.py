"""Generation: greedy/sampled decoding, batching, streaming, stop handling, regulator."""

from __future__ import annotations

import copy
import io
import json
import random
import re
import threading

import pytest
import torch

import vesper_sdk as vs
from vesper_sdk import cli
from vesper_sdk.eval.regulator import MetacognitiveRegulator
from vesper_sdk.inference import (
    LLM,
    GenerationRequest,
    SamplingParams,
    StepOutput,
    Token,
    TorchBackend,
)
from vesper_sdk.inference.decode_swaps import DenseProduct, MatVecHead

MULTIBYTE = "héllo wörld 🙂 世界 こんにちは ça déjà"


def corpus(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = "the cat dog sun moon red blue small big runs sees a and is river tree".split()
    out = []
    for i in range(n):
        if i % 3 == 0:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            out.append(f"{a}+{b}={a + b}")
        elif i % 3 == 1:
            out.append(" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) + ".")
        else:
            out.append(MULTIBYTE)
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy 2-core machine every
    parallel region may wait a scheduler tick for it; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer() -> vs.VesperTokenizer:
    return vs.VesperTokenizer.train(corpus(), vocab_size=400, min_frequency=1)


def tiny_model(tokenizer: vs.VesperTokenizer, seed: int = 0) -> vs.VesperLM:
    """A tiny random VesperLM whose greedy output depends on the prompt and is plain text.

    FlyLoRA's up-projection is randomised (it starts at zero) so that its top-k rank
    routing takes part; the special tokens' embedding rows are zeroed so their tied logits
    are 0 and an ordinary token always wins (EOS is tested with a scripted backend); the
    MetaHead gets a wide init so confidences spread over (0, 1).
    """
    torch.manual_seed(seed)
    cfg = vs.VesperConfig.from_preset(
        "tiny", hidden_size=64, num_layers=2, num_heads=2, ffn_hidden_size=128,
        vocab_size=tokenizer.vocab_size, max_seq_len=128, metahead_hidden_size=32,
        pad_token_id=tokenizer.pad_id, bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id)
    model = vs.VesperLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0.0, 0.05)
        for block in model.blocks:
            block.attn.qkv.weight.normal_(0.0, 0.3)
        model.embed.weight[sorted(tokenizer.special_ids)] = 0.0
        model.metahead.out.weight.normal_(0.0, 1.0)
    return model


@pytest.fixture(scope="module")
def model(tokenizer) -> vs.VesperLM:
    return tiny_model(tokenizer)


@pytest.fixture(scope="module")
def lm(model, tokenizer) -> LLM:
    return LLM(copy.deepcopy(model), tokenizer)


def ids_of(tokens: list[Token]) -> list[int]:
    return [t.id for t in tokens]


# ----------------------------------------------------------------------------- greedy
def test_greedy_equals_step_by_step_full_forward(lm, model, tokenizer):
    """The cached loop picks what an uncached full forward picks, token after token."""
    prompt = "the cat sees"
    tokens = list(lm.stream(prompt, max_new_tokens=20, temperature=0.0))
    assert len(tokens) == 20 and tokens[-1].finish_reason == "length"
    ref = copy.deepcopy(model)  # original memory layout: the CPU re-layout changes nothing
    ids = tokenizer.encode(prompt, add_bos=True)
    with torch.no_grad():
        for tok in tokens:
            out = ref(torch.tensor([ids]))
            logits = out.logits[0, -1]
            assert tok.id == int(logits.argmax())
            assert tok.logprob == pytest.approx(float(logits.log_softmax(-1)[tok.id]), abs=1e-4)
            assert tok.confidence == pytest.approx(float(out.confidence[0, -1]), abs=1e-5)
            assert tok.stop_prob == pytest.approx(float(out.stop[0, -1]), abs=1e-5)
            ids.append(tok.id)
    assert "".join(t.text for t in tokens) == tokenizer.decode(ids_of(tokens))
    assert lm.generate(prompt, max_new_tokens=20, temperature=0.0) == tokenizer.decode(
        ids_of(tokens))


def test_batched_generation_equals_each_prompt_alone(lm):
    prompts = ["the cat", "2+3=", "a small red river tree and the dog", "é"]
    batched = lm.generate_tokens(prompts, max_new_tokens=12, temperature=0.0)
    for prompt, row in zip(prompts, batched, strict=True):
        alone = list(lm.stream(prompt, max_new_tokens=12, temperature=0.0))
        assert ids_of(row) == ids_of(alone)
        for a, b in zip(row, alone, strict=True):
            assert a.confidence == pytest.approx(b.confidence, abs=1e-4)
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
    texts = lm.generate(prompts, max_new_tokens=12, temperature=0.0)
    assert texts == ["".join(t.text for t in row) for row in batched]


def test_cpu_decodes_over_the_static_cache_and_compiles_only_when_asked(model):
    # The default decodes eagerly over the static cache, so a one-shot run never waits
    # for a compiler; what compile=True compiles is that step.
    plain = TorchBackend(copy.deepcopy(model))
    assert plain.static_cache is True and plain.compile is False
    compiled = TorchBackend(copy.deepcopy(model), compile=True)
    assert compiled.static_cache is True and compiled.compile is True
    assert TorchBackend(copy.deepcopy(model), compile=True, static_cache=False).compile is False
    with pytest.raises(ValueError, match="cuda_graph=True needs a model on a CUDA device"):
        TorchBackend(copy.deepcopy(model), cuda_graph=True)


def test_compiled_cpu_step_gives_the_eager_tokens_and_follows_weight_updates(model,
                                                                              tokenizer):
    eager_model, compiled_model = copy.deepcopy(model), copy.deepcopy(model)
    eager = LLM(eager_model, tokenizer)
    backend = TorchBackend(compiled_model, compile=True)
    compiled = LLM(backend, tokenizer)
    # Three rows of different lengths (left padding), then one alone (none).
    prompts = ["the cat", "a small red river tree and the dog", "2+2="]
    before = assert_same_greedy(eager, compiled, prompts, 12, conf_tol=1e-4)
    assert assert_same_greedy(eager, compiled, prompts[:1], 12, conf_tol=1e-4) == before[:1]
    assert backend.compile is True  # it compiled (a failure would have turned this off)
    # An in-place update (as an optimizer step makes) must reach the compiled step, whose
    # threaded products hold a copy of the weights.
    with torch.no_grad():
        for m in (eager_model, compiled_model):
            m.blocks[0].ffn.down.weight.mul_(-3.0)
            m.embed.weight.add_(0.05)
    assert assert_same_greedy(eager, compiled, prompts, 12, conf_tol=1e-4) != before


def test_stacked_ffn_pairs_decode_the_same_tokens_and_follow_weight_updates(model,
                                                                           tokenizer):
    """``pair_ffn`` (what a GPU would run: one F.linear per pair), eager and compiled."""
    prompts = ["the cat", "a small red river tree and the dog", "2+2="]
    for compile in (False, True):
        ref_model, m = copy.deepcopy(model), copy.deepcopy(model)
        ref = LLM(TorchBackend(ref_model, static_cache=False, matvec_parts=0), tokenizer)
        backend = TorchBackend(m, matvec_parts=0, pair_ffn=True, compile=compile)
        paired = [b.ffn.pair for b in m.blocks]
        assert all(isinstance(p.product, DenseProduct) for p in paired)
        before = assert_same_greedy(ref, LLM(backend, tokenizer), prompts, 12, 1e-5)
        with torch.no_grad():  # an in-place update the stacked copies must follow
            for mm in (ref_model, m):
                mm.blocks[0].ffn.up.lora_B.mul_(-3.0)
                mm.blocks[1].ffn.gate.weight.add_(0.05)
        after = assert_same_greedy(ref, LLM(backend, tokenizer), prompts, 12, 1e-5)
        assert after != before
        assert all(b.ffn.pair is not p for b, p in zip(m.blocks, paired, strict=True))


def assert_same_greedy(a: LLM, b: LLM, prompts: list[str], new_tokens: int,
                       conf_tol: float) -> list[list[int]]:
    """Both LLMs decode the same greedy tokens (log-probs and confidence within tolerance);
    returns the token ids."""
    ra = a.generate_tokens(prompts, max_new_tokens=new_tokens, temperature=0.0)
    rb = b.generate_tokens(prompts, max_new_tokens=new_tokens, temperature=0.0)
    assert [ids_of(r) for r in ra] == [ids_of(r) for r in rb]
    for row_a, row_b in zip(ra, rb, strict=True):
        for x, y in zip(row_a, row_b, strict=True):
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4)
            assert x.confidence == pytest.approx(y.confidence, abs=conf_tol)
    return [ids_of(r) for r in ra]


def test_static_cache_path_equals_dynamic_cache(model, tokenizer):
    """The static-cache decode step (the CPU default) matches VesperLM.forward's cache."""
    dynamic = LLM(TorchBackend(copy.deepcopy(model), static_cache=False), tokenizer)
    backend = TorchBackend(copy.deepcopy(model), static_cache=True, compile=False)
    static = LLM(backend, tokenizer)
    # Three rows of different lengths: left padding, so the step takes the key mask.
    prompts = ["the cat", "a small red river tree and the dog", "2+2="]
    assert_same_greedy(dynamic, static, prompts, 15, conf_tol=1e-5)
    # Two streams (no padding, no mask) consumed in turn each get their own buffers.
    s1 = static.stream("the cat", max_new_tokens=10, temperature=0.0)
    s2 = static.stream("2+2=", max_new_tokens=10, temperature=0.0)
    pairs = list(zip(s1, s2, strict=True))
    assert [t.id for t, _ in pairs] == ids_of(list(dynamic.stream(
        "the cat", max_new_tokens=10, temperature=0.0)))
    assert [t.id for _, t in pairs] == ids_of(list(dynamic.stream(
        "2+2=", max_new_tokens=10, temperature=0.0)))


def test_prefill_runs_once_then_one_token_steps(lm, tokenizer):
    calls: list[tuple[int, int, bool]] = []
    backend = lm.backend
    original = backend.forward

    def spy(input_ids, attention_mask, position_ids, past):
        calls.append((input_ids.shape[1], attention_mask.shape[1], past is None))
        return original(input_ids, attention_mask, position_ids, past)

    backend.forward = spy
    try:
        lm.generate(["the cat sees", "2+2="], max_new_tokens=6, temperature=0.0)
    finally:
        del backend.forward
    p = max(len(tokenizer.encode(x, add_bos=True)) for x in ("the cat sees", "2+2="))
    assert calls[0] == (p, p, True)
    assert [c[0] for c in calls[1:]] == [1] * 5
    assert [c[1] for c in calls[1:]] == list(range(p + 1, p + 6))
    assert not any(c[2] for c in calls[1:])


# ----------------------------------------------------------------------------- sampling
def test_seeded_sampling_is_reproducible_and_seeds_differ(lm):
    kw = dict(max_new_tokens=20, temperature=1.0)
    a = lm.generate("the cat", seed=1, **kw)
    assert a == lm.generate("the cat", seed=1, **kw)
    assert a != lm.generate("the cat", seed=2, **kw)
    torch.manual_seed(5)
    c = lm.generate("the cat", **kw)
    torch.manual_seed(5)
    assert c == lm.generate("the cat", **kw)


def test_top_k_1_and_tiny_top_p_equal_greedy(lm):
    greedy = lm.generate("the dog", max_new_tokens=15, temperature=0.0)
    assert lm.generate("the dog", max_new_tokens=15, temperature=1.5, top_k=1, seed=3) == greedy
    assert lm.generate("the dog", max_new_tokens=15, temperature=1.5, top_p=1e-6,
                       seed=3) == greedy


def test_top_k_restricts_choices(lm, model, tokenizer):
    """With top_k=3 every sampled token is one of the three most likely there."""
    ref = copy.deepcopy(model)
    tokens = list(lm.stream("the", max_new_tokens=15, temperature=2.0, top_k=3, seed=0))
    ids = tokenizer.encode("the", add_bos=True)
    with torch.no_grad():
        for tok in tokens:
            top3 = ref(torch.tensor([ids])).logits[0, -1].topk(3).indices.tolist()
            assert tok.id in top3
            ids.append(tok.id)
    assert len(set(ids_of(tokens))) > 1


def test_repetition_penalty_avoids_seen_tokens(lm, tokenizer):
    prompt = "the cat"
    plain = list(lm.stream(prompt, max_new_tokens=12, temperature=0.0))
    assert len(set(ids_of(plain))) < len(plain)  # the random model repeats itself
    penalised = list(lm.stream(prompt, max_new_tokens=12, temperature=0.0,
                               repetition_penalty=1e4))
    seen = set(tokenizer.encode(prompt, add_bos=True))
    for tok in penalised:
        assert tok.id not in seen
        seen.add(tok.id)


# ----------------------------------------------------------------------------- stops
def test_stop_string_ends_the_row_before_it(lm):
    full = lm.generate("2+3=", max_new_tokens=30, temperature=0.0)
    stop = full[6:9]
    cut = full[: full.find(stop)]
    tokens = list(lm.stream("2+3=", max_new_tokens=30, temperature=0.0, stop=[stop, "zzzz"]))
    assert "".join(t.text for t in tokens) == cut
    assert tokens[-1].finish_reason == "stop"
    assert lm.generate("2+3=", max_new_tokens=30, temperature=0.0, stop=stop) == cut
    # A stop string that never appears changes nothing.
    assert lm.generate("2+3=", max_new_tokens=30, temperature=0.0, stop="\x00") == full


class ScriptedBackend:
    """A DecodeBackend whose row r 'predicts' scripts[r][k] at its k-th generated token."""

    def __init__(self, vocab_size: int, scripts: list[list[int]], confidence: float = 0.9,
                 stop: float = 0.1) -> None:
        self.vocab_size, self.max_seq_len = vocab_size, 256
        self.device = torch.device("cpu")
        self.scripts, self.conf, self.stop = scripts, confidence, stop

    def forward(self, input_ids, attention_mask, position_ids, past) -> StepOutput:
        b, s = input_ids.shape
        step = 0 if past is None else past + 1
        logits = torch.zeros(b, s, self.vocab_size)
        for r in range(b):
            script = self.scripts[r % len(self.scripts)]
            logits[r, -1, script[min(step, len(script) - 1)]] = 20.0
        conf = torch.full((b, s), self.conf)
        # The answer logit as an unfitted answer row gives it: the confidence logit.
        return StepOutput(logits, conf, torch.full((b, s), self.stop), step, torch.logit(conf))


def byte_ids(tokenizer: vs.VesperTokenizer) -> dict[int, int]:
    """byte value -> id of the single-byte token for it."""
    out = {}
    for i in range(tokenizer.vocab_size):
        raw = tokenizer.token_bytes(i)
        if len(raw) == 1:
            out[raw[0]] = i
    assert len(out) == 256
    return out


def test_eos_ends_the_row_with_a_special_token(tokenizer):
    a, b = tokenizer.encode("the")[0], tokenizer.encode(" cat")[0]
    backend = ScriptedBackend(tokenizer.vocab_size, [[a, b, tokenizer.eos_id, a, a]])
    lm = LLM(backend, tokenizer)
    tokens = list(lm.stream("x", max_new_tokens=10, temperature=0.0))
    assert ids_of(tokens) == [a, b, tokenizer.eos_id]
    assert tokens[-1].special and tokens[-1].text == "" and tokens[-1].finish_reason == "eos"
    assert [t.finish_reason for t in tokens[:-1]] == [None, None]
    assert lm.generate("x", max_new_tokens=10, temperature=0.0) == "the cat"


def test_streaming_never_splits_a_character(tokenizer):
    """Every character of MULTIBYTE arrives one byte-token at a time; no U+FFFD, ever."""
    table = byte_ids(tokenizer)
    script = [table[x] for x in MULTIBYTE.encode()] + [tokenizer.eos_id]
    lm = LLM(ScriptedBackend(tokenizer.vocab_size, [script]), tokenizer)
    tokens = list(lm.stream("x", max_new_tokens=200, temperature=0.0))
    assert "".join(t.text for t in tokens) == MULTIBYTE
    assert all("\ufffd" not in t.text for t in tokens)
    assert any(t.text == "" for t in tokens[:-1])  # held bytes of a split character
    assert lm.generate("x", max_new_tokens=200, temperature=0.0) == MULTIBYTE
    assert tokenizer.decode(ids_of(tokens)) == MULTIBYTE
    # Cut inside the emoji by max_new_tokens: the incomplete bytes are flushed at the end,
    # as the tokenizer decodes them, and never before.
    n = len("héllo wörld ".encode()) + 2
    short = list(lm.stream("x", max_new_tokens=n, temperature=0.0))
    assert all("\ufffd" not in t.text for t in short[:-1])
    assert "".join(t.text for t in short) == tokenizer.decode(ids_of(short))


def test_streaming_with_real_model_matches_generate(lm, tokenizer):
    for seed in range(3):
        tokens = list(lm.stream("héllo", max_new_tokens=25, temperature=1.0, seed=seed))
        text = "".join(t.text for t in tokens)
        assert text == lm.generate("héllo", max_new_tokens=25, temperature=1.0, seed=seed)
        assert text == tokenizer.decode(ids_of(tokens))


def test_stop_string_spanning_tokens_is_never_streamed(tokenizer):
    script = tokenizer.encode("the cat sees the dog") + [tokenizer.eos_id]
    lm = LLM(ScriptedBackend(tokenizer.vocab_size, [script]), tokenizer)
    tokens = list(lm.stream("x", max_new_tokens=50, temperature=0.0, stop=["sees th"]))
    assert "".join(t.text for t in tokens) == "the cat "
    assert tokens[-1].finish_reason == "stop"
    streamed = ""
    for t in tokens:
        streamed += t.text
        assert "se" not in streamed  # the possible start of the stop string was held


# ----------------------------------------------------------------------------- chat
def test_chat_uses_the_template_and_generation_prompt(lm, tokenizer):
    messages = [{"role": "user", "content": "What is 7*6?"}]
    ids = tokenizer.chat_prompt_ids(messages)
    assert ids[-1] == tokenizer.role_ids["assistant"]
    reply = lm.chat(messages, max_new_tokens=10, temperature=0.0)
    assert reply == "".join(t.text for t in lm.stream(ids, max_new_tokens=10,
                                                      temperature=0.0))
    assert "".join(t.text for t in lm.chat_stream(messages, max_new_tokens=10,
                                                  temperature=0.0)) == reply


# ----------------------------------------------------------------------------- regulator
def test_regulator_decodes_low_confidence_positions_greedily(model, tokenizer):
    m = copy.deepcopy(model)
    with torch.no_grad():
        m.metahead.out.bias[0] = -20.0  # confidence ~ 0 everywhere
    lm = LLM(m, tokenizer)
    greedy = list(lm.stream("the cat", max_new_tokens=15, temperature=0.0))
    sampled = list(lm.stream("the cat", max_new_tokens=15, temperature=1.5, seed=0))
    assert ids_of(sampled) != ids_of(greedy)
    regulated = list(lm.stream("the cat", max_new_tokens=15, temperature=1.5, seed=0,
                               regulator=True))
    assert ids_of(regulated) == ids_of(greedy)
    assert all(t.regulated == "conservative" and t.confidence < 0.85 for t in regulated)
    assert all(t.regulated is None for t in sampled)


def test_regulator_leaves_confident_tokens_alone(model, tokenizer):
    m = copy.deepcopy(model)
    with torch.no_grad():
        m.metahead.out.bias[0] = 20.0  # confidence ~ 1
        m.metahead.out.bias[1] = -20.0  # stop ~ 0: never satisfied
    lm = LLM(m, tokenizer)
    plain = list(lm.stream("the cat", max_new_tokens=15, temperature=1.5, seed=0))
    reg = list(lm.stream("the cat", max_new_tokens=15, temperature=1.5, seed=0,
                         regulator=MetacognitiveRegulator()))
    assert ids_of(plain) == ids_of(reg) and all(t.regulated is None for t in reg)


def test_regulator_satisficing_stop(model, tokenizer):
    m = copy.deepcopy(model)
    with torch.no_grad():
        m.metahead.out.bias[0] = 20.0  # confident
        m.metahead.out.bias[1] = 20.0  # and the stop head says the answer is complete
    lm = LLM(m, tokenizer)
    tokens = list(lm.stream("the cat", max_new_tokens=15, temperature=0.0,
                            regulator=MetacognitiveRegulator(min_tokens=3)))
    assert len(tokens) == 4
    assert [t.regulated for t in tokens] == [None, None, None, "stopped"]
    last = tokens[-1]
    assert last.id == tokenizer.eos_id and last.special and last.finish_reason == "eos"
    off = list(lm.stream("the cat", max_new_tokens=15, temperature=0.0,
                         regulator=MetacognitiveRegulator(satisfice=False)))
    assert len(off) == 15


def test_regulator_does_not_satisfice_an_unsure_answer(model, tokenizer):
    m = copy.deepcopy(model)
    with torch.no_grad():
        m.metahead.out.bias[0] = -20.0
        m.metahead.out.bias[1] = 20.0
    lm = LLM(m, tokenizer)
    tokens = list(lm.stream("the cat", max_new_tokens=10, temperature=0.0, regulator=True))
    assert len(tokens) == 10 and all(t.regulated == "conservative" for t in tokens)


def test_retries_keep_the_most_confident_attempt(lm):
    """Retry k samples at max(T, retry_temperature) with seed + k; the best mean wins."""
    reg = MetacognitiveRegulator(threshold=1.0, retries=3, satisfice=False,
                                 conservative_temperature=100.0)  # no online change
    plan = reg.plan(0.0, 7)
    assert [(a.temperature, a.seed) for a in plan] == [(0.0, 7), (0.7, 8), (0.7, 9), (0.7, 10)]
    candidates = [list(lm.stream("the cat", max_new_tokens=12, temperature=a.temperature,
                                 seed=a.seed)) for a in plan]
    means = [sum(t.confidence for t in c) / len(c) for c in candidates]
    assert len(set(round(x, 6) for x in means)) == len(means)
    best = max(range(len(means)), key=means.__getitem__)
    got = list(lm.stream("the cat", max_new_tokens=12, temperature=0.0, seed=7, regulator=reg))
    assert ids_of(got) == ids_of(candidates[best])
    want = f"retry {best}" if best else "kept first of 4"
    assert all(want in t.regulated for t in got)
    # The regulated answer is also what generate returns.
    assert lm.generate("the cat", max_new_tokens=12, temperature=0.0, seed=7,
                       regulator=reg) == "".join(t.text for t in got)


def test_retries_stop_at_the_first_good_enough_answer(lm):
    # Every answer is good enough (and no early stop): the first attempt is kept.
    reg = MetacognitiveRegulator(threshold=0.0, retries=3, satisfice=False)
    got = list(lm.stream("the cat", max_new_tokens=8, temperature=0.0, regulator=reg))
    assert ids_of(got) == ids_of(list(lm.stream("the cat", max_new_tokens=8,
                                                temperature=0.0)))
    assert all(t.regulated is None for t in got)


# ----------------------------------------------------------------------------- stream_batch
def test_stream_batch_rows_do_not_mix(lm, tokenizer):
    requests = [
        GenerationRequest(prompt="the cat",
                          params=SamplingParams(max_new_tokens=10, temperature=0.0)),
        GenerationRequest(prompt=tokenizer.encode("2+3=", add_bos=True),
                          params=SamplingParams(max_new_tokens=4, temperature=1.0, seed=11)),
        GenerationRequest(prompt="a small red river tree",
                          params=SamplingParams(max_new_tokens=14, temperature=0.9, top_p=0.8,
                                                seed=5, top_logprobs=3)),
        GenerationRequest(prompt="é",
                          params=SamplingParams(max_new_tokens=9, temperature=1.2, top_k=5, seed=5,
                                                repetition_penalty=1.3)),
        GenerationRequest(prompt="the", params=SamplingParams(max_new_tokens=0)),
    ]
    solo = [[t for _, t in lm.stream_batch([copy.copy(r)])] for r in requests]
    rows: list[list[Token]] = [[] for _ in requests]
    order = []
    for i, tok in lm.stream_batch(requests):
        rows[i].append(tok)
        order.append(i)
    assert order[:4] == [0, 1, 2, 3]  # first step: one token per live row, in order
    for r, s in zip(rows, solo, strict=True):
        assert ids_of(r) == ids_of(s)
        assert [t.text for t in r] == [t.text for t in s]
    assert [len(r) for r in rows] == [10, 4, 14, 9, 0]
    assert all(r[-1].finish_reason == "length" for r in rows[:4])
    assert all(t.top_logprobs and len(t.top_logprobs) == 3 for t in rows[2])
    assert all(t.top_logprobs is None for t in rows[0])
    top_id, top_lp = rows[2][0].top_logprobs[0]
    assert top_lp >= rows[2][0].logprob - 1e-6


def test_static_cache_drops_finished_rows(lm):
    backend = lm.backend
    assert backend.static_cache and not backend.cuda_graph
    kept_rows: list[int] = []
    original = backend.reorder_cache

    def spy(past, index):
        new = original(past, index)
        kept_rows.append(new.rows)
        return new

    backend.reorder_cache = spy
    try:
        reqs = [GenerationRequest(prompt=p,
                                  params=SamplingParams(max_new_tokens=n, temperature=0.0))
                for p, n in (("the cat", 3), ("a small red river tree", 8), ("2+2=", 5))]
        rows: list[list[int]] = [[], [], []]
        for i, tok in lm.stream_batch(reqs):
            rows[i].append(tok.id)
    finally:
        del backend.reorder_cache
    assert kept_rows == [2, 1]  # after the 3rd token, then after the 5th
    for r, req in zip(rows, reqs, strict=True):
        assert r == ids_of(list(lm.stream(req.prompt, max_new_tokens=req.params.max_new_tokens,
                                          temperature=0.0)))


def test_stream_batch_cancellation(lm):
    stop_after = threading.Event()
    count = {"n": 0}
    reqs = [GenerationRequest(prompt="the cat",
                              params=SamplingParams(max_new_tokens=12, temperature=0.0)),
            GenerationRequest(prompt="the dog",
                              params=SamplingParams(max_new_tokens=12, temperature=0.0),
                              cancelled=stop_after),
            GenerationRequest(prompt="2+2=",
                              params=SamplingParams(max_new_tokens=12, temperature=0.0),
                              cancelled=lambda: count["n"] >= 6)]
    rows: list[list[Token]] = [[], [], []]
    for i, tok in lm.stream_batch(reqs):
        rows[i].append(tok)
        if i == 1 and len(rows[1]) == 3:
            reqs[1].cancel()
        if i == 0:
            count["n"] += 1
    assert stop_after.is_set()
    assert len(rows[0]) == 12 and len(rows[1]) == 3 and len(rows[2]) == 6
    assert ids_of(rows[0]) == ids_of(list(lm.stream("the cat", max_new_tokens=12,
                                                    temperature=0.0)))
    assert rows[1][-1].finish_reason is None  # a cancelled row gets no end marker


def mixed_requests(stop: str) -> list[GenerationRequest]:
    """Fresh requests that end every way a row can: length, stop string, cancellation,
    no room; greedy, sampled, penalised, with top log-probs and a retrying regulator."""
    seen = {"n": 0}

    def cancel_after_five() -> bool:
        seen["n"] += 1  # checked once per step of this row
        return seen["n"] > 5

    return [
        GenerationRequest(prompt="the cat",
                          params=SamplingParams(max_new_tokens=10, temperature=0.0)),
        GenerationRequest(prompt="2+3=",
                          params=SamplingParams(max_new_tokens=30, temperature=0.0, stop=stop)),
        GenerationRequest(prompt="a small red river tree",
                          params=SamplingParams(max_new_tokens=14, temperature=0.9, top_p=0.8,
                                                seed=5, top_logprobs=3)),
        GenerationRequest(prompt="é",
                          params=SamplingParams(max_new_tokens=9, temperature=1.2, top_k=5, seed=5,
                                                repetition_penalty=1.3)),
        GenerationRequest(prompt="the dog",
                          params=SamplingParams(max_new_tokens=12, temperature=0.0),
                          cancelled=cancel_after_five),
        GenerationRequest(prompt="the sun",
                          params=SamplingParams(max_new_tokens=6, temperature=0.8, seed=2,
                                                regulator=MetacognitiveRegulator(
                                                    retries=2, threshold=0.99))),
        GenerationRequest(prompt="the", params=SamplingParams(max_new_tokens=0)),
    ]


@pytest.mark.parametrize("static_cache", [True, False], ids=["static", "dynamic"])
def test_pipelined_decoding_launches_a_step_ahead_and_gives_the_same_tokens(
        model, tokenizer, static_cache):
    backend = TorchBackend(copy.deepcopy(model), static_cache=static_cache)
    plain, ahead = LLM(backend, tokenizer), LLM(backend, tokenizer, pipeline=True)
    stop = plain.generate("2+3=", max_new_tokens=30, temperature=0.0)[6:9]

    def run(lm: LLM) -> tuple[list[list[tuple]], list[float]]:
        rows: list[list[tuple]] = [[] for _ in range(7)]
        floats: list[float] = []
        for i, t in lm.stream_batch(mixed_requests(stop)):
            rows[i].append((t.id, t.text, t.regulated, t.finish_reason,
                            t.top_logprobs is not None))
            floats += [t.logprob, t.confidence]
        return rows, floats

    expected, values = run(plain)
    got, got_values = run(ahead)
    assert got == expected and got_values == pytest.approx(values, abs=1e-5)
    assert 0 < len(expected[4]) < 12 and expected[4][-1][3] is None  # cancelled
    assert expected[1][-1][3] == "stop" and expected[6] == []
    # The step after a token is already running when that token reaches the caller.
    calls = {"n": 0}
    original = backend.forward

    def counting(*args):
        calls["n"] += 1
        return original(*args)

    backend.forward = counting
    try:
        for lm, launched in ((plain, 1), (ahead, 2)):
            calls["n"] = 0
            stream = lm.stream("the cat", max_new_tokens=4, temperature=0.0)
            next(stream)
            assert calls["n"] == launched  # the prefill (and the next step, ahead)
            assert len(list(stream)) == 3
            assert calls["n"] == 4  # never past the budget: no step for a 5th token
    finally:
        del backend.forward


def test_pipelined_decoding_ends_at_eos_with_the_step_ahead_unused(tokenizer):
    a, b = tokenizer.encode("the")[0], tokenizer.encode(" cat")[0]
    backend = ScriptedBackend(tokenizer.vocab_size, [[a, b, tokenizer.eos_id, a, a],
                                                     [b, b, b, b, b]])
    lm = LLM(backend, tokenizer, pipeline=True)
    rows = lm.generate_tokens(["x", "y"], max_new_tokens=5, temperature=0.0)
    assert ids_of(rows[0]) == [a, b, tokenizer.eos_id]
    assert rows[0][-1].finish_reason == "eos" and ids_of(rows[1]) == [b] * 5


def test_pipeline_and_ffn_pair_default_on_for_cuda_only(model, tokenizer):
    # Both measured faster on an H100 and nowhere else; the CPU pairs through its swaps.
    backend = TorchBackend(copy.deepcopy(model))
    assert not backend.pair_ffn and not LLM(backend, tokenizer).pipeline
    assert TorchBackend(copy.deepcopy(model), matvec_parts=0, pair_ffn=True).pair_ffn
    gpu_like = ScriptedBackend(tokenizer.vocab_size, [[1]])
    gpu_like.device = torch.device("cuda")  # only read, never used, by LLM's constructor
    assert LLM(gpu_like, tokenizer).pipeline
    assert not LLM(gpu_like, tokenizer, pipeline=False).pipeline


def test_request_validation_and_prompt_limits(lm):
    with pytest.raises(ValueError, match="temperature"):
        lm.generate("x", temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        lm.generate("x", top_p=0.0)
    with pytest.raises(ValueError, match="context"):
        lm.generate("the " * 200)
    with pytest.raises(TypeError, match="regulator"):
        lm.generate("x", regulator="yes")
    # A row's room is what the context leaves after the prompt.
    tokens = list(lm.stream("the cat " * 20, max_new_tokens=500, temperature=0.0))
    p = len(lm.tokenizer.encode("the cat " * 20, add_bos=True))
    assert len(tokens) == lm.max_seq_len - p and tokens[-1].finish_reason == "length"


# ----------------------------------------------------------------------------- load + CLI
def test_load_and_cli_generate(tmp_path, model, tokenizer, capsys):
    m = copy.deepcopy(model)
    m.save_pretrained(tmp_path / "m")
    tokenizer.save(tmp_path / "m")
    lm = vs.load(tmp_path / "m", device="cpu")
    want = LLM(copy.deepcopy(model), tokenizer).generate("the cat", max_new_tokens=8,
                                                         temperature=0.0)
    assert lm.generate("the cat", max_new_tokens=8, temperature=0.0) == want
    assert cli.main(["generate", str(tmp_path / "m"), "--prompt", "the cat",
                     "--temperature", "0", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == want + "\n"
    assert cli.main(["generate", str(tmp_path / "m"), "--prompt", "the cat", "--json",
                     "--temperature", "0", "--max-new-tokens", "8", "--regulator"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) >= 1 and {"text", "confidence", "regulated"} <= set(lines[0])
    assert cli.main(["generate", str(tmp_path / "m"), "--prompt", "hi", "--chat",
                     "--temperature", "0", "--max-new-tokens", "4", "--confidence"]) == 0
    assert re.search(r"mean token confidence [01]\.\d{3}, answer confidence [01]\.\d{3}",
                     capsys.readouterr().out)
    # --compile on the CPU: the same text, and a note that the first tokens wait.
    assert cli.main(["generate", str(tmp_path / "m"), "--prompt", "the cat", "--compile",
                     "--temperature", "0", "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr()
    assert printed.out == want + "\n" and "torch.compile" in printed.err


def test_cli_generate_refuses_an_empty_standard_input(tmp_path, model, tokenizer, capsys,
                                                       monkeypatch):
    copy.deepcopy(model).save_pretrained(tmp_path / "m")
    tokenizer.save(tmp_path / "m")
    monkeypatch.setattr("sys.stdin", io.StringIO(" \n"))
    assert cli.main(["generate", str(tmp_path / "m")]) == 2
    assert "no prompt" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO("the cat"))
    assert cli.main(["generate", str(tmp_path / "m"), "--temperature", "0",
                     "--max-new-tokens", "4"]) == 0


def test_score_and_request_helpers(lm, model, tokenizer):
    scores = lm.score("the cat sees")
    ids = tokenizer.encode("the cat sees", add_bos=True)
    with torch.no_grad():
        out = copy.deepcopy(model)(torch.tensor([ids]))
    logp = out.logits[0, :-1].log_softmax(-1)
    assert [s.id for s in scores] == ids[1:]
    for i, s in enumerate(scores):
        assert s.logprob == pytest.approx(float(logp[i, ids[i + 1]]), abs=1e-4)
        assert s.confidence == pytest.approx(float(out.confidence[0, i]), abs=1e-5)
    req = lm.request(messages=[{"role": "user", "content": "hi"}], max_new_tokens=3)
    assert list(req.prompt) == tokenizer.chat_prompt_ids([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="exactly one"):
        lm.request()


def test_cpu_decode_uses_threaded_products_with_the_same_tokens(model, tokenizer):
    """The CPU backend attaches split products; greedy text and scores match without."""
    fast = LLM(TorchBackend(copy.deepcopy(model), matvec_parts=8), tokenizer)
    plain = LLM(TorchBackend(copy.deepcopy(model), matvec_parts=0), tokenizer)
    assert isinstance(fast.backend.model.lm_head, MatVecHead)
    assert not isinstance(plain.backend.model.lm_head, MatVecHead)
    prompts = ["the cat sees", "2+3=", "a small red river"]
    got = fast.generate_tokens(prompts, max_new_tokens=12, temperature=0.0)
    want = plain.generate_tokens(prompts, max_new_tokens=12, temperature=0.0)
    for g_row, w_row in zip(got, want, strict=True):
        assert [t.id for t in g_row] == [t.id for t in w_row]
        for g, w in zip(g_row, w_row, strict=True):
            assert g.logprob == pytest.approx(w.logprob, abs=1e-4)
            assert g.confidence == pytest.approx(w.confidence, abs=1e-5)
