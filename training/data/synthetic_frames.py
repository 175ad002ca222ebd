"""4 MP synthetic frames, rendered once, kept as what each pass trains on: 1:1 windows and find inputs.

Rendering a 2688 x 1520 frame costs 0.1-0.6 s, too slow to repeat every epoch, and both passes
must train at the scale they run: the segment pass on 1:1 windows of full frames, the find pass
on the frame reduced exactly as engines.find reduces it. So a set of frames is rendered once
(in parallel worker processes) into a cache directory of memory-mapped arrays::

    <root>/<key>/index.json      what was rendered (generator version, seeds, sizes)
                 windows.npy     uint8  F*M x W x W x 3   M windows of each frame (BGR)
                 labels.npy      uint8  F*M x W x W       0 background, c+1 class c
                 origins.npy     int32  F*M x 2           (x, y) of each window in its frame
                 find.npy        uint8  F x 3 x h x w     engines.find.reduce_grey of the frame
                 cells.npy       uint8  F x ch x cw       1 where a candidate cell holds a defect pixel

The key names every parameter (and the generator's version), so a changed set renders anew; a
cache is written into a temporary sibling and renamed into place.

Windows per frame (deterministic from the frame's seed): one centred near a random pixel of each
defect (in a random order, while room lasts), one on the frame's strongest non-defect structure
(a reflection band, the panel's edge, a crease: the hard negatives) and the rest anywhere, most of
them on clean metal.
"""

from __future__ import annotations

import hashlib
import json
import math
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
from engines.contract import CELL_STRIDE
from engines.find import find_geometry, reduce_grey, to_grey
from engines.synthetic import CLASSES, FRAME_HEIGHT, FRAME_WIDTH, GENERATOR_VERSION, render_frame
from training.data.errors import DatasetError
from training.data.folder import instances_from_label
from training.data.sample import Sample, label_map

CACHE_ENV = "DEFECTSAM_CACHE"
_REPO = Path(__file__).resolve().parents[2]


