"""``vesper export`` / ``vesper-export --onnx``: its options and its command."""

from __future__ import annotations

from dataclasses import dataclass, field

from .onnx_export import (
    DEFAULT_OPSET,
    INT4_MIN_OPSET,
    QUANTIZE_CHOICES,
    SUPPORTED_OPSETS,
    export_onnx,
)


@dataclass
class ExportOptions:
    """Export a model folder to ONNX, optionally INT8 or INT4, checked before it is written.

    One graph serves prefill and decode (the KV cache is an input and an output); ONNX
    Runtime is compared with PyTorch on random prompts before the folder appears.

    Examples:
      vesper-export --onnx runs/a/model -o runs/a-onnx
      vesper export runs/a/model -o runs/a-int4 --quantize int4 --block-size 32
    """

    model_dir: str = field(metadata={"positional": True, "help": "model folder to export"})
    out_dir: str = field(metadata={"aliases": ["-o"], "help": "folder to write (model.onnx, "
                                                              "config.json, tokenizer.json)"})
    opset: int | None = field(default=None, metadata={
        "help": f"ONNX opset ({SUPPORTED_OPSETS.start}-{SUPPORTED_OPSETS.stop - 1}; default "
                f"{DEFAULT_OPSET}; 18-22 for ONNX Runtime < 1.22, at least {INT4_MIN_OPSET} "
                "with --quantize int4)"})
    quantize: str | None = field(default=None, metadata={
        "choices": list(QUANTIZE_CHOICES), "help": "weight quantization of the graph"})
    block_size: int = field(default=32, metadata={
        "help": "int4: weights per quantization block (power of two >= 16)"})
    cache: bool = field(default=True, metadata={
        "help": "export the KV cache inputs/outputs (--no-cache: re-read the sequence)"})
    in_place_kv: bool = field(default=False, metadata={
        "help": "attention as ONNX Runtime's GroupQueryAttention, which writes the KV cache "
                "in place (no copy per token; head_dim a multiple of 16; not for Optimum); "
                "also writes genai_config.json, so onnxruntime-genai can run the folder"})


def cli(opts: ExportOptions) -> int:
    """``vesper export`` / ``vesper-export --onnx``."""
    export_onnx(opts.model_dir, opts.out_dir, opset=opts.opset, quantize=opts.quantize,
                block_size=opts.block_size, use_cache=opts.cache,
                in_place_kv=opts.in_place_kv)
    return 0
