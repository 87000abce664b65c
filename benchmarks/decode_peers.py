"""Greedy decode on the CPU: vesper's paths beside onnxruntime-genai, llama.cpp and CTranslate2.

    make peers-check                 # its own venv (.venv-peers), then this script
    .venv-peers/bin/python benchmarks/decode_peers.py --json out.json [--quick]

Every model has the 'small' shape (hidden 512, 8 layers, 8 heads, FFN 2048, vocab 32,000,
tied embeddings) and random weights made here: nothing is downloaded. vesper runs its own
VesperLM (``vs.load``: PyTorch eager and ``compile=True``; ``vs.export_onnx`` at fp32, int8
and int4, run through ``load_onnx``); the peers run a Hugging Face ``LlamaForCausalLM`` of the
same shape, converted by each one's own tool: onnxruntime-genai's model builder (fp32, int8,
int4; accuracy level 4), llama.cpp's ``convert_hf_to_gguf.py`` then ``llama_model_quantize``
(f32, q8_0, q4_0; run through llama-cpp-python's low-level batch API) and CTranslate2's
``ct2-transformers-converter`` (float32, int8).

Each path runs in its own worker process (loaded once, warmed up once per batch size) and
the workers take turns: every round times each path once at each batch size, the same
random-token prompts, greedy, EOS ignored, prefill included. Reported per path and batch:
median and best tok/s, the median (and range) over rounds of its tok/s over the reference
path's in the same round, the weight bytes it reads per decode step (every weight but the
input embedding table, which is only gathered from), and what that makes in GB/s against
the machine's memory bandwidth (a sum over a 2 GiB buffer with the same threads, best of 5:
a floor, which a fast engine can pass). A peer that is not installed, or whose conversion,
load or run fails, is reported with its error. Figures need an otherwise idle machine: two
processes on 2 cores slow each other's thread barriers tenfold (the load average before and
after is kept in the JSON).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from vesper_sdk.benchmarks.suite import cpu_model

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().with_name("decode_peers_worker.py")  # one path per process
SHAPE = dict(hidden_size=512, num_layers=8, num_heads=8, ffn_hidden_size=2048, vocab_size=32000)
# name -> (family, variant); families are what installs (and fails) together.
PATHS: dict[str, tuple[str, str]] = {
    "vesper-eager": ("vesper", "eager"), "vesper-compiled": ("vesper", "compiled"),
    "vesper-onnx-fp32": ("vesper", "onnx-fp32"), "vesper-onnx-int8": ("vesper", "onnx-int8"),
    "vesper-onnx-int4": ("vesper", "onnx-int4"),
    # The in-place KV export (GroupQueryAttention writing the cache buffers in place).
    **{f"vesper-onnx-{q}-inplace": ("vesper", f"onnx-{q}-inplace")
       for q in ("fp32", "int8", "int4")},
    # The same in-place exports run by onnxruntime-genai's C++ loop (export.genai): the
    # runtime's share of the gap, apart from the graph's.
    **{f"vesper-onnx-{q}-inplace-genai": ("vesper-in-genai", f"onnx-{q}-inplace")
       for q in ("fp32", "int8", "int4")},
    # vesper's API over them with runtime="genai" (export.genai_loop): that loop with each
    # token's log-probability and MetaHead outputs read, what a user of vesper gets.
    **{f"vesper-onnx-{q}-runtime-genai": ("vesper-runtime-genai", f"onnx-{q}-inplace")
       for q in ("fp32", "int8", "int4")},
    **{f"ort-genai-{q}": ("onnxruntime-genai", q) for q in ("fp32", "int8", "int4")},
    **{f"llama.cpp-{q}": ("llama.cpp", q) for q in ("f32", "q8_0", "q4_0")},
    "ct2-fp32": ("ctranslate2", "float32"), "ct2-int8": ("ctranslate2", "int8"),
}
# The families that are vesper's API (what a user of vesper runs).
OURS = ("vesper", "vesper-runtime-genai")
# family -> (import name, pip name: its install log is .venv-peers/install-<pip name>.log)
PACKAGES = {"onnxruntime-genai": ("onnxruntime_genai", "onnxruntime-genai"),
            "vesper-in-genai": ("onnxruntime_genai", "onnxruntime-genai"),
            "vesper-runtime-genai": ("onnxruntime_genai", "onnxruntime-genai"),
            "llama.cpp": ("llama_cpp", "llama-cpp-python"),
            "ctranslate2": ("ctranslate2", "ctranslate2")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7, help="alternating rounds (default 7)")
    ap.add_argument("--batches", default="1,8", help="batch sizes, comma-separated (1,8)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2, help="threads every path may use (2)")
    ap.add_argument("--paths", default="", help="comma-separated subset of: " + ", ".join(PATHS))
    ap.add_argument("--reference", default="vesper-eager",
                    help="the path each round's ratios divide by (default vesper-eager)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 2 rounds, batch 1, 16 new tokens")
    ap.add_argument("--work-dir", default="", help="keep the models here (default: temporary)")
    ap.add_argument("--llama-converter", default="",
                    help="llama.cpp's convert_hf_to_gguf.py (default: <venv>/llama.cpp/)")
    ap.add_argument("--json", default="", help="write the results here")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.batches, args.new_tokens = 2, "1", 16
    args.batch_sizes = [int(b) for b in str(args.batches).split(",") if b.strip()]
    args.path_names = [p.strip() for p in args.paths.split(",") if p.strip()] or list(PATHS)
    unknown = [p for p in args.path_names if p not in PATHS]
    if unknown:
        ap.error(f"unknown path(s) {', '.join(unknown)}: choose from {', '.join(PATHS)}")
    if args.rounds < 1 or not args.batch_sizes or min(args.batch_sizes) < 1:
        ap.error("--rounds and every batch size must be at least 1")
    return args


# ------------------------------------------------------------------ pure parts (tested)
def onnx_read_bytes(initializers: dict[str, int], nodes: list[tuple[str, list[str]]]) -> int:
    """Bytes of the initializers a decode step reads: all but tables only gathered from."""
    gathered = {ins[0] for op, ins in nodes if op.startswith("Gather") and ins}
    other = {i for op, ins in nodes for k, i in enumerate(ins)
             if not (op.startswith("Gather") and k == 0)}
    return sum(n for name, n in initializers.items() if name not in gathered or name in other)


def gguf_read_bytes(tensors: dict[str, int]) -> int:
    """GGUF: token_embd is gathered from, unless it is also the output (no output.weight)."""
    skip = "token_embd" if "output.weight" in tensors else None
    return sum(n for name, n in tensors.items() if skip is None or not name.startswith(skip))


def ct2_read_bytes(variables: dict[str, int], aliases: dict[str, str]) -> int:
    """CTranslate2: embeddings are gathered from, unless a projection aliases them."""
    used = {target for alias, target in aliases.items() if "embeddings" not in alias}
    return sum(n for name, n in variables.items() if "embeddings" not in name or name in used)


def summarize(runs: dict[str, dict[int, list[float]]], reference: str, batch_sizes: list[int],
              weight_bytes: dict[str, int], read_gbs: float | None) -> list[dict[str, Any]]:
    """One row per (batch, path) with figures: median/best tok/s, per-round ratios against
    ``reference`` (rounds where both ran), weight GB/s and its share of ``read_gbs``."""
    rows = []
    for b in batch_sizes:
        ref = runs.get(reference, {}).get(b, [])
        for name, by_batch in runs.items():
            tps = by_batch.get(b, [])
            if not tps:
                continue
            row: dict[str, Any] = {"path": name, "batch": b, "rounds": len(tps),
                                   "tok_s_median": round(statistics.median(tps), 2),
                                   "tok_s_best": round(max(tps), 2)}
            ratios = [x / r for x, r in zip(tps, ref, strict=False) if r > 0]
            if ratios and name != reference:
                row.update(ratio_median=round(statistics.median(ratios), 3),
                           ratio_min=round(min(ratios), 3), ratio_max=round(max(ratios), 3))
            wb = weight_bytes.get(name)
            if wb:
                row["weight_mb"] = round(wb / 1e6, 1)
                gbs = row["tok_s_median"] / b * wb / 1e9  # one read of the weights per step
                row["weight_gbs"] = round(gbs, 2)
                if read_gbs:
                    row["pct_of_bw"] = round(100 * gbs / read_gbs, 1)
                    row["bw_bound_tok_s"] = round(read_gbs * 1e9 / wb * b, 1)
            rows.append(row)
    return rows


def precision(name: str) -> str:
    """fp32, int8 or int4: the weights' precision of a path."""
    variant = PATHS[name][1]
    return ("int4" if "int4" in variant or "q4" in variant else
            "int8" if "int8" in variant or "q8" in variant else "fp32")


