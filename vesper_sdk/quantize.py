"""Weight quantization of VesperLM with bitsandbytes: LLM.int8 (``int8``), ``nf4`` and ``fp4``.

>>> import vesper_sdk as vs
>>> vs.quantize("runs/a/model", method="nf4", out_dir="runs/a-nf4")  # a new model folder
>>> lm = vs.load("runs/a-nf4")                                  # rebuilt, ready to generate

What is quantized, and why the rest is not:

- every linear map inside the decoder blocks: attention ``qkv`` and ``o_proj``, the FFN
  ``down`` projection and the *base* weight of the FlyLoRA ``gate``/``up`` layers (MoE
  experts included). These hold ~all of the weights of a block.
- FlyLoRA keeps its branch in full precision: ``A`` is the frozen sparse +-1/sqrt(nnz)
  matrix whose |Ax| picks the top-k ranks, so rounding it would change *which* experts
  fire, not just by how much; ``B`` is small (out x rank). The quantized layer is
  ``QuantizedFlyLoRALinear``: a bitsandbytes base matmul plus the unchanged fp branch.
- full precision too: the embedding (it is also the tied LM head, where rounding moves
  every logit), the norms, the MetaHead (its confidence is calibrated on fp logits) and
  the MoE router (a routing flip costs more than the bytes saved).

A quantized folder is an ordinary model folder: ``config.json`` with a ``quantization``
block, ``model.safetensors`` holding the bitsandbytes state (int8 weights + row scales
``SCB``; packed 4-bit weights + their quant-state tensors; no pickle) and the
``tokenizer.json``. ``load_quantized`` rebuilds the layers from those tensors;
``vesper_sdk.load`` calls it when it sees the block, so generate/stream/chat need no
change. ``vesper quantize --report MODEL_DIR`` compares fp32, bitsandbytes and ONNX
Runtime variants (perplexity, size, decode speed) in one run.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._callable import make_module_callable
from .atomic import atomic_write_file, atomic_write_folder
from .config import ConfigError, VesperConfig, run_folder_hint
from .model import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    FlyLoRALinear,
    Linear,
    ModelFolderError,
    VesperLM,
    load_weights,
)
from .tokenizer import TOKENIZER_NAME

METHODS: dict[str, str] = {
    "int8": "LLM.int8() (bitsandbytes Linear8bitLt, int8 weights with per-row scales)",
    "nf4": "4-bit NormalFloat (bitsandbytes Linear4bit, block-wise absmax)",
    "fp4": "4-bit float (bitsandbytes Linear4bit, block-wise absmax)",
}
# LLM.int8's outlier threshold: activation columns above it run in 16-bit (the paper's 6.0).
INT8_THRESHOLD = 6.0
# bitsandbytes' default 4-bit block; statistics double-quantized (QLoRA) to save 0.37 bit/w.
BLOCKSIZE_4BIT = 64


class QuantizeError(ValueError):
    """A quantization request cannot be carried out; the message names the problem and fix."""


# ----------------------------------------------------------------------------- layers
class QuantizedFlyLoRALinear(FlyLoRALinear):
    """FlyLoRALinear whose base matmul is a bitsandbytes layer.

    The low-rank branch (frozen sparse ``lora_A``, ``lora_B``, ``balance_bias``) and the
    top-k rank selection (``rank_mask``, inherited, so there is one definition of it)
    stay in full precision: see the module docstring for why.
    """

    def __init__(self, src: FlyLoRALinear, base: nn.Module) -> None:
        nn.Module.__init__(self)  # not FlyLoRALinear.__init__: no fp weight, no new random A
        self.in_features, self.out_features = src.in_features, src.out_features
        self.rank, self.topk = src.rank, src.topk
        self.bias_update_rate, self.scaling = src.bias_update_rate, src.scaling
        self.base = base
        self.lora_B = src.lora_B
        self.register_buffer("lora_A", src.lora_A)
        self.register_buffer("balance_bias", src.balance_bias)
        self.register_buffer("rank_load", torch.zeros(src.rank, device=src.lora_A.device),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ax, mask = self.rank_mask(x)
        return self.base(x) + F.linear(ax * mask.to(ax.dtype), self.lora_B) * self.scaling

    def freeze_base(self) -> None:
        """The quantized base is frozen already (bitsandbytes weights have no gradient)."""


class _QuietBnb(logging.Filter):
    """Drop two bitsandbytes log lines that are expected here and only alarm users."""

    DROP = ("inputs will be cast from",  # LLM.int8 computes in fp16 by design
            "kernels-community")  # an optional hub kernel; nothing is downloaded at run time

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(d in str(record.msg) for d in self.DROP)


def _bnb():
    for name in ("bitsandbytes.autograd._functions", "bitsandbytes.backends.cpu.ops"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _QuietBnb) for f in logger.filters):
            logger.addFilter(_QuietBnb())
    try:
        import bitsandbytes as bnb
    except ImportError as exc:  # pragma: no cover - the extra is installed in dev
        raise QuantizeError(
            f"bitsandbytes is not installed ({exc}): pip install 'vesper-sdk[quantize]'"
        ) from None
    return bnb


def check_method(method: str) -> str:
    """Return ``method`` if supported, else raise QuantizeError listing the choices."""
    if method not in METHODS:
        raise QuantizeError(
            f"unknown quantization method {method!r}: choose one of {', '.join(METHODS)} "
            "(int8 = LLM.int8, nf4/fp4 = 4-bit); ONNX int8/int4 is `vesper export --quantize`")
    return method


def quantizable_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every layer that ``quantize_model`` replaces, in model order.

    Linear maps and FlyLoRA layers inside the decoder blocks, except the MoE router.
    """
    out = []
    for name, mod in model.named_modules():
        if not name.startswith("blocks.") or name.endswith(".router"):
            continue
        if isinstance(mod, FlyLoRALinear) or (
                type(mod) is Linear and not _inside_flylora(model, name)):
            out.append((name, mod))
    return out


