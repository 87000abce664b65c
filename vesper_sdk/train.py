"""Training and fine-tuning: ``vesper_sdk.train(...)``, ``vesper train``, ``torchrun -m``.

>>> import vesper_sdk as vs
>>> result = vs.train(data="chat.jsonl", out_dir="runs/a", preset="tiny", max_steps=500)
>>> lm = vs.load(result.model_dir)

One call does the whole job: read and tokenize the data (training a tokenizer on it
unless one is given), build the model (a preset, or ``preset="auto"`` to size it from
the data), train with Velvet (or AdamW), evaluate, checkpoint, and write the model folder
(``out_dir/model``: config.json, model.safetensors, tokenizer.json).

The loss is the LM cross-entropy over the loss-masked labels, plus the model's auxiliary
loss (MoE balancing), plus the MetaHead loss on targets the LM makes for itself on every
batch (:func:`metahead_targets`): is my top-1 right (BCE), does the text stop here (BCE),
right / near miss / miss (3-way CE). It is normalised by the number of target tokens of
the whole optimizer step (all micro-batches, all processes), so gradient accumulation
and data parallelism give the same update as one big batch.

Distributed: ``torchrun --nproc_per_node N -m vesper_sdk.train DATA --out-dir ...`` runs
DDP (NCCL on GPU, gloo on CPU); every rank draws its own slice of each global batch and
rank 0 writes logs and checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import checkpoint as ckpt
from ._callable import make_module_callable
from .calibrate import MIN_TOKENS, describe, refit_confidence, skills_batches
from .config import PRESETS, VesperConfig, run_folder_hint
from .data import (
    BlockSampler,
    DataError,
    DataSource,
    TokenCache,
    build_token_cache,
    get_batch,
    split_blocks,
    train_tokenizer,
)
from .metacog import bin_index, ece_from_bin_sums
from .model import VesperLM, VesperOutput
from .tokenizer import TOKENIZER_NAME, VesperTokenizer

IGNORE_INDEX = -100
ECE_BINS = 15
MODEL_DIRNAME = "model"


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss keeps diverging); the message says why."""


