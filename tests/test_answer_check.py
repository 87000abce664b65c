"""The answer check: an answer's confidence that needs the token confidence to agree, from
the pooling (the same in the engine, evaluation and the server) to the calibration that
decides whether a model keeps it, and the shifted questions it is decided on."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _fixtures_serve import make_tiny_model

import vesper_sdk as vs
from vesper_sdk import skills
from vesper_sdk.config import ConfigError, VesperConfig
from vesper_sdk.model import answer_confidence
from vesper_sdk.model.metahead import confidence_logit, confidence_logits
from vesper_sdk.serving.protocol import vesper_fields
from vesper_sdk.training.answer_check import fit_check


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("check") / "tiny")


def test_the_check_adds_the_odds_of_a_wrong_answer_that_each_signal_gives():
    answer_logits, confidences = [1.5, 2.5], [0.7, 0.9]
    head = sum(answer_logits) / 2  # the head's pooled logit
    tokens = sum(math.log(c / (1 - c)) for c in confidences) / 2
    p = answer_confidence(answer_logits, confidences, (1.0, 0.0, 1.0, 0.0))
    # Odds of wrong add: (1 - p) / p = e^-head + e^-tokens.
    assert (1 - p) / p == pytest.approx(math.exp(-head) + math.exp(-tokens))
    assert p < min(1 / (1 + math.exp(-head)), 1 / (1 + math.exp(-tokens)))
    # (a, b) scale the token side, (scale, shift) the combination.
    z = 2.0 * -math.log(math.exp(-head) + math.exp(-(0.5 * tokens - 1.0))) + 0.3
    assert answer_confidence(answer_logits, confidences, (0.5, -1.0, 2.0, 0.3)) == \
        pytest.approx(1 / (1 + math.exp(-z)))
    # No check: the sigmoid of the mean answer logit, confidences or not.
    assert answer_confidence(answer_logits, confidences) == answer_confidence(answer_logits) \
        == pytest.approx(1 / (1 + math.exp(-head)))
    with pytest.raises(ValueError, match="pass them"):
        answer_confidence(answer_logits, None, (1.0, 0.0, 1.0, 0.0))
    with pytest.raises(ValueError, match="2 answer logits but 1 confidences"):
        answer_confidence(answer_logits, [0.5], (1.0, 0.0, 1.0, 0.0))
    # A saturated fp32 confidence reads back as a finite logit, the same one-by-one and
    # as a tensor (the engine reads the one, calibration the other).
    assert math.isfinite(confidence_logit(1.0)) and math.isfinite(confidence_logit(0.0))
    c = torch.tensor([0.0, 0.3, 1.0])
    assert confidence_logits(c).tolist() == pytest.approx([confidence_logit(v) for v in c])


def test_a_check_is_four_finite_numbers_or_none():
    assert VesperConfig().metahead_answer_check == []
    for bad in ([1.0, 2.0], [1.0, 2.0, 3.0, float("nan")], "1,2,3,4"):
        with pytest.raises(ConfigError, match="metahead_answer_check must be empty or four"):
            VesperConfig(metahead_answer_check=bad)


def test_the_engine_pools_the_check_as_evaluation_and_the_server_do(model_dir, tmp_path):
    model = vs.VesperLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.metahead.answer.weight.normal_(0, 0.5)
    check = [1.3, -0.4, 0.8, 0.2]
    model.config.metahead_answer_check = check
    model.save_pretrained(tmp_path / "m", extra_files={"tokenizer.json":
                                                      model_dir / "tokenizer.json"})
    lm = vs.load(tmp_path / "m", device="cpu")
    assert lm.config.metahead_answer_check == check  # it travels in config.json
    toks = lm.generate_tokens(["the cat"], max_new_tokens=6, temperature=0.0,
                              ignore_eos=True)[0]
    for i in range(len(toks)):  # each token carries the answer's confidence so far
        seen = toks[:i + 1]
        expected = answer_confidence([t.answer_logit for t in seen],
                                     [t.confidence for t in seen], check)
        assert toks[i].answer_confidence == pytest.approx(expected, abs=1e-9)
    assert toks[-1].answer_confidence != pytest.approx(
        answer_confidence([t.answer_logit for t in toks]), abs=1e-3)  # the check counted
    assert vesper_fields(toks, answer=toks)["answer_confidence"] == pytest.approx(
        toks[-1].answer_confidence, abs=1e-6)
    # Read per request: a calibration in this process that drops the check is seen at once.
    lm.config.metahead_answer_check = []
    plain = lm.generate_tokens(["the cat"], max_new_tokens=6, temperature=0.0,
                               ignore_eos=True)[0]
    assert plain[-1].answer_confidence == pytest.approx(
        answer_confidence([t.answer_logit for t in plain]), abs=1e-9)


def _reads(model: vs.VesperLM, head: np.ndarray, conf: np.ndarray) -> list[torch.Tensor]:
    """One-token answers whose answer row reads ``head`` in its first input and whose
    calibrated confidence logit (the last input) is ``conf``."""
    width = model.metahead.answer.in_features
    out = []
    for h, c in zip(head, conf, strict=True):
        x = torch.zeros(1, width)
        x[0, 0], x[0, -1] = float(h), float(c)
        out.append(x)
    return out


def test_calibration_keeps_the_check_only_where_it_ranks_answers_better(model_dir):
    """A head that reads the first input: it ranks the calibration answers perfectly, and
    is sure of every shifted answer, right or wrong, which the token confidence ranks.
    The check is kept; where the shifted answers are ranked by the head too, it is not."""
    model = vs.VesperLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.metahead.answer.weight.zero_()
        model.metahead.answer.weight[0, 0] = 1.0
        model.metahead.answer.bias.zero_()
    rng = np.random.default_rng(0)
    y = (rng.random(400) < 0.7).astype(float)
    head = np.where(y > 0, 3.0, -3.0) + rng.normal(0, 0.5, 400)
    conf = np.where(y > 0, 1.0, -1.0) + rng.normal(0, 1.5, 400)  # weaker on these
    groups = np.arange(400)
    ys = (rng.random(300) < 0.5).astype(float)
    shifted_conf = np.where(ys > 0, 2.0, -2.0) + rng.normal(0, 0.5, 300)
    sure = np.full(300, 4.0) + rng.normal(0, 0.1, 300)  # sure of them all
    fit = fit_check(model, _reads(model, head, conf), y, groups, head,
                    _reads(model, sure, shifted_conf), ys)
    assert fit["answer_check"] == 1.0 and fit["answer_check_shifted_answers"] == 300
    assert fit["answer_check_auroc_once"] > fit["answer_check_auroc_once_without"]
    assert len(model.config.metahead_answer_check) == 4
    ranked = np.where(ys > 0, 3.0, -3.0) + rng.normal(0, 0.1, 300)
    fit = fit_check(model, _reads(model, head, conf), y, groups, head,
                    _reads(model, ranked, shifted_conf), ys)
    assert fit["answer_check"] == 0.0 and model.config.metahead_answer_check == []


def test_a_refit_that_cannot_rank_answers_drops_an_earlier_check(model_dir):
    from vesper_sdk.training.calibration import refit_answer, skills_questions

    model = vs.VesperLM.from_pretrained(model_dir)
    model.config.metahead_answer_check = [1.0, 0.0, 1.0, 0.0]
    qs, groups = skills_questions(120, 0)
    fit = refit_answer(model, vs.VesperTokenizer.from_file(model_dir), qs, groups)
    assert fit is not None and "answer_check" not in fit  # every answer of it is wrong
    assert model.config.metahead_answer_check == []


def test_shifted_questions_are_graded_by_the_corpus_rules_off_its_distribution():
    held, cal = skills.shifted(60, 0, "held"), skills.shifted(60, 0, "calibration")
    assert held == skills.shifted(60, 0, "held") and held != skills.shifted(60, 1, "held")
    for task, msgs, expected in held + cal:
        q = msgs[0]["content"]
        assert skills.expected_answer(q) == expected and skills.task_of(q) == task
    # Evaluation's shifts are not calibration's: no task family in both.
    assert {t for t, _, _ in held}.isdisjoint({t for t, _, _ in cal})
    # Off the generator's distribution: none of these questions is ever drawn for training.
    train = {ex["messages"][0]["content"] for ex in skills.generate(3000, 0)}
    assert not train & {m[0]["content"] for _, m, _ in held + cal}
    with pytest.raises(ValueError, match="unknown shifted split"):
        skills.shifted(1, 0, "train")