def _inside_flylora(model: nn.Module, name: str) -> bool:
    parent = name.rsplit(".", 1)[0]
    return isinstance(model.get_submodule(parent), FlyLoRALinear)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _new_bnb_layer(method: str, in_features: int, out_features: int) -> nn.Module:
    # Built on the meta device: the weight is assigned right after, no fp copy is allocated.
    bnb = _bnb()
    if method == "int8":
        return bnb.nn.Linear8bitLt(in_features, out_features, bias=False,
                                   has_fp16_weights=False, threshold=INT8_THRESHOLD,
                                   device="meta")
    return bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=None,
                             compress_statistics=True, quant_type=method, device="meta")


def _quantized_linear(method: str, weight: torch.Tensor, device: torch.device) -> nn.Module:
    """A bitsandbytes layer holding ``weight`` [out, in], quantized on ``device``."""
    bnb = _bnb()
    out_features, in_features = weight.shape
    layer = _new_bnb_layer(method, in_features, out_features)
    # From a host copy: bitsandbytes quantizes when a parameter moves off the CPU copy,
    # and the result lands on ``device`` (int8: row absmax -> int8 + SCB; 4-bit: blocks).
    w = weight.detach().float().cpu().contiguous()
    if method == "int8":
        layer.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False
                                         ).to(device)
    else:
        layer.weight = bnb.nn.Params4bit(w, requires_grad=False, blocksize=BLOCKSIZE_4BIT,
                                         compress_statistics=True, quant_type=method,
                                         module=layer).to(device)
    return layer


