"""The model card: every model folder's ``README.md``, in Hugging Face's format.

YAML front matter (license, ``library_name: vesper-sdk``, tags, metrics) then sections, each
between ``<!-- vesper-card:NAME -->`` and ``<!-- /vesper-card:NAME -->`` so that the command
that owns a section rewrites it in place and leaves the rest (and any text the user added
outside the markers) alone: the folder writers refresh "Model" and "Use", training writes
"Training", ``vesper eval`` "Evaluation", ``vesper quantize --report`` "Quantization", the
ONNX export "ONNX export" (in the source folder; the export's own card says what it is).

:func:`update_model_card` writes through ``atomic_write_file``, which updates the folder's
manifest. Folders inside the installed package (the bundled default model) are left as
they are.
"""

from __future__ import annotations

import re
import shlex
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_file
from ..config import VesperConfig

CARD_NAME = "README.md"
SECTIONS = ["Model", "Training", "Evaluation", "Quantization", "ONNX export", "Use"]
DEFAULT_METADATA: dict[str, Any] = {
    "license": "apache-2.0", "library_name": "vesper-sdk", "pipeline_tag": "text-generation",
    "tags": ["vesper-sdk", "vesperlm", "text-generation", "metacognition", "flylora"],
    "metrics": [],
}
_FRONT = re.compile(r"\A---\n(.*?)\n---\n?", re.S)
_PACKAGE = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- text
def _yaml_scalar(value: Any) -> str:
    text = str(value)
    return text if re.fullmatch(r"[A-Za-z0-9_.\-/ ]+", text) and text.strip() == text \
        else '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_front_matter(meta: Mapping[str, Any]) -> str:
    lines = ["---"]
    for key, value in meta.items():
        if isinstance(value, list | tuple):
            lines.append(f"{key}:" + ("" if value else " []"))
            lines += [f"- {_yaml_scalar(v)}" for v in value]
        else:
            lines.append(f"{key}: {_yaml_scalar(value)}")
    return "\n".join(lines + ["---", ""])


def parse_front_matter(text: str) -> tuple[dict[str, Any], str]:
    """(metadata, body) of a card; reads the flat YAML :func:`render_front_matter` writes
    (keys with scalars or lists of scalars; anything else is kept as a raw string)."""
    m = _FRONT.match(text)
    if not m:
        return {}, text
    meta: dict[str, Any] = {}
    key = None
    for line in m.group(1).splitlines():
        if line.startswith("- ") and key is not None and isinstance(meta.get(key), list):
            meta[key].append(_unquote(line[2:]))
        elif ":" in line and not line.startswith((" ", "-")):
            key, _, value = line.partition(":")
            value = value.strip()
            meta[key] = [] if value in ("", "[]") else _unquote(value)
    return meta, text[m.end():]


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    return value


def render_section(name: str, content: str | Mapping[str, Any]) -> str:
    """A section's markdown: a string as it is, a mapping as a two-column table."""
    if isinstance(content, Mapping):
        rows = [f"| {k} | {_cell(v)} |" for k, v in content.items() if v is not None]
        body = "\n".join(["| | |", "|---|---|", *rows])
    else:
        body = content.strip()
    return f"<!-- vesper-card:{name} -->\n## {name}\n\n{body}\n<!-- /vesper-card:{name} -->\n"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        value = f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def update_card_text(text: str | None, section: str, content: str | Mapping[str, Any],
                     metadata: Mapping[str, Any] | None = None) -> str:
    """The card ``text`` (None: a new card) with ``section`` replaced (or inserted in
    :data:`SECTIONS` order) and ``metadata`` merged into the front matter (lists are
    unioned: a section's metrics join the others')."""
    meta, body = parse_front_matter(text or "")
    merged = {**DEFAULT_METADATA, **meta}
    for key, value in (metadata or {}).items():
        if isinstance(value, list) and isinstance(merged.get(key), list):
            merged[key] = list(dict.fromkeys([*merged[key], *value]))
        else:
            merged[key] = value
    if not body.strip():
        body = "# VesperLM model\n\nA VesperLM model written by vesper-sdk.\n"
    block = render_section(section, content)
    pattern = re.compile(rf"<!-- vesper-card:{re.escape(section)} -->.*?"
                         rf"<!-- /vesper-card:{re.escape(section)} -->\n?", re.S)
    if pattern.search(body):
        body = pattern.sub(lambda _: block, body, count=1)
    else:
        later = SECTIONS[SECTIONS.index(section) + 1:] if section in SECTIONS else []
        at = min((i for i in (body.find(f"<!-- vesper-card:{s} -->") for s in later)
                  if i >= 0), default=-1)
        body = (body[:at] + block + "\n" + body[at:]) if at >= 0 \
            else body.rstrip("\n") + "\n\n" + block
    return render_front_matter(merged) + "\n" + body.lstrip("\n")


