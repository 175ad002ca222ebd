"""A generic folder of images and masks, read in place; and the image/mask helpers every reader shares.

Layout (``defectsam-train synth`` writes it; docs/datasets.md)::

    ROOT/
      images/NAME.png|jpg|...   the images (subfolders allowed; masks mirror them)
      masks/NAME.png            a label-index PNG (0 background, value v is class v-1 of classes.txt)
                                or a binary PNG (0/255, foreground >= 128, class 0)
      masks/NAME/I_CLASS.png    or: one binary PNG per instance, e.g. 00_scratch.png
      classes.txt               class names, one a line (optional: one class, "defect")
      splits/SPLIT.txt          optional: image paths relative to images/, one a line

A label or binary mask is split into instances by 8-connected components per class (touching
instances of one class merge: write per-instance masks to keep them apart); components smaller
than ``min_instance_area`` pixels (default 1: keep all) are dropped. Per-instance masks are kept
as they are (foreground >= 128, or > 0 for 0/1 masks).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from training.data.errors import DatasetError
from training.data.sample import Sample

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
DEFAULT_CLASS = "defect"
MaskFormat = Literal["auto", "label", "binary"]


def read_image(path: Path) -> np.ndarray:
    """Decode an image file to HxWx3 uint8 BGR (mono replicated); DatasetError naming the file."""
    data = _read_bytes(path, "image")
    image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if image is None:
        raise DatasetError(path, "is not an image OpenCV can decode")
    return image


def read_mask(path: Path) -> np.ndarray:
    """Decode a mask file to a 2-D integer array (uint8 or uint16, as stored); DatasetError naming the file."""
    data = _read_bytes(path, "mask")
    mask = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise DatasetError(path, "is not an image OpenCV can decode")
    if mask.ndim == 3:
        # A mask saved as colour: accept it when every channel holds the same values.
        if mask.shape[2] == 4:
            mask = mask[:, :, :3]
        if not all(np.array_equal(mask[:, :, 0], mask[:, :, c]) for c in range(1, mask.shape[2])):
            raise DatasetError(path, "is a colour image; a mask must be single-channel (label index or 0/255)")
        mask = mask[:, :, 0]
    if mask.dtype not in (np.uint8, np.uint16):
        raise DatasetError(path, f"has pixel type {mask.dtype}; a mask must be 8- or 16-bit")
    return mask


def _read_bytes(path: Path, what: str) -> np.ndarray:
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise DatasetError(path, f"{what} file is missing") from None
    except IsADirectoryError:
        raise DatasetError(path, f"is a directory, not an {what}") from None
    except PermissionError:
        raise DatasetError(path, f"{what} cannot be read (permission denied)") from None
    except OSError as exc:
        raise DatasetError(path, f"{what} cannot be read: {exc.strerror or exc}") from None
    if data.size == 0:
        raise DatasetError(path, f"{what} file is empty")
    return data


def check_mask_size(mask: np.ndarray, image: np.ndarray, mask_path: Path, image_path: Path) -> None:
    """DatasetError naming the mask when its size differs from its image's."""
    if mask.shape[:2] != image.shape[:2]:
        mh, mw = mask.shape[:2]
        ih, iw = image.shape[:2]
        raise DatasetError(mask_path, f"mask is {mw}x{mh} but its image {image_path.name} is {iw}x{ih}")