def _prequantized_linear(method: str, in_features: int, out_features: int,
                         tensors: dict[str, torch.Tensor], device: torch.device,
                         where: str) -> nn.Module:
    """Rebuild a bitsandbytes layer from its saved tensors (keys relative to the layer)."""
    bnb = _bnb()
    layer = _new_bnb_layer(method, in_features, out_features)
    try:
        weight = tensors["weight"].to(device)
        if method == "int8":
            if weight.dtype != torch.int8 or tuple(weight.shape) != (out_features, in_features):
                raise KeyError("weight")
            param = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
            # Int8Params keeps the int8 matrix (CB) and its row scales (SCB) beside .data.
            param.CB, param.SCB = weight, tensors["SCB"].to(device).float()
            layer.weight = param
        else:
            stats = {k[len("weight."):]: v for k, v in tensors.items()
                     if k.startswith("weight.")}
            layer.weight = bnb.nn.Params4bit.from_prequantized(
                data=weight, quantized_stats=stats, requires_grad=False, device=device,
                module=layer)
            if layer.weight.quant_state.quant_type != method:
                raise KeyError(f"weight.quant_state.bitsandbytes__{method}")
    except KeyError as exc:
        raise ModelFolderError(
            f"{where}: the {method} tensors of this layer are missing or damaged ({exc}); "
            "re-run `vesper quantize` on the full-precision folder") from None
    return layer


def quantize_model(model: VesperLM, method: str, device: str | torch.device = "cpu",
                   ) -> VesperLM:
    """Replace the quantizable layers of ``model`` in place; returns the model (eval mode).

    ``device`` is where bitsandbytes quantizes and where the quantized layers live; the
    rest of the model is moved there too. The ``quantization`` block for config.json is
    left on ``model.quantization``.
    """
    check_method(method)
    device = torch.device(device)
    model = model.eval()
    targets = quantizable_modules(model)
    record = quantization_record(model, method, targets)
    for name, mod in targets:
        if isinstance(mod, FlyLoRALinear):
            new = QuantizedFlyLoRALinear(mod, _quantized_linear(method, mod.weight, device))
        else:
            new = _quantized_linear(method, mod.weight, device)
        _set_module(model, name, new)
    model.to(device)  # the fp32 rest; bitsandbytes layers are there already
    model.quantization = record  # type: ignore[attr-defined]
    # New modules start in training mode, and bitsandbytes picks its kernel from that flag
    # (on CPU, training dequantizes to fp instead of running LLM.int8): back to eval.
    return model.eval()


def quantization_record(model: VesperLM, method: str,
                        targets: list[tuple[str, nn.Module]]) -> dict[str, Any]:
    """The ``quantization`` block written to config.json (``targets`` before replacement)."""
    bnb = _bnb()
    chosen = {name for name, _ in targets}
    skipped = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Embedding | nn.Linear) and name not in chosen:
            if not _inside_flylora(model, name):
                skipped.append(name)
        elif isinstance(mod, FlyLoRALinear):
            skipped.append(f"{name}.lora_A/lora_B")
    if getattr(model.config, "tie_embeddings", False):
        skipped.append("lm_head (tied to embed)")
    record: dict[str, Any] = {
        "method": method,
        "library": "bitsandbytes",
        "version": bnb.__version__,
        "quantized": sorted(chosen, key=[n for n, _ in targets].index),
        "skipped": skipped,
        "flylora": "base weight quantized; lora_A, lora_B, balance_bias and top-k in fp32",
        "kept_dtype": "float16 on disk, float32 in memory (every tensor not quantized)",
    }
    if method == "int8":
        record["threshold"] = INT8_THRESHOLD
    else:
        record.update(blocksize=BLOCKSIZE_4BIT, compress_statistics=True)
    return record


