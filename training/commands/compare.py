"""``defectsam-train compare BUNDLE... --data SPEC``: evaluate bundles on the same data, one table side by side.

Each bundle is evaluated as ``defectsam-train eval --bundle`` evaluates it (training.eval.evaluate:
engines/ on ONNX Runtime, CPU, the bundle's own calibrated thresholds), each sample once per
bundle; the table (training.eval.compare_table) holds a column per bundle: its name, manifest hash
and precision, semantic mIoU foreground and with background, IoU per class, defect precision and
recall, the false-reject, false-NG and miss rates, recall per size bucket, and the inspections per
second measured during the eval (1000 / the median ms per frame). ``DIR@int8`` (or ``@fp32``,
``@auto``) picks one bundle's precision, ``--precision`` the others'. Classes are matched by name:
a bundle may know the data's classes in another order, or more of them (blank cells where a
bundle has no such class). Every bundle and the data are checked before the first is evaluated.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from engines.atomic import write_text_atomic
from engines.backends.onnxruntime import choose_precision
from engines.bundle import DIGEST_KEY, MANIFEST_NAME, Bundle, load_bundle, utc_now
from engines.errors import BundleError, DefectsamError
from training.data.registry import build_dataset, dataset_name
from training.eval.compare_table import Compared, figures, format_markdown, format_text, headers

PRECISIONS = ("auto", "fp32", "int8")


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "compare", help="evaluate several bundles on the same data and print their figures side by side",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument(
        "bundles", nargs="*", metavar="BUNDLE",
        help="bundle directory, optionally DIR@fp32, DIR@int8 or DIR@auto for that bundle's precision",
    )
    parser.add_argument(
        "--data", required=True,
        help="dataset spec, as eval takes it: e.g. 'synthetic,n=200,seed=2000000' (4 MP), neu_seg:test, "
        "folder,root=DIR; several joined by '+'; or a .json/.yaml spec file",
    )
    parser.add_argument(
        "--precision", choices=PRECISIONS, default="auto",
        help="which graphs run for a bundle given without @PRECISION (auto: as the daemon picks on a CPU, the "
        "gated INT8 variant when the bundle has one)",
    )
    parser.add_argument("--limit", type=int, default=None, help="evaluate an evenly spaced subset of N images")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the comparison as JSON (every eval report too)")
    output.add_argument("--markdown", action="store_true", help="print the table as markdown, to paste into docs")
    parser.add_argument("--out", type=Path, default=None,
                        help="write the table (or the JSON, the markdown) to this file instead of stdout (atomically)")
    parser.set_defaults(run=run)


def split_precision(text: str, default: str) -> tuple[Path, str]:
    """``DIR@PRECISION`` -> (DIR, PRECISION); a plain DIR (one whose name holds '@' too) -> (DIR, default)."""
    head, at, tail = text.rpartition("@")
    if at and tail in PRECISIONS:
        if not head:
            raise DefectsamError(f"{text}: name the bundle directory before '@{tail}'")
        return Path(head), tail
    if at and not Path(text).exists():
        raise DefectsamError(f"{text}: {tail!r} after '@' is not a precision (give {', '.join(PRECISIONS)})")
    return Path(text), default


def open_bundle(text: str, default_precision: str) -> tuple[Path, Bundle, str]:
    """The directory a BUNDLE argument names (as given), its bundle, verified and sealed, and the precision
    whose graphs will run."""
    path, requested = split_precision(text, default_precision)
    bundle = load_bundle(path)  # missing, old schema, a file whose checksum differs: BundleError
    if bundle.manifest_check == "edited":
        raise BundleError(
            path / MANIFEST_NAME, f"edited since it was written (its content no longer matches {DIGEST_KEY}): "
            "figures compared under its hash would not be its own; 'defectsam bundle seal' accepts it as it is",
        )
    if bundle.manifest_check == "not recorded":
        raise BundleError(
            path / MANIFEST_NAME, f"not sealed (written before manifests carried {DIGEST_KEY}, so it has no hash "
            "to compare under); 'defectsam bundle seal' records it",
        )
    manifest = bundle.manifest
    if requested != "auto" and requested not in manifest.precisions:
        raise BundleError(
            path, f"precision {requested}: the bundle has no {requested} graphs (it has "
            f"{', '.join(manifest.precisions)}); run 'defectsam-train quantize' or compare it at fp32",
        )
    # The precision the eval's engine will pick (ONNX Runtime on the CPU), named before it runs.
    return path, bundle, choose_precision(bundle, requested, "CPUExecutionProvider")


def run(args: argparse.Namespace) -> int:
    from training.eval.evaluate import align_classes, evaluate_bundle

    if not args.bundles:
        raise DefectsamError("compare: no bundle given: name at least one bundle directory, e.g. "
                             "'defectsam-train compare engines/default@fp32 engines/default@int8 --data SPEC'")
    if args.limit is not None and args.limit < 1:
        raise DefectsamError(f"--limit must be at least 1, got {args.limit}")
    if args.out is not None and args.out.is_dir():
        raise DefectsamError(f"{args.out}: --out is a directory; give a file name")
    opened = [open_bundle(text, args.precision) for text in args.bundles]
    dataset = build_dataset(args.data)
    for path, bundle, _ in opened:  # a class the data has and a bundle lacks: said now, not after the others ran
        try:
            align_classes(dataset, bundle.manifest.classes)
        except DefectsamError as exc:
            raise DefectsamError(f"{path}: {exc}") from None
    columns: list[Compared] = []
    reports = []
    for i, (path, bundle, precision) in enumerate(opened):
        print(f"compare: {i + 1}/{len(opened)} {path} ({bundle.manifest.name}, {precision}) on "
              f"{dataset_name(dataset)}", file=sys.stderr)
        started = time.monotonic()
        report = evaluate_bundle(bundle, dataset, precision=precision, limit=args.limit)
        print(f"compare: {report['n_images']} image(s) in {time.monotonic() - started:.1f} s", file=sys.stderr)
        columns.append(Compared(bundle=str(path), name=bundle.manifest.name,
                                manifest_sha256=bundle.manifest.manifest_sha256 or "", precision=precision,
                                figures=figures(report), thresholds=_thresholds(bundle)))
        reports.append(report)
    command = _command_line(args)
    if args.json:
        text = json.dumps(_json(columns, reports, dataset_name(dataset), command), indent=2) + "\n"
    elif args.markdown:
        text = (format_markdown(columns) + f"\n\n{dataset_name(dataset)}: {columns[0].figures['n_images']} "
                f"image(s); FPS on this machine's CPU (ONNX Runtime). `{command}`\n")
    else:
        text = (f"{len(columns)} bundle(s) on {dataset_name(dataset)}, {columns[0].figures['n_images']} image(s) "
                "each; FPS: inspections per second on this machine's CPU (ONNX Runtime), median of the eval\n"
                + format_text(columns) + "\n")
    if args.out is None:
        sys.stdout.write(text)
    else:
        write_text_atomic(args.out, text)
        print(f"comparison written to {args.out}", file=sys.stderr)
    return 0


def _thresholds(bundle: Bundle) -> tuple[float, float] | None:
    calibrated = bundle.manifest.thresholds
    return None if calibrated is None else (calibrated.score_threshold, calibrated.uncertain_threshold)


def _command_line(args: argparse.Namespace) -> str:
    parts = ["defectsam-train", "compare", *args.bundles, "--data", args.data]
    if args.precision != "auto":
        parts += ["--precision", args.precision]
    if args.limit is not None:
        parts += ["--limit", str(args.limit)]
    return shlex.join(parts)


def _json(columns: list[Compared], reports: list[Any], dataset: str, command: str) -> dict[str, Any]:
    return {
        "dataset": dataset,
        "command": command,
        "measured": utc_now(),
        "bundles": [
            {"column": title, "bundle": c.bundle, "name": c.name, "hash": c.hash, "manifest_sha256": c.manifest_sha256,
             "precision": c.precision,
             "thresholds": None if c.thresholds is None else {"score": c.thresholds[0], "uncertain": c.thresholds[1]},
             "figures": c.figures, "report": report}
            for title, c, report in zip(headers(columns), columns, reports, strict=True)
        ],
    }
