"""Refit a model's MetaHead confidence on held-out data: ``vesper_sdk.calibrate``.

Training ends with this step (``--calibrate``, on by default); ``vesper calibrate`` runs it
on any model folder, e.g. on data of your own that the model never trained on:

    vesper calibrate runs/a/model --data heldout.jsonl

The MetaHead is trained on the training data, where the LM is right more often than on
text it has not seen. On held-out tokens, :func:`vesper_sdk.eval.metrics.fit_confidence` fits
the confidence output again: Platt scaling of its logit plus an L2-penalised correction
read from the MetaHead's activations, the penalty chosen by cross-validation over whole
questions (builtin:skills) or documents, so a recurring question never sits on both sides
of a fold. The result is written into the confidence row of ``metahead.out``.

Then the MetaHead's answer row (what an answer's confidence is read from) is fitted on
greedy answers to held-out questions, each graded right or wrong, and an answer MLP
beside it replaces it where cross-validation over the questions prefers the MLP
(:func:`refit_answer`). Last, the answer check (:mod:`.answer_check`): whether an answer's
confidence should need the token confidence to agree, decided with builtin:skills'
shifted questions too. Nothing else in the model changes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import skills
from ..device import resolve_device
from ..eval.answers import Question, greedy_answers, questions, shifted_questions
from ..eval.metrics import (
    AnswerFit,
    cv_auroc_once,
    expected_calibration_error,
    fit_answer_row,
    fit_confidence,
    fit_logistic_row,
    question_folds,
)
from ..eval.scorer import encode_examples, padded, windows
from ..folder import ModelFolder
from ..inference import LLM
from ..inference.decode_swaps import remove_decode_swaps
from ..model import VesperLM
from ..model.metahead import metahead_targets
from ..tokenizer import TOKENIZER_NAME, VesperTokenizer
from .answer_check import fit_check
from .answer_mlp import DEFAULT_RECIPE, AnswerMLPRecipe, answer_logits, fit_answer_mlp
from .data import DataSource

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
# Below these the fit is noise or undefined (the cross-validation that picks the penalty
# needs a group in each of its folds; with fewer its log loss is NaN), so the MetaHead
# keeps the confidence it has. (All tokens right, or all wrong, is a valid fit: the
# confidence learns to say so.)
MIN_TOKENS = 100  # scored held-out tokens
MIN_GROUPS = 5  # questions / documents / validation blocks: the cross-validation's folds


class CalibrationWarning(UserWarning):
    """The MetaHead's confidence was not refit: too little held-out data to fit on."""


def shortfall(tokens: int, groups: int) -> str | None:
    """What the held-out data lacks for a confidence fit (None: enough), in words."""
    need = (f"a fit needs at least {MIN_TOKENS} scored tokens in at least {MIN_GROUPS} "
            "groups: documents, questions or validation blocks")
    if tokens < MIN_TOKENS:
        return f"{tokens} scored token(s): fewer than {MIN_TOKENS} scored tokens ({need})"
    if groups < MIN_GROUPS:
        return f"{tokens} scored tokens in only {groups} group(s) ({need})"
    return None


def pack(examples: Sequence[tuple[Sequence[int], Sequence[int]]], groups: Sequence[int],
         seq_len: int, batch_size: int, pad_id: int = 0) -> Iterator[Batch]:
    """(inputs, labels, score mask, group) batches: each example on its own rows, as a
    chat is read when it is answered or evaluated (``vesper eval`` scores the same way),
    in windows of at most ``seq_len`` predictions; ``groups`` gives each example's group.

    Packing examples back to back, as training does, would give each one the context of
    the example before it, which it never has when used: a confidence fitted there is
    fitted to other inputs. Rows are right-padded (the padding is not scored; causal
    attention keeps it out of every real position) and sorted by length.
    """
    rows = sorted(((ids, mask, groups[doc]) for ids, mask, doc in windows(examples, seq_len + 1)),
                  key=lambda r: len(r[0]))
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        tokens = padded([r[0] for r in chunk], pad_id, torch.long)
        targets = padded([r[1] for r in chunk], 0, torch.bool)
        owners = torch.tensor([r[2] for r in chunk])[:, None].expand_as(tokens)
        yield tokens[:, :-1], tokens[:, 1:], targets[:, 1:], owners[:, 1:]


