"""One category of MVTec AD (or a set laid out like it, e.g. VisA after its MVTec conversion), read in place.

Layout (ROOT is one category, e.g. ``mvtec_anomaly_detection/bottle``)::

    ROOT/
      train/good/000.png               defect-free images
      test/good/000.png                defect-free images
      test/<type>/000.png              images with a defect of that type (broken_large, contamination, ...)
      ground_truth/<type>/000_mask.png their masks: foreground > 0

The classes are the defect types (sorted): the folders of ``test/`` and ``ground_truth/`` other
than ``good``, the same for every split. A ``good`` image has no instance; every 8-connected
component of a mask is one instance of its folder's type.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from training.data.errors import DatasetError
from training.data.folder import IMAGE_SUFFIXES, check_mask_size, instances_from_label, read_image, read_mask
from training.data.sample import Sample

GOOD = "good"
_CLASS_FOLDERS = ("test", "ground_truth")


def _folders(path: Path) -> list[str]:
    try:
        return sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as exc:
        raise DatasetError(path, f"directory cannot be read ({exc.strerror or exc})") from None


class MvtecDataset:
    """One split (``train`` or ``test``) of one MVTec AD category; ``class_names`` are its defect types."""

    def __init__(self, root: Path | str, split: str = "test", *, min_instance_area: int = 1) -> None:
        self.root = Path(root)
        self.split = split
        self.min_instance_area = min_instance_area
        self.name = f"mvtec:{self.root.name}:{split}"
        if not self.root.is_dir():
            cause = "MVTec folder does not exist" if not self.root.exists() else "is not a directory"
            raise DatasetError(self.root, cause)
        types = sorted({t for sub in _CLASS_FOLDERS if (self.root / sub).is_dir()
                        for t in _folders(self.root / sub)} - {GOOD})
        if not types:
            inner = [f for f in _folders(self.root) if (self.root / f / "test").is_dir()]
            hint = (f"; it looks like the set's top folder: give one category as root ({', '.join(inner[:3])}, ...)"
                    if inner else "")
            raise DatasetError(self.root, f"no defect types: neither test/ nor ground_truth/ holds a folder "
                                          f"other than good/{hint}")
        self.class_names: Sequence[str] = tuple(types)
        split_dir = self.root / split
        if not split_dir.is_dir():
            raise DatasetError(split_dir, f"split {split!r} is missing (no such directory)")
        self.items: list[tuple[str, int | None]] = []  # (path relative to root, class index or None)
        for folder in _folders(split_dir):
            if folder != GOOD and folder not in types:  # train/other/: not a type test/ or ground_truth/ knows
                raise DatasetError(split_dir / folder, "is neither good/ nor a defect type")
            class_index = None if folder == GOOD else types.index(folder)
            for path in sorted((split_dir / folder).iterdir()):
                if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                    self.items.append((f"{split}/{folder}/{path.name}", class_index))
        if not self.items:
            raise DatasetError(split_dir, f"split holds no images (expected {split}/good/*.png, "
                                          f"{split}/<defect type>/*.png)")

    def __len__(self) -> int:
        return len(self.items)

    def mask_path(self, relative: str) -> Path:
        """ground_truth/<type>/<stem>_mask.png (or <stem>.png where only that exists)."""
        path = Path(relative)
        folder = self.root / "ground_truth" / path.parent.name
        named = folder / f"{path.stem}_mask.png"
        plain = folder / f"{path.stem}.png"
        return plain if not named.exists() and plain.exists() else named

    def __getitem__(self, index: int) -> Sample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        relative, class_index = self.items[index]
        image_path = self.root / relative
        image = read_image(image_path)
        h, w = image.shape[:2]
        if class_index is None:
            masks, classes = np.zeros((0, h, w), dtype=bool), np.zeros(0, dtype=np.int64)
        else:
            mask_path = self.mask_path(relative)
            if not mask_path.exists():
                raise DatasetError(mask_path, f"mask of {relative} is missing")
            mask = read_mask(mask_path)
            check_mask_size(mask, image, mask_path, image_path)
            masks, classes = instances_from_label(mask > 0, [(1, class_index)], self.min_instance_area)
        return Sample(image=image, masks=masks, classes=classes, source=str(image_path))
