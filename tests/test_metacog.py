"""Calibration measures (hand-computed cases, brute-force cross-checks) and the regulator."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vesper_sdk.eval.metrics import (
    auroc,
    brier_score,
    calibration_summary,
    expected_calibration_error,
    fit_confidence,
    fit_platt,
    group_resamples,
    paired_bootstrap,
    rankdata,
    reliability_bins,
    same_groups,
)
from vesper_sdk.eval.regulator import MetacognitiveRegulator, as_regulator, join_flags


# ----------------------------------------------------------------------------- ECE
def test_ece_one_prediction_per_bin():
    # 15 bins of width 1/15: 0.1 -> bin 1, 0.25 -> bin 3, 0.9 -> bin 13, 0.95 -> bin 14.
    conf = [0.1, 0.25, 0.9, 0.95]
    correct = [0, 1, 1, 1]
    want = (0.1 + 0.75 + 0.1 + 0.05) / 4
    assert expected_calibration_error(conf, correct) == pytest.approx(want)
    bins = reliability_bins(conf, correct)
    assert np.flatnonzero(bins.counts).tolist() == [1, 3, 13, 14]


def test_ece_shared_bin_uses_bin_means():
    conf = [0.9, 0.92, 0.91, 0.3]  # three in bin 13, one in bin 4
    correct = [1, 0, 1, 0]
    want = 3 / 4 * abs(0.91 - 2 / 3) + 1 / 4 * 0.3
    assert expected_calibration_error(conf, correct) == pytest.approx(want)
    assert expected_calibration_error(torch.tensor(conf), torch.tensor(correct)) == \
        pytest.approx(want)
    # One bin: |mean confidence - accuracy|.
    assert expected_calibration_error(conf, correct, n_bins=1) == pytest.approx(
        abs(np.mean(conf) - 0.5))


def test_bins_are_right_closed_and_cover_zero_and_one():
    bins = reliability_bins([0.0, 1 / 3, 0.5, 1.0], [1, 1, 0, 1], n_bins=3)
    assert bins.counts.tolist() == [2, 1, 1]
    assert bins.accuracy.tolist() == [1.0, 0.0, 1.0]
    assert bins.confidence[0] == pytest.approx(1 / 6)
    empty = reliability_bins([0.95], [1], n_bins=4)
    assert np.isnan(empty.accuracy[0]) and empty.to_dict()["accuracy"][0] is None


def test_perfect_calibration_has_zero_ece():
    # In each bin the accuracy equals the confidence exactly.
    conf = [0.25] * 4 + [0.75] * 4
    correct = [1, 0, 0, 0] + [1, 1, 1, 0]
    assert expected_calibration_error(conf, correct) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(expected_calibration_error([], []))
    with pytest.raises(ValueError, match="probabilities"):
        expected_calibration_error([1.5], [1])
    with pytest.raises(ValueError, match="length"):
        expected_calibration_error([0.5, 0.5], [1])


# ----------------------------------------------------------------------------- AUROC
def test_auroc_known_values():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auroc([0.2, 0.5, 0.5, 0.9], [0, 1, 0, 1]) == pytest.approx(3.5 / 4)  # a tie
    assert auroc([0.5] * 4, [0, 1, 0, 1]) == pytest.approx(0.5)
    assert auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert auroc([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0]) == 0.0
    assert math.isnan(auroc([0.1, 0.2], [1, 1]))
    assert auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([False, False, True, True])
                 ) == pytest.approx(0.75)


def test_rankdata_averages_ties():
    assert rankdata([10, 20, 10, 30]).tolist() == [1.5, 3.0, 1.5, 4.0]
    assert rankdata([3, 3, 3]).tolist() == [2.0, 2.0, 2.0]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.booleans()), min_size=2, max_size=40))
def test_auroc_equals_pairwise_probability(pairs):
    """AUROC = P(score of a positive > score of a negative) + P(tie) / 2, by brute force."""
    scores = [s / 6 for s, _ in pairs]
    labels = [int(y) for _, y in pairs]
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    got = auroc(scores, labels)
    if not pos or not neg:
        assert math.isnan(got)
        return
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0
               for p, n in itertools.product(pos, neg))
    assert got == pytest.approx(wins / (len(pos) * len(neg)))


def test_brier_and_summary():
    assert brier_score([1.0, 0.0, 0.5], [1, 1, 0]) == pytest.approx((0 + 1 + 0.25) / 3)
    s = calibration_summary([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    assert s["n"] == 4 and s["accuracy"] == 0.5
    assert s["auroc"] == pytest.approx(0.75)
    assert sum(s["reliability"]["counts"]) == 4


# ----------------------------------------------------------------------------- regulator
def test_fit_platt_recovers_the_scaling_and_fixes_overconfidence():
    rng = np.random.default_rng(0)
    z = rng.normal(2.0, 3.0, 20000)
    # Outcomes drawn from sigmoid(0.5 z - 1): confidences sigmoid(z) are over-confident.
    y = rng.random(z.size) < 1 / (1 + np.exp(-(0.5 * z - 1.0)))
    scale, bias = fit_platt(z, y)
    assert scale == pytest.approx(0.5, abs=0.03) and bias == pytest.approx(-1.0, abs=0.06)
    raw = expected_calibration_error(1 / (1 + np.exp(-z)), y)
    fitted = expected_calibration_error(1 / (1 + np.exp(-(scale * z + bias))), y)
    assert raw > 0.1 and fitted < 0.02


def test_fit_platt_is_identity_without_data_and_finite_with_one_class():
    assert fit_platt([], []) == (1.0, 0.0)
    scale, bias = fit_platt([1.0, 2.0, 3.0], [1, 1, 1])
    assert math.isfinite(scale) and math.isfinite(bias)
    with pytest.raises(ValueError, match="differ in length"):
        fit_platt([1.0, 2.0], [1])


def test_regulator_defaults_follow_the_seed():
    reg = MetacognitiveRegulator()
    assert reg.threshold == 0.85 and reg.max_iterations == 3 and reg.retries == 0
    assert as_regulator(True) == reg
    assert as_regulator(None) is None and as_regulator(False) is None
    assert as_regulator(reg) is reg
    with pytest.raises(TypeError):
        as_regulator("on")
    with pytest.raises(ValueError, match="threshold"):
        MetacognitiveRegulator(threshold=1.5)


def test_online_regulation_and_satisficing():
    reg = MetacognitiveRegulator(threshold=0.85, stop_threshold=0.5, min_tokens=2)
    assert reg.regulate_step(0.5, 0.1, 3, 0.9).flag == "conservative"
    assert reg.regulate_step(0.9, 0.1, 3, 0.9).flag is None
    # Complete (stop head) and confident so far: satisfice.
    assert reg.regulate_step(0.9, 0.8, 3, 0.9).flag == "stopped"
    assert reg.regulate_step(0.2, 0.8, 3, 0.9).stop  # the answer's confidence decides
    # Never before min_tokens, never an unsure answer, never when turned off.
    assert not reg.regulate_step(0.9, 0.8, 1, 0.9).stop
    assert not reg.regulate_step(0.9, 0.8, 3, 0.6).stop
    assert not MetacognitiveRegulator(satisfice=False).regulate_step(0.9, 0.99, 5, 0.99).stop
    # A separate aspiration level for satisficing.
    lenient = MetacognitiveRegulator(satisfice_confidence=0.5)
    assert lenient.regulate_step(0.9, 0.8, 3, 0.6).stop


def test_plan_caps_retries_and_varies_sampling():
    reg = MetacognitiveRegulator(retries=5, retry_temperature=0.7)
    plan = reg.plan(0.0, 10)
    assert len(plan) == 4  # the first answer + min(5, max_iterations=3) retries
    assert [a.seed for a in plan] == [10, 11, 12, 13]
    assert [a.temperature for a in plan] == [0.0, 0.7, 0.7, 0.7]
    assert [a.temperature for a in reg.plan(1.2, None)] == [1.2] * 4
    assert [(a.temperature, a.seed) for a in MetacognitiveRegulator().plan(0.3, 1)] == [
        (0.3, 1)]  # retries off: one attempt
    assert reg.retry_flag(2, 4) == "retry 2"
    assert reg.retry_flag(0, 3) == "kept first of 3"
    assert reg.retry_flag(0, 1) is None
    assert reg.accepts(0.85) and not reg.accepts(0.84)
    assert join_flags("conservative", None, "retry 1") == "conservative, retry 1"
    assert join_flags(None, None) is None


def test_paired_bootstrap_intervals_are_paired_and_resample_whole_groups():
    rng = np.random.default_rng(0)
    n = 2000
    correct = rng.random(n) < 0.8
    good = np.clip(np.where(correct, 0.85, 0.4) + rng.normal(0, 0.1, n), 0, 1)
    noisy = rng.random(n)
    groups = np.repeat(np.arange(200), 10)
    out = paired_bootstrap(good, noisy, correct, groups, resamples=100)
    assert out["groups"] == 200 and out["resamples"] == 100
    point = auroc(good, correct)
    lo, hi = out["a"]["auroc"]
    assert lo < point < hi and hi - lo < 0.1
    # A real gap: the paired interval of the AUROC difference lies above zero.
    assert out["a_minus_b"]["auroc"][0] > 0.2
    # The same signal twice: every resample's difference is exactly zero.
    same = paired_bootstrap(good, good, correct, groups, resamples=50)
    assert same["a_minus_b"]["auroc"] == [0.0, 0.0] == same["a_minus_b"]["ece"]
    # One group holding every token: each resample is the whole sample again.
    whole = paired_bootstrap(good, noisy, correct, np.zeros(n), resamples=20)
    assert whole["a"]["auroc"][0] == whole["a"]["auroc"][1] == pytest.approx(point)
    with pytest.raises(ValueError, match="groups and correct differ in length"):
        paired_bootstrap(good, noisy, correct, groups[:-1])


def test_same_groups_gives_equal_items_one_id_in_order_of_first_appearance():
    assert same_groups(["b", "a", "b", ("x", 1), "a", ("x", 1)]).tolist() == [0, 1, 0, 2, 1, 2]


def test_group_resamples_take_every_copy_of_a_group_drawn():
    groups = np.array([0, 0, 0, 1, 2, 2, 3])
    size = np.bincount(groups)
    draws = list(group_resamples(groups, 50, seed=1))
    assert len(draws) == 50
    for idx in draws:
        counts = np.bincount(groups[idx], minlength=size.size)
        assert (counts % size == 0).all() and counts.sum() == idx.size
        assert (counts // size).sum() == size.size  # as many groups drawn as there are
    assert list(group_resamples(np.array([], dtype=int), 5)) == []


def test_answer_report_resamples_a_repeated_question_with_its_copies():
    from vesper_sdk.eval.answers import SIGNALS, answer_report

    rng = np.random.default_rng(0)
    rows = []
    for i in range(60):
        right = bool(rng.random() < 0.7)
        signals = {s: float(rng.random() * 0.3 + (0.6 if right else 0.3)) for s in SIGNALS}
        # One wrong question the MetaHead alone is sure of, asked 40 times over.
        copies = 40 if i == 0 else 1
        if i == 0:
            right = False
            signals = {s: (0.2 if s != "metahead_answer" else 0.99) for s in SIGNALS}
        rows += [{"question": f"q{i}", "reference": "r", "correct": right, **signals}] * copies
    rep = answer_report(rows, resamples=300)
    assert rep["n"] == 99 and rep["questions"] == 60
    # Each distinct question once: computed on the first copies alone.
    once = answer_report(rows[39:], resamples=10)  # the repeated question kept once
    assert rep["distinct"]["auroc"] == pytest.approx(
        {s: m["auroc"] for s, m in once["methods"].items()})
    # Its 40 copies come and go together: the MetaHead's interval is far wider than the
    # one of a bootstrap that treats them as 40 questions.
    lo, hi = rep["methods"]["metahead_answer"]["auroc_ci95"]
    naive = answer_report([{**r, "question": f"{r['question']}-{k}"} for k, r in
                           enumerate(rows)], resamples=300)
    nlo, nhi = naive["methods"]["metahead_answer"]["auroc_ci95"]
    assert hi - lo > 1.5 * (nhi - nlo)


def _confidence_problem(n: int, seed: int, signal: bool):
    """Activations [n, 6] and outcomes; the current row reads only column 0. With
    ``signal``, column 1 (which the row ignores) also decides what is right."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, 6))
    logit = 1.5 * a[:, 0] + (2.0 * a[:, 1] if signal else 0.0) + 1.0
    y = rng.random(n) < 1 / (1 + np.exp(-logit))
    groups = np.repeat(np.arange(n // 4), 4)[:n]
    return a, y, groups


def test_fit_confidence_uses_activations_only_when_they_help_on_unseen_groups():
    row, bias = np.array([0.5, 0, 0, 0, 0, 0]), 0.2  # miscalibrated, blind to column 1
    a, y, g = _confidence_problem(4000, 0, signal=True)
    fit = fit_confidence(a, y, g, row, bias)
    assert math.isfinite(fit.l2) and fit.cv_log_loss[fit.l2] < fit.cv_log_loss[math.inf]
    test_a, test_y, _ = _confidence_problem(4000, 1, signal=True)
    new, old = test_a @ fit.weight + fit.bias, test_a @ row + bias
    assert auroc(new, test_y) > auroc(old, test_y) + 0.05
    assert expected_calibration_error(1 / (1 + np.exp(-new)), test_y) < 0.03
    # No extra signal: cross-validation keeps (close to) Platt scaling of the old logit.
    a, y, g = _confidence_problem(4000, 2, signal=False)
    fit = fit_confidence(a, y, g, row, bias)
    test_a, test_y, _ = _confidence_problem(4000, 3, signal=False)
    new, old = test_a @ fit.weight + fit.bias, test_a @ row + bias
    assert auroc(new, test_y) == pytest.approx(auroc(old, test_y), abs=0.01)
    assert abs(fit.weight[1:]).max() < 0.1 * abs(fit.weight[0])
    with pytest.raises(ValueError, match="do not fit together"):
        fit_confidence(a, y[:-1], g, row, bias)