def skills_batches(tokenizer: VesperTokenizer, examples: int, seed: int, seq_len: int,
                   batch_size: int) -> Iterator[Batch]:
    """builtin:skills' calibration split (unseen in training and in ``vesper eval``),
    grouped by question: the same question can be drawn twice."""
    encoded, groups = [], []
    questions: dict[str, int] = {}
    for ex in skills.calibration(examples, seed):
        enc = tokenizer.encode_chat(ex["messages"])
        asked = next((t["content"] for t in ex["messages"] if t["role"] == "user"), "")
        encoded.append((enc.ids, enc.loss_mask))
        groups.append(questions.setdefault(asked, len(questions)))
    return pack(encoded, groups, seq_len, batch_size, tokenizer.pad_id)


def refit_confidence(model: VesperLM, batches: Iterator[Batch], eos_id: int,
                     autocast: Callable[[], contextlib.AbstractContextManager] =
                     contextlib.nullcontext,
                     warn: Callable[[str], None] | None = None) -> dict[str, float] | None:
    """Refit ``model``'s confidence row on the scored tokens of ``batches`` (in place).

    Returns the fit's figures (tokens, groups, cross-validated log loss of the chosen
    penalty and of Platt scaling alone, ECE on these tokens before and after), or None,
    leaving the model as it was (its calibration, identity after training, included),
    when the data is too little to fit on (:func:`shortfall`: fewer than ``MIN_TOKENS``
    scored tokens or ``MIN_GROUPS`` groups) or the fit is not finite. Why is said through
    ``warn`` (default: a :class:`CalibrationWarning`).
    """
    fit, reason = _refit(model, batches, eos_id, autocast)
    if fit is None:
        _say(f"MetaHead calibration skipped, the confidence stays as it was: the held-out "
             f"data gave {reason}", warn)
    return fit


def _say(message: str, warn: Callable[[str], None] | None) -> None:
    """Through ``warn`` (the trainer's log), else as a :class:`CalibrationWarning`."""
    if warn is None:
        warnings.warn(message, CalibrationWarning, stacklevel=3)
    else:
        warn(message)


@torch.no_grad()
def _refit(model: VesperLM, batches: Iterator[Batch], eos_id: int,
           autocast: Callable[[], contextlib.AbstractContextManager],
           ) -> tuple[dict[str, float] | None, str]:
    """:func:`refit_confidence`'s work: (figures, "") or (None, why not)."""
    head = model.metahead
    was_training = model.training
    model.eval()
    acts, correct, groups = [], [], []
    try:
        for x, y, m, g in batches:
            x, y, m = x.to(model.device), y.to(model.device), m.to(model.device)
            with autocast():
                out = model(x)
                a = head.activations(out.hidden_states, out.logits)
            right = metahead_targets(out.logits, y, eos_id).correct
            acts.append(a.float()[m].cpu())
            correct.append(right[m].cpu())
            groups.append(g[m.cpu()])
    finally:
        model.train(was_training)
    n = sum(len(c) for c in correct)
    n_groups = len(torch.cat(groups).unique()) if n else 0
    reason = shortfall(n, n_groups)
    if reason:
        return None, reason
    a, c, g = torch.cat(acts).double(), torch.cat(correct), torch.cat(groups)
    if not bool(torch.isfinite(a).all()):
        return None, f"{n} scored tokens, but non-finite MetaHead activations on them"
    # The confidence logit as it stands, its Platt scaling included.
    scale, shift = head.calibration.tolist()
    w0 = head.out.weight[0].detach().double().cpu() * scale
    b0 = float(head.out.bias[0]) * scale + shift
    fit = fit_confidence(a.numpy(), c.numpy(), g.numpy(), w0.numpy(), b0)
    new_w = torch.from_numpy(fit.weight)
    result = {
        "calibration_tokens": float(fit.tokens), "calibration_groups": float(fit.groups),
        "calibration_platt_only": float(math.isinf(fit.l2)),
        "calibration_cv_log_loss": fit.cv_log_loss.get(fit.l2, float("nan")),
        "calibration_cv_log_loss_platt": fit.cv_log_loss.get(math.inf, float("nan")),
        "calibration_ece_before": expected_calibration_error(
            torch.sigmoid(a @ w0 + b0).numpy(), c.numpy()),
        "calibration_ece_after": expected_calibration_error(
            torch.sigmoid(a @ new_w + fit.bias).numpy(), c.numpy()),
    }
    if not math.isinf(fit.l2):
        result["calibration_l2"] = fit.l2
    if not (bool(torch.isfinite(new_w).all()) and math.isfinite(fit.bias)
            and all(math.isfinite(v) for v in result.values())):
        return None, f"{n} scored tokens, but the fit came out non-finite"
    head.out.weight[0] = new_w.to(head.out.weight)
    head.out.bias[0] = fit.bias
    head.calibration.copy_(torch.tensor([1.0, 0.0]))
    return result, ""


