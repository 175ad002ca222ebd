"""Ultralytics / Roboflow YOLO segmentation labels, read in place.

A dataset YAML names the classes and the splits::

    path: .                  # optional: the dataset's folder, relative to the YAML's
    train: images/train      # a folder of images, a .txt list of image paths, or a list of either
    val: images/val          # (Roboflow: ../valid/images, read as valid/images when ../ does not exist)
    names: [scratch, dent]   # or {0: scratch, 1: dent}; nc, when given, must agree

Each image ``.../images/.../NAME.jpg`` has its labels in ``.../labels/.../NAME.txt`` (the last
``images`` folder of its path becomes ``labels``): one instance a line, ``CLASS x1 y1 x2 y2 ...``,
the polygon's points normalised to [0, 1] by the image's width and height. An image without a
label file, or with an empty one, is defect-free (as Ultralytics reads background images).
Instances are kept apart; each polygon is rasterised as pycocotools rasterises COCO polygons.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from training.data.errors import DatasetError
from training.data.folder import IMAGE_SUFFIXES, read_image
from training.data.mask_codecs import MaskCodecError, polygon_mask
from training.data.sample import Sample

SPLIT_KEYS = ("train", "val", "test")
_YAML_NAMES = ("data.yaml", "dataset.yaml", "data.yml", "dataset.yml")


def find_dataset_yaml(root: Path) -> Path:
    """The dataset YAML: ``root`` itself, or data.yaml / dataset.yaml / the only .yaml in the folder ``root``."""
    if root.is_file():
        return root
    if not root.is_dir():
        raise DatasetError(root, "YOLO dataset YAML or folder does not exist")
    for name in _YAML_NAMES:
        if (root / name).is_file():
            return root / name
    found = sorted([*root.glob("*.yaml"), *root.glob("*.yml")])
    if len(found) == 1:
        return found[0]
    if found:
        raise DatasetError(root, f"holds several YAML files ({', '.join(p.name for p in found[:4])}); name the "
                                 f"dataset's as root")
    raise DatasetError(root, f"no dataset YAML (looked for {', '.join(_YAML_NAMES)}, *.yaml)")


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(path, f"dataset YAML cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DatasetError(path, f"malformed dataset YAML: {first}") from None
    if not isinstance(raw, dict):
        raise DatasetError(path, "dataset YAML must be a mapping (path, train, val, names)")
    return raw


def class_names_from_yaml(raw: dict[str, Any], path: Path) -> tuple[str, ...]:
    """``names`` as a list or an {index: name} dict with indices 0..n-1; checked against ``nc``."""
    names = raw.get("names")
    if isinstance(names, dict):
        keys = sorted(names, key=str)
        if not all(isinstance(k, int) for k in names) or sorted(names) != list(range(len(names))):
            raise DatasetError(path, f"names: the keys must be the class indices 0..{len(names) - 1}, got "
                                     f"{', '.join(map(str, keys))}")
        names = [names[i] for i in range(len(names))]
    if not isinstance(names, list) or not names:
        raise DatasetError(path, "names: missing or empty (a list of class names, or {index: name})")
    cleaned = tuple(str(n).strip() for n in names)
    if not all(cleaned):
        raise DatasetError(path, "names: a class name is empty")
    if len(set(cleaned)) != len(cleaned):
        raise DatasetError(path, "names: a class is named twice")
    nc = raw.get("nc")
    if nc is not None and nc != len(cleaned):
        raise DatasetError(path, f"nc is {nc} but names lists {len(cleaned)} classes")
    return cleaned


def label_path(image: Path) -> Path:
    """The label file of an image: its last ``images`` folder becomes ``labels``, its suffix ``.txt``."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            return Path(*parts).with_suffix(".txt")
    raise DatasetError(image, "is not under an images/ folder (YOLO labels are found in the matching labels/ folder)")


def parse_label_line(line: str, num_classes: int, where: str) -> tuple[int, np.ndarray]:
    """``CLASS x1 y1 ...`` -> (class index, flat normalised coordinates); ValueError naming ``where`` and the cause."""
    fields = line.split()
    try:
        class_index = int(fields[0])
    except ValueError:
        raise ValueError(f"{where}: class {fields[0]!r} is not an integer") from None
    if not 0 <= class_index < num_classes:
        raise ValueError(
            f"{where}: class {class_index} but the dataset YAML names {num_classes} (0..{num_classes - 1})"
        )
    try:
        coords = np.asarray([float(v) for v in fields[1:]], dtype=np.float64)
    except ValueError:
        raise ValueError(f"{where}: a coordinate is not a number") from None
    if coords.size == 4:
        raise ValueError(f"{where}: 4 values are a detection box, not a polygon (yolo-seg needs x1 y1 x2 y2 x3 y3 ...)")
    if coords.size % 2:
        raise ValueError(f"{where}: polygon has an odd number of coordinates ({coords.size})")
    if coords.size < 6:
        raise ValueError(f"{where}: polygon has {coords.size // 2} point(s); a polygon needs at least 3")
    outside = np.flatnonzero(~((coords >= 0.0) & (coords <= 1.0)))
    if outside.size:
        value = coords[outside[0]]
        raise ValueError(f"{where}: coordinate {value:g} is outside [0, 1] (YOLO coordinates are normalised by the "
                         f"image size)")
    return class_index, coords


