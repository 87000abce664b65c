"""Data reading, malformed-line reports, the token cache, packing and sampling."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from vesper_sdk import cli
from vesper_sdk.tokenizer import VesperTokenizer
from vesper_sdk.training.data import (
    BlockSampler,
    DataError,
    DataSource,
    build_token_cache,
    get_batch,
    split_blocks,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny tensors: intra-op threads only add OpenMP spinning on a busy 2-core machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TEXTS = ["The cat sat on the mat.", "A dog ran in the park.", "Birds sing in the morning.",
         "Rain falls on the hills.", "The sun is bright today."]


@pytest.fixture(scope="module")
def tok() -> VesperTokenizer:
    return VesperTokenizer.train(TEXTS * 4 + ["What is 2+2?", "four"], vocab_size=300)


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _records(data, **kw) -> tuple[list, DataSource]:
    src = DataSource(data, **kw)
    return list(src.records()), src


# ----------------------------------------------------------------------------- formats
def test_txt_paragraph_and_file_split(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("first doc line 1\nline 2\n\n\nsecond doc\n\nthird doc\n")
    docs, _ = _records(p)
    assert docs == ["first doc line 1\nline 2", "second doc", "third doc"]
    docs, _ = _records(p, txt_split="file")
    assert len(docs) == 1 and "second doc" in docs[0] and docs[0].startswith("first doc")


def test_jsonl_text_and_chat(tmp_path):
    chat = {"messages": [{"role": "user", "content": "What is 2+2?"},
                         {"role": "assistant", "content": "four"}]}
    p = _jsonl(tmp_path / "d.jsonl", [{"text": "hello"}, chat, ""])
    docs, src = _records(p)
    assert docs[0] == "hello" and docs[1] == chat["messages"]
    assert (src.report.texts, src.report.chats, src.report.bad) == (1, 1, 0)


def test_folder_reads_txt_and_jsonl_and_skips_hidden(tmp_path):
    (tmp_path / "b.txt").write_text("from txt\n")
    _jsonl(tmp_path / "a.jsonl", [{"text": "from jsonl"}])
    (tmp_path / "notes.md").write_text("ignored\n")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "c.txt").write_text("hidden\n")
    docs, src = _records(tmp_path)
    assert docs == ["from jsonl", "from txt"]
    assert [p.name for p in src.files] == ["a.jsonl", "b.txt"]


def test_python_iterables():
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    docs, src = _records(x for x in ["plain text", {"messages": msgs}, msgs, {"text": "t"}])
    assert docs == ["plain text", msgs, msgs, "t"]
    assert src.report.chats == 2 and src.report.texts == 2


def test_malformed_lines_are_skipped_and_reported_with_file_and_line(tmp_path):
    good = {"text": "fine"}
    rows = [good, good, "{not json", good, good, good, {"messages": [{"role": "robot",
                                                                      "content": "x"}]},
            good, {"other": 1}, good]
    p = _jsonl(tmp_path / "mixed.jsonl", rows)
    docs, src = _records(p)
    assert len(docs) == 7
    report = src.report
    assert report.bad == 3
    joined = "\n".join(report.examples)
    assert f"{p}:3: invalid JSON" in joined
    assert f"{p}:7:" in joined and "robot" in joined
    assert f"{p}:9: no 'text' or 'messages'" in joined
    assert "skipped 3 malformed" in report.summary()


def test_mostly_bad_file_stops_with_a_clear_error(tmp_path):
    p = _jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, "nope", "{]", {"txt": "typo"}])
    with pytest.raises(DataError) as exc:
        _records(p)
    msg = str(exc.value)
    assert str(p) in msg and "3 of 4 lines are malformed" in msg and f"{p}:2" in msg


def test_bad_paths_and_types(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        DataSource(tmp_path / "missing.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        DataSource(tmp_path / "x.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .txt or .jsonl"):
        DataSource(tmp_path / "empty")
    with pytest.raises(DataError, match="unknown built-in"):
        DataSource("builtin:nope")
    with pytest.raises(DataError):
        DataSource(42)


def test_invalid_utf8_line_is_reported(tmp_path):
    p = tmp_path / "t.txt"
    p.write_bytes(b"good line\n\xff\xfe bad\nanother good\nand more\n")
    docs, src = _records(p)
    assert docs == ["good line\nanother good\nand more"]
    assert src.report.bad == 1 and f"{p}:2: not valid UTF-8" in src.report.examples[0]


def test_cli_exits_2_on_data_error(tmp_path, capsys):
    p = _jsonl(tmp_path / "bad.jsonl", ["x", "y"])
    code = cli.main(["train", str(p), "--out-dir", str(tmp_path / "run"), "--no-progress"])
    assert code == 2
    assert "malformed" in capsys.readouterr().err


# ----------------------------------------------------------------------------- cache
def test_chat_loss_mask_covers_assistant_tokens_only(tmp_path, tok):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "four"}, {"role": "user", "content": "and 3+3"},
            {"role": "assistant", "content": "six"}]
    cache = build_token_cache(DataSource([{"messages": chat}, "plain text"]), tok, tmp_path,
                              log=lambda m: None)
    ids, mask = np.asarray(cache.tokens), np.asarray(cache.loss_mask)
    enc = tok.encode_chat(chat)
    n = len(enc.ids)
    assert ids[:n].tolist() == enc.ids
    trained = [int(i) for i, m in zip(ids[:n], mask[:n], strict=True) if m]
    expected = tok.encode("four") + [tok.eos_id] + tok.encode("six") + [tok.eos_id]
    assert trained == expected
    # The text document after it: every token but its BOS is a target.
    assert ids[n] == tok.bos_id and mask[n] == 0 and mask[n + 1:].all()
    assert ids[-1] == tok.eos_id
    assert cache.meta["num_target_tokens"] == int(mask.sum())


def test_cache_reused_and_rebuilt_when_data_or_tokenizer_change(tmp_path, tok):
    data = tmp_path / "d.txt"
    data.write_text("\n\n".join(TEXTS))
    cdir = tmp_path / "cache"
    c1 = build_token_cache(DataSource(data), tok, cdir, log=lambda m: None)
    assert c1.rebuilt and c1.report.texts == len(TEXTS)
    c2 = build_token_cache(DataSource(data), tok, cdir, log=lambda m: None)
    assert not c2.rebuilt and c2.path == c1.path
    assert np.array_equal(c1.tokens, c2.tokens)
    # Changed data (size and mtime) -> a new cache.
    data.write_text("\n\n".join(TEXTS + ["One more document."]))
    os.utime(data, ns=(c1.path.stat().st_mtime_ns + 10**9,) * 2)
    c3 = build_token_cache(DataSource(data), tok, cdir, log=lambda m: None)
    assert c3.rebuilt and c3.path != c1.path and c3.report.texts == len(TEXTS) + 1
    # Another tokenizer -> a new cache too.
    tok2 = VesperTokenizer.train(TEXTS, vocab_size=280)
    c4 = build_token_cache(DataSource(data), tok2, cdir, log=lambda m: None)
    assert c4.rebuilt and c4.path != c3.path
    assert not build_token_cache(DataSource(data), tok2, cdir, log=lambda m: None).rebuilt


def test_empty_data_is_an_error(tmp_path, tok):
    with pytest.raises(DataError, match="no usable documents"):
        build_token_cache(DataSource([]), tok, tmp_path, log=lambda m: None)


# ----------------------------------------------------------------------------- blocks
def test_split_and_batches(tmp_path, tok):
    cache = build_token_cache(DataSource(TEXTS * 20), tok, tmp_path, log=lambda m: None)
    seq = 16
    n = cache.num_blocks(seq)
    train, val = split_blocks(n, 0.1, seed=0)
    assert len(val) == round(0.1 * n) and not set(train) & set(val)
    assert sorted([*train, *val]) == list(range(n))
    assert np.array_equal(split_blocks(n, 0.1, seed=0)[1], val)
    x, y, m = get_batch(cache, np.array([0, 2]), seq)
    assert x.shape == y.shape == m.shape == (2, seq)
    tokens = np.asarray(cache.tokens)
    assert x[1].tolist() == tokens[2 * (seq + 1):2 * (seq + 1) + seq].tolist()
    assert y[1].tolist() == tokens[2 * (seq + 1) + 1:3 * (seq + 1)].tolist()
    assert m[1].tolist() == [bool(b) for b in cache.loss_mask[2 * (seq + 1) + 1:3 * (seq + 1)]]


def test_sampler_is_resumable_and_shards_the_global_batch():
    blocks = np.arange(40)
    one = BlockSampler(blocks, batch_size=4, seed=1)
    ranks = [BlockSampler(blocks, batch_size=2, world_size=2, rank=r, seed=1) for r in (0, 1)]
    for pos in range(25):  # crosses epoch boundaries (10 batches per epoch)
        full = one.batch(pos)
        assert np.array_equal(np.concatenate([s.batch(pos) for s in ranks]), full)
    epoch0 = np.concatenate([one.batch(p) for p in range(10)])
    assert sorted(epoch0) == list(range(40))  # every block once per epoch
    assert not np.array_equal(epoch0, np.concatenate([one.batch(p) for p in range(10, 20)]))
    # A fresh sampler (a resumed run) gives the same batch at the same position.
    assert np.array_equal(BlockSampler(blocks, 4, seed=1).batch(17), one.batch(17))
    with pytest.raises(DataError, match="smaller batch_size"):
        BlockSampler(np.arange(3), batch_size=4)
