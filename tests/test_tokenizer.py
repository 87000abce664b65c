"""Tokenizer: training, Unicode round trip, digit splitting, chat template and masks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vesper_sdk as vs
from vesper_sdk.tokenizer import TokenizerError, VesperTokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is 12+30? It is 42.",
    "Paris is the capital of France. Tokyo is the capital of Japan.",
    "Ça va? Très bien, merci! 日本語のテキスト。 Привет, мир! 🙂",
] * 50


@pytest.fixture(scope="module")
def tok() -> VesperTokenizer:
    return VesperTokenizer.train(CORPUS, vocab_size=400)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_any_unicode_text_round_trips_exactly(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_text_spelling_a_special_token_stays_text(tok):
    ids = tok.encode("<|assistant|> hi <|eos|>")
    assert not set(ids) & tok.special_ids
    assert tok.decode(ids) == "<|assistant|> hi <|eos|>"


def test_digits_are_one_token_each(tok):
    ids = tok.encode("12345")
    assert len(ids) == 5
    assert [tok.decode([i]) for i in ids] == list("12345")


def test_special_tokens_have_ids_and_do_not_leak_into_text(tok):
    assert len({tok.pad_id, tok.bos_id, tok.eos_id, *tok.role_ids.values()}) == 6
    ids = tok.encode("hi", add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == "hi"


def test_chat_mask_covers_only_assistant_content_and_its_end(tok):
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2+3?"},
            {"role": "assistant", "content": "5"},
            {"role": "user", "content": "And 4+4?"},
            {"role": "assistant", "content": "8"}]
    enc = tok.encode_chat(msgs)
    assert len(enc.ids) == len(enc.loss_mask)
    learned = [i for i, m in zip(enc.ids, enc.loss_mask, strict=True) if m]
    assert learned == tok.encode("5") + [tok.eos_id] + tok.encode("8") + [tok.eos_id]
    prompt = tok.chat_prompt_ids(msgs[:2])
    assert prompt[-1] == tok.role_ids["assistant"]
    assert prompt == enc.ids[:len(prompt)]


def test_bad_chat_messages_are_named(tok):
    with pytest.raises(TokenizerError, match="message 1 has role 'robot'"):
        tok.encode_chat([{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}])
    with pytest.raises(TokenizerError, match="message 0 must be a dict"):
        tok.encode_chat(["hello"])


def test_save_and_load_round_trip(tok, tmp_path):
    path = tok.save(tmp_path)
    assert path.name == "tokenizer.json"
    again = VesperTokenizer.from_file(tmp_path)
    text = "Tokyo 2024: 日本 🙂"
    assert again.encode(text) == tok.encode(text)
    assert again.eos_id == tok.eos_id


def test_missing_or_broken_tokenizer_file_is_reported(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.json is missing"):
        VesperTokenizer.from_file(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        VesperTokenizer.from_file(tmp_path)


def test_too_small_vocab_is_rejected():
    with pytest.raises(TokenizerError, match="too small"):
        VesperTokenizer.train(CORPUS, vocab_size=100)


def test_token_bytes_reassemble_the_utf8_text(tok):
    text = "naïve 🙂 日本"
    ids = tok.encode(text)
    assert b"".join(tok.token_bytes(i) for i in ids).decode("utf-8") == text


def test_load_returns_model_and_tokenizer_together(tok, tmp_path):
    cfg = vs.VesperConfig.from_preset("tiny", hidden_size=64, num_layers=2, num_heads=2,
                                      ffn_hidden_size=96, vocab_size=tok.vocab_size,
                                      pad_token_id=tok.pad_id, bos_token_id=tok.bos_id,
                                      eos_token_id=tok.eos_id)
    vs.VesperLM(cfg).save_pretrained(tmp_path)
    tok.save(tmp_path)
    lm = vs.load(tmp_path, device="cpu")
    assert lm.tokenizer.vocab_size == tok.vocab_size
    scores = lm.score("Paris is")
    assert "".join(s.text for s in scores) == "Paris is"
    assert all(0 < s.confidence < 1 and s.logprob < 0 for s in scores)
    assert lm.device == torch.device("cpu")
