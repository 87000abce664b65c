"""One decode path of benchmarks/decode_peers.py, in its own process.

    python decode_peers_worker.py '{"family": ..., "variant": ..., "model": ..., "threads": 2}'

Loads the model once, says ``@@{"ready": true}``, then for each JSON line on stdin
(``{"prompts": [[ids]], "new_tokens": n}``) decodes greedily, EOS ignored (but by
vesper's genai runtime), and answers ``@@{"seconds": ..., "ids0": first row's first 32
ids, "lengths": [row lengths], "tokens": how many}``. Only the
path's own engine is imported (vesper, onnxruntime-genai, llama-cpp-python or CTranslate2).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


def decoder(family: str, variant: str, model: Path, threads: int, extra_bufts: bool):
    """decode(prompts, new_tokens) -> generated ids per row, for one path."""
    if family in ("vesper", "vesper-runtime-genai"):  # vesper's API, either ONNX loop
        import torch

        import vesper_sdk as vs
        from vesper_sdk.inference.llm import load_onnx

        torch.set_num_threads(threads)
        runtime = "genai" if family == "vesper-runtime-genai" else "vesper"
        lm = (load_onnx(model, threads=threads, runtime=runtime) if variant.startswith("onnx")
              else vs.load(model, device="cpu", compile=variant == "compiled"))
        # The genai loop does not take ignore_eos (export.genai_loop): there a row that
        # picks EOS ends, and tokens/s counts the tokens decoded.
        return lambda prompts, n: [[t.id for t in row] for row in lm.generate_tokens(
            prompts, max_new_tokens=n, temperature=0.0, ignore_eos=runtime == "vesper")]
    if family in ("onnxruntime-genai", "vesper-in-genai"):  # a builder model or our export
        import numpy as np
        import onnxruntime_genai as og

        # Threads set over the folder's genai_config.json, not in it (an edited file
        # would fail the manifest of a vesper export).
        config = og.Config(str(model))
        config.overlay(json.dumps(
            {"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        og_model = og.Model(config)

        def decode_og(prompts, n):
            params = og.GeneratorParams(og_model)
            total = len(prompts[0]) + n  # min_length = max_length: EOS never ends a row
            params.set_search_options(max_length=total, min_length=total, do_sample=False,
                                      batch_size=len(prompts))
            gen = og.Generator(og_model, params)
            gen.append_tokens(np.array(prompts, dtype=np.int32))
            while not gen.is_done():
                gen.generate_next_token()
            return [list(map(int, gen.get_sequence(i)[len(prompts[0]):]))
                    for i in range(len(prompts))]
        return decode_og
    if family == "llama.cpp":
        return _llama_decoder(model, threads, extra_bufts)
    import ctranslate2

    gen = ctranslate2.Generator(str(model), device="cpu", inter_threads=1, intra_threads=threads)
    vocab = json.loads((model / "vocabulary.json").read_text())
    return lambda prompts, n: [r.sequences_ids[0] for r in gen.generate_batch(
        [[vocab[i] for i in p] for p in prompts], max_length=n, min_length=n, sampling_topk=1,
        beam_size=1, include_prompt_in_result=False)]


def _llama_decoder(model: Path, threads: int, extra_bufts: bool):
    """llama.cpp through llama-cpp-python's C API: one sequence per row, greedy argmax."""
    import llama_cpp as L
    import numpy as np

    L.llama_backend_init()
    mp = L.llama_model_default_params()
    mp.use_extra_bufts = extra_bufts  # weight repacking (AMX, CPU_REPACK buffer types)
    lm = L.llama_model_load_from_file(str(model).encode(), mp)
    if not lm:
        raise RuntimeError(f"llama.cpp could not load {model}")
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(lm))
    contexts: dict[int, Any] = {}

    def decode_llama(prompts, n):
        b, p = len(prompts), len(prompts[0])
        if b not in contexts:
            cp = L.llama_context_default_params()
            cp.n_ctx, cp.n_seq_max = b * (p + n + 16), b
            cp.n_batch = cp.n_ubatch = max(512, b * p)
            cp.n_threads = cp.n_threads_batch = threads
            contexts[b] = (L.llama_init_from_model(lm, cp), L.llama_batch_init(b * p, 0, 1))
        ctx, batch = contexts[b]
        L.llama_memory_clear(L.llama_get_memory(ctx), True)

        def fill(rows: list[tuple[int, int, int, bool]]) -> None:
            for k, (tok, pos, seq, out) in enumerate(rows):
                batch.token[k], batch.pos[k], batch.n_seq_id[k] = tok, pos, 1
                batch.seq_id[k][0], batch.logits[k] = seq, out
            batch.n_tokens = len(rows)

        fill([(t, j, s, j == p - 1) for s, row in enumerate(prompts) for j, t in enumerate(row)])
        idx, out = [s * p + p - 1 for s in range(b)], [[] for _ in range(b)]
        for step in range(n):
            if L.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            nxt = [int(np.argmax(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i),
                                                       shape=(n_vocab,)))) for i in idx]
            for s, t in enumerate(nxt):
                out[s].append(t)
            fill([(t, p + step, s, True) for s, t in enumerate(nxt)])
            idx = list(range(b))
        return out
    return decode_llama


def worker(spec: dict[str, Any]) -> int:
    """Load one path, then answer timing requests (JSON lines on stdin) until EOF."""
    decode = decoder(spec["family"], spec["variant"], Path(spec["model"]), spec["threads"],
                     spec.get("extra_bufts", True))
    print("@@" + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        t0 = time.perf_counter()
        rows = decode(req["prompts"], req["new_tokens"])
        dt = time.perf_counter() - t0
        print("@@" + json.dumps({"seconds": dt, "ids0": rows[0][:32],
                                 "lengths": sorted({len(r) for r in rows}),
                                 "tokens": sum(map(len, rows))}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(worker(json.loads(sys.argv[1])))
