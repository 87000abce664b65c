"""What transformers reads in a model folder, written while the folder is assembled.

:func:`write_folder_files` is called by each writer of a model folder (``save_pretrained``,
``quantize``, the ONNX export) on the folder being assembled, before its manifest is
written, so every file here is covered by ``manifest.json`` like the weights:

- ``tokenizer_config.json`` + ``special_tokens_map.json`` beside a ``tokenizer.json``
  (BOS/EOS/PAD, role tokens, the Jinja chat template: ``VesperTokenizer.hf_files``), and
  the tokenizer.json's BOS post-processor (transformers adds BOS to plain prompts, as the
  SDK does; the SDK's own encoding never uses it);
- ``modeling_vesper.py`` and config.json's ``auto_map`` (PyTorch folders), for
  ``trust_remote_code=True`` loading with the SDK installed (the shim only imports it);
- ``README.md``, the model card (``card.py``), created or its "Model" section refreshed.

No transformers import: this runs in every save.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import VesperConfig
from ..tokenizer import TOKENIZER_NAME, hf_tokenizer_files, with_bos_processor
from . import card

SHIM_NAME = "modeling_vesper.py"
AUTO_MAP = {"AutoConfig": "modeling_vesper.VesperHFConfig",
            "AutoModelForCausalLM": "modeling_vesper.VesperForCausalLM"}
SHIM = '''"""transformers' trust_remote_code entry point for this VesperLM folder.

The model is defined once, in vesper-sdk (pip install vesper-sdk): this file only imports it.
With vesper-sdk imported, AutoModelForCausalLM loads the folder without trust_remote_code.
"""

from vesper_sdk.hf.config import VesperHFConfig
from vesper_sdk.hf.modeling import VesperForCausalLM

__all__ = ["VesperHFConfig", "VesperForCausalLM"]
'''


def write_folder_files(tmp: Path, config: VesperConfig, kind: str = "torch",
                       details: dict[str, Any] | None = None) -> None:
    """Write the transformers files and the model card into ``tmp`` (a folder being
    assembled by ``atomic_write_folder``). ``kind``: torch, bnb or onnx; ``details``:
    extra rows for the card's Model section (quantization method, ONNX settings)."""
    tmp = Path(tmp)
    if (tmp / TOKENIZER_NAME).is_file():
        text = (tmp / TOKENIZER_NAME).read_text(encoding="utf-8")
        fixed = with_bos_processor(text)
        if fixed != text:
            (tmp / TOKENIZER_NAME).write_text(fixed, encoding="utf-8")
        for name, data in hf_tokenizer_files(config.max_seq_len).items():
            (tmp / name).write_bytes(data)
    if kind in ("torch", "bnb") and (tmp / "config.json").is_file():
        data = json.loads((tmp / "config.json").read_text())
        data["auto_map"] = AUTO_MAP
        (tmp / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True))
        (tmp / SHIM_NAME).write_text(SHIM)
    readme = tmp / card.CARD_NAME
    text = readme.read_text(encoding="utf-8") if readme.is_file() else None
    text = card.update_card_text(text, "Model", card.model_section(config, kind, details),
                                 card.base_metadata(kind))
    text = card.update_card_text(text, "Use", card.use_section(kind))
    readme.write_text(text, encoding="utf-8")