def cache_root() -> Path:
    """Where derived data is cached: $DEFECTSAM_CACHE, else .cache/data in the repository (ignored by git)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else _REPO / ".cache" / "data"


@dataclass(frozen=True)
class FrameSetParams:
    frames: int
    seed: int
    per_frame: int = 8
    window: int = 160
    reduction: int = 4
    defect_free_prob: float = 0.15
    max_defects: int = 6

    def key(self) -> str:
        text = json.dumps({**self.__dict__, "generator": GENERATOR_VERSION}, sort_keys=True)
        digest = hashlib.sha256(text.encode()).hexdigest()[:10]
        return f"frames{self.frames}-seed{self.seed}-w{self.window}x{self.per_frame}-r{self.reduction}-{digest}"


def _window_origins(frame: Any, params: FrameSetParams, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Top-left corners of a frame's training windows (module docstring)."""
    w, h, size = FRAME_WIDTH, FRAME_HEIGHT, params.window
    height, width = frame.image.shape[:2]
    origins: list[tuple[int, int]] = []

    def place(cx: float, cy: float) -> tuple[int, int]:
        x = int(min(max(0, round(cx - size / 2)), width - size))
        return x, int(min(max(0, round(cy - size / 2)), height - size))

    order = rng.permutation(len(frame.masks))
    for i in order[: max(0, params.per_frame - 2)]:
        ys, xs = np.nonzero(frame.masks[i])
        pick = int(rng.integers(ys.size))
        jitter = rng.uniform(-size / 4, size / 4, size=2)
        origins.append(place(xs[pick] + jitter[0], ys[pick] + jitter[1]))
    # The hard negative: the strongest structure away from every defect, on a 1/8 grey map.
    grey = cv2.resize(to_grey(frame.image), (width // 8, height // 8), interpolation=cv2.INTER_AREA).astype(np.float32)
    energy = cv2.GaussianBlur(np.abs(cv2.Laplacian(cv2.GaussianBlur(grey, (0, 0), 2.0), cv2.CV_32F)), (0, 0), 4.0)
    if len(frame.masks):
        near = cv2.resize(frame.masks.any(axis=0).astype(np.uint8), (width // 8, height // 8),
                          interpolation=cv2.INTER_AREA)
        near = cv2.dilate(near, np.ones((size // 8 + 1, size // 8 + 1), np.uint8)) > 0
        energy[near] = 0.0
    iy, ix = np.unravel_index(int(np.argmax(energy)), energy.shape)
    origins.append(place(ix * 8 + 4 + rng.uniform(-size / 4, size / 4), iy * 8 + 4 + rng.uniform(-size / 4, size / 4)))
    while len(origins) < params.per_frame:
        origins.append(place(rng.uniform(0, w), rng.uniform(0, h)))
    return origins


def render_frame_arrays(params: FrameSetParams, index: int) -> dict[str, np.ndarray]:
    """Frame ``seed + index`` -> its windows, labels, origins, find input and candidate cells."""
    seed = params.seed + index
    frame = render_frame(seed, defect_free_prob=params.defect_free_prob, max_defects=params.max_defects)
    labels = label_map(frame)
    rng = np.random.default_rng([seed, 7])
    origins = _window_origins(frame, params, rng)
    size = params.window
    windows = np.stack([frame.image[y : y + size, x : x + size] for x, y in origins])
    window_labels = np.stack([labels[y : y + size, x : x + size] for x, y in origins])
    geometry = find_geometry(frame.image.shape[1], frame.image.shape[0], params.reduction)
    find = reduce_grey(to_grey(frame.image), params.reduction)
    cell = geometry.cell_px
    rows, cols = geometry.cells[0], geometry.cells[1]
    padded = np.zeros((rows * cell, cols * cell), np.uint8)
    height, width = frame.image.shape[:2]
    padded[:height, :width] = labels > 0
    cells = padded.reshape(rows, cell, cols, cell).max(axis=(1, 3)).astype(np.uint8)
    return {
        "windows": windows, "labels": window_labels, "origins": np.asarray(origins, np.int32), "find": find,
        "cells": cells,
    }


def _worker(args: tuple[FrameSetParams, int]) -> tuple[int, dict[str, np.ndarray]]:
    params, index = args
    cv2.setNumThreads(1)
    return index, render_frame_arrays(params, index)


def build_frame_set(params: FrameSetParams, root: Path | None = None, *, workers: int | None = None,
                    log: Any = None) -> Path:
    """Render the frame set into ``root`` (default ``cache_root()``) unless it is there; returns its directory."""
    root = Path(root) if root is not None else cache_root()
    target = root / params.key()
    if (target / "index.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(target)
    try:
        first = render_frame_arrays(params, 0)
        arrays: dict[str, np.ndarray] = {}
        for name, value in first.items():
            rows = params.frames * (params.per_frame if name in ("windows", "labels", "origins") else 1)
            shape = (rows, *value.shape[1:]) if name in ("windows", "labels", "origins") else (rows, *value.shape)
            arrays[name] = np.lib.format.open_memmap(staging / f"{name}.npy", mode="w+", dtype=value.dtype, shape=shape)

        def store(index: int, values: dict[str, np.ndarray]) -> None:
            m = params.per_frame
            for name, value in values.items():
                if name in ("windows", "labels", "origins"):
                    arrays[name][index * m : (index + 1) * m] = value
                else:
                    arrays[name][index] = value

        store(0, first)
        count = workers if workers is not None else max(1, min(4, os.cpu_count() or 1))
        jobs = [(params, i) for i in range(1, params.frames)]
        if log:
            log(f"rendering {params.frames} synthetic 4 MP frames into {target} ({count} processes)")
        if count > 1 and jobs:
            with multiprocessing.get_context("spawn").Pool(count) as pool:
                for done, (index, values) in enumerate(pool.imap_unordered(_worker, jobs, chunksize=4), start=2):
                    store(index, values)
                    if log and done % 200 == 0:
                        log(f"  {done}/{params.frames} frames")
        else:
            for _, index in jobs:
                store(index, render_frame_arrays(params, index))
        for array in arrays.values():
            array.flush()  # type: ignore[attr-defined]  # np.memmap
        arrays.clear()
        index_doc = {"params": params.__dict__, "generator": GENERATOR_VERSION, "classes": list(CLASSES)}
        (staging / "index.json").write_text(json.dumps(index_doc, indent=2))
        replace_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


class FrameSet:
    """A rendered frame set, read-only, memory-mapped (opened lazily: pickles cheaply into loader workers)."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory)
        try:
            index = json.loads((self.path / "index.json").read_text())
            self.params = FrameSetParams(**index["params"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DatasetError(
                self.path, f"unreadable synthetic frame cache ({exc}); delete it to render again"
            ) from None
        self._arrays: dict[str, np.ndarray] | None = None

    def array(self, name: str) -> np.ndarray:
        if self._arrays is None:
            self._arrays = {
                n: np.load(self.path / f"{n}.npy", mmap_mode="r")
                for n in ("windows", "labels", "origins", "find", "cells")
            }
        return self._arrays[name]

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "params": self.params, "_arrays": None}


class SyntheticWindowsDataset:
    """The 1:1 windows of a rendered frame set as Samples (instances: components of each class's labels)."""

    class_names: Sequence[str] = CLASSES

    def __init__(self, params: FrameSetParams, root: Path | None = None, *, workers: int | None = None,
                 log: Any = None) -> None:
        self.frames = FrameSet(build_frame_set(params, root, workers=workers, log=log))
        self.params = params
        self.name = f"synthetic_windows(frames={params.frames},seed={params.seed},{params.per_frame}x{params.window}px)"

    def __len__(self) -> int:
        return self.params.frames * self.params.per_frame

    def __getitem__(self, index: int) -> Sample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index %= len(self)
        image = np.array(self.frames.array("windows")[index])
        labels = np.array(self.frames.array("labels")[index])
        masks, classes = instances_from_label(labels, [(c + 1, c) for c in range(len(CLASSES))], 1)
        frame, j = divmod(index, self.params.per_frame)
        return Sample(image=image, masks=masks, classes=classes, source=f"synthetic:{self.params.seed + frame}:w{j}")


def find_cells_shape(reduction: int) -> tuple[int, int]:
    """(rows, cols) of candidate cells of a 4 MP frame at ``reduction``."""
    cell = CELL_STRIDE * reduction
    return math.ceil(FRAME_HEIGHT / cell), math.ceil(FRAME_WIDTH / cell)
