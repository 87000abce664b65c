"""Where one decoded token's time goes: the model's step vs the decoding loop around it.

    python benchmarks/decode_profile.py --device cuda          # 'small' shape, batch 1
    python benchmarks/decode_profile.py --onnx int4 --threads 2 --batch 8   # the CPU's ONNX

Prints, for ``LLM.stream_batch`` over a default ``TorchBackend`` (on CUDA: the step as a
CUDA graph, compiled), or with ``--onnx`` over an ``OnnxBackend`` on an in-place export of
the same model at that precision: tokens/s of the whole loop; the time of the backend's
step alone (its ``forward`` on the cache a real prefill made, synchronised); on CUDA the
graph replay alone (pure GPU time of the step) and the kernels the step launches; with
``--onnx`` ONNX Runtime's runs timed inside the loop (the rest of a step is the host's
work: choosing, the Tokens, bindings and copies) and the bound step run back to back;
then the Python functions that cost the loop most (cProfile) and, with
``--torch-profile``, the top operators by device time (torch.profiler).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None,
                    help="cuda or cpu (default: cuda when present; cpu with --onnx)")
    ap.add_argument("--preset", default="small", help="model shape (random weights)")
    ap.add_argument("--vocab-size", type=int, default=32000)
    ap.add_argument("--new-tokens", type=int, default=128,
                    help="tokens per timed decode (at least 2)")
    ap.add_argument("--batch", type=int, default=1, help="rows decoded together")
    ap.add_argument("--no-compile", action="store_true",
                    help="CUDA: record the eager step as the graph (default: compiled, as "
                         "vesper serve runs it)")
    ap.add_argument("--torch-profile", action="store_true",
                    help="also print the top operators by device (or CPU) time")
    ap.add_argument("--onnx", choices=("fp32", "int8", "int4"), default=None,
                    help="profile ONNX Runtime on the CPU instead: an in-place KV export of "
                         "the same model at this precision")
    ap.add_argument("--threads", type=int, default=None,
                    help="--onnx: ONNX Runtime's threads (default: OnnxBackend's)")
    args = ap.parse_args(argv)
    if args.new_tokens < 2:
        ap.error("--new-tokens must be at least 2: one decode step past the first token")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() and not args.onnx else "cpu"
    if args.onnx and args.device != "cpu":
        ap.error("--onnx profiles ONNX Runtime's CPU provider: leave --device out (or "
                 "pass --device cpu)")
    with tempfile.TemporaryDirectory(prefix="vesper-decode-profile-") as work:
        return profile(args, Path(work))


def profile(args: argparse.Namespace, work: Path) -> int:
    import vesper_sdk as vs
    from vesper_sdk.inference import LLM, GenerationRequest, SamplingParams, TorchBackend

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    torch.manual_seed(0)
    cfg = vs.VesperConfig.from_preset(args.preset, vocab_size=args.vocab_size,
                                      max_seq_len=1024)
    tok = vs.VesperTokenizer.train([f"profile line {i}" for i in range(100)], vocab_size=300,
                                   min_frequency=1)
    model = vs.VesperLM(cfg)
    if args.onnx:
        from vesper_sdk.export.runner import OnnxBackend

        model.save_pretrained(work / "model")
        tok.save(work / "model")
        vs.export_onnx(work / "model", work / "onnx", verbose=False, in_place_kv=True,
                       quantize=None if args.onnx == "fp32" else args.onnx)
        backend = OnnxBackend(work / "onnx", threads=args.threads)
    else:
        backend = TorchBackend(model.to(dev), compile=cuda and not args.no_compile)
    lm = LLM(backend, tok)
    prompts = torch.randint(3, cfg.vocab_size, (args.batch, 32)).tolist()

    def reqs(n: int) -> list[GenerationRequest]:
        return [GenerationRequest(prompt=p,
                                  params=SamplingParams(max_new_tokens=n, temperature=0.0,
                                                        ignore_eos=True)) for p in prompts]

    runs = _TimedRuns(backend.session) if args.onnx else None
    if runs is not None:
        backend.session = runs

    def loop(n: int) -> tuple[float, float]:
        """(seconds of a decode of n tokens, seconds of it inside ONNX Runtime's runs)."""
        sync()
        if runs is not None:
            runs.seconds = 0.0
        t0 = time.perf_counter()
        for _ in lm.stream_batch(reqs(n)):
            pass
        sync()
        return time.perf_counter() - t0, runs.seconds if runs is not None else 0.0

    loop(8)
    loop(8)
    n = args.new_tokens
    # Per decode step: the prefill (and the first token) taken out by timing a one-token
    # run too, so the step and the loop around it compare like with like.
    first, whole = min(loop(1) for _ in range(3)), min(loop(n) for _ in range(3))
    t_first = first[0]
    t_loop = (whole[0] - t_first) / (n - 1)
    t_run_in_loop = (whole[1] - first[1]) / (n - 1)
    if t_loop <= 0 or (runs is not None and t_run_in_loop <= 0):
        # The one-token run took as long as the whole one: the per-step difference is
        # the machine's noise, not a time.
        print(f"error: a {n}-token decode was not slower than a one-token one on this "
              f"machine's noise ({whole[0] * 1e3:.1f} vs {t_first * 1e3:.1f} ms): rerun "
              "with more --new-tokens, on a quieter machine", file=sys.stderr)
        return 1
    if args.onnx:
        threads = backend.session.get_session_options().intra_op_num_threads
        what = f"ONNX Runtime, {args.onnx} in-place export, {threads} threads"
    else:
        what = f"graph {backend.cuda_graph}, compiled {backend.compile}"
    print(f"device {dev}, preset {args.preset}, batch {args.batch}: {what}")
    print(f"whole loop:   {t_loop * 1e3:7.3f} ms/step  ({args.batch / t_loop:8.1f} tok/s; "
          f"prefill and first token {t_first * 1e3:.1f} ms apart)")

    # The backend step alone, on a static cache built by a real prefill (best of three,
    # as the loop: this machine's speed may drift between them).
    ids = torch.tensor(prompts, device=dev)
    mask = torch.ones((args.batch, 32 + n + 1), dtype=torch.long, device=dev)
    pos = torch.arange(32, device=dev).expand(args.batch, -1)

    def steps() -> tuple[float, Any]:
        if args.onnx:
            backend.reserve(32 + n + 1)  # as the loop does: the cache sized once
        out = backend.forward(ids, mask[:, :32], pos, None)
        past = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        p1 = pos[:, -1:] + 1
        sync()
        t0 = time.perf_counter()
        for i in range(n):
            out = backend.forward(nxt, mask[:, :33 + i], p1 + i, past)
            past = out.past_key_values  # the same object on the static cache
        sync()
        return (time.perf_counter() - t0) / n, past

    t_step = min(steps()[0] for _ in range(2))
    last, past = steps()
    t_step = min(t_step, last)
    print(f"backend step: {t_step * 1e3:7.3f} ms/step  (loop overhead "
          f"{(t_loop - t_step) * 1e3:.3f} ms/step)")
    graph = getattr(getattr(past, "buffers", None), "graph", None)
    summary = (f"summary: loop {t_loop * 1e3:.3f} ms/token ({args.batch / t_loop:.0f} tok/s), "
               f"backend step {t_step * 1e3:.3f} ms")
    decode = getattr(past, "decode", None)  # an in-place cache's bound decode step
    if runs is not None and decode is not None:
        # The last step's bound inputs and outputs, run again and again: ONNX Runtime with
        # no Python between its runs.
        def alone() -> float:
            t0 = time.perf_counter()
            for _ in range(n):
                runs.session.run_with_iobinding(decode.binding)
            return (time.perf_counter() - t0) / n

        t_alone = min(alone() for _ in range(3))
        host = t_loop - t_run_in_loop
        print(f"ORT run:      {t_run_in_loop * 1e3:7.3f} ms/step inside the loop (host "
              f"work around it {host * 1e3:.3f} ms/step, {host / t_loop:.0%} of the loop); "
              f"{t_alone * 1e3:.3f} ms run back to back")
        summary += (f", ONNX Runtime's run {t_run_in_loop * 1e3:.3f} ms: host "
                    f"{host * 1e3:.3f} ms/token ({host / t_loop:.0%})")
    del past  # its buffers go back to the pool
    if cuda and graph is not None and graph.graph is not None:
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            graph.graph.replay()
        sync()
        t_replay = (time.perf_counter() - t0) / n
        print(f"graph replay: {t_replay * 1e3:7.3f} ms/step (GPU time of the step)")
        summary += f", graph replay {t_replay * 1e3:.3f} ms"

    prof = cProfile.Profile()
    prof.enable()
    loop(n)
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
    print("\n".join(s.getvalue().splitlines()[:40]))

    if args.torch_profile:
        acts = [torch.profiler.ProfilerActivity.CPU]
        if cuda:
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=acts) as tp:
            loop(32)
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        print(tp.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60))
    print(summary)  # last, for the GPU suite's table
    return 0


class _TimedRuns:
    """An ONNX Runtime session whose ``run_with_iobinding`` calls add up their seconds."""

    def __init__(self, session: Any) -> None:
        self.session, self.seconds = session, 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)

    def run_with_iobinding(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self.session.run_with_iobinding(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0


if __name__ == "__main__":
    raise SystemExit(main())
