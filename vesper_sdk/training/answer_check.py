"""The answer check: an answer's confidence that needs the token confidence to agree.

The MetaHead's answer head (its answer row, or the answer MLP) reads every block's output
and ranks answers to questions like those it was fitted on better than any signal of the
tokens' probabilities does; on questions unlike them (names of a form it never saw,
numbers past its ranges) it can be sure of a wrong answer the token confidence doubts.
The check pools the token confidence over the answer beside the head's logit and adds the
odds of a wrong answer that each gives (``metahead.answer_confidence_from_sum``); it is
kept where that ranks answers better, shifted questions included (:func:`fit_check`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ..eval.metrics import auroc, fit_platt
from ..model import VesperLM
from ..model.metahead import confidence_logits


def pooled(model: VesperLM, reads: Sequence[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """Each answer's pooled answer logit as ``model`` computes it (its row plus its MLP)
    and its tokens' mean confidence logit as the engine pools them, from the answers'
    reads (what the answer row reads at each token, ``[T, R]``; the last column is the
    calibrated confidence logit)."""
    head = model.metahead
    answer, conf = [], []
    with torch.no_grad():
        for t in reads:
            a = head.answer_logit(t.to(head.answer.weight))[:, 0]
            answer.append(float(a.double().mean()))
            conf.append(float(confidence_logits(torch.sigmoid(t[:, -1].float())).mean()))
    return np.array(answer), np.array(conf)


def fit_check(model: VesperLM, reads: Sequence[torch.Tensor], correct: np.ndarray,
              groups: np.ndarray, out_of_fold: np.ndarray,
              shifted_reads: Sequence[torch.Tensor] = (),
              shifted_correct: np.ndarray | None = None) -> dict[str, float]:
    """Fit the answer check (``model.config.metahead_answer_check``, in place) on graded
    calibration answers, and keep it where it ranks answers better than the head alone.

    ``reads``/``correct``/``groups``: the calibration answers' reads, grades and question
    ids; ``out_of_fold``: the head's pooled logit of each from a fit that never saw its
    question. The pooled token confidence is Platt-scaled on these answers, combined with
    the out-of-fold logits (``answer_confidence_from_sum``) and the combination
    Platt-scaled in turn. The check is kept when the combination's AUROC beats the head's
    over the calibration answers (out of fold, each question once) and the answers to
    shifted questions (``shifted_reads``: questions unlike any the head was fitted on,
    scored by the head as it now is). Returns the figures.
    """
    _, conf = pooled(model, reads)
    a, b = fit_platt(conf, correct)

    def softmin(head: np.ndarray, c: np.ndarray) -> np.ndarray:
        return -np.logaddexp(-head, -(a * c + b))

    scale, shift = fit_platt(softmin(out_of_fold, conf), correct)
    first = np.unique(groups, return_index=True)[1]  # each question once
    heads, checked, right = [out_of_fold[first]], [softmin(out_of_fold, conf)[first]], \
        [np.asarray(correct, dtype=np.float64)[first]]
    if len(shifted_reads):
        s_head, s_conf = pooled(model, shifted_reads)
        heads.append(s_head)
        checked.append(softmin(s_head, s_conf))
        right.append(np.asarray(shifted_correct, dtype=np.float64))
    y = np.concatenate(right)
    without, with_check = auroc(np.concatenate(heads), y), auroc(np.concatenate(checked), y)
    check = [float(v) for v in (a, b, scale, shift)]
    keep = bool(with_check > without) and all(math.isfinite(v) for v in check)
    model.config.metahead_answer_check = check if keep else []
    return {"answer_check": float(keep), "answer_check_shifted_answers": float(len(shifted_reads)),
            "answer_check_auroc_once": with_check, "answer_check_auroc_once_without": without}


__all__ = ["fit_check", "pooled"]
