"""Quantization benchmark: perplexity, size and decode speed of every deployable variant.

    python benchmarks/quantized.py MODEL_DIR [--data FILE|builtin:skills] [--json OUT]

Measures, in one run on this machine: fp32 PyTorch, bitsandbytes int8 and nf4, ONNX
Runtime fp32, int8 and int4, beside Hugging Face GPT-2 of the same shape with random
weights (when transformers is installed). Prints the table and writes JSON. The same
report is ``vesper quantize --report MODEL_DIR``; this script is its thin wrapper.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vesper_sdk.quantize import quantization_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="a full-precision model folder")
    parser.add_argument("--data", default="builtin:skills",
                        help="held-out texts: .txt, .jsonl or builtin:skills")
    parser.add_argument("--json", default=str(Path(__file__).parent / "results"
                                              / "quantized.json"), help="JSON output")
    parser.add_argument("--max-tokens", type=int, default=8192,
                        help="perplexity over at most this many tokens")
    parser.add_argument("--new-tokens", type=int, default=128,
                        help="tokens decoded for the speed figure (32-token prompt)")
    parser.add_argument("--block-size", type=int, default=32, help="ONNX int4 block size")
    args = parser.parse_args(argv)
    quantization_report(args.model_dir, data=args.data, json_out=args.json,
                        max_tokens=args.max_tokens, new_tokens=args.new_tokens,
                        block_size=args.block_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
