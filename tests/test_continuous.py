"""Continuous batching (SlotEngine): requests that join and leave a running batch get the
very tokens they get alone, prefixes are reused, prompts are scored like LLM.score."""

from __future__ import annotations

import math

import pytest
import torch
from _fixtures_serve import make_tiny_model

import vesper_sdk as vs
from vesper_sdk.inference import GenerationRequest, PromptLogprobs, SamplingParams, Token
from vesper_sdk.inference.continuous import SlotEngine, common_prefix
from vesper_sdk.model import answer_confidence

PROMPTS = ["the cat sees a dog", "hello world", "1+2=", "the cat sees a dog and the sun",
           "red blue green small big fast slow runs jumps sees likes a an and or but"]


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory):
    return vs.load(make_tiny_model(tmp_path_factory.mktemp("cont") / "m"), device="cpu")


def solo(llm, prompt, **fields) -> list[int]:
    return [t.id for t in llm.generate_tokens([prompt], **fields)[0]]


def run(engine: SlotEngine, requests: list[tuple[int, GenerationRequest]], arrive_every=1,
        ) -> tuple[dict[int, list], list[int]]:
    """Feed requests one per ``arrive_every`` steps (as slots allow); collect every event."""
    out: dict[int, list] = {k: [] for k, _ in requests}
    ended: list[int] = []
    pending, step = list(requests), 0
    while pending or engine.busy:
        if step % arrive_every == 0:
            while pending and engine.free_slots:
                engine.add(*pending.pop(0))
        if engine.busy:
            events, done = engine.step()
            for key, item in events:
                out[key].append(item)
            ended += done
        step += 1
        assert step < 10_000
    return out, ended


def greedy(max_new_tokens: int = 10, **fields) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, **fields)


@pytest.mark.parametrize("chunk", [3, 256])
def test_staggered_requests_get_their_solo_tokens(llm, chunk: int) -> None:
    # Two slots for five requests: they queue, join at different steps, leave at
    # different steps, and long prompts prefill over several steps (chunk 3).
    lengths = [10, 4, 7, 12, 3]
    reqs = [(i, GenerationRequest(p, greedy(n))) for i, (p, n) in enumerate(
        zip(PROMPTS, lengths, strict=True))]
    out, ended = run(SlotEngine(llm, slots=2, prefill_chunk=chunk), reqs, arrive_every=2)
    assert sorted(ended) == list(range(len(PROMPTS)))
    for i, p in enumerate(PROMPTS):
        assert [t.id for t in out[i]] == solo(llm, p, max_new_tokens=lengths[i],
                                              temperature=0.0), p
        assert out[i][-1].finish_reason == "length"


def test_a_short_request_finishes_while_a_long_one_runs(llm) -> None:
    engine = SlotEngine(llm, slots=4)
    engine.add("long", GenerationRequest(PROMPTS[0], greedy(40)))
    for _ in range(3):
        engine.step()
    engine.add("short", GenerationRequest(PROMPTS[1], greedy(2)))
    finished_at = {}
    step = 0
    while engine.busy:
        step += 1
        for key in engine.step()[1]:
            finished_at[key] = step
    assert finished_at["short"] <= 3 < finished_at["long"]


def test_prefix_reuse_copies_the_cached_prompt_and_keeps_tokens_exact(llm) -> None:
    engine = SlotEngine(llm, slots=3)
    first = "the cat sees a dog and the sun and the moon"
    out1, _ = run(engine, [(0, GenerationRequest(first, greedy(6)))])
    assert engine.reused_tokens == 0
    # The same start, then more: every token of the shared start comes from the slot.
    longer = first + " and a red bird"
    shared = common_prefix(llm.engine.prompt_ids(first), llm.engine.prompt_ids(longer))
    out2, _ = run(engine, [(1, GenerationRequest(longer, greedy(6)))])
    assert engine.reused_tokens == shared > 5
    assert [t.id for t in out2[1]] == solo(llm, longer, max_new_tokens=6, temperature=0.0)
    # A prompt identical to a cached one still computes its last token (for its logits).
    out3, _ = run(engine, [(2, GenerationRequest(first, greedy(6)))])
    assert [t.id for t in out3[2]] == [t.id for t in out1[0]]
    n_first = len(llm.engine.prompt_ids(first))
    assert engine.reused_tokens == shared + n_first - 1
    assert engine.prompt_tokens == 2 * n_first + len(llm.engine.prompt_ids(longer))


def test_prefix_is_copied_from_a_running_request(llm) -> None:
    engine = SlotEngine(llm, slots=2)
    system = "hello world the cat sees a dog and a bird"
    engine.add(0, GenerationRequest(system + " one", greedy(30)))
    out: dict = {0: [t.id for _, t in engine.step()[0]], 1: []}
    engine.add(1, GenerationRequest(system + " two", greedy(5)))
    assert engine.reused_tokens >= len(llm.engine.prompt_ids(system)) - 1
    while engine.busy:
        for key, tok in engine.step()[0]:
            out[key].append(tok.id)
    assert out[1] == solo(llm, system + " two", max_new_tokens=5, temperature=0.0)
    assert out[0] == solo(llm, system + " one", max_new_tokens=30, temperature=0.0)


