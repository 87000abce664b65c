"""``VesperForCausalLM``: a transformers ``PreTrainedModel`` + ``GenerationMixin`` around the
one :class:`~vesper_sdk.model.VesperLM`.

No maths lives here: ``forward`` calls ``VesperLM.forward`` and repackages its output.
transformers' ``generate()`` hands the model its own cache object (``transformers.
DynamicCache``); :class:`HFCacheView` lets VesperLM's attention write into it through the
SDK cache interface (``length`` before the step, ``update(layer, k, v)`` returning what to
attend over), so transformers keeps owning the cache (beam reordering, cropping) and the
attention code is the SDK's. Loading goes through ``VesperLM.from_pretrained`` (integrity
checked against the folder's manifest), saving through ``VesperLM.save_pretrained``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache as HFDynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..model.cache import DynamicCache
from ..model.vesper import VesperLM
from .config import VesperHFConfig

# transformers 5.x names the cache ``cache`` (inputs and outputs); 4.x ``past_key_values``.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ \
    else "past_key_values"


@dataclass
class VesperCausalLMOutput(CausalLMOutputWithPast):
    """transformers' causal-LM output plus the MetaHead's per-token outputs: ``confidence``
    and ``stop`` [B,S] (probabilities), ``error_logits`` [B,S,3]."""

    confidence: torch.Tensor | None = None
    stop: torch.Tensor | None = None
    error_logits: torch.Tensor | None = None


class HFCacheView(DynamicCache):
    """The SDK cache interface over a transformers ``Cache``: VesperLM writes each layer's
    k/v [B,H,S,D] into it and attends over what it returns; nothing is copied."""

    def __init__(self, hf_cache: Any) -> None:
        super().__init__()
        self.hf = hf_cache

    @property
    def length(self) -> int:
        return int(self.hf.get_seq_length())

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor,
               ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.hf.update(key, value, layer)


class VesperForCausalLM(PreTrainedModel, GenerationMixin):
    """VesperLM for ``AutoModelForCausalLM``, ``generate()`` and lm-evaluation-harness.

    ``model.vesper`` is the wrapped :class:`VesperLM`; outputs carry its MetaHead's
    ``confidence``, ``stop`` and ``error_logits`` beside ``logits``.
    """

    config_class = VesperHFConfig
    base_model_prefix = "vesper"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def __init__(self, config: VesperHFConfig, vesper: VesperLM | None = None) -> None:
        super().__init__(config)
        self.vesper = vesper if vesper is not None else VesperLM(config.to_vesper())
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        pass  # VesperLM initialises itself; loading replaces every tensor

    # --- embeddings (transformers' resize/tie helpers ask for these) -----------------
    def get_input_embeddings(self) -> torch.nn.Module:
        return self.vesper.embed

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.vesper.embed = value

    def get_output_embeddings(self) -> None:
        return None  # tied inside VesperLM (no separate weight to tie or resize)

    # --- forward -------------------------------------------------------------------
    def forward(self, input_ids: torch.LongTensor | None = None,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None,
                cache: Any = None, past_key_values: Any = None,
                use_cache: bool | None = None, labels: torch.LongTensor | None = None,
                return_dict: bool | None = None, **kwargs: Any) -> VesperCausalLMOutput:
        if input_ids is None:
            raise ValueError("VesperForCausalLM needs input_ids (inputs_embeds is not supported)")
        hf_cache = cache if cache is not None else past_key_values
        # generate() passes use_cache=True; a bare forward (scoring) builds no cache.
        if hf_cache is None and use_cache:
            hf_cache = HFDynamicCache()
        if hf_cache is not None and not hasattr(hf_cache, "get_seq_length"):
            raise TypeError(f"{type(hf_cache).__name__} is not a transformers Cache: pass a "
                            "transformers.DynamicCache (or leave the cache to generate())")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("VesperForCausalLM takes a 2-D attention_mask [batch, past+seq]")
        out = self.vesper(input_ids, attention_mask=attention_mask,
                          past_key_values=HFCacheView(hf_cache) if hf_cache is not None else None,
                          use_cache=hf_cache is not None, position_ids=position_ids)
        loss = None
        if labels is not None:
            logits = out.logits[:, :-1].float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1).to(logits.device),
                                   ignore_index=-100)
        return VesperCausalLMOutput(loss=loss, logits=out.logits, confidence=out.confidence,
                                    stop=out.stop, error_logits=out.error_logits,
                                    **{CACHE_FIELD: hf_cache})

    # --- the model folder ----------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *model_args: Any,
                        config: VesperHFConfig | None = None, **kwargs: Any,
                        ) -> VesperForCausalLM:
        """Load a model folder the SDK wrote, through ``VesperLM.from_pretrained`` (or the
        SDK's bitsandbytes loader for a quantized folder). Honours ``dtype`` /
        ``torch_dtype`` and a single-device ``device_map``; other loading options of
        transformers are accepted and ignored."""
        from ..folder import ModelFolder

        folder = _local_folder(pretrained_model_name_or_path, kwargs)
        kind = ModelFolder(folder).kind
        device = _device(kwargs.get("device_map"))
        if kind == "onnx":
            raise ValueError(f"{folder} is an ONNX export: load it with vesper_sdk.load(...) "
                             "(onnxruntime), or point transformers at the torch model folder")
        if kind == "bnb":
            from ..quantization import load_quantized

            vesper = load_quantized(folder, device=device or "cpu")
        else:
            vesper = VesperLM.from_pretrained(folder)
        if not isinstance(config, VesperHFConfig):
            config = VesperHFConfig.from_vesper(vesper.config)
        model = cls(config, vesper=vesper)
        model.generation_config = _generation_config(folder, config)
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        if isinstance(dtype, str) and dtype != "auto":
            dtype = getattr(torch, dtype)
        if isinstance(dtype, torch.dtype) and kind == "torch":
            model = model.to(dtype)
        if device is not None and kind == "torch":
            model = model.to(device)
        return model.eval()

    def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> None:
        """Write an SDK model folder (``VesperLM.save_pretrained``), loadable both ways."""
        self.vesper.save_pretrained(save_directory)


def _local_folder(name: str | Path, kwargs: dict[str, Any]) -> Path:
    folder = Path(name)
    if folder.is_dir():
        return folder
    from huggingface_hub import snapshot_download  # a Hub id: fetch it (or its cache)

    return Path(snapshot_download(str(name), revision=kwargs.get("revision"),
                                  cache_dir=kwargs.get("cache_dir"),
                                  token=kwargs.get("token")))


def _device(device_map: Any) -> torch.device | None:
    if device_map is None:
        return None
    if isinstance(device_map, dict):  # one device for the whole (small) model
        devices = set(device_map.values())
        device_map = devices.pop() if len(devices) == 1 else "auto"
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    return torch.device(device_map)


def _generation_config(folder: Path, config: VesperHFConfig) -> GenerationConfig:
    if (folder / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(folder)
    return GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                            pad_token_id=config.pad_token_id)
