"""Token-level confidence: how the MetaHead's ECE compares with the recalibrated softmax's,
and what changing its refit does. An ablation on one model, same tokens and seeds.

Scores builtin:skills' calibration split (the chats ``vesper calibrate`` refits the
MetaHead's confidence on) and its held-out split (what ``vesper eval`` scores), teacher
forced, and reports ECE and AUROC on the held-out tokens for:

- ``metahead``: the model's confidence as it is (refitted when it was calibrated);
- ``max_softmax_platt``: the max-softmax probability Platt-scaled on the calibration
  split (``vesper eval``'s ``max_softmax_calibrated``);
- ``resampled``: both Platt-scaled on random subsets of the calibration questions
  (``--fraction`` of them, ``--draws`` times): how far each ECE moves with the chats a
  calibration happens to be fitted on (the MetaHead's Platt-scaled as it is);
- ``refit_blocks``: the confidence refitted (``fit_confidence``: Platt + an L2-penalised
  correction, penalty by cross-validation over questions) on every block's output and the
  logit features as well as the MetaHead's activations;
- ``retrained``: the MetaHead's hidden layer and confidence row trained further on the
  calibration split, early-stopped on a fifth of its questions held out (the issue's
  "train the head on held-out data");
- ``mixed a``: ``(1 - a)`` times the MetaHead's confidence plus ``a`` times the Platt-scaled
  max-softmax probability, with what grouped 5-fold cross-validation on the calibration
  split says of each ``a`` (log loss, and the ECE of the out-of-fold probabilities): an
  average of two calibrated probabilities, whose bin errors may cancel.

    python benchmarks/token_calibration.py [MODEL_DIR] [--chats 10000] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import vesper_sdk as vs
from vesper_sdk import skills
from vesper_sdk.eval.metrics import (
    auroc,
    expected_calibration_error,
    fit_confidence,
    fit_platt,
    question_folds,
)
from vesper_sdk.eval.report import msp_logit
from vesper_sdk.eval.scorer import encode_examples, held_out_records
from vesper_sdk.model.metahead import metahead_targets
from vesper_sdk.training.calibration import pack, skills_batches

ROOT = Path(__file__).resolve().parent.parent


def token_reads(lm, batches) -> dict[str, np.ndarray]:
    """Per scored token: right or wrong, its group, the MetaHead's logit and activations,
    the max-softmax probability, and what the answer row reads (every block's output, the
    logit features, the confidence logit)."""
    model, head = lm.model, lm.model.metahead
    seen: list[torch.Tensor] = []
    hook = head.answer.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0]))
    cols: dict[str, list[torch.Tensor]] = {k: [] for k in ("C", "G", "Z", "A", "P", "R")}
    try:
        with torch.no_grad():
            for x, y, m, g in batches:
                seen.clear()
                out = model(x.to(model.device))
                m = m.to(model.device)
                right = metahead_targets(out.logits, y.to(model.device), lm.tokenizer.eos_id)
                cols["C"].append(right.correct[m])
                cols["G"].append(g.to(model.device)[m])
                cols["Z"].append(torch.logit(out.confidence[m].double()))
                cols["A"].append(head.activations(out.hidden_states, out.logits)[m])
                cols["P"].append(out.logits.float().softmax(-1).amax(-1)[m])
                cols["R"].append(seen[-1][m])
    finally:
        hook.remove()
    return {k: torch.cat(v).double().cpu().numpy() for k, v in cols.items()}


def summary(p: np.ndarray, y: np.ndarray) -> dict[str, float]:
    return {"ece": expected_calibration_error(p, y), "auroc": auroc(p, y),
            "mean_confidence": float(p.mean())}


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def retrained(lm, cal: dict[str, np.ndarray], test: dict[str, np.ndarray],
              seed: int, epochs: int = 20) -> dict[str, float]:
    """The hidden layer + confidence row trained on the calibration split (AdamW, lr 3e-4,
    batches of 256 tokens), the epoch with the lowest loss on held-out questions kept."""
    cfg, head, model = lm.model.config, lm.model.metahead, lm.model
    h_at = slice((cfg.num_layers - 1) * cfg.hidden_size, cfg.num_layers * cfg.hidden_size)
    feats = slice(cfg.num_layers * cfg.hidden_size, cfg.num_layers * cfg.hidden_size + 3)

    def inputs(d: dict[str, np.ndarray]) -> torch.Tensor:
        r = torch.from_numpy(d["R"]).float().to(model.device)
        with torch.no_grad():
            return torch.cat([model.norm(r[:, h_at]), r[:, feats]], 1)

    xc, xt = inputs(cal), inputs(test)
    yc = torch.from_numpy(cal["C"]).float().to(model.device)
    groups = np.unique(cal["G"])
    rng = np.random.default_rng(seed)
    val = torch.from_numpy(np.isin(cal["G"], rng.choice(groups, len(groups) // 5,
                                                        replace=False))).to(model.device)
    fc, out = copy.deepcopy(head.fc).float(), torch.nn.Linear(head.out.in_features, 1)
    with torch.no_grad():
        out.weight.copy_(head.out.weight[:1])
        out.bias.copy_(head.out.bias[:1])
    out = out.to(model.device)
    scale, shift = head.calibration.tolist()

    def logit(x: torch.Tensor) -> torch.Tensor:
        return out(F.gelu(fc(x)))[:, 0] * scale + shift

    opt = torch.optim.AdamW([*fc.parameters(), *out.parameters()], lr=3e-4, weight_decay=0.0)
    torch.manual_seed(seed)
    train_idx = torch.nonzero(~val)[:, 0]
    best = (float("inf"), -1, None)
    for epoch in range(epochs):
        for b in train_idx[torch.randperm(len(train_idx))].split(256):
            loss = F.binary_cross_entropy_with_logits(logit(xc[b]), yc[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            v = float(F.binary_cross_entropy_with_logits(logit(xc[val]), yc[val]))
        if v < best[0]:
            best = (v, epoch, copy.deepcopy((fc.state_dict(), out.state_dict())))
    with torch.no_grad():
        v0 = float(F.binary_cross_entropy_with_logits(
            torch.from_numpy(cal["Z"]).to(model.device)[val].float(), yc[val]))
        fc.load_state_dict(best[2][0])
        out.load_state_dict(best[2][1])
        zt = logit(xt).double().cpu().numpy()
    return {**summary(sigmoid(zt), test["C"]), "best_epoch": best[1],
            "held_out_questions_log_loss": best[0], "held_out_questions_log_loss_before": v0}


def mixtures(cal: dict[str, np.ndarray], test: dict[str, np.ndarray],
             weights=(0.0, 0.25, 0.5, 0.75, 1.0)) -> dict[str, dict[str, float]]:
    """Per weight a: the mixture's held-out ECE and AUROC, and its grouped 5-fold
    cross-validated log loss and out-of-fold ECE on the calibration split (both parts
    Platt-scaled on the training folds)."""
    folds = question_folds(np.unique(cal["G"], return_inverse=True)[1], 5)
    y = cal["C"]

    def parts(fit: np.ndarray, on: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        a, b = fit_platt(cal["Z"][fit], y[fit])
        c, d = fit_platt(msp_logit(cal["P"][fit]), y[fit])
        return sigmoid(a * on["Z"] + b), sigmoid(c * msp_logit(on["P"]) + d)

    out_of_fold = [np.empty(len(y)), np.empty(len(y))]
    for f in range(5):
        test_fold = folds == f
        held = {k: v[test_fold] for k, v in cal.items()}
        for part, p in zip(out_of_fold, parts(~test_fold, held), strict=True):
            part[test_fold] = p
    held_parts = parts(np.ones(len(y), bool), test)
    rows = {}
    for w in weights:
        p = (1 - w) * out_of_fold[0] + w * out_of_fold[1]
        p = np.clip(p, 1e-12, 1 - 1e-12)
        rows[f"mixed {w:g}"] = {
            **summary((1 - w) * held_parts[0] + w * held_parts[1], test["C"]),
            "cv_log_loss": float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))),
            "cv_ece": expected_calibration_error(p, y)}
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default=str(ROOT / "vesper_sdk/assets/default_model"))
    ap.add_argument("--chats", type=int, default=skills.CALIBRATION_CHATS,
                    help="calibration-split chats (default: what vesper calibrate reads)")
    ap.add_argument("--held-out", type=int, default=3000, help="held-out chats scored")
    ap.add_argument("--draws", type=int, default=30, help="resampled calibrations")
    ap.add_argument("--fraction", type=float, default=0.3,
                    help="share of the calibration questions in each resampled calibration")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    lm = vs.load(args.model, device="cpu")
    lm.model.eval()
    tok = lm.tokenizer
    cal = token_reads(lm, skills_batches(tok, args.chats, args.seed, 128, 16))
    held = encode_examples(tok, list(held_out_records("builtin:skills", args.held_out,
                                                      args.seed)))
    test = token_reads(lm, pack(held, list(range(len(held))), 512, 8, tok.pad_id))
    y = test["C"]
    rows: dict[str, dict[str, float]] = {"metahead": summary(sigmoid(test["Z"]), y)}
    a, b = fit_platt(msp_logit(cal["P"]), cal["C"])
    rows["max_softmax_platt"] = summary(sigmoid(a * msp_logit(test["P"]) + b), y)

    rng = np.random.default_rng(args.seed)
    groups = np.unique(cal["G"])
    draws = {"metahead": [], "max_softmax": []}
    for _ in range(args.draws):
        pick = np.isin(cal["G"], rng.choice(groups, int(len(groups) * args.fraction),
                                            replace=False))
        a, b = fit_platt(msp_logit(cal["P"][pick]), cal["C"][pick])
        draws["max_softmax"].append(expected_calibration_error(
            sigmoid(a * msp_logit(test["P"]) + b), y))
        a, b = fit_platt(cal["Z"][pick], cal["C"][pick])
        draws["metahead"].append(expected_calibration_error(sigmoid(a * test["Z"] + b), y))
    mh, ms = np.asarray(draws["metahead"]), np.asarray(draws["max_softmax"])
    resampled = {"draws": args.draws, "fraction": args.fraction,
                 "metahead_ece_median": float(np.median(mh)),
                 "metahead_ece_iqr": np.percentile(mh, [25, 75]).tolist(),
                 "max_softmax_ece_median": float(np.median(ms)),
                 "max_softmax_ece_iqr": np.percentile(ms, [25, 75]).tolist(),
                 "metahead_at_most_max_softmax": int((mh <= ms).sum())}

    reads = [np.concatenate([d["R"], d["A"]], 1) for d in (cal, test)]
    w0 = np.zeros(reads[0].shape[1])
    w0[cal["R"].shape[1] - 1] = 1.0  # the calibrated confidence logit, the row as it is
    fit = fit_confidence(reads[0], cal["C"], cal["G"], w0, 0.0,
                         l2_grid=(0.3, 1.0, 3.0, 10.0, 30.0, 100.0))
    rows["refit_blocks"] = {**summary(sigmoid(reads[1] @ fit.weight + fit.bias), y),
                            "l2": fit.l2, "cv_log_loss": {str(k): v for k, v in
                                                          fit.cv_log_loss.items()}}
    rows["retrained"] = retrained(lm, cal, test, args.seed)
    rows.update(mixtures(cal, test))

    print(f"{len(cal['C']):,} calibration tokens (accuracy {cal['C'].mean():.3f}), "
          f"{len(y):,} held-out tokens (accuracy {y.mean():.3f}); ECE on 15 bins")
    print(f"{'confidence':<22}{'ECE':>8}{'AUROC':>8}{'mean conf':>11}")
    for name, r in rows.items():
        print(f"{name:<22}{r['ece']:>8.4f}{r['auroc']:>8.4f}{r['mean_confidence']:>11.4f}")
    print("mixed a, on the calibration split (grouped 5-fold CV): "
          + ", ".join(f"{k[6:]} log loss {r['cv_log_loss']:.4f} ECE {r['cv_ece']:.4f}"
                      for k, r in rows.items() if k.startswith("mixed ")))
    print(f"refit_blocks: penalty chosen {fit.l2:g} (inf: Platt scaling alone)")
    r = rows["retrained"]
    print(f"retrained: best epoch {r['best_epoch']}, log loss on held-out calibration "
          f"questions {r['held_out_questions_log_loss_before']:.4f} -> "
          f"{r['held_out_questions_log_loss']:.4f}")
    print(f"resampled ({args.draws} calibrations on {args.fraction:.0%} of the questions): "
          f"ECE median metahead {resampled['metahead_ece_median']:.4f} "
          f"{np.round(resampled['metahead_ece_iqr'], 4).tolist()}, max softmax "
          f"{resampled['max_softmax_ece_median']:.4f} "
          f"{np.round(resampled['max_softmax_ece_iqr'], 4).tolist()} (IQR); metahead <= "
          f"max softmax in {resampled['metahead_at_most_max_softmax']} of {args.draws}")
    if args.json:
        report = {"model": args.model, "command": "python " + " ".join(
            ["benchmarks/token_calibration.py", *(argv if argv is not None else sys.argv[1:])]),
                  "calibration_tokens": len(cal["C"]), "held_out_tokens": len(y),
                  "held_out_accuracy": float(y.mean()), "rows": rows, "resampled": resampled}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