def against_peers(runs: dict[str, dict[int, list[float]]], batch_sizes: list[int],
                  ) -> list[dict[str, Any]]:
    """Per precision and batch: vesper's fastest path against the fastest peer (by median),
    as the median [range] of their per-round ratios (rounds alternate, so a slow minute
    of the machine slows both sides of a ratio). vesper's paths are those of its API; the
    bare onnxruntime-genai loop over its export (no token records, no MetaHead outputs
    read) is a measurement, not one of them."""
    out = []
    for b in batch_sizes:
        for prec in ("fp32", "int8", "int4"):
            med = {n: statistics.median(v[b]) for n, v in runs.items()
                   if v.get(b) and precision(n) == prec}
            ours = [n for n in med if PATHS[n][0] in OURS]
            peers = [n for n in med if not PATHS[n][0].startswith("vesper")]
            if not ours or not peers:
                continue
            v, p = max(ours, key=med.__getitem__), max(peers, key=med.__getitem__)
            ratios = [x / y for x, y in zip(runs[v][b], runs[p][b], strict=False) if y > 0]
            out.append({"precision": prec, "batch": b, "vesper": v, "peer": p,
                        "ratio_median": round(statistics.median(ratios), 3),
                        "ratio_min": round(min(ratios), 3), "ratio_max": round(max(ratios), 3)})
    return out


