"""The Trainer: one run's state, its set-up, one optimizer step, checkpoints, evaluation.

The loss is the LM cross-entropy over the loss-masked labels, plus the model's auxiliary
loss (MoE balancing), plus the MetaHead loss on targets the LM makes for itself on every
batch (:func:`~vesper_sdk.model.metahead.metahead_targets`): is my top-1 right (BCE),
does the text stop here (BCE), right / near miss / miss (3-way CE). It is normalised by
the number of target tokens of the whole optimizer step (all micro-batches, all
processes), so gradient accumulation and data parallelism give the same update as one
big batch. :func:`vesper_sdk.training.loop.run` drives the Trainer from step to step.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..atomic import clean_orphans
from ..model import VesperLM
from ..model.metahead import metahead_loss
from . import checkpoint as ckpt
from .build import build_model, build_optimizer, load_tokenizer
from .calibration import (
    describe,
    refit_answer,
    refit_confidence,
    shifted_calibration_questions,
    skills_batches,
    skills_questions,
)
from .data import BlockSampler, DataSource, build_token_cache, get_batch, split_blocks, write_json
from .distributed import init_distributed, process_device, sum_rank_loads, wrap_ddp
from .evaluation import evaluate_blocks
from .options import TrainingError, TrainOptions
from .precision import autocast, resolve_precision
from .schedule import LRSchedule


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop checkpoints and exits at the next step.

    A second SIGINT restores the default handler, so Ctrl-C twice stops at once.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        """Catch SIGINT and SIGTERM (from the main thread only; elsewhere a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self) -> None:
        """Put the handlers that were there before :meth:`install` back."""
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old.clear()