def update_model_card(folder: str | Path, section: str, content: str | Mapping[str, Any],
                      metadata: Mapping[str, Any] | None = None) -> Path | None:
    """Rewrite one section of ``folder/README.md`` in place (atomically, manifest updated).

    Returns the card's path, or None when the folder is not one to write into (the bundled
    model inside the package) or cannot be written (a warning says why): a card is never
    worth failing the command that produced its figures."""
    folder = Path(folder)
    if not folder.is_dir() or _PACKAGE in folder.resolve().parents:
        return None
    path = folder / CARD_NAME
    try:
        text = path.read_text(encoding="utf-8") if path.is_file() else None
        return atomic_write_file(path, update_card_text(text, section, content, metadata)
                                 .encode())
    except OSError as exc:
        warnings.warn(f"could not update the model card {path}: {exc}", stacklevel=2)
        return None


# ----------------------------------------------------------------------------- sections
def base_metadata(kind: str) -> dict[str, Any]:
    tags = {"bnb": ["bitsandbytes", "quantized"], "onnx": ["onnx"]}.get(kind, [])
    return {"tags": tags} if tags else {}


def model_section(config: VesperConfig, kind: str = "torch",
                  details: Mapping[str, Any] | None = None) -> dict[str, Any]:
    params = config.num_parameters()
    rows: dict[str, Any] = {
        "Architecture": "VesperLM: pre-norm decoder, RoPE, GLU/ERA feed-forward with FlyLoRA, "
                        "MetaHead (per-token confidence)",
        "Format": {"torch": "PyTorch (model.safetensors)", "bnb": "bitsandbytes-quantized",
                   "onnx": "ONNX (model.onnx)"}.get(kind, kind),
        "Parameters": f"{params / 1e6:.2f} M",
        "Preset": config.preset or "custom",
        "Layers / hidden / heads / FFN": f"{config.num_layers} / {config.hidden_size} / "
                                         f"{config.num_heads} / {config.ffn_hidden_size}",
        "Vocabulary": config.vocab_size, "Context (tokens)": config.max_seq_len,
        "FlyLoRA rank / top-k": f"{config.flylora_rank} / {config.flylora_topk}"
                                if config.flylora_rank else "off",
        "MoE experts": config.num_experts or "none",
    }
    rows.update(details or {})
    return rows


