"""Teacher outputs computed once and kept on disk, reused across epochs and recipes.

A cache is a directory per teacher under a cache root (``<root>/<teacher_id>/``)::

    index.json        {"teacher_id", "channels", "dtype",
                       "entries": {source: {"embedding": [offset, C, h, w], "foreground": [offset, H, W]}}}
    embeddings.npy    float16, flat: each sample's image embedding (C x H/16 x W/16), one after another
    foreground.npy    float16, flat: each sample's foreground logits (H x W)

Entries are keyed by the dataset sample's ``source`` (unique within a dataset, e.g.
"synthetic:12:w3" or a file path), so the cache serves every recipe and every dataset that holds
the sample. Each entry is of the whole un-augmented sample padded to multiples of 16, as
training.data.windows evaluates it; a recipe crops and turns the cached maps with its training
window (``training.data.windows.Crop``: offsets on a 16-pixel grid, so the embedding crops with
it). Samples differ in size (magnetic tile), hence flat arrays with offsets. The ``.npy`` files
are opened as read-only memory maps. A cache is written into a temporary sibling directory and
renamed into place, so a reader never sees a partial one; extending it writes a new directory
holding the old entries and the new ones.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from engines.atomic import replace_dir, staging_dir
from engines.errors import DefectsamError
from training.data.sample import IGNORE_LABEL, interior_point
from training.data.windows import WindowExample, collate_windows
from training.teachers.base import Teacher

INDEX = "index.json"
DTYPE = np.float16


class CacheError(DefectsamError):
    """A teacher cache that is missing, stale or unreadable."""


@dataclass(frozen=True)
class CachedTargets:
    """embedding CtxH/16xW/16 float32; foreground HxW float32 (of the whole padded sample)."""

    embedding: torch.Tensor
    foreground: torch.Tensor


def cache_dir(root: Path | str, teacher_id: str) -> Path:
    return Path(root) / re.sub(r"[^A-Za-z0-9._-]+", "_", teacher_id)


class TeacherCache:
    """Read-only view of one teacher's cache directory."""

    def __init__(self, directory: Path | str) -> None:
        self.path = Path(directory)
        index_path = self.path / INDEX
        if not index_path.is_file():
            raise CacheError(f"{self.path}: no teacher cache here (run `defectsam-train cache-teacher`)")
        try:
            index = json.loads(index_path.read_text())
            self.teacher_id: str = index["teacher_id"]
            self.channels = int(index["channels"])
            self.entries: dict[str, dict[str, list[int]]] = index["entries"]
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise CacheError(f"{index_path}: unreadable cache index ({exc})") from None
        self._arrays: dict[str, np.ndarray] | None = None

    def _open(self) -> dict[str, np.ndarray]:
        # Opened lazily, so a cache object pickles cheaply into data-loader workers.
        if self._arrays is None:
            try:
                self._arrays = {
                    name: np.load(self.path / f"{name}.npy", mmap_mode="r") for name in ("embeddings", "foreground")
                }
            except (OSError, ValueError) as exc:
                raise CacheError(f"{self.path}: unreadable cache arrays ({exc})") from None
        return self._arrays

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arrays": None}

    def __contains__(self, source: str) -> bool:
        return source in self.entries

    def missing(self, sources: Sequence[str]) -> list[str]:
        return [s for s in sources if s not in self.entries]

    def get(self, source: str) -> CachedTargets:
        entry = self.entries.get(source)
        if entry is None:
            raise CacheError(f"{self.path}: no cached teacher outputs for {source!r} (re-run cache-teacher)")
        arrays = self._open()
        offset, c, h, w = entry["embedding"]
        embedding = np.asarray(arrays["embeddings"][offset : offset + c * h * w], dtype=np.float32).reshape(c, h, w)
        offset, fh, fw = entry["foreground"]
        foreground = np.asarray(arrays["foreground"][offset : offset + fh * fw], dtype=np.float32).reshape(fh, fw)
        return CachedTargets(embedding=torch.from_numpy(embedding), foreground=torch.from_numpy(foreground))


