"""What checking a model folder against its manifest costs next to loading it.

Saves a randomly initialised model of a preset ('small' by default) to a temporary folder,
then times, side by side and best of ``--repeats``: hashing every file (SHA-256, what
``vesper verify`` and every load do the first time a process reads a file), and
``VesperLM.from_pretrained`` with the check skipped and with it done afresh.

    python benchmarks/integrity_cost.py [--preset small] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import vesper_sdk as vs
from vesper_sdk import integrity
from vesper_sdk.atomic import file_digest, manifest_files
from vesper_sdk.benchmarks.suite import cpu_model


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        vs.VesperLM(vs.VesperConfig.from_preset(args.preset)).save_pretrained(folder)
        size = sum(p.stat().st_size for p in manifest_files(folder))

        def hash_all() -> None:
            for p in manifest_files(folder):
                file_digest(p)

        def load_fresh() -> None:
            integrity.forget_verified()  # the check done again, as in a new process
            vs.VesperLM.from_pretrained(folder)

        def load_checked_before() -> None:
            vs.VesperLM.from_pretrained(folder)  # verified earlier in this process

        load_fresh()  # warm the page cache: both sides read from memory
        result = {
            "preset": args.preset, "folder_mb": round(size / 2**20, 1),
            "hash_s": best(hash_all, args.repeats),
            "load_with_check_s": best(load_fresh, args.repeats),
            "load_without_check_s": best(load_checked_before, args.repeats),
            "cpu": cpu_model(), "torch": torch.__version__,
        }
    result["check_share_of_load"] = round(
        1 - result["load_without_check_s"] / result["load_with_check_s"], 3)
    print(f"{args.preset}: {result['folder_mb']} MB; SHA-256 of every file "
          f"{result['hash_s'] * 1000:.0f} ms; load with the check "
          f"{result['load_with_check_s'] * 1000:.0f} ms, without "
          f"{result['load_without_check_s'] * 1000:.0f} ms "
          f"(the check: {100 * result['check_share_of_load']:.0f} % of a first load) "
          f"on {result['cpu']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
