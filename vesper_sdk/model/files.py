"""A model folder's file names, and reading its weights with damage named by file."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..integrity import ModelFolderError, verify_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "ModelFolderError", "load_state_checked",
           "load_weights"]


def load_weights(path: Path, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file, turning any damage into an error that names the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise ModelFolderError(
            f"{path} is missing: the model folder has config.json but no weights; "
            "re-save the model (model.save_pretrained) or point at the right folder")
    verify_file(path)
    try:
        return load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise ModelFolderError(
            f"{path} is damaged or truncated ({exc}); restore it from a checkpoint or "
            "re-save the model") from None


# Tensors added after a folder may have been written, whose freshly built value does
# nothing new: the MetaHead's Platt calibration (identity) and its answer row (the
# confidence logit passed through).
LEGACY_KEYS = ("metahead.calibration", "metahead.answer.weight", "metahead.answer.bias")


def load_state_checked(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """load_state_dict with an error that lists what is missing, extra or mis-shaped."""
    own = model.state_dict()
    for key in LEGACY_KEYS:
        if key in own and key not in state:
            state[key] = own[key].detach().clone()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs config {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {', '.join(missing[:3])}")
        if extra:
            parts.append(f"{len(extra)} unexpected tensor(s), e.g. {', '.join(extra[:3])}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es), e.g. {'; '.join(shapes[:3])}")
        raise ModelFolderError(
            f"{path} does not match {path.parent / CONFIG_NAME}: " + "; ".join(parts)
            + ". The weights were saved from a different config; use the config.json "
            "that came with them")
    model.load_state_dict(state, strict=True)