# ============================================================================ options
def _opt(default: Any, help: str, **meta: Any) -> Any:
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class TrainOptions:
    """Train a VesperLM on your data, or fine-tune one (``--init-from``, ``--finetune``).

    DATA is a .txt or .jsonl file ({"text": ...} or {"messages": [...]} per line), a
    folder of them, or builtin:skills (a generated corpus of computable questions). The
    model folder is written to OUT_DIR/model; checkpoints to OUT_DIR/checkpoints; the
    record to OUT_DIR/metrics.jsonl and OUT_DIR/loss_curve.png.

    Examples:
      vesper train builtin:skills --out-dir runs/skills --preset tiny --max-steps 2000
      vesper train chat.jsonl --out-dir runs/ft --init-from runs/skills/model --finetune flylora
      torchrun --nproc_per_node 2 -m vesper_sdk.train data/ --out-dir runs/ddp
    """

    data: Any = field(metadata={
        "help": "training data: .txt/.jsonl file, a folder of them, or builtin:skills",
        "positional": True})
    out_dir: str = _opt("runs/vesper", "run folder (model, checkpoints, metrics)")
    preset: str = _opt("tiny", "model size; 'auto' sizes it from the data (~20 tokens per "
                       "parameter) and the device memory", choices=[*PRESETS, "auto"])
    # --- data
    tokenizer: str | None = _opt(None, "tokenizer.json (or a model folder) to use; default: "
                                 "train one on the data")
    vocab_size: int = _opt(4096, "vocabulary size when training a tokenizer (small data "
                           "yields fewer tokens)")
    seq_len: int = _opt(256, "tokens per training sequence")
    val_fraction: float = _opt(0.05, "fraction of the data's blocks held out for validation")
    txt_split: str = _opt("paragraph", ".txt documents: 'paragraph' = split on blank lines, "
                          "'file' = one document per file", choices=["paragraph", "file"])
    max_bad_fraction: float = _opt(0.5, "stop if more than this fraction of a file's lines "
                                   "are malformed")
    builtin_examples: int = _opt(20000, "number of generated chats for builtin:skills")
    cache_dir: str | None = _opt(None, "token cache folder (default: OUT_DIR/cache)")
    # --- model
    init_from: str | None = _opt(None, "start from this model folder (fine-tuning)")
    finetune: str = _opt("full", "with --init-from: 'full' trains every weight, 'flylora' "
                         "only the FlyLoRA up-projections and the MetaHead",
                         choices=["full", "flylora"])
    hidden_size: int | None = _opt(None, "override the preset's hidden size")
    num_layers: int | None = _opt(None, "override the preset's number of layers")
    num_heads: int | None = _opt(None, "override the preset's number of attention heads")
    ffn_hidden_size: int | None = _opt(None, "override the preset's FFN width")
    max_seq_len: int | None = _opt(None, "context length stored in the model "
                                   "(default: max(seq_len, 1024))")
    dropout: float = _opt(0.0, "dropout probability")
    metahead_grad_to_trunk: bool = _opt(False, "let the MetaHead loss train the trunk too "
                                        "(default: the MetaHead reads a detached state)")
    metahead_weight: float = _opt(1.0, "weight of the MetaHead loss")
    calibrate: bool = _opt(True, "at the end, refit the MetaHead's confidence output on "
                           "held-out tokens (Platt scaling plus a cross-validated correction "
                           "from its activations): builtin:skills' calibration split, else "
                           "the validation blocks")
    calibration_examples: int = _opt(10_000, "builtin:skills: chats drawn from the "
                                     "calibration split for --calibrate")
    # --- optimisation
    optimizer: str = _opt("velvet", "optimizer", choices=["velvet", "adamw"])
    lr: float = _opt(5e-4, "peak learning rate")
    min_lr_ratio: float = _opt(0.1, "final lr as a fraction of the peak (cosine/linear)")
    schedule: str = _opt("cosine", "lr schedule after warmup",
                         choices=["cosine", "linear", "constant"])
    warmup_steps: int | None = _opt(None, "linear warmup steps (default: 5%% of max_steps, "
                                    "at most 200)")
    weight_decay: float = _opt(1e-3, "decoupled weight decay (matrices only)")
    beta1: float = _opt(0.9, "Adam beta1 (Velvet scales it with the loss under "
                              "--perplexity-guided)")
    beta2: float = _opt(0.999, "Adam beta2")
    eps: float = _opt(1e-8, "Adam epsilon")
    grad_clip: float = _opt(1.0, "clip the gradient norm to this (0 = no clipping)")
    entropy_adaptive: bool = _opt(True, "Velvet: scale lr with the loss's entropy")
    perplexity_guided: bool = _opt(False, "Velvet: scale beta1 with the perplexity (off by "
                                   "default: 27%% higher validation perplexity than AdamW "
                                   "on plain text in benchmarks/convergence.py)")
    sparse_aware: bool = _opt(False, "Velvet: leave elements with zero gradient untouched")
    batch_size: int = _opt(16, "sequences per micro-batch per process")
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    max_steps: int = _opt(1000, "optimizer steps to train for")
    epochs: float | None = _opt(None, "train for this many passes over the data instead of "
                                "max_steps")
    stop_at_step: int | None = _opt(None, "stop (with a checkpoint) after this step while "
                                    "keeping max_steps' schedule; resume later")
    seed: int = _opt(0, "random seed (init, data order, builtin data)")
    # --- hardware
    device: str = _opt("auto", "'auto' (CUDA if present), 'cpu', 'cuda', 'cuda:1', ...")
    precision: str = _opt("auto", "'auto' = bf16 autocast on GPU (fp16 + GradScaler where "
                          "bf16 is missing), fp32 on CPU",
                          choices=["auto", "fp32", "bf16", "fp16"])
    compile: bool = _opt(False, "torch.compile the model")
    gradient_checkpointing: bool = _opt(False, "recompute activations in backward "
                                        "(less memory, ~30%% more compute)")
    # --- evaluation, checkpoints, records
    eval_every: int = _opt(200, "evaluate every N steps (0 = only at the end)")
    eval_batches: int = _opt(20, "validation batches (of batch_size x processes sequences) "
                             "per evaluation, at most")
    log_every: int = _opt(10, "write a metrics.jsonl row every N steps")
    checkpoint_every: int = _opt(500, "checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = _opt(3, "keep the last K checkpoints (plus the best)")
    resume: bool = _opt(False, "continue from the latest checkpoint in OUT_DIR/checkpoints")
    max_nonfinite: int = _opt(10, "stop after this many non-finite losses in a row")
    tensorboard: bool = _opt(False, "also log to TensorBoard (OUT_DIR/tensorboard), if "
                             "installed")
    profile_memory: bool = _opt(False, "record a CUDA memory snapshot "
                                "(OUT_DIR/memory_snapshot.pickle, for pytorch.org/memory_viz)")
    progress: bool = _opt(True, "show a progress bar")

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(msg)

        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name}={getattr(self, f.name)!r}: choose one of "
                                 f"{', '.join(map(str, choices))}")
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "vocab_size",
                     "eval_batches", "log_every", "max_nonfinite", "builtin_examples",
                     "calibration_examples"):
            need(int(getattr(self, name)) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "checkpoint_every", "keep_checkpoints"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(self.lr > 0, f"lr must be positive, got {self.lr}")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]")
        need(self.grad_clip >= 0, "grad_clip must be >= 0 (0 disables clipping)")
        need(self.epochs is None or self.epochs > 0, "epochs must be positive")
        need(self.finetune == "full" or self.init_from is not None,
             "finetune='flylora' adapts an existing model: pass init_from=MODEL_DIR")
        need(self.data is not None, "data is required: a file, a folder or 'builtin:skills'")
        if self.init_from is not None:
            init = Path(self.init_from)
            need(init.is_dir(), f"init_from {init} is not a folder: pass the model folder of "
                                "a trained model (e.g. runs/a/model)")
            need((init / "config.json").is_file(),
                 f"init_from {init} is not a model folder: config.json is missing."
                 + run_folder_hint(init))

    def to_json(self) -> dict[str, Any]:
        """The options as JSON (in-memory data is recorded as ``"<python data>"``)."""
        out = dataclasses.asdict(self)
        if not isinstance(self.data, str | os.PathLike):
            out["data"] = "<python data>"
        else:
            out["data"] = str(self.data)
        return out


