"""The calibrate step of the reference run: a bundle's score threshold chosen on val, in inspection mode whole.

``defectsam-train calibrate`` inspects in the bundle's default mode, which for a bundle without a
find graph on images larger than its window is ``tiles``; the reference rows are evaluated in mode
``whole``, so their threshold is chosen the same way, with the command's own sweep
(training.commands.calibrate.sweep, ``mode="whole"``): every val image is inspected once, then
only the postprocessing reruns for each candidate score threshold, and ``best_row`` (the command's
own) keeps the best by the objective among the thresholds whose false-NG rate on good images stays
within the bound. The bundles have no finder, so there is no candidate threshold to choose. The
result goes into the manifest (``thresholds``), as the command writes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engines.bundle import Thresholds, load_bundle, update_thresholds, utc_now
from training.commands.calibrate import DEFAULT_SCORE_THRESHOLDS, DEFAULT_UNCERTAIN_GAP, best_row, sweep


def calibrate_whole(
    path: Path | str, dataset: Any, *, data: str, limit: int | None, objective: str, max_false_ng: float,
    thresholds: Sequence[float] = DEFAULT_SCORE_THRESHOLDS,
) -> Thresholds:
    """Choose and store the score threshold of the bundle at ``path`` on ``dataset`` (``data`` names it)."""
    bundle = load_bundle(path)
    rows = sweep(bundle, dataset, thresholds, DEFAULT_UNCERTAIN_GAP, limit, mode="whole", precision="fp32")
    best = best_row(rows, objective, max_false_ng)
    n_images = len(dataset) if limit is None else min(limit, len(dataset))
    chosen = Thresholds(
        score_threshold=best["score_threshold"],
        uncertain_threshold=max(0.0, best["score_threshold"] - DEFAULT_UNCERTAIN_GAP),
        candidate_threshold=None,
        calibration={
            "data": data, "n_images": n_images, "objective": objective, "max_false_ng": max_false_ng,
            "mode": "whole", "sweep": rows, "candidates": None, "measured": utc_now(),
            "command": "defectsam-train reference (training/reference/thresholds.py, inspection mode whole)",
        },
    )
    update_thresholds(bundle.path, chosen)
    return chosen