class Trainer:
    """One training run's state; :func:`vesper_sdk.training.loop.run` drives it."""

    def __init__(self, opts: TrainOptions, log: Callable[[str], None] | None = None) -> None:
        self.opts = opts
        self.out_dir = Path(opts.out_dir)
        self.dist = init_distributed(opts.device)
        self.device = process_device(opts.device, self.dist)
        self.precision = resolve_precision(opts.precision, self.device)
        self._user_log = log
        self.bar: Any = None  # the progress bar while the loop runs
        self.ckpt_root = self.out_dir / "checkpoints"
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.step = 0
        self.position = 0
        self.tokens_seen = 0
        self.skipped = 0
        self.consecutive_nonfinite = 0
        self.best_val_loss: float | None = None
        self.best_step: int | None = None
        self.last_val: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        self.stop = StopRequest()
        self.tb: Any = None
        self.matmul_peak: float | None = None  # TFLOP/s, measured on CUDA (for MFU)
        self.resume_rng: dict[str, Any] | None = None  # this rank's RNG from the checkpoint

    # --- logging -------------------------------------------------------------------
    def log(self, msg: str) -> None:
        """Print (or hand to the caller's ``log``) on rank 0, around the progress bar."""
        if not self.dist.main:
            return
        if self._user_log is not None:
            self._user_log(msg)
        elif self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def write_metrics(self, row: dict[str, Any]) -> None:
        """Append a row to ``metrics.jsonl`` (and TensorBoard) on rank 0."""
        if not self.dist.main:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, int | float):
                    self.tb.add_scalar(k, v, row["step"])

    # --- setup ---------------------------------------------------------------------
    def setup(self) -> None:
        """Read the data, build tokenizer, model and optimizer, and resume if asked."""
        opts = self.opts
        if self.dist.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.dist.main:
            # What a killed write left behind (a half-assembled checkpoint or model folder).
            for orphan in [*clean_orphans(self.ckpt_root), *clean_orphans(self.out_dir)]:
                self.log(f"cleaned up {orphan.name}, left by an interrupted write")
        self.dist.barrier()
        self.resume_from = (ckpt.latest_intact_checkpoint(self.ckpt_root, self.log)
                            if opts.resume else None)
        if opts.resume and self.resume_from is None:
            if ckpt.list_checkpoints(self.ckpt_root):
                raise ckpt.CheckpointError(
                    f"every checkpoint in {self.ckpt_root} is damaged (listed above): restore "
                    "one from a backup, or delete them to start afresh")
            self.log(f"resume: no checkpoint in {self.ckpt_root}, starting afresh")
        if not opts.resume and ckpt.list_checkpoints(self.ckpt_root):
            # Mixing two runs' checkpoints and metrics in one folder would make "latest",
            # "best" and the loss curve wrong.
            raise ValueError(f"{self.out_dir} already holds checkpoints of an earlier run: pass "
                             "resume=True (--resume) to continue it, or use a new out_dir")
        if self.dist.main and self.resume_from is None and self.metrics_path.exists():
            self.metrics_path.unlink()  # a fresh run starts a fresh record
        cache_dir = Path(opts.cache_dir) if opts.cache_dir else self.out_dir / "cache"
        torch.manual_seed(opts.seed)
        np.random.seed(opts.seed % 2**32)

        source = DataSource(opts.data, txt_split=opts.txt_split,
                            builtin_examples=opts.builtin_examples, seed=opts.seed,
                            max_bad_fraction=opts.max_bad_fraction)
        with self.dist.rank0_first():
            self.tokenizer, self.tokenizer_path = load_tokenizer(
                opts, source, cache_dir, self.resume_from, self.log)
            self.cache = build_token_cache(source, self.tokenizer, cache_dir, log=self.log)
        self._report_data()
        n_blocks = self.cache.num_blocks(opts.seq_len)
        self.train_blocks, self.val_blocks = split_blocks(n_blocks, opts.val_fraction, opts.seed)
        self.sampler = BlockSampler(self.train_blocks, opts.batch_size, self.dist.world,
                                    self.dist.rank, opts.seed)
        self.log(f"data: {self.cache.num_tokens:,} tokens -> {len(self.train_blocks)} training "
                 f"and {len(self.val_blocks)} validation blocks of {opts.seq_len} + 1")

        self.raw_model: VesperLM = build_model(
            opts, self.tokenizer, len(self.train_blocks) * opts.seq_len, self.device,
            self.precision, self.resume_from, self.log)
        cfg = self.raw_model.config
        if opts.seq_len > cfg.max_seq_len:
            raise ValueError(f"seq_len={opts.seq_len} exceeds the model's max_seq_len="
                             f"{cfg.max_seq_len}: lower seq_len")
        if self.tokenizer.vocab_size > cfg.vocab_size:
            raise ValueError(f"the tokenizer has {self.tokenizer.vocab_size} tokens but the "
                             f"model only {cfg.vocab_size}: use the model's own tokenizer")
        if self.tokenizer.eos_id != cfg.eos_token_id:  # the MetaHead's stop targets use it
            raise ValueError(f"the tokenizer's end token is id {self.tokenizer.eos_id} but "
                             f"the model's config says {cfg.eos_token_id}: use the model's "
                             "own tokenizer")
        if opts.finetune == "flylora":
            if not self.raw_model.flylora_layers():
                raise ValueError("finetune='flylora' but the model has no FlyLoRA layers "
                                 "(flylora_rank=0): use finetune='full'")
            self.raw_model.freeze_base()
        self.raw_model.set_gradient_checkpointing(opts.gradient_checkpointing)
        self.raw_model.set_chunked_loss(opts.chunked_loss)
        self.raw_model.config.gradient_checkpointing = opts.gradient_checkpointing
        self.raw_model.config.metahead_grad_to_trunk = opts.metahead_grad_to_trunk
        self.raw_model.to(self.device).train()
        self.trainable = [p for p in self.raw_model.parameters() if p.requires_grad]
        self.n_trainable = sum(p.numel() for p in self.trainable)
        self.n_total = sum(p.numel() for p in self.raw_model.parameters())
        self.log(f"model: {cfg!r}; trainable parameters: {self.n_trainable:,} of "
                 f"{self.n_total:,} ({100 * self.n_trainable / self.n_total:.1f}%)")

        self.optimizer = build_optimizer(opts, self.trainable, self.device)
        self.scaler = (torch.amp.GradScaler("cuda") if self.precision == "fp16" else None)
        steps_per_epoch = self.sampler.batches_per_epoch / opts.grad_accum
        self.max_steps = (max(1, math.ceil(opts.epochs * steps_per_epoch)) if opts.epochs
                          else opts.max_steps)
        warmup = (opts.warmup_steps if opts.warmup_steps is not None
                  else max(1, min(200, self.max_steps // 20)))
        self.schedule = LRSchedule(opts.schedule, opts.lr, warmup, self.max_steps,
                                   opts.min_lr_ratio)
        if self.resume_from is not None:
            self._load_checkpoint(self.resume_from)

        self.model: torch.nn.Module = self.raw_model
        if self.dist.world > 1:
            self.model = wrap_ddp(self.raw_model, self.device,
                                  find_unused_parameters=cfg.num_experts > 0)
        if opts.compile:
            self.model = torch.compile(self.model)
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")
        self.log(f"train: {self.max_steps} steps x {opts.batch_size} x {opts.seq_len} tokens "
                 f"x {opts.grad_accum} accum x {self.dist.world} process(es) on "
                 f"{self.device} ({self.precision}), {opts.optimizer}, lr {opts.lr:g} "
                 f"{opts.schedule} (warmup {warmup})")

    def _report_data(self) -> None:
        cache = self.cache
        report = cache.report
        self.log(f"data: {report.summary()}")
        path = self.out_dir / "data_report.json"
        data = {**report.to_dict(), "num_tokens": cache.num_tokens,
                "num_target_tokens": cache.meta["num_target_tokens"],
                "cache": str(cache.path)}
        # Rewritten only when it says something new (a resumed run must not touch it).
        if self.dist.main and (not path.is_file() or _json_or_none(path) != data):
            write_json(path, data)

    # --- checkpoints -----------------------------------------------------------------
    def _trainer_state(self, rng_states: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "version": 1, "step": self.step, "position": self.position,
            "tokens_seen": self.tokens_seen, "skipped_steps": self.skipped,
            "best_val_loss": self.best_val_loss, "best_step": self.best_step,
            "last_val": self.last_val, "scheduler": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "world_size": self.dist.world, "options": self.opts.to_json(), "rng": rng_states,
        }

    def save_checkpoint(self) -> Path:
        """Checkpoint the current state (collective: every rank must call it)."""
        state = ckpt.rng_state()
        if self.dist.world > 1:
            states: list[Any] = [None] * self.dist.world
            dist.all_gather_object(states, state)
        else:
            states = [state]
        path = ckpt.step_dir(self.ckpt_root, self.step)
        # Every rank tracks the best (the validation figures are all-reduced, so equal).
        val = self.last_val.get("val_loss") if self.last_val.get("step") == self.step else None
        if val is not None and (self.best_val_loss is None or val < self.best_val_loss):
            self.best_val_loss, self.best_step = val, self.step
        if self.dist.main:
            ckpt.save_checkpoint(path, self.raw_model, self.optimizer,
                                 self._trainer_state(states), self.tokenizer_path)
            if self.best_step == self.step:
                ckpt.record_best(self.ckpt_root, self.step, float(self.best_val_loss))
            keep = {self.best_step} if self.best_step is not None else set()
            ckpt.prune_checkpoints(self.ckpt_root, self.opts.keep_checkpoints, keep)
        self.dist.barrier()
        return path

    def _load_checkpoint(self, path: Path) -> None:
        state = ckpt.load_checkpoint(path, self.raw_model, self.optimizer, "cpu", warn=self.log)
        self.step, self.position = int(state["step"]), int(state["position"])
        self.tokens_seen, self.skipped = int(state["tokens_seen"]), int(state["skipped_steps"])
        self.best_val_loss, self.best_step = state["best_val_loss"], state["best_step"]
        self.last_val = state.get("last_val") or {}
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        rng = state["rng"]
        if state["world_size"] != self.dist.world:
            self.log(f"resume: the checkpoint was written by {state['world_size']} process(es), "
                     f"this run has {self.dist.world}: the data order from here differs from "
                     "an uninterrupted run")
        saved = state["options"]
        for key in ("seq_len", "batch_size", "grad_accum", "seed", "optimizer",
                    "entropy_adaptive", "perplexity_guided", "sparse_aware", "weight_decay",
                    "beta1", "beta2", "eps"):
            if saved.get(key) != getattr(self.opts, key):
                self.log(f"resume: {key} changed ({saved.get(key)} -> "
                         f"{getattr(self.opts, key)}): the run will not match an "
                         "uninterrupted one")
        old_schedule, new_schedule = state.get("scheduler"), self.schedule.state_dict()
        if old_schedule and old_schedule != new_schedule:
            changed = ", ".join(f"{k} {old_schedule.get(k)} -> {v}"
                                for k, v in new_schedule.items() if old_schedule.get(k) != v)
            self.log(f"resume: the learning-rate schedule changed ({changed}): from step "
                     f"{self.step} the run follows the new one, so it will not match an "
                     "uninterrupted run (--stop-at-step pauses a run without changing it)")
        self.resume_rng = rng[self.dist.rank] if self.dist.rank < len(rng) else rng[0]
        self.log(f"resume: continuing from {path} (step {self.step})")
        if self.dist.main and self.metrics_path.is_file():
            # Rows past the checkpoint would be written again: drop them.
            lines = self.metrics_path.read_text().splitlines()
            rows = [ln for ln in lines
                    if ln.strip() and json.loads(ln).get("step", 0) <= self.step]
            if rows != lines:
                self.metrics_path.write_text("".join(r + "\n" for r in rows))

    # --- evaluation ------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.precision, self.device)

    def evaluate(self) -> dict[str, float]:
        """Validation loss, perplexity, top-1 accuracy, MetaHead loss and ECE (15 bins)."""
        opts = self.opts
        # eval_batches global batches: the same validation set whatever the process count.
        blocks = self.val_blocks[:opts.eval_batches * opts.batch_size * self.dist.world]
        return evaluate_blocks(self.raw_model, self.cache, blocks, opts.seq_len,
                               opts.batch_size, self.tokenizer.eos_id, self.device, self.dist,
                               self._autocast)

    def evaluate_now(self) -> dict[str, float]:
        """:meth:`evaluate`, remembered as the latest validation figures and logged."""
        metrics = self.evaluate()
        self.last_val = {**metrics, "step": self.step}
        self.log(f"eval step {self.step}: val_loss {metrics['val_loss']:.4f} "
                 f"(ppl {metrics['val_ppl']:.2f}), acc {metrics['val_acc']:.3f}, "
                 f"MetaHead ECE {metrics['val_ece']:.4f}")
        return metrics

    # --- calibration -----------------------------------------------------------------
    def _calibration_batches(self) -> Iterator[tuple[torch.Tensor, ...]]:
        """(inputs, labels, mask, group) batches of held-out tokens for the confidence fit:
        builtin:skills' calibration split (grouped by question), else the validation
        blocks (one group each)."""
        opts = self.opts
        if opts.data == "builtin:skills":
            yield from skills_batches(self.tokenizer, opts.calibration_examples, opts.seed,
                                      opts.seq_len, opts.batch_size)
            return
        blocks = self.val_blocks[:64 * opts.batch_size]
        for i in range(0, len(blocks), opts.batch_size):
            x, y, m = get_batch(self.cache, blocks[i:i + opts.batch_size], opts.seq_len)
            yield x, y, m, torch.arange(i, i + x.shape[0])[:, None].expand_as(y)

    def calibrate(self) -> dict[str, float] | None:
        """Refit the MetaHead's confidence on held-out tokens (:mod:`.calibration`).

        Every rank computes the same fit from the same data, so no exchange is needed.
        Returns the fit's figures, or None when the held-out data is too little to fit on
        (the fit says why, in the log; the MetaHead keeps the confidence it has).
        """
        fit = refit_confidence(self.raw_model, self._calibration_batches(),
                               self.tokenizer.eos_id, self._autocast, warn=self.log)
        n = self.opts.calibration_answers
        if fit is not None and self.opts.data == "builtin:skills" and n:
            # Graded questions: the answer row is fitted on greedy answers to them.
            self.log(f"answering {n:,} held-out questions greedily to fit the MetaHead's "
                     "answer row")
            qs, groups = skills_questions(n, self.opts.seed)
            fit.update(refit_answer(self.raw_model, self.tokenizer, qs, groups, warn=self.log,
                                    shifted=shifted_calibration_questions(n, self.opts.seed))
                       or {})
        if fit is not None:
            self.log(describe(fit))
        return fit

    # --- one step --------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        """One optimizer step over ``grad_accum`` micro-batches; returns its statistics."""
        opts, d = self.opts, self.dist
        lr = self.schedule(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        micro = [get_batch(self.cache, self.sampler.batch(self.position + i), opts.seq_len)
                 for i in range(opts.grad_accum)]
        self.position += opts.grad_accum
        n_targets = float(sum(int(m.sum()) for _, _, m in micro))
        if d.world > 1:
            t = torch.tensor([n_targets], dtype=torch.float64, device=self.device)
            dist.all_reduce(t)
            n_targets = float(t.item())
        # DDP averages gradients over ranks, hence the world factor: every rank's loss is
        # its share of (sum over the global step's target tokens) / (their count).
        norm = max(n_targets, 1.0) / d.world
        eos = self.tokenizer.eos_id
        sums = torch.zeros(3, device=self.device)
        for i, (x, y, m) in enumerate(micro):
            non_blocking = self.device.type == "cuda"
            x, y, m = (t.to(self.device, non_blocking=non_blocking) for t in (x, y, m))
            last = i == len(micro) - 1
            sync = (self.model.no_sync() if d.world > 1 and not last and hasattr(
                self.model, "no_sync") else contextlib.nullcontext())
            with sync:
                with self._autocast():
                    out = self.model(x, labels=y, loss_mask=m)
                lm = out.loss.lm_loss_sum
                meta = metahead_loss(out, y, m, eos, normalizer=1.0, targets=out.loss.targets)
                loss = (lm + opts.metahead_weight * meta) / norm + out.aux_loss / len(micro)
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            sums[0] += lm.detach()
            sums[1] += meta.detach()
        sums[2] = float(self.stop.signum is not None)
        if d.world > 1:
            dist.all_reduce(sums)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if opts.grad_clip > 0:
            gnorm = torch.nn.utils.clip_grad_norm_(self.trainable, opts.grad_clip)
        else:
            gnorm = torch.nn.utils.get_total_norm(
                [p.grad for p in self.trainable if p.grad is not None])
        # One host sync per step: loss, MetaHead loss, stop flag and grad norm together.
        lm_sum, meta_sum, stop_flag, gn = torch.cat(
            [sums.float(), gnorm.reshape(1).float().to(sums.device)]).tolist()
        loss_value = lm_sum / max(n_targets, 1.0)
        meta_value = meta_sum / max(n_targets, 1.0)
        finite = math.isfinite(loss_value) and math.isfinite(meta_value) and (
            self.scaler is not None or math.isfinite(gn))
        if finite:
            if hasattr(self.optimizer, "set_loss"):
                self.optimizer.set_loss(loss_value, self.tokenizer.vocab_size)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self._update_flylora()
            self.consecutive_nonfinite = 0
        else:
            if self.scaler is not None:
                self.scaler.update()  # lowers the scale after an fp16 overflow
            for layer in self.raw_model.flylora_layers():
                layer.rank_load.zero_()
            self.skipped += 1
            self.consecutive_nonfinite += 1
            self.log(f"step {self.step}: non-finite loss ({loss_value}) or gradient norm "
                     f"({gn}); step skipped")
        # Velvet's flat-buffer path wants .grad kept as views (one memset); AdamW frees them.
        self.optimizer.zero_grad(set_to_none=isinstance(self.optimizer, torch.optim.AdamW))
        self.step += 1
        tokens = opts.batch_size * opts.seq_len * opts.grad_accum * d.world
        self.tokens_seen += tokens
        if self.consecutive_nonfinite >= opts.max_nonfinite:
            raise TrainingError(self._diagnose(loss_value))
        return {"loss": loss_value, "meta_loss": meta_value, "grad_norm": gn, "lr": lr,
                "finite": float(finite), "stop": stop_flag, "tokens": tokens}

    def _update_flylora(self) -> None:
        layers = self.raw_model.flylora_layers()
        if not layers:
            return
        if self.dist.world > 1:
            sum_rank_loads(layers)
        self.raw_model.update_flylora_balance()

    def _diagnose(self, loss: float) -> str:
        opts = self.opts
        causes = []
        if self.precision == "fp16":
            causes.append("fp16 overflow: use precision='bf16' (or 'fp32')")
        lr = (f"the learning rate is too high (lr={opts.lr:g}): lower it, lengthen the warmup, "
              "keep grad_clip on")
        if self.step <= self.consecutive_nonfinite:
            # Never a finite loss: the very first steps failed, before lr could matter much.
            causes += ["bad data or a broken model config (the loss was never finite; check "
                       "the data report above)", lr]
        else:
            causes += [lr, "bad data in this stretch (check the data report)"]
        return (f"stopped at step {self.step}: {self.consecutive_nonfinite} non-finite losses "
                f"in a row (last loss {loss}). Likely causes, most likely first: "
                + "; ".join(causes) + f". The last good checkpoint, if any, is in "
                f"{self.ckpt_root} (resume=True continues from it).")


def _json_or_none(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