# ----------------------------------------------------------------------------- answer row
MIN_ANSWERS = 100  # graded answers; fewer and the answer row keeps what it has
# Penalties the cross-validation chooses from: the answer row reads every block's output
# (layers x hidden features), each answer pooled into one row of them.
ANSWER_L2_GRID = (1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


def skills_questions(examples: int, seed: int) -> tuple[list[Question], list[int]]:
    """builtin:skills' calibration split as questions to answer, and each one's group (the
    same question drawn twice is one group)."""
    qs, groups, seen = [], [], {}
    for ex in skills.calibration(examples, seed):
        msgs = ex["messages"]
        qs.append(Question(msgs[:-1], msgs[-1]["content"], ex["task"]))
        groups.append(seen.setdefault(msgs[-2]["content"], len(seen)))
    return qs, groups


def shifted_calibration_questions(answers: int, seed: int) -> list[Question]:
    """builtin:skills' shifted questions for calibration (:func:`vesper_sdk.skills.shifted`,
    not the shifts ``vesper eval`` scores): a quarter as many as ``answers``, 100 to
    2,000."""
    return shifted_questions(min(2000, max(MIN_ANSWERS, answers // 4)), seed, "calibration")


def refit_answer(model: VesperLM, tokenizer: VesperTokenizer, qs: Sequence[Question],
                 groups: Sequence[int], warn: Callable[[str], None] | None = None,
                 batch_size: int = 16, mlp: AnswerMLPRecipe | None = DEFAULT_RECIPE,
                 shifted: Sequence[Question] = ()) -> dict[str, float] | None:
    """Fit the MetaHead's answer logit (in place) on greedy answers to ``qs``, graded.

    Each answer's row input (:class:`~vesper_sdk.model.MetaHead`: every block's output,
    the logit features, the confidence logit) is averaged over the positions that chose
    its tokens, the end token included; an answer's confidence is the sigmoid of the row
    over that mean. :func:`~vesper_sdk.eval.metrics.fit_answer_row` fits it: L2-penalised
    logistic regression on those means, the penalty chosen by cross-validated AUROC over
    ``groups``. It starts from scratch each time: the unfitted row (the confidence logit
    passed through) is the candidate to beat, and is what the row becomes (Platt-scaled on
    the answers) unless a fit ranks better.

    Then, unless ``mlp`` is None, an answer MLP (:mod:`.answer_mlp`, the same inputs at
    every token) is fitted too, and it replaces the row where grouped cross-validation,
    each distinct question counted once per fold, ranks its answers better than the row's
    (:func:`~vesper_sdk.eval.metrics.cv_auroc_once`; otherwise the model has no MLP).

    Last, the answer check (:func:`.answer_check.fit_check`): whether the answer's
    confidence should also need the token confidence's agreement, decided on the answers
    to ``qs`` and to the ``shifted`` questions (questions unlike those the head is fitted
    on).
    Returns the fit's figures, or None (the answer logit left as it was, why said through
    ``warn``) when there are too few answers.
    """
    reads, correct = answer_reads(model, tokenizer, qs, batch_size)
    n = len(correct)
    n_groups = len({g for g, r in zip(groups, reads, strict=True) if r is not None})
    keep = [i for i, r in enumerate(reads) if r is not None]
    why = None
    if len(keep) < MIN_ANSWERS or n_groups < MIN_GROUPS:
        why = (f"{len(keep)} answers to {n_groups} questions (a fit needs at least "
               f"{MIN_ANSWERS} answers to {MIN_GROUPS} questions)")
    else:
        tokens = [reads[i] for i in keep]
        x = torch.stack([t.mean(0) for t in tokens]).double().numpy()
        y = np.array([correct[i] for i in keep], dtype=np.float64)
        g = np.unique([groups[i] for i in keep], return_inverse=True)[1]
        # From scratch: the candidate to beat is the unfitted row (the confidence logit),
        # not the row as it is, which may have been fitted on these very answers.
        unfitted = np.zeros(x.shape[1])
        unfitted[-1] = 1.0
        fit = fit_answer_row(x, y, g, unfitted, 0.0, l2_grid=ANSWER_L2_GRID)
        if np.isfinite(fit.weight).all() and math.isfinite(fit.bias):
            figures = {"answer_fit_answers": float(len(keep)),
                       "answer_fit_questions": float(n_groups),
                       "answer_fit_accuracy": float(y.mean()), "answer_fit_l2": fit.l2,
                       "answer_fit_cv_auroc": fit.cv_auroc.get(fit.l2, float("nan")),
                       "answer_fit_cv_auroc_unfitted": fit.cv_auroc.get(math.inf,
                                                                        float("nan")),
                       "answer_fit_mlp": 0.0}
            chosen, oof = None, None
            if mlp is not None and mlp.hidden > 0 and 0 < y.sum() < y.size:
                chosen, row_once, mlp_once, oof = _mlp_if_better(tokens, x, y, g, fit,
                                                                 unfitted, mlp, model.device)
                figures.update(answer_fit_cv_auroc_once_row=row_once,
                               answer_fit_cv_auroc_once_mlp=mlp_once,
                               answer_fit_mlp=float(chosen is not None))
            _set_answer(model, fit, chosen)
            # A head that reads more than the confidence logit (the MLP, or a fitted row).
            if (chosen is not None or not math.isinf(fit.l2)) and 0 < y.sum() < y.size:
                if oof is None:
                    oof = _out_of_fold(_row_scorer(x, y, fit, unfitted), y, g)
                figures.update(fit_check(model, tokens, y, g, oof,
                                         *_shifted_reads(model, tokenizer, shifted,
                                                         batch_size)))
            else:
                model.config.metahead_answer_check = []
            return figures
        why = f"{n} answers, but the fit came out non-finite"
    _say(f"MetaHead answer row not fitted, it stays as it was: {why}", warn)
    return None


Scorer = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _row_scorer(x: np.ndarray, y: np.ndarray, fit: AnswerFit, unfitted: np.ndarray) -> Scorer:
    """The answer row's scores of the ``test`` answers, fitted on the ``train`` ones."""
    def row_scores(train: np.ndarray, test: np.ndarray) -> np.ndarray:
        if math.isinf(fit.l2):  # the unfitted row: nothing fitted (Platt keeps its ranking)
            return x[test] @ unfitted
        w, b = fit_logistic_row(x[train], y[train], fit.l2)
        return x[test] @ w + b
    return row_scores


def _recording(scorer: Scorer, into: np.ndarray) -> Scorer:
    """``scorer``, writing each fold's scores into ``into`` as well (out-of-fold scores)."""
    def scores(train: np.ndarray, test: np.ndarray) -> np.ndarray:
        into[test] = out = scorer(train, test)
        return out
    return scores


def _out_of_fold(scorer: Scorer, y: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Each answer's score from a fit on the folds without its question (the folds of
    :func:`~vesper_sdk.eval.metrics.cv_auroc_once`)."""
    fold, out = question_folds(g, 5), np.zeros(len(y))
    for f in range(5):
        test = np.flatnonzero(fold == f)
        if test.size:
            out[test] = scorer(np.flatnonzero(fold != f), test)
    return out


def _mlp_if_better(tokens: list[torch.Tensor], x: np.ndarray, y: np.ndarray, g: np.ndarray,
                   fit: AnswerFit, unfitted: np.ndarray, recipe: AnswerMLPRecipe,
                   device: torch.device | str = "cpu",
                   ) -> tuple[torch.nn.Sequential | None, float, float, np.ndarray]:
    """(the answer MLP fitted on every answer, or None where the row ranks as well; the
    row's and the MLP's count-once cross-validated AUROCs; the kept head's out-of-fold
    scores)."""
    def mlp_scores(train: np.ndarray, test: np.ndarray) -> np.ndarray:
        net = fit_answer_mlp([tokens[i] for i in train], y[train], recipe, device)
        return answer_logits(net, [tokens[i] for i in test])

    row_oof, mlp_oof = np.zeros(len(y)), np.zeros(len(y))
    row_once = cv_auroc_once(_recording(_row_scorer(x, y, fit, unfitted), row_oof), y, g)
    mlp_once = cv_auroc_once(_recording(mlp_scores, mlp_oof), y, g)
    if not mlp_once > row_once:  # NaN (nothing to rank) keeps the row too
        return None, row_once, mlp_once, row_oof
    return fit_answer_mlp(tokens, y, recipe, device), row_once, mlp_once, mlp_oof


def _shifted_reads(model: VesperLM, tokenizer: VesperTokenizer, shifted: Sequence[Question],
                   batch_size: int) -> tuple[list[torch.Tensor], np.ndarray]:
    """The answer reads of greedy answers to ``shifted`` (empty answers left out), and
    whether each is right."""
    if not shifted:
        return [], np.zeros(0)
    reads, correct = answer_reads(model, tokenizer, shifted, batch_size)
    keep = [i for i, r in enumerate(reads) if r is not None]
    return [reads[i] for i in keep], np.array([correct[i] for i in keep], dtype=np.float64)


@torch.no_grad()
def _set_answer(model: VesperLM, fit: AnswerFit, mlp: torch.nn.Sequential | None) -> None:
    """The answer logit becomes the fitted row, or the MLP alone (the row zeroed)."""
    head = model.metahead
    model.set_answer_mlp(0 if mlp is None else mlp[0].out_features)
    if mlp is None:
        head.answer.weight[0] = torch.from_numpy(fit.weight).to(head.answer.weight)
        head.answer.bias[0] = fit.bias
        return
    head.answer.weight.zero_()
    head.answer.bias.zero_()
    head.answer_mlp.load_state_dict({k: v.to(head.answer.weight)
                                     for k, v in mlp.state_dict().items()})


def answer_reads(model: VesperLM, tokenizer: VesperTokenizer, qs: Sequence[Question],
                 batch_size: int) -> tuple[list[torch.Tensor | None], list[bool]]:
    """Per question: the answer row's input at each position that chose a token of its
    greedy answer, [T, R] (None for an empty answer), and whether the answer is right.
    Read in eval mode; the model's mode is restored."""
    was_training = model.training
    model.eval()
    try:
        return _answer_reads(model, tokenizer, qs, batch_size)
    finally:
        model.train(was_training)


@torch.no_grad()
def _answer_reads(model: VesperLM, tokenizer: VesperTokenizer, qs: Sequence[Question],
                  batch_size: int) -> tuple[list[torch.Tensor | None], list[bool]]:
    lm = LLM(model, tokenizer)
    try:
        # A bar where a person watches (a terminal); none in logs and tests.
        answers = tqdm(greedy_answers(lm, qs, batch_size=batch_size), total=len(qs),
                       unit="answer", desc="answering held-out questions", leave=False,
                       disable=None)
        answered = [(prompt, [t.id for t in toks], q.grade("".join(t.text for t in toks)))
                    for q, prompt, toks in answers]
    finally:  # the decode backend's module swaps out again: the caller's model as it was
        remove_decode_swaps(model)
    seen: list[torch.Tensor] = []
    hook = model.metahead.answer.register_forward_hook(
        lambda _m, inputs, _out: seen.append(inputs[0]))
    reads: list[torch.Tensor | None] = []
    try:
        for i in range(0, len(answered), batch_size):
            chunk = answered[i:i + batch_size]
            # Right padding: causal attention keeps it out of every real position.
            x = padded([p + a for p, a, _ in chunk], tokenizer.pad_id, torch.long)
            seen.clear()
            model(x.to(model.device))
            inputs = seen[-1].float().cpu()
            for r, (p, a, _) in enumerate(chunk):
                reads.append(inputs[r, len(p) - 1:len(p) + len(a) - 1].clone() if a else None)
    finally:
        hook.remove()
    return reads, [ok for _, _, ok in answered]


def describe(fit: dict[str, float]) -> str:
    """What was fitted, for logs and the CLI (a line per fit)."""
    how = ("Platt scaling alone" if fit["calibration_platt_only"]
           else f"Platt scaling + activations, L2 {fit['calibration_l2']:g}")
    text = (f"MetaHead confidence refit on {fit['calibration_tokens']:,.0f} held-out tokens "
            f"({fit['calibration_groups']:,.0f} groups): {how}, chosen by 5-fold "
            f"cross-validation (held-out log loss {fit['calibration_cv_log_loss']:.4f}; "
            f"Platt alone {fit['calibration_cv_log_loss_platt']:.4f}); ECE on these tokens "
            f"{fit['calibration_ece_before']:.4f} -> {fit['calibration_ece_after']:.4f}")
    if "answer_fit_answers" in fit:
        l2 = fit["answer_fit_l2"]
        if not math.isinf(l2):
            how = f"block outputs, logit features and confidence, L2 {l2:g}"
        elif math.isnan(fit["answer_fit_cv_auroc"]):
            how = "the confidence logit alone (nothing to fit: all right or all wrong)"
        else:
            how = "the confidence logit alone, Platt-scaled (no fit ranked better)"
        text += (f"\nMetaHead answer row fitted on {fit['answer_fit_answers']:,.0f} greedy "
                 f"answers to {fit['answer_fit_questions']:,.0f} held-out questions "
                 f"(accuracy {fit['answer_fit_accuracy']:.3f}): {how}, chosen by 5-fold "
                 f"cross-validation over questions (held-out AUROC "
                 f"{fit['answer_fit_cv_auroc']:.4f}; the confidence logit alone "
                 f"{fit['answer_fit_cv_auroc_unfitted']:.4f})")
        if "answer_fit_cv_auroc_once_mlp" in fit:
            verdict = ("the MLP replaces the row" if fit["answer_fit_mlp"]
                       else "the row is kept")
            text += (f"\nMetaHead answer MLP against the row, cross-validated over questions, "
                     f"each counted once: AUROC {fit['answer_fit_cv_auroc_once_mlp']:.4f} "
                     f"vs {fit['answer_fit_cv_auroc_once_row']:.4f}: {verdict}")
        if "answer_check" in fit:
            verdict = ("kept: an answer's confidence needs the token confidence to agree"
                       if fit["answer_check"] else "not kept")
            text += (f"\nAnswer check (the pooled token confidence beside the answer head), "
                     f"on the calibration answers out of fold and "
                     f"{fit['answer_check_shifted_answers']:,.0f} answers to shifted "
                     f"questions, each question once: AUROC "
                     f"{fit['answer_check_auroc_once']:.4f} with it vs "
                     f"{fit['answer_check_auroc_once_without']:.4f} without: {verdict}")
    return text


def calibrate(model_dir: str | Path, data: str = "builtin:skills",
              out_dir: str | Path | None = None, examples: int = skills.CALIBRATION_CHATS,
              seed: int = 0, seq_len: int = 128, batch_size: int = 16, device: str = "auto",
              answers: int = 4000, answer_mlp: int = DEFAULT_RECIPE.hidden,
              ) -> dict[str, float]:
    """Refit the confidence of the model in ``model_dir`` on held-out ``data``; save it.

    ``data``: ``builtin:skills`` (its calibration split, ``examples`` chats drawn with
    ``seed``) or a .jsonl/.txt file or folder the model did not train on (its first
    ``examples`` documents; chats are scored on the assistant turns). Then the answer
    row is fitted on greedy answers to up to ``answers`` questions (builtin:skills: drawn
    from the calibration split; a file: its chats among those documents that end with an
    assistant message, which is the reference; :func:`refit_answer`); with
    too few, it keeps what it has (a :class:`CalibrationWarning` says so); an answer MLP
    of ``answer_mlp`` hidden units (0: none) replaces the row where it ranks the
    questions better in cross-validation. The model is
    written to ``out_dir`` (default: back into ``model_dir``, atomically). Returns the
    fits' figures. Raises ValueError, writing nothing, when the data is too little to
    fit the token confidence on (:func:`shortfall`).
    """
    model_dir = Path(model_dir)
    out = Path(out_dir) if out_dir is not None else model_dir
    if answer_mlp < 0:
        raise ValueError(f"answer_mlp must be 0 (no answer MLP) or a number of hidden units, "
                         f"got {answer_mlp}")
    if ModelFolder(model_dir).kind != "torch":
        raise ValueError(f"{model_dir} is an ONNX export or a quantized folder: calibrate "
                         "the full-precision model folder it came from, then export or "
                         "quantize again (the confidence row travels with the weights)")
    dev = resolve_device(device)
    model = VesperLM.from_pretrained(model_dir, map_location=dev)
    tokenizer = VesperTokenizer.from_file(model_dir)
    seq_len = min(seq_len, model.config.max_seq_len - 1)
    if data == "builtin:skills":
        batches = skills_batches(tokenizer, examples, seed, seq_len, batch_size)
        qs, groups = skills_questions(answers, seed)
        shifted = shifted_calibration_questions(answers, seed)
    else:
        records = []
        for i, record in enumerate(DataSource(data).records()):
            if i >= examples:
                break
            records.append(record)
        encoded = encode_examples(tokenizer, records)
        batches = pack(encoded, range(len(encoded)), seq_len, batch_size, tokenizer.pad_id)
        qs = questions(records, data, answers, seed)
        groups = list(range(len(qs)))
        shifted = []
    fit, reason = _refit(model, batches, tokenizer.eos_id, contextlib.nullcontext)
    if fit is None:
        raise ValueError(f"{data} gave {reason}: pass more held-out data (more --examples, "
                         "or a bigger file); the model is left as it was")
    recipe = dataclasses.replace(DEFAULT_RECIPE, hidden=answer_mlp) if answer_mlp > 0 else None
    fit.update(refit_answer(model, tokenizer, qs, groups, batch_size=batch_size,
                            mlp=recipe, shifted=shifted) or {})
    model.save_pretrained(out, extra_files={TOKENIZER_NAME: model_dir / TOKENIZER_NAME})
    return fit


# ----------------------------------------------------------------------------- CLI
@dataclass
class CalibrateOptions:
    """Refit a model's MetaHead confidence on held-out data (written back atomically).

    Examples:
      vesper calibrate runs/a/model
      vesper calibrate runs/a/model --data heldout.jsonl --out-dir runs/a/recalibrated
    """

    model_dir: str = field(metadata={"help": "model folder", "positional": True})
    data: str = field(default="builtin:skills", metadata={
        "help": "builtin:skills (its calibration split), or a .jsonl/.txt file or folder "
                "the model did not train on"})
    out_dir: str | None = field(default=None, metadata={
        "help": "where the recalibrated model goes (default: back into MODEL_DIR)"})
    examples: int = field(default=skills.CALIBRATION_CHATS, metadata={
        "help": "chats/documents to read (builtin:skills: chats drawn from its "
                "calibration split)"})
    answers: int = field(default=4000, metadata={
        "help": "questions answered greedily and graded to fit the answer-level "
                "confidence (builtin:skills: drawn from its calibration split, with a "
                "quarter as many of its shifted questions for the answer check; a file: "
                "its chats among the first --examples that end with an assistant "
                "message, the reference)"})
    answer_mlp: int = field(default=DEFAULT_RECIPE.hidden, metadata={
        "help": "hidden units of the answer MLP fitted beside the answer row, kept only "
                "where cross-validation over the questions prefers it (0: the row alone)"})
    seed: int = field(default=0, metadata={"help": "seed of the builtin:skills draw"})
    seq_len: int = field(default=128, metadata={"help": "tokens per packed block"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})


def cli(opts: CalibrateOptions) -> int:
    """``vesper calibrate``: refit, save, print what changed."""
    start = time.perf_counter()
    most = opts.answers if opts.data == "builtin:skills" else min(opts.examples, opts.answers)
    print(f"refitting the MetaHead's confidence on {opts.data}, then its answer confidence on "
          f"up to {most:,} greedy answers", flush=True)
    fit = calibrate(opts.model_dir, opts.data, out_dir=opts.out_dir, examples=opts.examples,
                    seed=opts.seed, seq_len=opts.seq_len, device=opts.device,
                    answers=opts.answers, answer_mlp=opts.answer_mlp)
    print(describe(fit))
    print(f"saved to {opts.out_dir or opts.model_dir} in {time.perf_counter() - start:.1f}s")
    return 0


__all__ = ["CalibrateOptions", "CalibrationWarning", "answer_reads", "calibrate", "cli",
           "describe", "pack",
           "refit_answer", "refit_confidence", "shifted_calibration_questions", "shortfall",
           "skills_batches", "skills_questions"]
