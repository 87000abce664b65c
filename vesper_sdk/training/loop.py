"""The training loop: ``vesper_sdk.train(...)``, ``vesper train``, ``torchrun -m``.

>>> import vesper_sdk as vs
>>> result = vs.train(data="chat.jsonl", out_dir="runs/a", preset="tiny", max_steps=500)
>>> lm = vs.load(result.model_dir)

One call does the whole job: read and tokenize the data (training a tokenizer on it
unless one is given), build the model (a preset, or ``preset="auto"`` to size it from
the data), train with Velvet (or AdamW), evaluate, checkpoint, and write the model folder
(``out_dir/model``: config.json, model.safetensors, tokenizer.json). :class:`Trainer`
holds the run's state and takes one step; :func:`run` decides when to log, evaluate,
checkpoint and stop.

Distributed: ``torchrun --nproc_per_node N -m vesper_sdk.training DATA --out-dir ...``
runs DDP (NCCL on GPU, gloo on CPU); every rank draws its own slice of each global batch
and rank 0 writes logs and checkpoints.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..device import matmul_peak_tflops
from ..hf.card import training_section, update_model_card
from ..integrity import ModelFolderError, require_intact
from ..tokenizer import TOKENIZER_NAME
from . import checkpoint as ckpt
from .data import write_json
from .options import MODEL_DIRNAME, TrainOptions, TrainResult
from .records import peak_memory, read_metrics, write_loss_curve
from .trainer import Trainer


def run(opts: TrainOptions, log: Callable[[str], None] | None = None) -> TrainResult:
    """Run a training job described by ``opts``: set up, train to ``max_steps`` (or a
    stop request), save, and report."""
    tr = Trainer(opts, log=log)
    tr.setup()
    if _already_finished(tr):
        tr.log(f"resume: this run already finished at step {tr.step} and its model is in "
               f"{tr.out_dir / MODEL_DIRNAME}: nothing to do (nothing was changed)")
        curve = tr.out_dir / "loss_curve.png"
        return _result(tr, tr.out_dir / MODEL_DIRNAME, False, None,
                       curve if curve.is_file() else None)
    _open_records(tr)
    tr.stop.install()
    interrupted = False
    last_ckpt: Path | None = None
    stop_at = min(tr.max_steps, opts.stop_at_step or tr.max_steps)
    try:
        tr.bar = tqdm(total=tr.max_steps, initial=tr.step, unit="step",
                      disable=not (opts.progress and tr.dist.main), dynamic_ncols=True)
        if opts.eval_every and tr.val_blocks.size and tr.step == 0:
            tr.write_metrics({"step": 0, **tr.evaluate_now()})
        interval: list[dict[str, float]] = []
        interval_time = 0.0
        while tr.step < stop_at:
            t0 = time.perf_counter()
            stats = tr.train_step()
            interval_time += time.perf_counter() - t0
            interval.append(stats)
            if stats["finite"]:
                tr.history.append({"step": tr.step, "loss": stats["loss"]})
            tr.bar.update(1)
            row: dict[str, Any] = {}
            if tr.step % opts.log_every == 0 or tr.step == stop_at:
                row = _interval_row(tr, interval, interval_time)
                interval, interval_time = [], 0.0
                shown = dict(loss=f"{row['loss']:.3f}", ppl=f"{row['ppl']:.1f}",
                             tok_s=f"{row['tok_s']:.0f}", lr=f"{row['lr']:.2e}")
                if "mfu" in row:
                    shown["mfu"] = f"{100 * row['mfu']:.1f}%"
                tr.bar.set_postfix(**shown)
            end = tr.step == stop_at
            due_ckpt = (opts.checkpoint_every and tr.step % opts.checkpoint_every == 0)
            due_eval = opts.eval_every and tr.step % opts.eval_every == 0
            if tr.val_blocks.size and (due_eval or end or due_ckpt):
                row.update(tr.evaluate_now())
            if row:
                tr.write_metrics({"step": tr.step, **row})
            if stats["stop"]:
                interrupted = True
                tr.log(f"interrupted (signal {tr.stop.signum}) at step {tr.step}: "
                       "saving a checkpoint")
                last_ckpt = tr.save_checkpoint()
                break
            if due_ckpt or end:
                last_ckpt = tr.save_checkpoint()
    finally:
        tr.stop.restore()
        if tr.bar is not None:
            tr.bar.close()
            tr.bar = None
        _close_records(tr)
    return _finish(tr, interrupted, last_ckpt)


def _open_records(tr: Trainer) -> None:
    # Before the first step: the options, the resumed RNG, TensorBoard, memory profiling.
    opts = tr.opts
    if tr.dist.main:
        write_json(tr.out_dir / "train_options.json", opts.to_json())
    if tr.resume_from is not None:
        ckpt.set_rng_state(tr.resume_rng)
    if opts.tensorboard and tr.dist.main:
        try:
            # optional heavy dependency: only --tensorboard needs it
            from torch.utils.tensorboard import SummaryWriter

            tr.tb = SummaryWriter(str(tr.out_dir / "tensorboard"))
        except ImportError:
            tr.log("tensorboard: not installed (pip install tensorboard); "
                   "metrics.jsonl has the same figures")
    if opts.profile_memory:
        if tr.device.type == "cuda":
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        else:
            tr.log("profile_memory: CUDA memory snapshots need a GPU; on CPU "
                   "metrics.jsonl records the process's peak RSS instead")
    if tr.device.type == "cuda":
        # MFU's denominator, measured on this GPU (the progress line and metrics.jsonl).
        tr.matmul_peak = matmul_peak_tflops(tr.device)
        torch.cuda.reset_peak_memory_stats(tr.device)


def _close_records(tr: Trainer) -> None:
    if tr.tb is not None:
        tr.tb.close()
    if tr.opts.profile_memory and tr.device.type == "cuda" and tr.dist.main:
        snap = tr.out_dir / "memory_snapshot.pickle"
        torch.cuda.memory._dump_snapshot(str(snap))
        torch.cuda.memory._record_memory_history(enabled=None)
        tr.log(f"profile_memory: snapshot written to {snap} "
               "(open it at https://pytorch.org/memory_viz)")


def _interval_row(tr: Trainer, interval: list[dict[str, float]],
                  seconds: float) -> dict[str, Any]:
    finite = [s for s in interval if s["finite"]]
    loss = sum(s["loss"] for s in finite) / len(finite) if finite else float("nan")
    meta = sum(s["meta_loss"] for s in finite) / len(finite) if finite else float("nan")
    tokens = sum(s["tokens"] for s in interval)
    key, mem = peak_memory(tr.device)
    tok_s = tokens / max(seconds, 1e-9)
    row = {"loss": loss, "ppl": math.exp(min(loss, 50.0)) if finite else float("nan"),
           "meta_loss": meta, "lr": interval[-1]["lr"],
           "grad_norm": interval[-1]["grad_norm"], "tok_s": tok_s,
           "epoch": round(tr.position / tr.sampler.batches_per_epoch, 3),
           "skipped": tr.skipped, key: mem}
    if tr.matmul_peak:  # model FLOP/s per GPU over the bf16 matmul rate measured on it
        flops = tr.raw_model.config.estimate_flops_per_token(tr.opts.seq_len) * tok_s
        row["mfu"] = flops / tr.dist.world / (tr.matmul_peak * 1e12)
    return row


def _already_finished(tr: Trainer) -> bool:
    """Resumed from the run's last step, and its model folder is there and intact."""
    model_dir = tr.out_dir / MODEL_DIRNAME
    if tr.resume_from is None or tr.step < tr.max_steps or not model_dir.is_dir():
        return False
    try:
        require_intact(model_dir)
    except ModelFolderError as exc:
        tr.log(f"resume: the run finished but its model folder is damaged ({exc}); writing "
               "it again from the last checkpoint")
        return False
    if tr.dist.owns_group:
        dist.destroy_process_group()
    return True