def render_against_peers(rows: list[dict[str, Any]]) -> str:
    lines = ["| precision | batch | vesper's fastest | fastest peer | vesper / peer, per round "
             "(median [range]) |", "|---|---|---|---|---|"]
    lines += [f"| {r['precision']} | {r['batch']} | {r['vesper']} | {r['peer']} | "
              f"{r['ratio_median']:.2f} [{r['ratio_min']:.2f}-{r['ratio_max']:.2f}] |"
              for r in rows]
    return "\n".join(lines)


def render_table(rows: list[dict[str, Any]], paths: dict[str, dict[str, Any]],
                 reference: str) -> str:
    """Markdown: the figures, then each path that did not run, with its error."""
    head = ["path", "batch", "median tok/s", "best tok/s", f"x {reference} (median [range])",
            "weights MB/step", "weights GB/s", "% of bandwidth"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ratio = (f"{r['ratio_median']:.2f} [{r['ratio_min']:.2f}-{r['ratio_max']:.2f}]"
                 if "ratio_median" in r else ("1 (reference)" if r["path"] == reference else ""))
        cells = [r["path"], r["batch"], f"{r['tok_s_median']:.1f}", f"{r['tok_s_best']:.1f}",
                 ratio, r.get("weight_mb", ""), r.get("weight_gbs", ""), r.get("pct_of_bw", "")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    failed = [(n, p) for n, p in paths.items() if p.get("status") != "ok"]
    if failed:
        lines += ["", "| path | status | error |", "|---|---|---|"]
        for n, p in failed:
            err = (p.get("error") or "").strip().splitlines()
            lines.append(f"| {n} | {p.get('status')} | {(err[-1] if err else '')[:300]} |")
    return "\n".join(lines)


def headline(rows: list[dict[str, Any]], reference: str) -> str:
    parts = []
    for b in sorted({r["batch"] for r in rows}):
        best = sorted((r for r in rows if r["batch"] == b), key=lambda r: -r["tok_s_median"])
        parts.append(f"batch {b}: " + ", ".join(f"{r['path']} {r['tok_s_median']:.0f}"
                                                 for r in best[:4]))
    return "; ".join(parts) + f" tok/s (median; ratios against {reference} in the JSON)"


# --------------------------------------------------------------------------- machine
def memory_bandwidth(threads: int, mb: int = 2048, repeats: int = 5) -> dict[str, float]:
    """Best of ``repeats``: a sum over (read) and a copy of (read + write) an ``mb`` buffer."""
    import torch

    torch.set_num_threads(threads)
    a = torch.ones(mb * 2**20 // 4)
    b = torch.empty_like(a)
    read, copy = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a.sum()
        read.append(a.numel() * 4 / (time.perf_counter() - t0) / 1e9)
        t0 = time.perf_counter()
        b.copy_(a)
        copy.append(2 * a.numel() * 4 / (time.perf_counter() - t0) / 1e9)
    return {"read_gbs": round(max(read), 2), "copy_gbs": round(max(copy), 2),
            "buffer_mb": mb, "threads": threads}


# ------------------------------------------------------------------- models and tools
def install_error(family: str) -> str | None:
    """None if the family's package imports here, else why (its install log's tail)."""
    if family == "vesper":
        return None
    module, pip_name = PACKAGES[family]
    if importlib.util.find_spec(module) is not None:
        return None
    log = Path(sys.prefix) / f"install-{pip_name}.log"
    tail = log.read_text(errors="replace").strip().splitlines()[-15:] if log.is_file() else []
    return (f"{pip_name} is not installed in {sys.prefix}" +
            (f"; its install log ({log}) ends:\n" + "\n".join(tail) if tail else
             " (no install log: run `make peers-check`)"))


def make_models(work: Path, seed: int) -> tuple[Path, Path]:
    """A vesper folder (VesperLM 'small') and a Hugging Face Llama folder of the same shape."""
    import io

    import sentencepiece as spm
    import torch
    import transformers

    import vesper_sdk as vs

    torch.manual_seed(seed)
    cfg = vs.VesperConfig.from_preset("small", vocab_size=SHAPE["vocab_size"])
    model = vs.VesperLM(cfg)
    with torch.no_grad():  # B starts at zero; give the FlyLoRA branch a say
        for layer in model.flylora_layers():
            layer.lora_B.normal_(0, 0.02)
    vdir = work / "vesper"
    model.save_pretrained(vdir)
    vs.VesperTokenizer.train([f"decode line {i}" for i in range(100)], vocab_size=300,
                             min_frequency=1).save(vdir)
    # The Llama needs a tokenizer its converters read: a small SentencePiece model (the
    # converters pad the vocabulary to the config's 32,000; prompts are token ids anyway).
    hdir = work / "hf-llama"
    hdir.mkdir(parents=True, exist_ok=True)
    words = "the of and to in is was for on that with as by at from his her which".split()
    lines = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12)) for i in range(500)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf,
                                   vocab_size=300, model_type="bpe", byte_fallback=True,
                                   hard_vocab_limit=False, minloglevel=2)
    (hdir / "tokenizer.model").write_bytes(buf.getvalue())
    transformers.LlamaTokenizer.from_pretrained(hdir).save_pretrained(hdir)
    hcfg = transformers.LlamaConfig(
        vocab_size=SHAPE["vocab_size"], hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    transformers.LlamaForCausalLM(hcfg).save_pretrained(hdir)
    return vdir, hdir


def _run(cmd: list[str], what: str, timeout: float = 600) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {p.returncode}): "
                           + "\n".join((p.stderr or p.stdout).strip().splitlines()[-12:]))