# ----------------------------------------------------------------------------- folders
def _read_config(model_dir: Path) -> dict[str, Any]:
    """config.json of a model folder as a dict; ModelFolderError naming the fix otherwise."""
    if not model_dir.is_dir():
        raise ModelFolderError(
            f"{model_dir} is not a folder: pass a model folder holding {CONFIG_NAME}, "
            f"{WEIGHTS_NAME} and {TOKENIZER_NAME} (written by `vesper train`)")
    path = model_dir / CONFIG_NAME
    if (model_dir / "model.onnx").exists():
        raise ModelFolderError(
            f"{model_dir} is an ONNX export: quantize the model folder it came from (or "
            "export with --quantize int8|int4 for ONNX quantization)")
    if not path.is_file():
        raise ModelFolderError(
            f"{model_dir} is not a VesperLM model folder: {CONFIG_NAME} is missing. "
            "Pass the folder written by `vesper train` or model.save_pretrained."
            + run_folder_hint(model_dir))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelFolderError(f"{path} is not valid JSON ({exc}); restore or re-save it"
                               ) from None
    if not isinstance(data, dict):
        raise ModelFolderError(f"{path} must hold a JSON object")
    return data


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

    ``method``: ``int8`` (LLM.int8), ``nf4`` or ``fp4``. ``out_dir`` defaults to
    ``<model_dir>-<method>``. The folder is assembled aside, reloaded with
    ``load_quantized`` and checked to give the same outputs as the in-memory quantized
    model before it is renamed into place, so a failure leaves nothing behind.
    Returns the folder.
    """
    check_method(method)
    model_dir = Path(model_dir)
    data = _read_config(model_dir)
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
    # State-dict prefixes of the bitsandbytes layers (a FlyLoRA layer's base only).
    targets = [f"{name}.base." if isinstance(mod, FlyLoRALinear) else f"{name}."
               for name, mod in quantizable_modules(fp_model)]
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
        from safetensors.torch import save_file

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
    """Round the fp32 tensors bitsandbytes leaves alone (embedding, norms, FlyLoRA A/B,
    MetaHead) to fp16 values; returns their state_dict keys.

    They are stored in fp16 (half their bytes: the tied embedding alone is 18 % of the
    demo model) and loaded back into fp32; rounding the in-memory copy the same way keeps
    the save->load self-check exact and the report's perplexity honest.
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
    """Rebuild a model folder written by ``quantize`` (bitsandbytes layers) on ``device``.

    ``device='auto'`` picks CUDA when present. Raises ModelFolderError naming the file and
    the fix when the folder is not a quantized model or its tensors do not match.
    """
    model_dir = Path(model_dir)
    data = _read_config(model_dir)
    quant = data.get("quantization")
    if not isinstance(quant, dict) or "method" not in quant:
        raise ModelFolderError(
            f"{model_dir / CONFIG_NAME} has no quantization block: it is a full-precision "
            "model; load it with vesper_sdk.load or VesperLM.from_pretrained")
    method = quant["method"]
    if method not in METHODS or quant.get("library", "bitsandbytes") != "bitsandbytes":
        raise ModelFolderError(
            f"{model_dir} is quantized with {quant.get('library')}/{method}, which this "
            f"vesper-sdk cannot load (it reads bitsandbytes {', '.join(METHODS)}); upgrade "
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
        prefix = f"{name}.base." if isinstance(mod, FlyLoRALinear) else f"{name}."
        tensors = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        taken.update(prefix + k for k in tensors)
        layer = _prequantized_linear(method, mod.in_features, mod.out_features, tensors,
                                     device, f"{weights} [{name}]")
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


# ----------------------------------------------------------------------------- report
def eval_token_docs(tokenizer: Any, data: str | Path, max_tokens: int = 8192,
                    ) -> list[tuple[list[int], list[int]]]:
    """Held-out documents as (token ids, score mask) pairs, up to ``max_tokens`` in all.

    ``builtin:skills``: the skills corpus's *held-out* chats (never in its training
    split), answer included, through the chat template. A .txt/.jsonl file (or folder) is
    read with ``vesper_sdk.data.DataSource``, the reader training uses. The mask marks
    the tokens perplexity is taken over, those training learns: every token after BOS of
    a text, the assistant's replies of a chat (a chat model is never trained to predict
    its user's words, so their perplexity says nothing about it).
    """
    from .evaluate import encode_examples

    docs: list[tuple[list[int], list[int]]] = []
    total = 0
    for record in _eval_records(str(data)):
        docs += encode_examples(tokenizer, [record])
        total += len(docs[-1][0]) if docs else 0
        if total >= max_tokens:
            break
    if not docs:
        raise QuantizeError(f"--data {data} holds no text to evaluate on")
    return docs


def _eval_records(spec: str) -> Iterable[Any]:
    if spec == "builtin:skills":
        try:
            from . import skills
        except ImportError:
            raise QuantizeError("builtin:skills is not in this vesper-sdk: pass --data FILE "
                                "(.txt or .jsonl of held-out texts)") from None
        for messages, answer in skills.held_out(2000):
            yield [*messages, {"role": "assistant", "content": answer}]
        return
    if spec.startswith("builtin:"):
        raise QuantizeError(f"unknown built-in data {spec!r}: use builtin:skills or a file")
    if not Path(spec).exists():
        raise QuantizeError(f"--data {spec}: no such file or folder; pass a .txt or .jsonl "
                            "file of held-out texts (or builtin:skills)")
    from .data import DataSource

    yield from DataSource(spec).records()


def _token_chunks(docs: Sequence[tuple[Sequence[int], Sequence[int]]], seq_len: int,
                  max_tokens: int) -> list[tuple[list[int], list[int]]]:
    # Documents are packed into one stream (ids and score mask) cut into seq_len windows.
    ids = [t for d, _ in docs for t in d][:max_tokens]
    mask = [m for _, ms in docs for m in ms][:max_tokens]
    return [(ids[i:i + seq_len], mask[i:i + seq_len]) for i in range(0, len(ids) - 1, seq_len)
            if len(ids[i:i + seq_len]) > 1 and any(mask[i + 1:i + seq_len])]


@torch.no_grad()
def backend_perplexity(backend: Any, chunks: Sequence[tuple[Sequence[int], Sequence[int]]],
                       ) -> float:
    """Perplexity of a DecodeBackend (teacher forcing, past length 0) over token chunks.

    Each chunk is (ids, mask); token i is scored where mask[i] is set (i >= 1).
    """
    nll, count = 0.0, 0
    for chunk, chunk_mask in chunks:
        ids = torch.tensor([list(chunk)], dtype=torch.long)
        s = ids.shape[1]
        attention = torch.ones(1, s, dtype=torch.long)
        pos = torch.arange(s).unsqueeze(0)
        out = backend.forward(ids.to(backend.device), attention.to(backend.device),
                              pos.to(backend.device), None)
        logp = out.logits[0, :-1].float().cpu().log_softmax(-1)
        scored = torch.tensor(list(chunk_mask[1:]), dtype=torch.bool)
        token_lp = logp.gather(-1, ids[0, 1:, None])[:, 0]
        nll -= token_lp[scored].sum().item()
        count += int(scored.sum())
    return math.exp(nll / max(count, 1))


def api_tokens_per_s(backend: Any, tokenizer: Any, prompt: Sequence[int], new_tokens: int,
                     ) -> float:
    """Greedy decode speed through the user-facing API (``LLM.stream_batch``), batch 1:
    sampling code, per-token logprob and text included, the prompt's prefill too (as in
    HF's ``generate``, the baseline this is compared with)."""
    from .generate import LLM, GenerationRequest

    llm = LLM(backend, tokenizer)
    request = GenerationRequest(prompt=list(prompt), max_new_tokens=new_tokens,
                                temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    n = sum(1 for _ in llm.stream_batch([request]))
    return n / (time.perf_counter() - start)


@torch.no_grad()
def greedy_tokens_per_s(backend: Any, prompt: Sequence[int], new_tokens: int) -> float:
    """Greedy decode speed of a DecodeBackend, batch 1, KV cache, prompt excluded."""
    dev = backend.device
    ids = torch.tensor([list(prompt)], dtype=torch.long, device=dev)
    n = ids.shape[1]
    # The whole mask once, a growing view of it per step (as LLM's decode loop does).
    mask = torch.ones((1, n + new_tokens), dtype=torch.long, device=dev)
    pos = torch.arange(n, device=dev).unsqueeze(0)
    out = backend.forward(ids, mask[:, :n], pos, None)
    past = out.past_key_values
    pos = pos[:, -1:]
    start = time.perf_counter()
    for t in range(n + 1, n + new_tokens + 1):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True).to(dev)
        pos = pos + 1
        out = backend.forward(nxt, mask[:, :t], pos, past)
        past = out.past_key_values
    return new_tokens / (time.perf_counter() - start)


class _Gpt2Baseline:
    """HF transformers GPT-2 of the same shape (random weights), greedy, batch 1."""

    def __init__(self, config: VesperConfig, prompt_len: int) -> None:
        import transformers
        from transformers import GPT2Config, GPT2LMHeadModel

        # bos/eos inside the vocabulary (GPT-2's default 50256 is not, at our vocab sizes).
        cfg = GPT2Config(vocab_size=config.vocab_size, n_positions=config.max_seq_len,
                         n_embd=config.hidden_size, n_layer=config.num_layers,
                         n_head=config.num_heads, n_inner=config.ffn_hidden_size,
                         bos_token_id=0, eos_token_id=0)
        torch.manual_seed(0)
        self.model = GPT2LMHeadModel(cfg).eval()
        self.ids = torch.randint(0, config.vocab_size, (1, prompt_len))
        # transformers 5 renamed past_key_values to cache (the same object).
        self.key = ("cache" if "cache" in inspect.signature(self.model.forward).parameters
                    else "past_key_values")
        self.info: dict[str, Any] = {"transformers": transformers.__version__,
                                     "params_m": self.model.num_parameters() / 1e6,
                                     "generate_tok_s": 0.0, "loop_tok_s": 0.0}

    def measure(self, new_tokens: int) -> None:
        """One timing of each path; the best over calls is kept."""
        ids, mask = self.ids, torch.ones_like(self.ids)
        # (a) the user-facing API: model.generate, greedy, forced to run all new_tokens.
        start = time.perf_counter()
        self.model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        self._best("generate_tok_s", new_tokens / (time.perf_counter() - start))
        # (b) a bare loop over forward() with the KV cache, like ours: no generate() cost.
        with torch.inference_mode():
            out = self.model(ids, use_cache=True)
            start = time.perf_counter()
            for _ in range(new_tokens):
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                out = self.model(nxt, use_cache=True, **{self.key: out[self.key]})
            self._best("loop_tok_s", new_tokens / (time.perf_counter() - start))

    def _best(self, key: str, value: float) -> None:
        self.info[key] = max(self.info[key], value)


def _weights_mb(path: Path) -> float:
    """Size of a folder's weight files (model.onnx + external data), config/tokenizer aside."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()
               and p.name not in (TOKENIZER_NAME, CONFIG_NAME)) / 1e6


def default_report_path(model_dir: str | Path) -> Path:
    """``runs/a/model`` -> ``runs/a/model-quantize-report.json``: beside the folder, not in it."""
    model_dir = Path(model_dir).resolve()
    return model_dir.with_name(f"{model_dir.name}-quantize-report.json")


def quantization_report(model_dir: str | Path, data: str | None = None,
                        json_out: str | Path | None = "",
                        max_tokens: int = 8192, seq_len: int = 256, prompt_len: int = 32,
                        new_tokens: int = 128, block_size: int = 32,
                        variants: Sequence[str] | None = None, rounds: int = 2,
                        threads: int | None = None,
                        print_fn: Callable[[str], None] = print) -> dict[str, Any]:
    """Perplexity, size and greedy decode speed of fp32 / bnb int8 / bnb nf4 / ONNX fp32 /
    ONNX int8 / ONNX int4, measured in one run, beside HF GPT-2 of the same shape.

    Quantized variants are written to a temporary folder that is removed afterwards.
    Decode speed: greedy, batch 1, ``prompt_len`` random prompt tokens then ``new_tokens``
    steps, best of ``rounds`` interleaved rounds; the 1-minute load average before and
    after goes into the JSON, since other work on the machine slows every figure.
    ``threads`` sets both torch's and ONNX Runtime's intra-op threads (default: torch's
    own setting, and OnnxBackend's: one thread below 10 M parameters, else one per
    physical core); on a busy machine 1 thread gives steadier figures, as multi-threaded
    kernels stall when their threads are preempted. Each variant is timed twice: a bare
    greedy loop over its backend (compared with a bare GPT-2 loop) and through
    ``LLM.stream_batch`` (compared with GPT-2's ``generate``).
    Returns the report dict and writes it as JSON to ``json_out`` (``""``: beside the model
    folder, as ``MODEL_DIR-quantize-report.json``; None: nowhere).
    """
    from .generate import TorchBackend
    from .tokenizer import VesperTokenizer

    model_dir = Path(model_dir)
    cfg_data = _read_config(model_dir)
    if cfg_data.get("quantization"):
        raise QuantizeError(f"{model_dir} is already quantized: report on the fp32 folder")
    if data is None:
        data = "builtin:skills"
    tokenizer = VesperTokenizer.from_file(model_dir)
    fp_model = VesperLM.from_pretrained(model_dir).eval()
    chunks = _token_chunks(eval_token_docs(tokenizer, data, max_tokens),
                           min(seq_len, fp_model.config.max_seq_len), max_tokens)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, fp_model.config.vocab_size, (prompt_len,), generator=gen).tolist()
    variants = list(variants or ["fp32", "bnb-int8", "bnb-nf4", "onnx-fp32", "onnx-int8",
                                 "onnx-int4"])
    fp_size = (model_dir / WEIGHTS_NAME).stat().st_size / 1e6
    rows: list[dict[str, Any]] = []
    backends: dict[str, Any] = {}
    load_before = os.getloadavg()
    torch_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="vesper-report-") as tmp_name:
        tmp = Path(tmp_name)
        for name in variants:
            print_fn(f"... {name}: building, perplexity")
            if name == "fp32":
                backend, size = TorchBackend(fp_model), fp_size
            elif name.startswith("bnb-"):
                qdir = quantize(model_dir, name.split("-", 1)[1], tmp / name, verbose=False)
                backend = TorchBackend(load_quantized(qdir, device="cpu"))
                size = (qdir / WEIGHTS_NAME).stat().st_size / 1e6
            elif name.startswith("onnx-"):
                from .export.onnx_export import export_onnx
                from .export.runner import OnnxBackend

                q = name.split("-", 1)[1]
                odir = export_onnx(model_dir, tmp / name, quantize=None if q == "fp32" else q,
                                   block_size=block_size, verbose=False)
                backend, size = OnnxBackend(odir, threads=threads), _weights_mb(odir)
            else:
                raise QuantizeError(f"unknown report variant {name!r}")
            backends[name] = backend
            rows.append({"variant": name, "perplexity": backend_perplexity(backend, chunks),
                         "size_mb": size, "size_ratio": size / fp_size, "decode_tok_s": 0.0,
                         "api_tok_s": 0.0})
        gpt2 = None
        if importlib.util.find_spec("transformers") is not None:
            gpt2 = _Gpt2Baseline(fp_model.config, prompt_len)
            gpt2.measure(4)  # warm-up
        for backend in backends.values():
            greedy_tokens_per_s(backend, prompt, 8)  # warm-up (allocations, ORT kernels)
            api_tokens_per_s(backend, tokenizer, prompt, 8)
        # Speed in interleaved rounds, best of each: on a shared machine a change of load
        # then hits every variant alike instead of whichever ran at that moment.
        for i in range(rounds):
            print_fn(f"... decode speed, round {i + 1}/{rounds}")
            for row in rows:
                backend = backends[row["variant"]]
                tps = greedy_tokens_per_s(backend, prompt, new_tokens)
                row["decode_tok_s"] = max(row["decode_tok_s"], tps)
                tps = api_tokens_per_s(backend, tokenizer, prompt, new_tokens)
                row["api_tok_s"] = max(row["api_tok_s"], tps)
            if gpt2 is not None:
                gpt2.measure(new_tokens)
        backends.clear()
    torch.set_num_threads(torch_threads)
    gpt2_info = gpt2.info if gpt2 is not None else None
    base_ppl = rows[0]["perplexity"] if rows and rows[0]["variant"] == "fp32" else None
    for r in rows:
        r["perplexity_delta_pct"] = (100 * (r["perplexity"] / base_ppl - 1)
                                     if base_ppl else None)
        if gpt2_info:  # like for like: API against generate(), bare loop against bare loop
            r["speedup_vs_gpt2_generate"] = r["api_tok_s"] / gpt2_info["generate_tok_s"]
            r["speedup_vs_gpt2_loop"] = r["decode_tok_s"] / gpt2_info["loop_tok_s"]
    report = {
        "model_dir": str(model_dir), "config": repr(fp_model.config),
        "params_m": fp_model.num_parameters() / 1e6, "data": str(data),
        "eval_tokens": sum(sum(m[1:]) for _, m in chunks), "prompt_len": prompt_len,
        "new_tokens": new_tokens, "rounds": rounds,
        "threads": threads or f"torch {torch_threads}, onnxruntime 1 below "
                              "10 M parameters, else physical cores",
        "load_average": [round(x, 2) for x in (*load_before, *os.getloadavg())],
        "cpu_count": os.cpu_count(), "rows": rows, "gpt2": gpt2_info,
        "torch": torch.__version__,
    }
    print_fn(format_report(report))
    if json_out == "":
        json_out = default_report_path(model_dir)
    if json_out:
        atomic_write_file(json_out, json.dumps(report, indent=2).encode())
        print_fn(f"wrote {json_out}")
    return report


def format_report(report: dict[str, Any]) -> str:
    """The report as a fixed-width table."""
    load = report.get("load_average") or [float("nan")] * 6
    lines = [f"{report['config']}  eval tokens {report['eval_tokens']}  "
             f"decode: greedy, batch 1, {report['prompt_len']}-token prompt, "
             f"{report['new_tokens']} new tokens, best of {report.get('rounds', 1)} rounds, "
             f"threads: {report.get('threads')}; "
             f"load average {load[0]:.1f} -> {load[3]:.1f} on {report.get('cpu_count')} CPUs",
             f"{'variant':<11} {'perplexity':>10} {'d ppl':>7} {'size MB':>8} {'ratio':>6} "
             f"{'loop tok/s':>10} {'x gpt2 loop':>11} {'API tok/s':>9} {'x gpt2 gen':>10}"]
    for r in report["rows"]:
        delta = r.get("perplexity_delta_pct")
        lines.append(
            f"{r['variant']:<11} {r['perplexity']:>10.3f} "
            f"{(f'{delta:+.2f}%' if delta is not None else '-'):>7} {r['size_mb']:>8.2f} "
            f"{r['size_ratio']:>5.2f}x {r['decode_tok_s']:>10.1f} "
            f"{r.get('speedup_vs_gpt2_loop', float('nan')):>10.2f}x "
            f"{r.get('api_tok_s', float('nan')):>9.1f} "
            f"{r.get('speedup_vs_gpt2_generate', float('nan')):>9.2f}x")
    g = report.get("gpt2")
    if g:
        lines.append(f"HF GPT-2 same shape ({g['params_m']:.1f}M, random weights, transformers "
                     f"{g['transformers']}): generate() {g['generate_tok_s']:.1f} tok/s, "
                     f"bare forward loop {g['loop_tok_s']:.1f} tok/s")
        lines.append("loop: a bare greedy loop over the backend (vs GPT-2's bare loop); API: "
                     "LLM.stream_batch, what vs.load / OnnxModel users get (vs generate())")
    else:
        lines.append("HF GPT-2 baseline: transformers is not installed (pip install "
                     "transformers)")
    return "\n".join(lines)


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
        quantization_report(opts.model_dir, data=data, json_out=opts.json_out,
                            max_tokens=opts.max_tokens, new_tokens=opts.new_tokens,
                            block_size=opts.block_size, threads=opts.threads)
        return 0
    quantize(opts.model_dir, method=opts.method, out_dir=opts.out_dir, device=opts.device)
    return 0


__all__ = ["METHODS", "QuantizeError", "QuantizeOptions", "QuantizedFlyLoRALinear",
           "backend_perplexity", "check_method", "cli", "eval_token_docs",
           "greedy_tokens_per_s", "load_quantized", "quantization_report", "quantize",
           "quantize_model"]


make_module_callable(__name__, quantize)
