"""Atomic writes: a model folder, checkpoint or export appears whole or not at all.

Every folder written here carries ``manifest.json`` (each file's size and SHA-256),
written last, just before the folder is renamed into place; a file written later into
such a folder (:func:`atomic_write_file`) updates its entry. ``vesper_sdk.integrity``
checks files against it when they are loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
_CHUNK = 1 << 20


def file_digest(path: Path) -> dict[str, int | str]:
    """``{"size", "sha256"}`` of a file, read in 1 MiB pieces."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def manifest_files(folder: Path) -> list[Path]:
    """The files a folder's manifest covers: its regular, non-hidden top-level files."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.name != MANIFEST_NAME)


def manifest_checksum(files: dict) -> str:
    """The manifest's own checksum over its entries: damage to the manifest itself is then
    told apart from damage to a file it lists."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def write_manifest(folder: Path) -> None:
    """Write ``folder/manifest.json`` for the files in it now (the folder's last write)."""
    entries = {p.name: file_digest(p) for p in manifest_files(folder)}
    _write_manifest(folder / MANIFEST_NAME, entries)


def _write_manifest(path: Path, files: dict) -> None:
    data = {"format": MANIFEST_FORMAT, "files": files, "checksum": manifest_checksum(files)}
    atomic_write_file(path, json.dumps(data, indent=1, sort_keys=True).encode())


def _umask() -> int:
    # os.umask can only be read by setting it; set it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_folder(directory: str | Path, files: dict[str, bytes | Path] | None = None,
                        writer: Callable[[Path], None] | None = None,
                        extra_files: dict[str, Path] | None = None,
                        keep_existing: bool = True) -> Path:
    """Assemble a folder aside and rename it into place.

    The new folder starts as a copy of the existing one (so files we do not rewrite
    survive), gets ``files`` (name -> bytes or a path to copy) and whatever ``writer(tmp)``
    writes, is fsynced, and then replaces ``directory`` with two renames. A crash at any
    point leaves either the old folder or the new one, plus at most a ``.tmp-*`` folder.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    clean_orphans(directory.parent, directory.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    # mkdtemp/mkstemp make private 0700/0600 entries; a saved model follows the user's umask
    # like any other file, so the rest of a team can read it.
    mask = _umask()
    tmp.chmod(0o777 & ~mask)
    try:
        if keep_existing and directory.is_dir():
            for item in directory.iterdir():
                if item.is_file():
                    shutil.copy2(item, tmp / item.name)
                elif item.is_dir():
                    shutil.copytree(item, tmp / item.name)
        for name, content in {**(files or {}), **(extra_files or {})}.items():
            if isinstance(content, bytes):
                (tmp / name).write_bytes(content)
            else:
                shutil.copy2(content, tmp / name)
        if writer is not None:
            writer(tmp)
        (tmp / MANIFEST_NAME).unlink(missing_ok=True)  # a copied one would be stale
        write_manifest(tmp)
        for item in tmp.iterdir():
            if item.is_file():
                item.chmod(0o666 & ~mask)  # some writers (safetensors) make 0600 files
                with open(item, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if directory.exists():
            old = directory.parent / f".{directory.name}.old-{os.getpid()}"
            os.rename(directory, old)
        os.rename(tmp, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def clean_orphans(parent: str | Path, name: str | None = None) -> list[Path]:
    """Undo what a killed :func:`atomic_write_folder` left in ``parent`` (for the folder
    ``name`` only, or every one): a ``.NAME.tmp-*`` being assembled is deleted; a
    ``.NAME.old-*`` moved aside is renamed back when ``NAME`` is missing (the kill fell
    between the two renames) and deleted otherwise. Returns what it removed or restored."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    done = []
    for p in sorted(parent.iterdir()):
        base, sep, _ = p.name[1:].rpartition(".tmp-")
        kind = "tmp" if sep else None
        if not sep:
            base, sep, _ = p.name[1:].rpartition(".old-")
            kind = "old" if sep else None
        if not p.name.startswith(".") or kind is None or (name is not None and base != name):
            continue
        target = parent / base
        if kind == "old" and not target.exists():
            os.rename(p, target)  # the previous version, complete: it comes back
        elif p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        done.append(p)
    return done


def atomic_write_file(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    manifest = path.parent / MANIFEST_NAME
    if path.name != MANIFEST_NAME and not path.name.startswith(".") and manifest.is_file():
        _update_manifest(manifest, path)
    return path


def _update_manifest(manifest: Path, path: Path) -> None:
    """Record the file just written in its folder's manifest (a folder written whole
    has one; a file added or rewritten later must not look damaged)."""
    try:
        files = json.loads(manifest.read_text())["files"]
        files[path.name] = file_digest(path)
    except (OSError, ValueError, KeyError, TypeError):
        return  # a damaged manifest stays damaged: verifying it says so
    _write_manifest(manifest, files)
