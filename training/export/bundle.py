"""Checkpoints -> an engine bundle: the segmenter's (required) and the finder's (optional).

The assembly behind ``defectsam-train export`` and every other place that turns trained
weights into what ships (evaluation of a checkpoint, the reference run), so they cannot drift:
the architectures and classes come from the checkpoints, provenance records their digests,
the seed, recipe and teacher, and the validation figures of the training run go to
``metrics.training``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from engines.bundle import Bundle, sha256_file
from engines.errors import DefectsamError
from training.export.onnx import DEFAULT_MAX_WINDOWS, DEFAULT_REDUCTION, DEFAULT_WINDOW, export_bundle
from training.model.build import build_finder, build_model, list_finders, list_models
from training.model.checkpoint import CheckpointError, load_weights, read_checkpoint


def _numbers(metrics: Any) -> dict[str, float]:
    if not isinstance(metrics, dict):
        return {}
    return {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def export_checkpoints(
    checkpoint: Path | str | None,
    out: Path | str,
    *,
    finder: Path | str | None = None,
    name: str | None = None,
    classes: Sequence[str] | None = None,
    arch: str | None = None,
    window: int = DEFAULT_WINDOW,
    max_windows: int = DEFAULT_MAX_WINDOWS,
    reduction: int = DEFAULT_REDUCTION,
    notes: str = "",
    seed: int = 0,
) -> Bundle:
    """Export ``checkpoint`` (a segmenter; None: random weights of ``arch``) and ``finder`` to a bundle at ``out``.

    Classes: the checkpoint's (its training run's), else ``classes``; a given list must match a
    trained checkpoint's. Raises CheckpointError / DefectsamError naming the file or flag.
    """
    saved: dict[str, Any] = read_checkpoint(checkpoint) if checkpoint is not None else {}
    if saved:
        if saved.get("config", {}).get("kind") == "finder":
            raise CheckpointError(
                checkpoint or "", "holds a finder; give it with --finder and a segmenter as --checkpoint"
            )
        arch = saved["arch"]
        if arch not in list_models():
            raise CheckpointError(
                checkpoint or "", f"holds {arch!r}, not a segmenter this runtime exports ({', '.join(list_models())})"
            )
    if arch is None or arch not in list_models():
        raise DefectsamError(f"--arch: name a segmenter to export ({', '.join(list_models())}), got {arch!r}")
    trained_classes = saved.get("classes") if isinstance(saved.get("classes"), list) else None
    if trained_classes is not None and classes is not None and list(classes) != list(trained_classes):
        raise DefectsamError(
            f"--classes {','.join(classes)}: {checkpoint} was trained for {','.join(trained_classes)}"
        )
    names = list(trained_classes or classes or ("scratch", "dent", "pinhole"))
    if not names or not all(names) or len(set(names)) != len(names):
        raise DefectsamError(f"--classes: expected distinct non-empty names, got {names!r}")

    torch.manual_seed(seed)
    model = build_model(arch, num_classes=len(names))
    provenance: dict[str, Any]
    if checkpoint is not None:
        payload = load_weights(model, checkpoint, arch)
        provenance = {
            "weights": "trained", "notes": notes, "checkpoint_sha256": sha256_file(Path(checkpoint)),
            **{key: payload[key] for key in ("teacher", "recipe") if isinstance(payload.get(key), str)},
        }
        if isinstance(payload.get("seed"), int):
            provenance["seed"] = payload["seed"]
    else:
        stand_in = "random stand-in weights (no checkpoint), not trained: its masks are meaningless"
        provenance = {"weights": "untrained", "notes": f"{stand_in}. {notes}".strip(" ."), "seed": seed}

    finder_model = None
    finder_arch = None
    if finder is not None:
        found = read_checkpoint(finder)
        finder_arch = found["arch"]
        if finder_arch not in list_finders():
            raise CheckpointError(finder, f"holds {finder_arch!r}, not a finder ({', '.join(list_finders())})")
        finder_model = build_finder(finder_arch)
        load_weights(finder_model, finder, finder_arch)
        provenance["finder_checkpoint_sha256"] = sha256_file(Path(finder))
    metrics: dict[str, Any] = {}
    if _numbers(saved.get("metrics")):
        metrics["training"] = {"segmenter": _numbers(saved.get("metrics"))}
    if finder is not None and _numbers(found.get("metrics")):
        metrics.setdefault("training", {})["finder"] = _numbers(found.get("metrics"))
    return export_bundle(
        model, arch, out, name=name or arch, classes=names, provenance=provenance, finder=finder_model,
        finder_arch=finder_arch, window=window, max_windows=max_windows, reduction=reduction, metrics=metrics,
    )