def _finish(tr: Trainer, interrupted: bool, last_ckpt: Path | None) -> TrainResult:
    model_dir = None if interrupted else tr.out_dir / MODEL_DIRNAME
    if model_dir is not None and tr.opts.calibrate:
        fitted = tr.calibrate()
        if fitted:
            tr.last_val.update(fitted)
    curve = None
    if tr.dist.main:
        if model_dir is not None:
            tr.raw_model.save_pretrained(
                model_dir, extra_files={TOKENIZER_NAME: tr.tokenizer_path})
            update_model_card(model_dir, "Training", training_section(tr, tr.last_val))
            tr.log(f"model saved to {model_dir}")
        curve = write_loss_curve(tr.metrics_path, tr.out_dir / "loss_curve.png")
    tr.dist.barrier()
    if tr.dist.owns_group:
        dist.destroy_process_group()
    if interrupted:
        tr.log(f"stopped at step {tr.step}; resume with resume=True (--resume)")
    return _result(tr, model_dir, interrupted, last_ckpt, curve)


def _result(tr: Trainer, model_dir: Path | None, interrupted: bool, last_ckpt: Path | None,
            curve: Path | None) -> TrainResult:
    rows = read_metrics(tr.metrics_path) if tr.dist.main else []
    speeds = [r["tok_s"] for r in rows if "tok_s" in r]
    # This session's last loss, else the last one the run recorded (a resumed, finished run).
    losses = [r["loss"] for r in rows if "loss" in r and r.get("step", 0) <= tr.step]
    final_loss = tr.history[-1]["loss"] if tr.history else (losses[-1] if losses else None)
    return TrainResult(
        model_dir=model_dir, out_dir=tr.out_dir, steps=tr.step, final_loss=final_loss,
        metrics={k: v for k, v in tr.last_val.items() if k != "step"},
        checkpoint=last_ckpt, best_checkpoint=ckpt.best_checkpoint(tr.ckpt_root),
        best_val_loss=tr.best_val_loss, metrics_path=tr.metrics_path,
        loss_curve=curve, tokenizer_path=tr.tokenizer_path,
        trainable_params=tr.n_trainable, total_params=tr.n_total,
        skipped_steps=tr.skipped,
        tokens_per_second=float(np.median(speeds)) if speeds else 0.0,
        interrupted=interrupted, history=tr.history,
        metrics_step=tr.last_val.get("step"))


def train(data: Any, out_dir: str | Path, preset: str = "tiny", **options: Any) -> TrainResult:
    """Train (or fine-tune) a VesperLM and write its model folder; see :class:`TrainOptions`.

    >>> result = train("builtin:skills", "runs/skills", preset="tiny", max_steps=500)
    >>> result.model_dir        # runs/skills/model: config.json, model.safetensors, ...

    Raises TypeError for an unknown option (naming the valid ones), ValueError (and its
    subclass :class:`~vesper_sdk.training.data.DataError`) for unusable options or data,
    and :class:`~vesper_sdk.training.options.TrainingError` when training diverges.
    """
    valid = [f.name for f in dataclasses.fields(TrainOptions)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(f"train() got unknown option(s) {', '.join(unknown)}; valid options: "
                        f"{', '.join(v for v in valid if v not in ('data', 'out_dir', 'preset'))}")
    return run(TrainOptions(data=data, out_dir=str(out_dir), preset=preset, **options))
