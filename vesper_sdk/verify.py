"""``vesper verify DIR``: check a model folder, checkpoint or export, file by file.

Each file is checked against the folder's manifest (size and SHA-256) and parsed as what
its name says (config and JSON files, safetensors headers, the tokenizer, the ONNX graph),
so a folder from before manifests is still checked for what parsing can see. A training
run's folder is checked whole: its model folder and every checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open

from .atomic import MANIFEST_NAME, write_manifest
from .integrity import ModelFolderError, verify_folder
from .tokenizer import VesperTokenizer


@dataclass
class VerifyOptions:
    """Check a model folder, checkpoint, ONNX export or training run for damaged files.

    Exit code 0 when every file is intact, 2 when one is damaged (each is named, with what
    is wrong). A folder written before manifests existed is checked by parsing its files.
    """

    path: str = field(metadata={"help": "model folder, checkpoint, ONNX export or run folder",
                                "positional": True})
    update: bool = field(default=False, metadata={
        "help": "after checking that every file parses, write the manifest anew for the files "
                "as they are now (after editing config.json by hand, say)"})


def parse_problem(path: Path) -> str | None:
    """What parsing ``path`` as its kind of file finds wrong, or None."""
    name = path.name
    try:
        if name == "tokenizer.json":
            VesperTokenizer.from_file(path)
        elif name == "config.json":
            data = json.loads(path.read_bytes())
            if not isinstance(data, dict):
                return "not a JSON object"
        elif name.endswith(".json"):
            json.loads(path.read_bytes())
        elif name.endswith(".safetensors"):
            with safe_open(str(path), framework="pt") as fh:
                fh.keys()
        elif name.endswith(".onnx"):
            import onnx  # the export extra's: only for an export

            onnx.load(str(path), load_external_data=False)
    except ImportError:
        return None  # the library to parse it is not installed: the manifest still checked
    except ModelFolderError:
        return None  # verify_file's own verdict: reported from the manifest already
    except Exception as exc:  # each parser raises its own types; any means damage here
        return f"does not parse ({type(exc).__name__}: {str(exc)[:200]})"
    return None


def folders_in(path: Path) -> list[Path]:
    """The folders to check: ``path`` itself, or a run's model folder and checkpoints."""
    if (path / MANIFEST_NAME).is_file() or (path / "config.json").is_file() or any(
            path.glob("*.onnx")):
        return [path]
    found = [p for p in (path / "model",) if p.is_dir()]
    ckpts = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found += sorted(p for p in ckpts.glob("step-*") if p.is_dir())
    return found


def check(folder: Path, update: bool = False) -> list[tuple[str, str]]:
    """[(file, problem)] of one folder, printed; with ``update``, a folder whose files all
    parse gets its manifest written anew instead of reporting manifest mismatches."""
    try:
        has, problems = verify_folder(folder)
    except ModelFolderError as exc:  # the manifest itself does not parse
        has, problems = True, [(MANIFEST_NAME, str(exc))]
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.name != MANIFEST_NAME)
    unparsable = [(p.name, why) for p in files if (why := parse_problem(p))]
    print(f"{folder}: {len(files)} files, " + (
        "checked against the manifest and parsed" if has else
        "no manifest (written before manifests): checked by parsing only"))
    if update and not unparsable:
        write_manifest(folder)
        print(f"  manifest written anew for {len(files)} files")
        return []
    named = {name for name, _ in problems}
    problems += [(n, why) for n, why in unparsable if n not in named]
    for name, why in problems:
        print(f"  DAMAGED {name}: {why}")
    return problems


def cli(opts: VerifyOptions) -> int:
    """``vesper verify``: exit 0 when intact, 2 (ModelFolderError) when a file is damaged."""
    path = Path(opts.path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder: pass a model folder, checkpoint, "
                                "export or training run folder")
    folders = folders_in(path)
    if not folders:
        raise ModelFolderError(f"{path} holds no model folder, checkpoint or export")
    damaged = sum(len(check(folder, opts.update)) for folder in folders)
    if damaged:
        raise ModelFolderError(f"{damaged} damaged file(s) in {path} (listed above): restore "
                               "them from a checkpoint or a backup, or save the model again; "
                               "--update accepts files changed on purpose if they parse")
    print("all files intact")
    return 0
