"""Checkpoints: ``{"arch": name, "config": {...}, "model": state_dict}``, written atomically.

``config`` holds what the builder needs besides the name: ``num_classes`` for a window segmenter,
nothing for a finder (``kind`` says which: "segmenter" or "finder").
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engines.errors import DefectsamError
from training.model.finder import CandidateFinder
from training.model.segmenter import WindowSegmenter


class CheckpointError(DefectsamError):
    """A checkpoint that cannot be read or does not fit the model."""

    def __init__(self, path: Path | str, cause: str) -> None:
        self.path = Path(path)
        self.cause = cause
        super().__init__(f"{self.path}: {cause}")


def model_config(model: nn.Module) -> dict[str, Any]:
    """What ``build_model`` / ``build_finder`` need besides the name, and the model's kind."""
    if isinstance(model, WindowSegmenter):
        return {"kind": "segmenter", "num_classes": model.num_classes}
    if isinstance(model, CandidateFinder):
        return {"kind": "finder"}
    raise TypeError(f"not a model of the family: {type(model).__name__}")


def save_checkpoint(path: Path | str, arch: str, model: nn.Module, **extra: Any) -> Path:
    """Write the checkpoint to a temporary sibling and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"arch": arch, "config": model_config(model), "model": model.state_dict(), **extra}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_checkpoint(path: Path | str) -> dict[str, Any]:
    """Load and check the checkpoint's layout. Raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "checkpoint does not exist" if not path.exists() else "is not a file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise CheckpointError(path, f"not a readable torch checkpoint: {first_line}") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("model"), dict):
        raise CheckpointError(path, "not a defectsam checkpoint (expected a dict with 'arch', 'config', 'model')")
    if not isinstance(payload.get("arch"), str):
        raise CheckpointError(path, "checkpoint has no 'arch' name")
    if not isinstance(payload.get("config", {}), dict):
        raise CheckpointError(path, "checkpoint 'config' is not a dict")
    return payload


def load_weights(
    model: nn.Module, path: Path | str, arch: str, *, skip: Sequence[str] = ()
) -> dict[str, Any]:
    """Load a checkpoint's weights into ``model`` (built as ``arch``); returns the checkpoint.

    ``skip``: tensors left as the model has them (a class head, when the checkpoint was trained on
    other classes). Raises CheckpointError, one line naming the file, when it is for another
    architecture or its other tensors do not fit.
    """
    payload = read_checkpoint(path)
    if payload["arch"] != arch:
        raise CheckpointError(path, f"checkpoint is for architecture {payload['arch']!r}, not {arch!r}")
    own = model.state_dict()
    state = {**payload["model"], **{name: own[name] for name in skip if name in own}}
    missing = [name for name in own if name not in state]
    unexpected = [name for name in state if name not in own]
    mismatched = [
        name
        for name in own
        if name in state and isinstance(state[name], torch.Tensor) and state[name].shape != own[name].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if names:
                parts.append(f"{len(names)} {label} (first: {names[0]})")
        raise CheckpointError(path, f"weights do not fit {arch!r}: {', '.join(parts)}")
    model.load_state_dict(state)
    return payload