def use_section(kind: str) -> str:
    hf = "" if kind == "onnx" else (
        "\n\nWith transformers (the SDK registers VesperLM with the Auto classes on import):\n\n"
        "```python\nimport vesper_sdk  # noqa: F401\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "tok = AutoTokenizer.from_pretrained(\"MODEL_DIR\")\n"
        "model = AutoModelForCausalLM.from_pretrained(\"MODEL_DIR\")\n"
        "ids = tok.apply_chat_template([{\"role\": \"user\", \"content\": \"2+3=\"}],\n"
        "                              add_generation_prompt=True, return_tensors=\"pt\")\n"
        "out = model.generate(**ids, max_new_tokens=32, do_sample=False)\n```")
    return ("```bash\npip install vesper-sdk\nvesper chat MODEL_DIR\n```\n\n"
            "```python\nimport vesper_sdk as vs\nlm = vs.load(\"MODEL_DIR\")\n"
            "print(lm.chat([{\"role\": \"user\", \"content\": \"2+3=\"}]))\n```" + hf)


def training_section(trainer: Any, result_metrics: Mapping[str, Any] | None = None,
                     ) -> dict[str, Any]:
    """The Training section from a trainer (duck-typed: opts, step, tokens_seen, ...)."""
    opts = getattr(trainer, "opts", None)
    argv = [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv and sys.argv[0] else []
    command = shlex.join(argv) if argv and argv[0] in ("vesper", "__main__.py") else None
    rows: dict[str, Any] = {
        "Command": f"`{command}`" if command else "vesper_sdk.train(...) (Python API)",
        "Data": str(getattr(opts, "data", "")) or None,
        "Steps": getattr(trainer, "step", None),
        "Tokens seen": f"{getattr(trainer, 'tokens_seen', 0):,}",
        "Batch x sequence": f"{getattr(opts, 'batch_size', '?')} x {getattr(opts, 'seq_len', '?')}",
        "Learning rate": getattr(opts, "lr", None),
        "Trainable / total parameters": f"{getattr(trainer, 'n_trainable', 0):,} / "
                                        f"{getattr(trainer, 'n_total', 0):,}",
    }
    for key, value in (result_metrics or {}).items():
        if isinstance(value, int | float) and key != "step":
            rows[f"Validation {key}"] = value
    return rows


def eval_section(report: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the Evaluation section, its metadata) from a ``vesper eval`` report."""
    meta, base = report.get("metahead") or {}, report.get("max_softmax") or {}
    rows = {"Data": report.get("data"), "Tokens scored": report.get("tokens"),
            "Perplexity": report.get("perplexity"),
            "Token accuracy": report.get("token_accuracy"),
            "MetaHead ECE": meta.get("ece"), "MetaHead AUROC": meta.get("auroc"),
            "Max-softmax ECE (baseline)": base.get("ece"),
            "Max-softmax AUROC (baseline)": base.get("auroc")}
    skills = report.get("skills")
    if isinstance(skills, Mapping) and "accuracy" in skills:
        rows["Skills accuracy"] = skills["accuracy"]
    return rows, {"metrics": ["perplexity", "accuracy", "ece", "roc_auc"]}


def record_eval(model_dir: str | Path, report: Mapping[str, Any]) -> Path | None:
    """``vesper eval``'s figures into the folder's card (its Evaluation section)."""
    rows, meta = eval_section(report)
    return update_model_card(model_dir, "Evaluation", rows, meta)


def quant_section(report: Mapping[str, Any]) -> str:
    """The Quantization section (a table per variant) from ``vesper quantize --report``."""
    lines = [f"Held-out data: {report.get('data')}, {report.get('eval_tokens')} tokens; "
             f"decode: greedy, batch 1, {report.get('new_tokens')} new tokens, "
             f"torch {report.get('torch')}.", "",
             "| Variant | Size (MB) | Perplexity | Δ perplexity | Decode tok/s |",
             "|---|---|---|---|---|"]
    for r in report.get("rows") or []:
        delta = r.get("perplexity_delta_pct")
        lines.append(f"| {r.get('variant')} | {_cell(r.get('size_mb'))} | "
                     f"{_cell(r.get('perplexity'))} | "
                     f"{'' if delta is None else f'{delta:+.2f} %'} | "
                     f"{_cell(r.get('decode_tok_s'))} |")
    return "\n".join(lines)


def onnx_section(out_dir: Path, info: Mapping[str, Any], stats: Mapping[str, Any],
                 ) -> dict[str, Any]:
    """The ONNX export section (source folder's card) from the export's figures."""
    size = sum(p.stat().st_size for p in Path(out_dir).iterdir()
               if p.suffix in (".onnx", ".data")) / 1e6 if Path(out_dir).is_dir() else None
    return {"Folder": str(out_dir), "Weights": info.get("quantize") or "fp32",
            "Opset": info.get("opset"), "KV cache inputs": info.get("use_cache"),
            "Graph size (MB)": size,
            **{f"Check vs PyTorch: {k}": v for k, v in stats.items()}}
