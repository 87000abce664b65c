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

Malformed lines (bad JSON, a missing field, an unknown role, undecodable UTF-8) are
skipped, counted and reported with ``file:line`` examples; a file where more than
``max_bad_fraction`` of the lines are bad stops the run with :class:`DataError`, since
it is almost surely the wrong file or the wrong format.

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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import skills
from ..atomic import atomic_write_file, atomic_write_folder
from ..tokenizer import ROLE_TOKENS, VesperTokenizer

CACHE_VERSION = 1
DATA_SUFFIXES = (".txt", ".jsonl")
BUILTIN = ("builtin:skills",)
MAX_EXAMPLES = 8  # bad-line examples kept for the report

Record = str | list[dict[str, str]]  # a text document or a chat


class DataError(ValueError):
    """The training data cannot be used as given; the message names the file and the fix."""


@dataclass
class DataReport:
    """What reading the data found: documents, chats, and the malformed lines skipped."""

    files: int = 0
    texts: int = 0
    chats: int = 0
    bad: int = 0
    examples: list[str] = field(default_factory=list)

    @property
    def documents(self) -> int:
        return self.texts + self.chats

    def add_bad(self, where: str, reason: str) -> None:
        self.bad += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(f"{where}: {reason}")

    def summary(self) -> str:
        """One line, plus the bad-line examples when there are any."""
        line = (f"{self.documents} documents ({self.texts} texts, {self.chats} chats) "
                f"from {self.files or 'in-memory'} source(s)")
        if self.bad:
            line += f"; skipped {self.bad} malformed line(s), e.g.\n  " + "\n  ".join(
                self.examples)
        return line

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (stored in the token cache's meta.json)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataReport:
        return cls(**data)


# ----------------------------------------------------------------------------- parsing
def parse_record(obj: Any) -> tuple[Record | None, str | None]:
    """(record, None) for a usable item, or (None, reason) for a malformed one."""
    if isinstance(obj, str):
        return (obj, None) if obj.strip() else (None, "empty text")
    if isinstance(obj, list):
        obj = {"messages": obj}
    if not isinstance(obj, dict):
        return None, f"expected an object with 'text' or 'messages', got {type(obj).__name__}"
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            return None, "'messages' must be a non-empty list"
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict) or not isinstance(msg.get("content"), str):
                return None, f"message {i} needs a string 'content'"
            if msg.get("role") not in ROLE_TOKENS:
                return None, (f"message {i} has role {msg.get('role')!r}; use one of "
                              f"{', '.join(ROLE_TOKENS)}")
        if not any(m["role"] == "assistant" for m in messages):
            return None, "no assistant message (nothing to learn from)"
        return [{"role": m["role"], "content": m["content"]} for m in messages], None
    if "text" in obj:
        text = obj["text"]
        if not isinstance(text, str):
            return None, f"'text' must be a string, got {type(text).__name__}"
        return (text, None) if text.strip() else (None, "empty text")
    return None, "no 'text' or 'messages' field"


def _check_bad_fraction(where: str, good: int, bad: int, max_bad_fraction: float,
                        report: DataReport) -> None:
    total = good + bad
    if bad and bad > max_bad_fraction * total:
        examples = "\n  ".join(e for e in report.examples if e.startswith(where)) or "-"
        raise DataError(
            f"{where}: {bad} of {total} lines are malformed (more than "
            f"{max_bad_fraction:.0%}), so this is probably the wrong file or format. "
            f"Examples:\n  {examples}\nExpected .jsonl lines like {{\"text\": \"...\"}} or "
            "{\"messages\": [{\"role\": \"user\", \"content\": \"...\"}, ...]}, or plain .txt")


def _read_jsonl(path: Path, report: DataReport, max_bad_fraction: float) -> Iterator[Record]:
    good = bad = 0
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    with fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                record, reason = None, "not valid UTF-8"
            except json.JSONDecodeError as exc:
                record, reason = None, f"invalid JSON ({exc.msg} at column {exc.colno})"
            else:
                record, reason = parse_record(obj)
            if record is None:
                bad += 1
                report.add_bad(where, reason or "unusable")
                continue
            good += 1
            yield record
    _check_bad_fraction(str(path), good, bad, max_bad_fraction, report)


def _read_txt(path: Path, report: DataReport, split: str, max_bad_fraction: float,
              ) -> Iterator[str]:
    good = bad = 0
    lines: list[str] = []
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    with fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                bad += 1
                report.add_bad(f"{path}:{lineno}", "not valid UTF-8")
                continue
            if line.strip():
                good += 1
            elif split == "paragraph":
                if lines:
                    yield "\n".join(lines)
                lines = []
                continue
            lines.append(line)
    _check_bad_fraction(str(path), good, bad, max_bad_fraction, report)
    text = "\n".join(lines)
    if text.strip():
        yield text


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
        """Usable documents in order; malformed ones are counted in ``self.report``."""
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
                _count(report, record)
                yield record
            _check_bad_fraction("<python data>", good, bad, self.max_bad_fraction, report)
            return
        for path in self.files:
            if path.suffix == ".jsonl":
                it: Iterator[Record] = _read_jsonl(path, report, self.max_bad_fraction)
            else:
                it = _read_txt(path, report, self.txt_split, self.max_bad_fraction)
            for record in it:
                _count(report, record)
                yield record

    def texts(self) -> Iterator[str]:
        """The raw strings (texts and message contents), for training a tokenizer."""
        for record in self.records():
            if isinstance(record, str):
                yield record
            else:
                for msg in record:
                    yield msg["content"]


def _count(report: DataReport, record: Record) -> None:
    if isinstance(record, str):
        report.texts += 1
    else:
        report.chats += 1


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


def _encode_records(records: Iterable[Record], tokenizer: VesperTokenizer, chunk: int = 512,
                    ) -> Iterator[tuple[list[int], list[int]]]:
    # Texts are encoded in batches (the Rust tokenizer parallelises them); chats go
    # through encode_chat, the one definition of the chat template and its loss mask.
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    buf: list[Record] = []

    def flush() -> Iterator[tuple[list[int], list[int]]]:
        texts = [r for r in buf if isinstance(r, str)]
        encoded = iter(tokenizer.encode_batch(texts)) if texts else iter(())
        for r in buf:
            if isinstance(r, str):
                ids = next(encoded)
                yield [bos, *ids, eos], [0] + [1] * (len(ids) + 1)
            else:
                enc = tokenizer.encode_chat(r)
                yield enc.ids, enc.loss_mask
        buf.clear()

    for record in records:
        buf.append(record)
        if len(buf) >= chunk:
            yield from flush()
    yield from flush()


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
            for ids, mask in _encode_records(source.records(), tokenizer):
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
