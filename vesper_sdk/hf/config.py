"""``VesperHFConfig``: the Hugging Face face of a model folder's ``config.json``.

The folder's config.json is :class:`~vesper_sdk.config.VesperConfig`'s JSON (``model_type``
``vesper``); this class reads the same file for ``AutoConfig`` and gives the SDK config back
(:meth:`VesperHFConfig.to_vesper`). It imports only ``transformers.configuration_utils``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

try:  # transformers 5.x spells it PreTrainedConfig; 4.x PretrainedConfig (5.x keeps the alias)
    from transformers.configuration_utils import PreTrainedConfig as _Base
except ImportError:  # pragma: no cover - transformers 4.x
    from transformers.configuration_utils import PretrainedConfig as _Base

from ..config import VesperConfig

MODEL_TYPE = "vesper"
_FIELDS = [f.name for f in dataclasses.fields(VesperConfig)]
_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")


class VesperHFConfig(_Base):
    """VesperConfig's fields as attributes, plus the names transformers looks for
    (``num_hidden_layers``, ``num_attention_heads``, ``max_position_embeddings``)."""

    model_type = MODEL_TYPE
    attribute_map = {"num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
                     "max_position_embeddings": "max_seq_len",
                     "intermediate_size": "ffn_hidden_size"}

    def __init__(self, **kwargs: Any) -> None:
        defaults = VesperConfig()
        for name in _FIELDS:
            if name not in _TOKEN_IDS:
                setattr(self, name, kwargs.pop(name, getattr(defaults, name)))
        tokens = {name: kwargs.pop(name, getattr(defaults, name)) for name in _TOKEN_IDS}
        # The SDK ties embeddings by sharing one tensor inside VesperLM (TiedHead has no
        # parameter of its own): transformers must not tie anything itself.
        kwargs["tie_word_embeddings"] = False
        kwargs.setdefault("architectures", ["VesperForCausalLM"])
        super().__init__(**tokens, **kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
        # A folder's config.json: fields it lacks are filled as the SDK fills them
        # (VesperConfig.from_dict: a folder written before a field existed keeps what it
        # was built with), not with today's defaults.
        known = {k: v for k, v in config_dict.items() if k in _FIELDS}
        return super().from_dict({**config_dict, **VesperConfig.from_dict(known).to_dict()},
                                 **kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_vesper(self) -> VesperConfig:
        """The SDK's config (what VesperLM is built from)."""
        return VesperConfig(**{name: getattr(self, name) for name in _FIELDS})

    @classmethod
    def from_vesper(cls, config: VesperConfig) -> VesperHFConfig:
        return cls(**config.to_dict())
