"""The calibrate step of the reference run: a bundle's score threshold chosen on val, in inspection mode whole.

``defectsam-train calibrate`` (training.commands.calibrate) inspects in the bundle's default mode,
which for a bundle without a find graph on images larger than its window is ``tiles``; the reference
rows are evaluated in mode ``whole``, so their threshold is chosen the same way. The sweep is the
command's: every val image is inspected once, then only the postprocessing reruns for each
candidate score threshold, and ``best_row`` (the command's own) keeps the best by the objective
among the thresholds whose false-NG rate on good images stays within the bound. The bundles have
no finder, so there is no candidate threshold to choose. The result goes into the manifest
(``thresholds``), as the command writes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engines.bundle import Thresholds, load_bundle, update_thresholds, utc_now
from training.commands.calibrate import best_row

#: The score thresholds swept (the calibrate command's default sweep).
SCORE_THRESHOLDS = (0.30, 0.40, 0.50, 0.60, 0.70, 0.80, 0.90, 0.95)
UNCERTAIN_GAP = 0.1  # the UNCERTAIN threshold is the score threshold less this (the command's default)


def sweep_whole(bundle: Any, dataset: Any, thresholds: Sequence[float], limit: int | None) -> list[dict[str, Any]]:
    """One row per score threshold (the calibrate command's row keys): figures on ``dataset``, mode whole."""
    from engines.backends import open_engine
    from engines.backends.onnxruntime import Config
    from engines.inspector import InspectionConfig, Inspector
    from engines.postprocess import PostprocessConfig, Postprocessor
    from training.eval.evaluate import inspect_samples, score

    engine = open_engine(bundle, Config(providers=["cpu"], precision="fp32"))
    try:
        inspector = Inspector(engine, InspectionConfig(mode="whole"))
        passes = inspect_samples(inspector, dataset, limit)
        rows = []
        for threshold in thresholds:
            post = PostprocessConfig(score_threshold=threshold,
                                     uncertain_threshold=max(0.0, threshold - UNCERTAIN_GAP))
            inspector.postprocess = Postprocessor(bundle.manifest.classes, post)
            report = score(inspector, passes, label="calibration", dataset="held out")
            auto = report["automatic"]
            rows.append({"score_threshold": threshold, **{k: auto.get(k) for k in
                         ("image_accuracy", "f1", "precision", "recall", "false_ng_rate", "tp", "fp", "fn")},
                         "miou_fg": report["semantic"]["miou_fg"]})
        return rows
    finally:
        engine.close()


def calibrate_whole(
    path: Path | str, dataset: Any, *, data: str, limit: int | None, objective: str, max_false_ng: float,
    thresholds: Sequence[float] = SCORE_THRESHOLDS,
) -> Thresholds:
    """Choose and store the score threshold of the bundle at ``path`` on ``dataset`` (``data`` names it)."""
    bundle = load_bundle(path)
    rows = sweep_whole(bundle, dataset, thresholds, limit)
    best = best_row(rows, objective, max_false_ng)
    n_images = len(dataset) if limit is None else min(limit, len(dataset))
    chosen = Thresholds(
        score_threshold=best["score_threshold"],
        uncertain_threshold=max(0.0, best["score_threshold"] - UNCERTAIN_GAP),
        candidate_threshold=None,
        calibration={
            "data": data, "n_images": n_images, "objective": objective, "max_false_ng": max_false_ng,
            "mode": "whole", "sweep": rows, "candidates": None, "measured": utc_now(),
            "command": "defectsam-train reference (training/reference/thresholds.py, inspection mode whole)",
        },
    )
    update_thresholds(bundle.path, chosen)
    return chosen