@dataclass
class TrainResult:
    """What a training run produced. ``model_dir`` is None if it was interrupted."""

    model_dir: Path | None
    out_dir: Path
    steps: int
    final_loss: float | None
    metrics: dict[str, float]
    checkpoint: Path | None
    best_checkpoint: Path | None
    best_val_loss: float | None
    metrics_path: Path
    loss_curve: Path | None
    tokenizer_path: Path
    trainable_params: int
    total_params: int
    skipped_steps: int
    tokens_per_second: float
    interrupted: bool = False
    history: list[dict[str, float]] = field(default_factory=list)
    metrics_step: int | None = None  # the step ``metrics`` were measured at


# ============================================================================ losses
def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed token cross-entropy over the labels where ``mask`` is true (fp32 result)."""
    target = labels.masked_fill(~mask, IGNORE_INDEX)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


@dataclass
class MetaTargets:
    """Per-position MetaHead targets made from the LM's own logits."""

    correct: torch.Tensor  # bool [B,S]: top-1 == label
    stop: torch.Tensor  # bool [B,S]: label is <|eos|>
    error_class: torch.Tensor  # long [B,S]: 0 right, 1 label in top-5, 2 miss


@torch.no_grad()
def metahead_targets(logits: torch.Tensor, labels: torch.Tensor, eos_id: int) -> MetaTargets:
    """Confidence / stop / error-class targets from the logits and the labels.

    correct = (argmax == label); stop = (label == eos); error class 0 if top-1 is right,
    1 if the label is in the top-5, else 2.
    """
    k = min(5, logits.shape[-1])
    top = logits.detach().topk(k, dim=-1).indices
    correct = top[..., 0] == labels
    in_top = (top == labels.unsqueeze(-1)).any(-1)
    error_class = torch.where(correct, 0, torch.where(in_top, 1, 2))
    return MetaTargets(correct, labels == eos_id, error_class)


def metahead_loss(out: VesperOutput, labels: torch.Tensor, mask: torch.Tensor, eos_id: int,
                  normalizer: float | torch.Tensor | None = None,
                  targets: MetaTargets | None = None) -> torch.Tensor:
    """MetaHead loss on the masked positions: BCE(confidence) + BCE(stop) + CE(error class).

    Reads ``out.meta_logits`` ([B,S,5]: conf, stop, err0..2). Returns the sum over masked
    positions divided by ``normalizer`` (default: their count, i.e. a mean).
    """
    t = targets if targets is not None else metahead_targets(out.logits, labels, eos_id)
    meta = out.meta_logits.float()
    m = mask.to(meta.dtype)
    conf = F.binary_cross_entropy_with_logits(meta[..., 0], t.correct.to(meta.dtype),
                                              reduction="none")
    stop = F.binary_cross_entropy_with_logits(meta[..., 1], t.stop.to(meta.dtype),
                                              reduction="none")
    err = F.cross_entropy(meta[..., 2:5].reshape(-1, 3), t.error_class.reshape(-1),
                          reduction="none").view_as(m)
    total = ((conf + stop + err) * m).sum()
    if normalizer is None:
        normalizer = m.sum().clamp(min=1.0)
    return total / normalizer


class CalibrationMeter:
    """Expected calibration error of the MetaHead confidence, summed as batches come (on
    the device, in sums that all-reduce across processes); the bins and the formula are
    metacog's, so it equals ``metacog.expected_calibration_error`` on the same values."""

    def __init__(self, bins: int = ECE_BINS, device: torch.device | str = "cpu") -> None:
        self.bins = bins
        self.stats = torch.zeros(3, bins, dtype=torch.float64, device=device)

    def update(self, confidence: torch.Tensor, correct: torch.Tensor, mask: torch.Tensor) -> None:
        """Add the positions where ``mask`` is true."""
        conf = confidence[mask].double()
        idx = bin_index(conf, self.bins)
        ones = torch.ones_like(conf)
        self.stats[0].index_add_(0, idx, ones)
        self.stats[1].index_add_(0, idx, conf)
        self.stats[2].index_add_(0, idx, correct[mask].double())

    def ece(self) -> float:
        """sum over bins of (bin share) x |accuracy - mean confidence|; NaN when empty."""
        return ece_from_bin_sums(*self.stats.cpu().numpy())


