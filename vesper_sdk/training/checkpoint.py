"""Training checkpoints: safetensors for tensors, JSON for the rest, written atomically.

A checkpoint is a folder ``<run>/checkpoints/step-00000020/``:

- ``config.json``, ``model.safetensors``, ``tokenizer.json``: a complete model folder, so
  ``vesper_sdk.load(checkpoint)`` works on any checkpoint;
- ``optimizer.safetensors`` + ``optimizer.json``: the optimizer's state dict, its tensors
  in the first file and its structure (with placeholders for the tensors) in the second.
  Nothing is pickled, so loading a checkpoint cannot run code;
- ``trainer_state.safetensors`` + ``trainer_state.json``: step, data position, options,
  scheduler and grad-scaler state, best validation loss, and the RNG states (python,
  numpy, torch, CUDA) of every rank.

The folder is assembled aside and renamed into place (``atomic_write_folder``), with a
``manifest.json`` of every file's size and SHA-256 written last, so a crash or a kill
mid-write leaves the previous checkpoints intact and no half-written one; a file damaged
afterwards is found before anything is loaded from it (``latest_intact_checkpoint``).
"""

from __future__ import annotations

import json
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..atomic import atomic_write_file, atomic_write_folder
from ..folder import CONFIG_NAME, WEIGHTS_NAME, load_state_checked, load_weights
from ..integrity import ModelFolderError, require_intact
from ..model import VesperLM

STEP_DIR = re.compile(r"^step-(\d+)$")
OPTIMIZER_TENSORS, OPTIMIZER_JSON = "optimizer.safetensors", "optimizer.json"
STATE_TENSORS, STATE_JSON = "trainer_state.safetensors", "trainer_state.json"
BEST_JSON = "best.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing or damaged; the message names it and what to do."""


# ----------------------------------------------------------------------------- flattening
def flatten_state(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "t") -> Any:
    """A JSON-able copy of ``obj`` whose tensors are moved into ``tensors``.

    Tensors become ``{"__tensor__": key}``; dicts with non-string keys (the optimizer's
    ``state`` is keyed by parameter index) become ``{"__items__": [[k, v], ...]}`` and
    tuples ``{"__tuple__": [...]}``, so :func:`unflatten_state` restores the exact types.
    """
    if torch.is_tensor(obj):
        key = f"{prefix}.{len(tensors)}"
        # clone: safetensors refuses tensors that share storage (Velvet's flat buffers).
        tensors[key] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not {"__tensor__", "__items__",
                                                            "__tuple__"} & set(obj):
            return {k: flatten_state(v, tensors, prefix) for k, v in obj.items()}
        return {"__items__": [[flatten_state(k, tensors, prefix), flatten_state(v, tensors, prefix)]
                              for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten_state(v, tensors, prefix) for v in obj]}
    if isinstance(obj, list):
        return [flatten_state(v, tensors, prefix) for v in obj]
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": obj.dtype.name}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint")


