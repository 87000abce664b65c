"""Training-step benchmark: forward / backward / optimizer time, ours beside a seed-style step.

    python benchmarks/train_step.py --preset tiny --batch 2 --seq 128 --device cpu
    python benchmarks/train_step.py --preset medium --batch 8 --seq 1024 --device cuda --compile

Both variants run the same VesperLM on the same random tokens, with the MetaHead loss,
in the same process:

- **seed-style**: the LM loss as ``log_softmax`` + ``nll_loss`` over the full vocabulary
  in fp32 (unfused), an optimizer that updates one parameter tensor at a time (the seed
  launched one kernel per tensor), no torch.compile;
- **ours**: as ``vesper_sdk.train`` runs it: the LM loss, its gradient and the MetaHead's
  targets a chunk of tokens at a time, never the whole logits
  (``vesper_sdk.model.head_loss``), Velvet (one Triton launch over a flat buffer on GPU,
  ``_foreach`` ops on CPU), torch.compile with ``--compile``;
- **ours-full-logits**: the same with the plain head (the whole logits, then
  ``F.cross_entropy``): the chunked head's share of the difference.

On GPU both use bf16 autocast, as the seed did; on CPU both run fp32. The table gives
forward (incl. loss), backward and optimizer milliseconds (medians), tokens/s, peak
memory, and on GPU the model FLOP/s and MFU against a bf16 8192^3 matmul rate measured in
the same run. MFU is skipped on CPU (no meaningful matmul peak to compare with).
Peak memory: ``torch.cuda.max_memory_allocated`` per variant on GPU; on CPU the process's
peak RSS so far, which only grows (the second variant's figure includes the first's).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from vesper_sdk.config import VesperConfig  # noqa: E402
from vesper_sdk.device import matmul_peak_tflops  # noqa: E402
from vesper_sdk.model import VesperLM  # noqa: E402
from vesper_sdk.model.metahead import metahead_loss  # noqa: E402


class PerTensorAdamW(torch.optim.Optimizer):
    """AdamW that updates one tensor at a time with separate ops: the seed's launch pattern."""

    def __init__(self, params, lr=5e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-3):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"], st["m"], st["v"] = 0, torch.zeros_like(p), torch.zeros_like(p)
                st["step"] += 1
                p.mul_(1 - group["lr"] * group["weight_decay"])
                st["m"].mul_(b1).add_(p.grad, alpha=1 - b1)
                st["v"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                denom = (st["v"] / (1 - b2 ** st["step"])).sqrt_().add_(group["eps"])
                p.addcdiv_(st["m"], denom, value=-group["lr"] / (1 - b1 ** st["step"]))


def seed_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax(logits.float(), dim=-1)
    return F.nll_loss(logp.view(-1, logp.shape[-1]), labels.reshape(-1))


VARIANTS = ("seed-style", "ours-full-logits", "ours")


class Variant:
    """One way of running the training step, timed phase by phase."""

    def __init__(self, name: str, cfg: VesperConfig, args: argparse.Namespace,
                 device: torch.device) -> None:
        self.name, self.cfg, self.device = name, cfg, device
        torch.manual_seed(0)
        self.model = VesperLM(cfg).to(device).train()
        self.seed_style = name == "seed-style"
        self.model.set_chunked_loss(name == "ours")
        if self.seed_style:
            self.opt: torch.optim.Optimizer = PerTensorAdamW(self.model.parameters())
            self.fwd: Callable = self.model
        else:
            from vesper_sdk.training.optim import VelvetOptimizer

            self.opt = VelvetOptimizer(self.model.parameters())
            self.fwd = torch.compile(self.model) if args.compile else self.model
        gen = torch.Generator().manual_seed(1)
        x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=gen)
        x = x.to(device)
        self.inputs, self.labels = x[:, :-1], x[:, 1:]
        self.mask = torch.ones_like(self.labels, dtype=torch.bool)
        self.times: dict[str, list[float]] = {"fwd": [], "bwd": [], "opt": []}
        self.peak_mib = 0.0
        self.loss = float("nan")

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self, record: bool) -> None:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self._sync()
        t0 = time.perf_counter()
        # (record_function: the phases show as labelled ranges under --profile)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cuda):
            with record_function("forward"):
                if self.seed_style:
                    out = self.fwd(self.inputs)
                else:  # the model's own head makes the loss, as in vesper_sdk.train
                    out = self.fwd(self.inputs, labels=self.labels, loss_mask=self.mask)
        with record_function("loss"):
            if self.seed_style:
                lm = seed_lm_loss(out.logits, self.labels)
                targets = None
            else:
                lm = out.loss.lm_loss_sum / self.mask.numel()
                targets = out.loss.targets
            loss = lm + metahead_loss(out, self.labels, self.mask, self.cfg.eos_token_id,
                                      targets=targets)
            loss = loss + out.aux_loss
        self._sync()
        t1 = time.perf_counter()
        with record_function("backward"):
            loss.backward()
        self._sync()
        t2 = time.perf_counter()
        with record_function("optimizer"):
            if not self.seed_style:
                self.opt.set_loss(lm.item(), self.cfg.vocab_size)  # as the training loop does
            self.opt.step()
            self.opt.zero_grad(set_to_none=self.seed_style)
            self.model.update_flylora_balance()
        self._sync()
        t3 = time.perf_counter()
        if record:
            self.times["fwd"].append((t1 - t0) * 1e3)
            self.times["bwd"].append((t2 - t1) * 1e3)
            self.times["opt"].append((t3 - t2) * 1e3)
            self.loss = float(loss.detach())
            if cuda:
                self.peak_mib = max(self.peak_mib,
                                    torch.cuda.max_memory_allocated(self.device) / 2**20)
            else:
                self.peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def row(self, args: argparse.Namespace) -> dict:
        med = {k: statistics.median(v) for k, v in self.times.items()}
        total = sum(med.values())
        tok_s = args.batch * args.seq / (total / 1e3)
        mem_key = "peak_mem_mib" if self.device.type == "cuda" else "peak_rss_mib"
        return {"variant": self.name, "fwd_ms": med["fwd"], "bwd_ms": med["bwd"],
                "opt_ms": med["opt"], "total_ms": total, "tokens_per_s": tok_s,
                mem_key: self.peak_mib, "final_loss": self.loss,
                "model_tflops": self.cfg.estimate_flops_per_token(args.seq) * tok_s / 1e12}


