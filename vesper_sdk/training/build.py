"""What a run trains: its tokenizer, its model and its optimizer, built from the options."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ..config import VesperConfig
from ..folder import CONFIG_NAME
from ..model import VesperLM
from ..tokenizer import TOKENIZER_NAME, VesperTokenizer
from .autoscale import plan
from .data import DataSource, train_tokenizer
from .optim import VelvetOptimizer
from .options import TrainOptions

Log = Callable[[str], None]


def round_vocab(n: int, multiple: int = 64) -> int:
    """``n`` rounded up to a multiple of ``multiple``."""
    # Tensor-core friendly embedding/LM-head width; the extra ids are never produced.
    return -(-n // multiple) * multiple


def load_tokenizer(opts: TrainOptions, source: DataSource, cache_dir: Path,
                   resume_from: Path | None, log: Log) -> tuple[VesperTokenizer, Path]:
    """The checkpoint's tokenizer on resume, else ``--tokenizer``, else the initial
    model's, else one trained on the data; with the path of its JSON."""
    if resume_from is not None:
        path = resume_from / TOKENIZER_NAME
    elif opts.tokenizer:
        path = Path(opts.tokenizer)
        path = path / TOKENIZER_NAME if path.is_dir() else path
    elif opts.init_from:
        path = Path(opts.init_from) / TOKENIZER_NAME
    else:
        return train_tokenizer(source, opts.vocab_size, cache_dir, log=log)
    return VesperTokenizer.from_file(path), path


def build_model(opts: TrainOptions, tok: VesperTokenizer, train_tokens: int,
                device: torch.device, precision: str, resume_from: Path | None,
                log: Log) -> VesperLM:
    """The checkpoint's model shape on resume, the ``init_from`` model, or a new model of
    the preset (``"auto"``: sized from ``train_tokens`` and the device memory)."""
    if resume_from is not None:
        return VesperLM(VesperConfig.from_file(resume_from / CONFIG_NAME))
    if opts.init_from:
        if opts.preset != "tiny" or opts.hidden_size or opts.num_layers:
            log("model: init_from given, so the preset and shape options are ignored")
        return VesperLM.from_pretrained(opts.init_from)
    shape = {k: getattr(opts, k) for k in ("hidden_size", "num_layers", "num_heads",
                                            "ffn_hidden_size") if getattr(opts, k)}
    common = dict(vocab_size=round_vocab(tok.vocab_size),
                  max_seq_len=opts.max_seq_len or max(opts.seq_len, 1024),
                  dropout=opts.dropout, metahead_grad_to_trunk=opts.metahead_grad_to_trunk,
                  pad_token_id=tok.pad_id, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    if opts.preset == "auto":
        scale = plan(train_tokens, common.pop("vocab_size"), opts.seq_len,
                     opts.batch_size * opts.grad_accum, device,
                     mixed_precision=precision != "fp32", **common)
        for line in scale.reasons:
            log(line)
        config = scale.config
        if shape:
            config = VesperConfig.from_dict({**config.to_dict(), **shape, "preset": None})
    else:
        # A preset with its shape overridden is no longer that preset.
        named = {"preset": None} if shape else {}
        config = VesperConfig.from_preset(opts.preset, **common, **shape, **named)
    return VesperLM(config)


def build_optimizer(opts: TrainOptions, trainable: list[torch.nn.Parameter],
                    device: torch.device) -> torch.optim.Optimizer:
    """Velvet or AdamW over ``trainable``, weight decay on matrices only."""
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    # No decay on norms and biases: it only pulls their scale towards zero.
    groups = [{"params": decay, "weight_decay": opts.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    betas = (opts.beta1, opts.beta2)
    if opts.optimizer == "velvet":
        return VelvetOptimizer(groups, lr=opts.lr, betas=betas, eps=opts.eps,
                               weight_decay=opts.weight_decay,
                               entropy_adaptive=opts.entropy_adaptive,
                               perplexity_guided=opts.perplexity_guided,
                               sparse_aware=opts.sparse_aware)
    return torch.optim.AdamW(groups, lr=opts.lr, betas=betas, eps=opts.eps,
                             weight_decay=opts.weight_decay,
                             fused=device.type == "cuda" or None)
