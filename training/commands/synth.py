"""``defectsam-train synth --out DIR --n N``: write synthetic frames in the generic folder layout.

``images/NNNNNN.png`` (NNNNNN is the frame's seed), ``masks/NNNNNN.png`` as a label-index PNG
(0 background, value v is class v-1 of ``classes.txt``) or, with ``--instances``, one binary PNG
per defect in ``masks/NNNNNN/II_CLASS.png``; and ``classes.txt``. Every file is written atomically.
``training.data.folder.FolderDataset`` (spec ``folder,root=DIR``) reads it back.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from engines.atomic import write_bytes_atomic, write_text_atomic
from engines.errors import DefectsamError
from engines.synthetic import CLASSES, FRAME_HEIGHT, FRAME_WIDTH
from training.data.synthetic import SyntheticDataset


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "synth", help="write synthetic frames + masks in the generic folder layout",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder (images/, masks/, classes.txt)")
    parser.add_argument("--n", type=int, default=16, help="number of frames (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first frame; frame i uses seed+i (default 0)")
    parser.add_argument("--width", type=int, default=FRAME_WIDTH, help=f"frame width (default {FRAME_WIDTH})")
    parser.add_argument("--height", type=int, default=FRAME_HEIGHT, help=f"frame height (default {FRAME_HEIGHT})")
    parser.add_argument(
        "--defect-free-prob", type=float, default=0.15, help="share of frames without defects (default 0.15)"
    )
    parser.add_argument("--max-defects", type=int, default=6, help="most defects in a frame (default 6)")
    parser.add_argument(
        "--instances", action="store_true",
        help="one binary PNG per defect (masks/NAME/II_CLASS.png) instead of one label-index PNG per frame",
    )
    parser.set_defaults(run=run)


def _png(image: np.ndarray, what: Path) -> bytes:
    ok, data = cv2.imencode(".png", image)
    if not ok:  # pragma: no cover - encoding a uint8 array does not fail
        raise DefectsamError(f"{what}: could not encode PNG")
    return data.tobytes()


def label_image(masks: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Instance masks NxHxW + classes N -> HxW uint8 label image (value = class + 1; later instances on top)."""
    label = np.zeros(masks.shape[1:], dtype=np.uint8)
    for mask, class_id in zip(masks, classes, strict=True):
        label[mask] = int(class_id) + 1
    return label


def _remove_stale(folder: Path, keep: set[str]) -> None:
    """Remove instance masks of an earlier run (NN_CLASS.png) that this run did not write."""
    for path in folder.glob("[0-9][0-9]_*.png"):
        if path.name not in keep:
            path.unlink()


def run(args: argparse.Namespace) -> int:
    if args.n < 1:
        raise DefectsamError(f"--n must be at least 1, got {args.n}")
    if args.seed < 0:
        raise DefectsamError(f"--seed must be >= 0, got {args.seed}")
    if args.out.exists() and not args.out.is_dir():
        raise DefectsamError(f"{args.out}: --out exists and is not a directory")
    try:
        frames = SyntheticDataset(
            args.n, seed=args.seed, width=args.width, height=args.height,
            defect_free_prob=args.defect_free_prob, max_defects=args.max_defects,
        )
    except ValueError as exc:
        raise DefectsamError(f"synth: {exc}") from None
    write_text_atomic(args.out / "classes.txt", "".join(f"{name}\n" for name in CLASSES))
    counts: Counter[str] = Counter()
    for index in range(len(frames)):
        sample = frames[index]
        name = f"{args.seed + index:06d}"
        write_bytes_atomic(args.out / "images" / f"{name}.png", _png(sample.image, args.out / name))
        if args.instances:
            folder = args.out / "masks" / name
            folder.mkdir(parents=True, exist_ok=True)  # an empty folder is a defect-free frame
            written = set()
            for j, (mask, class_id) in enumerate(zip(sample.masks, sample.classes, strict=True)):
                path = folder / f"{j:02d}_{CLASSES[int(class_id)]}.png"
                write_bytes_atomic(path, _png(mask.astype(np.uint8) * 255, path))
                written.add(path.name)
            _remove_stale(folder, keep=written)
            (args.out / "masks" / f"{name}.png").unlink(missing_ok=True)
        else:
            path = args.out / "masks" / f"{name}.png"
            write_bytes_atomic(path, _png(label_image(sample.masks, sample.classes), path))
            folder = args.out / "masks" / name
            if folder.is_dir():  # an earlier --instances run's folder would take precedence
                _remove_stale(folder, keep=set())
                try:
                    folder.rmdir()
                except OSError:
                    raise DefectsamError(
                        f"{folder}: holds files this command did not write; remove it or choose another --out"
                    ) from None
        counts.update(CLASSES[int(c)] for c in sample.classes)
    found = ", ".join(f"{name} {counts[name]}" for name in CLASSES)
    print(f"wrote {len(frames)} frame(s) of {args.width}x{args.height} to {args.out} ({found}); "
          f"read them with --data folder,root={args.out}")
    return 0