def open_cache(root: Path | str, teacher_id: str) -> TeacherCache | None:
    """The cache of ``teacher_id`` under ``root``, or None when there is none yet."""
    directory = cache_dir(root, teacher_id)
    return TeacherCache(directory) if (directory / INDEX).is_file() else None


def instance_points(label: np.ndarray) -> list[tuple[float, float]]:
    """One prompt per instance of a label map (8-connected components of each class): its interior point."""
    points: list[tuple[float, float]] = []
    classes = [int(v) for v in np.unique(label) if 0 < v != IGNORE_LABEL]
    for value in classes:
        binary = (label == value).astype(np.uint8)
        count, components = cv2.connectedComponents(binary, connectivity=8)
        points.extend(interior_point(components == k) for k in range(1, count))
    return points


def build_cache(
    root: Path | str,
    teacher: Teacher,
    example: Callable[[int], WindowExample],
    sources: Sequence[str],
    *,
    batch_size: int = 8,
    device: torch.device | None = None,
    progress: Callable[[int], None] | None = None,
) -> TeacherCache:
    """Compute the teacher's outputs for every example whose source is not cached yet and write the
    cache (old entries + new ones) atomically. ``example(i)`` makes the whole, un-augmented example
    of ``sources[i]`` (a WindowDataset with ``train=False``). Returns the new cache.
    """
    root = Path(root)
    device = device or torch.device("cpu")
    existing = open_cache(root, teacher.teacher_id)
    todo = [i for i, s in enumerate(sources) if existing is None or s not in existing]
    todo = list({sources[i]: i for i in todo}.values())  # one entry per source
    if existing is not None and not todo:
        return existing

    final = cache_dir(root, teacher.teacher_id)
    root.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(final)
    try:
        embeddings: list[np.ndarray] = []
        foregrounds: list[np.ndarray] = []
        entries: dict[str, dict[str, list[int]]] = {}
        cursor = {"embedding": 0, "foreground": 0}

        def add(source: str, embedding: np.ndarray, foreground: np.ndarray) -> None:
            entries[source] = {
                "embedding": [cursor["embedding"], *embedding.shape],
                "foreground": [cursor["foreground"], *foreground.shape],
            }
            embeddings.append(embedding.astype(DTYPE).reshape(-1))
            foregrounds.append(foreground.astype(DTYPE).reshape(-1))
            cursor["embedding"] += embedding.size
            cursor["foreground"] += foreground.size

        if existing is not None:
            for source in existing.entries:
                old = existing.get(source)
                add(source, old.embedding.numpy(), old.foreground.numpy())
        teacher = teacher.to(device).eval()
        # Batches of one size (samples may differ: magnetic tile), in order of appearance.
        by_size: dict[tuple[int, ...], list[int]] = {}
        made = {i: example(i) for i in todo}
        for i in todo:
            by_size.setdefault(made[i].label.shape, []).append(i)
        for group in by_size.values():
            for start in range(0, len(group), batch_size):
                chunk = group[start : start + batch_size]
                examples = [made[i] for i in chunk]
                batch = collate_windows(examples)
                points: list[tuple[float, float]] = []
                index: list[int] = []
                for j, e in enumerate(examples):
                    mine = instance_points(e.label)
                    points.extend(mine)
                    index.extend([j] * len(mine))
                with torch.no_grad():
                    out = teacher.predict(
                        batch["image"].to(device),
                        torch.tensor(points, dtype=torch.float32).reshape(-1, 2).to(device),
                        torch.tensor(index, dtype=torch.int64).to(device),
                    )
                for j, i in enumerate(chunk):
                    add(sources[i], out.embedding[j].float().cpu().numpy(), out.foreground[j].float().cpu().numpy())
                if progress is not None:
                    progress(len(chunk))
        np.save(tmp / "embeddings.npy", np.concatenate(embeddings) if embeddings else np.zeros(0, DTYPE))
        np.save(tmp / "foreground.npy", np.concatenate(foregrounds) if foregrounds else np.zeros(0, DTYPE))
        index_doc = {"teacher_id": teacher.teacher_id, "channels": teacher.channels, "dtype": "float16",
                     "entries": entries}
        (tmp / INDEX).write_text(json.dumps(index_doc) + "\n")
        replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return TeacherCache(final)
