"""``vesper bench``: run the benchmark suite (optimizer, train step, decode, quantized).

Each benchmark runs in its own process and writes ``<name>.json`` and ``<name>.md`` into
the output folder, with the command, machine, versions and date beside every figure;
``SUMMARY.md`` collects the key figures and every failure, and PNG charts go beside them.
A missing or failing benchmark is listed in the summary and makes the exit code 1.

Examples::

    vesper bench                                  # CPU-sized defaults (~2 min on 2 idle cores)
    vesper bench --quick                          # smoke run (~30 s), into a temp folder
    vesper bench --only optimizer,generate --device cuda
    vesper bench --only convergence               # Velvet vs AdamW study (< 10 min on CPU)
    vesper bench --list                           # the benchmarks and their arguments
"""

from __future__ import annotations

import shlex
import signal
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path


@dataclass
class BenchOptions:
    """Run the benchmark suite and write its results (tables, JSON, charts, SUMMARY.md).

    Benchmarks: optimizer, train_step, generate, quantized (the default set) and
    convergence (asked for by name: --only convergence). Each one's figures are saved
    with the command, machine, versions and date; a missing or failing benchmark is
    reported in SUMMARY.md and makes the exit code 1.
    """

    only: str = field(default="", metadata={
        "help": "comma-separated benchmarks to run (optimizer, train_step, generate, quantized, "
                "convergence, or 'all'); empty = the default four"})
    quick: bool = field(default=False, metadata={
        "help": "smoke-test sizes: the whole default suite in about 30 s on an idle 2-core CPU"})
    device: str = field(default="auto", metadata={
        "help": "device for every benchmark; 'auto' = cuda when present (GPU-sized arguments), "
                "else cpu (CPU-sized)", "choices": ["auto", "cpu", "cuda"]})
    out_dir: str = field(default="", metadata={
        "help": "folder for <name>.json, <name>.md, charts and SUMMARY.md; empty = "
                "benchmarks/results, or with --quick a scratch folder in the system's temp "
                "folder (a smoke run never overwrites recorded results)"})
    timeout: float = field(default=0.0, metadata={
        "help": "seconds each benchmark may run before it is stopped and reported; "
                "0 = each benchmark's own limit"})
    charts: bool = field(default=True, metadata={
        "help": "draw PNG charts from the results (matplotlib)"})
    list_benchmarks: bool = field(default=False, metadata={
        "help": "list the benchmarks and their arguments per device, run nothing",
        "aliases": ["--list"]})


def describe_benchmarks() -> str:
    """Each benchmark, whether it is found, and its arguments per size (cpu/quick/cuda)."""
    from vesper_sdk.benchmarks.suite import BENCHMARKS

    lines = []
    for spec in BENCHMARKS.values():
        found = spec.resolve()
        lines.append(f"{spec.name}{'' if spec.default else ' (on request)'}: {spec.description}"
                     f"{'' if found else '  [not found]'}")
        for profile, args in spec.args.items():
            lines.append(f"    {profile:<5} {shlex.join(args) or '(no arguments)'}")
    return "\n".join(lines)


def cli(opts: BenchOptions) -> int:
    """Entry point of ``vesper bench``; returns the exit code (1 if any benchmark failed)."""
    if opts.timeout < 0:
        raise ValueError(f"--timeout must be >= 0 seconds, got {opts.timeout}")
    if opts.list_benchmarks:
        print(describe_benchmarks())
        return 0
    from vesper_sdk.benchmarks.suite import run_suite

    def on_term(signum: int, frame: object) -> None:
        # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the running benchmark's
        # process group is stopped too instead of being left behind.
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        code, _ = run_suite(opts.only or None, device=opts.device, quick=opts.quick,
                            out_dir=opts.out_dir or default_out_dir(opts.quick),
                            timeout_s=opts.timeout or None,
                            charts=opts.charts, command=as_command(opts))
    finally:
        signal.signal(signal.SIGTERM, previous)
    return code


def default_out_dir(quick: bool) -> str:
    """Where results go without ``--out-dir``: the recorded results, or scratch for a smoke run."""
    if quick:
        return str(Path(tempfile.gettempdir()) / "vesper-bench-quick")
    return "benchmarks/results"


def as_command(opts: BenchOptions) -> str:
    """The ``vesper bench`` command line that gives ``opts`` (for the summary's record)."""
    parts = ["vesper", "bench"]
    for f in fields(opts):
        value = getattr(opts, f.name)
        if value == f.default:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + f.name.replace("_", "-"))
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)
