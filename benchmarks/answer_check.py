"""The answer check, as an ablation: ways to make the answer confidence hold up on questions
unlike those its head was fitted on, all fitted on the same calibration answers and scored
on the same held-out answers.

The model's answer head (its answer MLP or row) reads every block's output: it ranks
answers to questions like its calibration questions best, and can be sure of wrong
answers to questions of another form. builtin:skills' shifted questions
(``vesper_sdk.skills.shifted``) are such questions: its own templates, graded by its own
rules, with slots its generator never fills so. Their "calibration" shifts may be read by
a fit; the "held" shifts are what this scores, beside the held-out split and a chat file.

Rows (greedy answers of MODEL, its head as it is, its answer check left out):

- ``head``: the answer head alone (what the model gives without a check);
- ``token confidence``: the MetaHead's token confidence, its logit averaged over the
  answer, Platt-scaled on the calibration answers;
- ``check``: the two combined as ``vesper calibrate`` fits it (``fit_check``: the odds of a
  wrong answer that each gives, added; Platt-scaled on out-of-fold head logits);
- ``min``: the lower of the two logits, no scaling after;
- ``mean``: their average, Platt-scaled on the out-of-fold head logits;
- ``head fitted with shifted``: the answer MLP refitted (same recipe) on the calibration
  answers plus the answers to the calibration shifts, no check.

    python benchmarks/answer_check.py [MODEL_DIR] [--answers 4000] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch

from vesper_sdk.eval.answers import questions, shifted_questions
from vesper_sdk.eval.metrics import auroc, expected_calibration_error, fit_platt, question_folds
from vesper_sdk.model import VesperLM
from vesper_sdk.tokenizer import VesperTokenizer
from vesper_sdk.training.answer_check import fit_check, pooled
from vesper_sdk.training.answer_mlp import DEFAULT_RECIPE, answer_logits, fit_answer_mlp
from vesper_sdk.training.calibration import answer_reads, skills_questions
from vesper_sdk.training.data import DataSource

ROOT = Path(__file__).resolve().parent.parent
TESTS = ("held-out", "chat file", "shifted (held)")


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def read(model: VesperLM, tok: VesperTokenizer, qs: list, groups: list[int] | None = None,
         ) -> dict:
    reads, correct = answer_reads(model, tok, qs, 16)
    keep = [i for i, r in enumerate(reads) if r is not None]
    g = groups if groups is not None else list(range(len(qs)))
    return {"reads": [reads[i] for i in keep],
            "y": np.array([correct[i] for i in keep], dtype=np.float64),
            "g": np.unique([g[i] for i in keep], return_inverse=True)[1]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default=str(ROOT / "vesper_sdk/assets/default_model"))
    ap.add_argument("--answers", type=int, default=4000, help="calibration answers to fit on")
    ap.add_argument("--shifted", type=int, default=1000,
                    help="answers to the calibration shifts, and to the held shifts")
    ap.add_argument("--held-out", type=int, default=2000, help="held-out builtin:skills answers")
    ap.add_argument("--chat", default=str(ROOT / "examples/eval_questions.jsonl"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    model = VesperLM.from_pretrained(args.model).eval()
    model.config.metahead_answer_check = []  # the head as it is, no check
    tok = VesperTokenizer.from_file(args.model)
    qs, groups = skills_questions(args.answers, args.seed)
    cal = read(model, tok, qs, groups)
    shifted_cal = read(model, tok, shifted_questions(args.shifted, args.seed, "calibration"))
    chats = list(DataSource(args.chat).records())
    sets = {"held-out": read(model, tok, questions([], "builtin:skills", args.held_out,
                                                   args.seed)),
            "chat file": read(model, tok, questions(chats, args.chat, len(chats), args.seed)),
            "shifted (held)": read(model, tok, shifted_questions(args.shifted, args.seed))}
    for d in (cal, shifted_cal, *sets.values()):
        d["head"], d["conf"] = pooled(model, d["reads"])
        means = np.stack([r.double().mean(0).numpy() for r in d["reads"]])
        d["baselines"] = {"mean_token_log_probability": means[:, -4],
                          "neg_mean_entropy": -means[:, -2]}

    # Out-of-fold head logits on the calibration answers (the recipe refitted per fold).
    fold, oof = question_folds(cal["g"], 5, args.seed), np.zeros(len(cal["y"]))
    for f in range(5):
        tr, te = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        net = fit_answer_mlp([cal["reads"][i] for i in tr], cal["y"][tr], DEFAULT_RECIPE)
        oof[te] = answer_logits(net, [cal["reads"][i] for i in te])
    a, b = fit_platt(cal["conf"], cal["y"])
    checked = copy.deepcopy(model)
    figures = fit_check(checked, cal["reads"], cal["y"], cal["g"], oof, shifted_cal["reads"],
                        shifted_cal["y"])
    check = checked.config.metahead_answer_check or [a, b, 1.0, 0.0]
    mean_scale = fit_platt((oof + a * cal["conf"] + b) / 2, cal["y"])
    refit = fit_answer_mlp(cal["reads"] + shifted_cal["reads"],
                           np.r_[cal["y"], shifted_cal["y"]], DEFAULT_RECIPE)

    def rows_of(d: dict) -> dict[str, np.ndarray]:
        token = a * d["conf"] + b
        soft = -np.logaddexp(-d["head"], -(check[0] * d["conf"] + check[1]))
        return {"head": d["head"], "token confidence": token,
                "check": check[2] * soft + check[3],
                "min": np.minimum(d["head"], token),
                "mean": mean_scale[0] * (d["head"] + token) / 2 + mean_scale[1],
                "head fitted with shifted": answer_logits(refit, d["reads"])}

    report = {"model": args.model, "command": "python " + " ".join(
        ["benchmarks/answer_check.py", *(argv if argv is not None else sys.argv[1:])]),
              "calibration_answers": len(cal["y"]),
              "calibration_shifted_answers": len(shifted_cal["y"]),
              "fit_check": figures, "check": check, "sets": {}}
    for name, d in sets.items():
        base = {k: auroc(v, d["y"]) for k, v in d["baselines"].items()}
        first = np.unique(d["g"], return_index=True)[1]
        report["sets"][name] = {
            "answers": len(d["y"]), "accuracy": float(d["y"].mean()),
            "best_baseline": max(base, key=base.get), "best_baseline_auroc": max(base.values()),
            "rows": {k: {"auroc": auroc(z, d["y"]),
                         "auroc_each_question_once": auroc(z[first], d["y"][first]),
                         "ece": expected_calibration_error(sigmoid(z), d["y"])}
                     for k, z in rows_of(d).items()}}
    print(f"fitted on {len(cal['y']):,} calibration answers (+{len(shifted_cal['y']):,} answers "
          f"to the calibration shifts where said); AUROC / ECE per held-out set")
    print(f"{'':<26}" + "".join(f"{n:>22}" for n in TESTS))
    for k in rows_of(cal):
        print(f"{k:<26}" + "".join(
            f"{report['sets'][n]['rows'][k]['auroc']:>14.3f} / "
            f"{report['sets'][n]['rows'][k]['ece']:.3f}" for n in TESTS))
    print(f"{'best baseline':<26}" + "".join(
        f"{report['sets'][n]['best_baseline_auroc']:>22.3f}" for n in TESTS))
    print(f"fit_check: kept {bool(figures['answer_check'])}, AUROC with "
          f"{figures['answer_check_auroc_once']:.4f} vs without "
          f"{figures['answer_check_auroc_once_without']:.4f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
