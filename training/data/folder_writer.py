"""Write any set of samples in the generic folder layout (training.data.folder), as one atomic directory.

``write_folder(members, out)`` writes ``images/``, ``masks/``, ``classes.txt`` and, for members
read with a split, ``splits/SPLIT.txt`` into a temporary directory beside ``out``, then renames it
to ``out``: a reader sees no folder, the old one, or the finished new one. ``FolderDataset`` reads
back the same samples: the same images (a source file's bytes are copied where they decode to the
sample's image, else the image is written as PNG), the same instances with the same classes
(up to their order).

Masks: a label-index PNG (value v is class v-1) where that keeps the instances (no two overlap,
no two of one class touch, none is in pieces); otherwise one binary PNG per instance,
``masks/NAME/II_CLASS.png``. Names: a file's path relative to the deepest folder holding every
source file (``test/crack/000.png`` for an MVTec category), else the source made a file name;
a repeated name gets ``_2``, ``_3``...
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from engines.atomic import current_umask, replace_dir
from training.data.errors import DatasetError
from training.data.folder import IMAGE_SUFFIXES, instances_from_label
from training.data.sample import Sample, SampleDataset

_STAGING = ".staging"


@dataclass
class Member:
    """One dataset to write, its class indices already those of ``class_names`` given to write_folder."""

    dataset: SampleDataset
    split: str | None = None


@dataclass
class WriteSummary:
    """What write_folder wrote."""

    out: Path
    images: int = 0
    with_defects: int = 0
    per_instance: int = 0  # samples whose masks went into a per-instance folder
    instances: Counter[str] = field(default_factory=Counter)
    splits: dict[str, int] = field(default_factory=dict)


def _label_image(sample: Sample, num_classes: int) -> np.ndarray:
    dtype = np.uint8 if num_classes <= 254 else np.uint16  # 255 would read as a 0/255 binary mask
    label = np.zeros(sample.image.shape[:2], dtype=dtype)
    for mask, class_id in zip(sample.masks, sample.classes, strict=True):
        label[mask] = int(class_id) + 1
    return label


def _first_pixels(masks: np.ndarray) -> np.ndarray:
    return np.argmax(masks.reshape(len(masks), -1), axis=1)


def label_image_keeps(sample: Sample, label: np.ndarray) -> bool:
    """Whether reading ``label`` back (8-connected components per class) gives the sample's instances."""
    if len(sample.masks) == 0:
        return True
    if int(sample.masks.sum(axis=0, dtype=np.int32).max()) > 1:
        return False  # overlapping instances
    values = [(int(c) + 1, int(c)) for c in np.unique(sample.classes)]
    masks, classes = instances_from_label(label, values, min_area=1)
    if len(masks) != len(sample.masks):
        return False
    mine = np.lexsort((_first_pixels(sample.masks), sample.classes))
    theirs = np.lexsort((_first_pixels(masks), classes))
    return bool(np.array_equal(sample.classes[mine], classes[theirs])
                and np.array_equal(sample.masks[mine], masks[theirs]))


def _png(array: np.ndarray, what: str) -> bytes:
    ok, data = cv2.imencode(".png", array)
    if not ok:  # pragma: no cover - encoding a uint8/uint16 array does not fail
        raise DatasetError(what, "could not encode PNG")
    return data.tobytes()


def _image_bytes(sample: Sample) -> tuple[bytes, str]:
    """The source file's bytes and suffix where they decode to the sample's image, else a PNG of it."""
    source = Path(sample.source)
    if source.suffix.lower() in IMAGE_SUFFIXES and source.is_file():
        data = source.read_bytes()
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if decoded is not None and np.array_equal(decoded, sample.image):
            return data, source.suffix
    return _png(sample.image, sample.source), ".png"


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _safe_class_file_name(name: str) -> str:
    if not name or "/" in name or "\\" in name or "\0" in name or name in (".", ".."):
        raise DatasetError(name or "(empty)", "class name cannot be part of a file name (masks/NAME/II_CLASS.png); "
                                              "rename it with class_map")
    return name


