"""Answer-level evaluation: is each greedy answer right, and which confidence signal knew?

Each held-out question is answered greedily; the answer is graded right or wrong
(builtin:skills: the computable answer, "I don't know." for unknowable questions; a chat
``.jsonl``: the last assistant message is the reference, compared after normalising case,
whitespace and a final period). The prompt and the answer are then scored in one
teacher-forced forward, which gives every signal on the same answer tokens (the final
end-of-sequence token included: stopping is part of the answer):

- ``metahead_answer``: *the* MetaHead answer confidence, the sigmoid of the mean of its
  answer logit over the answer's tokens (its answer row, or the answer MLP that may
  replace it, reads every block's output and is fitted on graded answers to the
  calibration split: ``vesper calibrate``), with the tokens' confidence beside it where
  the model has an answer check (``vesper_sdk.model.answer_confidence``);
- ``metahead_mean`` / ``metahead_min``: the MetaHead's token confidence, mean / minimum
  over the answer's tokens;
- the white-box baselines of LM-Polygraph that cost nothing here: ``sequence_probability``
  (its maximum sequence probability), ``mean_token_probability`` (the geometric mean,
  1 / perplexity), ``min_token_probability``, ``mean_max_softmax``, and the negated
  ``mean_entropy`` / ``max_entropy`` of the token distributions.

For each signal: AUROC (confidence vs right), PRR (prediction-rejection ratio: the area
between the rejection curve and random rejection, over the same area for an oracle) and
ECE (probability-valued signals only), with 95 % intervals from a paired bootstrap over
questions, and selective accuracy at 80 % and 90 % coverage.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .. import skills
from ..inference import GenerationRequest, SamplingParams
from ..model import answer_confidence
from .metrics import auroc, expected_calibration_error, group_resamples, same_groups

METAHEAD = "metahead_answer"
PROBABILITY_SIGNALS = ("metahead_answer", "metahead_mean", "metahead_min",
                       "sequence_probability",
                       "mean_token_probability", "min_token_probability", "mean_max_softmax")
SIGNALS = (*PROBABILITY_SIGNALS, "neg_mean_entropy", "neg_max_entropy")
COVERAGES = (0.8, 0.9)


@dataclass
class Question:
    """A prompt (chat messages) and how to grade an answer to it."""

    messages: list[dict[str, str]]
    reference: str
    task: str = "chat"

    def grade(self, reply: str) -> bool:
        if self.task != "chat":
            return skills.is_correct(self.messages[-1]["content"], reply)
        return normalise(reply) == normalise(self.reference)


def shifted_questions(n: int, seed: int = 0, split: str = "held") -> list[Question]:
    """``n`` of builtin:skills' shifted questions (:func:`vesper_sdk.skills.shifted`): its
    templates with slots its generator never fills so; ``split`` "held" (what ``vesper
    eval`` scores) or "calibration" (other shifts, which ``vesper calibrate`` reads)."""
    return [Question(msgs, expected, task) for task, msgs, expected in
            skills.shifted(n, seed, split)]


def normalise(text: str) -> str:
    return " ".join(text.strip().rstrip(".").split()).lower()


def questions(records: Sequence[Any], data: str, n: int, seed: int) -> list[Question]:
    """Up to ``n`` questions: builtin:skills' held-out ones, or the chats of ``records``
    that end with an assistant message (its content is the reference)."""
    if data == "builtin:skills":
        return [Question(msgs, expected, task)
                for task, msgs, expected in skills.held_out_tasks(n, seed)]
    out = []
    for rec in records:
        if isinstance(rec, list) and len(rec) >= 2 and rec[-1].get("role") == "assistant":
            out.append(Question(list(rec[:-1]), str(rec[-1].get("content", ""))))
        if len(out) >= n:
            break
    return out


def signals_of(logits: torch.Tensor, confidence: torch.Tensor, answer_logits: torch.Tensor,
               answer: torch.Tensor, check: Sequence[float] = ()) -> dict[str, float]:
    """Every signal of one answer from the positions that predicted its tokens:
    ``logits`` [A,V], ``confidence`` and ``answer_logits`` [A] (the MetaHead's),
    ``answer`` [A] token ids; ``check``: the model's answer check, if any."""
    logp = logits.float().log_softmax(-1)
    lp = logp.gather(-1, answer[:, None])[:, 0]
    entropy = -(logp.exp() * logp).sum(-1)
    conf = confidence.float()
    return {
        "metahead_answer": answer_confidence(answer_logits, conf, check),
        "metahead_mean": float(conf.mean()), "metahead_min": float(conf.min()),
        "sequence_probability": float(lp.sum().exp()),
        "mean_token_probability": float(lp.mean().exp()),
        "min_token_probability": float(lp.min().exp()),
        "mean_max_softmax": float(logp.max(-1).values.exp().mean()),
        "neg_mean_entropy": float(-entropy.mean()), "neg_max_entropy": float(-entropy.max()),
    }


def greedy_answers(lm: Any, qs: Sequence[Question], max_answer_tokens: int = 24,
                   batch_size: int = 8) -> Iterator[tuple[Question, list[int], list[Any]]]:
    """(question, prompt ids, generated Tokens) for each of ``qs``, answered greedily."""
    greedy = SamplingParams(max_new_tokens=max_answer_tokens, temperature=0.0)
    for i in range(0, len(qs), batch_size):
        chunk = qs[i:i + batch_size]
        prompts = [lm.tokenizer.chat_prompt_ids(q.messages) for q in chunk]
        toks: list[list[Any]] = [[] for _ in chunk]
        for j, tok in lm.stream_batch([GenerationRequest(p, greedy) for p in prompts]):
            toks[j].append(tok)
        yield from zip(chunk, prompts, toks, strict=True)


def answer_questions(lm: Any, qs: Sequence[Question], max_answer_tokens: int = 24,
                     batch_size: int = 8) -> list[dict[str, Any]]:
    """Greedy answers to ``qs``, graded, each with every signal."""
    rows: list[dict[str, Any]] = []
    for q, prompt, answer in greedy_answers(lm, qs, max_answer_tokens, batch_size):
        reply = "".join(t.text for t in answer)
        ids = [t.id for t in answer]
        row = {"task": q.task, "question": q.messages[-1]["content"],
               "reference": q.reference, "reply": reply, "correct": q.grade(reply)}
        if ids:
            row.update(_score(lm, prompt, ids))
        rows.append(row)
    return rows


def _score(lm: Any, prompt: list[int], answer: list[int]) -> dict[str, float]:
    x = torch.tensor([prompt + answer], device=lm.device)
    with torch.inference_mode():
        out = lm.backend.forward(x, torch.ones_like(x),
                                 torch.arange(x.shape[1], device=x.device)[None], None)
    pos = slice(len(prompt) - 1, len(prompt) + len(answer) - 1)
    check = getattr(getattr(lm.backend, "config", None), "metahead_answer_check", ())
    return signals_of(out.logits[0, pos], out.confidence[0, pos], out.answer[0, pos],
                      torch.tensor(answer, device=out.logits.device), check or ())


# ----------------------------------------------------------------------------- metrics
def prr(confidence: Any, correct: Any) -> float:
    """Prediction-rejection ratio: (AUC of the rejection curve - random's) / (oracle's -
    random's), where the rejection curve is the accuracy of the answers kept after
    rejecting the least confident fraction. 1 = rejects like an oracle, 0 = like chance."""
    c = np.asarray(confidence, dtype=np.float64)
    y = np.asarray(correct, dtype=np.float64)
    n = y.size
    if n == 0 or y.min() == y.max():
        return float("nan")

    def area(order: np.ndarray) -> float:
        kept = y[order]  # most confident first: keeping the top k, k = n .. 1
        acc = np.cumsum(kept) / np.arange(1, n + 1)
        return float(acc.mean())  # mean over the n rejection levels

    # Ties: average over a stable order by confidence, most confident first.
    method = area(np.argsort(-c, kind="stable"))
    oracle = area(np.argsort(-y, kind="stable"))
    random = float(y.mean())
    return (method - random) / (oracle - random)


def selective_accuracy(confidence: Any, correct: Any, coverage: float) -> float:
    """Accuracy of the ``coverage`` fraction of answers the signal is most confident in."""
    c = np.asarray(confidence, dtype=np.float64)
    y = np.asarray(correct, dtype=np.float64)
    k = max(1, int(round(coverage * y.size)))
    return float(y[np.argsort(-c, kind="stable")[:k]].mean()) if y.size else float("nan")


def risk_coverage(confidence: Any, correct: Any) -> tuple[np.ndarray, np.ndarray]:
    """(coverage, risk = error rate of the answers kept) as the least confident are dropped."""
    c = np.asarray(confidence, dtype=np.float64)
    y = np.asarray(correct, dtype=np.float64)
    kept = y[np.argsort(-c, kind="stable")]
    k = np.arange(1, y.size + 1)
    return k / y.size, 1 - np.cumsum(kept) / k


def _metrics(c: np.ndarray, y: np.ndarray, probability: bool) -> dict[str, float]:
    return {"auroc": auroc(c, y), "prr": prr(c, y),
            "ece": expected_calibration_error(c, y) if probability else float("nan")}


def answer_report(rows: Sequence[dict[str, Any]], resamples: int = 1000, seed: int = 0,
                  ) -> dict[str, Any]:
    """Every signal's AUROC, PRR and ECE with paired-bootstrap 95 % intervals, the
    MetaHead's paired difference to the best baseline, and selective accuracies.

    A question asked more than once (a held-out draw can repeat one) gets the same greedy
    answer and the same scores each time: one sample, not several. The bootstrap draws
    questions, each with all its copies, and ``distinct`` gives every signal's AUROC with
    each question counted once.
    """
    scored = [r for r in rows if METAHEAD in r]
    y = np.array([float(r["correct"]) for r in scored])
    sig = {s: np.array([r[s] for r in scored]) for s in SIGNALS}
    point = {s: _metrics(sig[s], y, s in PROBABILITY_SIGNALS) for s in SIGNALS}
    groups = same_groups([(r["question"], r["reference"]) for r in scored])
    first = np.unique(groups, return_index=True)[1]  # one answer per distinct question
    distinct = {s: auroc(sig[s][first], y[first]) for s in SIGNALS}
    draws: dict[str, dict[str, list[float]]] = {s: {"auroc": [], "prr": [], "ece": []}
                                                 for s in SIGNALS}
    for idx in group_resamples(groups, resamples, seed):  # the same answers for every signal
        for s in SIGNALS:
            for k, v in _metrics(sig[s][idx], y[idx], s in PROBABILITY_SIGNALS).items():
                draws[s][k].append(v)

    def ci(values: Sequence[float]) -> list[float] | None:
        v = np.asarray(values, dtype=np.float64)
        v = v[np.isfinite(v)]
        return [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if v.size else None

    methods = {s: {**point[s], **{f"{k}_ci95": ci(draws[s][k]) for k in point[s]},
                   **{f"selective_accuracy_{int(cov * 100)}": selective_accuracy(sig[s], y, cov)
                      for cov in COVERAGES}} for s in SIGNALS}
    baselines = [s for s in SIGNALS if not s.startswith("metahead")]

    def best_of(auc: dict[str, float]) -> str:
        return max(baselines, key=lambda s: -math.inf if math.isnan(auc[s]) else auc[s])

    best = best_of({s: point[s]["auroc"] for s in SIGNALS})
    best_distinct = best_of(distinct)
    diff = {k: [a - b for a, b in zip(draws[METAHEAD][k], draws[best][k], strict=True)]
            for k in ("auroc", "prr")}
    return {
        "n": int(y.size), "accuracy": float(y.mean()) if y.size else float("nan"),
        "questions": int(first.size), "unanswered": len(rows) - len(scored),
        "resamples": resamples, "methods": methods,
        "metahead_minus_best_baseline": {
            "baseline": best,
            "auroc": point[METAHEAD]["auroc"] - point[best]["auroc"], "ci95": ci(diff["auroc"]),
            "prr": point[METAHEAD]["prr"] - point[best]["prr"], "prr_ci95": ci(diff["prr"])},
        "distinct": {"auroc": distinct, "baseline": best_distinct,
                     "metahead_minus_best_baseline":
                         distinct[METAHEAD] - distinct[best_distinct]},
    }


def plot_risk_coverage(rows: Sequence[dict[str, Any]], report: dict[str, Any], path: Any,
                       ) -> None:
    """Risk-coverage curves of the MetaHead and the best baseline (PNG)."""
    import matplotlib  # optional heavy dependency: only when a chart is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in rows if METAHEAD in r]
    y = [float(r["correct"]) for r in scored]
    best = report["metahead_minus_best_baseline"]["baseline"]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name in (METAHEAD, best):
        cov, risk = risk_coverage([r[name] for r in scored], y)
        m = report["methods"][name]
        ax.plot(cov, risk, label=f"{name} (AUROC {m['auroc']:.3f}, PRR {m['prr']:.3f})")
    ax.axhline(1 - float(np.mean(y)), color="grey", ls="--", lw=1, label="no rejection")
    ax.set_xlabel("coverage (fraction of answers kept)")
    ax.set_ylabel("risk (error rate of kept answers)")
    ax.set_title(f"risk-coverage, {len(y)} held-out answers")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
