"""Optimizer-step benchmark over a VesperLM preset's real parameter shapes.

    python benchmarks/optimizer.py --preset medium --device cuda --steps 50 --json out.json
    python benchmarks/optimizer.py --preset tiny --device cpu

Times, in one run and on the same random fp32 parameters and gradients:

* ``velvet``: VelvetOptimizer as users get it (GPU: flat buffers, one Triton launch per
  step; CPU: torch's fused AdamW kernel with Velvet's step folded in), gradients already
  in place (``zero_grad(set_to_none=False)`` steady state);
* ``velvet_foreach`` (CPU): ``impl="foreach"``, the ``_foreach`` ops;
* ``velvet_grad_copy_in``: the same with a fresh ``.grad`` every step (what
  ``zero_grad(set_to_none=True)`` leads to): the gradients are copied into the flat buffer;
* ``adamw_fused`` / ``adamw_foreach``: ``torch.optim.AdamW`` (fused is skipped where this
  torch has no fused kernel for the device);
* ``per_tensor``: the seed's approach, one launch of the same Velvet kernel per tensor
  (GPU), or a per-tensor loop of in-place torch ops (CPU);
* ``copy``: a device-to-device copy of 14 bytes per parameter (14 read + 14 written), the
  bandwidth reference for an update that moves 28 bytes per fp32 parameter (reads p, g,
  m, v; writes p, m, v).

GB/s counts 28 bytes per real parameter for every optimizer row (Velvet's block padding
is not credited). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

BYTES_PER_PARAM = 28


def preset_shapes(preset: str, vocab_size: int) -> tuple[list[tuple[int, ...]], str]:
    """Trainable parameter shapes of ``VesperLM(VesperConfig.from_preset(preset))``.

    The model is built on the meta device, so no memory is spent. Falls back to shapes
    computed from the seed's preset table if the SDK's model cannot be imported.
    """
    try:
        from vesper_sdk.config import VesperConfig
        from vesper_sdk.model import VesperLM
    except ImportError:
        return _fallback_shapes(preset, vocab_size), "computed (vesper_sdk.model unavailable)"
    cfg = VesperConfig.from_preset(preset, vocab_size=vocab_size)
    with torch.device("meta"):
        model = VesperLM(cfg)
    shapes = [tuple(p.shape) for p in model.parameters() if p.requires_grad]
    return shapes, "vesper_sdk.model.VesperLM on the meta device"


def _fallback_shapes(preset: str, vocab_size: int) -> list[tuple[int, ...]]:
    dims = {"tiny": (256, 6, 1024), "small": (512, 8, 2048), "medium": (768, 12, 3072),
            "large": (1024, 24, 4096), "xlarge": (2048, 24, 5504)}
    d, n_layers, f = dims[preset]
    shapes: list[tuple[int, ...]] = [(vocab_size, d)]
    for _ in range(n_layers):
        shapes += [(d,), (3 * d, d), (d, d), (d,), (f, d), (f, 16), (f, d), (f, 16), (d, f)]
    return shapes + [(d,)]


class _Timer:
    """Milliseconds per call: CUDA events on GPU, wall time on CPU; median of windows.

    The timed calls are split into ``windows`` back-to-back windows and the median
    window is reported, so one disturbed window (a busy shared CPU) does not skew it.
    """

    def __init__(self, device: torch.device, windows: int) -> None:
        self.device = device
        self.windows = windows

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _window_ms(self, fn: Callable[[], None], calls: int) -> float:
        if self.device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / calls
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t0) * 1e3 / calls

    def ms_per_call(self, fn: Callable[[], None], steps: int, warmup: int) -> tuple[float, float]:
        """(median, min) over windows of the mean ms per call."""
        for _ in range(warmup):
            fn()
        self.sync()
        windows = max(1, min(self.windows, steps))
        per_window = [self._window_ms(fn, max(1, steps // windows)) for _ in range(windows)]
        return statistics.median(per_window), min(per_window)


def _random_tensors(shapes, device, seed: int = 0):
    """Parameter values and gradients of every shape, drawn once on the device."""
    gen = torch.Generator(device=device).manual_seed(seed)
    values = [torch.randn(s, generator=gen, device=device) * 0.02 for s in shapes]
    grads = [torch.randn(s, generator=gen, device=device) * 1e-3 for s in shapes]
    return values, grads


def _make_params(base):
    """Fresh parameters and gradients (copies of ``base``) for one variant."""
    values, grads = base
    return [torch.nn.Parameter(v.clone()) for v in values], [g.clone() for g in grads]


def _velvet_step_fn(params, grads, impl, *, copy_in: bool, **opt_kwargs):
    from vesper_sdk.training.optim import VelvetOptimizer

    opt = VelvetOptimizer(params, lr=5e-4, impl=impl, **opt_kwargs)
    opt.set_loss(6.0, 32000)  # adaptive scales on, as in training
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    if not copy_in:
        return opt.step

    def step() -> None:
        # Fresh (non-view) gradients each step, as after zero_grad(set_to_none=True).
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt.step()

    return step


def _velvet_kernel_only_fn(params, grads):
    """Just the kernel launches of a packed Velvet optimizer (no host bookkeeping)."""
    from vesper_sdk.kernels import velvet
    from vesper_sdk.training.optim import VelvetOptimizer

    opt = VelvetOptimizer(params, lr=5e-4, impl="triton")
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    opt.step()  # packs the flat buffers
    launches = []
    for b in opt._buckets:
        hp = torch.tensor([[1 - 5e-4 * 1e-3, 0.1, 0.999, 1e-3, 5e-3, 0.05, 1e-8]],
                          device=b.device).expand(len(b.params), -1).contiguous()
        blocks = b.blocks_for([True] * len(b.params))
        launches.append((b, hp, blocks))

    def step() -> None:
        for b, hp, blocks in launches:
            velvet.velvet_step(b.p, b.g, b.m, b.v, b.block_seg, hp, blocks=blocks)

    return step


def _adamw_step_fn(params, grads, **flags):
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=1e-3, **flags)
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    return opt.step


def _per_tensor_step_fn(params, grads, device, use_kernel):
    """The seed's shape: one update launch per parameter tensor.

    With ``use_kernel`` each tensor gets its own launch of the Velvet kernel (the GPU
    baseline; on CPU tensors it runs in Triton's interpreter, for tests); otherwise a
    per-tensor loop of in-place torch ops.
    """
    ms = [torch.zeros_like(p) for p in params]
    vs = [torch.zeros_like(p) for p in params]
    lr, beta1, beta2, eps, wd = 5e-4, 0.9, 0.999, 1e-8, 1e-3
    state = {"t": 0}
    if use_kernel:
        from vesper_sdk.kernels import velvet

        block = velvet.BLOCK
        max_blocks = max(-(-p.numel() // block) for p in params)
        block_seg = torch.zeros(max_blocks, dtype=torch.int32, device=device)  # all row 0
        all_blocks = torch.arange(max_blocks, dtype=torch.int32, device=device)
        flat = [(p.detach().view(-1), g.view(-1), m.view(-1), v.view(-1), -(-p.numel() // block))
                for p, g, m, v in zip(params, grads, ms, vs, strict=True)]

        def step() -> None:
            state["t"] += 1
            t = state["t"]
            hp = torch.tensor([[1 - lr * wd, 1 - beta1, beta2, 1 - beta2,
                                lr / (1 - beta1**t), math.sqrt(1 - beta2**t), eps]],
                              pin_memory=device.type == "cuda").to(device, non_blocking=True)
            for p, g, m, v, nb in flat:
                # Unpadded tensors: the bounds-masked kernel variant, as the seed had.
                velvet.velvet_step(p, g, m, v, block_seg[:nb], hp, blocks=all_blocks[:nb],
                                   block=block)

        return step

    def step_cpu() -> None:
        state["t"] += 1
        t = state["t"]
        step_size, bc2_sqrt = lr / (1 - beta1**t), math.sqrt(1 - beta2**t)
        with torch.no_grad():
            for p, g, m, v in zip(params, grads, ms, vs, strict=True):
                p.mul_(1 - lr * wd)
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                p.addcdiv_(m, v.sqrt().div_(bc2_sqrt).add_(eps), value=-step_size)

    return step_cpu


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    shapes, shapes_source = preset_shapes(args.preset, args.vocab_size)
    n_params = sum(math.prod(s) for s in shapes)
    steps = args.steps or (50 if device.type == "cuda" else 5)
    warmup = args.warmup if args.warmup is not None else (10 if device.type == "cuda" else 1)
    timer = _Timer(device, args.windows)

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None

    base = _random_tensors(shapes, device)
    variants: dict[str, Callable[[], Callable[[], None]]] = {}
    use_kernel = device.type == "cuda"  # Triton on GPU; the interpreter is far too slow
    impl = "triton" if use_kernel else "fused"  # what impl="auto" picks on this device
    variants["velvet"] = lambda: _velvet_step_fn(*_make_params(base), impl, copy_in=False)
    variants["velvet_grad_copy_in"] = lambda: _velvet_step_fn(
        *_make_params(base), impl, copy_in=True)
    if use_kernel:
        variants["velvet_kernel_only"] = lambda: _velvet_kernel_only_fn(*_make_params(base))
    else:  # the _foreach ops, the CPU default before the fused kernel
        variants["velvet_foreach"] = lambda: _velvet_step_fn(*_make_params(base), "foreach",
                                                             copy_in=False)
    variants["adamw_fused"] = lambda: _adamw_step_fn(*_make_params(base), fused=True)
    variants["adamw_foreach"] = lambda: _adamw_step_fn(*_make_params(base),
                                                       foreach=True)
    variants["per_tensor"] = lambda: _per_tensor_step_fn(*_make_params(base), device,
                                                         use_kernel)

    def copy_fn() -> Callable[[], None]:
        src = torch.empty(n_params * BYTES_PER_PARAM // 2, dtype=torch.uint8, device=device)
        src.random_(0, 255)
        dst = torch.empty_like(src)
        return lambda: dst.copy_(src)

    variants["copy"] = copy_fn

    results: dict[str, dict] = {}
    for name, make in variants.items():
        if args.only and name not in args.only and name != "copy":
            continue
        try:
            fn = make()
            fn()  # first call: lazy state, flat-buffer packing, kernel compilation
            ms, ms_min = timer.ms_per_call(fn, steps, warmup)
            results[name] = {"ms_per_step": ms, "ms_per_step_min": ms_min,
                             "gb_per_s": n_params * BYTES_PER_PARAM / (ms * 1e-3) / 1e9}
        except (RuntimeError, NotImplementedError, ValueError, ImportError) as exc:
            results[name] = {"skipped": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
        finally:
            fn = None  # noqa: F841 -- free this variant's tensors before the next one
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    copy_gbs = results.get("copy", {}).get("gb_per_s")
    for r in results.values():
        if "gb_per_s" in r and copy_gbs:
            r["fraction_of_copy"] = r["gb_per_s"] / copy_gbs

    return {
        "benchmark": "optimizer_step",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "preset": args.preset,
        "vocab_size": args.vocab_size,
        "shapes_source": shapes_source,
        "parameters": n_params,
        "tensors": len(shapes),
        "dtype": "float32",
        "bytes_per_param": BYTES_PER_PARAM,
        "device": str(device),
        "device_name": _device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "steps": steps,
        "warmup": warmup,
        "windows": args.windows,
        "statistic": "median over windows of mean ms/step",
        "variants": {
            "velvet": "VelvetOptimizer.step, "
                      + ("flat buffers, one Triton launch per dtype" if use_kernel
                         else "torch's fused AdamW kernel, Velvet's step folded in"),
            "velvet_grad_copy_in": "same, with a fresh .grad each step (copied in)",
            "velvet_kernel_only": "the flat-buffer kernel launch alone (GPU only)",
            "velvet_foreach": "VelvetOptimizer(impl='foreach'): torch _foreach ops (CPU)",
            "adamw_fused": "torch.optim.AdamW(fused=True)",
            "adamw_foreach": "torch.optim.AdamW(foreach=True)",
            "per_tensor": ("one Velvet Triton launch per tensor" if use_kernel
                           else "per-tensor loop of in-place torch ops"),
            "copy": f"device copy of {BYTES_PER_PARAM // 2} B/param (read + write = "
                    f"{BYTES_PER_PARAM} B/param)",
        },
        "results": results,
    }


def print_table(report: dict) -> None:
    """Print the report as a fixed-width table."""
    print(f"{report['preset']} preset: {report['parameters'] / 1e6:.1f} M fp32 parameters in "
          f"{report['tensors']} tensors ({report['shapes_source']})")
    print(f"{report['device_name']}; torch {report['torch']}, triton {report['triton']}; "
          f"{report['steps']} timed steps after {report['warmup']} warmup; ms/step is the "
          f"median of {report['windows']} windows")
    print(f"{'variant':<22}{'ms/step':>10}{'min':>10}{'GB/s':>10}{'of copy':>10}")
    for name, r in report["results"].items():
        if "skipped" in r:
            print(f"{name:<22}  skipped: {r['skipped']}")
            continue
        frac = r.get("fraction_of_copy")
        frac_s = f"{100 * frac:9.1f}%" if frac is not None else f"{'-':>10}"
        print(f"{name:<22}{r['ms_per_step']:>10.3f}{r['ms_per_step_min']:>10.3f}"
              f"{r['gb_per_s']:>10.1f}{frac_s}")
    print("GB/s at 28 B per parameter; 'of copy' = fraction of the copy row's bandwidth.")
    for name in report["results"]:
        print(f"  {name}: {report['variants'][name]}")


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="medium",
                    choices=["tiny", "small", "medium", "large", "xlarge"])
    ap.add_argument("--vocab-size", type=int, default=32000)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=None,
                    help="timed steps (default 50 on GPU, 5 on CPU)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--windows", type=int, default=5,
                    help="timed steps are split into this many windows; the median is kept")
    ap.add_argument("--only", nargs="*", default=None,
                    help="run only these variants (the copy reference always runs)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for torch (default: torch's choice); on a shared CPU, "
                         "1 avoids OpenMP barrier stalls that swamp the timings")
    ap.add_argument("--json", type=Path, default=None, help="write the report here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run(args)
    print_table(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
