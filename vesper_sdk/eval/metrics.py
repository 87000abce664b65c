"""Calibration measures of a confidence signal (pure numpy, no scikit-learn).

:func:`expected_calibration_error` (equal-width bins), :func:`auroc` (rank formula with
ties averaged, equal to ``sklearn.metrics.roc_auc_score``), :func:`reliability_bins`,
:func:`brier_score`, :func:`calibration_summary`, :func:`paired_bootstrap` (document-level
intervals of two signals on the same tokens), :func:`fit_platt` (the Platt scaling fitted
to the MetaHead at the end of training) and :func:`fit_confidence` (a refit of the
confidence row on held-out tokens).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


def _as_arrays(confidence: Any, correct: Any) -> tuple[np.ndarray, np.ndarray]:
    conf = np.asarray(_to_numpy(confidence), dtype=np.float64).reshape(-1)
    corr = np.asarray(_to_numpy(correct)).reshape(-1).astype(np.float64)
    if conf.shape != corr.shape:
        raise ValueError(f"confidence and correct differ in length: {conf.size} vs {corr.size}")
    if conf.size and (np.nanmin(conf) < 0 or np.nanmax(conf) > 1):
        raise ValueError("confidence values must be probabilities in [0, 1]")
    return conf, corr


def _to_numpy(x: Any) -> Any:
    # torch tensors without importing torch here: anything with .detach().cpu().numpy().
    if hasattr(x, "detach"):
        return x.detach().float().cpu().numpy() if x.is_floating_point() else \
            x.detach().cpu().numpy()
    return x


@dataclass
class ReliabilityBins:
    """Per-bin statistics of a reliability diagram (equal-width bins over [0, 1]).

    Bin i holds confidences in ``(edges[i], edges[i+1]]`` (the first bin also holds 0).
    ``accuracy`` and ``confidence`` are NaN in empty bins.
    """

    edges: np.ndarray  # [n_bins + 1]
    counts: np.ndarray  # [n_bins] int
    confidence: np.ndarray  # [n_bins] mean confidence in the bin
    accuracy: np.ndarray  # [n_bins] fraction correct in the bin

    def to_dict(self) -> dict[str, list]:
        def clean(a: np.ndarray) -> list:
            return [None if np.isnan(v) else float(v) for v in a]
        return {"edges": [float(e) for e in self.edges], "counts": [int(c) for c in self.counts],
                "confidence": clean(self.confidence), "accuracy": clean(self.accuracy)}


def bin_index(confidence: Any, n_bins: int) -> Any:
    """The equal-width bin of each confidence: bin i holds ``(i/n, (i+1)/n]``, 0 joins bin 0
    (right-closed bins, as in Guo et al. 2017). Works on numpy arrays and torch tensors
    alike (float64 arithmetic either way), so every ECE in the SDK bins the same."""
    if hasattr(confidence, "ceil"):  # a torch tensor (training's streaming meter)
        return ((confidence * n_bins).ceil() - 1).clamp(0, n_bins - 1).long()
    return np.clip(np.ceil(confidence * n_bins) - 1, 0, n_bins - 1).astype(np.int64)


def ece_from_bin_sums(counts: Any, confidence_sums: Any, correct_sums: Any) -> float:
    """ECE from per-bin sums: sum over bins of |correct - confidence| / total (= bin share
    times |accuracy - mean confidence|); NaN when there are no predictions."""
    counts, conf, corr = (np.asarray(a, dtype=np.float64)
                          for a in (counts, confidence_sums, correct_sums))
    total = counts.sum()
    return float(np.abs(corr - conf).sum() / total) if total > 0 else float("nan")


def _bin_sums(confidence: Any, correct: Any, n_bins: int) -> tuple[np.ndarray, ...]:
    """(count, sum of confidence, sum of correct) per bin."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    conf, corr = _as_arrays(confidence, correct)
    idx = bin_index(conf.astype(np.float64), n_bins)
    return (np.bincount(idx, minlength=n_bins), np.bincount(idx, weights=conf, minlength=n_bins),
            np.bincount(idx, weights=corr, minlength=n_bins))


def reliability_bins(confidence: Any, correct: Any, n_bins: int = 15) -> ReliabilityBins:
    """Bin predictions by confidence into ``n_bins`` equal-width bins (see bin_index)."""
    counts, conf_sum, corr_sum = _bin_sums(confidence, correct, n_bins)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(counts > 0, conf_sum / np.maximum(counts, 1), np.nan)
        acc = np.where(counts > 0, corr_sum / np.maximum(counts, 1), np.nan)
    return ReliabilityBins(edges, counts, mean_conf, acc)


