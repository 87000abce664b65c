"""Training data: read text and chat data, tokenize once into a memory-mapped cache, pack.

What ``data=`` may name:

- a ``.txt`` file. With ``txt_split="paragraph"`` (the default) documents are separated
  by blank lines, which suits a file of many short texts and lets big files stream; with
  ``txt_split="file"`` the whole file is one document (a book, a code file);
- a ``.jsonl`` file, one JSON object a line: ``{"text": "..."}`` for plain text or
  ``{"messages": [{"role": "user", "content": "..."}, ...]}`` for a chat, whose loss
  covers the assistant turns only (``VesperTokenizer.encode_chat``'s loss mask);
- a folder: every ``.txt`` and ``.jsonl`` file below it, in sorted order (hidden files
  and folders skipped, so a run folder inside the data folder is ignored);
- ``"builtin:skills"``: the procedurally generated corpus of :mod:`vesper_sdk.skills`;
- a Python iterable of strings (documents), of ``{"text": ...}`` / ``{"messages": [...]}``
  dicts, or of message lists. It is read into memory once.

Malformed lines (bad JSON, a missing field, an unknown role, undecodable UTF-8, a NUL
byte, a .jsonl line over ``MAX_JSONL_LINE_BYTES`` = 128 MiB, nested deeper than
``MAX_JSON_DEPTH`` = 64 or holding over ``MAX_JSON_VALUES`` values) are skipped, counted
and reported with ``file:line`` examples; a file where more than ``max_bad_fraction`` of
the lines are bad stops the run with :class:`DataError`, since it is almost surely the
wrong file or the wrong format. So does a binary file (NUL bytes in its first 8 KiB).

Memory stays bounded whatever the input: .txt files are read ``TXT_READ_BYTES`` (1 MiB)
at a time, however long their lines and paragraphs, and no text reaches the tokenizer
(encoding, or training one) in a piece longer than ``PIECE_CHARS`` (64 Ki) characters;
pieces end before a space that starts a word, where the tokenizer splits anyway, so the
tokens are those of the whole text (see :func:`split_text`).

Every document becomes ``<|bos|> ... <|eos|>`` (text) or the chat template; the token
ids and a per-token loss mask are written once into ``cache_dir/tokens-<key>/`` (numpy
memmaps) under a key that hashes the data files' (path, size, mtime) and the tokenizer
JSON, so a second run reads the cache and a changed file or tokenizer rebuilds it. The
token stream is cut into blocks of ``seq_len + 1`` tokens (inputs and shifted labels);
a seeded permutation of the blocks sets ``val_fraction`` of them aside for validation.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import skills
from ..atomic import atomic_write_file, atomic_write_folder
from ..tokenizer import VesperTokenizer
from . import reading
from .reading import (
    BUILTIN,
    DATA_SUFFIXES,
    DataError,
    DataReport,
    Item,
    Record,
    _check_bad_fraction,
    _Piece,
    _read_jsonl,
    _read_txt,
    _text_pieces,
    parse_record,
    split_text,
)

CACHE_VERSION = 1

__all__ = ["BUILTIN", "DATA_SUFFIXES", "BlockSampler", "DataError", "DataReport", "DataSource",
           "Record", "TokenCache", "build_token_cache", "cache_key", "get_batch",
           "open_token_cache", "parse_record", "split_blocks", "split_text", "train_tokenizer",
           "write_json"]

# ----------------------------------------------------------------------------- sources
class DataSource:
    """What ``data=`` names, resolved: files, an in-memory list, or the built-in corpus.

    ``records()`` yields the usable documents and fills ``report``; ``fingerprint()``
    identifies the data for the token cache without reading it (for files: path, size
    and modification time).
    """

    def __init__(self, data: Any, *, txt_split: str = "paragraph",
                 builtin_examples: int = 20000, seed: int = 0,
                 max_bad_fraction: float = 0.5) -> None:
        if txt_split not in ("paragraph", "file"):
            raise DataError(f"txt_split must be 'paragraph' or 'file', got {txt_split!r}")
        self.txt_split = txt_split
        self.max_bad_fraction = max_bad_fraction
        self.builtin_examples = builtin_examples
        self.seed = seed
        self.files: list[Path] = []
        self.items: list[Any] = []
        self.report = DataReport()
        if isinstance(data, str) and data.startswith("builtin:"):
            if data not in BUILTIN:
                raise DataError(f"unknown built-in corpus {data!r}: use one of "
                                f"{', '.join(BUILTIN)}")
            self.kind, self.name = "builtin", data
        elif isinstance(data, str | os.PathLike):
            self.kind, self.name = "files", str(data)
            self.files = _resolve_files(Path(data))
        elif isinstance(data, bytes | dict) or data is None or not isinstance(data, Iterable):
            raise DataError(
                f"data must be a file or folder path, 'builtin:skills', or an iterable of "
                f"texts or chats; got {type(data).__name__}")
        else:
            self.kind, self.name = "memory", "<python data>"
            self.items = list(data)  # read once: it may be a generator

    def describe(self) -> str:
        """A short human-readable name of the data, for logs."""
        if self.kind == "files":
            return f"{self.name} ({len(self.files)} file(s))"
        if self.kind == "builtin":
            return f"{self.name} ({self.builtin_examples} examples, seed {self.seed})"
        return f"{self.name} ({len(self.items)} items)"

    def fingerprint(self) -> str:
        """A hash naming this data: file (path, size, mtime) or item contents."""
        h = hashlib.sha256()
        h.update(json.dumps({"v": CACHE_VERSION, "kind": self.kind,
                             "txt_split": self.txt_split}).encode())
        if self.kind == "files":
            for path in self.files:
                st = path.stat()
                h.update(json.dumps([str(path.resolve()), st.st_size, st.st_mtime_ns]).encode())
        elif self.kind == "builtin":
            h.update(json.dumps([self.name, skills.VERSION, self.builtin_examples,
                                 self.seed]).encode())
        else:
            for item in self.items:
                h.update(json.dumps(item, sort_keys=True, default=str).encode())
                h.update(b"\n")
        return h.hexdigest()

    def records(self) -> Iterator[Record]:
        """Usable documents in order, whole; malformed ones are counted in ``self.report``.

        Each document is held in memory whole; training reads :meth:`items` instead,
        which streams long texts in bounded pieces.
        """
        parts: list[str] = []
        for item in self.items_stream():
            if isinstance(item, _Piece):
                parts.append(item.text)
                if item.last:
                    yield "".join(parts)
                    parts = []
            else:
                yield item

    def items_stream(self) -> Iterator[Item]:
        """The documents in order, texts as :class:`_Piece` s of at most ``PIECE_CHARS``
        characters (see :func:`split_text`), chats whole; fills ``self.report``."""
        self.report = report = DataReport(files=len(self.files))
        if self.kind == "builtin":
            for ex in skills.generate(self.builtin_examples, self.seed):
                report.chats += 1
                yield ex["messages"]
            return
        if self.kind == "memory":
            bad = good = 0
            for i, item in enumerate(self.items):
                record, reason = parse_record(item)
                if record is None:
                    bad += 1
                    report.add_bad(f"item {i}", reason or "unusable")
                    continue
                good += 1
                yield from _counted(report, record)
            _check_bad_fraction("<python data>", good, bad, self.max_bad_fraction, report)
            return
        for path in self.files:
            if path.suffix == ".jsonl":
                for record in _read_jsonl(path, report, self.max_bad_fraction):
                    yield from _counted(report, record)
            else:
                for piece in _read_txt(path, report, self.txt_split, self.max_bad_fraction):
                    report.texts += piece.first
                    yield piece

    def texts(self) -> Iterator[str]:
        """The raw strings (texts and message contents) in pieces of at most
        ``PIECE_CHARS`` characters, for training a tokenizer (whose word counts do not
        change where a piece ends at a space before a word; see :func:`split_text`)."""
        for item in self.items_stream():
            if isinstance(item, _Piece):
                if item.text:
                    yield item.text
            else:
                for msg in item:
                    yield from split_text(msg["content"])


def _counted(report: DataReport, record: Record) -> Iterator[Item]:
    """A whole record as stream items (a text in pieces), counted in ``report``."""
    if isinstance(record, str):
        report.texts += 1
        yield from _text_pieces(record)
    else:
        report.chats += 1
        yield record


def _resolve_files(path: Path) -> list[Path]:
    if not path.exists():
        raise DataError(f"data path {path} does not exist: pass a .txt or .jsonl file, a "
                        "folder of them, or 'builtin:skills'")
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*")
            if p.is_file() and p.suffix in DATA_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise DataError(f"folder {path} holds no .txt or .jsonl files")
        return files
    if path.suffix not in DATA_SUFFIXES:
        raise DataError(f"{path}: unsupported file type {path.suffix or '(none)'}; use .txt "
                        "(plain text) or .jsonl ({\"text\": ...} or {\"messages\": [...]})")
    if not os.access(path, os.R_OK):
        raise DataError(f"cannot read {path}: permission denied")
    return [path]


# ----------------------------------------------------------------------------- tokenizer
def train_tokenizer(source: DataSource, vocab_size: int, cache_dir: str | Path,
                    log: Callable[[str], None] = print) -> tuple[VesperTokenizer, Path]:
    """Train a tokenizer on ``source`` (or reuse the one trained before on the same data)."""
    cache_dir = Path(cache_dir)
    path = cache_dir / f"tokenizer-{source.fingerprint()[:16]}-{vocab_size}.json"
    if path.is_file():
        log(f"tokenizer: reusing {path}")
        return VesperTokenizer.from_file(path), path
    log(f"tokenizer: training a byte-level BPE (vocab {vocab_size}) on {source.describe()}")
    tok = VesperTokenizer.train(source.texts(), vocab_size=vocab_size)
    tok.save(path)
    log(f"tokenizer: {tok.vocab_size} tokens, saved to {path}")
    return tok, path


# ----------------------------------------------------------------------------- cache
@dataclass
class TokenCache:
    """A tokenized dataset on disk: token ids and a 0/1 loss mask, as numpy memmaps.

    ``loss_mask[i] == 1`` when token ``i`` is a training target (predicted from the
    tokens before it): every token of a text document but its ``<|bos|>``, and the
    assistant tokens of a chat.
    """

    path: Path
    tokens: np.ndarray
    loss_mask: np.ndarray
    meta: dict[str, Any]
    rebuilt: bool

    @property
    def num_tokens(self) -> int:
        return int(self.meta["num_tokens"])

    @property
    def report(self) -> DataReport:
        return DataReport.from_dict(self.meta["report"])

    def num_blocks(self, seq_len: int) -> int:
        """How many whole blocks of ``seq_len + 1`` tokens the stream holds."""
        return self.num_tokens // (seq_len + 1)


def cache_key(source: DataSource, tokenizer: VesperTokenizer) -> str:
    """Hash of the data fingerprint and the tokenizer JSON: a new key means a rebuild."""
    h = hashlib.sha256()
    h.update(f"vesper-token-cache/{CACHE_VERSION}\n".encode())
    h.update(source.fingerprint().encode())
    h.update(hashlib.sha256(tokenizer.to_json().encode()).hexdigest().encode())
    return h.hexdigest()


def _encode_items(items: Iterable[Item], tokenizer: VesperTokenizer,
                  batch_chars: int | None = None, batch_items: int = 512,
                  ) -> Iterator[tuple[list[int], list[int]]]:
    """(token ids, loss mask) for the stream of :meth:`DataSource.items_stream`, in
    bounded parts: a text piece's ids (with <|bos|> before a document's first piece and
    <|eos|> after its last), a chat's template, or parts of a chat with a long message.

    Text pieces are encoded in batches of about ``batch_chars`` characters (default
    ``reading.ENCODE_BATCH_CHARS``; the Rust tokenizer parallelises them); chats go
    through ``encode_chat``, the one definition of the chat template and its loss mask.
    """
    batch_chars = reading.ENCODE_BATCH_CHARS if batch_chars is None else batch_chars
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    buf: list[Item] = []
    chars = 0

    def flush() -> Iterator[tuple[list[int], list[int]]]:
        texts = [p.text for p in buf if isinstance(p, _Piece)]
        encoded = iter(tokenizer.encode_batch(texts)) if texts else iter(())
        for item in buf:
            if isinstance(item, _Piece):
                ids = next(encoded)
                ids = ([bos] if item.first else []) + ids + ([eos] if item.last else [])
                yield ids, [0] * item.first + [1] * (len(ids) - item.first)
            elif all(len(m["content"]) <= reading.PIECE_CHARS for m in item):
                enc = tokenizer.encode_chat(item)
                yield enc.ids, enc.loss_mask
            else:
                yield from _encode_long_chat(item, tokenizer, batch_chars)
        buf.clear()

    for item in items:
        buf.append(item)
        chars += (len(item.text) if isinstance(item, _Piece)
                  else sum(len(m["content"]) for m in item))
        if chars >= batch_chars or len(buf) >= batch_items:
            yield from flush()
            chars = 0
    yield from flush()


def _encode_long_chat(messages: list[dict[str, str]], tokenizer: VesperTokenizer,
                      batch_chars: int) -> Iterator[tuple[list[int], list[int]]]:
    """``encode_chat`` of a chat with a message too long to encode at once: the template
    comes from ``encode_chat`` on the empty messages (<|bos|>, then per message its role
    token and <|eos|>), each content is encoded in pieces and goes before its <|eos|>,
    masked as that <|eos|> is."""
    skeleton = tokenizer.encode_chat([{**m, "content": ""} for m in messages])
    ids, mask = skeleton.ids, skeleton.loss_mask
    if len(ids) != 1 + 2 * len(messages):  # a template of another shape: encode whole
        enc = tokenizer.encode_chat(messages)
        yield enc.ids, enc.loss_mask
        return
    yield ids[:1], mask[:1]
    for i, msg in enumerate(messages):
        role, end = 1 + 2 * i, 2 + 2 * i
        yield ids[role:role + 1], mask[role:role + 1]
        batch: list[str] = []
        for piece in [*split_text(msg["content"]), None]:
            if piece is not None:
                batch.append(piece)
            if batch and (piece is None or sum(map(len, batch)) >= batch_chars):
                for piece_ids in tokenizer.encode_batch(batch):
                    yield piece_ids, [mask[end]] * len(piece_ids)
                batch = []
        yield ids[end:end + 1], mask[end:end + 1]


def build_token_cache(source: DataSource, tokenizer: VesperTokenizer, cache_dir: str | Path,
                      log: Callable[[str], None] = print) -> TokenCache:
    """Tokenize ``source`` into ``cache_dir/tokens-<key>/``, or open it if already there."""
    key = cache_key(source, tokenizer)
    path = Path(cache_dir) / f"tokens-{key[:20]}"
    if (path / "meta.json").is_file():
        cache = open_token_cache(path)
        if cache.meta.get("key") == key:
            log(f"data: reusing token cache {path} ({cache.num_tokens:,} tokens)")
            return cache
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    meta: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        n_tokens = n_targets = 0
        with open(tmp / "tokens.bin", "wb") as ft, open(tmp / "mask.bin", "wb") as fm:
            for ids, mask in _encode_items(source.items_stream(), tokenizer):
                np.asarray(ids, dtype=dtype).tofile(ft)
                np.asarray(mask, dtype=np.uint8).tofile(fm)
                n_tokens += len(ids)
                n_targets += sum(mask)
        report = source.report
        if report.documents == 0:
            raise DataError(f"{source.describe()} holds no usable documents"
                            + (f"; {report.summary()}" if report.bad else ""))
        meta.update(version=CACHE_VERSION, key=key, dtype=np.dtype(dtype).name,
                    num_tokens=n_tokens, num_target_tokens=n_targets,
                    source=source.describe(), report=report.to_dict(),
                    vocab_size=tokenizer.vocab_size)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))

    log(f"data: tokenizing {source.describe()} into {path}")
    atomic_write_folder(path, writer=write, keep_existing=False)
    cache = open_token_cache(path)
    cache.rebuilt = True
    return cache


def open_token_cache(path: str | Path) -> TokenCache:
    """Open a cache folder written by :func:`build_token_cache` (read-only memmaps)."""
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    n = int(meta["num_tokens"])
    if n == 0:
        tokens, mask = np.zeros(0, dtype), np.zeros(0, np.uint8)
    else:
        tokens = np.memmap(path / "tokens.bin", dtype=dtype, mode="r", shape=(n,))
        mask = np.memmap(path / "mask.bin", dtype=np.uint8, mode="r", shape=(n,))
    return TokenCache(path, tokens, mask, meta, rebuilt=False)


def write_json(path: str | Path, data: Any) -> None:
    """Small JSON side files (reports), written atomically."""
    atomic_write_file(path, json.dumps(data, indent=2).encode())


# ----------------------------------------------------------------------------- blocks
def split_blocks(n_blocks: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) block indices: a seeded permutation, ``val_fraction`` set aside.

    At least one validation block when ``val_fraction > 0`` and there are two blocks or
    more; both index arrays are sorted, so the split does not depend on anything else.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    perm = np.random.default_rng([seed, 0x5EED]).permutation(n_blocks)
    n_val = 0
    if val_fraction > 0 and n_blocks >= 2:
        n_val = min(n_blocks - 1, max(1, round(val_fraction * n_blocks)))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def get_batch(cache: TokenCache, blocks: np.ndarray, seq_len: int,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, labels, loss_mask) for the given blocks, each [len(blocks), seq_len].

    Labels are the inputs shifted by one; ``loss_mask`` (bool) marks the labels that are
    training targets.
    """
    span = seq_len + 1
    starts = np.asarray(blocks, dtype=np.int64) * span
    tok = np.stack([cache.tokens[s:s + span] for s in starts]).astype(np.int64)
    mask = np.stack([cache.loss_mask[s + 1:s + span] for s in starts]).astype(bool)
    tok_t = torch.from_numpy(tok)
    return tok_t[:, :-1], tok_t[:, 1:], torch.from_numpy(mask)


