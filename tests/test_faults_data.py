"""Faults in training data (issue #22): a huge document is read and tokenized in bounded
pieces, JSON lines too deep or too big are skipped with ``file:line``, binary files and bad
UTF-8 give clear errors, and a confidence fit on too little data keeps the model as it was.

The limits are shrunk with monkeypatch so that each test handles kilobytes, not megabytes:
the code paths are the same ones a 50 MB line goes through.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from _fixtures_serve import make_tiny_model

import vesper_sdk as vs
from vesper_sdk.training import calibration, reading
from vesper_sdk.training.data import DataError, DataSource, build_token_cache, split_text

WORDS = ("the cat sat on a mat while seven dogs ran past one red car and two blue birds "
         "sang over green hills near old towns café naïve 漢字 🙂").split()


def _words(n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) + rng.choice(["", "", ",", "."]) for _ in range(n))


class _Recorder:
    """Wraps a ``tokenizers.Tokenizer``: records the length of every text it encodes."""

    def __init__(self, backend) -> None:
        self.backend, self.lengths = backend, []

    def encode(self, text, *args, **kw):
        self.lengths.append(len(text))
        return self.backend.encode(text, *args, **kw)

    def encode_batch(self, texts, *args, **kw):
        self.lengths += [len(t) for t in texts]
        return self.backend.encode_batch(texts, *args, **kw)

    def __getattr__(self, name):
        return getattr(self.backend, name)


@pytest.fixture
def small_limits(monkeypatch):
    """Pieces of 500 characters and .txt slices of 700 bytes (multi-byte characters and
    CRLF endings then straddle slice boundaries)."""
    monkeypatch.setattr(reading, "PIECE_CHARS", 500)
    monkeypatch.setattr(reading, "TXT_READ_BYTES", 700)
    monkeypatch.setattr(reading, "ENCODE_BATCH_CHARS", 2000)


@pytest.fixture
def recording(tiny_tokenizer):
    tok = vs.VesperTokenizer(tiny_tokenizer.backend)
    tok._tok = _Recorder(tiny_tokenizer.backend)
    return tok


def _docs_of(cache, tok) -> list[list[int]]:
    """The cache's token stream cut at <|bos|>: one id list per document."""
    ids = np.asarray(cache.tokens).tolist()
    starts = [i for i, t in enumerate(ids) if t == tok.bos_id] + [len(ids)]
    return [ids[a:b] for a, b in zip(starts, starts[1:], strict=False)]


# ----------------------------------------------------------------------------- bounded
def test_a_huge_single_line_txt_document_is_tokenized_in_bounded_pieces(
        tmp_path, small_limits, recording, tiny_tokenizer):
    big = _words(3000)  # ~17k characters on one line, no blank lines: one document
    p = tmp_path / "big.txt"
    p.write_text(big + "\n\nsecond doc\n", encoding="utf-8")
    cache = build_token_cache(DataSource(p), recording, tmp_path / "cache", log=lambda s: None)
    assert max(recording._tok.lengths) <= 500 and len(recording._tok.lengths) > 30
    docs = _docs_of(cache, tiny_tokenizer)
    assert len(docs) == 2 and cache.report.texts == 2
    first = docs[0]
    assert first[0] == tiny_tokenizer.bos_id and first[-1] == tiny_tokenizer.eos_id
    assert tiny_tokenizer.bos_id not in first[1:] and tiny_tokenizer.eos_id not in first[:-1]
    assert tiny_tokenizer.decode(first) == big
    # Cut at word starts, the pieces give exactly the tokens of the whole text.
    assert first[1:-1] == tiny_tokenizer.encode(big)
    mask = np.asarray(cache.loss_mask[:len(first)])
    assert mask[0] == 0 and mask[1:].all()


def test_a_huge_jsonl_text_and_a_long_chat_message_are_encoded_in_pieces(
        tmp_path, small_limits, recording, tiny_tokenizer):
    big = _words(2000, seed=1)
    chat = [{"role": "user", "content": "hello " + big[:3000]},
            {"role": "assistant", "content": big}]
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": big}) + "\n" + json.dumps({"messages": chat}) + "\n")
    cache = build_token_cache(DataSource(p), recording, tmp_path / "cache", log=lambda s: None)
    assert max(recording._tok.lengths) <= 500
    text_doc, chat_doc = _docs_of(cache, tiny_tokenizer)
    assert tiny_tokenizer.decode(text_doc) == big
    whole = tiny_tokenizer.encode_chat(chat)  # the one definition of the template
    assert chat_doc == whole.ids
    n = len(text_doc)
    assert np.asarray(cache.loss_mask[n:n + len(chat_doc)]).tolist() == whole.loss_mask


