"""Does Velvet converge faster than AdamW? Validation loss at equal steps, measured honestly.

The seed project claimed that Velvet reaches 62 % lower perplexity than AdamW after the
same number of steps. This study trains the same model, on the same data, for the same
steps with the same warmup + cosine schedule, once with each optimizer, for several seeds
(a seed fixes the initial weights, the data order, the validation split and, for the
generated corpus, its examples; both optimizers get the same seeds, so the comparison is
paired), on two corpora:

* ``builtin:skills``: the SDK's generated corpus of computable questions (chat format);
* ``stdlib-docs``: real English technical prose available offline -- every docstring
  (module, class, function) of the Python standard library's ``.py`` files, extracted
  statically with ``ast`` (nothing is imported or executed), ``test``/``idlelib``/
  ``lib2to3`` folders left out, docstrings of at least 40 characters, in sorted path
  order, separated by blank lines (the trainer splits documents on blank lines). About
  1.6 MB on CPython 3.11; the file's SHA-256 and the Python version are recorded, since
  another Python gives a slightly different corpus.

Learning rates: by default both optimizers use the same peak lr (``--lr``). Velvet's
entropy-adaptive scale multiplies it by 0.7-1.3 as the loss falls, so "same lr" is not
"same step size"; ``--sweep 1e-3,2e-3,4e-3`` first runs each optimizer at each lr (one
run per corpus, on a seed not used by the main runs, so the pick is not scored on the
runs it is compared on) and then compares each at its own best lr. The report says which.

Every run is a ``vesper_sdk.train`` call; its folder (under ``--work-dir``) is named by a
hash of the study's settings, and a finished run with the same options and the same SDK
source is read back rather than trained again, so a ``--sweep`` study reuses a plain
one's runs and an interrupted study resumes where it stopped.

Optimizers (``--optimizers``): ``velvet`` (its defaults: entropy-adaptive lr, beta1 as
given), ``velvet-beta1`` (the same plus the perplexity-guided beta1, off by default since
this study measured what it costs on plain text) and ``adamw``.

Reported per corpus and optimizer: final validation loss and perplexity (mean, std and
per seed), and the paired per-seed change in perplexity of each Velvet variant vs AdamW.
Outputs:
``convergence.json`` + ``convergence.md`` (through the suite's writer, so they carry the
command, machine, versions and date) and ``convergence.png`` (validation-loss curves,
mean and min-max band over seeds), in ``--out-dir`` (default ``benchmarks/results``).

    python benchmarks/convergence.py                      # defaults: < 10 min on 2 idle cores
    python benchmarks/convergence.py --quick              # smoke run, under a minute
    python benchmarks/convergence.py --sweep 1e-3,2e-3,4e-3 --name convergence_tuned
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import platform
import shlex
import shutil
import statistics
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

CORPORA = ("skills", "stdlib-docs")
OPTIMIZERS = ("velvet", "velvet-beta1", "adamw")
# Each optimizer name as TrainOptions: velvet-beta1 adds the perplexity-guided beta1.
_TRAIN_OPTIONS = {"velvet": {"optimizer": "velvet", "perplexity_guided": False},
                  "velvet-beta1": {"optimizer": "velvet", "perplexity_guided": True},
                  "adamw": {"optimizer": "adamw"}}
SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages",
             "__pycache__", "turtledemo"}


# ------------------------------------------------------------------------------- corpora
def stdlib_docstrings(max_chars: int | None = None) -> tuple[str, dict[str, Any]]:
    """Every docstring of the standard library's .py files, read with ``ast`` (no import)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[str] = []
    files = chars = 0
    for path in sorted(root.rglob("*.py")):
        if max_chars and chars > max_chars:
            break  # enough text: the rest would be cut anyway
        rel = path.relative_to(root)
        if any(p in SKIP_DIRS or p.startswith("test_") for p in rel.parts):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):  # a few files are Python 2 / templates
            continue
        files += 1
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                 ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 40:
                    docs.append(doc.strip())
                    chars += len(docs[-1]) + 2
    text = "\n\n".join(docs) + "\n"
    if max_chars and len(text) > max_chars:
        text = text[:text.rfind("\n\n", 0, max_chars) + 1]
    meta = {"name": "stdlib-docs", "source": f"{root} (CPython {platform.python_version()})",
            "files": files, "docstrings": len(docs), "chars": len(text),
            "sha256": hashlib.sha256(text.encode()).hexdigest()}
    return text, meta


