"""onnxruntime-genai's description of an in-place KV export: ``genai_config.json``.

An in-place export (``export_onnx(..., in_place_kv=True)``) has the inputs and outputs
onnxruntime-genai's decoder-only models have (``input_ids``, ``attention_mask``,
``position_ids``, ``past_key_values.{i}.key/value`` -> ``logits``,
``present.{i}.key/value``, one buffer for past and present), so onnxruntime-genai can run
its generation loop in C++ over the folder as it is:

>>> import numpy as np, onnxruntime_genai as og
>>> model = og.Model("runs/a-int4")          # reads genai_config.json
>>> params = og.GeneratorParams(model)
>>> params.set_search_options(max_length=64)
>>> gen = og.Generator(model, params)
>>> bos = 1  # genai_config.json's bos_token_id: its tokenizer adds none, vesper's prompts have one
>>> gen.append_tokens(np.array([[bos, *og.Tokenizer(model).encode("Hello")]], dtype=np.int32))
>>> while not gen.is_done():
...     gen.generate_next_token()
...     confidence = gen.get_output("confidence")  # the MetaHead, by output name

The MetaHead's outputs (``confidence``, ``stop``, ``answer``) are read by name after each
step. ``vesper_sdk.load(folder, runtime="genai")`` runs this loop behind vesper's own API
(:mod:`.genai_loop`). What onnxruntime-genai does not do alone is vesper's: stop strings,
the regulator, the per-token Token records; batches of prompts of different lengths,
left-padded, do not give onnxruntime-genai the tokens each prompt gives alone (as with its
own builder's models), so feed one prompt per generator, or prompts of one length.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import VesperConfig
from ..inference.sampling import DEFAULT_TEMPERATURE

GENAI_CONFIG_NAME = "genai_config.json"


def genai_config(config: VesperConfig, bos_id: int, eos_id: int, pad_id: int,
                 filename: str = "model.onnx") -> dict[str, Any]:
    """The ``genai_config.json`` of an in-place export of a model with ``config`` (token
    ids from its tokenizer). Greedy by default; threads are ONNX Runtime's default (one
    per core): ``og.Config(folder).overlay(...)`` sets them without editing the file,
    which the folder's manifest covers."""
    return {
        "model": {
            # onnxruntime-genai's generic decoder-only model: its state machinery reads the
            # names below, nothing architecture-specific.
            "type": "decoder",
            "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id,
            "context_length": config.max_seq_len, "vocab_size": config.vocab_size,
            "decoder": {
                "filename": filename,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": config.head_dim, "hidden_size": config.hidden_size,
                "num_attention_heads": config.num_heads,
                "num_key_value_heads": config.num_heads,
                "num_hidden_layers": config.num_layers,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids",
                           "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {
            "do_sample": False, "temperature": DEFAULT_TEMPERATURE, "top_k": 0, "top_p": 1.0,
            "num_beams": 1, "num_return_sequences": 1, "max_length": config.max_seq_len,
            "min_length": 0, "repetition_penalty": 1.0, "early_stopping": True,
            "length_penalty": 1.0, "no_repeat_ngram_size": 0, "diversity_penalty": 0.0,
            # GroupQueryAttention writes each step into the buffers it was given.
            "past_present_share_buffer": True,
        },
    }


def write_genai_config(folder: Path, config: VesperConfig, bos_id: int, eos_id: int,
                       pad_id: int) -> Path:
    """Write :func:`genai_config` into ``folder`` (a folder being assembled aside)."""
    path = Path(folder) / GENAI_CONFIG_NAME
    path.write_text(json.dumps(genai_config(config, bos_id, eos_id, pad_id), indent=2) + "\n")
    return path


__all__ = ["GENAI_CONFIG_NAME", "genai_config", "write_genai_config"]
