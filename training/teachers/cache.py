"""Teacher outputs computed once and kept on disk, reused across epochs and recipes.

A cache is a directory per teacher under a cache root (``<root>/<teacher_id>/``)::

    index.json       {"teacher_id", "input": [H, W], "channels", "mask_stride", "dtype",
                      "entries": {source: {"row": i, "first": j, "count": n}}}
    embeddings.npy   float16  S x Ct x H/16 x W/16   row i: the sample's image embedding
    logits.npy       float16  P x H/s x W/s          rows first..first+n: its instances' mask logits
    points.npy       float32  P x 2                  the prompt of each row (the instance's anchor)

Entries are keyed by the dataset sample's ``source`` (unique within a dataset, e.g.
"synthetic:12" or a file path), so the cache serves every recipe and every dataset that holds
the sample. Prompts are the deterministic interior points (``anchors``) of un-augmented
examples; a recipe that reads the cache prompts the student with the same points. The ``.npy``
files are opened as read-only memory maps. A cache is written into a temporary sibling
directory and renamed into place, so a reader never sees a partial one; extending a cache with
new sources writes a new directory holding the old rows and the new ones.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engines.atomic import replace_dir
from engines.errors import DefectsamError
from training.data.prepare import TrainExample, collate
from training.teachers.base import Teacher

INDEX = "index.json"
DTYPE = np.float16


class CacheError(DefectsamError):
    """A teacher cache that is missing, stale or unreadable."""


@dataclass(frozen=True)
class CachedTargets:
    """embedding CtxH/16xW/16 float32; mask_logits nxH/sxW/s float32; points nx2 float32."""

    embedding: torch.Tensor
    mask_logits: torch.Tensor
    points: torch.Tensor


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
            self.input_size: tuple[int, int] = (int(index["input"][0]), int(index["input"][1]))
            self.channels = int(index["channels"])
            self.mask_stride = int(index["mask_stride"])
            self.entries: dict[str, dict[str, int]] = index["entries"]
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise CacheError(f"{index_path}: unreadable cache index ({exc})") from None
        self._arrays: dict[str, np.ndarray] | None = None

    def _open(self) -> dict[str, np.ndarray]:
        # Opened lazily, so a cache object pickles cheaply into data-loader workers.
        if self._arrays is None:
            try:
                self._arrays = {
                    name: np.load(self.path / f"{name}.npy", mmap_mode="r")
                    for name in ("embeddings", "logits", "points")
                }
            except (OSError, ValueError) as exc:
                raise CacheError(f"{self.path}: unreadable cache arrays ({exc})") from None
        return self._arrays

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arrays": None}

    def __contains__(self, source: str) -> bool:
        return source in self.entries

    def missing(self, sources: Iterable[str]) -> list[str]:
        return [s for s in sources if s not in self.entries]

    def get(self, source: str) -> CachedTargets:
        entry = self.entries.get(source)
        if entry is None:
            raise CacheError(f"{self.path}: no cached teacher outputs for {source!r} (re-run cache-teacher)")
        arrays = self._open()
        first, count = entry["first"], entry["count"]
        return CachedTargets(
            embedding=torch.from_numpy(np.asarray(arrays["embeddings"][entry["row"]], dtype=np.float32)),
            mask_logits=torch.from_numpy(np.asarray(arrays["logits"][first : first + count], dtype=np.float32)),
            points=torch.from_numpy(np.array(arrays["points"][first : first + count], dtype=np.float32)),
        )


def open_cache(root: Path | str, teacher_id: str) -> TeacherCache | None:
    """The cache of ``teacher_id`` under ``root``, or None when there is none yet."""
    directory = cache_dir(root, teacher_id)
    return TeacherCache(directory) if (directory / INDEX).is_file() else None


def build_cache(
    root: Path | str,
    teacher: Teacher,
    example: Callable[[int], TrainExample],
    sources: Sequence[str],
    *,
    batch_size: int = 4,
    device: torch.device | None = None,
    progress: Callable[[int], None] | None = None,
) -> TeacherCache:
    """Compute the teacher's outputs for every example whose source is not cached yet and write the
    cache (old rows + new ones) atomically. ``example(i)`` makes the un-augmented example of
    ``sources[i]`` (a PreparedDataset with ``train=False``). Returns the new cache.
    """
    root = Path(root)
    device = device or torch.device("cpu")
    existing = open_cache(root, teacher.teacher_id)
    todo = [i for i, s in enumerate(sources) if existing is None or s not in existing]
    todo = list({sources[i]: i for i in todo}.values())  # one row per source
    if existing is not None and not todo:
        return existing
    height, width = teacher.input_size
    grid = (height // 16, width // 16)
    mask_hw = (height // teacher.mask_stride, width // teacher.mask_stride)

    final = cache_dir(root, teacher.teacher_id)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    try:
        old_rows = len(existing.entries) if existing is not None else 0
        n_rows = old_rows + len(todo)
        embeddings = np.lib.format.open_memmap(
            tmp / "embeddings.npy", mode="w+", dtype=DTYPE, shape=(n_rows, teacher.channels, *grid)
        )
        logits_chunks: list[np.ndarray] = []
        points_chunks: list[np.ndarray] = []
        entries: dict[str, dict[str, int]] = {}
        first = 0
        if existing is not None:
            arrays = existing._open()
            for row, (source, entry) in enumerate(existing.entries.items()):
                embeddings[row] = arrays["embeddings"][entry["row"]]
                block = slice(entry["first"], entry["first"] + entry["count"])
                logits_chunks.append(np.asarray(arrays["logits"][block]))
                points_chunks.append(np.asarray(arrays["points"][block]))
                entries[source] = {"row": row, "first": first, "count": entry["count"]}
                first += entry["count"]
        row = old_rows
        teacher = teacher.to(device).eval()
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            batch_examples = [example(i) for i in chunk]
            batch = collate(batch_examples)
            valid = batch["instance_valid"]
            image_index = valid.nonzero()[:, 0]
            anchors = batch["anchors"][valid]  # BxNx2 -> Mx2
            with torch.no_grad():
                out = teacher.predict(batch["image"].to(device), anchors.to(device), image_index.to(device))
            embeddings[row : row + len(chunk)] = out.embedding.float().cpu().numpy().astype(DTYPE)
            logits = out.mask_logits.float().cpu().numpy().astype(DTYPE)
            cursor = 0
            for j, i in enumerate(chunk):
                count = int(valid[j].sum())
                entries[sources[i]] = {"row": row + j, "first": first, "count": count}
                logits_chunks.append(logits[cursor : cursor + count])
                points_chunks.append(anchors[cursor : cursor + count].numpy())
                first += count
                cursor += count
            row += len(chunk)
            if progress is not None:
                progress(len(chunk))
        embeddings.flush()
        del embeddings
        all_logits = np.concatenate(logits_chunks) if logits_chunks else np.zeros((0, *mask_hw), DTYPE)
        all_points = np.concatenate(points_chunks) if points_chunks else np.zeros((0, 2), np.float32)
        np.save(tmp / "logits.npy", all_logits.astype(DTYPE).reshape(-1, *mask_hw))
        np.save(tmp / "points.npy", all_points.astype(np.float32).reshape(-1, 2))
        index = {
            "teacher_id": teacher.teacher_id,
            "input": [height, width],
            "channels": teacher.channels,
            "mask_stride": teacher.mask_stride,
            "dtype": "float16",
            "entries": entries,
        }
        (tmp / INDEX).write_text(json.dumps(index) + "\n")
        replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return TeacherCache(final)