class YoloSegDataset:
    """The images of one split (or all) of a YOLO segmentation dataset, with their polygons as instances."""

    def __init__(self, root: Path | str, split: str | None = None, *, min_instance_area: int = 1) -> None:
        self.root = Path(root)
        self.split = split
        self.min_instance_area = min_instance_area
        self.yaml_path = find_dataset_yaml(self.root)
        raw = _read_yaml(self.yaml_path)
        self.class_names: Sequence[str] = class_names_from_yaml(raw, self.yaml_path)
        base = self.yaml_path.parent
        if raw.get("path") not in (None, ""):
            base = base / str(raw["path"])  # an absolute path replaces the YAML's folder
            if not base.is_dir():
                raise DatasetError(self.yaml_path, f"path: {base} does not exist (a relative path is taken from "
                                                   f"the YAML's folder)")
        keys = [k for k in SPLIT_KEYS if raw.get(k)] if split is None else [split]
        if split is not None and not raw.get(split):
            present = ", ".join(k for k in raw if k in SPLIT_KEYS and raw.get(k)) or "none"
            raise DatasetError(self.yaml_path, f"names no split {split!r} (its splits: {present})")
        if not keys:
            raise DatasetError(self.yaml_path, f"names no split ({', '.join(SPLIT_KEYS)})")
        images: list[Path] = []
        for key in keys:
            entries = raw[key] if isinstance(raw[key], list) else [raw[key]]
            for entry in entries:
                images += self._images_of(base, str(entry), key)
        self.images = list(dict.fromkeys(images))
        if not self.images:
            raise DatasetError(self.yaml_path, f"split {split or '+'.join(keys)} holds no images")
        self.name = f"yolo-seg:{self.yaml_path}" + (f":{split}" if split else "")

    def _images_of(self, base: Path, entry: str, key: str) -> list[Path]:
        location = base / entry
        if not location.exists() and entry.startswith("../"):  # Roboflow writes ../train/images
            location = base / entry[3:]
        if location.is_file() and location.suffix.lower() == ".txt":
            lines = [line.strip() for line in location.read_text(encoding="utf-8").splitlines() if line.strip()]
            found = [location.parent / line for line in lines]
            for path in found:
                if not path.is_file():
                    raise DatasetError(location, f"lists {path}, which does not exist")
            return found
        if not location.is_dir():
            raise DatasetError(self.yaml_path, f"{key}: {location} does not exist")
        labels = label_path(location / "x.jpg").parent
        if not labels.is_dir():
            raise DatasetError(labels, f"labels folder of {location} is missing")
        found = []
        for folder, subfolders, names in os.walk(location):
            subfolders.sort()
            found += [Path(folder) / n for n in sorted(names) if Path(n).suffix.lower() in IMAGE_SUFFIXES]
        if not found:
            raise DatasetError(location, f"{key} images folder holds no images")
        return found

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Sample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        image_path = self.images[index]
        image = read_image(image_path)
        h, w = image.shape[:2]
        labels = label_path(image_path)
        masks: list[np.ndarray] = []
        classes: list[int] = []
        try:
            text = labels.read_text(encoding="utf-8")
        except FileNotFoundError:
            text = ""  # a background image
        except (OSError, UnicodeDecodeError) as exc:
            raise DatasetError(labels, f"label file cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                class_index, coords = parse_label_line(line, len(self.class_names), f"line {number}")
                pixels = coords.reshape(-1, 2) * (w, h)
                mask = polygon_mask([pixels.reshape(-1)], h, w)
            except (ValueError, MaskCodecError) as exc:
                raise DatasetError(labels, str(exc)) from None
            if int(mask.sum()) >= max(1, self.min_instance_area):
                masks.append(mask)
                classes.append(class_index)
        stacked = np.stack(masks) if masks else np.zeros((0, h, w), dtype=bool)
        return Sample(image=image, masks=stacked, classes=np.asarray(classes, dtype=np.int64), source=str(image_path))