def test_tokenizer_training_reads_bounded_pieces_that_join_back(tmp_path, small_limits):
    big = _words(3000, seed=2)
    p = tmp_path / "big.txt"
    p.write_text(big)
    pieces = list(DataSource(p).texts())
    assert len(pieces) > 30 and max(map(len, pieces)) <= 500 and "".join(pieces) == big
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": big}]}) + "\n")
    pieces = list(DataSource(tmp_path / "c.jsonl").texts())
    assert max(map(len, pieces)) <= 500 and "".join(pieces) == "q" + big


def test_split_text_prefers_word_starts_then_whitespace_then_the_limit():
    text = _words(400, seed=3)
    pieces = list(split_text(text, 200))
    assert "".join(pieces) == text and max(map(len, pieces)) <= 200
    assert all(p.startswith(" ") for p in pieces[1:])  # each cut is before " word"
    solid = "x" * 1000  # no whitespace at all: cut at the limit
    assert [len(p) for p in split_text(solid, 300)] == [300, 300, 300, 100]
    digits = "1 2 3 4 " * 100  # whitespace but no word start: cut before a space
    assert all(p.startswith(" ") for p in list(split_text(digits, 90))[1:])
    assert list(split_text("")) == [""] and list(split_text("short")) == ["short"]


def _reference_txt(raw: bytes, split: str) -> list[str]:
    """The .txt reading as it was before it streamed (whole lines, whole paragraphs)."""
    docs, lines = [], []
    for line in raw.split(b"\n")[:-1] if raw.endswith(b"\n") else raw.split(b"\n"):
        try:
            text = line.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            continue
        if not text.strip() and split == "paragraph":
            if lines:
                docs.append("\n".join(lines))
            lines = []
            continue
        lines.append(text)
    text = "\n".join(lines)
    return [*docs, text] if text.strip() else docs


@pytest.mark.parametrize("split", ["paragraph", "file"])
def test_streamed_txt_reading_gives_the_documents_whole_reading_gave(tmp_path, small_limits,
                                                                     split):
    rng = random.Random(4)
    for trial in range(20):
        lines = []
        for _ in range(rng.randint(1, 25)):
            kind = rng.random()
            line = ("" if kind < 0.2 else " \t " if kind < 0.3
                    else _words(rng.choice([3, 40, 300]), seed=rng.randint(0, 99)))
            lines.append(line.encode() + rng.choice([b"\n", b"\r\n", b"\r\r\n"]))
        if rng.random() < 0.3:
            lines[rng.randrange(len(lines))] = b"bad \xff\xfe byte\n"
        raw = b"".join(lines)
        if rng.random() < 0.5:
            raw = raw.rstrip(b"\r\n")  # no newline at the end
        p = tmp_path / f"t{trial}.txt"
        p.write_bytes(raw)
        docs = list(DataSource(p, txt_split=split, max_bad_fraction=1.0).records())
        assert docs == _reference_txt(raw, split), trial


# ----------------------------------------------------------------------------- JSON lines
def test_a_deeply_nested_json_line_is_skipped_with_file_and_line(tmp_path):
    good = json.dumps({"text": "fine [[[[ brackets in a string ]]]] " * 40})
    deep = "[" * 100_000 + "]" * 100_000
    deep_obj = '{"text": "x", "a": ' + '{"b": ' * 100 + "1" + "}" * 100 + "}"
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join([good, deep, good, deep_obj, good, good]) + "\n")
    src = DataSource(p)
    docs = list(src.records())
    assert len(docs) == 4 and src.report.bad == 2
    assert f"{p}:2: nested deeper than 64 levels" in src.report.examples
    assert f"{p}:4: nested deeper than 64 levels" in src.report.examples


def test_nesting_is_measured_outside_strings_only():
    shape = reading._json_shape
    assert shape(json.dumps({"text": "[" * 500}).encode(), 64, 10**6) is None
    assert shape(json.dumps({"text": '\\"[[' * 200}).encode(), 64, 10**6) is None
    escaped = json.dumps({"t": "a\\", "d": [[[[1]]]]}).encode()  # a string ending in \\
    assert shape(escaped, 5, 10**6) is None and shape(escaped, 4, 10**6) is not None
    # The same verdicts when the scan's 1 MiB slices cut through the line.
    tail = json.dumps({"text": "y" * ((1 << 20) - 12) + '\\\\\\"[[[[', "x": [[[1]]]}).encode()
    assert shape(tail, 4, 10**6) is None and shape(tail, 3, 10**6) is not None


def test_an_oversize_or_overfull_json_line_is_skipped_and_the_next_lines_still_count(
        tmp_path, monkeypatch):
    monkeypatch.setattr(reading, "MAX_JSONL_LINE_BYTES", 1000)
    monkeypatch.setattr(reading, "TXT_READ_BYTES", 300)
    monkeypatch.setattr(reading, "MAX_JSON_VALUES", 50)
    ok = json.dumps({"text": "ok"})
    huge = json.dumps({"text": "z" * 5000})
    full = json.dumps({"text": "ok", "junk": list(range(100))})
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join([ok, huge, ok, full, ok, ok]) + "\n")
    src = DataSource(p)
    assert list(src.records()) == ["ok"] * 4
    joined = "\n".join(src.report.examples)
    assert f"{p}:2: line of 5,013 bytes, over the limit of 0 MiB" in joined
    assert f"{p}:4: more than 50 JSON values in one line" in joined


