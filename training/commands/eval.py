"""``defectsam-train eval (--bundle DIR | --checkpoint FILE) --data SPEC``: measure a model on a dataset.

Both run through engines/ (ONNX Runtime), exactly as the daemon inspects: a checkpoint is exported
to a temporary bundle first (with ``--finder`` its finder too). The report (training.eval) holds
the field's semantic figures (IoU per class, mIoU with and without background, dataset-level),
defect precision/recall at IoU 0.5 with each instance's IoU and recall by size, and image-level
OK/NG with the false-reject and miss rates. ``--data`` takes a dataset spec
(training.data.registry), e.g. ``neu_seg:test``, ``magnetic_tile:test``, ``synthetic,n=200,seed=2000000``
(4 MP frames).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engines.atomic import write_text_atomic
from engines.bundle import utc_now
from engines.errors import DefectsamError
from engines.inspector import InspectionConfig
from engines.postprocess import PostprocessConfig
from training.data.registry import build_dataset
from training.eval.evaluate import EvalReport
from training.eval.metrics import format_cell as _fmt


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "eval", help="evaluate a bundle or a checkpoint on a dataset (semantic mIoU, defect P/R by size, OK/NG)",
        description=__doc__.splitlines()[0],
    )
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument("--bundle", type=Path, help="engine bundle directory")
    weights.add_argument("--checkpoint", type=Path, help="segmenter checkpoint (exported to a temporary bundle)")
    parser.add_argument("--finder", type=Path, default=None, help="with --checkpoint: the finder checkpoint")
    parser.add_argument(
        "--data", required=True,
        help="dataset spec, e.g. neu_seg:test, magnetic_tile:test, 'synthetic,n=200,seed=2000000' (4 MP), "
        "folder,root=DIR; several joined by '+'; or a .json/.yaml spec file",
    )
    parser.add_argument("--mode", choices=("auto", "windows", "tiles", "whole"), default="auto",
                        help="inspection mode (engines.inspector; default auto: windows with a finder, tiles or whole)")
    parser.add_argument("--window", type=int, default=None, help="window side in pixels (default: the bundle's)")
    parser.add_argument("--max-windows", type=int, default=None, help="most windows per frame (default: the bundle's)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate an evenly spaced subset of N images")
    parser.add_argument("--pixel-size-um", type=float, default=None,
                        help="the camera's pixel size on the part in micrometres: sizes are also given in um")
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON to this file")
    parser.add_argument(
        "--score-threshold", type=float, default=None,
        help="a defect's peak probability at which it counts (default: the bundle's calibrated one, else 0.5)",
    )
    parser.add_argument(
        "--precision", choices=("auto", "fp32", "int8"), default="auto",
        help="which graphs run (auto: as the daemon picks, the gated INT8 variant on a CPU when the bundle has one)",
    )
    parser.add_argument(
        "--record", metavar="KEY", default=None,
        help="with --bundle: store the report's figures as metrics.KEY in the bundle's manifest "
        "(the graphs are untouched; the manifest is rewritten atomically)",
    )
    parser.set_defaults(run=run)


def _postprocess(score_threshold: float | None) -> PostprocessConfig | None:
    if score_threshold is None:
        return None
    if not 0.0 <= score_threshold <= 1.0:
        raise DefectsamError(f"--score-threshold must be within 0..1, got {score_threshold}")
    defaults = PostprocessConfig()
    return PostprocessConfig(
        score_threshold=score_threshold, uncertain_threshold=min(defaults.uncertain_threshold, score_threshold)
    )


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        pairs = enumerate(zip(row, widths, strict=True))
        cells = (str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in pairs)
        lines.append("  " + "  ".join(cells))
    return lines


def format_report(report: EvalReport) -> str:
    """The report as a few aligned tables."""
    lines = [
        f"{report['model']} on {report['dataset']}: {report['n_images']} image(s), mode {report['mode']}, "
        f"window {report['window']} px, {report['seconds']:.1f} s (median {_fmt(report['timing']['median_ms'], 1)} "
        f"ms/frame, {_fmt(report['timing']['windows_median'], 0)} windows)"
    ]
    sem = report["semantic"]
    lines.append(
        f"semantic (dataset-level, as mmsegmentation): mIoU foreground {_fmt(sem['miou_fg'])}, "
        f"with background {_fmt(sem['miou'])}, aAcc {_fmt(sem['aacc'])}"
    )
    rows = [[name, _fmt(value), _fmt(sem["acc"][name])] for name, value in sem["iou"].items()]
    lines += _table(["class", "IoU", "Acc"], rows)
    auto = report["automatic"]
    lines.append(f"defects (matched at IoU >= {auto['iou_threshold']}, any class)")
    lines.append(
        f"  precision {_fmt(auto['precision'])}  recall {_fmt(auto['recall'])}  f1 {_fmt(auto['f1'])}  "
        f"(tp {auto['tp']}, fp {auto['fp']}, fn {auto['fn']}; matched IoU {_fmt(auto['matched_miou'])}, "
        f"class accuracy {_fmt(auto['class_accuracy'])})"
    )
    rows = [
        [name, str(c.get("n_gt", 0)), _fmt(c.get("recall")), _fmt(c.get("instance_iou")), str(c.get("n_pred", 0)),
         _fmt(c.get("precision"))]
        for name, c in auto["per_class"].items()
    ]
    lines += _table(["class", "truth", "recall", "inst. IoU", "predicted", "precision"], rows)
    lines.append(
        f"images: OK/NG accuracy {_fmt(auto['image_accuracy'])}; good {auto['good_images']}: false NG "
        f"{_fmt(auto['false_ng_rate'])}, false reject (NG or UNCERTAIN) {_fmt(auto['false_reject_rate'])}; "
        f"defective {auto['defective_images']}: missed {_fmt(auto['miss_rate'])}"
    )
    lines.append("recall by size (width of thin defects, equivalent diameter of the others)")
    for name, kinds in auto["by_size"].items():
        for kind, entry in kinds.items():
            found = entry["found_from_px"]
            um = entry["found_from_um"]
            reach = "never 90%" if found is None else f"90% from {found:g} px" + (f" ({um:g} um)" if um else "")
            cells = ", ".join(
                f"{b['bucket']}: {_fmt(b['recall'], 2)} (n {b['n']}, IoU {_fmt(b['instance_iou'], 2)})"
                for b in entry["buckets"]
            )
            lines.append(f"  {name} by {kind}: {reach}; {cells}")
    if report["targets"]:
        parts = []
        for key, entry in report["targets"].items():
            name, floor = key.split("_from_")
            parts.append(f"{name} from {floor}: recall {_num(entry['recall'])}, instance IoU "
                         f"{_num(entry['instance_iou'])}, precision {_num(entry['precision'])} (n {entry['n']})")
        lines.append("targets (predictions on smaller defects ignored): " + "; ".join(parts))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        raise DefectsamError(f"--limit must be at least 1, got {args.limit}")
    if args.json is not None and args.json.is_dir():
        raise DefectsamError(f"{args.json}: --json is a directory; give a file name")
    if args.record is not None and args.bundle is None:
        raise DefectsamError("--record needs --bundle: only a bundle's manifest can carry its measured figures")
    if args.finder is not None and args.checkpoint is None:
        raise DefectsamError("--finder goes with --checkpoint (a bundle carries its own finder)")
    if args.pixel_size_um is not None and not (math.isfinite(args.pixel_size_um) and args.pixel_size_um > 0):
        raise DefectsamError(f"--pixel-size-um must be a number of micrometres > 0, got {args.pixel_size_um}")
    try:
        inspection = InspectionConfig(mode=args.mode, window=args.window, max_windows=args.max_windows)
    except ValueError as exc:
        first = str(exc).splitlines()
        raise DefectsamError(f"--window/--max-windows: {first[2].strip() if len(first) > 2 else exc}") from None
    postprocess = _postprocess(args.score_threshold)
    dataset = build_dataset(args.data)
    options = dict(inspection=inspection, postprocess=postprocess, limit=args.limit, precision=args.precision,
                   pixel_size_um=args.pixel_size_um)
    report: EvalReport
    if args.bundle is not None:
        from training.eval.evaluate import evaluate_bundle

        report = evaluate_bundle(args.bundle, dataset, **options)
    else:
        from training.eval.evaluate import evaluate_checkpoint

        report = evaluate_checkpoint(args.checkpoint, dataset, finder=args.finder, **options)
    print(format_report(report))
    if args.json is not None:
        write_text_atomic(args.json, json.dumps(report, indent=2) + "\n")
        print(f"report written to {args.json}", file=sys.stderr)
    if args.record is not None:
        from engines.bundle import update_metrics

        update_metrics(args.bundle, args.record, recorded_figures(report, args))
        print(f"recorded as metrics.{args.record} in {args.bundle}/manifest.json", file=sys.stderr)
    return 0


def recorded_figures(report: EvalReport, args: argparse.Namespace) -> dict[str, Any]:
    """The part of a report worth keeping in a manifest: the headline figures, and how they were measured."""
    sem = report["semantic"]
    auto = report["automatic"]
    keep_auto = ("precision", "recall", "f1", "matched_miou", "image_accuracy", "false_ng_rate", "false_reject_rate",
                 "miss_rate", "tp", "fp", "fn")
    command = (f"defectsam-train eval --bundle BUNDLE --data {args.data}"
               + (f" --mode {args.mode}" if args.mode != "auto" else "")
               + (f" --limit {args.limit}" if args.limit else "")
               + (f" --precision {args.precision}" if args.precision != "auto" else "") + f" --record {args.record}")
    return {
        "dataset": report["dataset"],
        "n_images": report["n_images"],
        "mode": report["mode"],
        "window": report["window"],
        "semantic": {key: sem[key] for key in ("miou_fg", "miou", "aacc")} | {"iou": sem["iou"]},
        "automatic": {key: auto.get(key) for key in keep_auto if key in auto}
        | {"per_class": {name: {k: c.get(k) for k in ("recall", "precision", "instance_iou", "n_gt")}
                         for name, c in auto["per_class"].items()},
           "found_from_px": {name: {kind: e["found_from_px"] for kind, e in kinds.items()}
                             for name, kinds in auto["by_size"].items()}},
        "targets": report["targets"],
        "timing": report["timing"],
        "measured": utc_now(),
        "model": report["model"],
        "command": command,
    }


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
