"""VesperLM configuration: one dataclass, five presets, JSON round trip."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .integrity import verify_file

# hidden size / layers / heads / FFN width, as in the seed.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=256, num_layers=6, num_heads=4, ffn_hidden_size=1024),
    "small": dict(hidden_size=512, num_layers=8, num_heads=8, ffn_hidden_size=2048),
    "medium": dict(hidden_size=768, num_layers=12, num_heads=12, ffn_hidden_size=3072),
    "large": dict(hidden_size=1024, num_layers=24, num_heads=16, ffn_hidden_size=4096),
    "xlarge": dict(hidden_size=2048, num_layers=24, num_heads=16, ffn_hidden_size=5504),
}


class ConfigError(ValueError):
    """A configuration value is out of range or inconsistent; the message says what to change."""


@dataclass
class VesperConfig:
    """Shape and behaviour of a VesperLM model.

    Build one from a preset (``VesperConfig.from_preset("tiny", vocab_size=4096)``) or
    field by field; ``validate()`` runs on construction and names the field to fix.
    """

    vocab_size: int = 4096
    hidden_size: int = 256
    num_layers: int = 6
    num_heads: int = 4
    ffn_hidden_size: int = 1024
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0
    initializer_range: float = 0.02
    tie_embeddings: bool = True
    # ERA activation: GELU(x) + gamma * softplus(x)
    era_gamma: float = 0.1
    # FlyLoRA on the FFN's gate and up projections (0 rank disables it).
    flylora_rank: int = 16
    flylora_topk: int = 4
    flylora_alpha: float = 1.0
    flylora_a_nnz: int = 8  # non-zeros per row of the frozen sparse A
    flylora_bias_update_rate: float = 1e-3
    # Optional mixture-of-experts FFN (0 experts = dense GLU FFN).
    num_experts: int = 0
    moe_top_k: int = 2
    moe_aux_loss_coef: float = 0.01
    # MetaHead on the final hidden state (plus three statistics of the LM's own logits).
    metahead_hidden_size: int = 128
    metahead_grad_to_trunk: bool = False
    metahead_logit_features: bool = True
    # Hidden units of the answer MLP beside the answer row (0: none). `vesper calibrate`
    # sets it: it keeps the MLP only where cross-validation on graded answers prefers it.
    metahead_answer_hidden: int = 0
    # The answer check (empty: none): four numbers `vesper calibrate` fits where its
    # shifted questions show the token confidence catching what the answer head misses;
    # an answer's confidence then needs both to agree (metahead.answer_confidence_from_sum).
    metahead_answer_check: list[float] = field(default_factory=list)
    gradient_checkpointing: bool = False
    # Special token ids, filled from the tokenizer.
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    preset: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> VesperConfig:
        """Config for a named preset (tiny/small/medium/large/xlarge), with overrides."""
        if name not in PRESETS:
            raise ConfigError(
                f"unknown preset {name!r}: choose one of {', '.join(PRESETS)} "
                "(or build VesperConfig(...) field by field)"
            )
        values: dict[str, Any] = {**PRESETS[name], "preset": name}
        values.update(overrides)
        return cls(**values)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def validate(self) -> None:
        """Raise ConfigError naming the field and the fix when a value cannot work."""

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads",
                     "ffn_hidden_size", "max_seq_len"):
            value = getattr(self, name)
            need(isinstance(value, int) and value > 0,
                 f"{name} must be a positive integer, got {value!r}")
        need(self.hidden_size % self.num_heads == 0,
             f"hidden_size ({self.hidden_size}) must be divisible by num_heads "
             f"({self.num_heads}): change one of them")
        need(self.head_dim % 2 == 0,
             f"head dimension hidden_size/num_heads = {self.head_dim} must be even for RoPE")
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        need(self.flylora_rank >= 0, f"flylora_rank must be >= 0, got {self.flylora_rank}")
        if self.flylora_rank:
            need(1 <= self.flylora_topk <= self.flylora_rank,
                 f"flylora_topk ({self.flylora_topk}) must be between 1 and flylora_rank "
                 f"({self.flylora_rank})")
            need(1 <= self.flylora_a_nnz,
                 f"flylora_a_nnz must be >= 1, got {self.flylora_a_nnz}")
        need(self.num_experts >= 0, f"num_experts must be >= 0, got {self.num_experts}")
        if self.num_experts:
            need(1 <= self.moe_top_k <= self.num_experts,
                 f"moe_top_k ({self.moe_top_k}) must be between 1 and num_experts "
                 f"({self.num_experts})")
        need(self.metahead_hidden_size > 0, "metahead_hidden_size must be positive")
        need(self.metahead_answer_hidden >= 0,
             f"metahead_answer_hidden must be >= 0, got {self.metahead_answer_hidden}")
        check = self.metahead_answer_check
        need(isinstance(check, (list, tuple)) and len(check) in (0, 4)
             and all(isinstance(v, (int, float)) and math.isfinite(v) for v in check),
             f"metahead_answer_check must be empty or four finite numbers, got {check!r}")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            need(0 <= value < self.vocab_size,
                 f"{name} ({value}) must be a token id below vocab_size ({self.vocab_size})")

    # --- serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VesperConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - {"model_type", "architectures", "quantization",
                                                "auto_map"})
        if unknown:
            raise ConfigError(
                f"unknown config field(s) {', '.join(unknown)}: this config.json was written "
                "by another tool or a newer vesper-sdk; remove the field(s) or upgrade"
            )
        values = {k: v for k, v in data.items() if k in known}
        # Folders written before the MetaHead read the logits have a hidden-state-only head.
        values.setdefault("metahead_logit_features", False)
        return cls(**values)

    def to_json(self) -> str:
        payload = {"model_type": "vesper", "architectures": ["VesperLM"], **self.to_dict()}
        return json.dumps(payload, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> VesperConfig:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_file(cls, path: str | Path) -> VesperConfig:
        path = Path(path)
        if path.is_file():
            verify_file(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{path} is missing: a VesperLM model folder needs config.json "
                "(write one with model.save_pretrained(dir) or `vesper train`)."
                + run_folder_hint(path.parent)
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path} is not valid JSON ({exc}); the file is damaged, "
                              "restore it or re-save the model") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a JSON object, got {type(data).__name__}")
        return cls.from_dict(data)

    # --- size -------------------------------------------------------------------------
    def num_parameters(self) -> int:
        """Trainable parameter count of VesperLM(self), computed from the shapes alone."""
        d, f, v = self.hidden_size, self.ffn_hidden_size, self.vocab_size
        attn = 4 * d * d  # q, k, v, o without bias
        norms = 2 * d

        def flylora(inp: int, out: int) -> int:
            return inp * out + (out * self.flylora_rank if self.flylora_rank else 0)

        glu = flylora(d, f) * 2 + f * d  # gate + up (FlyLoRA), down
        if self.num_experts:
            ffn = self.num_experts * glu + d * self.num_experts  # experts + router
        else:
            ffn = glu
        block = attn + norms + ffn
        m = self.metahead_hidden_size
        meta_in = d + (3 if self.metahead_logit_features else 0)  # model.N_LOGIT_FEATURES
        meta = meta_in * m + m + m * 5 + 5
        reads = self.num_layers * d + meta_in - d + 1  # what the answer row reads
        meta += reads + 1  # the answer row and its bias
        a = self.metahead_answer_hidden
        meta += reads * a + a + a + 1 if a else 0  # the answer MLP
        total = v * d + self.num_layers * block + d + meta
        if not self.tie_embeddings:
            total += v * d
        return total

    def estimate_flops_per_token(self, seq_len: int | None = None) -> float:
        """Approximate training FLOPs per token (6N + attention), for MFU figures."""
        # The (tied) embedding matrix counts once: as the LM head's matmul.
        s = seq_len or self.max_seq_len
        return 6.0 * self.num_parameters() + 12 * self.num_layers * self.hidden_size * s

    def __repr__(self) -> str:  # compact: the full dict is long
        shape = f"{self.hidden_size}/{self.num_layers}/{self.num_heads}, ffn {self.ffn_hidden_size}"
        return (f"VesperConfig({self.preset or 'custom'}: {shape}, vocab {self.vocab_size}, "
                f"~{self.num_parameters() / 1e6:.1f}M params)")


def run_folder_hint(folder: str | Path) -> str:
    """" Did you mean FOLDER/model? ..." when ``folder`` is a training run's output folder
    (``vesper train --out-dir D`` writes the model folder to D/model), else ""."""
    inner = Path(folder) / "model"
    if (inner / "config.json").is_file():
        return (f" Did you mean {inner}? (`vesper train --out-dir D` writes the model "
                "folder to D/model)")
    return ""
