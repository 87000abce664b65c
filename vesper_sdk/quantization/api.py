"""Quantized model folders: ``quantize`` writes one, ``load_quantized`` rebuilds it, and
``vesper quantize`` is ``cli``.

Which layers a method replaces is decided here, the same for every method: the linear
maps inside the decoder blocks and the base weight of their FlyLoRA layers, not the MoE
router. The embedding (also the tied LM head), the norms, the MetaHead and the FlyLoRA
``A``/``B`` branch stay in full precision, stored as fp16 values.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..atomic import atomic_write_folder
from ..config import ConfigError, VesperConfig
from ..folder import ModelFolder
from ..hf.card import quant_section, update_model_card
from ..hf.files import write_folder_files
from ..model import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    FlyLoRALinear,
    ModelFolderError,
    VesperLM,
    load_weights,
)
from ..tokenizer import TOKENIZER_NAME
from .bnb import QuantizedFlyLoRALinear
from .methods import METHODS, QuantizeError, check_method, supported


# ----------------------------------------------------------------------------- model
def quantizable_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every layer that ``quantize_model`` replaces, in model order.

    Linear maps and FlyLoRA layers inside the decoder blocks, except the MoE router (a
    routing flip costs more than the bytes saved).
    """
    out = []
    for name, mod in model.named_modules():
        if not name.startswith("blocks.") or name.endswith(".router"):
            continue
        # Exactly nn.Linear: a subclass is a layer quantized already.
        if isinstance(mod, FlyLoRALinear) or type(mod) is nn.Linear:
            out.append((name, mod))
    return out


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _state_prefix(name: str, mod: nn.Module) -> str:
    # State-dict prefix of the quantized module: a FlyLoRA layer's base only.
    return f"{name}.base." if isinstance(mod, FlyLoRALinear) else f"{name}."


def quantize_model(model: VesperLM, method: str, device: str | torch.device = "cpu",
                   ) -> VesperLM:
    """Replace the quantizable layers of ``model`` in place; returns the model (eval mode).

    ``device`` is where the method quantizes and where the quantized layers live; the
    rest of the model is moved there too. The ``quantization`` block for config.json is
    left on ``model.quantization``.
    """
    quant = METHODS[check_method(method)]
    device = torch.device(device)
    model = model.eval()
    targets = quantizable_modules(model)
    record = quantization_record(model, method, targets)
    for name, mod in targets:
        base = quant.quantize_linear(mod.weight, device)
        _set_module(model, name, QuantizedFlyLoRALinear(mod, base)
                    if isinstance(mod, FlyLoRALinear) else base)
    model.to(device)  # the fp32 rest; quantized layers are there already
    model.quantization = record  # type: ignore[attr-defined]
    # New modules start in training mode, and bitsandbytes picks its kernel from that flag
    # (on CPU, training dequantizes to fp instead of running LLM.int8): back to eval.
    return model.eval()


def quantization_record(model: VesperLM, method: str,
                        targets: list[tuple[str, nn.Module]]) -> dict[str, Any]:
    """The ``quantization`` block written to config.json (``targets`` before replacement)."""
    quant = METHODS[check_method(method)]
    chosen = {name for name, _ in targets}
    skipped = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Embedding | nn.Linear) and name not in chosen:
            skipped.append(name)
        elif isinstance(mod, FlyLoRALinear):
            skipped.append(f"{name}.lora_A/lora_B")
    if getattr(model.config, "tie_embeddings", False):
        skipped.append("lm_head (tied to embed)")
    return {
        "method": method,
        "library": quant.library,
        "version": quant.version(),
        "quantized": sorted(chosen, key=[n for n, _ in targets].index),
        "skipped": skipped,
        "flylora": "base weight quantized; lora_A, lora_B, balance_bias and top-k in fp32",
        "kept_dtype": "float16 on disk, float32 in memory (every tensor not quantized)",
        **quant.settings(),
    }


