"""Generation: ``vesper_sdk.load`` and the ``LLM`` facade over one decoding loop."""

from ..device import resolve_device
from ..generate import (
    LLM,
    DecodeBackend,
    GenerateOptions,
    GenerationRequest,
    StepOutput,
    Token,
    TokenScore,
    TorchBackend,
    load,
)

__all__ = ["LLM", "DecodeBackend", "GenerateOptions", "GenerationRequest", "StepOutput",
           "Token", "TokenScore", "TorchBackend", "load", "resolve_device"]
