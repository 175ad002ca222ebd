"""``defectsam-train calibrate BUNDLE --data SPEC``: choose a bundle's score threshold on held-out data.

The saliency head's peak probabilities depend on the model and its training: a threshold of 0.5
that suits one bundle finds nothing with another. This command runs the bundle once through
engines/ (ONNX Runtime, the daemon's own preprocessing and postprocessing) on held-out frames,
then re-runs only the postprocessing for each candidate threshold, and stores the best one in the
manifest (``thresholds``), where the daemon, ``defectsam infer`` and ``defectsam-train eval`` take
it unless their own configuration names a threshold. Calibrate on validation data, never on the
test set the bundle's figures are reported on.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engines.errors import DefectsamError

_DEFAULT_SWEEP = "0.10,0.15,0.20,0.25,0.30,0.35,0.40,0.45,0.50,0.60"
OBJECTIVES = ("image_accuracy", "f1")


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "calibrate", help="choose the bundle's score threshold on held-out data and store it in the manifest",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("bundle", type=Path, help="engine bundle directory (its manifest gains 'thresholds')")
    parser.add_argument(
        "--data", required=True,
        help="held-out dataset spec, e.g. 'synthetic,n=40,seed=1000000,width=1024,height=576' or magnetic_tile:val",
    )
    parser.add_argument("--limit", type=int, default=None, help="use an evenly spaced subset of N images")
    parser.add_argument(
        "--thresholds", default=_DEFAULT_SWEEP, help=f"candidate score thresholds (default {_DEFAULT_SWEEP})"
    )
    parser.add_argument(
        "--objective", choices=OBJECTIVES, default="image_accuracy",
        help="image_accuracy: OK/NG verdicts right (what the PLC acts on; default); f1: defects matched at IoU 0.5. "
        "Ties go to the other figure, then to the higher threshold",
    )
    parser.add_argument(
        "--uncertain-gap", type=float, default=0.1,
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


class _ReplayRunner:
    """Runs the engine on the first pass and replays its outputs on later passes (same images, same order)."""

    def __init__(self, runner: Any) -> None:
        self._runner = runner
        self.spec, self.classes = runner.spec, runner.classes
        self.mask_stride, self.label = runner.mask_stride, runner.label
        self._outputs: list[Any] = []
        self._cursor = 0
        self.recording = True

    def rewind(self) -> None:
        self.recording = False
        self._cursor = 0

    def infer(self, images: Sequence[np.ndarray]) -> list[Any]:
        if self.recording:
            results = [(outputs, None) for outputs, _ in self._runner.infer(images)]
            self._outputs.extend(results)
            return results
        results = self._outputs[self._cursor : self._cursor + len(images)]
        self._cursor += len(images)
        return results

    def prompt(self, handle: Any, points: np.ndarray) -> None:
        return None


def sweep(
    bundle: Any, dataset: Any, thresholds: Sequence[float], gap: float, limit: int | None
) -> list[dict[str, Any]]:
    """One row per threshold: the automatic-mode figures on ``dataset`` through engines/."""
    from engines.backends import open_engine
    from engines.backends.onnxruntime import Config
    from engines.postprocess import PostprocessConfig
    from training.eval.evaluate import _EngineRunner, _evaluate

    engine = open_engine(bundle, Config())
    try:
        runner = _ReplayRunner(_EngineRunner(engine))
        rows = []
        for index, threshold in enumerate(thresholds):
            if index:
                runner.rewind()
            post = PostprocessConfig(score_threshold=threshold, uncertain_threshold=max(0.0, threshold - gap))
            report = _evaluate(runner, dataset, limit=limit, batch_size=1, postprocess=post, iou_threshold=0.5,
                               prompted=False)
            auto = report["automatic"]
            rows.append({"score_threshold": threshold, **{k: auto.get(k) for k in
                         ("image_accuracy", "f1", "precision", "recall", "tp", "fp", "fn")}})
        return rows
    finally:
        engine.close()


def best_row(rows: Sequence[dict[str, Any]], objective: str) -> dict[str, Any]:
    other = "f1" if objective == "image_accuracy" else "image_accuracy"
    return max(rows, key=lambda r: (r[objective] or 0.0, r[other] or 0.0, r["score_threshold"]))


def run(args: argparse.Namespace) -> int:
    from engines.bundle import Thresholds, load_bundle, update_thresholds, utc_now
    from training.data.registry import build_dataset

    if args.limit is not None and args.limit < 1:
        raise DefectsamError(f"--limit must be at least 1, got {args.limit}")
    if args.uncertain_gap < 0:
        raise DefectsamError(f"--uncertain-gap must be >= 0, got {args.uncertain_gap}")
    thresholds = parse_thresholds(args.thresholds)
    bundle = load_bundle(args.bundle)
    dataset = build_dataset(args.data)
    rows = sweep(bundle, dataset, thresholds, args.uncertain_gap, args.limit)
    best = best_row(rows, args.objective)
    print("score_threshold  image_accuracy  f1     precision  recall")
    for row in rows:
        mark = "  <- chosen" if row is best else ""
        print(f"{row['score_threshold']:15.2f}  {_f(row['image_accuracy']):>14}  {_f(row['f1']):>5}  "
              f"{_f(row['precision']):>9}  {_f(row['recall']):>6}{mark}")
    chosen = Thresholds(
        score_threshold=best["score_threshold"],
        uncertain_threshold=max(0.0, best["score_threshold"] - args.uncertain_gap),
        calibration={
            "data": args.data, "n_images": len(dataset) if args.limit is None else min(args.limit, len(dataset)),
            "objective": args.objective, "sweep": rows, "measured": utc_now(),
            "command": f"defectsam-train calibrate BUNDLE --data {args.data} --objective {args.objective}"
            + (f" --limit {args.limit}" if args.limit else ""),
        },
    )
    if args.dry_run:
        print("dry run: the bundle is unchanged", file=sys.stderr)
        return 0
    update_thresholds(args.bundle, chosen)
    print(f"score_threshold {chosen.score_threshold:g}, uncertain_threshold {chosen.uncertain_threshold:g} "
          f"written to {args.bundle}/manifest.json", file=sys.stderr)
    return 0


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
