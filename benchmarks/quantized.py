"""Quantization benchmark: perplexity, size and decode speed of every deployable variant.

    python benchmarks/quantized.py MODEL_DIR [--data FILE|builtin:skills] [--json OUT]

Measures, in one run on this machine: fp32 PyTorch, bitsandbytes int8 and nf4, ONNX
Runtime fp32, int8 and int4, beside Hugging Face GPT-2 of the same shape with random
weights (when transformers is installed). Prints the table and writes JSON. The same
report is ``vesper quantize --report MODEL_DIR``, which calls ``quantization_report``.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from vesper_sdk.atomic import atomic_write_file
from vesper_sdk.config import VesperConfig
from vesper_sdk.eval.scorer import encode_examples, held_out_records, score_labels
from vesper_sdk.export.onnx_export import export_onnx
from vesper_sdk.export.runner import OnnxBackend
from vesper_sdk.folder import CONFIG_NAME, WEIGHTS_NAME
from vesper_sdk.inference import LLM, GenerationRequest, SamplingParams, TorchBackend
from vesper_sdk.model import VesperLM
from vesper_sdk.quantization import QuantizeError, load_quantized, quantize
from vesper_sdk.quantization.api import read_config
from vesper_sdk.tokenizer import TOKENIZER_NAME, VesperTokenizer


def eval_token_docs(tokenizer: Any, data: str | Path, max_tokens: int = 8192,
                    ) -> list[tuple[list[int], list[int]]]:
    """Held-out documents as (token ids, score mask) pairs, up to ``max_tokens`` in all.

    ``builtin:skills``: the skills corpus's *held-out* chats (never in its training
    split), answer included, through the chat template. A .txt/.jsonl file (or folder) is
    read with ``vesper_sdk.training.data.DataSource``, the reader training uses. The mask marks
    the tokens perplexity is taken over, those training learns: every token after BOS of
    a text, the assistant's replies of a chat (a chat model is never trained to predict
    its user's words, so their perplexity says nothing about it).
    """
    docs: list[tuple[list[int], list[int]]] = []
    total = 0
    for record in held_out_records(str(data)):
        docs += encode_examples(tokenizer, [record])
        total += len(docs[-1][0]) if docs else 0
        if total >= max_tokens:
            break
    if not docs:
        raise QuantizeError(f"--data {data} holds no text to evaluate on")
    return docs


def _token_chunks(docs: Sequence[tuple[Sequence[int], Sequence[int]]], seq_len: int,
                  max_tokens: int) -> list[tuple[list[int], list[int]]]:
    # Documents are packed into one stream (ids and score mask) cut into seq_len windows.
    ids = [t for d, _ in docs for t in d][:max_tokens]
    mask = [m for _, ms in docs for m in ms][:max_tokens]
    return [(ids[i:i + seq_len], mask[i:i + seq_len]) for i in range(0, len(ids) - 1, seq_len)
            if len(ids[i:i + seq_len]) > 1 and any(mask[i + 1:i + seq_len])]


@torch.no_grad()
def backend_perplexity(backend: Any, chunks: Sequence[tuple[Sequence[int], Sequence[int]]],
                       ) -> float:
    """Perplexity of a DecodeBackend (teacher forcing, past length 0) over token chunks.

    Each chunk is (ids, mask); token i is scored where mask[i] is set (i >= 1).
    """
    nll, count = 0.0, 0
    for chunk, chunk_mask in chunks:
        ids = torch.tensor([list(chunk)], dtype=torch.long)
        s = ids.shape[1]
        attention = torch.ones(1, s, dtype=torch.long)
        pos = torch.arange(s).unsqueeze(0)
        out = backend.forward(ids.to(backend.device), attention.to(backend.device),
                              pos.to(backend.device), None)
        scored = torch.tensor(list(chunk_mask[1:]), dtype=torch.bool)
        token_lp = score_labels(out.logits[0, :-1], ids[0, 1:].to(out.logits.device)).logprob
        nll -= token_lp.cpu()[scored].sum().item()
        count += int(scored.sum())
    return math.exp(nll / max(count, 1))


def api_tokens_per_s(backend: Any, tokenizer: Any, prompt: Sequence[int], new_tokens: int,
                     ) -> float:
    """Greedy decode speed through the user-facing API (``LLM.stream_batch``), batch 1:
    sampling code, per-token logprob and text included, the prompt's prefill too (as in
    HF's ``generate``, the baseline this is compared with)."""
    llm = LLM(backend, tokenizer)
    request = GenerationRequest(prompt=list(prompt), params=SamplingParams(
        max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True))
    start = time.perf_counter()
    n = sum(1 for _ in llm.stream_batch([request]))
    return n / (time.perf_counter() - start)


