"""``defectsam infer IMAGE_OR_DIR``: run a bundle on images, write an overlay PNG and a JSON per image.

Outputs mirror the input tree under ``--out``: ``a/b.jpg`` gives ``a/b.overlay.png`` and
``a/b.json``; ``summary.json`` lists every image's verdict and output files. Two images that
differ only in their suffix (``a/b.jpg`` and ``a/b.png``) each keep it (``a/b.jpg.json``,
``a/b.png.json``), as does an image named ``summary`` at the top, so no output overwrites another.
In a directory, a label mask lying beside its image under the same name (a dataset's ``b.png`` for
``b.jpg``: one grey channel, nearly all of it in two values) is skipped and listed, not inspected;
``--inspect-masks`` inspects it too. Each file is written atomically.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import sys
from collections import Counter, defaultdict
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
# A label mask: one channel (or three equal ones), with at least this share of its pixels in its two
# most frequent values (background and defect; a magnetic-tile mask's anti-aliased edges leave 98-100 %,
# a grey photo of a part has 4-7 %).
MASK_TWO_VALUE_SHARE = 0.95


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
    parser.add_argument("--inspect-masks", action="store_true",
                        help="also inspect label masks lying beside an image of the same name (skipped by default)")
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


def looks_like_label_mask(path: Path) -> bool:
    """Whether the image is a label mask: one grey channel (or three equal ones), at least
    MASK_TWO_VALUE_SHARE of its pixels in its two most frequent values. Unreadable: False."""
    try:
        image = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    except (OSError, ValueError):
        return False
    if image is None or image.size == 0:
        return False
    if image.ndim == 3:
        colour = image[..., :3]
        if not (np.array_equal(colour[..., 0], colour[..., 1]) and np.array_equal(colour[..., 0], colour[..., 2])):
            return False
        image = colour[..., 0]
    _, counts = np.unique(image, return_counts=True)
    return bool(np.sort(counts)[-2:].sum() >= MASK_TWO_VALUE_SHARE * image.size)


def split_label_masks(images: list[Path]) -> tuple[list[Path], dict[Path, Path]]:
    """(the images to inspect, {label mask: the image it lies beside}). Only files sharing a folder and
    a name with another image are looked at, and a mask needs a sibling that is not one."""
    groups: defaultdict[Path, list[Path]] = defaultdict(list)
    for image in images:
        groups[image.with_suffix("")].append(image)
    masks: dict[Path, Path] = {}
    for members in groups.values():
        if len(members) < 2:
            continue
        is_mask = {member: looks_like_label_mask(member) for member in members}
        photos = [member for member in members if not is_mask[member]]
        if photos:
            masks.update({member: photos[0] for member in members if is_mask[member]})
    return [image for image in images if image not in masks], masks


def output_stems(images: list[Path], root: Path, out: Path) -> dict[Path, Path]:
    """Each image's output stem under ``out`` (``<stem>.json``, ``<stem>.overlay.png``): the path
    relative to ``root`` without its suffix, or with it where two images would share a stem (``b.jpg``
    and ``b.png``) or the stem is the top-level ``summary``. Raises DefectsamError if two still collide."""
    relative = {image: image.relative_to(root) if root.is_dir() else Path(image.name) for image in images}
    shared = Counter(path.with_suffix("") for path in relative.values())
    stems: dict[Path, Path] = {}
    owner: dict[Path, Path] = {}
    for image, path in relative.items():
        base = path.with_suffix("")
        stem = out / (path if shared[base] > 1 or base == Path("summary") else base)
        if stem in owner:
            raise DefectsamError(f"{image} and {owner[stem]} would both write {stem}.json; rename one, or "
                                 "choose with --glob")
        owner[stem] = image
        stems[image] = stem
    return stems


def run(args: argparse.Namespace) -> int:
    if args.limit < 0:
        raise DefectsamError(f"--limit must be >= 0, got {args.limit}")
    if args.threads < 0:
        raise DefectsamError(f"--threads must be >= 0, got {args.threads}")
    images = find_images(args.input, args.glob, args.recursive)
    masks: dict[Path, Path] = {}
    if args.input.is_dir() and not args.inspect_masks:
        images, masks = split_label_masks(images)
    if args.limit:
        images = images[: args.limit]
    stems = output_stems(images, args.input, args.out)
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
    for mask, image in masks.items():
        print(f"{mask}: skipped: a label mask beside {image.name} (--inspect-masks inspects it)")
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
        stem = stems[image_path]
        record = {
            "image": str(image_path),
            "bundle": bundle.manifest.name,
            "weights": bundle.manifest.provenance.weights,
            **result.to_dict(),
        }
        ok, png = cv2.imencode(".png", render_overlay(frame, result))
        if not ok:  # pragma: no cover - encoding a valid BGR array does not fail
            raise DefectsamError(f"{image_path}: could not encode the overlay PNG")
        overlay, record_file = stem.with_name(stem.name + ".overlay.png"), stem.with_name(stem.name + ".json")
        write_bytes_atomic(overlay, png.tobytes())
        write_text_atomic(record_file, json.dumps(record, indent=2) + "\n")
        verdicts[result.verdict.name] += 1
        summary.append({"image": str(image_path), "verdict": result.verdict.name, "defects": len(result.defects),
                        "total_ms": record["timings_ms"]["total"], "json": str(record_file),
                        "overlay": str(overlay)})
        found = ", ".join(f"{d.class_name} {d.score:.2f}" for d in result.defects[:3])
        more = f" +{len(result.defects) - 3}" if len(result.defects) > 3 else ""
        print(f"{image_path}: {result.verdict.name} {len(result.defects)} defect(s)"
              f"{' (' + found + more + ')' if found else ''} {record['timings_ms']['total']:.0f} ms")

    if summary:
        write_text_atomic(
            args.out / "summary.json",
            json.dumps({"bundle": bundle.manifest.name, "backend": engine.backend_name,
                        "verdicts": dict(verdicts), "failed": failures, "images": summary,
                        "skipped_masks": [{"mask": str(mask), "beside": str(image)} for mask, image in masks.items()]},
                       indent=2) + "\n",
        )
    counts = ", ".join(f"{k} {v}" for k, v in sorted(verdicts.items()))
    print(f"{len(summary)} image(s) inspected{f' ({counts})' if counts else ''}"
          f"{f', {failures} failed' if failures else ''}{f', {len(masks)} label mask(s) skipped' if masks else ''}"
          f"; results in {os.fspath(args.out)}")
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
