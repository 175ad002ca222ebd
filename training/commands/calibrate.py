"""``defectsam-train calibrate BUNDLE --data SPEC``: choose a bundle's thresholds on held-out data.

Two thresholds depend on the model and its training, and both go into the manifest
(``thresholds``), where the daemon, ``defectsam infer`` and ``defectsam-train eval`` take them
unless their own configuration names one:

* the candidate threshold (bundles with a find pass): the highest find-pass probability at which
  ``--candidate-recall`` (default 0.98) of the held-out defects still have a candidate cell, so
  the segment pass looks at them. A miss here is a defect never looked at; a false candidate
  costs a window, and when a frame's candidates outnumber ``max_windows`` the frame is UNCERTAIN.
  (On the default bundle's validation frames 0.98 keeps every scratch of 2 px and more and every
  pinhole of 3 px and more; the 1-2% it gives up are hairlines, the smallest pits and dents.)
* the score threshold: with that candidate threshold the bundle inspects every held-out frame once
  through engines/ (both passes); then only the postprocessing reruns for each candidate score
  threshold, and the best by ``--objective`` among those whose false-NG rate on good frames stays
  within ``--max-false-ng`` (default 1%) is kept.

Calibrate on validation data, never on the test set the bundle's figures are reported on.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from engines.errors import DefectsamError

#: The score thresholds swept by default, and the UNCERTAIN threshold's distance below the chosen one.
DEFAULT_SCORE_THRESHOLDS: tuple[float, ...] = (0.30, 0.40, 0.50, 0.60, 0.70, 0.80, 0.90, 0.95)
DEFAULT_UNCERTAIN_GAP = 0.1
_DEFAULT_SWEEP = ",".join(f"{t:.2f}" for t in DEFAULT_SCORE_THRESHOLDS)
_CANDIDATE_SWEEP = tuple(round(v, 2) for v in np.arange(0.02, 0.92, 0.02))
OBJECTIVES = ("f1", "image_accuracy")


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "calibrate", help="choose the bundle's candidate and score thresholds on held-out data; store them",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("bundle", type=Path, help="engine bundle directory (its manifest gains 'thresholds')")
    parser.add_argument(
        "--data", required=True,
        help="held-out dataset spec, e.g. 'synthetic,n=60,seed=1000000' (4 MP frames) or neu_seg:val",
    )
    parser.add_argument("--limit", type=int, default=None, help="use an evenly spaced subset of N images")
    parser.add_argument(
        "--thresholds", default=_DEFAULT_SWEEP, help=f"candidate score thresholds (default {_DEFAULT_SWEEP})"
    )
    parser.add_argument(
        "--objective", choices=OBJECTIVES, default="f1",
        help="f1: defects matched at IoU 0.5 (default); image_accuracy: OK/NG verdicts right. Ties go to the other "
        "figure, then to the higher threshold",
    )
    parser.add_argument("--max-false-ng", type=float, default=0.01,
                        help="largest false-NG rate on good frames a chosen score threshold may give (default 0.01)")
    parser.add_argument("--candidate-recall", type=float, default=0.98,
                        help="share of held-out defects the find pass must still propose (default 0.98)")
    parser.add_argument(
        "--uncertain-gap", type=float, default=DEFAULT_UNCERTAIN_GAP,
        help="the UNCERTAIN threshold is the score threshold minus this (at least 0; default 0.1)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the sweep; leave the bundle as it is")
    parser.set_defaults(run=run)


def parse_thresholds(text: str) -> list[float]:
    try:
        values = sorted({float(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise DefectsamError(f"--thresholds must be comma-separated numbers, got {text!r}") from None
    if not values or any(not 0.0 < v <= 1.0 for v in values):
        raise DefectsamError(f"--thresholds must name values within (0, 1], got {text!r}")
    return values


def candidate_threshold(bundle: Any, dataset: Any, limit: int | None, recall: float) -> dict[str, Any] | None:
    """The find pass's threshold keeping ``recall`` of the held-out defects (None without a find graph).

    A defect's candidate score is the highest find-pass probability over the cells its mask touches.
    """
    from engines.backends import open_engine
    from engines.backends.onnxruntime import Config
    from engines.find import FindPreprocessor
    from training.data.registry import evenly_spaced

    if bundle.manifest.find is None:
        return None
    engine = open_engine(bundle, Config(providers=["cpu"], precision="fp32"))
    pre = FindPreprocessor(bundle.manifest.find)
    scores: list[float] = []
    good_cells: list[np.ndarray] = []
    try:
        for index in evenly_spaced(len(dataset), limit):
            sample = dataset[index]
            tensor, geometry = pre(sample.image)
            probs = engine.find(tensor)
            rows, cols = geometry.cells
            probs = probs[:rows, :cols]
            cell = geometry.cell_px
            union = np.zeros(probs.shape, bool)
            for mask in sample.masks:
                ys, xs = np.nonzero(mask)
                touched = np.zeros(probs.shape, bool)
                touched[ys // cell, xs // cell] = True
                scores.append(float(probs[touched].max()))
                union |= touched
            good_cells.append(probs[~union])
    finally:
        engine.close()
    if not scores:
        raise DefectsamError("the held-out set has no defects to calibrate the candidate threshold on")
    found = np.asarray(scores)
    background = np.concatenate(good_cells) if good_cells else np.zeros(0)
    rows_out = []
    for t in _CANDIDATE_SWEEP:
        rows_out.append({"candidate_threshold": t, "defect_recall": float((found >= t).mean()),
                         "clean_cells_above": float((background >= t).mean()) if background.size else 0.0})
    keep = [r for r in rows_out if r["defect_recall"] >= recall]
    chosen = max(keep, key=lambda r: r["candidate_threshold"]) if keep else rows_out[0]
    return {"chosen": chosen, "sweep": rows_out, "defects": int(found.size)}


def sweep(
    bundle: Any, dataset: Any, thresholds: Sequence[float], gap: float, limit: int | None,
    candidate: float | None = None, *, mode: Literal["auto", "windows", "tiles", "whole"] = "auto",
    precision: Literal["auto", "fp32", "int8"] = "auto",
) -> list[dict[str, Any]]:
    """One row per score threshold: the figures on ``dataset`` through engines/ (inspected once, rescored),
    in inspection ``mode`` (the reference run's rows are measured whole) at ``precision``."""
    from engines.backends import open_engine
    from engines.backends.onnxruntime import Config
    from engines.inspector import InspectionConfig, Inspector
    from engines.postprocess import PostprocessConfig, Postprocessor
    from training.eval.evaluate import inspect_samples, score

    engine = open_engine(bundle, Config(providers=["cpu"], precision=precision))
    try:
        inspector = Inspector(engine, InspectionConfig(mode=mode, candidate_threshold=candidate))
        passes = inspect_samples(inspector, dataset, limit)
        rows = []
        for threshold in thresholds:
            post = PostprocessConfig(score_threshold=threshold, uncertain_threshold=max(0.0, threshold - gap))
            inspector.postprocess = Postprocessor(bundle.manifest.classes, post)
            report = score(inspector, passes, label="calibration", dataset="held out")
            auto = report["automatic"]
            rows.append({"score_threshold": threshold, **{k: auto.get(k) for k in
                         ("image_accuracy", "f1", "precision", "recall", "false_ng_rate", "tp", "fp", "fn")},
                         "miou_fg": report["semantic"]["miou_fg"]})
        return rows
    finally:
        engine.close()


def best_row(rows: Sequence[dict[str, Any]], objective: str, max_false_ng: float = 1.0) -> dict[str, Any]:
    """The best row by ``objective`` among those within ``max_false_ng`` (all rows when none is)."""
    other = "f1" if objective == "image_accuracy" else "image_accuracy"
    within = [r for r in rows if (r.get("false_ng_rate") or 0.0) <= max_false_ng] or list(rows)
    return max(within, key=lambda r: (r[objective] or 0.0, r[other] or 0.0, r["score_threshold"]))


def run(args: argparse.Namespace) -> int:
    from engines.bundle import Thresholds, load_bundle, update_thresholds, utc_now
    from training.data.registry import build_dataset

    if args.limit is not None and args.limit < 1:
        raise DefectsamError(f"--limit must be at least 1, got {args.limit}")
    if args.uncertain_gap < 0:
        raise DefectsamError(f"--uncertain-gap must be >= 0, got {args.uncertain_gap}")
    if not 0.0 <= args.max_false_ng <= 1.0:
        raise DefectsamError(f"--max-false-ng must be within 0..1, got {args.max_false_ng}")
    if not 0.0 < args.candidate_recall <= 1.0:
        raise DefectsamError(f"--candidate-recall must be within (0, 1], got {args.candidate_recall}")
    thresholds = parse_thresholds(args.thresholds)
    bundle = load_bundle(args.bundle)
    dataset = build_dataset(args.data)
    candidates = candidate_threshold(bundle, dataset, args.limit, args.candidate_recall)
    chosen_candidate = None
    if candidates is not None:
        row = candidates["chosen"]
        chosen_candidate = float(row["candidate_threshold"])
        print(f"candidate threshold {chosen_candidate:.2f}: {row['defect_recall']:.3f} of {candidates['defects']} "
              f"held-out defects proposed, {row['clean_cells_above']:.4f} of defect-free cells above it")
    rows = sweep(bundle, dataset, thresholds, args.uncertain_gap, args.limit, chosen_candidate)
    best = best_row(rows, args.objective, args.max_false_ng)
    print("score_threshold  image_accuracy  f1     precision  recall  false_ng  miou_fg")
    for row in rows:
        mark = "  <- chosen" if row is best else ""
        print(f"{row['score_threshold']:15.2f}  {_f(row['image_accuracy']):>14}  {_f(row['f1']):>5}  "
              f"{_f(row['precision']):>9}  {_f(row['recall']):>6}  {_f(row['false_ng_rate']):>8}  "
              f"{_f(row['miou_fg']):>7}{mark}")
    chosen = Thresholds(
        score_threshold=best["score_threshold"],
        uncertain_threshold=max(0.0, best["score_threshold"] - args.uncertain_gap),
        candidate_threshold=chosen_candidate,
        calibration={
            "data": args.data, "n_images": len(dataset) if args.limit is None else min(args.limit, len(dataset)),
            "objective": args.objective, "max_false_ng": args.max_false_ng, "sweep": rows,
            "candidates": candidates, "measured": utc_now(),
            "command": f"defectsam-train calibrate BUNDLE --data {args.data} --objective {args.objective}"
            + (f" --limit {args.limit}" if args.limit else ""),
        },
    )
    if args.dry_run:
        print("dry run: the bundle is unchanged", file=sys.stderr)
        return 0
    update_thresholds(args.bundle, chosen)
    print(f"score_threshold {chosen.score_threshold:g}, uncertain_threshold {chosen.uncertain_threshold:g}"
          + (f", candidate_threshold {chosen_candidate:g}" if chosen_candidate is not None else "")
          + f" written to {args.bundle}/manifest.json", file=sys.stderr)
    return 0


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