# ============================================================================ schedule
@dataclass
class LRSchedule:
    """Linear warmup to ``base_lr``, then cosine / linear decay to ``min_ratio * base_lr``
    at ``total`` steps, or constant. Stateless: the lr is a function of the step."""

    kind: str
    base_lr: float
    warmup: int
    total: int
    min_ratio: float = 0.1

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.base_lr * (step + 1) / self.warmup
        if self.kind == "constant":
            return self.base_lr
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        if self.kind == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            factor = 1.0 - progress
        return self.base_lr * (self.min_ratio + (1.0 - self.min_ratio) * factor)

    def state_dict(self) -> dict[str, Any]:
        """The schedule's parameters (saved in checkpoints for the record)."""
        return dataclasses.asdict(self)


# ============================================================================ helpers
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_opt: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device_opt != "cpu"
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_cuda else "gloo")
        owns = True
    return _Dist(dist.get_rank(), dist.get_world_size(), local, owns)


def _resolve_device(opt: str, d: _Dist) -> torch.device:
    if opt == "auto":
        opt = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(opt)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but no CUDA GPU is visible: use device='cpu'")
        if d.world > 1 or dev.index is None:
            dev = torch.device("cuda", d.local_rank if d.world > 1 else 0)
    return dev


def _resolve_precision(opt: str, device: torch.device) -> str:
    if opt == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if opt == "fp16" and device.type != "cuda":
        raise ValueError("precision='fp16' needs a CUDA GPU: use 'fp32' (or 'bf16') on CPU")
    return opt


def _peak_memory(device: torch.device) -> tuple[str, float]:
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
        return "peak_cuda_mb", round(peak, 1)
    # ru_maxrss is in KiB on Linux: the process's peak resident set so far.
    return "peak_rss_mb", round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