def convert(name: str, work: Path, vdir: Path, hdir: Path, args: argparse.Namespace) -> Path:
    """The model a path runs, made by that path's own tool."""
    family, variant = PATHS[name]
    out = work / name
    py = sys.executable
    if family.startswith("vesper"):
        if variant in ("eager", "compiled"):
            return vdir
        import vesper_sdk as vs

        q = variant.removeprefix("onnx-").removesuffix("-inplace")
        vs.export_onnx(vdir, out, quantize=None if q == "fp32" else q, verbose=False,
                       in_place_kv=variant.endswith("-inplace"))
    elif family == "onnxruntime-genai":
        cmd = [py, "-m", "onnxruntime_genai.models.builder", "-i", str(hdir), "-o", str(out),
               "-p", variant, "-e", "cpu", "-c", str(work / "ort-genai-cache")]
        _run(cmd + ([] if variant == "fp32" else ["--extra_options", "accuracy_level=4"]),
             "onnxruntime-genai's model builder")
    elif family == "llama.cpp":
        f32 = work / "llama-f32.gguf"
        if not f32.is_file():
            conv = Path(args.llama_converter or Path(sys.prefix) / "llama.cpp" /
                        "convert_hf_to_gguf.py")
            if not conv.is_file():
                raise RuntimeError(f"llama.cpp's converter {conv} is missing (`make "
                                   "peers-check` fetches it from llama-cpp-python's sdist)")
            _run([py, str(conv), str(hdir), "--outfile", str(f32), "--outtype", "f32"],
                 "convert_hf_to_gguf.py")
        if variant == "f32":
            return f32
        out = work / f"llama-{variant}.gguf"
        code = ("import sys, llama_cpp as L\np = L.llama_model_quantize_default_params()\n"
                f"p.ftype = L.LLAMA_FTYPE_MOSTLY_{variant.upper()}\np.nthread = {args.threads}\n"
                "sys.exit(L.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))")
        _run([py, "-c", code, str(f32), str(out)], "llama_model_quantize")
    else:
        conv = Path(py).parent / "ct2-transformers-converter"
        _run([str(conv), "--model", str(hdir), "--output_dir", str(out), "--quantization",
              variant, "--force"], "ct2-transformers-converter")
    return out