def instances_from_label(
    label: np.ndarray, values: Iterable[tuple[int, int]], min_area: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split a label image into instances: 8-connected components of each value.

    label: HxW integer array; values: (pixel value, class index) pairs; components with fewer
    than ``min_area`` pixels are dropped. Returns masks NxHxW bool and classes N int64.
    """
    masks: list[np.ndarray] = []
    classes: list[int] = []
    for value, class_index in values:
        binary = (label == value).view(np.uint8)
        if not binary.any():
            continue
        count, components, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
        for component in range(1, count):
            if stats[component, cv2.CC_STAT_AREA] >= max(1, min_area):
                masks.append(components == component)
                classes.append(class_index)
    h, w = label.shape[:2]
    stacked = np.stack(masks) if masks else np.zeros((0, h, w), dtype=bool)
    return stacked, np.asarray(classes, dtype=np.int64)


def read_class_names(path: Path) -> tuple[str, ...]:
    """Non-empty stripped lines of a text file; DatasetError when missing, empty or repeated."""
    lines = _read_lines(path, "class list")
    if not lines:
        raise DatasetError(path, "class list is empty")
    if len(set(lines)) != len(lines):
        raise DatasetError(path, "class list names a class twice")
    return tuple(lines)


def read_split(path: Path) -> list[str]:
    """Entries of a split file (non-empty stripped lines); DatasetError when missing or empty."""
    lines = _read_lines(path, "split file")
    if not lines:
        raise DatasetError(path, "split file lists no images")
    return lines


def _read_lines(path: Path, what: str) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(path, f"{what} is missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(path, f"{what} cannot be read: {exc}") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _list_images(images_dir: Path) -> list[str]:
    if not images_dir.is_dir():
        cause = "images directory is missing" if not images_dir.exists() else "is not a directory"
        raise DatasetError(images_dir, cause)

    def unreadable(error: OSError) -> None:
        raise DatasetError(error.filename or images_dir, f"directory cannot be read ({error.strerror or error})")

    found: list[str] = []
    for folder, subfolders, names in os.walk(images_dir, onerror=unreadable):
        subfolders.sort()
        for name in names:
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                found.append((Path(folder) / name).relative_to(images_dir).as_posix())
    return sorted(found)


class FolderDataset:
    """Images and masks in the generic folder layout (module docstring), read in place."""

    def __init__(
        self,
        root: Path | str,
        split: str | None = None,
        *,
        mask_format: MaskFormat = "auto",
        allow_missing_masks: bool = False,
        min_instance_area: int = 1,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            cause = "dataset folder does not exist" if not self.root.exists() else "is not a directory"
            raise DatasetError(self.root, cause)
        self.images_dir = self.root / "images"
        self.masks_dir = self.root / "masks"
        self.mask_format = mask_format
        self.allow_missing_masks = allow_missing_masks
        self.min_instance_area = min_instance_area
        classes_file = self.root / "classes.txt"
        self.class_names: Sequence[str] = (
            read_class_names(classes_file) if classes_file.exists() else (DEFAULT_CLASS,)
        )
        if split is None:
            self.names = _list_images(self.images_dir)
            if not self.names:
                raise DatasetError(self.images_dir, f"no images (suffixes {', '.join(sorted(IMAGE_SUFFIXES))})")
        else:
            split_file = self.root / "splits" / f"{split}.txt"
            self.names = read_split(split_file)
            for name in self.names:
                if not (self.images_dir / name).is_file():
                    raise DatasetError(split_file, f"lists {name!r}, but {self.images_dir / name} does not exist")
        self.split = split
        self.name = f"folder:{self.root}" + (f":{split}" if split else "")

    def __len__(self) -> int:
        return len(self.names)

    def mask_path(self, name: str) -> Path:
        """masks/NAME.png, or the per-instance directory masks/NAME/ when it exists."""
        stem = Path(name).with_suffix("")
        directory = self.masks_dir / stem
        return directory if directory.is_dir() else self.masks_dir / stem.with_suffix(".png")

    def __getitem__(self, index: int) -> Sample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        name = self.names[index]
        image_path = self.images_dir / name
        image = read_image(image_path)
        mask_path = self.mask_path(name)
        h, w = image.shape[:2]
        if mask_path.is_dir():
            masks, classes = self._read_instances(mask_path, image, image_path)
        elif not mask_path.exists() and self.allow_missing_masks:
            masks, classes = np.zeros((0, h, w), dtype=bool), np.zeros(0, dtype=np.int64)
        else:
            if not mask_path.exists():
                cause = f"mask of {name} is missing (set allow_missing_masks to read such images as defect-free)"
                raise DatasetError(mask_path, cause)
            label = read_mask(mask_path)
            check_mask_size(label, image, mask_path, image_path)
            masks, classes = self._instances(label, mask_path)
        return Sample(image=image, masks=masks, classes=classes, source=str(image_path))

    def _instances(self, label: np.ndarray, mask_path: Path) -> tuple[np.ndarray, np.ndarray]:
        values = np.unique(label)
        fmt = self.mask_format
        if fmt == "auto":
            binary_like = set(values.tolist()) <= {0, 255} and len(self.class_names) < 255
            fmt = "binary" if binary_like else "label"
        if fmt == "binary":
            return instances_from_label(label >= 128, [(1, 0)], self.min_instance_area)
        top = int(values.max()) if values.size else 0
        if top > len(self.class_names):
            raise DatasetError(
                mask_path,
                f"label value {top} but the dataset names only {len(self.class_names)} classes "
                f"(value v is class v-1 of classes.txt; use mask_format 'binary' for 0/255 masks)",
            )
        pairs = [(int(v), int(v) - 1) for v in values if v > 0]
        return instances_from_label(label, pairs, self.min_instance_area)

    def _read_instances(self, directory: Path, image: np.ndarray, image_path: Path) -> tuple[np.ndarray, np.ndarray]:
        files = sorted(p for p in directory.iterdir() if p.suffix.lower() == ".png")
        index = {name: i for i, name in enumerate(self.class_names)}
        masks: list[np.ndarray] = []
        classes: list[int] = []
        for path in files:
            _, sep, class_name = path.stem.partition("_")
            if not sep or class_name not in index:
                raise DatasetError(
                    path, f"instance mask must be named I_CLASS.png with CLASS one of {', '.join(self.class_names)}"
                )
            mask = read_mask(path)
            check_mask_size(mask, image, path, image_path)
            foreground = mask >= 128 if mask.max() > 1 else mask > 0
            if foreground.any():  # an instance file is one instance, however small
                masks.append(foreground)
                classes.append(index[class_name])
        h, w = image.shape[:2]
        stacked = np.stack(masks) if masks else np.zeros((0, h, w), dtype=bool)
        return stacked, np.asarray(classes, dtype=np.int64)
