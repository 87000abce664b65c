"""Reading training data files in bounded pieces: ``.txt`` and ``.jsonl`` readers, the
report of malformed lines, and the cutting of long texts.

No document is read or tokenized whole: ``.txt`` files are read in slices of at most
``TXT_READ_BYTES``, texts are cut into pieces of at most ``PIECE_CHARS`` characters (at a
word start where possible, so the tokens are those of the whole text), and ``.jsonl``
lines beyond ``MAX_JSONL_LINE_BYTES``, ``MAX_JSON_DEPTH`` or ``MAX_JSON_VALUES`` are
malformed (skipped, counted and reported with ``file:line``). ``data.DataSource`` reads
through them.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..tokenizer import ROLE_TOKENS

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


# Hugging Face's byte-level BPE holds per-byte state for the whole string it encodes: one
# 50 MB string passes 10 GB of memory. So no text reaches the tokenizer (encoding or
# training) in a piece longer than PIECE_CHARS characters; the pieces of one document are
# encoded one after the other and concatenated, with one <|bos|> ... <|eos|> around them.
# A piece ends just before a space that precedes a letter (" word"), where the
# pre-tokenizer cuts anyway, so the tokens are exactly those of the whole text; failing
# that, before the last whitespace; failing that (64 KiB without whitespace: minified data,
# a long CJK run) at the limit, which can change the one token that spans the cut.
PIECE_CHARS = 64 * 1024
TXT_READ_BYTES = 1 << 20  # .txt files are read in pieces of this many bytes at most
ENCODE_BATCH_CHARS = 1 << 20  # characters handed to one encode_batch call (about)
MAX_JSONL_LINE_BYTES = 128 << 20  # longer .jsonl lines are malformed (not even read whole)
MAX_JSON_DEPTH = 64  # nesting of arrays/objects in a .jsonl line; a chat needs 3
MAX_JSON_VALUES = 1_000_000  # commas + colons outside strings in one .jsonl line
_WORD_START = re.compile(r" (?=[^\W\d_])")  # a space before a letter: a pre-token boundary
_SPACE_BEFORE_TEXT = re.compile(r"\s(?=\S)")


def _cut(text: str, start: int, limit: int) -> int:
    """Where the piece of ``text`` from ``start`` ends: at most ``limit``, at least half-way
    (so pieces are never tiny), preferring the boundaries described above."""
    low = start + (limit - start) // 2
    for pattern in (_WORD_START, _SPACE_BEFORE_TEXT):
        hi = limit
        while hi > low:  # search backwards, 4 KiB at a time
            lo = max(low, hi - 4096)
            found = [m.start() for m in pattern.finditer(text, lo, hi)]
            if found and found[-1] > start:
                return found[-1]
            hi = lo
    return limit


def split_text(text: str, max_chars: int | None = None) -> Iterator[str]:
    """``text`` in consecutive pieces of at most ``max_chars`` (default ``PIECE_CHARS``)
    characters, cut as described above, which concatenate back to ``text``; a text that
    short (the empty one too) is its only piece."""
    max_chars = max_chars or PIECE_CHARS
    start, n = 0, len(text)
    while n - start > max_chars:
        end = _cut(text, start, start + max_chars)
        yield text[start:end]
        start = end
    if start < n or n == 0:
        yield text[start:]


@dataclass
class _Piece:
    """A piece of a text document, as read: ``first`` gets a <|bos|> before it, ``last``
    an <|eos|> after it (a short document is one piece, both)."""

    text: str
    first: bool
    last: bool


Item = _Piece | list[dict[str, str]]  # what the reading stream yields: text piece or chat


def _text_pieces(text: str) -> Iterator[_Piece]:
    pieces = split_text(text)
    piece, first = next(pieces), True
    for nxt in pieces:
        yield _Piece(piece, first, False)
        piece, first = nxt, False
    yield _Piece(piece, first, True)


class _TextDoc:
    """A .txt document being read: text goes in as it comes, bounded pieces come out."""

    def __init__(self) -> None:
        self.pending = ""
        self.started = False  # a first piece went out
        self.content = False  # it holds non-whitespace text
        self.lines = 0

    def add(self, text: str, content: bool) -> Iterator[_Piece]:
        self.pending += text
        self.content = self.content or content
        if not self.content:
            # Only whitespace so far: nothing to emit yet (the document may stay blank);
            # beyond a piece's worth, the oldest of it is dropped to keep memory bounded.
            self.pending = self.pending[-PIECE_CHARS:]
            return
        start = 0
        while len(self.pending) - start > PIECE_CHARS:
            end = _cut(self.pending, start, start + PIECE_CHARS)
            yield _Piece(self.pending[start:end], not self.started, False)
            self.started, start = True, end
        self.pending = self.pending[start:]

    def end(self) -> Iterator[_Piece]:
        """The document ends: its last piece (nothing when it was blank); reset."""
        if self.content:
            yield _Piece(self.pending, not self.started, True)
        self.__init__()


def _open_data(path: Path) -> Any:
    """Open a data file for reading, refusing one that is binary (NUL bytes near its start:
    an archive, an image, UTF-16 text) with a clear message."""
    try:
        fh = open(path, "rb")
        head = fh.read(8192)
        fh.seek(0)
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    if b"\x00" in head:
        fh.close()
        raise DataError(f"{path}: binary data (NUL bytes in its first 8 KiB), not UTF-8 "
                        "text: pass .txt files of UTF-8 text or .jsonl (UTF-16 text: save "
                        "it as UTF-8)")
    return fh


def _json_shape(raw: bytes, max_depth: int, max_values: int) -> str | None:
    """Why a JSON line is too deep or too big to parse safely (None: it is fine).

    Scans the bytes outside strings in 1 MiB slices with numpy (quotes escaped by an odd
    run of backslashes do not end a string), so it costs little even on a 100 MB line and
    never recurses: ``json.loads`` on ``[[[[...`` 100k deep would raise RecursionError.
    """
    buf = np.frombuffer(raw, dtype=np.uint8)
    depth = values = 0
    in_str = 0
    backslashes = 0  # run of backslashes that ended the previous slice
    step = 1 << 20
    for s in range(0, len(buf), step):
        c = buf[s:s + step]
        n = len(c)
        idx = np.arange(n)
        is_bs = c == 92
        last_other = np.maximum.accumulate(np.where(is_bs, -1, idx))  # last non-backslash
        q = np.flatnonzero(c == 34)
        before = q - 1
        run = np.where(before >= 0, before - last_other[np.maximum(before, 0)], 0)
        run = np.where(run == q, run + backslashes, run)  # the run reaches the slice start
        toggle = np.zeros(n, dtype=np.int8)
        toggle[q[run % 2 == 0]] = 1
        quotes = np.cumsum(toggle, dtype=np.int64)
        outside = (quotes - toggle + in_str) % 2 == 0
        delta = (((c == 91) | (c == 123)).astype(np.int64) - ((c == 93) | (c == 125))) * outside
        levels = depth + np.cumsum(delta)
        if n and int(levels.max()) > max_depth:
            return f"nested deeper than {max_depth} levels"
        values += int(np.count_nonzero(((c == 44) | (c == 58)) & outside))
        if values > max_values:
            return f"more than {max_values:,} JSON values in one line"
        depth = int(levels[-1]) if n else depth
        in_str = (in_str + int(quotes[-1])) % 2 if n else in_str
        tail = n - 1 - int(last_other[-1]) if n else 0
        backslashes = backslashes + n if tail == n else tail
    return None


def _parse_json_line(raw: bytes) -> tuple[Record | None, str | None]:
    """A .jsonl line's record, or (None, why it is malformed).

    The shape scan runs only where it could fail: more brackets than the depth limit, or
    a line over 1 MiB (``TXT_READ_BYTES``; a shorter line cannot hold values enough to
    matter). RecursionError is caught as well, should ``json.loads`` still recurse too far.
    """
    if len(raw) > MAX_JSON_DEPTH and (
            raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH or len(raw) > TXT_READ_BYTES):
        shape = _json_shape(raw, MAX_JSON_DEPTH, MAX_JSON_VALUES)
        if shape:
            return None, shape
    try:
        text = raw.decode("utf-8")
        obj = json.loads(text)
    except UnicodeDecodeError as exc:
        return None, f"not valid UTF-8 (byte {exc.start})"
    except json.JSONDecodeError as exc:
        return None, f"invalid JSON ({exc.msg} at column {exc.colno})"
    except RecursionError:
        return None, "nested too deeply"
    del text
    return parse_record(obj)


def _read_jsonl(path: Path, report: DataReport, max_bad_fraction: float) -> Iterator[Record]:
    good = bad = 0
    with _open_data(path) as fh:
        lineno = 0
        while True:
            raw = fh.readline(MAX_JSONL_LINE_BYTES + 1)
            if not raw:
                break
            lineno += 1
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte order mark
            where = f"{path}:{lineno}"
            if len(raw) > MAX_JSONL_LINE_BYTES:
                size = len(raw)
                while not raw.endswith(b"\n"):  # skip the rest of the line, 1 MiB at a time
                    raw = fh.readline(TXT_READ_BYTES)
                    size += len(raw)
                    if not raw:
                        break
                record, reason = None, (f"line of {size:,} bytes, over the limit of "
                                        f"{MAX_JSONL_LINE_BYTES >> 20} MiB: split it")
            elif raw.isspace():  # (not .strip(): that would copy a long line)
                continue
            else:
                record, reason = _parse_json_line(raw)
            del raw
            if record is None:
                bad += 1
                report.add_bad(where, reason or "unusable")
                continue
            good += 1
            yield record
    _check_bad_fraction(str(path), good, bad, max_bad_fraction, report)


def _line_slices(fh: Any, size: int) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, slice, whether the line ends with it): a file's lines in slices of at
    most ``size`` bytes, so that no line, however long, is read whole."""
    lineno, chunk = 1, fh.readline(size)
    while chunk:
        if chunk.endswith(b"\n"):
            yield lineno, chunk, True
            lineno, chunk = lineno + 1, fh.readline(size)
        else:  # a slice of a long line, or the last line without a newline
            nxt = fh.readline(size)
            yield lineno, chunk, not nxt
            chunk = nxt


def _read_txt(path: Path, report: DataReport, split: str, max_bad_fraction: float,
              ) -> Iterator[_Piece]:
    """A .txt file's documents, as bounded pieces: lines are read and decoded
    ``TXT_READ_BYTES`` at a time, so a one-line 50 MB file never sits in memory whole.

    A line that is not valid UTF-8 or holds a NUL byte is skipped as malformed; in a line
    longer than ``TXT_READ_BYTES``, from the slice where the fault is (the text before it
    is already on its way to the tokenizer).
    """
    good = bad = 0
    doc = _TextDoc()
    decoder = codecs.getincrementaldecoder("utf-8")()
    held: list[str] = []  # the line's text while it is only whitespace
    routed = faulty = False  # the line's text goes into the document / the line is bad
    carry = ""  # trailing "\r"s of a slice: part of the line ending if a "\n" follows
    with _open_data(path) as fh:
        for lineno, chunk, end in _line_slices(fh, TXT_READ_BYTES):
            if not faulty:
                reason = None
                if b"\x00" in chunk:
                    reason = "NUL byte (binary data, not text)"
                else:
                    try:
                        text = carry + decoder.decode(chunk, final=end)
                    except UnicodeDecodeError:
                        reason = "not valid UTF-8"
                if reason:
                    faulty, bad = True, bad + 1
                    report.add_bad(f"{path}:{lineno}", reason)
                else:
                    if end:
                        text, carry = text.rstrip("\r\n"), ""
                    else:
                        kept = text.rstrip("\r")
                        text, carry = kept, text[len(kept):]
                    if routed or text.strip():
                        if not routed:
                            routed, text, held = True, "".join(held) + text, []
                            text = ("\n" if doc.lines else "") + text
                            doc.lines += 1
                        yield from doc.add(text, True)
                    else:
                        held = ["".join(held + [text])[-PIECE_CHARS:]]  # bounded
            if not end:
                continue
            if routed and not faulty:
                good += 1
            elif not faulty and not routed:  # a blank line
                if split == "paragraph":
                    yield from doc.end()
                else:  # inside the one document
                    yield from doc.add(("\n" if doc.lines else "") + "".join(held), False)
                    doc.lines += 1
            decoder.reset()
            held, routed, faulty, carry = [], False, False, ""
    _check_bad_fraction(str(path), good, bad, max_bad_fraction, report)
    yield from doc.end()
