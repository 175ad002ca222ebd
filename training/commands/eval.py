"""``defectsam-train eval (--bundle DIR | --checkpoint FILE) --data SPEC``: measure a model on a dataset.

A bundle runs through engines/ (ONNX Runtime), exactly as the daemon runs it; a checkpoint runs in
PyTorch. Both report prompted mask IoU/dice per class and automatic defect precision/recall and
OK/NG accuracy (training.eval). ``--data`` takes a dataset spec (training.data.registry), e.g.
``magnetic_tile:test``, ``neu_seg:test``, ``synthetic,n=50,width=1024,height=576``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engines.atomic import write_text_atomic
from engines.bundle import utc_now
from engines.errors import DefectsamError
from engines.postprocess import PostprocessConfig
from training.data.registry import build_dataset
from training.eval.evaluate import EvalReport
from training.eval.metrics import format_cell as _fmt


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "eval", help="evaluate a bundle or a checkpoint on a dataset (prompted IoU, automatic P/R, OK/NG)",
        description=__doc__.splitlines()[0],
    )
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument("--bundle", type=Path, help="engine bundle directory: evaluated through engines/")
    weights.add_argument("--checkpoint", type=Path, help="training checkpoint: evaluated in PyTorch")
    parser.add_argument(
        "--data", required=True,
        help="dataset spec, e.g. magnetic_tile:test, neu_seg:test, 'synthetic,n=50,width=1024,height=576', "
        "folder,root=DIR; several joined by '+'; or a .json/.yaml spec file",
    )
    parser.add_argument("--limit", type=int, default=None, help="evaluate an evenly spaced subset of N images")
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON to this file")
    parser.add_argument("--batch-size", type=int, default=4, help="images per PyTorch batch (checkpoints only)")
    parser.add_argument(
        "--score-threshold", type=float, default=None,
        help="saliency score at which a peak becomes a defect (default: the runtime's, 0.5)",
    )
    parser.add_argument("--no-prompted", action="store_true", help="skip prompted mode (automatic mode only)")
    parser.add_argument(
        "--precision", choices=("auto", "fp32", "int8"), default="auto",
        help="with --bundle: which graphs run (auto: as the daemon picks, the gated INT8 variant on a CPU when "
        "the bundle has one; docs/quantization.md)",
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
    lines = [f"{report['model']} on {report['dataset']}: {report['n_images']} image(s), {report['seconds']:.1f} s"]
    prompted = report["prompted"]
    if prompted is None:
        lines.append("prompted: skipped (no decoder-only graph, or --no-prompted)")
    else:
        lines.append("prompted (one point per instance, at its interior point)")
        rows = [[name, str(c["n"]), _fmt(c["iou"]), _fmt(c["dice"])] for name, c in prompted["per_class"].items()]
        rows.append(["mean over classes", str(prompted["n"]), _fmt(prompted["miou"]), _fmt(prompted["mdice"])])
        lines += _table(["class", "n", "IoU", "dice"], rows)
    auto = report["automatic"]
    lines.append(f"automatic (saliency points, defects matched at IoU >= {auto['iou_threshold']})")
    lines.append(
        f"  precision {_fmt(auto['precision'])}  recall {_fmt(auto['recall'])}  f1 {_fmt(auto['f1'])}  "
        f"(tp {auto['tp']}, fp {auto['fp']}, fn {auto['fn']}; matched IoU {_fmt(auto['matched_miou'])}, "
        f"class accuracy {_fmt(auto['class_accuracy'])})"
    )
    images = auto["images"]
    lines.append(
        f"  image OK/NG accuracy {_fmt(auto['image_accuracy'])}  (NG as NG {images['ng_as_ng']}, "
        f"OK as OK {images['ok_as_ok']}, OK as NG {images['ok_as_ng']}, NG as OK {images['ng_as_ok']}; "
        f"UNCERTAIN counted as NG: {images['uncertain']})"
    )
    rows = [
        [name, str(c["n_gt"]), _fmt(c["recall"]), str(c["n_pred"]), _fmt(c["precision"])]
        for name, c in auto["per_class"].items()
    ]
    lines += _table(["class", "truth", "recall", "predicted", "precision"], rows)
    return "\n".join(lines)


def _load_checkpoint_model(path: Path, dataset_classes: Sequence[str]) -> tuple[Any, list[str]]:
    """The checkpoint's model and its class names: from the checkpoint ('classes'), else the dataset's."""
    from training.model.build import build_model
    from training.model.checkpoint import CheckpointError, load_weights, read_checkpoint

    payload = read_checkpoint(path)
    arch = payload["arch"]
    config = {key: payload.get("config", {}).get(key) for key in ("height", "width", "num_classes", "k")}
    config = {key: value for key, value in config.items() if isinstance(value, int)}
    try:
        model = build_model(arch, **config)
    except (KeyError, ValueError) as exc:
        raise CheckpointError(path, f"cannot build model {arch!r} with {config}: {exc}") from None
    load_weights(model, path, arch)
    classes = payload.get("classes")
    if isinstance(classes, (list, tuple)) and len(classes) == model.num_classes:
        return model, [str(c) for c in classes]
    if model.num_classes == len(dataset_classes):
        return model, list(dataset_classes)
    # Class-agnostic metrics still hold; per-class precision and class accuracy use these stand-ins.
    print(
        f"warning: {path} names no classes and has {model.num_classes}, the dataset {len(dataset_classes)}; "
        "predicted classes are reported as class_0, class_1, ...",
        file=sys.stderr,
    )
    return model, [f"class_{i}" for i in range(model.num_classes)]


def run(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        raise DefectsamError(f"--limit must be at least 1, got {args.limit}")
    if args.batch_size < 1:
        raise DefectsamError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.json is not None and args.json.is_dir():
        raise DefectsamError(f"{args.json}: --json is a directory; give a file name")
    if args.record is not None and args.bundle is None:
        raise DefectsamError("--record needs --bundle: only a bundle's manifest can carry its measured figures")
    if args.precision != "auto" and args.bundle is None:
        raise DefectsamError("--precision needs --bundle: a checkpoint runs in PyTorch at FP32")
    postprocess = _postprocess(args.score_threshold)
    dataset = build_dataset(args.data)
    report: EvalReport
    if args.bundle is not None:
        from training.eval.evaluate import evaluate_bundle

        report = evaluate_bundle(
            args.bundle, dataset, limit=args.limit, postprocess=postprocess, prompted=not args.no_prompted,
            precision=args.precision,
        )
    else:
        from training.eval.evaluate import evaluate_model

        model, names = _load_checkpoint_model(args.checkpoint, dataset.class_names)
        report = evaluate_model(
            model, dataset, limit=args.limit, batch_size=args.batch_size, class_names=names,
            postprocess=postprocess, prompted=not args.no_prompted,
        )
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
    """The part of a report worth keeping in a manifest: headline figures per mode, and how measured."""
    prompted = report["prompted"]
    auto = report["automatic"]
    keep_auto = ("precision", "recall", "f1", "image_accuracy", "tp", "fp", "fn")
    return {
        "dataset": report["dataset"],
        "n_images": report["n_images"],
        "prompted": None if prompted is None else {
            "miou": prompted.get("miou"), "mdice": prompted.get("mdice"),
            "per_class_iou": {name: row.get("iou") for name, row in prompted.get("per_class", {}).items()},
        },
        "automatic": {key: auto.get(key) for key in keep_auto if key in auto},
        "measured": utc_now(),
        "model": report["model"],
        "command": f"defectsam-train eval --bundle BUNDLE --data {args.data}"
        + (f" --limit {args.limit}" if args.limit else "")
        + (f" --precision {args.precision}" if args.precision != "auto" else "") + f" --record {args.record}",
    }