def weight_bytes(name: str, model: Path) -> int:
    family, variant = PATHS[name]
    if family == "vesper" and variant in ("eager", "compiled"):
        header = _safetensors_header(model / "model.safetensors")
        return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()
                   if k != "__metadata__")  # tied embeddings: the table is the LM head
    if family in ("vesper", "vesper-in-genai", "vesper-runtime-genai", "onnxruntime-genai"):
        import onnx

        proto = onnx.load(str(model / "model.onnx"), load_external_data=False)
        sizes = {t.name: _tensor_bytes(t) for t in proto.graph.initializer}
        return onnx_read_bytes(sizes, [(n.op_type, list(n.input)) for n in proto.graph.node])
    if family == "llama.cpp":
        sys.path.insert(1, str(Path(sys.prefix) / "llama.cpp" / "gguf-py"))
        import gguf

        reader = gguf.GGUFReader(str(model))
        return gguf_read_bytes({t.name: int(t.n_bytes) for t in reader.tensors})
    variables, aliases = read_ct2(model / "model.bin")
    return ct2_read_bytes(variables, aliases)


def _safetensors_header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        return json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))


def _tensor_bytes(t: Any) -> int:
    import onnx

    n = 1
    for d in t.dims:
        n *= d
    bits = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}.get(t.data_type)
    if bits:
        return (n * bits + 7) // 8
    return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def read_ct2(path: Path) -> tuple[dict[str, int], dict[str, str]]:
    """CTranslate2's model.bin: {variable: bytes}, {alias: variable} (its own layout)."""
    data = path.read_bytes()
    pos = 0

    def take(fmt: str) -> Any:
        nonlocal pos
        vals = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return vals[0]

    def string() -> str:
        nonlocal pos
        n = take("H")
        s = data[pos:pos + n - 1].decode()
        pos += n
        return s

    take("I"), string(), take("I")  # version, spec name, revision
    variables = {}
    for _ in range(take("I")):
        name = string()
        for _ in range(take("B")):
            take("I")
        take("B")
        variables[name] = take("I")
        pos += variables[name]
    aliases = {string(): string() for _ in range(take("I"))}
    return variables, aliases