def final_names(sources: Sequence[str], suffixes: Sequence[str]) -> list[str]:
    """Output names (relative, POSIX) for samples from ``sources``, unique by their stem (module docstring)."""
    files = [Path(s).resolve() if Path(s).is_file() else None for s in sources]
    parents = [str(f.parent) for f in files if f is not None]
    common = Path(os.path.commonpath(parents)) if parents else None
    stems = []
    for source, file in zip(sources, files, strict=True):
        if file is not None and common is not None:
            stems.append(file.relative_to(common).with_suffix("").as_posix())
        else:
            stems.append(re.sub(r"[^A-Za-z0-9._-]+", "_", source).strip("._") or "sample")
    # masks/A.png beside masks/A/ would read as A's per-instance folder: a folder's name is taken too
    taken = {parent.as_posix() for stem in stems for parent in Path(stem).parents if parent != Path(".")}
    names = []
    for stem, suffix in zip(stems, suffixes, strict=True):
        candidate, k = stem, 1
        while candidate in taken:
            k += 1
            candidate = f"{stem}_{k}"
        taken.add(candidate)
        names.append(candidate + suffix)
    return names


def write_folder(
    members: Sequence[Member], class_names: Sequence[str], out: Path, *, force: bool = False,
    log: Callable[[str], None] | None = None,
) -> WriteSummary:
    """Write ``members`` to ``out`` in the folder layout, atomically (module docstring).

    DatasetError, and nothing written, when ``out`` is a file, is a non-empty folder and ``force``
    is false, or holds a source file being converted; or when a sample cannot be read.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DatasetError(out, "exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise DatasetError(out, "is not empty; give --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.convert-", dir=out.parent))
    try:
        summary, sources = _write_all(members, class_names, tmp, out, log)
        resolved = out.resolve()
        for source in sources:
            path = Path(source)
            if path.is_absolute() and resolved in path.resolve().parents:
                raise DatasetError(out, f"holds {source}, which is being converted; choose another --out")
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp's 0700 -> a plain mkdir's mode
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _write_all(
    members: Sequence[Member], class_names: Sequence[str], tmp: Path, out: Path, log: Callable[[str], None] | None
) -> tuple[WriteSummary, list[str]]:
    """Every sample into ``tmp/.staging`` by number, then moved to its final name; (summary, sources)."""
    staging = tmp / _STAGING
    summary = WriteSummary(out=out)
    total = sum(len(m.dataset) for m in members)
    sources: list[str] = []
    suffixes: list[str] = []
    per_instance: list[bool] = []
    splits: list[str | None] = []
    for member in members:
        for index in range(len(member.dataset)):
            sample = member.dataset[index]
            present = sample.masks.any(axis=(1, 2))
            if not present.all():  # an empty instance mask reads back as no instance
                sample = dataclasses.replace(sample, masks=sample.masks[present], classes=sample.classes[present],
                                             sizes=None if sample.sizes is None else sample.sizes[present])
            n = len(sources)
            data, suffix = _image_bytes(sample)
            _write(staging / f"{n}{suffix}", data)
            label = _label_image(sample, len(class_names))
            keep = label_image_keeps(sample, label)
            if keep:
                _write(staging / f"{n}.mask.png", _png(label, sample.source))
            else:
                width = max(2, len(str(len(sample.masks) - 1)))
                folder = staging / f"{n}.masks"
                for j, (mask, class_id) in enumerate(zip(sample.masks, sample.classes, strict=True)):
                    name = _safe_class_file_name(class_names[int(class_id)])
                    _write(folder / f"{j:0{width}d}_{name}.png", _png(mask.astype(np.uint8) * 255, sample.source))
            sources.append(sample.source)
            suffixes.append(suffix)
            per_instance.append(not keep)
            splits.append(member.split)
            summary.images += 1
            summary.with_defects += int(len(sample.masks) > 0)
            summary.per_instance += int(not keep)
            summary.instances.update(class_names[int(c)] for c in sample.classes)
            if log is not None and summary.images % 500 == 0:
                log(f"convert: {summary.images}/{total} images")
    names = final_names(sources, suffixes)
    for n, name in enumerate(names):
        image = tmp / "images" / name
        mask = tmp / "masks" / Path(name).with_suffix("")
        image.parent.mkdir(parents=True, exist_ok=True)
        mask.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / f"{n}{suffixes[n]}", image)
        if per_instance[n]:
            os.replace(staging / f"{n}.masks", mask)
        else:
            os.replace(staging / f"{n}.mask.png", mask.with_name(mask.name + ".png"))
    if staging.exists():
        staging.rmdir()
    _write(tmp / "classes.txt", "".join(f"{name}\n" for name in class_names).encode("utf-8"))
    by_split: dict[str, list[str]] = {}
    for name, split in zip(names, splits, strict=True):
        if split is not None:
            by_split.setdefault(split, []).append(name)
    for split, listed in by_split.items():
        _write(tmp / "splits" / f"{split}.txt", "".join(f"{n}\n" for n in listed).encode("utf-8"))
        summary.splits[split] = len(listed)
    return summary, sources