class BlockSampler:
    """Deterministic, resumable order of training blocks.

    Position ``p`` (the number of global micro-batches drawn so far) maps to epoch
    ``p // batches_per_epoch`` and a slice of that epoch's seeded permutation, so a
    resumed run draws exactly the batches an uninterrupted one would. Each global batch
    holds ``batch_size * world_size`` blocks; rank ``r`` takes the ``r``-th slice, so the
    same global batch is seen whatever the number of processes.
    """

    def __init__(self, train_blocks: np.ndarray, batch_size: int, world_size: int = 1,
                 rank: int = 0, seed: int = 0) -> None:
        self.blocks = np.asarray(train_blocks)
        self.batch_size, self.world_size, self.rank, self.seed = (
            batch_size, world_size, rank, seed)
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = len(self.blocks) // self.global_batch
        if self.batches_per_epoch == 0:
            raise DataError(
                f"only {len(self.blocks)} training block(s) for a global batch of "
                f"{self.global_batch} (batch_size {batch_size} x {world_size} process(es)): "
                "use more data, a smaller batch_size or a shorter seq_len")
        self._epoch, self._perm = -1, self.blocks

    def epoch_of(self, position: int) -> int:
        """The epoch that global micro-batch number ``position`` falls in."""
        return position // self.batches_per_epoch

    def batch(self, position: int) -> np.ndarray:
        """This rank's block indices for global micro-batch number ``position``."""
        epoch, i = divmod(position, self.batches_per_epoch)
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._epoch, self._perm = epoch, self.blocks[rng.permutation(len(self.blocks))]
        start = i * self.global_batch + self.rank * self.batch_size
        return self._perm[start:start + self.batch_size]
