"""``vesper_sdk.load``: a model folder as one object, model and tokenizer together."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from .model import CONFIG_NAME, ModelFolderError, VesperLM
from .tokenizer import VesperTokenizer


@dataclass
class TokenScore:
    """One token of a text scored by the model (teacher forcing)."""

    text: str
    id: int
    logprob: float
    confidence: float


@dataclass
class StepOutput:
    """One forward step of a decoding backend."""

    logits: torch.Tensor  # [B,S,V] float32
    confidence: torch.Tensor  # [B,S] MetaHead probability that the top-1 is right
    stop: torch.Tensor  # [B,S] probability that the response ends here
    past_key_values: Any  # the backend's own cache object, passed back unchanged


class DecodeBackend(Protocol):
    """What the decoding loop needs from a model: PyTorch, quantized or ONNX Runtime."""

    vocab_size: int
    max_seq_len: int
    device: torch.device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor, past_key_values: Any) -> StepOutput:
        """input_ids/position_ids [B,S], attention_mask [B,past+S]; past None at prefill."""
        ...


class TorchBackend:
    """DecodeBackend over a VesperLM (fp32, bf16 or bitsandbytes-quantized layers)."""

    def __init__(self, model: VesperLM) -> None:
        self.model = model.eval()
        self.vocab_size = model.config.vocab_size
        self.max_seq_len = model.config.max_seq_len

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.inference_mode()
    def forward(self, input_ids, attention_mask, position_ids, past_key_values) -> StepOutput:
        out = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, use_cache=True)
        return StepOutput(out.logits.float(), out.confidence, out.stop, out.past_key_values)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' -> CUDA when present, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class LLM:
    """A loaded VesperLM: the model, its tokenizer and the folder they came from."""

    def __init__(self, model: VesperLM, tokenizer: VesperTokenizer,
                 model_dir: str | Path | None = None) -> None:
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ModelFolderError(
                f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                f"{model.config.vocab_size}: they do not belong together")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_dir = Path(model_dir) if model_dir is not None else None

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def config(self):
        return self.model.config

    @torch.no_grad()
    def score(self, text: str) -> list[TokenScore]:
        """Each token of ``text`` with its log-probability and the MetaHead's confidence.

        The confidence shown for a token is what the model said at the position that
        predicted it: how sure it was that its own top-1 guess there was right.
        """
        ids = [self.tokenizer.bos_id, *self.tokenizer.encode(text)]
        x = torch.tensor([ids], device=self.device)
        out = self.model(x)
        logp = out.logits[0, :-1].float().log_softmax(-1)
        target = x[0, 1:]
        lp = logp.gather(-1, target[:, None])[:, 0]
        conf = out.confidence[0, :-1]
        return [TokenScore(self.tokenizer.decode([t], skip_special_tokens=False), t,
                           float(lp[i]), float(conf[i]))
                for i, t in enumerate(target.tolist())]

    def __repr__(self) -> str:
        return f"LLM({self.model_dir or 'in memory'}, {self.model.config!r})"


def load(model_dir: str | Path, device: str | torch.device | None = "auto",
         dtype: torch.dtype | None = None) -> LLM:
    """Load a model folder (config.json, model.safetensors, tokenizer.json) ready to use.

    Quantized folders (a ``quantization`` block in config.json) are rebuilt with their
    quantized layers; ``device='auto'`` picks CUDA when present.
    """
    model_dir = Path(model_dir)
    dev = resolve_device(device)
    config_path = model_dir / CONFIG_NAME
    quant = None
    if config_path.is_file():
        try:
            quant = json.loads(config_path.read_text()).get("quantization")
        except json.JSONDecodeError:
            quant = None  # from_pretrained reports the damage with the file's name
    if quant:
        from .quantize import load_quantized

        model = load_quantized(model_dir, device=dev)
    else:
        model = VesperLM.from_pretrained(model_dir, map_location=dev)
        if dtype is not None:
            model = model.to(dtype)
    tokenizer = VesperTokenizer.from_file(model_dir)
    return LLM(model, tokenizer, model_dir)
