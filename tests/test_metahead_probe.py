"""benchmarks/metahead_probe.py's answer MLP and its cross-validation."""

from __future__ import annotations

import numpy as np
import torch

from vesper_sdk.benchmarks.metahead_probe import distinct_cv, fit_answer_mlp, fit_predict
from vesper_sdk.eval.metrics import auroc


def test_distinct_cv_is_unchanged_by_copies_of_a_question():
    rng = np.random.default_rng(0)
    y = (rng.random(60) < 0.6).astype(float)
    scores = y + rng.normal(0, 0.8, 60)
    groups = np.arange(60)
    y[0], scores[0] = 1.0, scores.min() - 1  # a right answer ranked below every other
    before = distinct_cv(lambda tr, te: scores[te], y, groups)
    # The same question drawn 500 times more: its copies score and grade the same.
    many = np.r_[np.arange(60), np.zeros(500, dtype=int)]
    after = distinct_cv(lambda tr, te: scores[many][te], y[many], groups[many])
    assert after == before
    # Plain AUROC would count the copies: 500 right answers at the bottom sink it.
    assert auroc(scores[many], y[many]) < auroc(scores, y) - 0.2


def test_answer_mlp_learns_what_a_pooled_linear_row_cannot():
    # Right when the two features of the answer's tokens share a sign: no linear
    # function of their mean ranks that, a hidden layer does.
    rng = np.random.default_rng(1)
    tokens, y = [], []
    for _ in range(1200):
        x = torch.tensor(rng.normal(size=(1, 2)), dtype=torch.float32).repeat(
            int(rng.integers(1, 4)), 1)
        tokens.append(x)
        y.append(float(x[0, 0] * x[0, 1] > 0))
    y = np.array(y)
    score = fit_answer_mlp(tokens[:1000], y[:1000], epochs=40)
    assert auroc(score(tokens[1000:]), y[1000:]) > 0.9
    means = np.stack([t.mean(0).numpy() for t in tokens])
    row = fit_predict(means[:1000], y[:1000], means[1000:], l2=1e-3)  # the answer row's fit
    assert auroc(row, y[1000:]) < 0.65
