"""Generation: ``vesper_sdk.load`` and the ``LLM`` facade over one decoding loop.

``llm.py`` the facade and ``load``; ``engine.py`` the decoding loop; ``sampling.py``
``SamplingParams`` and the batched sampler; ``types.py`` what the loop hands out and takes
in; ``torch_backend.py`` the PyTorch backend (static cache, compile, CUDA graphs);
``continuous.py`` continuous batching over KV slots (the server's); ``command.py``
``vesper generate``.
"""

from ..device import resolve_device
from .engine import Engine
from .llm import LLM, load
from .sampling import DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE, SamplingParams
from .torch_backend import TorchBackend
from .types import (
    DecodeBackend,
    GenerationRequest,
    PromptLogprobs,
    StepOutput,
    Token,
    TokenScore,
)

__all__ = ["DEFAULT_MAX_NEW_TOKENS", "DEFAULT_TEMPERATURE", "LLM", "DecodeBackend", "Engine",
           "GenerationRequest", "PromptLogprobs", "SamplingParams", "StepOutput", "Token",
           "TokenScore", "TorchBackend", "load", "resolve_device"]
