"""Greedy decode speed: VesperLM through ``LLM.stream_batch`` vs HF transformers GPT-2.

Both models have random weights at the 'small' shape (hidden 512, 8 layers, 8 heads,
FFN 2048) and the same vocabulary (32000 by default: DESIGN.md's anchors, where GPT-2 of
this shape has 42 M parameters). Each run decodes ``--new-tokens`` tokens greedily after
a ``--prompt-len``-token prompt at batch 1 and 8 with the KV cache; tokens/s counts the
new tokens over the wall time of the whole call (prefill included). Ours runs the real
API path (requests, sampling code, UTF-8 text assembly), HF its ``model.generate`` with
``do_sample=False, use_cache=True``. Runs alternate between the two implementations and
the best of ``--repeats`` is kept (the median is reported too): on a shared machine
other processes slow some runs down, never speed one up. Ratios are given best to best,
and as the median over rounds of the ratio of a round's two runs ("paired"), which a
slow phase of the machine moves least.

    python benchmarks/generate.py --device cpu
    python benchmarks/generate.py --device cuda --json results.json

Prints a table and writes JSON (machine, command, versions, every run).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import vesper_sdk as vs
from vesper_sdk.inference import LLM, GenerationRequest, SamplingParams, TorchBackend


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine(device: torch.device) -> dict[str, Any]:
    """The suite's machine record (CPU, cores, load, GPU) plus torch's thread count."""
    from vesper_sdk.benchmarks import suite

    return {**suite.machine_info(str(device)), "torch_threads": torch.get_num_threads()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_ours(vocab: int, device: torch.device, dtype: torch.dtype,
               compile: bool | None = None, pipeline: bool | None = None,
               pair_ffn: bool | None = None) -> LLM:
    torch.manual_seed(0)
    cfg = vs.VesperConfig.from_preset("small", vocab_size=vocab, max_seq_len=1024)
    model = vs.VesperLM(cfg).to(device=device, dtype=dtype)
    # Any tokenizer will do: the prompts are token ids and EOS is ignored. Ids past its
    # vocabulary decode to no text, which is still the full per-token text path.
    tok = vs.VesperTokenizer.train([f"sample text number {i} for the benchmark" for i in
                                    range(200)], vocab_size=300, min_frequency=1)
    # Default: compiled on CUDA (vesper serve's default there; the figures say so), eager
    # on the CPU (vs.load's default); the CPU run also times the compiled step.
    if compile is None:
        compile = device.type == "cuda"
    return LLM(TorchBackend(model, compile=compile, pair_ffn=pair_ffn), tok, pipeline=pipeline)


def build_onnx(lm: LLM, folder: Path) -> LLM:
    """The same model and tokenizer exported to ONNX (fp32), as an OnnxModel."""
    from vesper_sdk.export import OnnxModel, export_onnx

    lm.backend.model.save_pretrained(folder / "model")
    lm.tokenizer.save(folder / "model" / "tokenizer.json")
    return OnnxModel(export_onnx(folder / "model", folder / "onnx", verbose=False))


def build_hf(vocab: int, device: torch.device, dtype: torch.dtype) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=512, n_layer=8, n_head=8, n_inner=2048, vocab_size=vocab,
                     n_positions=1024, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).to(device=device, dtype=dtype).eval()


def run_ours(lm: LLM, prompts: torch.Tensor, new_tokens: int) -> float:
    reqs = [GenerationRequest(prompt=p.tolist(),
                              params=SamplingParams(max_new_tokens=new_tokens, temperature=0.0,
                                                    ignore_eos=True)) for p in prompts]
    _sync(lm.device)
    t0 = time.perf_counter()
    n = sum(1 for _ in lm.stream_batch(reqs))
    _sync(lm.device)
    dt = time.perf_counter() - t0
    assert n == len(reqs) * new_tokens, n
    return dt


def run_hf(model: Any, prompts: torch.Tensor, new_tokens: int) -> float:
    ids = prompts.to(model.device)
    mask = torch.ones_like(ids)
    _sync(model.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, do_sample=False, use_cache=True,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             pad_token_id=0)
    _sync(model.device)
    dt = time.perf_counter() - t0
    assert out.shape[1] == ids.shape[1] + new_tokens
    return dt


def matvec_sweep(lm: LLM, parts_list: list[int | str], prompt_len: int, new_tokens: int,
                 repeats: int) -> list[dict[str, Any]]:
    """Decode speed and product bandwidth for each ``parts`` (0 = plain F.linear, "auto" =
    the count measured per weight shape, the default).

    Bandwidth: one pass of every attached product over a random vector, i.e. the bytes of
    every weight a decode step reads, without the rest of the step.
    """
    from vesper_sdk.inference.decode_swaps import (
        apply_cpu_decode,
        decode_products,
        remove_decode_swaps,
    )

    model = lm.backend.model
    prompts = torch.randint(0, model.config.vocab_size, (1, prompt_len),
                            generator=torch.Generator().manual_seed(0))
    rows = []
    for parts in parts_list:
        remove_decode_swaps(model)
        apply_cpu_decode(model, parts)
        products = decode_products(model)
        row: dict[str, Any] = {"parts": parts}
        if products:
            xs = [torch.randn(1, 1, p.in_features) for p in products]
            weights = [p.blocks if hasattr(p, "blocks") else p.weight
                       for p in products]
            nbytes = sum(w.numel() * w.element_size() for w in weights)
            with torch.inference_mode():
                for _ in range(3):
                    for p, x in zip(products, xs, strict=True):
                        p(x)
                t0 = time.perf_counter()
                for _ in range(10):
                    for p, x in zip(products, xs, strict=True):
                        p(x)
                dt = (time.perf_counter() - t0) / 10
            row.update(products_ms=dt * 1e3, products_gb_s=nbytes / dt / 1e9)
        run_ours(lm, prompts, 8)
        row["tok_s"] = max(new_tokens / run_ours(lm, prompts, new_tokens)
                           for _ in range(repeats))
        rows.append(row)
    remove_decode_swaps(model)  # back to the backend's own
    apply_cpu_decode(model, lm.backend.matvec_parts)
    print("parts  products ms  products GB/s  decode tok/s (batch 1)")
    for r in rows:
        prod = (f"{r['products_ms']:>11.2f}  {r['products_gb_s']:>13.1f}"
                if "products_ms" in r else f"{'-':>11}  {'-':>13}")
        print(f"{r['parts']:>5}  {prod}  {r['tok_s']:>12.1f}")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--vocab-size", type=int, default=32000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's, i.e. the cores)")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--no-compile", action="store_true",
                    help="CPU: skip the compiled decode step (its warm-up compiles for ~20 s "
                         "per batch size)")
    ap.add_argument("--onnx", action="store_true",
                    help="also export the same model to ONNX (fp32) and time it through "
                         "OnnxModel, the SDK's ONNX Runtime path (CPU only)")
    ap.add_argument("--plain", action="store_true",
                    help="also time 'vesper-plain', ours without the CUDA defaults "
                         "LLM(pipeline=...) and TorchBackend(pair_ffn=...): what those two "
                         "give, in the same run (for a GPU; on the CPU both are off anyway)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 16 tokens, 1 repeat")
    ap.add_argument("--matvec-sweep", nargs="*", default=None, metavar="PARTS",
                    type=lambda v: v if v == "auto" else int(v),
                    help="also time CPU decode with each block count of the threaded "
                         "matrix-vector products (inference.decode_swaps; 0 = plain F.linear, "
                         "auto = measured per weight shape, the default); default list "
                         "0 1 2 4 8 16 auto")
    ap.add_argument("--json", type=Path, default=None,
                    help="write the report here (default benchmarks/results/"
                         "generate-<device>.json)")
    args = ap.parse_args(argv)
    if args.quick:
        args.new_tokens, args.repeats = 16, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]

    impls: dict[str, tuple[Any, Any]] = {"vesper": (build_ours(args.vocab_size, device, dtype),
                                                    run_ours)}
    if device.type == "cpu" and not args.no_compile:
        # Same weights (same seed), decode step compiled: `vesper generate --compile`.
        impls["vesper-compiled"] = (build_ours(args.vocab_size, device, dtype, compile=True),
                                    run_ours)
    if args.plain:  # the same model, without the pipelined loop and the FFN pair
        impls["vesper-plain"] = (build_ours(args.vocab_size, device, dtype, pipeline=False,
                                            pair_ffn=False), run_ours)
    tmp = None
    if args.onnx and device.type == "cpu":
        import tempfile

        tmp = tempfile.TemporaryDirectory(prefix="vesper-bench-onnx-")
        impls["vesper-onnx"] = (build_onnx(impls["vesper"][0], Path(tmp.name)), run_ours)
    hf_error = None
    if not args.no_hf:
        try:
            impls["hf-gpt2"] = (build_hf(args.vocab_size, device, dtype), run_hf)
        except ImportError as exc:
            hf_error = f"transformers not installed ({exc}); pip install transformers"
            print(f"note: {hf_error}", file=sys.stderr)
    params = {name: sum(p.numel() for p in (obj.model if name == "vesper" else obj).parameters())
              for name, (obj, _) in impls.items() if name in ("vesper", "hf-gpt2")}

    gen = torch.Generator().manual_seed(0)
    times: dict[tuple[str, int], list[float]] = {}
    for b in args.batch_sizes:
        prompts = torch.randint(0, args.vocab_size, (b, args.prompt_len), generator=gen)
        for obj, fn in impls.values():  # warm-up (and compile, on CUDA)
            fn(obj, prompts, min(args.new_tokens, 8))
        for _ in range(args.repeats):
            for name, (obj, fn) in impls.items():
                times.setdefault((name, b), []).append(fn(obj, prompts, args.new_tokens))

    rows = []
    for b in args.batch_sizes:
        row: dict[str, Any] = {"batch": b}
        for name in impls:
            ts = times[(name, b)]
            row[name] = {"tok_s_best": b * args.new_tokens / min(ts),
                         "tok_s_median": b * args.new_tokens / statistics.median(ts),
                         "seconds": ts}
        if "hf-gpt2" in impls:
            row["ratio_best"] = row["vesper"]["tok_s_best"] / row["hf-gpt2"]["tok_s_best"]
            row["ratio_median"] = row["vesper"]["tok_s_median"] / row["hf-gpt2"]["tok_s_median"]
            # Each round's two runs are seconds apart: the median of their ratios is the
            # figure a slow phase of a shared machine moves least.
            hf = times[("hf-gpt2", b)]
            row["ratio_paired_median"] = statistics.median(
                h / v for v, h in zip(times[("vesper", b)], hf, strict=True))
            for other in ("vesper-compiled", "vesper-onnx", "vesper-plain"):
                if other in impls:
                    row[f"ratio_{other.split('-')[1]}_best"] = (
                        row[other]["tok_s_best"] / row["hf-gpt2"]["tok_s_best"])
                    row[f"ratio_{other.split('-')[1]}_paired_median"] = statistics.median(
                        h / v for v, h in zip(times[(other, b)], hf, strict=True))
        rows.append(row)

    head = (f"greedy decode, 'small' shape, vocab {args.vocab_size}, prompt {args.prompt_len}, "
            f"{args.new_tokens} new tokens, {args.dtype}, {device}, "
            f"{torch.get_num_threads()} threads, best (median) of {args.repeats}")
    print(head)
    names = list(impls)
    print(f"{'batch':>5}  " + "  ".join(f"{n + ' tok/s':>22}" for n in names)
          + ("  ratio vesper/hf" if "hf-gpt2" in impls else ""))
    for row in rows:
        cells = "  ".join(f"{row[n]['tok_s_best']:>10.1f} ({row[n]['tok_s_median']:>7.1f})"
                          .rjust(22) for n in names)
        ratio = (f"  {row['ratio_best']:>5.2f}x ({row['ratio_median']:.2f}x, "
                 f"paired {row['ratio_paired_median']:.2f}x)" if "ratio_best" in row else "")
        for other in ("compiled", "onnx", "plain"):
            if f"ratio_{other}_best" in row:
                ratio += (f"  {other}/hf {row[f'ratio_{other}_best']:.2f}x "
                          f"(paired {row[f'ratio_{other}_paired_median']:.2f}x)")
        print(f"{row['batch']:>5}  {cells}{ratio}")
    print("parameters: " + ", ".join(f"{n} {p / 1e6:.1f} M" for n, p in params.items()))
    sweep = None
    if args.matvec_sweep is not None and device.type == "cpu":
        sweep = matvec_sweep(impls["vesper"][0], args.matvec_sweep or [0, 1, 2, 4, 8, 16, "auto"],
                             args.prompt_len, args.new_tokens, args.repeats)

    report = {
        "benchmark": "generate",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": machine(device),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": _version("transformers"), "vesper_sdk": vs.__version__},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "parameters": params,
        "hf_error": hf_error,
        "rows": rows,
        "matvec_sweep": sweep,
    }
    path = args.json or Path("benchmarks/results") / f"generate-{device.type}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    if tmp is not None:
        impls.clear()
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
