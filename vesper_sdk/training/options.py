"""What a training run takes and gives: :class:`TrainOptions` (every option of ``vs.train``
and ``vesper train``, validated on construction) and :class:`TrainResult`."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import skills
from ..config import PRESETS, run_folder_hint
from ..folder import CONFIG_NAME

MODEL_DIRNAME = "model"  # the model folder's name inside out_dir


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss keeps diverging); the message says why."""


def _opt(default: Any, help: str, **meta: Any) -> Any:
    # A dataclass field whose metadata the CLI reads (help text, choices, positional).
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
      torchrun --nproc_per_node 2 -m vesper_sdk.training data/ --out-dir runs/ddp
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
    calibration_examples: int = _opt(skills.CALIBRATION_CHATS, "builtin:skills: chats drawn "
                                     "from the calibration split for --calibrate")
    calibration_answers: int = _opt(4000, "builtin:skills: questions drawn from the "
                                    "calibration split, answered greedily and graded, to "
                                    "fit the MetaHead's answer-level confidence (0: not "
                                    "fitted)")
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
                                   "default: on plain text it trails AdamW in "
                                   "benchmarks/convergence.py)")
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
                                        "(less memory, one more forward pass)")
    chunked_loss: bool = _opt(True, "compute the LM loss, its gradient and the MetaHead's "
                              "targets a chunk of tokens at a time, never the whole "
                              "[tokens, vocabulary] logits (less memory, faster); off: the "
                              "plain full-logits loss")
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
        for name in ("eval_every", "checkpoint_every", "keep_checkpoints", "calibration_answers"):
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
            need((init / CONFIG_NAME).is_file(),
                 f"init_from {init} is not a model folder: {CONFIG_NAME} is missing."
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