class _StopRequest:
    """SIGINT/SIGTERM set a flag; the loop checkpoints and exits at the next step.

    A second SIGINT restores the default handler, so Ctrl-C twice stops at once.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def install(self) -> None:
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
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old.clear()


def _round_vocab(n: int, multiple: int = 64) -> int:
    # Tensor-core friendly embedding/LM-head width; the extra ids are never produced.
    return -(-n // multiple) * multiple


# ============================================================================ trainer
class Trainer:
    """One training run. ``Trainer(opts).run()`` is what :func:`train` does."""

    def __init__(self, opts: TrainOptions, log: Callable[[str], None] | None = None) -> None:
        self.opts = opts
        self.out_dir = Path(opts.out_dir)
        self.dist = _init_distributed(opts.device)
        self.device = _resolve_device(opts.device, self.dist)
        self.precision = _resolve_precision(opts.precision, self.device)
        self._user_log = log
        self._bar: Any = None
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
        self.stop = _StopRequest()
        self.tb: Any = None

    # --- logging -------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if not self.dist.main:
            return
        if self._user_log is not None:
            self._user_log(msg)
        elif self._bar is not None:
            self._bar.write(msg)
        else:
            print(msg, flush=True)

    def _write_metrics(self, row: dict[str, Any]) -> None:
        if not self.dist.main:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, int | float):
                    self.tb.add_scalar(k, v, row["step"])

    def _barrier(self) -> None:
        if self.dist.world > 1:
            dist.barrier()

    @contextlib.contextmanager
    def _rank0_first(self) -> Iterator[None]:
        # Rank 0 builds shared files (tokenizer, token cache); the others then reuse them.
        if not self.dist.main:
            self._barrier()
        yield
        if self.dist.main:
            self._barrier()

    # --- setup ---------------------------------------------------------------------
    def setup(self) -> None:
        opts = self.opts
        if self.dist.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self.resume_from = ckpt.latest_checkpoint(self.ckpt_root) if opts.resume else None
        if opts.resume and self.resume_from is None:
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
        with self._rank0_first():
            self.tokenizer, self.tokenizer_path = self._tokenizer(source, cache_dir)
            self.cache = build_token_cache(source, self.tokenizer, cache_dir, log=self.log)
        self._report_data(self.cache)
        n_blocks = self.cache.num_blocks(opts.seq_len)
        self.train_blocks, self.val_blocks = split_blocks(n_blocks, opts.val_fraction, opts.seed)
        self.sampler = BlockSampler(self.train_blocks, opts.batch_size, self.dist.world,
                                    self.dist.rank, opts.seed)
        self.log(f"data: {self.cache.num_tokens:,} tokens -> {len(self.train_blocks)} training "
                 f"and {len(self.val_blocks)} validation blocks of {opts.seq_len} + 1")

        self.raw_model = self._build_model()
        cfg = self.raw_model.config
        if opts.seq_len > cfg.max_seq_len:
            raise ValueError(f"seq_len={opts.seq_len} exceeds the model's max_seq_len="
                             f"{cfg.max_seq_len}: lower seq_len")
        if self.tokenizer.vocab_size > cfg.vocab_size:
            raise ValueError(f"the tokenizer has {self.tokenizer.vocab_size} tokens but the "
                             f"model only {cfg.vocab_size}: use the model's own tokenizer")
        if opts.finetune == "flylora":
            if not self.raw_model.flylora_layers():
                raise ValueError("finetune='flylora' but the model has no FlyLoRA layers "
                                 "(flylora_rank=0): use finetune='full'")
            self.raw_model.freeze_base()
        self.raw_model.set_gradient_checkpointing(opts.gradient_checkpointing)
        self.raw_model.config.gradient_checkpointing = opts.gradient_checkpointing
        self.raw_model.config.metahead_grad_to_trunk = opts.metahead_grad_to_trunk
        self.raw_model.to(self.device).train()
        self.trainable = [p for p in self.raw_model.parameters() if p.requires_grad]
        self.n_trainable = sum(p.numel() for p in self.trainable)
        self.n_total = sum(p.numel() for p in self.raw_model.parameters())
        self.log(f"model: {cfg!r}; trainable parameters: {self.n_trainable:,} of "
                 f"{self.n_total:,} ({100 * self.n_trainable / self.n_total:.1f}%)")

        self.optimizer = self._build_optimizer()
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
            # Buffers (FlyLoRA balance bias) are kept equal by reducing the rank loads
            # before each update, so DDP need not broadcast them every forward.
            import inspect

            from torch.nn.parallel import DistributedDataParallel as DDP

            no_buffer_sync = ({"forward_sync_buffers": False}
                              if "forward_sync_buffers" in inspect.signature(DDP).parameters
                              else {"broadcast_buffers": False})
            self.model = DDP(self.raw_model,
                             device_ids=[self.device.index] if self.device.type == "cuda"
                             else None,
                             find_unused_parameters=cfg.num_experts > 0, **no_buffer_sync)
        if opts.compile:
            self.model = torch.compile(self.model)
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")
        self.log(f"train: {self.max_steps} steps x {opts.batch_size} x {opts.seq_len} tokens "
                 f"x {opts.grad_accum} accum x {self.dist.world} process(es) on "
                 f"{self.device} ({self.precision}), {opts.optimizer}, lr {opts.lr:g} "
                 f"{opts.schedule} (warmup {warmup})")

    def _tokenizer(self, source: DataSource, cache_dir: Path) -> tuple[VesperTokenizer, Path]:
        opts = self.opts
        if self.resume_from is not None:
            path = self.resume_from / TOKENIZER_NAME
        elif opts.tokenizer:
            path = Path(opts.tokenizer)
            path = path / TOKENIZER_NAME if path.is_dir() else path
        elif opts.init_from:
            path = Path(opts.init_from) / TOKENIZER_NAME
        else:
            return train_tokenizer(source, opts.vocab_size, cache_dir, log=self.log)
        return VesperTokenizer.from_file(path), path

    def _report_data(self, cache: TokenCache) -> None:
        report = cache.report
        self.log(f"data: {report.summary()}")
        if self.dist.main:
            from .data import write_json

            write_json(self.out_dir / "data_report.json",
                       {**report.to_dict(), "num_tokens": cache.num_tokens,
                        "num_target_tokens": cache.meta["num_target_tokens"],
                        "cache": str(cache.path), "rebuilt": cache.rebuilt})

    def _build_model(self) -> VesperLM:
        opts, tok = self.opts, self.tokenizer
        if self.resume_from is not None:
            return VesperLM(VesperConfig.from_file(self.resume_from / "config.json"))
        if opts.init_from:
            if opts.preset != "tiny" or opts.hidden_size or opts.num_layers:
                self.log("model: init_from given, so the preset and shape options are ignored")
            return VesperLM.from_pretrained(opts.init_from)
        shape = {k: getattr(opts, k) for k in ("hidden_size", "num_layers", "num_heads",
                                                "ffn_hidden_size") if getattr(opts, k)}
        common = dict(vocab_size=_round_vocab(tok.vocab_size),
                      max_seq_len=opts.max_seq_len or max(opts.seq_len, 1024),
                      dropout=opts.dropout, metahead_grad_to_trunk=opts.metahead_grad_to_trunk,
                      pad_token_id=tok.pad_id, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
        if opts.preset == "auto":
            from .autoscale import plan

            train_tokens = len(self.train_blocks) * opts.seq_len
            scale = plan(train_tokens, common.pop("vocab_size"), opts.seq_len,
                         opts.batch_size * opts.grad_accum, self.device,
                         mixed_precision=self.precision != "fp32", **common)
            for line in scale.reasons:
                self.log(line)
            config = scale.config
            if shape:
                config = VesperConfig.from_dict({**config.to_dict(), **shape, "preset": None})
        else:
            # A preset with its shape overridden is no longer that preset.
            named = {"preset": None} if shape else {}
            config = VesperConfig.from_preset(opts.preset, **common, **shape, **named)
        return VesperLM(config)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        opts = self.opts
        decay = [p for p in self.trainable if p.dim() >= 2]
        no_decay = [p for p in self.trainable if p.dim() < 2]
        # No decay on norms and biases: it only pulls their scale towards zero.
        groups = [{"params": decay, "weight_decay": opts.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        betas = (opts.beta1, opts.beta2)
        if opts.optimizer == "velvet":
            from .optim import VelvetOptimizer

            return VelvetOptimizer(groups, lr=opts.lr, betas=betas, eps=opts.eps,
                                   weight_decay=opts.weight_decay,
                                   entropy_adaptive=opts.entropy_adaptive,
                                   perplexity_guided=opts.perplexity_guided,
                                   sparse_aware=opts.sparse_aware)
        return torch.optim.AdamW(groups, lr=opts.lr, betas=betas, eps=opts.eps,
                                 weight_decay=opts.weight_decay,
                                 fused=self.device.type == "cuda" or None)

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
        self._barrier()
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
        self._resume_rng = rng[self.dist.rank] if self.dist.rank < len(rng) else rng[0]
        self.log(f"resume: continuing from {path} (step {self.step})")
        if self.dist.main and self.metrics_path.is_file():
            # Rows past the checkpoint would be written again: drop them.
            rows = [ln for ln in self.metrics_path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= self.step]
            self.metrics_path.write_text("".join(r + "\n" for r in rows))

    # --- evaluation ------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss, perplexity, top-1 accuracy, MetaHead loss and ECE (15 bins)."""
        opts = self.opts
        model = self.raw_model
        was_training = model.training
        model.eval()
        # eval_batches global batches: the same validation set whatever the process count.
        blocks = self.val_blocks[:opts.eval_batches * opts.batch_size * self.dist.world]
        mine = blocks[self.dist.rank::self.dist.world]
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        meter = CalibrationMeter(ECE_BINS, self.device)
        eos = self.tokenizer.eos_id
        for i in range(0, len(mine), opts.batch_size):
            x, y, m = (t.to(self.device) for t in get_batch(self.cache, mine[i:i + opts.batch_size],
                                                             opts.seq_len))
            with self._autocast():
                out = model(x)
            targets = metahead_targets(out.logits, y, eos)
            sums[0] += lm_loss_sum(out.logits, y, m).double()
            sums[1] += m.sum()
            sums[2] += (targets.correct & m).sum()
            sums[3] += metahead_loss(out, y, m, eos, normalizer=1.0, targets=targets).double()
            meter.update(out.confidence.float(), targets.correct, m)
        stats = torch.cat([sums, meter.stats.reshape(-1)])
        if self.dist.world > 1:
            dist.all_reduce(stats)
        sums = stats[:4]
        meter.stats = stats[4:].reshape(3, ECE_BINS)
        model.train(was_training)
        n = max(float(sums[1]), 1.0)
        loss = float(sums[0]) / n
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)),
                "val_acc": float(sums[2]) / n, "val_meta_loss": float(sums[3]) / n,
                "val_ece": meter.ece()}

    def _evaluate_now(self) -> dict[str, float]:
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
        """Refit the MetaHead's confidence on held-out tokens (:mod:`vesper_sdk.calibrate`).

        Every rank computes the same fit from the same data, so no exchange is needed.
        Returns the fit's figures, or None when there are too few tokens to fit on.
        """
        fit = refit_confidence(self.raw_model, self._calibration_batches(),
                               self.tokenizer.eos_id, self._autocast)
        if fit is None:
            self.log(f"calibration skipped: fewer than {MIN_TOKENS} held-out "
                     "tokens")
        else:
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
                    out = self.model(x)
                lm = lm_loss_sum(out.logits, y, m)
                meta = metahead_loss(out, y, m, eos, normalizer=1.0)
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
            # Sum the rank-usage counts over processes so every rank applies the same
            # balance update, as one process would with the whole batch.
            flat = torch.cat([m.rank_load for m in layers])
            dist.all_reduce(flat)
            for m, part in zip(layers, flat.split([m.rank for m in layers]), strict=True):
                m.rank_load.copy_(part)
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

    # --- the run ---------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Set up, train to ``max_steps`` (or a stop request), save, and report."""
        self.setup()
        opts = self.opts
        if self.dist.main:
            from .data import write_json

            write_json(self.out_dir / "train_options.json", opts.to_json())
        if self.resume_from is not None:
            ckpt.set_rng_state(self._resume_rng)
        if opts.tensorboard and self.dist.main:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.out_dir / "tensorboard"))
            except ImportError:
                self.log("tensorboard: not installed (pip install tensorboard); "
                         "metrics.jsonl has the same figures")
        if opts.profile_memory:
            if self.device.type == "cuda":
                torch.cuda.memory._record_memory_history(max_entries=100_000)
            else:
                self.log("profile_memory: CUDA memory snapshots need a GPU; on CPU "
                         "metrics.jsonl records the process's peak RSS instead")
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

        self.stop.install()
        interrupted = False
        last_ckpt: Path | None = None
        stop_at = min(self.max_steps, opts.stop_at_step or self.max_steps)
        try:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.max_steps, initial=self.step, unit="step",
                             disable=not (opts.progress and self.dist.main), dynamic_ncols=True)
            if opts.eval_every and self.val_blocks.size and self.step == 0:
                self._write_metrics({"step": 0, **self._evaluate_now()})
            interval: list[dict[str, float]] = []
            interval_time = 0.0
            while self.step < stop_at:
                t0 = time.perf_counter()
                stats = self.train_step()
                interval_time += time.perf_counter() - t0
                interval.append(stats)
                if stats["finite"]:
                    self.history.append({"step": self.step, "loss": stats["loss"]})
                self._bar.update(1)
                row: dict[str, Any] = {}
                if self.step % opts.log_every == 0 or self.step == stop_at:
                    row = self._interval_row(interval, interval_time)
                    interval, interval_time = [], 0.0
                    self._bar.set_postfix(loss=f"{row['loss']:.3f}", ppl=f"{row['ppl']:.1f}",
                                          tok_s=f"{row['tok_s']:.0f}", lr=f"{row['lr']:.2e}")
                end = self.step == stop_at
                due_ckpt = (opts.checkpoint_every and self.step % opts.checkpoint_every == 0)
                due_eval = opts.eval_every and self.step % opts.eval_every == 0
                if self.val_blocks.size and (due_eval or end or due_ckpt):
                    row.update(self._evaluate_now())
                if row:
                    self._write_metrics({"step": self.step, **row})
                if stats["stop"]:
                    interrupted = True
                    self.log(f"interrupted (signal {self.stop.signum}) at step {self.step}: "
                             "saving a checkpoint")
                    last_ckpt = self.save_checkpoint()
                    break
                if due_ckpt or end:
                    last_ckpt = self.save_checkpoint()
        finally:
            self.stop.restore()
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            if self.tb is not None:
                self.tb.close()
            if opts.profile_memory and self.device.type == "cuda" and self.dist.main:
                snap = self.out_dir / "memory_snapshot.pickle"
                torch.cuda.memory._dump_snapshot(str(snap))
                torch.cuda.memory._record_memory_history(enabled=None)
                self.log(f"profile_memory: snapshot written to {snap} "
                         "(open it at https://pytorch.org/memory_viz)")
        return self._finish(interrupted, last_ckpt, stop_at)

    def _interval_row(self, interval: list[dict[str, float]], seconds: float) -> dict[str, Any]:
        finite = [s for s in interval if s["finite"]]
        loss = sum(s["loss"] for s in finite) / len(finite) if finite else float("nan")
        meta = sum(s["meta_loss"] for s in finite) / len(finite) if finite else float("nan")
        tokens = sum(s["tokens"] for s in interval)
        key, mem = _peak_memory(self.device)
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0)) if finite else float("nan"),
                "meta_loss": meta, "lr": interval[-1]["lr"],
                "grad_norm": interval[-1]["grad_norm"],
                "tok_s": tokens / max(seconds, 1e-9),
                "epoch": round(self.position / self.sampler.batches_per_epoch, 3),
                "skipped": self.skipped, key: mem}

    def _finish(self, interrupted: bool, last_ckpt: Path | None, stop_at: int) -> TrainResult:
        model_dir = None if interrupted else self.out_dir / MODEL_DIRNAME
        if model_dir is not None and self.opts.calibrate:
            fitted = self.calibrate()
            if fitted:
                self.last_val.update(fitted)
        curve = None
        if self.dist.main:
            if model_dir is not None:
                self.raw_model.save_pretrained(
                    model_dir, extra_files={TOKENIZER_NAME: self.tokenizer_path})
                self.log(f"model saved to {model_dir}")
            curve = write_loss_curve(self.metrics_path, self.out_dir / "loss_curve.png")
        self._barrier()
        if self.dist.owns_group:
            dist.destroy_process_group()
        rows = _read_metrics(self.metrics_path) if self.dist.main else []
        speeds = [r["tok_s"] for r in rows if "tok_s" in r]
        final_loss = self.history[-1]["loss"] if self.history else None
        if interrupted:
            self.log(f"stopped at step {self.step}; resume with resume=True (--resume)")
        return TrainResult(
            model_dir=model_dir, out_dir=self.out_dir, steps=self.step, final_loss=final_loss,
            metrics={k: v for k, v in self.last_val.items() if k != "step"},
            checkpoint=last_ckpt, best_checkpoint=ckpt.best_checkpoint(self.ckpt_root),
            best_val_loss=self.best_val_loss, metrics_path=self.metrics_path,
            loss_curve=curve, tokenizer_path=self.tokenizer_path,
            trainable_params=self.n_trainable, total_params=self.n_total,
            skipped_steps=self.skipped,
            tokens_per_second=float(np.median(speeds)) if speeds else 0.0,
            interrupted=interrupted, history=self.history,
            metrics_step=self.last_val.get("step"))


