"""AutoScaler: ``preset="auto"`` picks a model size from the data and the device.

Rule: about ``tokens_per_param = 20`` training tokens per parameter, the
Chinchilla compute-optimal ratio (Hoffmann et al. 2022), so the target is
``params ~ dataset tokens / 20``. The pick is the largest shape on :data:`LADDER` whose
parameter count (vocabulary included) is within that target and whose estimated training
memory fits the device budget: 85 % of the free CUDA memory, or half of the system RAM on
CPU.

The ladder goes below the ``tiny`` preset (pico, nano, micro: fewer layers and a
narrower model), because a dataset of a few hundred thousand tokens supports only a
few-hundred-thousand-parameter model; when even the smallest rung is over the target it
is used anyway (with a note: expect to overfit; more data or fewer steps help). Between
``tiny`` and ``small`` a ``mini`` rung keeps the steps of the ladder below ~4x.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import PRESETS, VesperConfig

# name -> shape, smallest first. Heads keep head_dim even (RoPE) and >= 32.
LADDER: dict[str, dict[str, int]] = {
    "pico": dict(hidden_size=64, num_layers=2, num_heads=2, ffn_hidden_size=256),
    "nano": dict(hidden_size=128, num_layers=3, num_heads=4, ffn_hidden_size=512),
    "micro": dict(hidden_size=192, num_layers=4, num_heads=4, ffn_hidden_size=768),
    "tiny": PRESETS["tiny"],
    "mini": dict(hidden_size=384, num_layers=6, num_heads=6, ffn_hidden_size=1536),
    "small": PRESETS["small"],
    "medium": PRESETS["medium"],
    "large": PRESETS["large"],
    "xlarge": PRESETS["xlarge"],
}
TOKENS_PER_PARAM = 20.0


@dataclass
class ScalePlan:
    """The chosen config and the reasoning behind it (printed by ``vesper train``)."""

    config: VesperConfig
    name: str
    target_params: int
    memory_budget: int
    reasons: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return "\n".join(self.reasons)


def memory_budget(device: str | torch.device) -> tuple[int, str]:
    """Bytes a training run may use on ``device``, and where the figure comes from."""
    device = torch.device(device)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(free * 0.85), (f"85% of the {free / 2**30:.1f} GiB free on "
                                  f"{torch.cuda.get_device_name(device)}")
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 * 2**30  # a conservative guess where sysconf is missing
    return int(total * 0.5), f"half of the {total / 2**30:.1f} GiB of system RAM"


def estimate_training_memory(config: VesperConfig, batch_size: int, seq_len: int,
                             mixed_precision: bool = False) -> int:
    """Rough bytes for one training step: weights, grads, Adam moments, activations, logits.

    16 bytes per parameter (fp32 weights and grads, two fp32 moments); activations per
    layer and token ~ 34 * hidden + 5 * heads * seq (Korthikanti et al. 2022, 16-bit
    values; doubled for fp32) times 1.5 for the GLU FFN's wider intermediate; logits
    three times (values, softmax, gradient) in fp32.
    """
    params = config.num_parameters()
    act_bytes = 2 if mixed_precision else 4
    per_token_layer = (34 * config.hidden_size + 5 * config.num_heads * seq_len) / 2 * act_bytes
    activations = 1.5 * per_token_layer * config.num_layers * batch_size * seq_len
    logits = 3 * 4 * batch_size * seq_len * config.vocab_size
    return int(16 * params + activations + logits)


def plan(num_tokens: int, vocab_size: int, seq_len: int, batch_size: int,
         device: str | torch.device = "cpu", tokens_per_param: float = TOKENS_PER_PARAM,
         mixed_precision: bool = False, budget: int | None = None,
         **config_kwargs: Any) -> ScalePlan:
    """Pick a config for ``num_tokens`` training tokens on ``device``.

    ``config_kwargs`` (vocab-independent fields such as ``max_seq_len``, special token
    ids) are passed to every candidate config. ``budget`` overrides the device's memory.
    """
    if budget is None:
        budget, budget_note = memory_budget(device)
    else:
        budget_note = "given"
    target = int(num_tokens / tokens_per_param)
    reasons = [f"autoscale: {num_tokens:,} training tokens / {tokens_per_param:g} tokens per "
               f"parameter (Chinchilla) -> target ~{target:,} parameters",
               f"autoscale: memory budget {budget / 2**30:.1f} GiB ({budget_note}) for batch "
               f"{batch_size} x seq {seq_len}"]
    candidates = []
    for name, shape in LADDER.items():
        cfg = VesperConfig(**shape, vocab_size=vocab_size, preset=name, **config_kwargs)
        candidates.append((name, cfg, cfg.num_parameters(),
                           estimate_training_memory(cfg, batch_size, seq_len, mixed_precision)))
    fitting = [c for c in candidates if c[3] <= budget]
    if not fitting:
        name, cfg, params, mem = candidates[0]
        reasons.append(f"autoscale: even '{name}' needs ~{mem / 2**30:.1f} GiB, over budget; "
                       "using it anyway (lower batch_size or seq_len if it runs out of memory)")
    else:
        within = [c for c in fitting if c[2] <= target]
        if within:
            name, cfg, params, mem = within[-1]
            bigger = [c for c in candidates if c[2] > params]
            why = ""
            if bigger:
                nb, _, pb, mb = bigger[0]
                why = (f" (next, '{nb}' with {pb / 1e6:.2f}M, "
                       + ("exceeds the data" if pb > target else "does not fit in memory")
                       + ")")
            reasons.append(f"autoscale: chose '{name}': {params / 1e6:.2f}M parameters, "
                           f"~{mem / 2**30:.2f} GiB to train{why}")
        else:
            name, cfg, params, mem = fitting[0]
            reasons.append(f"autoscale: the data supports fewer parameters than the smallest "
                           f"shape; chose '{name}' ({params / 1e6:.2f}M parameters) anyway: "
                           "expect overfitting, watch the validation loss (more data helps)")
    return ScalePlan(config=cfg, name=name, target_params=target, memory_budget=budget,
                     reasons=reasons)