# ---------------------------------------------------------------------------- workers
class Worker:
    """The parent's handle on one worker process (stderr kept in a log for its errors)."""

    def __init__(self, name: str, model: Path, threads: int, log: Path,
                 extra_bufts: bool = True) -> None:
        family, variant = PATHS[name]
        spec = {"family": family, "variant": variant, "model": str(model), "threads": threads,
                "extra_bufts": extra_bufts}
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        self.log = log
        self.proc = subprocess.Popen([sys.executable, str(WORKER), json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(log, "w"), text=True, env=env)
        self.reply()

    def reply(self) -> dict[str, Any]:
        for line in self.proc.stdout:
            if line.startswith("@@"):
                return json.loads(line[2:])
        code = self.proc.wait()
        tail = self.log.read_text(errors="replace").strip().splitlines()[-12:]
        raise RuntimeError(f"worker exited with code {code}; its log ends:\n" + "\n".join(tail))

    def run(self, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps({"prompts": prompts, "new_tokens": new_tokens}) + "\n")
        self.proc.stdin.flush()
        return self.reply()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start_worker(name: str, model: Path, args: argparse.Namespace, prompts: dict[int, Any],
          work: Path, extra_bufts: bool) -> Worker:
    """A worker for ``name``, warmed up once per batch size (compiler, caches, threads)."""
    w = Worker(name, model, args.threads, work / f"{name}.log", extra_bufts)
    try:
        for b in args.batch_sizes:
            w.run(prompts[b], args.new_tokens if name == "vesper-compiled"
                  else min(16, args.new_tokens))
    except Exception:
        w.close()
        raise
    return w


# ------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    load0 = round(os.getloadavg()[0], 2)
    import numpy as np

    rng = np.random.default_rng(args.seed)
    prompts = {b: rng.integers(3, SHAPE["vocab_size"], (b, args.prompt_len)).tolist()
               for b in args.batch_sizes}
    paths: dict[str, dict[str, Any]] = {n: {"family": PATHS[n][0], "variant": PATHS[n][1]}
                                        for n in args.path_names}
    tmp = None if args.work_dir else tempfile.TemporaryDirectory(prefix="vesper-peers-")
    work = Path(args.work_dir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    print(f"CPU: {cpu_model()}, {args.threads} threads; models in {work}", flush=True)
    bandwidth = memory_bandwidth(args.threads)
    print(f"memory bandwidth: read {bandwidth['read_gbs']} GB/s, copy {bandwidth['copy_gbs']} "
          "GB/s (read + write)", flush=True)
    t0 = time.perf_counter()
    vdir, hdir = make_models(work, args.seed)
    print(f"random-weight models made in {time.perf_counter() - t0:.1f} s", flush=True)

    workers: dict[str, Worker] = {}
    for name in args.path_names:
        info = paths[name]
        try:
            why = install_error(info["family"])
            if why:
                info.update(status="not installed", error=why)
                continue
            t0 = time.perf_counter()
            info["stage"] = "convert"
            model = convert(name, work, vdir, hdir, args)
            info["convert_s"] = round(time.perf_counter() - t0, 1)
            info["weight_bytes"] = weight_bytes(name, model)
            info["stage"] = "load"
            try:
                workers[name] = start_worker(name, model, args, prompts, work, True)
            except RuntimeError as exc:
                if info["family"] != "llama.cpp":
                    raise
                # A crash with llama.cpp's repacked weights: again without, and say so.
                info["note"] = ("with weight repacking (use_extra_bufts, llama.cpp's default) "
                                f"its {str(exc).splitlines()[0].split(';')[0]}: run with "
                                "use_extra_bufts=false")
                workers[name] = start_worker(name, model, args, prompts, work, False)
            info.pop("stage")
            info["status"] = "ok"
            print(f"  {name}: ready ({info.get('convert_s', 0)} s to convert, "
                  f"{info['weight_bytes'] / 1e6:.1f} MB read per step)", flush=True)
        except Exception as exc:
            info.update(status=f"{info.pop('stage', 'convert')} failed",
                        error=f"{type(exc).__name__}: {exc}")
            if name in workers:
                workers.pop(name).close()
            print(f"  {name}: {info['status']}: {str(exc).splitlines()[0][:200]}", flush=True)

    runs: dict[str, dict[int, list[float]]] = {n: {b: [] for b in args.batch_sizes}
                                               for n in workers}
    ids: dict[str, list[int]] = {}
    order = list(workers)
    for r in range(args.rounds):
        shift = r % max(1, len(order))  # each path starts a round in turn
        for b in args.batch_sizes:
            for name in order[shift:] + order[:shift]:
                if name not in workers:
                    continue
                try:
                    out = workers[name].run(prompts[b], args.new_tokens)
                except Exception as exc:
                    paths[name].update(status="run failed", error=f"{type(exc).__name__}: {exc}")
                    workers.pop(name).close()
                    continue
                if out["lengths"] != [args.new_tokens]:
                    paths[name]["note"] = f"rows decoded {out['lengths']} tokens"
                runs[name][b].append(out.get("tokens", b * args.new_tokens) / out["seconds"])
                ids.setdefault(name, out["ids0"])
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{n} {runs[n][args.batch_sizes[-1]][-1]:.0f}" for n in workers
            if runs[n][args.batch_sizes[-1]]) + f" tok/s at batch {args.batch_sizes[-1]}",
            flush=True)
    for w in workers.values():
        w.close()

    weights = {n: p["weight_bytes"] for n, p in paths.items() if p.get("weight_bytes")}
    rows = summarize({n: v for n, v in runs.items() if any(v.values())}, args.reference,
                     args.batch_sizes, weights, bandwidth["read_gbs"])
    for name, first in ids.items():  # same greedy tokens as the family's fp32 path?
        ref = ids.get({"vesper": "vesper-eager", "vesper-in-genai": "vesper-eager",
                       "vesper-runtime-genai": "vesper-eager",
                       "onnxruntime-genai": "ort-genai-fp32",
                       "llama.cpp": "llama.cpp-f32", "ctranslate2": "ct2-fp32"}[
                           PATHS[name][0]])
        if ref is not None:
            paths[name]["same_prefix_as_fp32"] = next(
                (i for i, (a, c) in enumerate(zip(first, ref, strict=False)) if a != c),
                min(len(first), len(ref)))
    table = render_table(rows, paths, args.reference)
    versus = against_peers({n: v for n, v in runs.items() if any(v.values())},
                           args.batch_sizes)
    if versus:
        table += "\n\n" + render_against_peers(versus)
    versions = {}
    for pkg in ("torch", "onnxruntime", "onnxruntime-genai", "llama-cpp-python", "ctranslate2",
                "transformers"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = "absent"
    result = {
        "setting": {"shape": SHAPE, "threads": args.threads, "prompt_len": args.prompt_len,
                    "new_tokens": args.new_tokens, "rounds": args.rounds,
                    "batches": args.batch_sizes, "greedy": True, "weights": "random",
                    "seed": args.seed, "reference": args.reference},
        # A busy machine slows every figure: the load around the run is kept with them.
        "machine": {"cpu": cpu_model(), "cpu_cores": os.cpu_count(), **bandwidth,
                    "load_avg_1m_start": load0, "load_avg_1m_end": round(os.getloadavg()[0], 2)},
        "versions": versions, "paths": paths, "rows": rows, "against_peers": versus,
        "tok_s_per_round": {n: {str(b): [round(x, 2) for x in v] for b, v in by.items()}
                            for n, by in runs.items()},
        "headline": headline(rows, args.reference) if rows else "no path ran",
        "markdown": table, "wall_s": round(time.perf_counter() - start, 1),
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    if tmp is not None:
        tmp.cleanup()
    print(f"\ngreedy decode, 'small' shape, {args.threads} threads, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, median of {args.rounds} alternating rounds; "
          f"{cpu_model()}, memory read {bandwidth['read_gbs']} GB/s; "
          f"{result['wall_s']:.0f} s in all\n")
    print(table)
    return 0 if rows else 1


if __name__ == "__main__":
    raise SystemExit(main())
