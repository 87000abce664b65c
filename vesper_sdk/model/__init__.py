"""VesperLM, its FlyLoRA layers and its MetaHead: the one model definition.

``vesper.py`` holds the model read top to bottom, ``flylora.py`` the FlyLoRA layer,
``metahead.py`` the MetaHead and its logit features.
"""

from ..folder import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    ModelFolderError,
    load_state_checked,
    load_weights,
)
from .flylora import FlyLoRALinear, Linear, project, top_k_by_counting
from .metahead import N_LOGIT_FEATURES, MetaHead, logit_features
from .vesper import (
    ERA,
    Attention,
    Block,
    GLUFeedForward,
    KVCache,
    MoEFeedForward,
    RotaryEmbedding,
    VesperLM,
    VesperOutput,
    paired_ffn_weights,
)

__all__ = ["CONFIG_NAME", "ERA", "N_LOGIT_FEATURES", "WEIGHTS_NAME", "Attention", "Block",
           "FlyLoRALinear", "GLUFeedForward", "KVCache", "Linear", "MetaHead",
           "ModelFolderError", "MoEFeedForward", "RotaryEmbedding", "VesperLM", "VesperOutput",
           "load_state_checked", "load_weights", "logit_features", "paired_ffn_weights",
           "project", "top_k_by_counting"]