def unflatten_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__items__" in obj:
            return {unflatten_state(k, tensors): unflatten_state(v, tensors)
                    for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(unflatten_state(v, tensors) for v in obj["__tuple__"])
        if "__ndarray__" in obj:
            return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
        return {k: unflatten_state(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unflatten_state(v, tensors) for v in obj]
    return obj


# ----------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    """This process's RNG states: python, numpy, torch CPU and every CUDA device."""
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (after a trip through flatten/unflatten)."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(state["torch"].to(torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        cuda = [t.to(torch.uint8) for t in state["cuda"]]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


# ----------------------------------------------------------------------------- folders
def step_dir(root: str | Path, step: int) -> Path:
    """The folder of the checkpoint at ``step`` (``root/step-00000020``)."""
    return Path(root) / f"step-{step:08d}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / STATE_JSON).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    ckpts = list_checkpoints(root)
    return ckpts[-1][1] if ckpts else None


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint at ``path`` cannot be resumed from (a damaged file), or None.

    Every file against the manifest, then the small files parsed and the tensor files'
    headers read: what loading it would meet, without building a model.
    """
    try:
        require_intact(path)
        read_trainer_state(path)
        _read_json(path / OPTIMIZER_JSON)
        for name in (WEIGHTS_NAME, OPTIMIZER_TENSORS):
            with safe_open(str(path / name), framework="pt") as fh:
                fh.keys()
    except (ModelFolderError, CheckpointError) as exc:
        return str(exc)
    except Exception as exc:  # safetensors' own error types: a header that does not parse
        return f"{type(exc).__name__}: {exc}"
    return None


def latest_intact_checkpoint(root: str | Path, log: Callable[[str], None] = print,
                             ) -> Path | None:
    """The newest checkpoint under ``root`` whose files are intact; each newer one that is
    damaged is named, with why, and skipped."""
    for step, path in reversed(list_checkpoints(root)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        log(f"resume: skipping the checkpoint of step {step} ({path.name}), it is damaged: "
            f"{problem}")
    return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is damaged or missing ({exc}); resume from an earlier "
                              "checkpoint (delete this folder) or start afresh") from None


def best_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint with the lowest validation loss so far (``best.json``), if any."""
    path = Path(root) / BEST_JSON
    if not path.is_file():
        return None
    best = step_dir(root, int(json.loads(path.read_text())["step"]))
    return best if best.is_dir() else None


def record_best(root: str | Path, step: int, val_loss: float) -> None:
    """Remember ``step`` as the best checkpoint so far (``root/best.json``)."""
    atomic_write_file(Path(root) / BEST_JSON,
                      json.dumps({"step": step, "val_loss": val_loss}).encode())


def prune_checkpoints(root: str | Path, keep_last: int, keep_steps: set[int]) -> list[Path]:
    """Delete all but the ``keep_last`` newest checkpoints and those in ``keep_steps``."""
    ckpts = list_checkpoints(root)
    recent = {s for s, _ in ckpts[-keep_last:]} if keep_last > 0 else set()
    removed = []
    for step, path in ckpts:
        if step not in recent and step not in keep_steps:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


# ----------------------------------------------------------------------------- save/load
def save_checkpoint(path: str | Path, model: VesperLM, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], tokenizer_json: Path | None = None,
                    ) -> Path:
    """Write a checkpoint folder at ``path`` atomically (see the module docstring).

    ``trainer_state`` may hold tensors and numpy arrays (RNG states); they go to
    ``trainer_state.safetensors``.
    """
    model_state = {k: v.detach().to("cpu", copy=True).contiguous()
                   for k, v in model.state_dict().items()}
    opt_tensors: dict[str, torch.Tensor] = {}
    opt_json = flatten_state(optimizer.state_dict(), opt_tensors, "opt")
    st_tensors: dict[str, torch.Tensor] = {}
    st_json = flatten_state(trainer_state, st_tensors, "state")
    files: dict[str, bytes | Path] = {
        CONFIG_NAME: model.config.to_json().encode(),
        OPTIMIZER_JSON: json.dumps({"class": type(optimizer).__name__,
                                    "state_dict": opt_json}).encode(),
        STATE_JSON: json.dumps(st_json, indent=1).encode(),
    }
    if tokenizer_json is not None:
        files["tokenizer.json"] = Path(tokenizer_json)

    def write(tmp: Path) -> None:
        save_file(model_state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        save_file(opt_tensors, str(tmp / OPTIMIZER_TENSORS))
        save_file(st_tensors, str(tmp / STATE_TENSORS))

    return atomic_write_folder(path, files, writer=write, keep_existing=False)


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    """The trainer state of a checkpoint (tensors restored), without touching a model."""
    path = Path(path)
    structure = _read_json(path / STATE_JSON)
    tensors = _load_tensors(path / STATE_TENSORS)
    try:
        return unflatten_state(structure, tensors)
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path / STATE_JSON} does not match "
                              f"{path / STATE_TENSORS} ({exc}); resume from an earlier "
                              "checkpoint (delete this folder) or start afresh") from None


def _load_tensors(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A checkpoint's safetensors file, its damage named by file."""
    try:
        return load_file(str(path), device=device)
    except Exception as exc:  # SafetensorError, OSError, ... : all mean a damaged file
        raise CheckpointError(f"{path} is damaged or missing ({type(exc).__name__}: {exc}); "
                              "resume from an earlier checkpoint (delete this folder) or "
                              "start afresh") from None


def load_checkpoint(path: str | Path, model: VesperLM,
                    optimizer: torch.optim.Optimizer | None = None,
                    map_location: str | torch.device = "cpu",
                    warn: Callable[[str], None] = print) -> dict[str, Any]:
    """Load weights (and optimizer state) from a checkpoint; return its trainer state."""
    path = Path(path)
    state = read_trainer_state(path)
    load_state_checked(model, load_weights(path / WEIGHTS_NAME, map_location), path)
    if optimizer is not None:
        meta = _read_json(path / OPTIMIZER_JSON)
        if not isinstance(meta, dict) or "class" not in meta or "state_dict" not in meta:
            raise CheckpointError(f"{path / OPTIMIZER_JSON} is damaged (no optimizer class "
                                  "and state); resume from an earlier checkpoint")
        if meta["class"] != type(optimizer).__name__:
            warn(f"checkpoint {path.name} holds {meta['class']} state but this run uses "
                 f"{type(optimizer).__name__}: starting the optimizer afresh")
        else:
            tensors = _load_tensors(path / OPTIMIZER_TENSORS, str(map_location))
            try:
                optimizer.load_state_dict(unflatten_state(meta["state_dict"], tensors))
            except (ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{path / OPTIMIZER_JSON} does not match the optimizer "
                                      f"or its tensors ({exc}); resume from an earlier "
                                      "checkpoint") from None
    return state
