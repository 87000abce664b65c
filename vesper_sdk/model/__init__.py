"""VesperLM, its FlyLoRA layers and its MetaHead: the one model definition.

``vesper.py`` holds the model read top to bottom, ``flylora.py`` the FlyLoRA layer,
``metahead.py`` the MetaHead and its logit features.
"""

from .attention import ATTENTION, Attention, RopeTable, RotaryEmbedding, register_attention
from .cache import DynamicCache, SlotCache, StaticCache
from .files import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    ModelFolderError,
    load_state_checked,
    load_weights,
)
from .flylora import FlyLoRALinear, top_k_by_counting
from .metahead import (
    ANSWER,
    CONFIDENCE,
    ERROR,
    N_LOGIT_FEATURES,
    STOP,
    MetaHead,
    answer_confidence,
    logit_features,
)
from .vesper import (
    ERA,
    Block,
    GLUFeedForward,
    MoEFeedForward,
    TiedHead,
    VesperLM,
    VesperOutput,
    paired_ffn_weights,
)

__all__ = ["ANSWER", "ATTENTION", "CONFIDENCE", "CONFIG_NAME", "ERA", "ERROR",
           "N_LOGIT_FEATURES", "STOP", "WEIGHTS_NAME", "Attention", "Block", "DynamicCache",
           "FlyLoRALinear", "GLUFeedForward", "MetaHead", "ModelFolderError",
           "MoEFeedForward", "RopeTable", "RotaryEmbedding", "SlotCache", "StaticCache",
           "TiedHead", "VesperLM", "VesperOutput", "answer_confidence", "load_state_checked",
           "load_weights", "logit_features", "paired_ffn_weights", "register_attention",
           "top_k_by_counting"]
