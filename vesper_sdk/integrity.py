"""Integrity: each file of a model folder, checkpoint or export checked against its manifest.

``manifest.json`` (written last by ``vesper_sdk.atomic``) lists every file's size and
SHA-256. :func:`verify_file` is called by each loader before it reads a file (weights,
config, tokenizer, ONNX graph): a truncated, zeroed or flipped file is refused by name
with :class:`ModelFolderError` (exit 2 on the command line) instead of loading into
different answers. Files verified once in a process are not hashed again unless they
change. Folders written before manifests existed load as before (nothing to check
against); ``vesper verify`` says so.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from .atomic import MANIFEST_NAME, file_digest, manifest_checksum


class ModelFolderError(RuntimeError):
    """A model folder is missing a file, or a file is damaged or does not match config.json."""


_verified: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256 checked
_lock = threading.Lock()


def read_manifest(folder: Path) -> dict[str, dict[str, Any]] | None:
    """The manifest's ``files`` entries, None when the folder has none; a manifest that
    does not parse is itself damage (ModelFolderError)."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_bytes())
        files = data["files"]
        if not isinstance(files, dict) or not all(
                isinstance(e, dict) and isinstance(e.get("size"), int)
                and isinstance(e.get("sha256"), str) for e in files.values()):
            raise ValueError("unexpected layout")
        if "checksum" in data and data["checksum"] != manifest_checksum(files):
            raise ValueError("its own checksum does not match its entries")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ModelFolderError(f"{path} is damaged ({exc}): the folder's integrity cannot be "
                               "checked; restore the folder from a copy or re-save it"
                               ) from None
    return files


def check_file(path: Path, entry: dict[str, Any]) -> str | None:
    """What is wrong with ``path`` against its manifest ``entry``, or None."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return "missing (the manifest lists it)"
    if stat.st_size != entry["size"]:
        return (f"{stat.st_size} bytes where the manifest says {entry['size']} (truncated or "
                "overwritten)")
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _lock:
        if _verified.get(key) == entry["sha256"]:
            return None
    if file_digest(path)["sha256"] != entry["sha256"]:
        return "its content changed since it was written (SHA-256 differs from the manifest)"
    with _lock:
        _verified[key] = entry["sha256"]
    return None


def verify_file(path: str | Path) -> None:
    """Raise ModelFolderError naming ``path`` if it differs from its folder's manifest."""
    path = Path(path)
    files = read_manifest(path.parent)
    entry = (files or {}).get(path.name)
    if entry is None:
        return
    problem = check_file(path, entry)
    if problem:
        raise ModelFolderError(f"{path} is damaged: {problem}. Restore it (from a checkpoint, "
                               "a backup, or by saving the model again); if you changed it on "
                               f"purpose, `vesper verify {path.parent} --update` accepts it")


def verify_folder(folder: str | Path) -> tuple[bool, list[tuple[str, str]]]:
    """(whether the folder has a manifest, [(file, problem)]) over every listed file."""
    folder = Path(folder)
    files = read_manifest(folder)
    if files is None:
        return False, []
    problems = []
    for name, entry in sorted(files.items()):
        problem = check_file(folder / name, entry)
        if problem:
            problems.append((name, problem))
    return True, problems


def require_intact(folder: str | Path) -> None:
    """Raise ModelFolderError listing every damaged file of ``folder``."""
    _, problems = verify_folder(folder)
    if problems:
        listed = "; ".join(f"{name}: {why}" for name, why in problems)
        raise ModelFolderError(f"{folder} is damaged: {listed}")


def forget_verified() -> None:
    """Drop the record of files verified in this process (tests)."""
    with _lock:
        _verified.clear()