# ----------------------------------------------------------------------------- folders
def read_config(model_dir: Path) -> dict[str, Any]:
    """config.json of a PyTorch model folder as a dict; ModelFolderError naming the fix."""
    folder = ModelFolder(model_dir)
    if folder.kind == "onnx":
        raise ModelFolderError(
            f"{model_dir} is an ONNX export: quantize the model folder it came from (or "
            "export with --quantize int8|int4 for ONNX quantization)")
    return folder.config_data


def _check_out_dir(out_dir: Path, src: Path) -> None:
    # Refuse to replace something that is not one of our model folders: atomic_write_folder
    # swaps the whole folder, so a typo must not be able to wipe unrelated files.
    if out_dir.resolve() == src.resolve():
        raise QuantizeError(
            f"out_dir {out_dir} is the source folder: write the quantized model to a new "
            "folder (e.g. --out-dir runs/a-nf4)")
    if out_dir.exists() and (not out_dir.is_dir() or (
            any(out_dir.iterdir()) and not (out_dir / CONFIG_NAME).is_file())):
        raise QuantizeError(
            f"out_dir {out_dir} exists and is not a model folder: choose a new folder or "
            "remove it first (it would be replaced as a whole)")


def quantize(model_dir: str | Path, method: str = "int8", out_dir: str | Path | None = None,
             device: str | torch.device = "cpu", verbose: bool = True) -> Path:
    """Quantize the model folder ``model_dir`` with bitsandbytes into ``out_dir``.

    >>> import vesper_sdk as vs
    >>> vs.quantize("runs/a/model", method="nf4", out_dir="runs/a-nf4")  # a new model folder
    >>> lm = vs.load("runs/a-nf4")                                  # rebuilt, ready to generate

    ``method``: ``int8`` (LLM.int8), ``nf4`` or ``fp4``. ``out_dir`` defaults to
    ``<model_dir>-<method>``. The folder is assembled aside, reloaded with
    ``load_quantized`` and checked to give the same outputs as the in-memory quantized
    model before it is renamed into place, so a failure leaves nothing behind.
    Returns the folder.
    """
    check_method(method)
    model_dir = Path(model_dir)
    data = read_config(model_dir)
    if data.get("quantization"):
        raise QuantizeError(
            f"{model_dir} is already quantized ({data['quantization'].get('method')}): "
            "quantize the full-precision folder it came from")
    out_dir = Path(out_dir) if out_dir is not None else model_dir.with_name(
        f"{model_dir.name}-{method}")
    _check_out_dir(out_dir, model_dir)
    device = torch.device(device)
    fp_model = VesperLM.from_pretrained(model_dir).eval()
    probe = _probe_ids(fp_model.config)
    with torch.no_grad():
        ref = fp_model(probe).logits.float()
    targets = [_state_prefix(name, mod) for name, mod in quantizable_modules(fp_model)]
    model = quantize_model(fp_model, method, device=device)
    kept = _round_kept_to_half(model, targets)
    # The state is taken before any forward: on CPU, bitsandbytes repacks 4-bit weights
    # (bf16 absmax) at the first call, and a state saved after that no longer matches.
    state = {k: (v.half() if k in kept else v).detach().contiguous().cpu()
             for k, v in model.state_dict().items()}
    with torch.no_grad():
        q_logits = model(probe.to(device)).logits.float().cpu()
    config = json.loads(model.config.to_json())
    config["quantization"] = model.quantization
    files: dict[str, bytes | Path] = {CONFIG_NAME: json.dumps(config, indent=2).encode()}
    if (model_dir / TOKENIZER_NAME).is_file():
        files[TOKENIZER_NAME] = model_dir / TOKENIZER_NAME

    def write_and_check(tmp: Path) -> None:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        again = load_quantized(tmp, device=device)
        with torch.no_grad():
            got = again(probe.to(device)).logits.float().cpu()
        diff = (got - q_logits).abs().max().item()
        if not diff <= 1e-5:
            raise QuantizeError(
                f"self-check failed: the saved {method} model gives logits {diff:.3g} away "
                "from the in-memory one; nothing was written. Please report this with your "
                "bitsandbytes version")
        write_folder_files(tmp, model.config, "bnb", {"Quantization": method})

    atomic_write_folder(out_dir, files, writer=write_and_check, keep_existing=False)
    if verbose:
        rel = ((q_logits - ref).norm() / ref.norm()).item()
        top1 = (q_logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
        fp_mb = (model_dir / WEIGHTS_NAME).stat().st_size / 1e6
        q_mb = (out_dir / WEIGHTS_NAME).stat().st_size / 1e6
        print(f"quantized {model_dir} -> {out_dir} ({method}): {q_mb:.2f} MB "
              f"({q_mb / fp_mb:.2f}x of {fp_mb:.2f} MB); save->load check exact; "
              f"vs fp32 on a random prompt: relative logits error {rel:.4f}, "
              f"top-1 agreement {top1:.1%}")
    return out_dir


def _round_kept_to_half(model: nn.Module, quantized: list[str]) -> set[str]:
    """Round the fp32 tensors the method leaves alone (embedding, norms, FlyLoRA A/B,
    MetaHead) to fp16 values; returns their state_dict keys.

    They are stored in fp16 (half their bytes) and loaded back into fp32; rounding the
    in-memory copy the same way keeps the save->load self-check exact.
    """
    prefixes = tuple(quantized)
    saved = model.state_dict().keys()  # non-persistent buffers (rank_load, RoPE) are not
    kept = set()
    with torch.no_grad():
        for key, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.dtype == torch.float32 and not key.startswith(prefixes) and (
                    key in saved):
                tensor.copy_(tensor.half().float())
                kept.add(key)
    return kept


def _probe_ids(config: VesperConfig, batch: int = 2, seq: int = 16) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, config.vocab_size, (batch, min(seq, config.max_seq_len)),
                         generator=gen)