def expected_calibration_error(confidence: Any, correct: Any, n_bins: int = 15) -> float:
    """ECE: sum over bins of (bin share) * |accuracy - mean confidence|, equal-width bins.

    ``confidence`` in [0, 1]; ``correct`` 0/1 (or bool). NaN for no predictions.
    """
    return ece_from_bin_sums(*_bin_sums(confidence, correct, n_bins))


def rankdata(values: Any) -> np.ndarray:
    """1-based ranks with ties given their average rank (scipy's ``rankdata``, 'average')."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # Start of each run of equal values in sorted order.
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], xs.size]
    avg = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def auroc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (1 = positive).

    The Mann-Whitney form, ``(sum of positive ranks - P(P+1)/2) / (P * N)``, with tied
    scores given their average rank: the probability that a random positive scores above
    a random negative, ties counting one half. Equals scikit-learn's ``roc_auc_score``.
    NaN when only one class is present (sklearn raises there).
    """
    s, y = _as_scores(scores, labels)
    pos = y > 0.5
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _as_scores(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(_to_numpy(scores), dtype=np.float64).reshape(-1)
    y = np.asarray(_to_numpy(labels)).reshape(-1).astype(np.float64)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.size} vs {y.size}")
    return s, y


def brier_score(confidence: Any, correct: Any) -> float:
    """Mean squared error between confidence and the 0/1 outcome (NaN when empty)."""
    conf, corr = _as_arrays(confidence, correct)
    return float(np.mean((conf - corr) ** 2)) if conf.size else float("nan")


def calibration_summary(confidence: Any, correct: Any, n_bins: int = 15) -> dict[str, Any]:
    """ECE, AUROC, Brier score, accuracy and mean confidence of one confidence signal."""
    conf, corr = _as_arrays(confidence, correct)
    return {
        "n": int(conf.size),
        "accuracy": float(corr.mean()) if conf.size else float("nan"),
        "mean_confidence": float(conf.mean()) if conf.size else float("nan"),
        "ece": expected_calibration_error(conf, corr, n_bins),
        "auroc": auroc(conf, corr),
        "brier": brier_score(conf, corr),
        "reliability": reliability_bins(conf, corr, n_bins).to_dict(),
    }


def same_groups(keys: Sequence[Hashable]) -> np.ndarray:
    """One id per item, shared by equal items (in order of first appearance): identical
    documents, or the same question asked again, whose scores are the same scores
    again (greedy answers, teacher forcing) and so one sample, not two."""
    ids: dict[Hashable, int] = {}
    return np.array([ids.setdefault(k, len(ids)) for k in keys], dtype=np.int64)


def group_resamples(groups: Any, resamples: int, seed: int = 0) -> Iterator[np.ndarray]:
    """Item indices of ``resamples`` bootstrap resamples, each drawing as many groups as
    there are, with replacement, and taking every item of each group drawn."""
    g = np.asarray(_to_numpy(groups)).reshape(-1)
    _, inv = np.unique(g, return_inverse=True)
    order = np.argsort(inv, kind="stable")
    counts = np.bincount(inv)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rng = np.random.default_rng(seed)
    for _ in range(resamples if counts.size else 0):
        pick = rng.integers(0, counts.size, counts.size)
        lengths = counts[pick]
        # Positions of the picked groups' items, vectorised: group start + offset within.
        offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        yield order[np.repeat(starts[pick], lengths) + offsets]


