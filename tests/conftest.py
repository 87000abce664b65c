"""Shared fixtures: a tiny tokenizer and model folder (built once per session), and a guard
that keeps torch's thread count from leaking from one test into the next."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

import vesper_sdk as vs
from vesper_sdk.tokenizer import VesperTokenizer

WORDS = ("the cat sat on a mat while seven dogs ran past one red car and two blue birds "
         "sang over green hills near old towns").split()


def _tiny_tokenizer() -> VesperTokenizer:
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(10)) + f" {rng.randint(0, 999)}"
             for _ in range(300)]
    return VesperTokenizer.train(texts, vocab_size=360, min_frequency=1)


def _write_tiny_model(root: Path, tok: VesperTokenizer, **overrides) -> Path:
    """A tiny random model whose FlyLoRA branch is live (B != 0), saved with ``tok``."""
    torch.manual_seed(0)
    cfg = vs.VesperConfig.from_preset("tiny", **{
        "hidden_size": 64, "num_layers": 2, "num_heads": 2, "ffn_hidden_size": 128,
        "vocab_size": tok.vocab_size, "pad_token_id": tok.pad_id, "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id, "max_seq_len": 256, **overrides})
    model = vs.VesperLM(cfg).eval()
    with torch.no_grad():
        for layer in model.flylora_layers():
            layer.lora_B.normal_(0, 0.05)
            layer.balance_bias.normal_(0, 0.1)
    model.save_pretrained(root)
    tok.save(root)
    return root


@pytest.fixture(scope="session")
def tiny_tokenizer() -> VesperTokenizer:
    """A 360-token BPE tokenizer trained on a small word corpus."""
    return _tiny_tokenizer()


@pytest.fixture(scope="session")
def make_tiny_model_dir(tiny_tokenizer, tmp_path_factory):
    """``make(**config_overrides) -> Path``: a fresh tiny model folder (with the tokenizer)."""
    def make(**overrides) -> Path:
        return _write_tiny_model(tmp_path_factory.mktemp("tiny") / "m", tiny_tokenizer,
                                 **overrides)
    return make


@pytest.fixture(scope="session")
def tiny_model_dir(make_tiny_model_dir) -> Path:
    """One tiny fp32 model folder for the session: read it, never write into it."""
    return make_tiny_model_dir()


@pytest.fixture(autouse=True)
def torch_threads():
    """Whatever a test sets torch's intra-op threads to, the next test starts as before."""
    threads = torch.get_num_threads()
    yield threads
    torch.set_num_threads(threads)
