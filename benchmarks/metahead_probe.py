"""Does the model know more about its answers than its softmax says? An answer-level probe.

Answers held-out builtin:skills questions greedily (as ``vesper eval`` does), and fits, on
answers to the *calibration* split's questions (never trained on, never evaluated), an
L2-penalised logistic regression from features of each answer to "the answer is right":

- ``combined signals``: the answer-level signals ``vesper eval`` compares (the MetaHead's,
  sequence and token probabilities, entropies), combined;
- ``hidden probe``: the final hidden state averaged over the positions that wrote the
  answer (what a linear head on the trunk, averaged over the answer, can read);
- ``hidden probe + signals``: both;
- ``layers probe``: every block's output (the residual stream after it), each averaged
  over the answer's positions and concatenated: what the intermediate layers know that
  the final one may no longer say (trained probes in the literature read these);
- ``layers probe + signals``: both.
- ``answer MLP``: the MetaHead's answer MLP as ``vesper calibrate`` fits it
  (``training.answer_mlp``): what the answer row reads, at every token of the answer,
  through one hidden layer, its per-token outputs averaged over the answer, a fixed
  recipe. Beside it, the grouped 5-fold cross-validation on the fit answers that
  calibration chooses between it and the answer row by (``eval.metrics.cv_auroc_once``:
  each distinct question counted once per fold, as one question drawn thousands of
  times would otherwise decide a fold).

Then the MetaHead's answer row, as ``vesper calibrate`` fits it
(``eval.metrics.fit_answer_row``: penalty by cross-validated AUROC over questions), on
the same answers, from parts of what it reads (``answer row: ...``), and with its penalty
chosen by cross-validated log loss instead (``fit_confidence``, the token confidence's
criterion). ``metahead_answer`` is the model's own answer logit (its row, or its MLP),
as fitted when it was calibrated.

Each is scored on the held-out questions (AUROC, PRR, paired bootstrap difference to the
best single baseline, the copies of a question drawn more than once resampled together;
and the AUROC with each distinct question counted once): same data and seeds for every
row, an ablation.

    python benchmarks/metahead_probe.py [MODEL_DIR] [--fit 2000] [--eval 600] [--json PATH]
        [--mlp-epochs 40]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

import vesper_sdk as vs
from vesper_sdk import skills
from vesper_sdk.eval.answers import SIGNALS, Question, greedy_answers, prr, signals_of
from vesper_sdk.eval.metrics import (
    auroc,
    cv_auroc_once,
    fit_answer_row,
    fit_confidence,
    fit_logistic_row,
    group_resamples,
    question_folds,
)
from vesper_sdk.training.answer_mlp import DEFAULT_RECIPE, answer_logits, fit_answer_mlp
from vesper_sdk.training.calibration import ANSWER_L2_GRID

ROOT = Path(__file__).resolve().parent.parent


def answer_features(lm, qs: list[Question], max_tokens: int = 24, batch: int = 16,
                    ) -> tuple[np.ndarray, ...]:
    """(signals [n, S], pooled final hidden states [n, H], pooled answer-row inputs [n, R]:
    every block's output, the logit features, the confidence logit; correct [n]; the
    question's group [n]; each answer's per-token answer-row inputs [T_i, R]) of greedy
    answers."""
    sig, hid, reads, ok, asked, tokens = [], [], [], [], [], []
    seen: list[torch.Tensor] = []  # the answer row's input in the current forward
    hook = lm.model.metahead.answer.register_forward_hook(
        lambda _m, inputs, _out: seen.append(inputs[0]))
    for q, prompt, answer in greedy_answers(lm, qs, max_tokens, batch):
        ids = [t.id for t in answer]
        if not ids:
            continue
        seen.clear()
        with torch.inference_mode():
            out = lm.model(torch.tensor([prompt + ids]))
        pos = slice(len(prompt) - 1, len(prompt) + len(ids) - 1)
        s = signals_of(out.logits[0, pos], out.confidence[0, pos], out.answer[0, pos],
                       torch.tensor(ids))
        sig.append([s[k] for k in SIGNALS])
        hid.append(out.hidden_states[0, pos].float().mean(0).numpy())
        tokens.append(seen[-1][0, pos].float())
        reads.append(tokens[-1].mean(0).numpy())
        ok.append(float(q.grade("".join(t.text for t in answer))))
        asked.append(q.messages[-1]["content"])
    hook.remove()
    groups = np.unique(asked, return_inverse=True)[1]
    return np.array(sig), np.array(hid), np.array(reads), np.array(ok), groups, tokens


def fit_predict(x_fit: np.ndarray, y_fit: np.ndarray, x_eval: np.ndarray, l2: float,
                ) -> np.ndarray:
    """Standardise on the fit set, fit L2 logistic regression, score the eval set."""
    weight, bias = fit_logistic_row(x_fit, y_fit, l2)
    return x_eval @ weight + bias


def pick_l2(x: np.ndarray, y: np.ndarray, groups: np.ndarray,
            grid=(1e-3, 1e-2, 1e-1, 1.0), folds: int = 5) -> float:
    """The penalty with the best cross-validated AUROC on the fit set, folds over whole
    ``groups`` (a question asked twice in two folds would leak its answer)."""
    idx = question_folds(groups, folds)
    best, best_auc = grid[0], -1.0
    for l2 in grid:
        scores = np.empty(len(y))
        for f in range(folds):
            scores[idx == f] = fit_predict(x[idx != f], y[idx != f], x[idx == f], l2)
        a = auroc(scores, y)
        if a > best_auc:
            best, best_auc = l2, a
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default=str(ROOT / "vesper_sdk/assets/default_model"))
    ap.add_argument("--fit", type=int, default=2000, help="calibration-split questions")
    ap.add_argument("--eval", type=int, default=600, help="held-out questions")
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--mlp-epochs", type=int, default=DEFAULT_RECIPE.epochs,
                    help="the answer MLP's epochs")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    lm = vs.load(args.model, device="cpu")
    held = [Question(m, a, t) for t, m, a in skills.held_out_tasks(args.eval, 0)]
    seen = {q.messages[-1]["content"] for q in held}
    fit_qs = [Question(c["messages"][:-1], c["messages"][-1]["content"], c["task"])
              for c in skills.calibration(args.fit, 1)
              if c["messages"][-2]["content"] not in seen]
    s_fit, h_fit, r_fit, y_fit, groups, t_fit = answer_features(lm, fit_qs)
    s_ev, h_ev, r_ev, y_ev, asked, t_ev = answer_features(lm, held)
    # The answer row's input: every block's output, then the logit features and the
    # confidence logit (the last 4 columns; 1 without logit features).
    tail = r_fit.shape[1] - lm.model.config.num_layers * lm.model.config.hidden_size
    blocks = slice(0, r_fit.shape[1] - tail)
    own = slice(r_fit.shape[1] - tail, None)
    l_fit, l_ev = r_fit[:, blocks], r_ev[:, blocks]
    rows = {name: s_ev[:, k] for k, name in enumerate(SIGNALS)}
    for name, (xf, xe) in {
            "combined signals": (s_fit, s_ev),
            "hidden probe": (h_fit, h_ev),
            "hidden probe + signals": (np.c_[h_fit, s_fit], np.c_[h_ev, s_ev]),
            "layers probe": (l_fit, l_ev),
            "layers probe + signals": (np.c_[l_fit, s_fit], np.c_[l_ev, s_ev])}.items():
        rows[name] = fit_predict(xf, y_fit, xe, pick_l2(xf, y_fit, groups))
    passthrough = np.eye(r_fit.shape[1])[-1]  # the unfitted row: the confidence logit
    for name, cols in {"answer row: logit features + confidence": own,
                       "answer row: block outputs": blocks,
                       "answer row: all it reads (vesper calibrate)": slice(None)}.items():
        fit = fit_answer_row(r_fit[:, cols], y_fit, groups, passthrough[cols], 0.0,
                             l2_grid=ANSWER_L2_GRID)
        rows[name] = r_ev[:, cols] @ fit.weight + fit.bias
    recipe = dataclasses.replace(DEFAULT_RECIPE, epochs=args.mlp_epochs)
    rows["answer MLP"] = answer_logits(fit_answer_mlp(t_fit, y_fit, recipe), t_ev)
    cv = {"answer MLP": cv_auroc_once(
        lambda tr, te: answer_logits(fit_answer_mlp([t_fit[i] for i in tr], y_fit[tr], recipe),
                                     [t_fit[i] for i in te]), y_fit, groups)}
    for l2 in ANSWER_L2_GRID:  # the answer row's L2 logistic regression, each penalty
        cv[f"answer row, L2 {l2:g}"] = cv_auroc_once(
            lambda tr, te, l2=l2: fit_predict(r_fit[tr], y_fit[tr], r_fit[te], l2),
            y_fit, groups)
    by_log_loss = fit_confidence(r_fit, y_fit, groups, passthrough, 0.0,
                                 l2_grid=ANSWER_L2_GRID)
    rows["answer row, penalty by log loss"] = r_ev @ by_log_loss.weight + by_log_loss.bias
    baselines = [n for n in SIGNALS if not n.startswith("metahead")]
    best = max(baselines, key=lambda n: auroc(rows[n], y_ev))
    # A question drawn twice is answered the same twice: its copies (one group of
    # answer_features') are resampled together.
    first = np.unique(asked, return_index=True)[1]
    draws = {n: [] for n in rows}
    for i in group_resamples(asked, args.resamples):
        for n in rows:
            draws[n].append(auroc(rows[n][i], y_ev[i]))
    result = {"model": args.model, "fit_answers": int(len(y_fit)),
              "fit_accuracy": float(y_fit.mean()), "eval_answers": int(len(y_ev)),
              "eval_accuracy": float(y_ev.mean()), "eval_questions": int(first.size),
              "best_baseline": best, "methods": {},
              "fit_cv_auroc_each_question_once": cv}
    print(f"fit on {len(y_fit)} calibration-split answers (accuracy {y_fit.mean():.3f}), "
          f"scored on {len(y_ev)} held-out answers (accuracy {y_ev.mean():.3f}) to "
          f"{first.size} distinct questions")
    print(f"{'signal':<26}{'AUROC':>8}{'PRR':>8}   AUROC - {best} [95 %]   AUROC, each "
          "question once")
    for n, score in rows.items():
        diff = np.subtract(draws[n], draws[best])
        lo, hi = np.percentile(diff, [2.5, 97.5])
        a = auroc(score, y_ev)
        once = auroc(score[first], y_ev[first])
        result["methods"][n] = {"auroc": a, "prr": prr(score, y_ev),
                                "minus_best_baseline": a - auroc(rows[best], y_ev),
                                "ci95": [float(lo), float(hi)], "auroc_distinct": once}
        print(f"{n:<26}{a:>8.3f}{prr(score, y_ev):>8.3f}   {a - auroc(rows[best], y_ev):+.4f} "
              f"[{lo:+.4f}, {hi:+.4f}]   {once:.3f}")
    print("grouped 5-fold CV on the fit answers, each question once per fold: "
          + ", ".join(f"{k} {v:.4f}" for k, v in cv.items()))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