def test_a_byte_order_mark_does_not_spoil_the_first_json_line(tmp_path):
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "first"}).encode() + b"\n")
    assert list(DataSource(p).records()) == ["first"]


# ----------------------------------------------------------------------------- bad files
@pytest.mark.parametrize("name", ["photo.txt", "dump.jsonl"])
def test_a_binary_file_is_refused_with_a_clear_error(tmp_path, name):
    p = tmp_path / name
    p.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 10)
    with pytest.raises(DataError) as exc:
        list(DataSource(p).records())
    assert str(p) in str(exc.value) and "binary data" in str(exc.value)


def test_utf16_text_is_refused_as_binary_with_a_hint(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_bytes("hello world\n".encode("utf-16"))
    with pytest.raises(DataError, match="UTF-16"):
        list(DataSource(p).records())


def test_invalid_utf8_or_nul_late_in_a_long_line_is_reported_with_file_and_line(
        tmp_path, small_limits):
    long_line = _words(400, seed=5).encode()
    p = tmp_path / "t.txt"
    p.write_bytes(b"first line\n\n" + long_line + b" \xff tail\n\n" + b"ok " * 3000
                  + b"\n\n\x00 nul " + b"x" * 9000 + b"\n\nlast\n")  # NUL past 8 KiB
    src = DataSource(p)
    docs = list(src.records())
    # The long line's slices before the fault were read (and kept); the NUL line, faulty
    # from its first slice, is skipped whole.
    assert docs[0] == "first line" and docs[2:] == ["ok " * 3000, "last"]
    assert docs[1] and long_line.decode().startswith(docs[1])
    assert src.report.bad == 2
    assert f"{p}:3: not valid UTF-8" in src.report.examples
    assert f"{p}:7: NUL byte (binary data, not text)" in src.report.examples


def test_a_mostly_bad_txt_file_stops_with_a_clear_error(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes(b"ok\n" + "caf\xe9\nna\xefve\nd\xe9j\xe0\n".encode("latin-1"))
    with pytest.raises(DataError) as exc:
        list(DataSource(p).records())
    assert "3 of 4 lines are malformed" in str(exc.value) and f"{p}:2" in str(exc.value)


# ----------------------------------------------------------------------------- calibration
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    folder = make_tiny_model(tmp_path_factory.mktemp("faults") / "tiny")
    return folder, vs.VesperTokenizer.from_file(folder)


def _batches(tok, groups: int, tokens_each: int = 70):
    rng = random.Random(0)
    examples = []
    for _ in range(groups):
        ids = tok.encode(_words(60, seed=rng.randint(0, 999)), add_bos=True)[:tokens_each]
        examples.append((ids, [0] + [1] * (len(ids) - 1)))
    return calibration.pack(examples, range(groups), 32, 4)


@pytest.mark.parametrize("groups,why", [(3, "in only 3 group(s)"),
                                        (1, "fewer than 100 scored tokens")])
def test_calibration_on_too_little_data_warns_and_keeps_the_head(tiny_model, groups, why):
    folder, tok = tiny_model
    model = vs.VesperLM.from_pretrained(folder)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(calibration.CalibrationWarning) as caught:
        fit = calibration.refit_confidence(model, _batches(tok, groups), tok.eos_id)
    assert fit is None
    message = str(caught[0].message)
    assert why in message and "at least 100 scored tokens in at least 5 groups" in message
    assert "nan" not in message.lower()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert after["metahead.calibration"].tolist() == [1.0, 0.0]
    said: list[str] = []  # the trainer's log instead of a warning
    assert calibration.refit_confidence(model, _batches(tok, groups), tok.eos_id,
                                        warn=said.append) is None
    assert len(said) == 1 and why in said[0]


def test_calibration_on_enough_groups_fits_finite_figures(tiny_model):
    folder, tok = tiny_model
    model = vs.VesperLM.from_pretrained(folder)
    fit = calibration.refit_confidence(model, _batches(tok, 8), tok.eos_id)
    assert fit is not None and fit["calibration_groups"] == 8
    assert all(np.isfinite(v) for v in fit.values())


def test_vesper_calibrate_on_a_few_documents_is_a_clear_error_and_writes_nothing(
        tiny_model, tmp_path):
    folder, _ = tiny_model
    p = tmp_path / "few.txt"
    p.write_text("\n\n".join(_words(80, seed=i) for i in range(3)) + "\n")
    out = tmp_path / "never"
    with pytest.raises(ValueError, match=r"in only 3 group\(s\).*more held-out data"):
        vs.calibrate(folder, str(p), out_dir=out, device="cpu")
    assert not Path(out).exists()