def paired_bootstrap(confidence_a: Any, confidence_b: Any, correct: Any, groups: Any,
                     n_bins: int = 15, resamples: int = 200, level: float = 0.95,
                     seed: int = 0) -> dict[str, Any]:
    """Bootstrap intervals of ECE and AUROC for two confidence signals on the same tokens.

    Whole groups (``groups``: one id per token, e.g. its document) are resampled with
    replacement, since tokens of one document are not independent; each resample scores
    both signals on the same tokens, so the interval of the difference (a - b) is the
    paired one. Returns ``{"a": {"ece": [lo, hi], "auroc": [lo, hi]}, "b": ...,
    "a_minus_b": ..., "resamples", "groups", "level"}`` (percentile intervals).
    """
    a, y = _as_scores(confidence_a, correct)
    b, _ = _as_scores(confidence_b, correct)
    g = np.asarray(_to_numpy(groups)).reshape(-1)
    if g.shape != y.shape:
        raise ValueError(f"groups and correct differ in length: {g.size} vs {y.size}")
    draws: dict[str, list[float]] = {k: [] for k in ("a_ece", "a_auroc", "b_ece", "b_auroc")}
    for idx in group_resamples(g, resamples, seed):
        for key, sig in (("a", a), ("b", b)):
            draws[f"{key}_ece"].append(expected_calibration_error(sig[idx], y[idx], n_bins))
            draws[f"{key}_auroc"].append(auroc(sig[idx], y[idx]))
    q = [50 * (1 - level), 50 * (1 + level)]

    def interval(values: Any) -> list[float]:
        v = np.asarray(values, dtype=np.float64)
        if not np.isfinite(v).any():
            return [float("nan"), float("nan")]
        return [float(x) for x in np.nanpercentile(v, q)]

    diff = {m: np.subtract(draws[f"a_{m}"], draws[f"b_{m}"]) for m in ("ece", "auroc")}
    return {"a": {m: interval(draws[f"a_{m}"]) for m in ("ece", "auroc")},
            "b": {m: interval(draws[f"b_{m}"]) for m in ("ece", "auroc")},
            "a_minus_b": {m: interval(diff[m]) for m in ("ece", "auroc")},
            "resamples": resamples, "groups": int(np.unique(g).size), "level": level}


def _fit_logistic(x: np.ndarray, y: np.ndarray, penalty: np.ndarray, start: np.ndarray,
                  iterations: int = 100) -> np.ndarray:
    """Weights minimising mean log loss of sigmoid(x @ w) + 0.5 * sum(penalty * w**2).

    Newton's method with a backtracking line search (from far away a full step
    overshoots); a positive penalty on every coefficient keeps it well posed."""
    n = max(len(y), 1)

    def loss(w: np.ndarray) -> float:  # stable for any logit
        m = x @ w
        return float(np.mean(np.logaddexp(0.0, m) - y * m) + 0.5 * (penalty * w) @ w)

    w = start.astype(np.float64).copy()
    current = loss(w)
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(x @ w, -50.0, 50.0)))
        grad = x.T @ (p - y) / n + penalty * w
        hess = (x.T * (p * (1.0 - p))) @ x / n + np.diag(penalty)
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while t > 1e-6 and loss(w - t * step) > current:
            t /= 2
        w = w - t * step
        previous, current = current, loss(w)
        if previous - current < 1e-12:
            break
    return w


def fit_platt(logits: Any, correct: Any, l2: float = 1e-4) -> tuple[float, float]:
    """Platt scaling: (scale, bias) minimising the log loss of sigmoid(scale * z + bias).

    ``logits`` are raw confidence logits z, ``correct`` the 0/1 outcomes (a tiny L2 term
    keeps it well posed when one class is absent); (1, 0), the identity, when there is
    nothing to fit.
    """
    z = np.asarray(_to_numpy(logits), dtype=np.float64).reshape(-1)
    y = np.asarray(_to_numpy(correct)).reshape(-1).astype(np.float64)
    if z.shape != y.shape:
        raise ValueError(f"logits and correct differ in length: {z.size} vs {y.size}")
    if z.size == 0:
        return 1.0, 0.0
    w = _fit_logistic(np.stack([z, np.ones_like(z)], axis=1), y, np.full(2, l2),
                      np.array([1.0, 0.0]))
    return float(w[0]), float(w[1])


@dataclass
class ConfidenceFit:
    """A confidence output refitted on held-out tokens (see :func:`fit_confidence`)."""

    weight: np.ndarray  # [d]: the new confidence row over the MetaHead's activations
    bias: float
    l2: float  # the penalty cross-validation chose (inf: Platt scaling alone)
    cv_log_loss: dict[float, float]  # per candidate penalty, held-out folds
    tokens: int
    groups: int


