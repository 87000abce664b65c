"""How ONNX Runtime's thread settings change vesper's ONNX decode on this CPU.

Exports a randomly initialised VesperLM ('small' by default) at fp32, int8 and int4, then
decodes greedily through ``OnnxBackend`` (the path ``vs.load`` takes for an export) under
each setting, in alternating rounds, one session alive at a time:

* ``spin``: whether ONNX Runtime's intra-op threads spin waiting for work inside a run
  and between runs (``run``: inside only; ``never``; ``always``, its default);
* ``host``: torch's threads for the sampling between steps (1, or torch's default).

    python benchmarks/onnx_threads.py [--preset small] [--rounds 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import vesper_sdk as vs
from vesper_sdk.benchmarks.suite import cpu_model
from vesper_sdk.export.runner import OnnxBackend
from vesper_sdk.inference.llm import LLM

SETTINGS = [("never", 0), ("always", 0), ("run", 0), ("never", 1), ("always", 1), ("run", 1)]


def label(spin: str, host: int) -> str:
    return f"spin={spin}, host={'1' if host else 'default'}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--precisions", default="fp32,int8,int4")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "model"
        vs.VesperLM(vs.VesperConfig.from_preset(args.preset, vocab_size=32000)).save_pretrained(src)
        vs.VesperTokenizer.train([f"line {i}" for i in range(50)], vocab_size=300,
                                 min_frequency=1).save(src)
        for q in args.precisions.split(","):
            out = Path(tmp) / q
            vs.export_onnx(src, out, quantize=None if q == "fp32" else q, verbose=False)
            tok = vs.VesperTokenizer.from_file(out)
            for b in batches:
                prompts = torch.randint(5, 300, (b, 32)).tolist()
                runs: dict[tuple[str, int], list[float]] = {s: [] for s in SETTINGS}
                for _ in range(args.rounds):
                    for s in SETTINGS:
                        # One session at a time: another session's threads, still spinning
                        # after its own run, would take the cores from this one.
                        lm = LLM(OnnxBackend(out, threads=args.threads, spin=s[0],
                                             host_threads=s[1]), tok, out)
                        lm.generate_tokens(prompts, max_new_tokens=4, temperature=0.0)
                        t = time.perf_counter()
                        lm.generate_tokens(prompts, max_new_tokens=args.new_tokens,
                                           temperature=0.0, ignore_eos=True)
                        runs[s].append(b * args.new_tokens / (time.perf_counter() - t))
                        del lm
                        gc.collect()
                ref = statistics.median(runs[("never", 0)])
                for s in SETTINGS:
                    med = statistics.median(runs[s])
                    rows.append({"precision": q, "batch": b, "spin": s[0],
                                 "host_threads": s[1] or None, "median_tok_s": round(med, 1),
                                 "x_never_default": round(med / ref, 2)})
                    print(f"{q:5s} batch {b}: {label(*s):28s} {med:7.1f} tok/s "
                          f"({med / ref:.2f}x spin=never, host=default)")
    result = {"preset": args.preset, "cpu": cpu_model(), "threads": args.threads,
              "rounds": args.rounds, "new_tokens": args.new_tokens, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
