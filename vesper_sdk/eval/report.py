"""``vesper eval``: perplexity and the MetaHead's calibration on held-out data.

For every scored token (teacher forcing) it records the negative log-likelihood, whether
the model's top-1 prediction is the label, the MetaHead's ``confidence`` at that position
and, as the baseline any LM has for free, the maximum softmax probability (MSP). It
reports perplexity, and for both confidence signals the expected calibration error
(15 equal-width bins), the AUROC of confidence against correctness and the Brier score;
then writes ``calibration.json`` and a reliability diagram ``reliability.png``.

Data: ``builtin:skills`` (the held-out split of :mod:`vesper_sdk.skills`: questions
never trained on, with their answers; the greedy answers are also graded by exact match
for an accuracy figure), or a ``.jsonl`` / ``.txt`` file or folder read by ``DataSource``
(``{"text"}`` documents are scored on every token, ``{"messages"}`` chats on the
assistant turns, as in training). The scoring itself is :mod:`vesper_sdk.eval.scorer`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import skills
from ..hf.card import record_eval
from ..inference import LLM, load
from .answers import (
    METAHEAD,
    answer_questions,
    answer_report,
    plot_risk_coverage,
    questions,
    shifted_questions,
)
from .metrics import calibration_summary, fit_platt, paired_bootstrap, same_groups
from .scorer import encode_examples, held_out_records, score_tokens


# ----------------------------------------------------------------------------- options
@dataclass
class EvalOptions:
    """Perplexity and MetaHead calibration (ECE, AUROC vs. the max-softmax baseline), and
    the answer level: greedy answers graded right or wrong, and how well each confidence
    signal (the MetaHead, sequence probability, token probabilities, entropy) tells them
    apart (AUROC, PRR, ECE, selective accuracy, with paired bootstrap intervals).

    Examples:
      vesper eval runs/a/model --data builtin:skills
      vesper eval runs/a/model --data heldout.jsonl --out-dir runs/a/eval
      vesper eval runs/a/model --skills-questions 600 --json report.json
    """

    model_dir: str = field(metadata={"help": "model folder to evaluate", "positional": True})
    data: str = field(default="builtin:skills", metadata={
        "help": "builtin:skills (held-out split), or a .jsonl/.txt file or folder"})
    out_dir: str | None = field(default=None, metadata={
        "help": "where calibration.json and reliability.png go (default: MODEL_DIR/eval)"})
    max_examples: int = field(default=3000, metadata={
        "help": "most documents/chats to read (3000 held-out chats: ~11 k tokens, seconds "
                "on a CPU; fewer make ECE noisy and biased upwards)"})
    max_tokens: int = field(default=50_000, metadata={"help": "most tokens to score"})
    seq_len: int = field(default=512, metadata={
        "help": "window length for long documents (capped by the model's context)"})
    batch_size: int = field(default=8, metadata={"help": "windows per forward pass"})
    bins: int = field(default=15, metadata={"help": "equal-width bins for ECE and the diagram"})
    skills_questions: int = field(default=200, metadata={
        "help": "held-out questions answered greedily and graded, for accuracy and the "
                "answer-level comparison of confidence signals (builtin:skills, or the "
                "chats of a .jsonl whose last message is the assistant's reference answer)"})
    shifted_questions: int = field(default=600, metadata={
        "help": "builtin:skills: questions in its templates with slots its generator never "
                "fills so (random-letter names, operands past its ranges), answered and "
                "compared the same way: how the signals hold up off the training "
                "distribution (0: none)"})
    max_answer_tokens: int = field(default=24, metadata={
        "help": "longest answer generated per skills question"})
    seed: int = field(default=0, metadata={"help": "seed of the built-in held-out split"})
    calibration_chats: int = field(default=skills.CALIBRATION_CHATS, metadata={
        "help": "builtin:skills: calibration-split chats the max-softmax baseline is "
                "Platt-scaled on (match the model's --calibration-examples)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    json: str | None = field(default=None, metadata={
        "help": "also write the whole report to this JSON file"})


# ----------------------------------------------------------------------------- data
def skills_accuracy(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Exact-match accuracy of graded greedy answers (:func:`.answers.answer_questions`),
    overall and per task."""
    per_task: dict[str, list[int]] = {}
    for r in rows:
        per_task.setdefault(r["task"], []).append(int(r["correct"]))
    correct = [int(r["correct"]) for r in rows]
    return {
        "n": len(rows),
        "accuracy": float(np.mean(correct)) if rows else float("nan"),
        "per_task": {k: {"n": len(v), "accuracy": float(np.mean(v))}
                     for k, v in sorted(per_task.items())},
        "examples": [{k: r[k] for k in ("task", "question", "reference", "reply", "correct",
                                        METAHEAD) if k in r} for r in rows[:20]],
    }