def fit_confidence(activations: Any, correct: Any, groups: Any, weight: Any, bias: float,
                   l2_grid: Sequence[float] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0),
                   folds: int = 5, seed: int = 0) -> ConfidenceFit:
    """Refit a linear confidence output on held-out tokens: Platt scaling plus a correction.

    ``activations`` [n, d] are what the output layer reads, ``weight``/``bias`` its
    current confidence row (logit z = activations @ weight + bias). The fit is logistic
    regression on z (free: that alone is Platt scaling) and on the standardised
    activations (L2-penalised): where the activations tell right from wrong better than
    z does on unseen data, the new row uses them. The penalty comes from ``l2_grid``
    (and inf: Platt alone) by ``folds``-fold cross-validation over whole ``groups``
    (e.g. one id per question: the same question in two folds would leak), lowest held-out
    log loss. Returns the row folded back into the activations' space.
    """
    a = np.asarray(_to_numpy(activations), dtype=np.float64)
    y = np.asarray(_to_numpy(correct)).reshape(-1).astype(np.float64)
    g = np.asarray(_to_numpy(groups)).reshape(-1)
    w0 = np.asarray(_to_numpy(weight), dtype=np.float64).reshape(-1)
    if a.ndim != 2 or a.shape[0] != y.size or g.size != y.size or a.shape[1] != w0.size:
        raise ValueError(f"activations {a.shape}, correct {y.shape}, groups {g.shape} and "
                         f"weight {w0.shape} do not fit together")
    z = a @ w0 + bias
    _, group_of = np.unique(g, return_inverse=True)
    n_groups = int(group_of.max()) + 1 if y.size else 0
    fold_of = np.random.default_rng(seed).permutation(n_groups)[group_of] % folds if \
        n_groups else group_of

    def fit(idx: np.ndarray, l2: float) -> Any:
        mu, sd = a[idx].mean(0), a[idx].std(0) + 1e-6
        if math.isinf(l2):  # Platt alone
            scale, shift = fit_platt(z[idx], y[idx], l2=1e-6)
            return (lambda rows: scale * z[rows] + shift,
                    (scale, shift, np.zeros_like(w0), mu, sd))
        x = np.column_stack([z[idx], np.ones(idx.size), (a[idx] - mu) / sd])
        pen = np.concatenate([[1e-6, 1e-6], np.full(a.shape[1], l2)])
        w = _fit_logistic(x, y[idx], pen, np.concatenate([[1.0, 0.0], np.zeros(a.shape[1])]))
        return (lambda rows: w[0] * z[rows] + w[1] + ((a[rows] - mu) / sd) @ w[2:],
                (w[0], w[1], w[2:], mu, sd))

    grid = [*l2_grid, math.inf]
    cv: dict[float, float] = {}
    if n_groups >= folds:
        for l2 in grid:
            total = 0.0
            for f in range(folds):
                test = np.flatnonzero(fold_of == f)
                logit, _ = fit(np.flatnonzero(fold_of != f), l2)
                m = logit(test)
                total += float(np.sum(np.logaddexp(0.0, m) - y[test] * m))
            cv[l2] = total / y.size
    chosen = min(cv, key=lambda k: cv[k]) if cv else math.inf
    _, (alpha, beta, w, mu, sd) = fit(np.arange(y.size), chosen)
    # alpha * (a @ w0 + bias) + beta + ((a - mu) / sd) @ w, as one row over a.
    row = alpha * w0 + w / sd
    return ConfidenceFit(row, float(alpha * bias + beta - (w / sd) @ mu), float(chosen), cv,
                         int(y.size), n_groups)


@dataclass
class AnswerFit:
    """An answer row fitted on graded answers (see :func:`fit_answer_row`)."""

    weight: np.ndarray  # [d]: the row over the (pooled) features
    bias: float
    l2: float  # the penalty cross-validation chose (inf: the row given, Platt-scaled)
    cv_auroc: dict[float, float]  # per candidate penalty, out-of-fold (inf: the row given)
    answers: int
    groups: int