def load_quantized(model_dir: str | Path, device: str | torch.device | None = "auto",
                   ) -> VesperLM:
    """Rebuild a model folder written by ``quantize`` on ``device``.

    ``device='auto'`` picks CUDA when present. Raises ModelFolderError naming the file and
    the fix when the folder is not a quantized model or its tensors do not match.
    """
    model_dir = Path(model_dir)
    data = read_config(model_dir)
    quant = data.get("quantization")
    if not isinstance(quant, dict) or "method" not in quant:
        raise ModelFolderError(
            f"{model_dir / CONFIG_NAME} has no quantization block: it is a full-precision "
            "model; load it with vesper_sdk.load or VesperLM.from_pretrained")
    method = METHODS.get(quant["method"])
    if method is None or quant.get("library", "bitsandbytes") != method.library:
        raise ModelFolderError(
            f"{model_dir} is quantized with {quant.get('library')}/{quant['method']}, which "
            f"this vesper-sdk cannot load (it reads {supported()}); upgrade "
            "vesper-sdk or re-quantize the full-precision folder")
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    try:
        config = VesperConfig.from_dict(data)
    except (ConfigError, TypeError) as exc:
        raise ModelFolderError(f"{model_dir / CONFIG_NAME}: {exc}") from None
    weights = model_dir / WEIGHTS_NAME
    state = load_weights(weights, "cpu")
    model = VesperLM(config).eval()  # on the host; quantized layers are built on device
    taken: set[str] = set()
    for name, mod in quantizable_modules(model):
        prefix = _state_prefix(name, mod)
        tensors = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        taken.update(prefix + k for k in tensors)
        layer = method.load_linear(mod.in_features, mod.out_features, tensors, device,
                                   f"{weights} [{name}]")
        _set_module(model, name, QuantizedFlyLoRALinear(mod, layer)
                    if isinstance(mod, FlyLoRALinear) else layer)
    rest = {k: v for k, v in state.items() if k not in taken}
    expected = {k for k in model.state_dict() if k not in taken}
    missing, extra = sorted(expected - set(rest)), sorted(set(rest) - expected)
    if missing or extra:
        raise ModelFolderError(
            f"{weights} does not match {model_dir / CONFIG_NAME}: "
            + (f"missing {', '.join(missing[:3])} " if missing else "")
            + (f"unexpected {', '.join(extra[:3])} " if extra else "")
            + "- the weights come from another model; re-run `vesper quantize`")
    model.load_state_dict(rest, strict=False)
    model.to(device)
    model.quantization = quant  # type: ignore[attr-defined]
    return model.eval()


