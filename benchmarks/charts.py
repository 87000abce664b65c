"""PNG charts of the benchmark results (matplotlib, Agg backend: no display needed).

Reads the suite's ``<name>.json`` files (see ``benchmarks/suite.py``) from a results
folder and writes beside them:

* ``optimizer.png``: ms per optimizer step for each implementation, with its share of
  the device's copy bandwidth;
* ``train_step.png``: the train step split into forward / backward / optimizer, ours vs
  the seed-style step, with tokens/s;
* ``generate.png``: greedy decode tokens/s, ours vs HF transformers GPT-2, per batch size;
* ``quantized.png``: perplexity, weight size and decode tokens/s per quantized variant;
* ``convergence.png``: validation loss against steps, Velvet vs AdamW, mean and spread
  over seeds (also drawn by ``benchmarks/convergence.py`` itself, with this function).

Every chart's subtitle names the machine and date of the figures it shows.

    python benchmarks/charts.py --results benchmarks/results [--only optimizer,generate]
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot-free Figure use: never needs a display
from matplotlib.figure import Figure  # noqa: E402

Drawer = Callable[[dict[str, Any], str], Figure]

#: Colours: ours in blue, baselines in grey/orange, so every chart reads the same way.
OURS, BASE, OTHER = "#1f5fbf", "#8c8c8c", "#e07b1a"


class ChartDataError(ValueError):
    """The result does not hold what the chart needs (the benchmark changed its JSON)."""


def _subtitle(record: dict[str, Any]) -> str:
    m = record.get("machine", {})
    where = m.get("gpu") or f"{m.get('cpu', '?')} ({m.get('cpu_cores', '?')} cores)"
    return f"{where}; {str(record.get('date', ''))[:10]}"


def _finish(fig: Figure, title: str, record: dict[str, Any]) -> Figure:
    fig.suptitle(f"{title}\n{_subtitle(record)}", fontsize=10)
    fig.tight_layout()
    return fig


def short(x: float) -> str:
    """3 significant digits without exponents: 0.0123, 4.56, 78.9, 1,234."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(float(x)) else None


# ------------------------------------------------------------------------------ charts
def optimizer_chart(record: dict[str, Any], name: str = "optimizer") -> Figure:
    res = record["result"]
    rows = [(k, v) for k, v in res.get("results", {}).items() if "ms_per_step" in v]
    if not rows:
        raise ChartDataError("no 'results' with 'ms_per_step' in optimizer result")
    rows = [r for r in rows if r[0] != "copy"] + [r for r in rows if r[0] == "copy"]
    fig = Figure(figsize=(7.5, 0.45 * len(rows) + 1.8), dpi=110)
    ax = fig.add_subplot()
    labels = [k for k, _ in rows]
    ms = [v["ms_per_step"] for _, v in rows]
    colors = [OURS if k.startswith("velvet") else BASE if k != "copy" else OTHER
              for k in labels]
    bars = ax.barh(labels, ms, color=colors)
    for bar, (_, v) in zip(bars, rows, strict=True):
        frac = v.get("fraction_of_copy")
        txt = f" {short(v['ms_per_step'])} ms" + (f" ({100 * frac:.0f}% of copy)" if frac else "")
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, txt, va="center",
                fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ms per step (lower is better)")
    ax.set_xlim(0, max(ms) * 1.45)
    params = res.get("parameters")
    title = (f"Optimizer step, '{res.get('preset', '?')}' "
             f"({params / 1e6:.1f} M fp32 params)" if params else "Optimizer step")
    return _finish(fig, title, record)


def _phase(row: dict[str, Any], *names: str) -> float | None:
    for n in names:
        for key in (n, f"{n}_ms", f"ms_{n}"):
            if key in row and _num(row[key]) is not None:
                return float(row[key])
    return None


def _train_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    if isinstance(res.get("rows"), list):
        return [r for r in res["rows"] if isinstance(r, dict)]
    if isinstance(res.get("results"), dict):
        return [{"variant": k, **v} for k, v in res["results"].items() if isinstance(v, dict)]
    if isinstance(res.get("results"), list):
        return [r for r in res["results"] if isinstance(r, dict)]
    raise ChartDataError("train_step result has neither 'rows' nor 'results'")