def fit_answer_row(features: Any, correct: Any, groups: Any, weight: Any, bias: float,
                   l2_grid: Sequence[float] = (1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0),
                   folds: int = 5, seed: int = 0) -> AnswerFit:
    """L2-penalised logistic regression from answers' pooled ``features`` [n, d] to
    ``correct``, as one row (the standardisation folded in).

    The penalty is chosen by ``folds``-fold cross-validation over whole ``groups`` (the
    same question asked twice is one group: a greedy model answers it the same way, so
    in two folds it would leak), by the out-of-fold AUROC: ranking right above wrong is
    the row's job, and out-of-fold log loss, on folds whose mix of questions differs,
    prefers penalties that lose ranking), averaged over the folds (pooling the folds'
    scores would rank one fold's fit against another's). A row given (``weight``,
    ``bias``; not fitted on these answers, or its score would leak) is a candidate too
    (``inf``); chosen, it is returned Platt-scaled on the answers (its ranking kept), and
    as given when there is nothing to fit (fewer groups than folds, or answers all right
    or all wrong).
    """
    x = np.asarray(_to_numpy(features), dtype=np.float64)
    y = np.asarray(_to_numpy(correct)).reshape(-1).astype(np.float64)
    w0 = np.asarray(_to_numpy(weight), dtype=np.float64).reshape(-1)
    _, group_of = np.unique(np.asarray(_to_numpy(groups)).reshape(-1), return_inverse=True)
    if x.ndim != 2 or x.shape[0] != y.size or group_of.size != y.size or x.shape[1] != w0.size:
        raise ValueError(f"features {x.shape}, correct {y.shape}, groups {group_of.shape} "
                         f"and weight {w0.shape} do not fit together")
    n_groups = int(group_of.max()) + 1 if y.size else 0
    fold_of = question_folds(group_of, folds, seed)

    def fit(rows: np.ndarray, l2: float) -> tuple[np.ndarray, float]:
        return fit_logistic_row(x[rows], y[rows], l2)

    cv: dict[float, float] = {}
    if n_groups >= folds and 0 < y.sum() < y.size:
        tests = [fold_of == f for f in range(folds)]

        def fold_mean(scores: list[np.ndarray]) -> float:
            # Each fold's AUROC, averaged: pooling would rank one fold's fit against another's.
            return float(np.nanmean([auroc(sc, y[t]) for sc, t in zip(scores, tests,
                                                                       strict=True)]))

        cv[math.inf] = fold_mean([x[t] @ w0 + bias for t in tests])
        for l2 in l2_grid:
            fits = [fit(np.flatnonzero(~t), l2) for t in tests]
            cv[l2] = fold_mean([x[t] @ w + b for (w, b), t in zip(fits, tests, strict=True)])
    chosen = max(cv, key=lambda k: (cv[k], k)) if cv else math.inf  # ties: stronger
    if not math.isinf(chosen):
        row, b = fit(np.arange(y.size), chosen)
    elif cv:
        # The row given ranks best: keep its ranking, but make its probability an
        # answer's (Platt scaling; a token-level logit passed through is over-confident).
        scale, shift = fit_platt(x @ w0 + bias, y)
        row, b = (scale * w0, float(scale * bias + shift)) if scale > 0 else (w0, float(bias))
    else:
        row, b = w0, float(bias)
    return AnswerFit(row, b, float(chosen), cv, int(y.size), n_groups)


def fit_logistic_row(x: np.ndarray, y: np.ndarray, l2: float) -> tuple[np.ndarray, float]:
    """L2-penalised logistic regression on standardised ``x`` [n, d], returned as one row
    over ``x`` itself: (weight [d], bias)."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    design = np.column_stack([(x - mu) / sd, np.ones(len(x))])
    w = _fit_logistic(design, y, np.r_[np.full(x.shape[1], l2), 1e-6], np.zeros(x.shape[1] + 1))
    return w[:-1] / sd, float(w[-1] - (w[:-1] / sd) @ mu)


def question_folds(groups: Any, folds: int, seed: int = 0) -> np.ndarray:
    """Each item's fold, whole groups (group ids ``0..G-1``: questions) to a fold, the same
    for a given seed: the same question in two folds would leak its answer."""
    g = np.asarray(groups).reshape(-1)
    return np.random.default_rng(seed).permutation(int(g.max()) + 1 if g.size else 1)[g] % folds


def cv_auroc_once(fit_score: Callable[[np.ndarray, np.ndarray], np.ndarray], correct: Any,
                  groups: Any, folds: int = 5, seed: int = 0) -> float:
    """Grouped ``folds``-fold cross-validated AUROC, each distinct question counted once per
    fold (its first answer), averaged over the folds.

    ``fit_score(train, test)`` scores the ``test`` items (indices) from a fit on the
    ``train`` ones. Counting each question once keeps one question drawn thousands of
    times from deciding a fold (a greedy model answers it the same way every time).
    """
    y = np.asarray(_to_numpy(correct)).reshape(-1).astype(np.float64)
    g = np.unique(np.asarray(_to_numpy(groups)).reshape(-1), return_inverse=True)[1]
    fold = question_folds(g, folds, seed)
    per = []
    for f in range(folds):
        test = np.flatnonzero(fold == f)
        if not test.size:
            continue
        scores = np.asarray(fit_score(np.flatnonzero(fold != f), test))
        once = np.unique(g[test], return_index=True)[1]
        per.append(auroc(scores[once], y[test][once]))
    per = [a for a in per if not math.isnan(a)]  # a fold of one class ranks nothing
    return float(np.mean(per)) if per else float("nan")


def mean(values: Sequence[float]) -> float:
    """Mean of a sequence (NaN when empty), for answer-level confidences."""
    return float(sum(values) / len(values)) if values else float("nan")