# ----------------------------------------------------------------------------- CLI
@dataclass
class QuantizeOptions:
    """Quantize a model folder with bitsandbytes (int8 = LLM.int8, nf4, fp4).

    With --report, compare fp32 / bnb int8 / bnb nf4 / ONNX fp32 / int8 / int4 instead:
    perplexity, file size and greedy decode tokens/s, beside HF GPT-2 of the same shape.

    Examples:
      vesper quantize runs/a/model --method nf4 -o runs/a-nf4
      vesper quantize --report runs/a/model --data heldout.jsonl --out report.json
    """

    model_dir: str = field(metadata={"positional": True,
                                     "help": "model folder (config.json, model.safetensors, "
                                             "tokenizer.json)"})
    method: str = field(default="int8", metadata={"choices": list(METHODS),
                                                  "help": "quantization method"})
    out_dir: str | None = field(default=None, metadata={
        "aliases": ["-o"], "help": "output folder (default: MODEL_DIR-METHOD)"})
    device: str = field(default="cpu", metadata={
        "help": "where bitsandbytes quantizes (cpu or cuda); the file is the same"})
    report: bool = field(default=False, metadata={
        "help": "print the fp32/bnb/ONNX comparison table instead of quantizing"})
    data: str | None = field(default=None, metadata={
        "help": "held-out texts for --report perplexity: .txt, .jsonl or builtin:skills "
                "(default: builtin:skills, its held-out chats)"})
    json_out: str = field(default="", metadata={
        "aliases": ["--out"],
        "help": "where --report writes its JSON (default: MODEL_DIR-quantize-report.json, "
                "beside the model folder)"})
    max_tokens: int = field(default=8192, metadata={
        "help": "--report: evaluate perplexity on at most this many tokens"})
    new_tokens: int = field(default=128, metadata={
        "help": "--report: tokens generated for the decode speed figure"})
    block_size: int = field(default=32, metadata={"help": "--report: ONNX int4 block size"})
    threads: int | None = field(default=None, metadata={
        "help": "--report: intra-op threads for torch and ONNX Runtime alike (default: "
                "theirs); 1 gives steadier figures on a busy machine"})


def cli(opts: QuantizeOptions) -> int:
    """``vesper quantize``: write a quantized folder, or print the --report table."""
    if opts.report:
        data = opts.data
        if data is None:
            if importlib.util.find_spec("vesper_sdk.skills") is None:
                print("error: --report needs --data FILE (.txt or .jsonl of held-out texts): "
                      "this vesper-sdk has no builtin:skills set", file=sys.stderr)
                return 2
        # At call time: the report is measurement code in the benchmarks, which import
        # this package (a top-level import would be a cycle).
        from vesper_sdk.benchmarks.quantized import quantization_report

        report = quantization_report(opts.model_dir, data=data, json_out=opts.json_out,
                            max_tokens=opts.max_tokens, new_tokens=opts.new_tokens,
                            block_size=opts.block_size, threads=opts.threads)
        update_model_card(opts.model_dir, "Quantization", quant_section(report))
        return 0
    quantize(opts.model_dir, method=opts.method, out_dir=opts.out_dir, device=opts.device)
    return 0