def msp_logit(msp: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(msp, dtype=np.float64), 1e-7, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)


def recalibrated_msp(msp: np.ndarray, correct: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """The max-softmax probability after Platt scaling, cross-fitted over two halves of
    the documents (each half scaled by the fit on the other): for data without a
    calibration split, a calibration never fitted on the tokens it is scored on."""
    logit = msp_logit(msp)
    half = np.unique(groups, return_inverse=True)[1] % 2 == 0
    out = np.empty_like(msp, dtype=np.float64)
    for fit_on in (half, ~half):
        if not fit_on.any() or fit_on.all():
            return msp.astype(np.float64)
        a, b = fit_platt(logit[fit_on], correct[fit_on])
        out[~fit_on] = 1 / (1 + np.exp(-(a * logit[~fit_on] + b)))
    return out


def msp_recalibrated_on_calibration_split(lm: LLM, msp: np.ndarray, chats: int, seed: int,
                                          seq_len: int, batch_size: int) -> np.ndarray:
    """The max-softmax probability Platt-scaled by a fit on builtin:skills' calibration
    split (``chats`` of them), the split the MetaHead's confidence is refitted on."""
    records = [c["messages"] for c in skills.calibration(chats, seed)]
    cal = score_tokens(lm, encode_examples(lm.tokenizer, records), seq_len=seq_len,
                       batch_size=batch_size)
    a, b = fit_platt(msp_logit(cal.msp), cal.correct)
    return 1 / (1 + np.exp(-(a * msp_logit(msp) + b)))


# ----------------------------------------------------------------------------- report
def evaluate(model: str | Path | LLM, data: str = "builtin:skills", *,
             out_dir: str | Path | None = None, max_examples: int = 3000,
             max_tokens: int = 50_000, seq_len: int = 512, batch_size: int = 8,
             bins: int = 15, skills_questions: int = 200, max_answer_tokens: int = 24,
             seed: int = 0, device: str = "auto", json_path: str | Path | None = None,
             calibration_chats: int = skills.CALIBRATION_CHATS,
             shifted: int = 600) -> dict[str, Any]:
    """Evaluate a model folder (or an ``LLM``) on ``data``; write JSON + PNG; return the report.

    The report has ``perplexity``, ``tokens``, ``token_accuracy``, ``metahead`` and
    ``max_softmax`` (each: ``ece``, ``auroc``, ``brier``, ``mean_confidence``,
    ``reliability`` bins), ``max_softmax_calibrated`` (the baseline Platt-scaled on
    ``calibration_chats`` of builtin:skills' calibration split, or cross-fitted on the
    evaluated documents), ``metahead_minus_baseline`` and
    ``metahead_minus_calibrated_baseline`` (paired bootstrap intervals), ``skills`` and
    ``answers`` (graded greedy answers), ``answers_shifted`` (builtin:skills: ``shifted``
    of its shifted questions, :func:`vesper_sdk.skills.shifted`) and the written
    ``files``.
    """
    lm = model if isinstance(model, LLM) else load(model, device=device)
    if out_dir is None:
        if lm.model_dir is None:
            raise ValueError("out_dir is required when evaluating an in-memory LLM")
        out_dir = lm.model_dir / "eval"
    out_dir = Path(out_dir)
    records = list(held_out_records(data, max_examples, seed))
    examples = encode_examples(lm.tokenizer, records)
    if not examples:
        raise ValueError(f"{data} holds no scorable text (no document with 2+ tokens, or no "
                         "assistant turn in the chats)")
    stats = score_tokens(lm, examples, seq_len=seq_len, batch_size=batch_size,
                         max_tokens=max_tokens)
    report: dict[str, Any] = {
        "model": str(lm.model_dir) if lm.model_dir else repr(lm),
        "data": data,
        "documents": len(examples),
        "tokens": stats.n,
        "perplexity": float(math.exp(stats.nll.mean())) if stats.n else float("nan"),
        "mean_nll": float(stats.nll.mean()) if stats.n else float("nan"),
        "token_accuracy": float(stats.correct.mean()) if stats.n else float("nan"),
        "bins": bins,
        "metahead": calibration_summary(stats.confidence, stats.correct, bins),
        "max_softmax": calibration_summary(stats.msp, stats.correct, bins),
    }
    # How far the figures would move on another sample of documents (paired: both signals
    # on the same resampled tokens), so a difference is read against its noise. A document
    # drawn twice scores the same twice: one sample, so its copies go together.
    groups = same_groups([tuple(ids) for ids, _ in examples])
    report["distinct_documents"] = int(groups.max()) + 1
    doc_groups = groups[stats.doc]
    boot = paired_bootstrap(stats.confidence, stats.msp, stats.correct, doc_groups, bins,
                            seed=seed)
    report["metahead"]["ci95"], report["max_softmax"]["ci95"] = boot["a"], boot["b"]
    # The baseline recalibrated too, so ECE compares like with like: on the calibration
    # chats the MetaHead's confidence is refitted on by default, where there are some.
    if data == "builtin:skills":
        chats = calibration_chats
        recalibrated = msp_recalibrated_on_calibration_split(
            lm, np.asarray(stats.msp), chats, seed, seq_len, batch_size)
        fitted_on = f"builtin:skills calibration split, {chats:,} chats"
    else:
        recalibrated = recalibrated_msp(np.asarray(stats.msp), np.asarray(stats.correct),
                                        doc_groups)
        fitted_on = "the evaluated documents, cross-fitted over two halves"
    report["max_softmax_calibrated"] = {
        **calibration_summary(recalibrated, stats.correct, bins), "fitted_on": fitted_on}
    report["metahead_minus_baseline"] = {
        "ece": report["metahead"]["ece"] - report["max_softmax"]["ece"],
        "auroc": report["metahead"]["auroc"] - report["max_softmax"]["auroc"],
        "ci95": boot["a_minus_b"], "resamples": boot["resamples"],
        "documents": boot["groups"]}
    # What the token-level target compares: the MetaHead against the recalibrated baseline.
    boot_cal = paired_bootstrap(stats.confidence, recalibrated, stats.correct, doc_groups,
                                bins, seed=seed)
    report["max_softmax_calibrated"]["ci95"] = boot_cal["b"]
    report["metahead_minus_calibrated_baseline"] = {
        "ece": report["metahead"]["ece"] - report["max_softmax_calibrated"]["ece"],
        "auroc": report["metahead"]["auroc"] - report["max_softmax_calibrated"]["auroc"],
        "ci95": boot_cal["a_minus_b"], "resamples": boot_cal["resamples"],
        "documents": boot_cal["groups"]}
    qs = questions(records, data, skills_questions, seed) if skills_questions > 0 else []
    rows = answer_questions(lm, qs, max_answer_tokens, batch_size) if qs else []
    out_dir.mkdir(parents=True, exist_ok=True)
    if rows:
        report["skills"] = skills_accuracy(rows)
        report["answers"] = answer_report(rows, seed=seed)
        if report["answers"]["n"]:
            plot_risk_coverage(rows, report["answers"], out_dir / "risk_coverage.png")
    if data == "builtin:skills" and shifted > 0:
        shifted_rows = answer_questions(lm, shifted_questions(shifted, seed), max_answer_tokens,
                                        batch_size)
        report["answers_shifted"] = answer_report(shifted_rows, seed=seed)
    png = out_dir / "reliability.png"
    plot_reliability(report, png)
    js = out_dir / "calibration.json"
    report["files"] = {"json": str(js), "png": str(png)}
    if (out_dir / "risk_coverage.png").is_file() and "answers" in report:
        report["files"]["risk_coverage"] = str(out_dir / "risk_coverage.png")
    text = json.dumps(_finite(report), indent=2, ensure_ascii=False) + "\n"
    js.write_text(text)
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(text)
        report["files"]["report"] = str(json_path)
    return report


def _finite(x: Any) -> Any:
    # JSON has no NaN: write null instead (strict parsers reject NaN).
    if isinstance(x, float):
        return None if not math.isfinite(x) else x
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


def plot_reliability(report: dict[str, Any], path: str | Path) -> Path:
    """Reliability diagrams (MetaHead vs max-softmax baseline) with confidence histograms."""
    import matplotlib  # optional heavy dependency: only when a diagram is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5), sharex=True,
                             gridspec_kw={"height_ratios": [3, 1]})
    for col, (key, title) in enumerate((("metahead", "MetaHead confidence"),
                                        ("max_softmax", "max softmax probability"))):
        summary = report[key]
        rel = summary["reliability"]
        edges = np.asarray(rel["edges"])
        centers = (edges[:-1] + edges[1:]) / 2
        width = edges[1] - edges[0]
        acc = np.array([np.nan if a is None else a for a in rel["accuracy"]], dtype=float)
        conf = np.array([np.nan if c is None else c for c in rel["confidence"]], dtype=float)
        ax = axes[0, col]
        ax.bar(centers, np.nan_to_num(acc), width=width * 0.95, color="#4c72b0",
               edgecolor="white", label="accuracy")
        gap_lo = np.minimum(np.nan_to_num(acc), np.nan_to_num(conf))
        ax.bar(centers, np.abs(np.nan_to_num(conf) - np.nan_to_num(acc)), bottom=gap_lo,
               width=width * 0.95, color="#dd8452", alpha=0.5, label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy (top-1 == label)")
        ax.set_title(f"{title}\nECE {_fmt(summary['ece'])}  AUROC {_fmt(summary['auroc'])}  "
                     f"Brier {_fmt(summary['brier'])}")
        ax.legend(loc="upper left", fontsize=8)
        axes[1, col].bar(centers, rel["counts"], width=width * 0.95, color="#55a868")
        axes[1, col].set_xlabel("confidence")
        axes[1, col].set_ylabel("tokens")
    fig.suptitle(f"{report['model']} on {report['data']}: perplexity "
                 f"{_fmt(report['perplexity'], 2)}, {report['tokens']} tokens", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(x: Any, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else \
        f"{x:.{digits}f}"


def _with_ci(x: Any, ci: Any, digits: int = 3, sign: bool = False) -> str:
    """'0.017 [0.013, 0.021]' (the interval left out when there is none)."""
    def f(v: Any) -> str:
        text = _fmt(v, digits)
        return f"+{text}" if sign and text != "n/a" and not text.startswith("-") else text
    return f(x) if not ci else f"{f(x)} [{f(ci[0])}, {f(ci[1])}]"


def format_report(report: dict[str, Any]) -> str:
    """The report as the plain-text table ``vesper eval`` prints."""
    lines = [
        f"model {report['model']}",
        f"data {report['data']}: {report['documents']} documents, {report['tokens']} tokens "
        "scored",
        f"perplexity {_fmt(report['perplexity'], 3)}   token accuracy (top-1 == label) "
        f"{_fmt(report['token_accuracy'])}",
        "",
        f"{'confidence signal':<28}{'ECE (' + str(report['bins']) + ' bins)':>22}"
        f"{'AUROC':>22}{'Brier':>8}{'mean conf':>11}",
    ]
    for key, name in (("metahead", "MetaHead confidence"),
                      ("max_softmax", "max softmax prob (baseline)"),
                      ("max_softmax_calibrated", "max softmax, recalibrated")):
        if key not in report:
            continue
        s = report[key]
        ci = s.get("ci95", {})
        lines.append(f"{name:<28}{_with_ci(s['ece'], ci.get('ece')):>22}"
                     f"{_with_ci(s['auroc'], ci.get('auroc')):>22}"
                     f"{_fmt(s['brier']):>8}{_fmt(s['mean_confidence']):>11}")
    for key, name in (("metahead_minus_baseline", "baseline"),
                      ("metahead_minus_calibrated_baseline", "recalibrated baseline")):
        d = report.get(key)
        if d:
            lines.append(f"MetaHead - {name}: ECE "
                         f"{_with_ci(d['ece'], d['ci95']['ece'], 4, True)}, AUROC "
                         f"{_with_ci(d['auroc'], d['ci95']['auroc'], 4, True)}")
    d = report.get("metahead_minus_baseline")
    if d:
        lines.append(f"[...]: 95 % intervals from {d['resamples']} bootstrap resamples of the "
                     f"{d['documents']} distinct documents (copies of one resampled together)")
    fitted_on = report.get("max_softmax_calibrated", {}).get("fitted_on")
    if fitted_on:
        lines.append(f"recalibrated: Platt scaling fitted on {fitted_on}")
    if "skills" in report:
        sk = report["skills"]
        lines += ["", f"answers (greedy, exact match): accuracy {_fmt(sk['accuracy'])} on "
                      f"{sk['n']} held-out questions"]
        if len(sk["per_task"]) > 1:
            for task, v in sk["per_task"].items():
                lines.append(f"  {task:<24}{_fmt(v['accuracy'])}  (n={v['n']})")
    if "answers" in report:
        lines += ["", *format_answers(report["answers"])]
    if "answers_shifted" in report:
        sh = report["answers_shifted"]
        lines += ["", f"shifted questions (slots the training data never had): accuracy "
                      f"{_fmt(sh['accuracy'])} on {sh['n']} answers", *format_answers(sh)]
    if "files" in report:
        lines += ["", f"wrote {report['files']['json']} and {report['files']['png']}"]
    return "\n".join(lines)


def format_answers(ans: dict[str, Any]) -> list[str]:
    """The answer-level table: each confidence signal's AUROC, PRR, ECE, selective accuracy."""
    lines = [f"{'answer confidence signal':<26}{'AUROC':>22}{'PRR':>22}{'ECE':>8}"
             f"{'acc@80%':>9}{'acc@90%':>9}"]
    for name, m in ans["methods"].items():
        lines.append(f"{name:<26}{_with_ci(m['auroc'], m.get('auroc_ci95')):>22}"
                     f"{_with_ci(m['prr'], m.get('prr_ci95')):>22}{_fmt(m['ece']):>8}"
                     f"{_fmt(m['selective_accuracy_80']):>9}"
                     f"{_fmt(m['selective_accuracy_90']):>9}")
    d = ans["metahead_minus_best_baseline"]
    lines.append(f"MetaHead (answer confidence) - best baseline ({d['baseline']}): AUROC "
                 f"{_with_ci(d['auroc'], d['ci95'], 4, True)}, PRR "
                 f"{_with_ci(d['prr'], d['prr_ci95'], 4, True)}")
    lines.append(f"[...]: 95 % intervals from {ans['resamples']} paired bootstrap resamples of "
                 f"the {ans.get('questions', ans['n'])} distinct questions ({ans['n']} answers; "
                 "a question's copies resampled together)")
    dd = ans.get("distinct")
    if dd:
        lines.append(f"each distinct question once: AUROC MetaHead "
                     f"{_fmt(dd['auroc'][METAHEAD])}, best baseline ({dd['baseline']}) "
                     f"{_fmt(dd['auroc'][dd['baseline']])}, difference "
                     f"{_with_ci(dd['metahead_minus_best_baseline'], None, 4, True)}")
    return lines


def cli(opts: EvalOptions) -> int:
    """``vesper eval``: print the report and write calibration.json + reliability.png."""
    report = evaluate(opts.model_dir, opts.data, out_dir=opts.out_dir,
                      max_examples=opts.max_examples, max_tokens=opts.max_tokens,
                      seq_len=opts.seq_len, batch_size=opts.batch_size, bins=opts.bins,
                      skills_questions=opts.skills_questions,
                      max_answer_tokens=opts.max_answer_tokens, seed=opts.seed,
                      device=opts.device, json_path=opts.json,
                      calibration_chats=opts.calibration_chats,
                      shifted=opts.shifted_questions)
    print(format_report(report))
    record_eval(opts.model_dir, report)  # the model card's Evaluation section
    return 0
