"""Check that Hugging Face Optimum runs our ONNX export: same greedy tokens as ours.

    python -m vesper_sdk.export.optimum_check [MODEL_DIR] [--new-tokens 64]
    make optimum-check          # builds .venv-optimum first (see below)

Exports ``MODEL_DIR`` (default: the bundled demo model) to a temporary folder, loads it
with ``optimum.onnxruntime.ORTModelForCausalLM`` after :func:`register_optimum`, decodes
greedily with Optimum's ``generate`` and with our ``OnnxModel`` (chat prompts, up to
EOS), and compares the token ids. Exit code 0 when they are equal, 1 when not, 2 when
Optimum is not installed.

Why a separate environment: optimum-onnx (0.1.0) requires ``transformers<4.58``, while
the ``dev`` extra of this repo installs transformers 5 (the HF GPT-2 baselines). vesper-sdk
itself does not need transformers, so ``pip install vesper-sdk[export]
optimum-onnx[onnxruntime]`` resolves; ``make optimum-check`` builds exactly that in
``.venv-optimum``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

PROMPTS = ("What is 7*6?", "What is 48+37?", "Sort these words: pear, apple, kiwi, banana.",
           "How many meters are in 3 kilometers?", "What is the capital of France?",
           "How many letters r are in the word strawberry?", "What is my cat's name?",
           "Count the letters in 'mountain'.")


def check(model_dir: str | Path, new_tokens: int = 64, prompts: tuple[str, ...] = PROMPTS,
          ) -> list[tuple[str, list[int], list[int]]]:
    """(prompt, Optimum's greedy ids, ours) per chat prompt, both up to EOS, after export."""
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    from . import OnnxModel, export_onnx, register_optimum

    results = []
    with tempfile.TemporaryDirectory(prefix="vesper-optimum-") as tmp:
        out = export_onnx(model_dir, Path(tmp) / "onnx", verbose=False)
        register_optimum()
        hf = ORTModelForCausalLM.from_pretrained(str(out), use_cache=True,
                                                 provider="CPUExecutionProvider")
        ours = OnnxModel(out)
        tok = ours.tokenizer
        for prompt in prompts:
            ids = tok.chat_prompt_ids([{"role": "user", "content": prompt}])
            ours_ids = [t.id for t in ours.stream(ids, max_new_tokens=new_tokens,
                                                  temperature=0.0)]
            x = torch.tensor([ids])
            hf_out = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                 max_new_tokens=new_tokens, eos_token_id=tok.eos_id,
                                 pad_token_id=tok.pad_id)
            results.append((prompt, hf_out[0, len(ids):].tolist(), ours_ids))
        # And one long run: EOS suppressed on both sides, so all new_tokens are compared.
        ids = tok.chat_prompt_ids([{"role": "user", "content": prompts[0]}])
        x = torch.tensor([ids])
        hf_out = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             suppress_tokens=[tok.eos_id], pad_token_id=tok.pad_id)
        results.append((f"{prompts[0]} (EOS suppressed)", hf_out[0, len(ids):].tolist(),
                        _greedy_without_eos(ours.backend, ids, new_tokens, tok.eos_id)))
    return results


def _greedy_without_eos(backend, ids: list[int], new_tokens: int, eos: int) -> list[int]:
    """Greedy ids from a DecodeBackend with EOS never chosen (what min_new_tokens does)."""
    import torch

    x = torch.tensor([ids])
    mask, pos = torch.ones_like(x), torch.arange(len(ids))[None]
    out, past, chosen = backend.forward(x, mask, pos, None), None, []
    for _ in range(new_tokens):
        logits = out.logits[0, -1].clone()
        logits[eos] = float("-inf")
        chosen.append(int(logits.argmax()))
        past = out.past_key_values
        mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1)
        pos = pos[:, -1:] + 1
        out = backend.forward(torch.tensor([[chosen[-1]]]), mask, pos, past)
    return chosen


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", nargs="?", default=None,
                    help="model folder (default: the bundled demo model)")
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args(argv)
    try:
        import optimum.onnxruntime  # noqa: F401
    except ImportError as exc:
        print(f"optimum's ONNX Runtime package is not installed ({exc}): run "
              "`make optimum-check`, or pip install 'optimum-onnx[onnxruntime]' in an "
              "environment without transformers>=4.58", file=sys.stderr)
        return 2
    model_dir = args.model_dir
    if model_dir is None:  # the bundled model (demo.app names it too, but imports gradio)
        import vesper_sdk

        model_dir = Path(vesper_sdk.__file__).resolve().parent / "assets" / "default_model"
    import optimum.version
    import transformers

    results = check(model_dir, args.new_tokens)
    failed = 0
    for prompt, hf_ids, ours_ids in results:
        same = hf_ids == ours_ids
        failed += not same
        print(f"{'same' if same else 'DIFFERENT'}  {len(ours_ids):>2} tokens  {prompt!r}")
        if not same:
            print(f"  optimum: {hf_ids}\n  ours:    {ours_ids}")
    print(f"optimum {optimum.version.__version__}, transformers {transformers.__version__}: "
          f"ORTModelForCausalLM.generate gave the same greedy tokens as "
          f"vesper_sdk.export.OnnxModel in {len(results) - failed} of {len(results)} "
          "runs")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
