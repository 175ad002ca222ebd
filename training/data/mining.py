"""Hard negatives mined with a bundle: the 1:1 windows of 4 MP frames where it sees a defect that is not there.

Rendered frame sets (training.data.synthetic_frames) place their negative windows on structure a
filter finds strong (a reflection band, an edge, a crease). What the segmenter actually mistakes for a
defect is better found by asking it, as detectors are trained by bootstrapping (hard negative
mining): each frame is rendered, inspected by the bundle exactly as the runtime does (find pass,
candidate windows, segmenter), and where a window's foreground probability reaches ``min_prob``
away from every true defect (``clearance`` px), a window of ``window`` px is cut centred on the
strongest such pixel. The frame's exact ground truth goes with it, so a mined window on a defective
frame keeps its defects' labels.

The set is cached like a frame set (same array names; ``frames.npy`` says which frame each window
came from, ``centres.npy`` the false pixel it is centred on) under a key naming every parameter, the
generator's version and the bundle's files' digests, so a different bundle mines a new set.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from engines.atomic import replace_dir, staging_dir
from engines.synthetic import CLASSES, GENERATOR_VERSION, render_frame
from training.data.errors import DatasetError
from training.data.folder import instances_from_label
from training.data.sample import Sample, label_map
from training.data.synthetic_frames import cache_root

ARRAYS = ("windows", "labels", "origins", "centres", "frames", "scores")


@dataclass(frozen=True)
class MiningParams:
    bundle: str
    frames: int
    seed: int
    defect_free_prob: float = 0.5
    max_defects: int = 6
    per_frame: int = 4
    window: int = 160
    min_prob: float = 0.5
    clearance: int = 3

    def key(self, bundle_digest: str) -> str:
        fields = {**self.__dict__, "bundle": bundle_digest, "generator": GENERATOR_VERSION}
        digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]
        return f"mined{self.frames}-seed{self.seed}-w{self.window}-p{self.min_prob:g}-{digest}"


def bundle_digest(bundle_dir: Path) -> str:
    """What identifies a bundle's behaviour here: its files' digests, thresholds and specs from the manifest."""
    from engines.bundle import read_manifest

    manifest = read_manifest(bundle_dir)
    doc = manifest.model_dump(mode="json")
    fields = {k: doc.get(k) for k in ("files", "graphs", "thresholds", "segment", "find")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def mine_frame(inspector: Any, params: MiningParams, index: int) -> dict[str, np.ndarray]:
    """Frame ``seed + index``: its mined windows (possibly none), their labels, origins and scores."""
    frame = render_frame(params.seed + index, defect_free_prob=params.defect_free_prob,
                         max_defects=params.max_defects)
    height, width = frame.image.shape[:2]
    labels = label_map(frame)
    size = params.window
    near = labels > 0
    if params.clearance > 0 and near.any():
        side = 2 * params.clearance + 1
        near = cv2.dilate(near.astype(np.uint8), np.ones((side, side), np.uint8)) > 0
    outputs = inspector.run(inspector.prepare(frame.image))
    found: list[tuple[float, int, int]] = []  # (score, cx, cy) of each window's strongest false pixel
    for window, probs in zip(outputs.windows, outputs.probs, strict=True):
        x0, y0 = max(0, window.x), max(0, window.y)
        x1, y1 = min(width, window.x + window.width), min(height, window.y + window.height)
        if x1 <= x0 or y1 <= y0:
            continue
        fg = 1.0 - probs[0, y0 - window.y : y1 - window.y, x0 - window.x : x1 - window.x]
        fg = np.where(near[y0:y1, x0:x1], 0.0, fg)
        iy, ix = np.unravel_index(int(np.argmax(fg)), fg.shape)
        if fg[iy, ix] >= params.min_prob:
            found.append((float(fg[iy, ix]), x0 + int(ix), y0 + int(iy)))
    kept: list[tuple[float, int, int]] = []
    for score, cx, cy in sorted(found, reverse=True):
        if len(kept) == params.per_frame:
            break
        if all(max(abs(cx - kx), abs(cy - ky)) >= size // 2 for _, kx, ky in kept):
            kept.append((score, cx, cy))
    origins = [(int(min(max(0, cx - size // 2), width - size)), int(min(max(0, cy - size // 2), height - size)))
               for _, cx, cy in kept]
    return {
        "windows": np.stack([frame.image[y : y + size, x : x + size] for x, y in origins]) if origins
        else np.zeros((0, size, size, 3), np.uint8),
        "labels": np.stack([labels[y : y + size, x : x + size] for x, y in origins]) if origins
        else np.zeros((0, size, size), np.uint8),
        "origins": np.asarray(origins, np.int32).reshape(-1, 2),
        "centres": np.asarray([(cx, cy) for _, cx, cy in kept], np.int32).reshape(-1, 2),
        "frames": np.full(len(origins), index, np.int32),
        "scores": np.asarray([score for score, _, _ in kept], np.float32),
    }


_INSPECTOR: Any = None


def _open_inspector(bundle: str, threads: int) -> Any:
    from engines.backends import open_engine
    from engines.backends.onnxruntime import Config as OrtConfig
    from engines.inspector import InspectionConfig, Inspector

    config = OrtConfig(precision="fp32", providers=["cpu"], intra_op_threads=threads)
    return Inspector(open_engine(bundle, config), InspectionConfig(mode="windows"))


def _init_worker(bundle: str) -> None:
    global _INSPECTOR
    cv2.setNumThreads(1)
    _INSPECTOR = _open_inspector(bundle, 1)


def _worker(args: tuple[MiningParams, int]) -> dict[str, np.ndarray]:
    params, index = args
    return mine_frame(_INSPECTOR, params, index)


def build_mined_set(params: MiningParams, root: Path | None = None, *, workers: int | None = None,
                    log: Any = None) -> Path:
    """Mine the set into ``root`` (default ``cache_root()``) unless it is there; returns its directory."""
    bundle = Path(params.bundle)
    if not (bundle / "manifest.json").is_file():
        raise DatasetError(f"mined_windows bundle {bundle}", "is not a bundle (no manifest.json)")
    root = Path(root) if root is not None else cache_root()
    target = root / params.key(bundle_digest(bundle))
    if (target / "index.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    count = workers if workers is not None else max(1, min(4, os.cpu_count() or 1))
    if log:
        log(f"mining {params.frames} synthetic 4 MP frames with {bundle} into {target} ({count} processes)")
    parts: list[dict[str, np.ndarray]] = []
    jobs = [(params, i) for i in range(params.frames)]
    if count > 1:
        with multiprocessing.get_context("spawn").Pool(count, _init_worker, (str(bundle),)) as pool:
            for done, part in enumerate(pool.imap(_worker, jobs, chunksize=4), start=1):
                parts.append(part)
                if log and done % 200 == 0:
                    log(f"  {done}/{params.frames} frames, {sum(len(p['frames']) for p in parts)} windows")
    else:
        inspector = _open_inspector(str(bundle), 0)
        try:
            parts = [mine_frame(inspector, params, i) for i in range(params.frames)]
        finally:
            inspector.engine.close()
    staging = staging_dir(target)
    try:
        for name in ARRAYS:
            np.save(staging / f"{name}.npy", np.concatenate([p[name] for p in parts]))
        total = int(sum(len(p["frames"]) for p in parts))
        index_doc = {"params": params.__dict__, "generator": GENERATOR_VERSION, "classes": list(CLASSES),
                     "windows": total, "frames_with_windows": int(sum(1 for p in parts if len(p["frames"])))}
        (staging / "index.json").write_text(json.dumps(index_doc, indent=2))
        replace_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if log:
        log(f"  mined {total} windows from {index_doc['frames_with_windows']} of {params.frames} frames")
    return target


class MinedWindowsDataset:
    """A mined set's windows as Samples (instances: components of each class's labels)."""

    class_names: Sequence[str] = CLASSES

    def __init__(self, params: MiningParams, root: Path | None = None, *, workers: int | None = None,
                 log: Any = None) -> None:
        self.path = build_mined_set(params, root, workers=workers, log=log)
        self.params = params
        self._arrays: dict[str, np.ndarray] | None = None
        self.length = int(json.loads((self.path / "index.json").read_text())["windows"])
        self.name = (f"mined_windows(bundle={Path(params.bundle).name},frames={params.frames},seed={params.seed},"
                     f"{self.length}x{params.window}px)")

    def array(self, name: str) -> np.ndarray:
        if self._arrays is None:
            self._arrays = {}
        if name not in self._arrays:
            self._arrays[name] = np.load(self.path / f"{name}.npy", mmap_mode="r")
        return self._arrays[name]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arrays": None}

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Sample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index %= len(self)
        image = np.array(self.array("windows")[index])
        labels = np.array(self.array("labels")[index])
        masks, classes = instances_from_label(labels, [(c + 1, c) for c in range(len(CLASSES))], 1)
        frame = int(self.array("frames")[index])
        return Sample(image=image, masks=masks, classes=classes,
                      source=f"synthetic:{self.params.seed + frame}:mined{index}")