def test_prompt_logprobs_match_llm_score(llm) -> None:
    text = "the cat sees a dog and the sun"
    engine = SlotEngine(llm, slots=2, prefill_chunk=4)  # scored across several chunks
    out, ended = run(engine, [(0, GenerationRequest(text, greedy(0, prompt_logprobs=2)))])
    assert ended == [0]
    (scores,) = out[0]  # no token: the prompt only
    assert isinstance(scores, PromptLogprobs)
    ref = llm.score(text)
    assert scores.logprobs[0] is None and scores.top[0] is None
    assert scores.ids[1:] == [s.id for s in ref]
    for got, want in zip(scores.logprobs[1:], ref, strict=True):
        assert math.isclose(got, want.logprob, abs_tol=1e-4)
    for lp, top in zip(scores.logprobs[1:], scores.top[1:], strict=True):
        assert len(top) == 2 and top[0][1] >= top[1][1] and lp <= top[0][1] + 1e-6
    # The static engine scores prompts the same way.
    static = [item for _, item in llm.stream_batch([GenerationRequest(
        text, greedy(0, prompt_logprobs=2))])]
    assert len(static) == 1 and static[0].ids == scores.ids
    assert all(math.isclose(a, b, abs_tol=1e-4)
               for a, b in zip(static[0].logprobs[1:], scores.logprobs[1:], strict=True))


@pytest.mark.parametrize("fields", [
    dict(logit_bias={7: 100.0}),
    dict(presence_penalty=2.0, frequency_penalty=1.0),
    dict(repetition_penalty=1.5),
    dict(min_tokens=5, max_new_tokens=8),
])
def test_sampling_fields_act_and_agree_with_the_static_engine(llm, fields: dict) -> None:
    params = greedy(**{"max_new_tokens": 8, **fields})
    static = [t.id for _, t in llm.stream_batch([GenerationRequest(PROMPTS[1], params)])]
    out, _ = run(SlotEngine(llm, slots=2), [(0, GenerationRequest(PROMPTS[1], params)),
                                            (1, GenerationRequest(PROMPTS[0], greedy(8)))])
    assert [t.id for t in out[0]] == static
    plain = solo(llm, PROMPTS[1], max_new_tokens=8, temperature=0.0)
    if "logit_bias" in fields:
        assert static == [7] * 8
    elif "min_tokens" not in fields:
        assert static != plain  # the tiny model repeats itself: a penalty changes that
        assert len(set(static)) > len(set(plain))


def test_min_tokens_bars_end_of_sequence(llm) -> None:
    eos = llm.tokenizer.eos_id
    params = greedy(6, logit_bias={eos: 100.0}, min_tokens=4)
    ids = [t.id for _, t in llm.stream_batch([GenerationRequest(PROMPTS[2], params)])]
    assert eos not in ids[:4] and ids[4] == eos and len(ids) == 5


def test_min_p_keeps_only_likely_tokens() -> None:
    scores = torch.tensor([[4.0, 3.9, 0.0, -1.0]])
    gens = [torch.Generator().manual_seed(i) for i in range(50)]
    picked = {vs.inference.sampling.sample(scores, [1.0], [0], [1.0], [g], [0.5])[0]
              for g in gens}
    assert picked == {0, 1}


def test_cancelled_requests_leave_and_free_their_slot(llm) -> None:
    engine = SlotEngine(llm, slots=1)
    req = GenerationRequest(PROMPTS[0], greedy(50))
    engine.add(0, req)
    engine.step()
    req.cancel()
    events, ended = engine.step()
    assert ended == [0] and not events and engine.free_slots == 1 and not engine.busy


def test_a_sampled_request_follows_its_seed(llm) -> None:
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=2**64 - 1)
    alone = [t.id for _, t in llm.stream_batch([GenerationRequest(PROMPTS[3], params)])]
    out, _ = run(SlotEngine(llm, slots=3), [(0, GenerationRequest(PROMPTS[0], greedy(8))),
                                            (1, GenerationRequest(PROMPTS[3], params))])
    assert [t.id for t in out[1]] == alone
    assert all(isinstance(t, Token) for t in out[1])


@pytest.mark.parametrize("engine", ["static", "continuous"])
def test_an_unsure_answer_becomes_an_abstention(llm, engine: str) -> None:
    from vesper_sdk.eval.regulator import MetacognitiveRegulator

    def answer(abstain_below: float) -> list[Token]:
        reg = MetacognitiveRegulator(abstain_below=abstain_below, satisfice=False,
                                     threshold=0.0)
        req = GenerationRequest(PROMPTS[0], greedy(6, regulator=reg))
        if engine == "static":
            return [t for _, t in llm.stream_batch([req])]
        return run(SlotEngine(llm, slots=2), [(0, req)])[0][0]

    plain = solo(llm, PROMPTS[0], max_new_tokens=6, temperature=0.0)
    kept = answer(0.0)  # nothing is under 0: the answer itself, unflagged
    assert [t.id for t in kept] == plain and all(t.regulated is None for t in kept)
    withheld = answer(1.0)  # everything is under 1: "I'm not sure." instead
    assert "".join(t.text for t in withheld) == "I'm not sure."
    assert all(t.regulated == "abstained" for t in withheld)
    assert withheld[-1].finish_reason == "stop"
    # Each withheld token carries the answer's confidence (the MetaHead's answer row).
    confidence = answer_confidence([t.answer_logit for t in kept])
    assert withheld[0].confidence == pytest.approx(confidence, abs=1e-5)
    assert answer_confidence([t.answer_logit for t in withheld]) == pytest.approx(confidence)
