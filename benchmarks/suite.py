"""The benchmark suite: run each benchmark in its own process, keep every figure with its context.

Each benchmark (``optimizer``, ``train_step``, ``generate``, ``quantized``; ``convergence``
on request) is a script that prints a table and writes JSON with ``--json PATH``. The
suite runs each one as a subprocess of the current Python -- a crash, a leaked CUDA context
or a wedged thread then stays inside that benchmark -- and writes, into the output folder
(``benchmarks/results/`` by default):

* ``<name>.json``: the benchmark's own JSON under ``"result"``, wrapped with what a figure
  means nothing without: the command, the machine (CPU model and cores, GPU name), the
  versions (python, torch, triton, onnxruntime, bitsandbytes, transformers), the date,
  the git commit, the status and the wall time;
* ``<name>.md``: the same as markdown tables;
* ``SUMMARY.md``: one row per benchmark (status, key figure, time, command), the machine
  and versions, and every failure with its error. Benchmarks not run this time keep
  their row from their last ``<name>.json``, marked as an earlier run.

A benchmark that is missing, exits non-zero, times out or writes no JSON is a failure: it
is listed with its error in the summary and makes the exit code 1; nothing is dropped.

Sizes: ``--device cpu`` (the default where no GPU is present) runs CPU-sized arguments
(the default four in under ten minutes on an idle 2-core CPU), ``--quick`` a smoke run of
a minute or two, and ``--device cuda`` GPU-sized ones (the 'medium' preset, as DESIGN.md's
anchors).

Run as ``vesper bench``, ``python -m vesper_sdk.benchmarks.suite`` or
``python benchmarks/suite.py`` (same options; see ``vesper_sdk.bench.BenchOptions``).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Packages whose versions go with every figure (importlib.metadata names).
VERSION_PACKAGES = ("torch", "triton", "onnxruntime", "bitsandbytes", "transformers", "numpy")
SCHEMA = 1  # version of the wrapper layout in <name>.json

Profile = str  # "cpu" | "quick" | "cuda"


@dataclass
class BenchSpec:
    """How to run one benchmark at each size.

    ``args`` maps a profile (``cpu``, ``quick``, ``cuda``) to the benchmark's own arguments
    (``--json`` and, where ``device_arg``, ``--device`` are added by the suite). ``module``
    is the installed name; ``script`` overrides it with a file (tests, one-off scripts).
    """

    name: str
    module: str
    args: dict[Profile, list[str]]
    timeout_s: dict[Profile, float]
    description: str = ""
    device_arg: bool = True
    out_dir_arg: bool = False  # takes --out-dir (writes its own files, e.g. a PNG)
    default: bool = True  # part of a plain `vesper bench`
    headline: Callable[[dict[str, Any]], str] | None = None
    # prepare(profile, device, python, echo) -> (arguments to put first, record of what was
    # done): e.g. a model folder the benchmark reads.
    prepare: Callable[[Profile, str, str, bool], tuple[list[str], dict[str, Any]]] | None = None
    script: Path | None = None
    # interpreter() -> (the Python to run it with, "") or (None, why it is skipped): for a
    # benchmark that needs its own venv (its peers' packages), e.g. .venv-peers.
    interpreter: Callable[[], tuple[str | None, str]] | None = None

    def resolve(self) -> Path | None:
        """The file to run, or None when the benchmark is not installed/written."""
        if self.script is not None:
            return self.script if self.script.is_file() else None
        try:
            found = importlib.util.find_spec(self.module)
        except (ImportError, ValueError):
            return None
        if found is None or not found.origin or not found.origin.endswith(".py"):
            return None
        return Path(found.origin)


@dataclass
class RunRecord:
    """What one benchmark run produced; ``to_json`` is the ``<name>.json`` layout."""

    name: str
    status: str  # ok | failed | timeout | missing | skipped (its venv is not there)
    command: str
    date: str
    wall_s: float
    machine: dict[str, Any]
    versions: dict[str, str]
    git: dict[str, Any]
    result: Any = None
    error: str | None = None
    returncode: int | None = None
    stdout: str = ""
    headline: str = ""
    earlier: bool = False  # read back from a previous run, not run now
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "benchmark": self.name,
            "status": self.status,
            "error": self.error,
            "headline": self.headline,
            "command": self.command,
            "date": self.date,
            "wall_s": round(self.wall_s, 2),
            "returncode": self.returncode,
            "machine": self.machine,
            "versions": self.versions,
            "git": self.git,
            **self.extra,
            "result": self.result,
            "stdout": self.stdout,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunRecord:
        known = {"schema", "benchmark", "status", "error", "headline", "command", "date",
                 "wall_s", "returncode", "machine", "versions", "git", "result", "stdout"}
        return cls(name=data["benchmark"], status=data.get("status", "failed"),
                   command=data.get("command", ""), date=data.get("date", ""),
                   wall_s=float(data.get("wall_s") or 0.0), machine=data.get("machine", {}),
                   versions=data.get("versions", {}), git=data.get("git", {}),
                   result=data.get("result"), error=data.get("error"),
                   returncode=data.get("returncode"), stdout=data.get("stdout", ""),
                   headline=data.get("headline", ""),
                   extra={k: v for k, v in data.items() if k not in known})


# ------------------------------------------------------------------------------ context
def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), for every figure's context."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """CPU model and cores, GPU name and memory when ``device`` is a GPU, OS and host kind."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "os": f"{platform.system()} {platform.release()}",
        "arch": platform.machine(),
        "device": device,
    }
    try:  # cores this process may use (containers often allow fewer than cpu_count)
        info["cpu_cores_usable"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    try:  # a busy shared machine slows CPU figures down: keep the evidence with them
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    if device.startswith("cuda"):
        try:
            import torch

            if torch.cuda.is_available():
                props = torch.cuda.get_device_properties(torch.device(device))
                info["gpu"] = props.name
                info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
                info["gpu_count"] = torch.cuda.device_count()
                info["cuda"] = torch.version.cuda
        except Exception as exc:  # the record must still be written; say why it is bare
            info["gpu"] = f"unknown ({exc})"
    return info


def package_versions() -> dict[str, str]:
    """Versions from package metadata: no import, so a broken extra cannot stop the suite."""
    out = {"python": platform.python_version()}
    for name in VERSION_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def git_info(cwd: Path | None = None) -> dict[str, Any]:
    """Commit and whether the tree had changes: which code produced a figure."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=cwd,
                                capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return {}
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=cwd, capture_output=True, text=True, timeout=10)
        return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {}


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def display_command(cmd: Sequence[str]) -> str:
    """The command as a user would type it: ``python`` for our interpreter, relative paths."""
    cwd = Path.cwd()
    parts = []
    for i, arg in enumerate(cmd):
        if i == 0 and arg == sys.executable:
            parts.append("python")
            continue
        p = Path(arg)
        if p.is_absolute():
            try:
                arg = str(p.relative_to(cwd))
            except ValueError:
                pass
        parts.append(arg)
    return shlex.join(parts)


# --------------------------------------------------------------------------- benchmarks
def _rows(result: Any) -> list[dict[str, Any]]:
    """The benchmark's list of row dicts (``"rows"``), or none."""
    rows = result.get("rows") if isinstance(result, dict) else None
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def _short(x: float) -> str:
    """3 significant digits without exponents (for key figures)."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def optimizer_headline(result: dict[str, Any]) -> str:
    res = result["results"]
    parts = []
    for name, label in (("velvet", "Velvet"), ("adamw_fused", "AdamW fused"),
                        ("adamw_foreach", "AdamW foreach"), ("per_tensor", "per-tensor")):
        r = res.get(name, {})
        if "ms_per_step" in r:
            frac = r.get("fraction_of_copy")
            parts.append(f"{label} {_short(r['ms_per_step'])} ms"
                         + (f" ({100 * frac:.0f}% of copy)" if frac else ""))
    return f"{result.get('preset', '?')}: " + ", ".join(parts)


def onnx_threads_headline(result: dict[str, Any]) -> str:
    """The default setting (spin inside a run, torch's sampling on one thread) against the
    old one (never spin, torch's default threads), per precision and batch."""
    parts = []
    for row in result.get("rows", []):
        if row.get("spin") == "run" and row.get("host_threads") == 1:
            parts.append(f"{row['precision']} b{row['batch']} {row['x_never_default']:.2f}x")
    return ("spin=run, host=1 vs spin=never, host=default: " + ", ".join(parts)) if parts else ""


def generate_headline(result: dict[str, Any]) -> str:
    parts = []
    for row in _rows(result):
        ours, hf = row.get("vesper", {}), row.get("hf-gpt2", {})
        if "tok_s_best" not in ours:
            continue
        text = f"batch {row.get('batch')}: {ours['tok_s_best']:.0f} tok/s"
        if "tok_s_best" in hf:
            text += f" vs HF {hf['tok_s_best']:.0f} ({ours['tok_s_best'] / hf['tok_s_best']:.2f}x)"
        for name, label in (("vesper-compiled", "compiled"), ("vesper-onnx", "via ONNX Runtime")):
            other = row.get(name, {})
            if "tok_s_best" in other:
                text += f", {label} {other['tok_s_best']:.0f}"
                if "tok_s_best" in hf:
                    text += f" ({other['tok_s_best'] / hf['tok_s_best']:.2f}x)"
        parts.append(text)
    return "; ".join(parts)


#: Models trained for a benchmark are kept here between runs (git-ignored).
BENCH_CACHE = Path(".vesper_cache") / "bench"

# The model the quantized benchmark measures when the package bundles none: a small tiny,
# trained briefly on the built-in corpus (a trained model gives meaningful perplexities;
# the full recipe reaches a validation perplexity of about 5 in under a minute of an idle
# 2-core CPU, the same recipe as benchmarks/convergence.py).
QUANT_MODEL_ARGS: dict[str, list[str]] = {
    "quick": ["--preset", "tiny", "--hidden-size", "64", "--num-layers", "2", "--num-heads",
              "2", "--ffn-hidden-size", "128", "--vocab-size", "512", "--max-steps", "20",
              "--batch-size", "8", "--seq-len", "64", "--builtin-examples", "2000"],
    "full": ["--preset", "tiny", "--hidden-size", "128", "--num-layers", "4", "--num-heads",
             "4", "--ffn-hidden-size", "512", "--vocab-size", "2048", "--max-steps", "120",
             "--lr", "2e-3", "--batch-size", "8", "--seq-len", "64",
             "--builtin-examples", "5000"],
}


def default_model_dir() -> Path:
    """The model folder the SDK bundles for its demo (it may not exist in a checkout)."""
    import vesper_sdk

    return Path(vesper_sdk.__file__).resolve().parent / "assets" / "default_model"


def prepare_quantized_model(profile: Profile, device: str, python: str,
                            echo: bool) -> tuple[list[str], dict[str, Any]]:
    """The MODEL_DIR argument of benchmarks/quantized.py: the bundled model, else a trained one."""
    bundled = default_model_dir()
    if profile != "quick" and (bundled / "config.json").is_file():
        return [str(bundled)], {"model": display_command([str(bundled)]),
                                "how": "the model bundled with the SDK"}
    size = "quick" if profile == "quick" else "full"
    train_device = "cuda" if device.startswith("cuda") else "cpu"
    args = ["builtin:skills", *QUANT_MODEL_ARGS[size], "--device", train_device,
            "--eval-every", "0", "--checkpoint-every", "0", "--no-progress"]
    # Keyed by the arguments: a change of recipe trains a new model instead of reusing.
    key = hashlib.sha256(" ".join(args).encode()).hexdigest()[:10]
    run_dir = (BENCH_CACHE / f"quantized-model-{size}-{key}").resolve()
    cmd = [python, "-m", "vesper_sdk.training", *args, "--out-dir", str(run_dir)]
    info: dict[str, Any] = {"model": display_command([str(run_dir / "model")]),
                            "how": "trained for this benchmark", "command": display_command(cmd)}
    if (run_dir / "model" / "config.json").is_file():
        info["reused"] = True
        return [str(run_dir / "model")], info
    if echo:
        print(f"  (training the model to quantize: {info['command']})", flush=True)
    run = execute(cmd, timeout=900, echo=False)
    error = run.error(900)
    if error:
        raise RuntimeError(f"{info['command']}: {error}")
    info["seconds"] = round(run.wall_s, 1)
    return [str(run_dir / "model")], info


def quantized_headline(result: dict[str, Any]) -> str:
    parts = []
    for r in _rows(result):
        if r.get("variant") == "fp32":
            parts.append(f"fp32 ppl {_short(r['perplexity'])}, {_short(r['size_mb'])} MB, "
                         f"{_short(r['decode_tok_s'])} tok/s")
        elif "variant" in r:
            delta = r.get("perplexity_delta_pct")
            parts.append(f"{r['variant']} "
                         + (f"{delta:+.1f}% ppl, " if delta is not None else "")
                         + f"{r.get('size_ratio', 0):.2f}x size, "
                         + f"{_short(r['decode_tok_s'])} tok/s")
    # The target's figure: ONNX int4 against GPT-2 of the same shape, both ways compared.
    int4 = next((r for r in _rows(result) if r.get("variant") == "onnx-int4"), None)
    if int4 and "speedup_vs_gpt2_generate" in int4:
        parts.append(f"onnx-int4 vs HF GPT-2: {int4['speedup_vs_gpt2_generate']:.2f}x "
                     f"generate() through the API, {int4['speedup_vs_gpt2_loop']:.2f}x "
                     "bare loops")
    return "; ".join(parts)


def serve_load_headline(result: dict[str, Any]) -> str:
    """Per model at the saturating load: continuous vs static tokens/s and p99 TTFT."""
    sat = [r for r in _rows(result) if r.get("load") == "saturating"]
    parts = []
    for model in dict.fromkeys(r.get("model") for r in sat):
        got = {r.get("scheduler"): r for r in sat if r.get("model") == model}
        c, s = got.get("continuous"), got.get("static")
        if c and s and c.get("output_tok_s") and s.get("output_tok_s") and c.get("ttft_p99_ms"):
            tput, ttft = c["output_tok_s"], c["ttft_p99_ms"]
            parts.append(f"{model} at 1x: continuous {_short(tput)} tok/s vs static "
                         f"{_short(s['output_tok_s'])} ({tput / s['output_tok_s']:.2f}x), "
                         f"p99 TTFT {_short(ttft)} vs {_short(s['ttft_p99_ms'] or 0)} ms "
                         f"({(s['ttft_p99_ms'] or 0) / ttft:.2f}x lower)")
        for r in (got.values() if not (c and s) else ()):
            parts.append(f"{model} {r.get('scheduler')} at {r.get('offered_rps')} req/s: "
                         f"{_short(r.get('output_tok_s') or 0)} tok/s, p99 TTFT "
                         f"{_short(r.get('ttft_p99_ms') or 0)} ms")
    return "; ".join(parts)


BENCHMARKS: dict[str, BenchSpec] = {}


def register(spec: BenchSpec) -> BenchSpec:
    BENCHMARKS[spec.name] = spec
    return spec


# CPU-sized arguments are chosen so that the four default benchmarks together stay under
# ten minutes on an idle 2-core CPU; `quick` is a smoke run (seconds each); `cuda` follows
# DESIGN.md's measured anchors ('medium', B=8, S=1024) so figures compare with them.
# Timeouts are a safety net several times the expected time, not a budget: a machine
# shared with other work is slow, not broken (`--timeout` tightens them).
register(BenchSpec(
    name="optimizer", module="vesper_sdk.benchmarks.optimizer",
    description="optimizer step time per implementation (Velvet triton/foreach, torch AdamW)",
    args={"cpu": ["--preset", "tiny", "--steps", "30"],
          "quick": ["--preset", "tiny", "--vocab-size", "4096", "--steps", "3", "--warmup", "1",
                    "--windows", "1"],
          "cuda": ["--preset", "medium"]},
    timeout_s={"cpu": 600, "quick": 300, "cuda": 120}, headline=optimizer_headline))
register(BenchSpec(
    name="train_step", module="vesper_sdk.benchmarks.train_step",
    description="training step breakdown (fwd/bwd/opt): ours, ours with the full logits, "
                "seed-style",
    args={"cpu": ["--preset", "tiny", "--vocab", "32000", "--steps", "20"],
          "quick": ["--preset", "tiny", "--quick"],
          # DESIGN.md's anchor: 'medium' (vocab 32000), B=8, S=1024, bf16, compiled.
          "cuda": ["--preset", "medium", "--batch", "8", "--seq", "1024", "--vocab", "32000",
                   "--compile", "--profile"]},
    timeout_s={"cpu": 600, "quick": 300, "cuda": 240}))
register(BenchSpec(
    name="generate", module="vesper_sdk.benchmarks.generate",
    description="greedy decode tokens/s, ours (PyTorch; on CPU also ONNX Runtime) vs HF "
                "transformers GPT-2",
    args={"cpu": ["--repeats", "5", "--onnx"], "quick": ["--quick", "--no-compile"],
          "cuda": []},
    timeout_s={"cpu": 600, "quick": 300, "cuda": 150}, headline=generate_headline))
register(BenchSpec(
    name="quantized", module="vesper_sdk.benchmarks.quantized",
    description="quantized variants (bnb int8/nf4, ONNX fp32/int8/int4): perplexity, size, "
                "decode tokens/s; MODEL_DIR = the bundled default model, else a tiny model "
                "trained for it once (kept in .vesper_cache/bench)",
    args={"cpu": [], "quick": ["--max-tokens", "1024", "--new-tokens", "16"], "cuda": []},
    timeout_s={"cpu": 900, "quick": 300, "cuda": 300}, device_arg=False,
    prepare=prepare_quantized_model, headline=quantized_headline))
register(BenchSpec(
    name="convergence", module="vesper_sdk.benchmarks.convergence",
    description="validation loss, Velvet vs AdamW at equal steps: seeds x 2 corpora",
    args={"cpu": [], "quick": ["--quick"], "cuda": []},
    timeout_s={"cpu": 3600, "quick": 600, "cuda": 900}, out_dir_arg=True,
    default=False))  # ~10 minutes on its own: asked for by name (--only convergence)
register(BenchSpec(
    name="serve_load", module="vesper_sdk.benchmarks.serve_load",
    description="vesper serve under open-loop Poisson load at 0.3x/1x/2x the static "
                "scheduler's capacity: output tokens/s, p50/p99 TTFT and inter-token latency, "
                "continuous vs static scheduler ('small' shape and the demo model)",
    args={"cpu": ["--duration", "20", "--probe-requests", "64", "--max-requests", "300"],
          "quick": ["--quick"],
          # gpu_suite.sh's step, about 60 s in all: 4 server starts, 2 probes, 12 points of
          # 2 s of arrivals each (estimated, not yet timed on a GPU).
          "cuda": ["--duration", "2", "--drain-factor", "1", "--probe-requests", "64"]},
    timeout_s={"cpu": 1500, "quick": 300, "cuda": 150}, out_dir_arg=True,
    headline=serve_load_headline,
    default=False))  # ~10 minutes on a 2-core CPU: asked for by name (--only serve_load)


register(BenchSpec(
    name="onnx_threads", module="vesper_sdk.benchmarks.onnx_threads",
    description="ONNX decode tokens/s ('small' fp32/int8/int4, batch 1 and 8) under each "
                "thread setting: ONNX Runtime spinning never/always/inside a run, torch's "
                "sampling threads 1 or default",
    args={"cpu": [], "quick": ["--precisions", "int4", "--batches", "1", "--rounds", "1",
                               "--new-tokens", "16"], "cuda": []},
    timeout_s={"cpu": 1200, "quick": 300, "cuda": 600}, device_arg=False,
    headline=onnx_threads_headline,
    default=False))  # ~7 minutes on an idle 2-core CPU: asked for by name


def peers_python() -> tuple[str | None, str]:
    """decode_peers' interpreter: .venv-peers' Python (`make peers-check` makes it), or why
    the benchmark is skipped."""
    for root in (Path(__file__).resolve().parent.parent, Path.cwd()):
        python = root / ".venv-peers" / "bin" / "python"
        if python.is_file():
            return str(python), ""
    return None, ("its venv .venv-peers is not there: `make peers-check` installs the peers "
                  "(onnxruntime-genai, llama-cpp-python, CTranslate2) and runs it")


register(BenchSpec(
    name="decode_peers", module="vesper_sdk.benchmarks.decode_peers",
    description="greedy decode tokens/s at batch 1 and 8, 'small' shape, 2 threads: vesper's "
                "PyTorch eager/compiled and ONNX fp32/int8/int4 beside onnxruntime-genai "
                "(fp32/int8/int4), llama.cpp (f32/q8_0/q4_0) and CTranslate2 (fp32/int8), "
                "each converted by its own tool; in .venv-peers only (skipped without it)",
    args={"cpu": [], "quick": ["--quick"], "cuda": []},
    timeout_s={"cpu": 1800, "quick": 600, "cuda": 1800}, device_arg=False,
    interpreter=peers_python,
    default=False))  # ~7 minutes on an idle 2-core CPU: asked for by name (--only decode_peers)


def select(only: str | Iterable[str] | None,
           registry: dict[str, BenchSpec] | None = None) -> list[BenchSpec]:
    """Benchmarks named in ``only`` (comma-separated or a list), else the default set."""
    registry = BENCHMARKS if registry is None else registry
    if only is None or only == "" or only == []:
        return [s for s in registry.values() if s.default]
    names = only.split(",") if isinstance(only, str) else list(only)
    names = [n.strip() for n in names if n.strip()]
    if names == ["all"]:
        return list(registry.values())
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {', '.join(unknown)}: choose from "
                         f"{', '.join(registry)} (or 'all')")
    return [registry[n] for n in dict.fromkeys(names)]


# ------------------------------------------------------------------------------ running
def _pump(stream, sink: list[str], echo: bool, prefix: str, target,
          hide: str | None = None) -> None:
    for line in iter(stream.readline, ""):
        if hide is not None and line.rstrip("\n") == hide:
            continue
        sink.append(line)
        if echo:
            target.write(prefix + line)
            target.flush()
    stream.close()


def _first_line(text: str | None) -> str:
    lines = (text or "").strip().splitlines()
    return lines[0] if lines else ""


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


@dataclass
class Execution:
    """What one subprocess did."""

    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    timed_out: bool

    def error(self, timeout: float) -> str | None:
        """None if it succeeded, else a message whose first line says why."""
        if self.timed_out:
            last = _tail(self.stderr or self.stdout, 5)
            return f"timed out after {timeout:.0f} s" + (f"; last output: {last}" if last else "")
        if self.returncode != 0:
            # First line: the exception message (last line of stderr); then the context.
            tail = _tail(self.stderr) or _tail(self.stdout)
            last = tail.splitlines()[-1] if tail else "(no output)"
            return f"exit code {self.returncode}: {last}" + (f"\n{tail}" if tail else "")
        return None


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def execute(cmd: Sequence[str], timeout: float, echo: bool, hide: str | None = None
            ) -> Execution:
    """Run ``cmd``, streaming its output when ``echo``, killing its process group on timeout.
    A stdout line equal to ``hide`` is dropped (the benchmark's note of a scratch file)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out_lines: list[str] = []
    err_lines: list[str] = []
    start = time.perf_counter()
    # A new session: on timeout the whole process group goes (DataLoader workers,
    # compile workers), and only it.
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True, bufsize=1)
    pumps = [threading.Thread(target=_pump, args=(proc.stdout, out_lines, echo, "  ",
                                                  sys.stdout, hide), daemon=True),
             threading.Thread(target=_pump, args=(proc.stderr, err_lines, echo, "  ! ",
                                                  sys.stderr), daemon=True)]
    for t in pumps:
        t.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc)
    except BaseException:
        # Interrupted (Ctrl-C, SIGTERM from an outer `timeout`): its own session means the
        # benchmark would outlive us, holding the CPU or GPU, unless we stop it here.
        _kill_group(proc)
        raise
    for t in pumps:
        t.join(timeout=5)
    return Execution(proc.returncode, "".join(out_lines), "".join(err_lines),
                     time.perf_counter() - start, timed_out)


def run_benchmark(spec: BenchSpec, profile: Profile, device: str, *,
                  machine: dict[str, Any] | None = None, versions: dict[str, str] | None = None,
                  git: dict[str, Any] | None = None, timeout_s: float | None = None,
                  extra_args: Sequence[str] = (), echo: bool = True,
                  python: str | None = None, out_dir: str | Path | None = None) -> RunRecord:
    """Run one benchmark in a subprocess and return its record (never raises for its failures)."""
    python = python or sys.executable
    machine = dict(machine) if machine is not None else machine_info(device)
    try:  # the load when this benchmark starts, not when the suite did
        machine["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    versions = versions if versions is not None else package_versions()
    git = git if git is not None else git_info()
    args = list(spec.args.get(profile, spec.args.get("cpu", [])))
    if spec.device_arg and device != "auto":
        args += ["--device", device]
    if spec.out_dir_arg and out_dir is not None:
        args += ["--out-dir", str(out_dir)]
    args += list(extra_args)
    timeout = timeout_s or spec.timeout_s.get(profile, 300)
    record = RunRecord(name=spec.name, status="failed", command="", date=now_iso(),
                       wall_s=0.0, machine=machine, versions=versions, git=git)
    script = spec.resolve()
    if script is None:
        where = spec.script if spec.script is not None else spec.module
        record.status = "missing"
        record.command = display_command([python, str(where), *args])
        record.error = f"benchmark not found: {where} does not exist (not written or not installed)"
        return record
    if spec.interpreter is not None:
        found, why = spec.interpreter()
        if found is None:  # reported, not run, and not a failure of the suite
            record.status, record.error = "skipped", why
            record.command = display_command([python, str(script), *args])
            return record
        python = found
    if spec.prepare is not None:
        # What the benchmark needs first (a model folder): its own command and time, and
        # a failure there is this benchmark's failure, reported as such.
        try:
            prep_args, prepared = spec.prepare(profile, device, python, echo)
        except Exception as exc:
            record.error = f"preparing its input failed: {type(exc).__name__}: {exc}"
            return record
        args = [*prep_args, *args]
        record.extra["prepared"] = prepared

    with tempfile.TemporaryDirectory(prefix=f"vesper-bench-{spec.name}-") as tmp:
        json_path = Path(tmp) / f"{spec.name}.json"
        cmd = [python, str(script), *args]
        record.command = display_command(cmd)  # --json is ours, not the user's to repeat
        # Its "wrote <scratch JSON>" line would name a file deleted below: not shown.
        run = execute([*cmd, "--json", str(json_path)], timeout, echo,
                      hide=f"wrote {json_path}")
        record.wall_s, record.returncode, record.stdout = run.wall_s, run.returncode, run.stdout
        record.error = run.error(timeout)
        if run.timed_out:
            record.status = "timeout"
        elif record.error is None and not json_path.is_file():
            record.error = f"exited 0 but wrote no JSON to --json (stderr: {_tail(run.stderr, 5)})"
        elif record.error is None:
            try:
                record.result = json.loads(json_path.read_text())
                record.status = "ok"
            except json.JSONDecodeError as exc:
                record.error = f"its JSON does not parse: {exc}"
    if record.ok:
        record.headline = headline_for(spec, record.result)
    return record


def headline_for(spec: BenchSpec | None, result: Any) -> str:
    """The key figure for the summary; a headline extractor that trips is not a failure."""
    try:
        if spec is not None and spec.headline is not None:
            text = spec.headline(result)
            if text:
                return text
        # Benchmarks that know their key figure say it themselves.
        text = result.get("headline") if isinstance(result, dict) else None
        return text if isinstance(text, str) else ""
    except Exception as exc:  # a result shape we did not foresee: say so, keep the run
        return f"(no headline: {type(exc).__name__}: {exc})"


# ----------------------------------------------------------------------------- markdown
def fmt(value: Any) -> str:
    """One table cell: 4 significant digits for floats, thousands separators for big ints."""
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value).lower()
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.3e}"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={fmt(v)}" for k, v in value.items())
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub markdown table; columns default to the keys in first-seen order."""
    if not rows:
        return ""
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def _flatten_row(row: dict[str, Any]) -> dict[str, Any]:
    """One level of nesting into ``a.b`` columns; deeper values are shown inline."""
    out: dict[str, Any] = {}
    for k, v in row.items():
        if isinstance(v, dict) and all(_is_scalar(x) for x in v.values()) and len(v) <= 8:
            for k2, v2 in v.items():
                out[f"{k}.{k2}"] = v2
        else:
            out[k] = v
    return out


def json_to_markdown(data: Any, title: str = "", level: int = 3) -> str:
    """Render any benchmark JSON: scalars as a key/value table, lists of dicts as tables."""
    parts: list[str] = []
    heading = ("#" * level + " " + title) if title else ""
    if isinstance(data, list) and data and all(isinstance(r, dict) for r in data):
        if heading:
            parts.append(heading)
        parts.append(markdown_table([_flatten_row(r) for r in data]))
        return "\n\n".join(parts)
    if not isinstance(data, dict):
        if heading:
            parts.append(heading)
        parts.append(fmt(data))
        return "\n\n".join(parts)
    scalars = {k: v for k, v in data.items()
               if _is_scalar(v) or (isinstance(v, list) and all(_is_scalar(x) for x in v)
                                    and len(v) <= 12)}
    if heading and (scalars or data):
        parts.append(heading)
    if scalars:
        parts.append(markdown_table([{"field": k, "value": v} for k, v in scalars.items()]))
    for k, v in data.items():
        if k in scalars or k == "markdown":
            continue
        sub = f"{title} / {k}" if title else k
        rendered = json_to_markdown(v, sub, min(level + 1, 6))
        if rendered:
            parts.append(rendered)
    return "\n\n".join(p for p in parts if p)


def context_lines(record: RunRecord) -> list[str]:
    """The lines that say where, when and with what a figure was measured."""
    m, v = record.machine, record.versions
    where = f"{m.get('cpu', '?')}, {m.get('cpu_cores', '?')} cores"
    if m.get("cpu_cores_usable") and m.get("cpu_cores_usable") != m.get("cpu_cores"):
        where += f" ({m['cpu_cores_usable']} usable)"
    if m.get("load_avg_1m") is not None:
        where += f", load average {m['load_avg_1m']} at its start"
    if m.get("gpu"):
        where = f"{m['gpu']} ({m.get('gpu_memory_gib', '?')} GiB, CUDA {m.get('cuda')}); " + where
    git = record.git
    commit = (f"{git.get('commit')}{' + local changes' if git.get('dirty') else ''}"
              if git else "unknown")
    prepared = record.extra.get("prepared") or {}
    return [
        f"- status: **{record.status}**" + (" (earlier run)" if record.earlier else ""),
        f"- command: `{record.command}`",
        *([f"- input: {prepared.get('how')}: `{prepared.get('model')}`"
           + (f", made by `{prepared['command']}`" if prepared.get("command") else "")]
          if prepared else []),
        f"- machine: {where}; device `{m.get('device', '?')}`; {m.get('os', '')}",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- date: {record.date}; wall time {record.wall_s:.1f} s; commit {commit}",
    ]


def record_markdown(record: RunRecord, spec: BenchSpec | None = None) -> str:
    """``<name>.md``: context, then the result as tables (or the benchmark's own markdown)."""
    lines = [f"# Benchmark: {record.name}", ""]
    if spec is not None and spec.description:
        lines += [spec.description, ""]
    lines += context_lines(record)
    if record.headline:
        lines += [f"- key figure: {record.headline}"]
    lines.append("")
    if not record.ok:
        lines += ["## Error", "", "```text", record.error or "(none recorded)", "```", ""]
        return "\n".join(lines)
    own = record.result.get("markdown") if isinstance(record.result, dict) else None
    if isinstance(own, str) and own.strip():
        # The benchmark rendered its own tables (it knows which columns matter).
        lines += [own.strip(), ""]
    else:
        lines += ["## Results", "", json_to_markdown(record.result, level=3), ""]
    if record.stdout.strip() and not own:
        lines += ["## Printed output", "", "```text", record.stdout.rstrip(), "```", ""]
    return "\n".join(lines)


def summary_markdown(records: Sequence[RunRecord], charts: Sequence[str] = (),
                     chart_errors: dict[str, str] | None = None,
                     command: str = "") -> str:
    """``SUMMARY.md``: one row per benchmark, then context, failures and charts."""
    lines = ["# Benchmark summary", ""]
    if command:
        lines += [f"Suite command: `{command}`", ""]
    rows = []
    for r in records:
        where = r.machine.get("gpu") or r.machine.get("cpu", "?")
        rows.append({
            "benchmark": f"[{r.name}]({r.name}.md)",
            "status": r.status + (" (earlier)" if r.earlier else ""),
            "key figure": r.headline if r.ok else _first_line(r.error)[:160],
            "time s": round(r.wall_s, 1),
            "date": r.date[:10],
            "machine": f"{where} ({r.machine.get('device', '?')})",
            "command": f"`{r.command}`",
        })
    lines += [markdown_table(rows), ""]
    current = [r for r in records if not r.earlier]
    if current:
        # Each <name>.md has its own context; here the run's, which they share.
        lines += ["## Machine and versions (this run)", ""]
        lines += [ln for ln in context_lines(current[0]) if ln.startswith(
            ("- machine", "- versions"))]
        git = current[0].git
        lines += [f"- started {current[0].date}; {len(current)} benchmark(s) in "
                  f"{sum(r.wall_s for r in current):.0f} s; commit "
                  f"{git.get('commit', 'unknown')}{' + local changes' if git.get('dirty') else ''}",
                  ""]
    skipped = [r for r in records if r.status == "skipped"]
    if skipped:
        lines += ["## Skipped", ""] + [f"- {r.name}: {r.error}" for r in skipped] + [""]
    failed = [r for r in records if not r.ok and r.status != "skipped"]
    if failed:
        lines += ["## Failures", ""]
        for r in failed:
            lines += [f"### {r.name}: {r.status}", "", "```text", r.error or "(no error text)",
                      "```", ""]
    if charts or chart_errors:
        lines += ["## Charts", ""]
        lines += [f"![{Path(c).stem}]({Path(c).name})" for c in charts]
        for name, err in (chart_errors or {}).items():
            lines.append(f"- chart `{name}` failed: {err}")
        lines.append("")
    return "\n".join(lines)


def write_record(record: RunRecord, out_dir: Path, spec: BenchSpec | None = None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{record.name}.json").write_text(
        json.dumps(record.to_json(), indent=2, default=str) + "\n")
    (out_dir / f"{record.name}.md").write_text(record_markdown(record, spec))


def read_record(path: Path) -> RunRecord | None:
    """A previous run's ``<name>.json``, or None if it is not one of ours."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or "benchmark" not in data or "schema" not in data:
        return None
    record = RunRecord.from_json(data)
    record.earlier = True
    return record


# --------------------------------------------------------------------------------- suite
def run_suite(only: str | Iterable[str] | None = None, *, device: str = "auto",
              quick: bool = False, out_dir: str | Path = "benchmarks/results",
              timeout_s: float | None = None, charts: bool = True, echo: bool = True,
              registry: dict[str, BenchSpec] | None = None,
              command: str = "") -> tuple[int, list[RunRecord]]:
    """Run the selected benchmarks, write their files and SUMMARY.md; (exit code, records)."""
    registry = BENCHMARKS if registry is None else registry
    specs = select(only, registry)
    device = resolve_device(device)
    profile = "quick" if quick else ("cuda" if device.startswith("cuda") else "cpu")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    machine, versions, git = machine_info(device), package_versions(), git_info()
    records: list[RunRecord] = []
    for spec in specs:
        if echo:
            print(f"== {spec.name} ({profile})", flush=True)
        rec = run_benchmark(spec, profile, device, machine=machine, versions=versions, git=git,
                            timeout_s=timeout_s, echo=echo, out_dir=out)
        write_record(rec, out, spec)
        records.append(rec)
        if echo:
            # Named here: the benchmark's own "wrote ..." line is the suite's scratch copy.
            print(f"== {spec.name}: {rec.status} in {rec.wall_s:.1f} s"
                  + (f" -- {_first_line(rec.error)}" if rec.error else "")
                  + f"; results: {out / spec.name}.json and .md", flush=True)

    # Rows of benchmarks not run now stay in the summary, from their last result file.
    ran = {r.name for r in records}
    all_records = list(records)
    for name in registry:
        if name not in ran:
            old = read_record(out / f"{name}.json")
            if old is not None:
                all_records.append(old)
    order = list(registry)
    all_records.sort(key=lambda r: order.index(r.name) if r.name in order else len(order))

    chart_files: list[str] = []
    chart_errors: dict[str, str] = {}
    if charts:
        try:
            from vesper_sdk.benchmarks import charts as charts_mod

            chart_files, chart_errors = charts_mod.make_charts(
                out, [n for n in registry if n in ran])
        except Exception as exc:  # matplotlib missing or broken: report, keep the tables
            chart_errors["charts"] = f"{type(exc).__name__}: {exc}"
    # The summary shows every benchmark's chart, drawn now or by an earlier run.
    chart_files = [str(out / f"{r.name}.png") for r in all_records
                   if (out / f"{r.name}.png").is_file()]
    (out / "SUMMARY.md").write_text(summary_markdown(all_records, chart_files, chart_errors,
                                                     command=command))
    if echo:
        print()
        print(console_summary(records))
        print(f"\nresults: {out}/SUMMARY.md")
        for name, err in chart_errors.items():
            print(f"chart {name} failed: {err}")
    ok = all(r.ok or r.status == "skipped" for r in records) and not chart_errors
    return (0 if ok else 1), records


def console_summary(records: Sequence[RunRecord]) -> str:
    """A plain-text table for the terminal: benchmark, status, time, key figure or error."""
    head = ("benchmark", "status", "time", "key figure / error")
    rows = [head] + [(r.name, r.status, f"{r.wall_s:.1f}s",
                      r.headline if r.ok else _first_line(r.error)) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row[:3], widths, strict=True))
                     + "  " + row[3] for row in rows)


def main(argv: Sequence[str] | None = None) -> int:
    """``python benchmarks/suite.py [options]``: the same options as ``vesper bench``."""
    from vesper_sdk.cli import main as vesper_main

    return vesper_main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