@torch.no_grad()
def greedy_tokens_per_s(backend: Any, prompt: Sequence[int], new_tokens: int) -> float:
    """Greedy decode speed of a DecodeBackend, batch 1, KV cache, prompt excluded."""
    dev = backend.device
    ids = torch.tensor([list(prompt)], dtype=torch.long, device=dev)
    n = ids.shape[1]
    # The whole mask once, a growing view of it per step (as LLM's decode loop does).
    mask = torch.ones((1, n + new_tokens), dtype=torch.long, device=dev)
    pos = torch.arange(n, device=dev).unsqueeze(0)
    out = backend.forward(ids, mask[:, :n], pos, None)
    past = out.past_key_values
    pos = pos[:, -1:]
    start = time.perf_counter()
    for t in range(n + 1, n + new_tokens + 1):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True).to(dev)
        pos = pos + 1
        out = backend.forward(nxt, mask[:, :t], pos, past)
        past = out.past_key_values
    return new_tokens / (time.perf_counter() - start)


class _Gpt2Baseline:
    """HF transformers GPT-2 of the same shape (random weights), greedy, batch 1."""

    def __init__(self, config: VesperConfig, prompt_len: int) -> None:
        import transformers  # optional and heavy: only this baseline needs it
        from transformers import GPT2Config, GPT2LMHeadModel

        # bos/eos inside the vocabulary (GPT-2's default 50256 is not, at our vocab sizes).
        cfg = GPT2Config(vocab_size=config.vocab_size, n_positions=config.max_seq_len,
                         n_embd=config.hidden_size, n_layer=config.num_layers,
                         n_head=config.num_heads, n_inner=config.ffn_hidden_size,
                         bos_token_id=0, eos_token_id=0)
        torch.manual_seed(0)
        self.model = GPT2LMHeadModel(cfg).eval()
        self.ids = torch.randint(0, config.vocab_size, (1, prompt_len))
        # transformers 5 renamed past_key_values to cache (the same object).
        self.key = ("cache" if "cache" in inspect.signature(self.model.forward).parameters
                    else "past_key_values")
        self.info: dict[str, Any] = {"transformers": transformers.__version__,
                                     "params_m": self.model.num_parameters() / 1e6,
                                     "generate_tok_s": 0.0, "loop_tok_s": 0.0}

    def measure(self, new_tokens: int) -> None:
        """One timing of each path; the best over calls is kept."""
        ids, mask = self.ids, torch.ones_like(self.ids)
        # (a) the user-facing API: model.generate, greedy, forced to run all new_tokens.
        start = time.perf_counter()
        self.model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        self._best("generate_tok_s", new_tokens / (time.perf_counter() - start))
        # (b) a bare loop over forward() with the KV cache, like ours: no generate() cost.
        with torch.inference_mode():
            out = self.model(ids, use_cache=True)
            start = time.perf_counter()
            for _ in range(new_tokens):
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                out = self.model(nxt, use_cache=True, **{self.key: out[self.key]})
            self._best("loop_tok_s", new_tokens / (time.perf_counter() - start))

    def _best(self, key: str, value: float) -> None:
        self.info[key] = max(self.info[key], value)


