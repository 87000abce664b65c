"""The answer MLP's fit and the cross-validation that chooses between it and the answer row."""

from __future__ import annotations

import numpy as np
import torch

from vesper_sdk.eval.metrics import auroc, cv_auroc_once, fit_logistic_row
from vesper_sdk.training.answer_mlp import DEFAULT_RECIPE, answer_logits, fit_answer_mlp
from vesper_sdk.training.calibration import _mlp_if_better, fit_answer_row


def sign_rule_answers(n: int, seed: int = 1) -> tuple[list[torch.Tensor], np.ndarray]:
    """Answers of 1-3 tokens, each token the answer's two features; right when the two
    share a sign: no linear function of their mean ranks that, a hidden layer does."""
    rng = np.random.default_rng(seed)
    tokens, y = [], []
    for _ in range(n):
        x = torch.tensor(rng.normal(size=(1, 2)), dtype=torch.float32).repeat(
            int(rng.integers(1, 4)), 1)
        tokens.append(x)
        y.append(float(x[0, 0] * x[0, 1] > 0))
    return tokens, np.array(y)


def test_cv_auroc_once_is_unchanged_by_copies_of_a_question():
    rng = np.random.default_rng(0)
    y = (rng.random(60) < 0.6).astype(float)
    scores = y + rng.normal(0, 0.8, 60)
    groups = np.arange(60)
    y[0], scores[0] = 1.0, scores.min() - 1  # a right answer ranked below every other
    before = cv_auroc_once(lambda tr, te: scores[te], y, groups)
    # The same question drawn 500 times more: its copies score and grade the same.
    many = np.r_[np.arange(60), np.zeros(500, dtype=int)]
    after = cv_auroc_once(lambda tr, te: scores[many][te], y[many], groups[many])
    assert after == before
    # Plain AUROC would count the copies: 500 right answers at the bottom sink it.
    assert auroc(scores[many], y[many]) < auroc(scores, y) - 0.2


def test_answer_mlp_learns_what_a_pooled_linear_row_cannot():
    tokens, y = sign_rule_answers(1200)
    mlp = fit_answer_mlp(tokens[:1000], y[:1000])
    assert auroc(answer_logits(mlp, tokens[1000:]), y[1000:]) > 0.9
    means = np.stack([t.mean(0).numpy() for t in tokens]).astype(np.float64)
    w, b = fit_logistic_row(means[:1000], y[:1000], 1e-3)  # the answer row's fit
    assert auroc(means[1000:] @ w + b, y[1000:]) < 0.65


def test_the_fitted_mlp_reads_raw_inputs_and_leaves_the_random_state_alone():
    """The standardisation is folded into the first layer, so the MLP reads what the
    answer row reads, at any scale; fitting it does not move the caller's RNG."""
    tokens, y = sign_rule_answers(600)
    scaled = [t * torch.tensor([300.0, 0.01]) + torch.tensor([50.0, -2.0]) for t in tokens]
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    mlp = fit_answer_mlp(scaled[:500], y[:500])
    assert torch.equal(torch.rand(3), expected)
    assert [m.__class__.__name__ for m in mlp] == ["Linear", "GELU", "Linear"]
    assert auroc(answer_logits(mlp, scaled[500:]), y[500:]) > 0.9


def test_calibration_keeps_the_mlp_only_where_it_ranks_questions_better():
    """On the sign rule the MLP wins the count-once cross-validation and is returned
    fitted; where the answers' right/wrong is linear in their means, the row wins (or
    ties) and no MLP is kept."""
    tokens, y = sign_rule_answers(400)
    groups = np.arange(len(y))

    def choose(tok, labels):
        x = np.stack([t.mean(0).numpy() for t in tok]).astype(np.float64)
        passthrough = np.zeros(x.shape[1])
        passthrough[-1] = 1.0
        fit = fit_answer_row(x, labels, groups, passthrough, 0.0)
        return _mlp_if_better(tok, x, labels, groups, fit, passthrough, DEFAULT_RECIPE)

    mlp, row_once, mlp_once, oof = choose(tokens, y)
    assert mlp is not None and mlp_once > row_once + 0.2
    # The kept head's out-of-fold scores: the MLP's, from fits that never saw the answer.
    assert oof.shape == y.shape and auroc(oof, y) > 0.9
    linear = np.array([float(t[0, 0] + 0.2 * t[0, 1] > 0) for t in tokens])
    mlp, row_once, mlp_once, oof = choose(tokens, linear)
    assert mlp is None and row_once >= mlp_once and row_once > 0.95
    assert auroc(oof, linear) > 0.95