# ============================================================================ records
def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_loss_curve(metrics_path: str | Path, out_path: str | Path) -> Path | None:
    """Plot training and validation loss from ``metrics.jsonl`` into a PNG (Agg backend)."""
    rows = _read_metrics(Path(metrics_path))
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r and math.isfinite(r["loss"])]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if not train and not val:
        return None
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    from .atomic import atomic_write_file

    return atomic_write_file(out_path, buf.getvalue())


# ============================================================================ API / CLI
def run(opts: TrainOptions, log: Callable[[str], None] | None = None) -> TrainResult:
    """Run a training job described by ``opts``."""
    return Trainer(opts, log=log).run()


def train(data: Any, out_dir: str | Path, preset: str = "tiny", **options: Any) -> TrainResult:
    """Train (or fine-tune) a VesperLM and write its model folder; see :class:`TrainOptions`.

    >>> result = train("builtin:skills", "runs/skills", preset="tiny", max_steps=500)
    >>> result.model_dir        # runs/skills/model: config.json, model.safetensors, ...

    Raises TypeError for an unknown option (naming the valid ones), ValueError (and its
    subclass :class:`~vesper_sdk.data.DataError`) for unusable options or data, and
    :class:`TrainingError` when training diverges.
    """
    valid = [f.name for f in dataclasses.fields(TrainOptions)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(f"train() got unknown option(s) {', '.join(unknown)}; valid options: "
                        f"{', '.join(v for v in valid if v not in ('data', 'out_dir', 'preset'))}")
    return run(TrainOptions(data=data, out_dir=str(out_dir), preset=preset, **options))


def cli(opts: TrainOptions) -> int:
    """``vesper train``: run, then print where everything went. Exit 130 if interrupted."""
    result = run(opts)
    if int(os.environ.get("RANK", "0")) != 0:
        return 130 if result.interrupted else 0  # rank 0 reports for the group
    lines = [f"steps: {result.steps}  final train loss: {result.final_loss}"]
    if result.metrics:
        # Named by its step: after an interrupt the last evaluation may be long past.
        at = "" if result.metrics_step is None else f" at step {result.metrics_step}"
        lines.append(f"validation{at}: "
                     + ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items()))
    if result.model_dir:
        lines.append(f"model: {result.model_dir}  (vesper generate {result.model_dir} ...)")
    if result.checkpoint:
        lines.append(f"last checkpoint: {result.checkpoint}")
    if result.best_checkpoint:
        lines.append(f"best checkpoint: {result.best_checkpoint} "
                     f"(val_loss {result.best_val_loss:.4f})")
    lines.append(f"metrics: {result.metrics_path}")
    if result.loss_curve:
        lines.append(f"loss curve: {result.loss_curve}")
    print("\n".join(lines))
    return 130 if result.interrupted else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m vesper_sdk.train ...`` (what torchrun runs): same options as vesper train."""
    import argparse

    from .cli import add_dataclass_arguments, options_from_args

    parser = argparse.ArgumentParser(
        prog="python -m vesper_sdk.train", description=TrainOptions.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_arguments(parser, TrainOptions)
    args = parser.parse_args(argv)
    try:
        return cli(options_from_args(TrainOptions, args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        # DataError, TrainingError, ConfigError: the message carries the fix.
        print(f"error: {exc}", file=sys.stderr)
        return 2


__all__ = ["CalibrationMeter", "DataError", "LRSchedule", "MetaTargets", "TrainOptions",
           "TrainResult", "Trainer", "TrainingError", "cli", "lm_loss_sum", "metahead_loss",
           "metahead_targets", "run", "train", "write_loss_curve"]


if __name__ == "__main__":
    raise SystemExit(main())
else:
    make_module_callable(__name__, train)
