"""``defectsam infer IMAGE_OR_DIR``: run a bundle on images, write an overlay PNG and a JSON per image.

Outputs mirror the input tree under ``--out``: ``a/b.jpg`` gives ``a/b.overlay.png`` and
``a/b.json``; ``summary.json`` lists every image's verdict. Each file is written atomically.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from engines.atomic import write_bytes_atomic, write_text_atomic
from engines.backends import open_engine
from engines.backends.onnxruntime import Config as OnnxRuntimeConfig
from engines.bundle import DEFAULT_BUNDLE_DIR, load_bundle
from engines.errors import DefectsamError, FrameGeometryError, InputImageError
from engines.inspector import InspectionConfig, Inspector
from engines.overlay import render_overlay
from engines.postprocess import PostprocessConfig

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "infer", help="inspect images: overlay PNG + defects JSON per image",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("input", type=Path, help="an image file, or a directory of images")
    parser.add_argument(
        "--bundle", type=Path, default=DEFAULT_BUNDLE_DIR,
        help="engine bundle directory (default: the embedded default bundle)",
    )
    parser.add_argument("--out", type=Path, default=Path("out/infer"), help="output directory (default: out/infer)")
    parser.add_argument("--glob", default="*", help="in a directory, only names matching this pattern (e.g. '*.jpg')")
    parser.add_argument("--recursive", action="store_true", help="descend into subdirectories")
    parser.add_argument("--limit", type=int, default=0, help="stop after this many images (0: all)")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: one per core)")
    parser.add_argument("--score-threshold", type=float, default=None,
                        help="a defect's peak probability at which it counts (default: the bundle's calibrated one)")
    parser.add_argument("--mode", choices=("auto", "windows", "tiles", "whole"), default="auto",
                        help="windows: the find pass picks 1:1 windows; tiles: a full 1:1 scan; whole: the image as "
                        "one window (small images); auto: windows with a find graph, else tiles, else whole")
    parser.add_argument("--window", type=int, default=None, help="window side in pixels (default: the bundle's)")
    parser.set_defaults(run=run)


def find_images(root: Path, pattern: str, recursive: bool) -> list[Path]:
    """Image files under ``root`` (by suffix), sorted; raises InputImageError for a bad root.

    Directories are listed with os.walk and its errors raised: pathlib's glob would silently
    skip an unreadable directory and report "no images" instead of the cause.
    """
    if not root.exists():
        raise InputImageError(root, "does not exist")
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise InputImageError(root, "is neither a file nor a directory")

    def unreadable(error: OSError) -> None:
        cause = "permission denied" if isinstance(error, PermissionError) else (error.strerror or str(error))
        raise InputImageError(error.filename or root, f"directory cannot be read ({cause})")

    images: list[Path] = []
    for folder, subfolders, names in os.walk(root, onerror=unreadable):
        images.extend(
            Path(folder) / name for name in fnmatch.filter(names, pattern)
            if Path(name).suffix.lower() in IMAGE_SUFFIXES and (Path(folder) / name).is_file()
        )
        if not recursive:
            subfolders.clear()
    if not images:
        raise InputImageError(root, f"no images matching {pattern!r} (suffixes {', '.join(sorted(IMAGE_SUFFIXES))})")
    return sorted(images)


def read_image(path: Path) -> np.ndarray:
    """Decode an image file to uint8 BGR; raises InputImageError naming the file and the cause."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except PermissionError:
        raise InputImageError(path, "cannot be read (permission denied)") from None
    except IsADirectoryError:
        raise InputImageError(path, "is a directory, not an image") from None
    except OSError as exc:
        raise InputImageError(path, f"cannot be read: {exc.strerror or exc}") from None
    if data.size == 0:
        raise InputImageError(path, "is empty")
    image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if image is None:
        raise InputImageError(path, "is not an image OpenCV can decode")
    return image


def _output_stem(image: Path, root: Path, out: Path) -> Path:
    relative = image.relative_to(root) if root.is_dir() else Path(image.name)
    return out / relative.with_suffix("")