def prepare_corpora(names: list[str], work: Path, text_chars: int | None,
                    skills_examples: int) -> dict[str, dict[str, Any]]:
    """corpus name -> {"data": what vs.train takes, "meta": description}."""
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        if name == "skills":
            out[name] = {"data": "builtin:skills",
                         "meta": {"name": "skills", "source": "builtin:skills",
                                  "examples": skills_examples,
                                  "note": "generated per seed (the seed picks the examples)"}}
        elif name == "stdlib-docs":
            text, meta = stdlib_docstrings(text_chars)
            path = work / "corpora" / "stdlib_docstrings.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            # Rewrite only on change: the token cache is keyed on the file's mtime.
            if not path.is_file() or path.read_text() != text:
                path.write_text(text)
            out[name] = {"data": str(path), "meta": meta}
        else:
            raise ValueError(f"unknown corpus {name!r}: choose from {', '.join(CORPORA)}")
    return out


# ---------------------------------------------------------------------------------- runs
def read_curve(metrics_path: Path) -> list[tuple[int, float]]:
    """(step, val_loss) from a run's metrics.jsonl."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    return [(int(r["step"]), float(r["val_loss"])) for r in rows if "val_loss" in r]


def _module_file(root: Path, name: str) -> Path | None:
    """The file of module ``vesper_sdk.<...>`` under the package folder ``root``."""
    parts = name.split(".")[1:]
    base = root.joinpath(*parts)
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _training_sources() -> list[Path]:
    """The SDK files a training run executes: every module of vesper_sdk.training and every
    package module they import, relatively or by name (found statically, so the answer does
    not depend on what is already imported), the Triton kernels and the data tables."""
    import vesper_sdk
    import vesper_sdk.kernels

    root = Path(vesper_sdk.__file__).parent
    todo = ["vesper_sdk", "vesper_sdk.skills", *(f"vesper_sdk.training.{p.stem}"
                                               for p in (root / "training").glob("*.py")
                                               if p.stem != "__init__")]
    seen: dict[str, Path] = {}
    while todo:
        name = todo.pop()
        path = _module_file(root, name)
        if name in seen or path is None:
            continue
        seen[name] = path
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_bytes())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                stem = f"{base}.{node.module}" if node.module else base
                todo += [stem, *(f"{stem}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                    "vesper_sdk"):
                todo += [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                todo += [a.name for a in node.names if a.name.startswith("vesper_sdk.")]
    files = sorted(set(seen.values()))
    files += sorted(Path(next(iter(vesper_sdk.kernels.__path__))).glob("*.py"))
    return files + sorted((root / "assets").glob("*.tsv"))


def code_fingerprint() -> str:
    """Hash of the training code and torch's version: runs made by other code are not
    reused, while edits to parts of the SDK that training does not run do not matter."""
    import torch

    h = hashlib.sha256(torch.__version__.encode())
    for path in _training_sources():
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _finished_run(out_dir: Path, key: dict[str, Any], steps: int) -> bool:
    """A run folder from an earlier study with the same options and code, trained to the end."""
    try:
        done = json.loads((out_dir / "study.json").read_text())
        curve = read_curve(out_dir / "metrics.jsonl")
    except (OSError, ValueError):
        return False
    return (done == key and bool(curve) and curve[-1][0] == steps
            and (out_dir / "model" / "config.json").is_file())


def train_once(args: argparse.Namespace, corpus: str, data: str, optimizer: str, lr: float,
               seed: int, work: Path) -> dict[str, Any]:
    """One training run through the public API; its validation curve and figures.

    Run folders are named by a hash of the study's settings, so studies of different
    settings (--quick, --steps ...) never share one. A finished run with the same options
    and the same SDK code is read back instead of trained again: a --sweep study reuses
    the runs of a plain one and vice versa.
    """
    import vesper_sdk as vs
    from vesper_sdk.training import TrainOptions

    shape = {}
    if args.shape:
        h, n_layers, heads, ffn = (int(x) for x in args.shape.split(","))
        shape = dict(hidden_size=h, num_layers=n_layers, num_heads=heads, ffn_hidden_size=ffn)
    options = dict(
        max_steps=args.steps, schedule=args.schedule, batch_size=args.batch_size,
        seq_len=args.seq_len, vocab_size=args.vocab_size, eval_every=args.eval_every,
        eval_batches=args.eval_batches, log_every=args.eval_every, checkpoint_every=0,
        builtin_examples=args.skills_examples, device=args.device, progress=False,
        # One token cache per corpus: every run of a corpus (and seed, for the generated
        # one) reads the same tokens; the tokenizer is trained once on the same data.
        cache_dir=str(work / "cache" / corpus), **shape)
    settings = hashlib.sha256(json.dumps([data, args.preset, options], sort_keys=True)
                              .encode()).hexdigest()[:8]
    out_dir = work / "runs" / corpus / settings / f"{optimizer}-lr{lr:g}-seed{seed}"
    options.update(**_TRAIN_OPTIONS[optimizer], lr=lr, seed=seed)
    key = {"options": TrainOptions(data=data, out_dir=str(out_dir), preset=args.preset,
                                   **options).to_json(),
           "code": args.code}
    t0 = time.perf_counter()
    reused = _finished_run(out_dir, key, args.steps)
    if not reused:
        # An interrupted run, or one of older code: start it afresh (the folder belongs to
        # the study; the trainer refuses folders that hold checkpoints).
        shutil.rmtree(out_dir, ignore_errors=True)
        result = vs.train(data, out_dir=out_dir, preset=args.preset, **options)
        if result.interrupted:  # the trainer saw SIGTERM/SIGINT: stop the study too
            raise KeyboardInterrupt(f"training interrupted in {out_dir}")
        (out_dir / "study.json").write_text(json.dumps(key, indent=1))
        # The final checkpoint (weights + optimizer state, ~40 MB a run) is not needed to
        # read the run back: the curve and the model folder are.
        shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    seconds = time.perf_counter() - t0
    curve = read_curve(out_dir / "metrics.jsonl")
    if not curve:
        raise RuntimeError(f"{out_dir / 'metrics.jsonl'} has no val_loss rows")
    rows = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines() if x]
    speeds = [r["tok_s"] for r in rows if "tok_s" in r]
    final = curve[-1][1]
    return {"corpus": corpus, "optimizer": optimizer, "lr": lr, "seed": seed,
            "steps": [s for s, _ in curve], "val_loss": [v for _, v in curve],
            "final_val_loss": final, "final_val_ppl": math.exp(final),
            "seconds": None if reused else seconds, "reused": reused,
            "tok_s": statistics.median(speeds) if speeds else None,
            "params": _params(out_dir / "model"), "out_dir": str(out_dir)}


def _params(model_dir: Path) -> int:
    import vesper_sdk as vs

    return vs.VesperConfig.from_file(model_dir / "config.json").num_parameters()


def _mean_or_none(xs: list[float | None]) -> float | None:
    known = [x for x in xs if x is not None]  # runs read back from disk have no time
    return statistics.fmean(known) if known else None


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarise(runs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]],
                                                   list[dict[str, Any]]]:
    """(curves per corpus x optimizer, table rows, paired rows: each Velvet variant vs
    AdamW)."""
    curves, rows, paired = [], [], []
    keys = list(dict.fromkeys((r["corpus"], r["optimizer"]) for r in runs))
    for corpus, opt in keys:
        mine = [r for r in runs if r["corpus"] == corpus and r["optimizer"] == opt]
        steps = sorted(set.intersection(*(set(r["steps"]) for r in mine)))
        by_step = [[r["val_loss"][r["steps"].index(s)] for r in mine] for s in steps]
        curves.append({"corpus": corpus, "optimizer": opt, "lr": mine[0]["lr"],
                       "seeds": len(mine), "steps": steps,
                       "mean": [statistics.fmean(v) for v in by_step],
                       "min": [min(v) for v in by_step], "max": [max(v) for v in by_step],
                       "std": [statistics.stdev(v) if len(v) > 1 else 0.0 for v in by_step]})
        loss_m, loss_s = _mean_std([r["final_val_loss"] for r in mine])
        ppl_m, ppl_s = _mean_std([r["final_val_ppl"] for r in mine])
        rows.append({"corpus": corpus, "optimizer": opt, "lr": mine[0]["lr"],
                     "seeds": len(mine), "final_val_loss": loss_m, "final_val_loss_std": loss_s,
                     "final_val_ppl": ppl_m, "final_val_ppl_std": ppl_s,
                     "per_seed_val_loss": [round(r["final_val_loss"], 4) for r in mine],
                     "seconds_per_run": _mean_or_none([r.get("seconds") for r in mine])})
    for corpus, opt in keys:
        if opt == "adamw":
            continue
        v = {r["seed"]: r for r in runs if r["corpus"] == corpus and r["optimizer"] == opt}
        a = {r["seed"]: r for r in runs if r["corpus"] == corpus and r["optimizer"] == "adamw"}
        seeds = sorted(set(v) & set(a))
        if not seeds:
            continue
        # Negative = Velvet's perplexity is lower; the seed claimed -62 %.
        change = [100 * (v[s]["final_val_ppl"] / a[s]["final_val_ppl"] - 1) for s in seeds]
        dloss = [v[s]["final_val_loss"] - a[s]["final_val_loss"] for s in seeds]
        c_m, c_s = _mean_std(change)
        d_m, d_s = _mean_std(dloss)
        paired.append({"corpus": corpus, "optimizer": opt, "seeds": len(seeds),
                       "ppl_change_pct": c_m, "ppl_change_pct_std": c_s,
                       "ppl_change_pct_per_seed": [round(c, 2) for c in change],
                       "val_loss_diff": d_m, "val_loss_diff_std": d_s,
                       "velvet_better_in": sum(d < 0 for d in dloss)})
    return curves, rows, paired


def to_markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        "## Velvet vs AdamW: validation loss at equal steps",
        "",
        f"Model {s['model']} ({report['params'] / 1e6:.2f} M parameters), "
        f"{s['steps']} steps of {s['batch_size']} x {s['seq_len']} tokens, warmup + "
        f"{s['schedule']} decay to 10 %, seeds {s['seeds']} (paired: both optimizers get each "
        f"seed), validation every {s['eval_every']} steps on {s['eval_batches']} batches. "
        f"Learning rates: {report['lr_policy']}.",
        "",
        "| corpus | optimizer | lr | final val loss (mean ± std) | final val ppl (mean ± std) "
        "| per-seed val loss |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["table"]:
        lines.append(
            f"| {r['corpus']} | {r['optimizer']} | {r['lr']:g} | "
            f"{r['final_val_loss']:.4f} ± {r['final_val_loss_std']:.4f} | "
            f"{r['final_val_ppl']:.3f} ± {r['final_val_ppl_std']:.3f} | "
            f"{', '.join(f'{x:.4f}' for x in r['per_seed_val_loss'])} |")
    lines += ["", "| corpus | optimizer | perplexity vs AdamW, paired per seed (mean ± std) | "
              "per seed | val loss difference | lower than AdamW in |",
              "|---|---|---|---|---|---|"]
    for p in report["paired"]:
        lines.append(
            f"| {p['corpus']} | {p.get('optimizer', 'velvet')} | "
            f"{p['ppl_change_pct']:+.2f} % ± {p['ppl_change_pct_std']:.2f} | "
            f"{', '.join(f'{c:+.2f} %' for c in p['ppl_change_pct_per_seed'])} | "
            f"{p['val_loss_diff']:+.4f} ± {p['val_loss_diff_std']:.4f} | "
            f"{p['velvet_better_in']}/{p['seeds']} seeds |")
    lines += ["", "Negative = Velvet's perplexity is lower. The seed project claimed -62 %.",
              "", "Corpora:", ""]
    for meta in report["corpora"].values():
        lines.append("- " + ", ".join(f"{k}: {v}" for k, v in meta.items()))
    if report.get("sweep"):
        lines += ["", "Learning-rate sweep (one run each, seed "
                  f"{report['sweep_seed']}; final val loss):", "",
                  "| corpus | optimizer | lr | final val loss |", "|---|---|---|---|"]
        for r in report["sweep"]:
            lines.append(f"| {r['corpus']} | {r['optimizer']} | {r['lr']:g} | "
                         f"{r['final_val_loss']:.4f} |")
    if report.get("failed_runs"):
        lines += ["", "Failed runs:", ""]
        lines += [f"- {f['corpus']} {f['optimizer']} lr {f['lr']:g} seed {f['seed']}: "
                  f"{f['error']}" for f in report["failed_runs"]]
    return "\n".join(lines)


def run_study(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    args.code = code_fingerprint()
    corpora = prepare_corpora(args.corpora, work, args.text_chars, args.skills_examples)
    seeds = list(range(args.seeds))
    failed: list[dict[str, Any]] = []

    def attempt(corpus: str, opt: str, lr: float, seed: int) -> dict[str, Any] | None:
        print(f"-- {corpus:<12} {opt:<7} lr {lr:<8g} seed {seed}", flush=True)
        try:
            r = train_once(args, corpus, corpora[corpus]["data"], opt, lr, seed, work)
        except Exception as exc:  # one diverged run is a result to report, not a crash
            failed.append({"corpus": corpus, "optimizer": opt, "lr": lr, "seed": seed,
                           "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            print(f"   failed: {failed[-1]['error']}", flush=True)
            return None
        print(f"   val loss {r['final_val_loss']:.4f} (ppl {r['final_val_ppl']:.3f}) "
              + ("(reused: a finished run with the same options)" if r["reused"]
                 else f"in {r['seconds']:.0f} s"), flush=True)
        return r

    lrs = {(c, o): args.lr for c in args.corpora for o in args.optimizers}
    sweep_rows: list[dict[str, Any]] = []
    sweep_seed = 1000  # not among the main seeds: the lr is not picked on the scored runs
    if args.sweep:
        for corpus in args.corpora:
            for opt in args.optimizers:
                done = [r for lr in args.sweep if (r := attempt(corpus, opt, lr, sweep_seed))]
                sweep_rows += done
                if done:
                    lrs[(corpus, opt)] = min(done, key=lambda r: r["final_val_loss"])["lr"]
        policy = (f"each optimizer at its own best lr from a sweep over "
                  f"{', '.join(f'{x:g}' for x in args.sweep)} (seed {sweep_seed})")
    else:
        policy = f"the same peak lr {args.lr:g} for both"

    runs = []
    for corpus in args.corpora:
        for seed in seeds:
            for opt in args.optimizers:
                r = attempt(corpus, opt, lrs[(corpus, opt)], seed)
                if r is not None:
                    runs.append(r)
    if not runs:
        raise RuntimeError("every training run failed: "
                           + "; ".join(f["error"] for f in failed[:3]))
    curves, table, paired = summarise(runs)
    model = args.preset + (f" with hidden/layers/heads/ffn {args.shape.replace(',', '/')}"
                           if args.shape else "")
    report: dict[str, Any] = {
        "benchmark": "convergence",
        "code_fingerprint": args.code,
        "settings": {"model": model, "steps": args.steps, "batch_size": args.batch_size,
                     "seq_len": args.seq_len, "vocab_size": args.vocab_size,
                     "schedule": args.schedule, "eval_every": args.eval_every,
                     "eval_batches": args.eval_batches, "seeds": seeds,
                     "device": args.device, "optimizers": args.optimizers},
        "lr_policy": policy,
        "params": runs[0]["params"],
        "corpora": {k: v["meta"] for k, v in corpora.items()},
        "table": table,
        "paired": paired,
        "curves": curves,
        "sweep": [{k: r[k] for k in ("corpus", "optimizer", "lr", "final_val_loss")}
                  for r in sweep_rows],
        "sweep_seed": sweep_seed if args.sweep else None,
        "runs": [{k: v for k, v in r.items() if k != "out_dir"} for r in runs],
        "failed_runs": failed,
    }
    report["headline"] = "; ".join(
        f"{p['corpus']}: {p['optimizer']} ppl {p['ppl_change_pct']:+.1f}% ± "
        f"{p['ppl_change_pct_std']:.1f} vs AdamW" for p in paired)
    report["markdown"] = to_markdown(report)
    return report


def write_outputs(report: dict[str, Any], out_dir: Path, command: str, wall_s: float,
                  started: str, machine: dict[str, Any],
                  name: str = "convergence") -> list[Path]:
    """<name>.json/.md through the suite's writer, and <name>.png."""
    from vesper_sdk.benchmarks import charts, suite

    record = suite.RunRecord(
        name=name, status="ok", command=command, date=started, wall_s=wall_s,
        machine=machine, versions=suite.package_versions(), git=suite.git_info(),
        result=report, headline=report.get("headline", ""))
    suite.write_record(record, out_dir, suite.BENCHMARKS.get("convergence"))
    png = charts.save(charts.convergence_chart(record.to_json()), out_dir / f"{name}.png")
    return [out_dir / f"{name}.json", out_dir / f"{name}.md", png]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per optimizer and corpus")
    ap.add_argument("--preset", default="tiny", help="model preset (shape overridden by --shape)")
    ap.add_argument("--shape", default="128,4,4,512",
                    help="hidden,layers,heads,ffn overriding the preset ('' = the preset's); "
                         "the default is a quarter-width tiny, for CPU time")
    ap.add_argument("--corpora", default=",".join(CORPORA),
                    help=f"comma-separated, from {', '.join(CORPORA)}")
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    ap.add_argument("--lr", type=float, default=2e-3, help="peak lr for both (no --sweep)")
    ap.add_argument("--sweep", default="",
                    help="comma-separated lrs: tune each optimizer's lr on a held-out seed")
    ap.add_argument("--schedule", default="cosine", choices=["cosine", "linear", "constant"])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--skills-examples", type=int, default=5000,
                    help="size of the generated builtin:skills corpus")
    ap.add_argument("--text-chars", type=int, default=0,
                    help="cut the stdlib-docs corpus to this many characters (0 = all)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work-dir", default="runs/convergence",
                    help="run folders, corpora and token caches")
    ap.add_argument("--out-dir", default="benchmarks/results",
                    help="where convergence.json/.md/.png go")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 2 seeds, 10 steps, a very small model, short corpora")
    ap.add_argument("--name", default="convergence",
                    help="file stem of the outputs in --out-dir (e.g. convergence_tuned for a "
                         "--sweep study beside the default one)")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw report here")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.seeds, args.eval_every, args.eval_batches = 10, 2, 5, 2
        args.shape, args.skills_examples, args.text_chars = "64,2,2,128", 1000, 150_000
        args.vocab_size = 512
    args.corpora = [c.strip() for c in args.corpora.split(",") if c.strip()]
    args.optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    args.sweep = [float(x) for x in args.sweep.split(",") if x.strip()]
    for o in args.optimizers:
        if o not in OPTIMIZERS:
            ap.error(f"unknown optimizer {o!r}: choose from {', '.join(OPTIMIZERS)}")
    if args.seeds < 1 or args.steps < 1:
        ap.error("--seeds and --steps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raw = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "benchmarks/convergence.py", *raw])
    from vesper_sdk.benchmarks import suite

    # Date and machine (with its load average) as the study starts, like the suite's.
    started, machine = suite.now_iso(), suite.machine_info(args.device)
    t0 = time.perf_counter()
    report = run_study(args)
    wall = time.perf_counter() - t0
    print()
    print(report["markdown"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    for p in write_outputs(report, Path(args.out_dir), command, wall, started, machine,
                           args.name):
        print(f"wrote {p}")
    print(f"total {wall:.0f} s")
    return 1 if report["failed_runs"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
