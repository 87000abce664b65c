"""Where vesper's ONNX decode step spends the time the peer's Llama does not: an ablation.

VesperLM computes things a Llama of the same shape does not: FlyLoRA's routed low-rank
branch in each feed-forward, ERA's softplus beside the GELU, and the MetaHead (the logit
features over the vocabulary, its hidden layer, the answer row). This exports the 'small'
shape (as ``decode_peers.py`` builds it) at one precision with each of them taken out in
turn, and all three together, and times them in alternating rounds beside
onnxruntime-genai's export of the same-shape Llama (the fastest peer at int4 and fp32):
what each part costs per token, and what is left once none of them is computed. The
ablated exports are measurement only: the model without them is not VesperLM.

    .venv-peers/bin/python benchmarks/decode_breakdown.py [--precision int4] [--batches 1,8]

Needs ``.venv-peers`` (``make .venv-peers/.installed``): onnxruntime-genai, transformers
and sentencepiece build the peer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F

import vesper_sdk as vs
from vesper_sdk.benchmarks import decode_peers  # the same models, the peer's own converter
from vesper_sdk.benchmarks.decode_peers_worker import decoder  # each path's own loop
from vesper_sdk.benchmarks.suite import cpu_model, git_info, now_iso
from vesper_sdk.model.metahead import MetaHead
from vesper_sdk.model.vesper import ERA

# name -> (without FlyLoRA, without ERA's softplus, without the MetaHead)
VARIANTS = {"vesper": (False, False, False), "no FlyLoRA": (True, False, False),
            "GELU only (no softplus)": (False, True, False), "no MetaHead": (False, False, True),
            "none of the three": (True, True, True)}


def _zero_meta(self: MetaHead, h: torch.Tensor, logits: torch.Tensor,
               block_outputs: list[torch.Tensor] | None,
               statistics: torch.Tensor | None = None) -> torch.Tensor:
    return h[..., :6 if block_outputs is not None else 5] * 0.0


def export_variant(work: Path, name: str, precision: str, seed: int) -> Path:
    """The 'small' vesper model, with the parts ``name`` leaves out, exported in place."""
    no_lora, no_softplus, no_meta = VARIANTS[name]
    torch.manual_seed(seed)
    kw = {"flylora_rank": 0} if no_lora else {}
    cfg = vs.VesperConfig.from_preset("small", vocab_size=decode_peers.SHAPE["vocab_size"], **kw)
    model = vs.VesperLM(cfg)
    with torch.no_grad():  # as decode_peers: give the FlyLoRA branch a say
        for layer in model.flylora_layers():
            layer.lora_B.normal_(0, 0.02)
    slug = name.replace(" ", "-").replace("(", "").replace(")", "")
    src, out = work / f"src-{slug}", work / f"{slug}-{precision}"
    model.save_pretrained(src)
    vs.VesperTokenizer.train([f"decode line {i}" for i in range(100)], vocab_size=300,
                             min_frequency=1).save(src)
    with contextlib.ExitStack() as patches:  # the export checks itself against these
        if no_softplus:
            patches.enter_context(mock.patch.object(ERA, "forward",
                                                    lambda self, x: F.gelu(x)))
        if no_meta:
            patches.enter_context(mock.patch.object(MetaHead, "forward", _zero_meta))
        vs.export_onnx(src, out, quantize=None if precision == "fp32" else precision,
                       verbose=False, in_place_kv=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precision", default="int4", choices=("fp32", "int8", "int4"))
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _, hdir = decode_peers.make_models(work, args.seed)
        ns = argparse.Namespace(threads=args.threads)
        peer = "ort-genai-" + args.precision
        paths = {"peer": decode_peers.convert(peer, work, work, hdir, ns)}
        for name in VARIANTS:
            print(f"exporting '{name}' ({args.precision})", flush=True)
            paths[name] = export_variant(work, name, args.precision, args.seed)
        run = {name: decoder("onnxruntime-genai", args.precision, path, args.threads, False)
               if name == "peer" else
               decoder("vesper", f"onnx-{args.precision}-inplace", path, args.threads, False)
               for name, path in paths.items()}
        results: dict[int, dict[str, list[float]]] = {}
        for batch in [int(b) for b in args.batches.split(",")]:
            prompts = [[5 + (i * 7 + j) % 250 for j in range(args.prompt_len)]
                       for i in range(batch)]
            for f in run.values():  # warm-up
                f(prompts, 8)
            rates: dict[str, list[float]] = {k: [] for k in run}
            for _ in range(args.rounds):
                for k, f in run.items():
                    t = time.perf_counter()
                    f(prompts, args.new_tokens)
                    rates[k].append(args.new_tokens * batch / (time.perf_counter() - t))
            results[batch] = rates
    git = git_info()
    lines = [f"decode tokens/s, ONNX {args.precision} in place, 'small' shape, {args.threads} "
             f"threads, {cpu_model()}; median of {args.rounds} alternating rounds (x peer: "
             f"median of the per-round ratios to {peer}); {now_iso()}, commit "
             f"{git.get('commit', '?')[:12]}", "",
             "| batch | path | median tok/s | ms per step | x peer |",
             "|---|---|---|---|---|"]
    report: dict[str, Any] = {"precision": args.precision, "cpu": cpu_model(),
                              "date": now_iso(), "git": git,
                              "threads": args.threads, "rounds": args.rounds,
                              "command": "python benchmarks/decode_breakdown.py " +
                              " ".join(argv if argv is not None else sys.argv[1:]),
                              "batches": {}}
    for batch, rates in results.items():
        rows = {}
        for k, r in rates.items():
            ratio = statistics.median(a / b for a, b in zip(r, rates["peer"], strict=True))
            med = statistics.median(r)
            label = peer if k == "peer" else k
            rows[label] = {"tok_s": med, "ms_per_step": 1e3 * batch / med, "x_peer": ratio}
            lines.append(f"| {batch} | {label} | {med:.1f} | {1e3 * batch / med:.3f} | "
                         f"{ratio:.3f} |")
        report["batches"][str(batch)] = rows
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        args.json.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