def train_step_chart(record: dict[str, Any], name: str = "train_step") -> Figure:
    rows = _train_rows(record["result"])
    labels, parts, toks = [], [], []
    for r in rows:
        if r.get("skipped") or r.get("error"):
            continue
        label = str(r.get("variant") or r.get("name") or r.get("impl") or "?")
        fwd = _phase(r, "fwd", "forward")
        bwd = _phase(r, "bwd", "backward")
        opt = _phase(r, "opt", "optimizer", "optim")
        total = _phase(r, "step", "total", "step_ms", "total_ms")
        if fwd is None and total is None:
            continue
        labels.append(label)
        parts.append((fwd, bwd, opt, total))
        toks.append(_num(r.get("tok_s") or r.get("tokens_per_s")))
    if not labels:
        raise ChartDataError("no train_step row with forward/backward/optimizer or total ms")
    fig = Figure(figsize=(7.5, 0.55 * len(labels) + 2.0), dpi=110)
    ax = fig.add_subplot()
    for i, (fwd, bwd, opt, total) in enumerate(parts):
        left = 0.0
        if fwd is not None:
            for val, color, lab in ((fwd, "#4c8ad9", "forward"), (bwd, "#1f5fbf", "backward"),
                                    (opt, OTHER, "optimizer")):
                if val is not None:
                    ax.barh(i, val, left=left, color=color, label=lab if i == 0 else None)
                    left += val
        if total is not None and total > left:  # what the phases do not account for
            ax.barh(i, total - left, left=left, color=BASE,
                    label="other" if i == 0 or fwd is None else None)
            left = total
        tok = toks[i]
        ax.text(left, i, f" {short(left)} ms" + (f", {short(tok)} tok/s" if tok else ""),
                va="center", fontsize=8)
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("ms per training step (lower is better)")
    ax.set_xlim(0, ax.get_xlim()[1] * 1.35)
    handles, names = ax.get_legend_handles_labels()
    if handles:  # below the axes: never on top of a bar's label
        ax.legend(handles, names, fontsize=8, loc="upper center", ncol=len(handles),
                  bbox_to_anchor=(0.5, -0.28), frameon=False)
    res = record["result"]
    shape = ", ".join(f"{k} {res[k]}" for k in ("preset", "batch", "seq", "dtype", "precision")
                      if k in res)
    return _finish(fig, f"Train step: ours vs seed-style ({shape})" if shape else
                   "Train step: ours vs seed-style", record)


def generate_chart(record: dict[str, Any], name: str = "generate") -> Figure:
    res = record["result"]
    rows = res.get("rows") or []
    impls = [k for k in (rows[0] if rows else {}) if isinstance(rows[0][k], dict)
             and "tok_s_best" in rows[0][k]]
    if not impls:
        raise ChartDataError("no rows with per-implementation 'tok_s_best' in generate result")
    fig = Figure(figsize=(7, 3.8), dpi=110)
    ax = fig.add_subplot()
    width = 0.8 / len(impls)
    for j, impl in enumerate(impls):
        xs = [i + (j - (len(impls) - 1) / 2) * width for i in range(len(rows))]
        vals = [r[impl]["tok_s_best"] for r in rows]
        bars = ax.bar(xs, vals, width, label=impl,
                      color=OURS if impl.startswith("vesper") else BASE)
        for bar, v in zip(bars, vals, strict=True):
            ax.text(bar.get_x() + bar.get_width() / 2, v, short(v), ha="center",
                    va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)), [f"batch {r.get('batch', '?')}" for r in rows])
    ax.set_ylabel("new tokens / s (best of repeats; higher is better)")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.12)
    ax.legend(fontsize=8)
    s = res.get("settings", {})
    detail = ", ".join(f"{k} {s[k]}" for k in ("device", "dtype", "prompt_len", "new_tokens")
                       if k in s)
    return _finish(fig, f"Greedy decode, ours vs HF GPT-2 ({detail})" if detail else
                   "Greedy decode, ours vs HF GPT-2", record)


