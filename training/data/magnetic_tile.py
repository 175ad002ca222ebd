"""The magnetic tile defect set (Huang, Qiu, Yuan 2020), read in place with its fixed splits.

``MT_<Class>/Imgs/<name>.jpg`` is a grayscale image and ``<name>.png`` its mask (foreground
``>= 128``); ``splits/{train,val,test}.txt`` list image paths relative to the set's root. Every
connected component of a mask is one instance of the folder's class; ``MT_Free`` images have
no defect.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from training.data.errors import DatasetError
from training.data.folder import check_mask_size, instances_from_label, read_image, read_mask, read_split
from training.data.sample import Sample

CLASSES: tuple[str, ...] = ("Blowhole", "Break", "Crack", "Fray", "Uneven")
FREE = "Free"
Split = Literal["train", "val", "test"]


class MagneticTileDataset:
    """One split of the magnetic tile set; ``class_names`` are the five defect classes."""

    class_names: Sequence[str] = CLASSES

    def __init__(
        self, root: Path | str, split: Split = "test", *, min_instance_area: int = 1, free_limit: int | None = None
    ) -> None:
        """``free_limit``: keep at most this many of the split's MT_Free (defect-free) images, evenly spaced
        (training: most of the set is defect-free, and crops of them teach little)."""
        self.root = Path(root)
        self.split = split
        self.name = f"magnetic_tile:{split}" + (f",free_limit={free_limit}" if free_limit is not None else "")
        self.min_instance_area = min_instance_area
        if not self.root.is_dir():
            raise DatasetError(self.root, "magnetic tile folder does not exist")
        split_file = self.root / "splits" / f"{split}.txt"
        self.names = read_split(split_file)
        self._class_of: list[int | None] = []
        for name in self.names:
            folder = Path(name).parts[0] if Path(name).parts else ""
            label = folder.removeprefix("MT_")
            if not folder.startswith("MT_") or (label != FREE and label not in CLASSES):
                raise DatasetError(split_file, f"lists {name!r}, which is not under MT_<Class>/ of a known class")
            self._class_of.append(None if label == FREE else CLASSES.index(label))
        free = [i for i, c in enumerate(self._class_of) if c is None]
        if free_limit is not None and free_limit < len(free):
            step = len(free) / free_limit if free_limit else 0.0
            kept = {free[int(k * step)] for k in range(free_limit)}
            keep = [i for i in range(len(self.names)) if self._class_of[i] is not None or i in kept]
            self.names = [self.names[i] for i in keep]
            self._class_of = [self._class_of[i] for i in keep]

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> Sample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        name = self.names[index]
        image_path = self.root / name
        mask_path = image_path.with_suffix(".png")
        image = read_image(image_path)
        mask = read_mask(mask_path)
        check_mask_size(mask, image, mask_path, image_path)
        class_index = self._class_of[index]
        h, w = image.shape[:2]
        if class_index is None:
            masks, classes = np.zeros((0, h, w), dtype=bool), np.zeros(0, dtype=np.int64)
        else:
            masks, classes = instances_from_label(mask >= 128, [(1, class_index)], self.min_instance_area)
        return Sample(image=image, masks=masks, classes=classes, source=str(image_path))
