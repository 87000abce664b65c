"""Before/after: CPU greedy decode of this checkout against another commit, side by side.

    python benchmarks/decode_ab.py --ref HEAD~3            # 'small', batch 1, 6 rounds
    python benchmarks/decode_ab.py --ref HEAD~3 --backend compiled   # or onnx
    python benchmarks/decode_ab.py --ref HEAD~1 --backend onnx --quantize int4 --in-place-kv

Checks ``--ref`` out into a temporary git worktree and times both trees in alternating
fresh processes (ref, this, ref, this, ...), each through ``LLM.generate_tokens`` over
``TorchBackend`` (eager, or compiled) or over the model exported to ONNX, on the same
random model and prompt. Prints both sides' tokens/s (median and best), the
median over rounds of the ratio of a round's two runs, and whether both decoded the same
tokens. On a shared machine whose speed drifts between runs, alternating is what makes
the ratio mean something; one process per run keeps the trees apart.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child(args: argparse.Namespace) -> int:
    """One timed run of the tree at ``args.child`` (its package first on the path)."""
    sys.path.insert(0, args.child)
    import torch

    import vesper_sdk as vs

    try:  # the layout since the one-forward redesign
        from vesper_sdk.inference import LLM, TorchBackend
    except ImportError:  # a tree from before it
        from vesper_sdk.generate import LLM, TorchBackend

    if not vs.__file__.startswith(args.child):
        raise SystemExit(f"imported {vs.__file__}, not the tree at {args.child}")
    torch.manual_seed(0)
    cfg = vs.VesperConfig.from_preset(args.preset, vocab_size=args.vocab_size,
                                      max_seq_len=1024)
    tok = vs.VesperTokenizer.train([f"decode line {i}" for i in range(100)], vocab_size=300,
                                   min_frequency=1)
    model = vs.VesperLM(cfg)
    with torch.no_grad():  # B starts at zero; give the FlyLoRA branch a say
        for layer in model.flylora_layers():
            layer.lora_B.normal_(0, 0.02)
    prompts = torch.randint(3, cfg.vocab_size, (args.batch, 32)).tolist()
    with tempfile.TemporaryDirectory(prefix="vesper-ab-model-") as tmp:
        if args.backend == "onnx":
            model.save_pretrained(Path(tmp) / "model")
            tok.save(Path(tmp) / "model")
            extra = {"in_place_kv": True} if args.in_place_kv else {}
            vs.export_onnx(Path(tmp) / "model", Path(tmp) / "onnx", quantize=args.quantize,
                           **extra)
            lm = vs.export.OnnxModel(Path(tmp) / "onnx")
        else:
            lm = LLM(TorchBackend(model, compile=args.backend == "compiled"), tok)

        def run(n: int) -> tuple[float, list[int]]:
            # generate_tokens takes the sampling fields as keywords in every tree.
            t0 = time.perf_counter()
            rows = lm.generate_tokens(prompts, max_new_tokens=n, temperature=0.0,
                                      ignore_eos=True)
            return args.batch * n / (time.perf_counter() - t0), [t.id for r in rows for t in r]

        run(8 if args.backend != "compiled" else args.new_tokens)  # warm-up (the compiler)
        best, ids = max(run(args.new_tokens) for _ in range(args.repeats))
    print(json.dumps({"tok_s": best, "ids": ids}))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ref", help="the commit to compare with (any git revision)")
    ap.add_argument("--rounds", type=int, default=6, help="alternations (default 6)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed decodes per process; its best counts (default 3)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--vocab-size", type=int, default=32000)
    ap.add_argument("--backend", choices=["eager", "compiled", "onnx"], default="eager",
                    help="vs.load's default (eager), compile=True, or the model exported to "
                         "ONNX and run by OnnxModel (default eager)")
    ap.add_argument("--quantize", choices=["int8", "int4"], default=None,
                    help="--backend onnx: export quantized (default fp32)")
    ap.add_argument("--in-place-kv", action="store_true",
                    help="--backend onnx: the in-place KV export (both trees must have it)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    if not args.ref:
        ap.error("--ref is required: the commit to compare this checkout with")

    with tempfile.TemporaryDirectory(prefix="vesper-ab-") as tmp:
        ref_tree = Path(tmp) / "ref"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q",
                        str(ref_tree), args.ref], check=True)
        try:
            trees = {f"ref {args.ref}": ref_tree, "this checkout": ROOT}
            runs: dict[str, list[dict]] = {name: [] for name in trees}
            for r in range(args.rounds):
                for name, tree in trees.items():
                    cmd = [sys.executable, __file__, "--child", str(tree),
                           "--repeats", str(args.repeats), "--batch", str(args.batch),
                           "--new-tokens", str(args.new_tokens), "--preset", args.preset,
                           "--vocab-size", str(args.vocab_size), "--backend", args.backend,
                           *(["--quantize", args.quantize] if args.quantize else []),
                           *(["--in-place-kv"] if args.in_place_kv else [])]
                    env = {**os.environ, "PYTHONPATH": str(tree)}
                    out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                                         env=env, cwd=tree).stdout
                    runs[name].append(json.loads(out.strip().splitlines()[-1]))
                print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                    f"{n} {v[-1]['tok_s']:.1f}" for n, v in runs.items()), flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                            str(ref_tree)], check=False)

    (ref_name, ref_runs), (new_name, new_runs) = runs.items()
    what = args.backend + (f" {args.quantize}" if args.quantize else "") + (
        " in-place KV" if args.in_place_kv else "")
    print(f"\ngreedy decode ({what}), '{args.preset}', batch {args.batch}, "
          f"{args.new_tokens} new "
          f"tokens, {args.rounds} alternating rounds (best of {args.repeats} per process)")
    for name, rs in runs.items():
        tps = sorted(x["tok_s"] for x in rs)
        print(f"  {name:24s} median {statistics.median(tps):7.1f} tok/s   best {tps[-1]:7.1f}")
    pairs = list(zip(ref_runs, new_runs, strict=True))
    ratio = statistics.median(n["tok_s"] / r["tok_s"] for r, n in pairs)
    same = all(r["ids"] == n["ids"] for r, n in pairs)
    print(f"  this / ref: {ratio:.3f}x (median of per-round ratios); same tokens: {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