def quantized_chart(record: dict[str, Any], name: str = "quantized") -> Figure:
    res = record["result"]
    rows = [r for r in (res.get("rows") or []) if isinstance(r, dict) and "variant" in r]
    if not rows:
        raise ChartDataError("no 'rows' with 'variant' in quantized result")
    metrics = [("perplexity", "perplexity (lower is better)"),
               ("size_mb", "weights, MB"),
               ("decode_tok_s", "decode tokens/s (higher is better)")]
    fig = Figure(figsize=(11, 3.6), dpi=110)
    labels = [r["variant"] for r in rows]
    colors = [BASE if lab in ("fp32", "onnx-fp32") else OURS for lab in labels]
    for i, (key, title) in enumerate(metrics):
        ax = fig.add_subplot(1, 3, i + 1)
        vals = [_num(r.get(key)) or 0.0 for r in rows]
        bars = ax.bar(range(len(rows)), vals, color=colors)
        for bar, v in zip(bars, vals, strict=True):
            ax.text(bar.get_x() + bar.get_width() / 2, v, short(v), ha="center",
                    va="bottom", fontsize=7)
        ax.set_xticks(range(len(rows)), labels, rotation=35, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.set_ylim(0, max(vals + [1e-9]) * 1.15)
    return _finish(fig, f"Quantized variants ({res.get('config', '')})", record)


def convergence_chart(record: dict[str, Any], name: str = "convergence") -> Figure:
    """Validation loss vs step per corpus: mean over seeds, band = min..max over seeds."""
    res = record["result"]
    groups = res.get("curves")
    if not groups:
        raise ChartDataError("no 'curves' in convergence result")
    corpora = list(dict.fromkeys(g["corpus"] for g in groups))
    fig = Figure(figsize=(5.2 * len(corpora), 7.2), dpi=110)
    palette = {"velvet": OURS, "adamw": OTHER}
    for c, corpus in enumerate(corpora):
        full = fig.add_subplot(2, len(corpora), c + 1)
        zoom = fig.add_subplot(2, len(corpora), len(corpora) + c + 1)
        mine = [g for g in groups if g["corpus"] == corpus]
        last_steps = max(max(g["steps"]) for g in mine)
        for g in mine:
            color = palette.get(g["optimizer"], BASE)
            label = f"{g['optimizer']} (lr {g['lr']:g}, {g['seeds']} seeds)"
            for ax in (full, zoom):
                ax.plot(g["steps"], g["mean"], "-o", ms=3, color=color, label=label)
                ax.fill_between(g["steps"], g["min"], g["max"], color=color, alpha=0.2,
                                linewidth=0)
        full.set_title(f"{corpus}", fontsize=9)
        zoom.set_title(f"{corpus}: second half, zoomed", fontsize=9)
        # Zoom on where the curves are compared: the second half of training.
        zoom.set_xlim(last_steps / 2, last_steps * 1.02)
        tail = [v for g in mine for s, lo, hi in zip(g["steps"], g["min"], g["max"],
                                                     strict=True)
                if s >= last_steps / 2 for v in (lo, hi)]
        if tail:
            pad = 0.1 * (max(tail) - min(tail) or 0.1)
            zoom.set_ylim(min(tail) - pad, max(tail) + pad)
        for ax in (full, zoom):
            ax.set_xlabel("optimizer step")
            ax.set_ylabel("validation loss (nats/token)")
            ax.grid(alpha=0.3)
        full.legend(fontsize=8)
    s = res.get("settings", {})
    title = ("Velvet vs AdamW: validation loss at equal steps (line: mean over seeds; "
             "band: min-max)")
    if s:
        title += (f"\nmodel {s.get('model', '?')}, batch {s.get('batch_size')} x "
                  f"{s.get('seq_len')} tokens, {s.get('schedule')} schedule, "
                  f"{s.get('steps')} steps")
    return _finish(fig, title, record)


CHARTS: dict[str, Drawer] = {
    "optimizer": optimizer_chart,
    "train_step": train_step_chart,
    "generate": generate_chart,
    "quantized": quantized_chart,
    "convergence": convergence_chart,
}


def save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def make_charts(results_dir: str | Path, names: Sequence[str] | None = None,
                ) -> tuple[list[str], dict[str, str]]:
    """Draw a chart for each named benchmark (default: every one with a result file).

    Returns (PNG paths written, {name: error}) -- a benchmark whose run failed or that has
    no result file is skipped without error; a result the chart cannot read is an error.
    """
    results_dir = Path(results_dir)
    written: list[str] = []
    errors: dict[str, str] = {}
    for name in names if names is not None else list(CHARTS):
        drawer = CHARTS.get(name)
        path = results_dir / f"{name}.json"
        if drawer is None or not path.is_file():
            continue
        try:
            record = json.loads(path.read_text())
            if record.get("status") != "ok":
                continue  # its failure is reported in SUMMARY.md already
            written.append(str(save(drawer(record, name), results_dir / f"{name}.png")))
        except Exception as exc:  # one unreadable result must not cost the other charts
            errors[name] = f"{type(exc).__name__}: {exc}"
    return written, errors


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default="benchmarks/results",
                    help="folder holding the suite's <name>.json files")
    ap.add_argument("--only", default="", help="comma-separated benchmarks (default: all)")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or None
    written, errors = make_charts(args.results, names)
    for p in written:
        print(f"wrote {p}")
    for n, e in errors.items():
        print(f"chart {n} failed: {e}")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