def run(args: argparse.Namespace) -> int:
    if args.limit < 0:
        raise DefectsamError(f"--limit must be >= 0, got {args.limit}")
    if args.threads < 0:
        raise DefectsamError(f"--threads must be >= 0, got {args.threads}")
    images = find_images(args.input, args.glob, args.recursive)
    if args.limit:
        images = images[: args.limit]
    if args.out.exists() and not args.out.is_dir():
        raise DefectsamError(f"{args.out}: --out exists and is not a directory")
    post = PostprocessConfig() if args.score_threshold is None else _post_config(args.score_threshold)
    if args.window is not None and (args.window < 16 or args.window % 16):
        raise DefectsamError(f"--window must be a positive multiple of 16 pixels, got {args.window}")
    inspection = InspectionConfig(mode=args.mode, window=args.window)

    bundle = load_bundle(args.bundle)
    if bundle.manifest.provenance.weights == "untrained":
        print(
            f"warning: bundle {bundle.manifest.name!r} carries untrained stand-in weights; "
            "its defects are meaningless until a trained bundle replaces it",
            file=sys.stderr,
        )
    engine = open_engine(bundle, OnnxRuntimeConfig(providers="auto", intra_op_threads=args.threads))
    inspector = Inspector(engine, inspection, post)

    summary: list[dict[str, Any]] = []
    failures = 0
    verdicts: Counter[str] = Counter()
    for image_path in images:
        try:
            frame = read_image(image_path)
        except InputImageError as exc:
            print(f"defectsam: error: {exc}", file=sys.stderr)
            failures += 1
            continue
        try:
            result = inspector.inspect(frame)
        except FrameGeometryError as exc:
            print(f"defectsam: error: {image_path}: {exc}", file=sys.stderr)
            failures += 1
            continue
        stem = _output_stem(image_path, args.input, args.out)
        record = {
            "image": str(image_path),
            "bundle": bundle.manifest.name,
            "weights": bundle.manifest.provenance.weights,
            **result.to_dict(),
        }
        ok, png = cv2.imencode(".png", render_overlay(frame, result))
        if not ok:  # pragma: no cover - encoding a valid BGR array does not fail
            raise DefectsamError(f"{image_path}: could not encode the overlay PNG")
        write_bytes_atomic(stem.with_name(stem.name + ".overlay.png"), png.tobytes())
        write_text_atomic(stem.with_name(stem.name + ".json"), json.dumps(record, indent=2) + "\n")
        verdicts[result.verdict.name] += 1
        summary.append({"image": str(image_path), "verdict": result.verdict.name, "defects": len(result.defects),
                        "total_ms": record["timings_ms"]["total"]})
        found = ", ".join(f"{d.class_name} {d.score:.2f}" for d in result.defects[:3])
        more = f" +{len(result.defects) - 3}" if len(result.defects) > 3 else ""
        print(f"{image_path}: {result.verdict.name} {len(result.defects)} defect(s)"
              f"{' (' + found + more + ')' if found else ''} {record['timings_ms']['total']:.0f} ms")

    if summary:
        write_text_atomic(
            args.out / "summary.json",
            json.dumps({"bundle": bundle.manifest.name, "backend": engine.backend_name,
                        "verdicts": dict(verdicts), "failed": failures, "images": summary}, indent=2) + "\n",
        )
    counts = ", ".join(f"{k} {v}" for k, v in sorted(verdicts.items()))
    print(f"{len(summary)} image(s) inspected{f' ({counts})' if counts else ''}"
          f"{f', {failures} failed' if failures else ''}; results in {os.fspath(args.out)}")
    engine.close()
    return 2 if failures else 0


def _post_config(score_threshold: float) -> PostprocessConfig:
    if not 0.0 <= score_threshold <= 1.0:
        raise DefectsamError(f"--score-threshold must be within 0..1, got {score_threshold}")
    defaults = PostprocessConfig()
    return PostprocessConfig(
        score_threshold=score_threshold,
        uncertain_threshold=min(defaults.uncertain_threshold, score_threshold),
    )