def _weights_mb(path: Path) -> float:
    """Size of a folder's weight files (model.onnx + external data), config/tokenizer aside."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()
               and p.name not in (TOKENIZER_NAME, CONFIG_NAME)) / 1e6


def default_report_path(model_dir: str | Path) -> Path:
    """``runs/a/model`` -> ``runs/a/model-quantize-report.json``: beside the folder, not in it."""
    model_dir = Path(model_dir).resolve()
    return model_dir.with_name(f"{model_dir.name}-quantize-report.json")


def quantization_report(model_dir: str | Path, data: str | None = None,
                        json_out: str | Path | None = "",
                        max_tokens: int = 8192, seq_len: int = 256, prompt_len: int = 32,
                        new_tokens: int = 128, block_size: int = 32,
                        variants: Sequence[str] | None = None, rounds: int = 2,
                        threads: int | None = None,
                        print_fn: Callable[[str], None] = print) -> dict[str, Any]:
    """Perplexity, size and greedy decode speed of fp32 / bnb int8 / bnb nf4 / ONNX fp32 /
    ONNX int8 / ONNX int4, measured in one run, beside HF GPT-2 of the same shape.

    Quantized variants are written to a temporary folder that is removed afterwards.
    Decode speed: greedy, batch 1, ``prompt_len`` random prompt tokens then ``new_tokens``
    steps, best of ``rounds`` interleaved rounds; the 1-minute load average before and
    after goes into the JSON, since other work on the machine slows every figure.
    ``threads`` sets both torch's and ONNX Runtime's intra-op threads (default: torch's
    own setting, and OnnxBackend's: one thread below 10 M parameters, else one per
    physical core); on a busy machine 1 thread gives steadier figures, as multi-threaded
    kernels stall when their threads are preempted. Each variant is timed twice: a bare
    greedy loop over its backend (compared with a bare GPT-2 loop) and through
    ``LLM.stream_batch`` (compared with GPT-2's ``generate``).
    Returns the report dict and writes it as JSON to ``json_out`` (``""``: beside the model
    folder, as ``MODEL_DIR-quantize-report.json``; None: nowhere).
    """
    model_dir = Path(model_dir)
    cfg_data = read_config(model_dir)
    if cfg_data.get("quantization"):
        raise QuantizeError(f"{model_dir} is already quantized: report on the fp32 folder")
    if data is None:
        data = "builtin:skills"
    tokenizer = VesperTokenizer.from_file(model_dir)
    fp_model = VesperLM.from_pretrained(model_dir).eval()
    chunks = _token_chunks(eval_token_docs(tokenizer, data, max_tokens),
                           min(seq_len, fp_model.config.max_seq_len), max_tokens)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, fp_model.config.vocab_size, (prompt_len,), generator=gen).tolist()
    variants = list(variants or ["fp32", "bnb-int8", "bnb-nf4", "onnx-fp32", "onnx-int8",
                                 "onnx-int4"])
    fp_size = (model_dir / WEIGHTS_NAME).stat().st_size / 1e6
    rows: list[dict[str, Any]] = []
    backends: dict[str, Any] = {}
    load_before = os.getloadavg()
    torch_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="vesper-report-") as tmp_name:
        tmp = Path(tmp_name)
        for name in variants:
            print_fn(f"... {name}: building, perplexity")
            if name == "fp32":
                backend, size = TorchBackend(fp_model), fp_size
            elif name.startswith("bnb-"):
                qdir = quantize(model_dir, name.split("-", 1)[1], tmp / name, verbose=False)
                backend = TorchBackend(load_quantized(qdir, device="cpu"))
                size = (qdir / WEIGHTS_NAME).stat().st_size / 1e6
            elif name.startswith("onnx-"):
                q = name.split("-", 1)[1]
                odir = export_onnx(model_dir, tmp / name, quantize=None if q == "fp32" else q,
                                   block_size=block_size, verbose=False)
                backend, size = OnnxBackend(odir, threads=threads), _weights_mb(odir)
            else:
                raise QuantizeError(f"unknown report variant {name!r}")
            backends[name] = backend
            rows.append({"variant": name, "perplexity": backend_perplexity(backend, chunks),
                         "size_mb": size, "size_ratio": size / fp_size, "decode_tok_s": 0.0,
                         "api_tok_s": 0.0})
        gpt2 = None
        if importlib.util.find_spec("transformers") is not None:
            gpt2 = _Gpt2Baseline(fp_model.config, prompt_len)
            gpt2.measure(4)  # warm-up
        for backend in backends.values():
            greedy_tokens_per_s(backend, prompt, 8)  # warm-up (allocations, ORT kernels)
            api_tokens_per_s(backend, tokenizer, prompt, 8)
        # Speed in interleaved rounds, best of each: on a shared machine a change of load
        # then hits every variant alike instead of whichever ran at that moment.
        for i in range(rounds):
            print_fn(f"... decode speed, round {i + 1}/{rounds}")
            for row in rows:
                backend = backends[row["variant"]]
                tps = greedy_tokens_per_s(backend, prompt, new_tokens)
                row["decode_tok_s"] = max(row["decode_tok_s"], tps)
                tps = api_tokens_per_s(backend, tokenizer, prompt, new_tokens)
                row["api_tok_s"] = max(row["api_tok_s"], tps)
            if gpt2 is not None:
                gpt2.measure(new_tokens)
        backends.clear()
    torch.set_num_threads(torch_threads)
    gpt2_info = gpt2.info if gpt2 is not None else None
    base_ppl = rows[0]["perplexity"] if rows and rows[0]["variant"] == "fp32" else None
    for r in rows:
        r["perplexity_delta_pct"] = (100 * (r["perplexity"] / base_ppl - 1)
                                     if base_ppl else None)
        if gpt2_info:  # like for like: API against generate(), bare loop against bare loop
            r["speedup_vs_gpt2_generate"] = r["api_tok_s"] / gpt2_info["generate_tok_s"]
            r["speedup_vs_gpt2_loop"] = r["decode_tok_s"] / gpt2_info["loop_tok_s"]
    report = {
        "model_dir": str(model_dir), "config": repr(fp_model.config),
        "params_m": fp_model.num_parameters() / 1e6, "data": str(data),
        "eval_tokens": sum(sum(m[1:]) for _, m in chunks), "prompt_len": prompt_len,
        "new_tokens": new_tokens, "rounds": rounds,
        "threads": threads or f"torch {torch_threads}, onnxruntime 1 below "
                              "10 M parameters, else physical cores",
        "load_average": [round(x, 2) for x in (*load_before, *os.getloadavg())],
        "cpu_count": os.cpu_count(), "rows": rows, "gpt2": gpt2_info,
        "torch": torch.__version__,
    }
    print_fn(format_report(report))
    if json_out == "":
        json_out = default_report_path(model_dir)
    if json_out:
        atomic_write_file(json_out, json.dumps(report, indent=2).encode())
        print_fn(f"wrote {json_out}")
    return report


def format_report(report: dict[str, Any]) -> str:
    """The report as a fixed-width table."""
    load = report.get("load_average") or [float("nan")] * 6
    lines = [f"{report['config']}  eval tokens {report['eval_tokens']}  "
             f"decode: greedy, batch 1, {report['prompt_len']}-token prompt, "
             f"{report['new_tokens']} new tokens, best of {report.get('rounds', 1)} rounds, "
             f"threads: {report.get('threads')}; "
             f"load average {load[0]:.1f} -> {load[3]:.1f} on {report.get('cpu_count')} CPUs",
             f"{'variant':<11} {'perplexity':>10} {'d ppl':>7} {'size MB':>8} {'ratio':>6} "
             f"{'loop tok/s':>10} {'x gpt2 loop':>11} {'API tok/s':>9} {'x gpt2 gen':>10}"]
    for r in report["rows"]:
        delta = r.get("perplexity_delta_pct")
        lines.append(
            f"{r['variant']:<11} {r['perplexity']:>10.3f} "
            f"{(f'{delta:+.2f}%' if delta is not None else '-'):>7} {r['size_mb']:>8.2f} "
            f"{r['size_ratio']:>5.2f}x {r['decode_tok_s']:>10.1f} "
            f"{r.get('speedup_vs_gpt2_loop', float('nan')):>10.2f}x "
            f"{r.get('api_tok_s', float('nan')):>9.1f} "
            f"{r.get('speedup_vs_gpt2_generate', float('nan')):>9.2f}x")
    g = report.get("gpt2")
    if g:
        lines.append(f"HF GPT-2 same shape ({g['params_m']:.1f}M, random weights, transformers "
                     f"{g['transformers']}): generate() {g['generate_tok_s']:.1f} tok/s, "
                     f"bare forward loop {g['loop_tok_s']:.1f} tok/s")
        lines.append("loop: a bare greedy loop over the backend (vs GPT-2's bare loop); API: "
                     "LLM.stream_batch, what vs.load / OnnxModel users get (vs generate())")
    else:
        lines.append("HF GPT-2 baseline: transformers is not installed (pip install "
                     "transformers)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="a full-precision model folder")
    parser.add_argument("--data", default="builtin:skills",
                        help="held-out texts: .txt, .jsonl or builtin:skills")
    parser.add_argument("--json", default=str(Path(__file__).parent / "results"
                                              / "quantized.json"), help="JSON output")
    parser.add_argument("--max-tokens", type=int, default=8192,
                        help="perplexity over at most this many tokens")
    parser.add_argument("--new-tokens", type=int, default=128,
                        help="tokens decoded for the speed figure (32-token prompt)")
    parser.add_argument("--block-size", type=int, default=32, help="ONNX int4 block size")
    args = parser.parse_args(argv)
    quantization_report(args.model_dir, data=args.data, json_out=args.json,
                        max_tokens=args.max_tokens, new_tokens=args.new_tokens,
                        block_size=args.block_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
