"""Where one decoded token's time goes: the model's step vs the decoding loop around it.

    python benchmarks/decode_profile.py --device cuda          # 'small' shape, batch 1

Prints, for ``LLM.stream_batch`` over a default ``TorchBackend`` (on CUDA: the step as a
CUDA graph, compiled): tokens/s of the whole loop; the time of the backend's step alone
(``TorchBackend.forward`` on the static cache, synchronised); on CUDA the graph replay
alone (pure GPU time of the step) and the kernels the step launches; then the Python
functions that cost the loop most (cProfile) and, with ``--torch-profile``, the top
operators by device time (torch.profiler).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch


def main(argv: list[str] | None = None) -> int:
    import vesper_sdk as vs
    from vesper_sdk.inference import LLM, GenerationRequest, SamplingParams, TorchBackend

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cuda or cpu (default: cuda when present)")
    ap.add_argument("--preset", default="small", help="model shape (random weights)")
    ap.add_argument("--vocab-size", type=int, default=32000)
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens per timed decode")
    ap.add_argument("--batch", type=int, default=1, help="rows decoded together")
    ap.add_argument("--no-compile", action="store_true",
                    help="CUDA: record the eager step as the graph (default: compiled, as "
                         "vesper serve runs it)")
    ap.add_argument("--torch-profile", action="store_true",
                    help="also print the top operators by device (or CPU) time")
    args = ap.parse_args(argv)
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
    backend = TorchBackend(vs.VesperLM(cfg).to(dev), compile=cuda and not args.no_compile)
    lm = LLM(backend, tok)
    prompts = torch.randint(3, cfg.vocab_size, (args.batch, 32)).tolist()

    def reqs(n: int) -> list[GenerationRequest]:
        return [GenerationRequest(prompt=p,
                                  params=SamplingParams(max_new_tokens=n, temperature=0.0,
                                                        ignore_eos=True)) for p in prompts]

    def loop(n: int) -> float:
        sync()
        t0 = time.perf_counter()
        for _ in lm.stream_batch(reqs(n)):
            pass
        sync()
        return time.perf_counter() - t0

    loop(8)
    loop(8)
    n = args.new_tokens
    t_loop = min(loop(n) for _ in range(3)) / n
    print(f"device {dev}, preset {args.preset}, batch {args.batch}: graph "
          f"{backend.cuda_graph}, compiled {backend.compile}")
    print(f"whole loop:   {t_loop * 1e3:7.3f} ms/step  ({args.batch / t_loop:8.1f} tok/s)")

    # The backend step alone, on a static cache built by a real prefill.
    ids = torch.tensor(prompts, device=dev)
    mask = torch.ones((args.batch, 32 + n + 1), dtype=torch.long, device=dev)
    pos = torch.arange(32, device=dev).expand(args.batch, -1)
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
    t_step = (time.perf_counter() - t0) / n
    print(f"backend step: {t_step * 1e3:7.3f} ms/step  (loop overhead "
          f"{(t_loop - t_step) * 1e3:.3f} ms/step)")
    graph = getattr(getattr(past, "buffers", None), "graph", None)
    del past  # its buffers go back to the pool
    summary = (f"summary: loop {t_loop * 1e3:.3f} ms/token ({args.batch / t_loop:.0f} tok/s), "
               f"backend step {t_step * 1e3:.3f} ms")
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


if __name__ == "__main__":
    raise SystemExit(main())