def profile_steps(variant: Variant, device: torch.device, steps: int = 2) -> None:
    """Where a step's time goes: top operators by self time, then the labelled phases."""
    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            variant.step(record=False)
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages()
    print(f"\nprofile of {steps} steps of '{variant.name}', top operators by self "
          f"{'device' if cuda else 'CPU'} time:")
    print(table.table(sort_by=key, row_limit=25, max_name_column_width=70))
    phases = [e for e in table if e.key in ("forward", "loss", "backward", "optimizer")]
    for e in phases:
        dev = getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0.0))
        print(f"phase {e.key:<10} CPU {e.cpu_time_total / steps / 1e3:8.2f} ms/step"
              + (f"   device {dev / steps / 1e3:8.2f} ms/step" if cuda else ""))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, default=None, help="default: 4 on CPU, 8 on GPU")
    p.add_argument("--seq", type=int, default=None, help="default: 128 on CPU, 1024 on GPU")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10, quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 3, quick 1)")
    p.add_argument("--compile", action="store_true", help="torch.compile our variant")
    p.add_argument("--quick", action="store_true", help="smoke-test sizes")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated subset of " + ", ".join(VARIANTS) + " (one alone: "
                        "on the CPU its peak RSS is its own)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--profile", action="store_true",
                   help="after timing, profile two steps of our variant and print the "
                        "operators that take the most device (GPU) or CPU time, and the "
                        "phases (forward, loss, backward, optimizer)")
    args = p.parse_args(argv)
    names = [n for n in VARIANTS if n in args.variants.split(",")]
    if not names or set(args.variants.split(",")) - set(VARIANTS):
        p.error(f"--variants: choose from {', '.join(VARIANTS)}")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                          if args.device == "auto" else args.device)
    cuda = device.type == "cuda"
    args.batch = args.batch or (8 if cuda else 4)
    args.seq = args.seq or (1024 if cuda else 128)
    if args.quick:
        args.batch, args.seq = min(args.batch, 2), min(args.seq, 128)
    args.steps = args.steps or (3 if args.quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    if cuda:
        torch.set_float32_matmul_precision("high")
    cfg = VesperConfig.from_preset(args.preset, vocab_size=args.vocab,
                                   max_seq_len=max(args.seq, 1024))
    peak = matmul_peak_tflops(device) if cuda else None
    variants = [Variant(name, cfg, args, device) for name in names]
    # Interleaved steps: a busy machine slows both variants alike.
    for i in range(args.warmup + args.steps):
        for v in variants:
            v.step(record=i >= args.warmup)
    rows = [v.row(args) for v in variants]
    for row in rows:
        row["mfu"] = row["model_tflops"] / peak if peak else None
    by_name = {r["variant"]: r for r in rows}
    seed, ours = by_name.get("seed-style"), by_name.get("ours")
    speedup = seed["total_ms"] / ours["total_ms"] if seed and ours else None
    mem_col = "peak_mem_mib" if cuda else "peak_rss_mib"
    print(f"train step: preset {args.preset} ({cfg.num_parameters() / 1e6:.1f} M params), "
          f"batch {args.batch} x seq {args.seq}, vocab {args.vocab}, {device}, "
          f"{'bf16 autocast' if cuda else 'fp32'}, median of {args.steps} steps")
    header = (f"{'variant':<16} {'fwd ms':>8} {'bwd ms':>8} {'opt ms':>8} {'total ms':>9} "
              f"{'tok/s':>9} {'peak MiB':>9} {'TFLOP/s':>8} {'MFU':>6}")
    print(header)
    print("-" * len(header))
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(f"{r['variant']:<16} {r['fwd_ms']:8.2f} {r['bwd_ms']:8.2f} {r['opt_ms']:8.2f} "
              f"{r['total_ms']:9.2f} {r['tokens_per_s']:9.0f} {r[mem_col]:9.0f} "
              f"{r['model_tflops']:8.3f} {mfu:>6}")
    if peak:
        print(f"MFU against a measured bf16 8192^3 matmul rate of {peak:.0f} TFLOP/s")
    else:
        print("MFU: skipped on CPU (no comparable matmul peak); peak MiB is the process's "
              "peak RSS so far")
    shape = f"{args.preset} B={args.batch} S={args.seq} on {device}"
    if speedup is not None:
        headline = (f"ours {ours['tokens_per_s']:.0f} tok/s vs seed-style "
                    f"{seed['tokens_per_s']:.0f} tok/s ({speedup:.2f}x), {shape}")
    else:
        headline = ", ".join(f"{r['variant']} {r['tokens_per_s']:.0f} tok/s" for r in rows) \
            + f", {shape}"
    print(headline)
    if args.profile:
        profile_steps(variants[-1], device)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "preset": args.preset, "device": str(device), "batch": args.batch, "seq": args.seq,
            "vocab": args.vocab, "params": cfg.num_parameters(), "compile": args.compile,
            "precision": "bf16 autocast" if cuda else "fp32", "steps": args.steps,
            "matmul_bf16_tflops": peak,
            "mfu_note": None if peak else "skipped on CPU",
            "rows": rows, "speedup": speedup, "headline": headline}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
