"""NEU-Seg hot-rolled steel strip defects, read in place.

``img_dir/<split>/NNNNNN.jpg`` (200x200) with ``ann_dir/<split>/NNNNNN.png``, a label image:
0 background, value v is class v-1 of ``labels.txt`` once its first two lines (the annotation
tool's ``__ignore__`` and ``_background_``) are skipped. Every connected component of a
class's pixels is one instance. The split is the files present in ``img_dir/<split>/``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from training.data.errors import DatasetError
from training.data.folder import (
    IMAGE_SUFFIXES,
    check_mask_size,
    instances_from_label,
    read_class_names,
    read_image,
    read_mask,
)
from training.data.sample import Sample

Split = Literal["train", "val", "test"]
_TOOL_LINES = 2  # labels.txt starts with "__ignore__" and "_background_"
# labels.txt ends with "others", a class no label image of the set uses; the NEU-Seg papers (and their mIoU)
# count three defect classes, so the reader does too (a label image that does use it is an error).
_UNUSED = ("others",)


class NeuSegDataset:
    """One split of NEU-Seg; ``class_names`` from labels.txt: Inclusions, Patches, Scratches."""

    def __init__(self, root: Path | str, split: Split = "test", *, min_instance_area: int = 1) -> None:
        self.root = Path(root)
        self.split = split
        self.name = f"neu_seg:{split}"
        self.min_instance_area = min_instance_area
        if not self.root.is_dir():
            raise DatasetError(self.root, "NEU-Seg folder does not exist")
        labels = self.root / "labels.txt"
        names = read_class_names(labels)
        if len(names) <= _TOOL_LINES:
            raise DatasetError(labels, f"names no class after its first {_TOOL_LINES} annotation-tool lines")
        self.class_names: Sequence[str] = tuple(n for n in names[_TOOL_LINES:] if n not in _UNUSED)
        self.images_dir = self.root / "img_dir" / split
        self.masks_dir = self.root / "ann_dir" / split
        if not self.images_dir.is_dir():
            raise DatasetError(self.images_dir, f"split {split!r} is missing (no such directory)")
        self.names = sorted(p.name for p in self.images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.names:
            raise DatasetError(self.images_dir, "split holds no images")

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> Sample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        image_path = self.images_dir / self.names[index]
        mask_path = self.masks_dir / Path(self.names[index]).with_suffix(".png").name
        image = read_image(image_path)
        label = read_mask(mask_path)
        check_mask_size(label, image, mask_path, image_path)
        top = int(label.max())
        if top > len(self.class_names):
            raise DatasetError(
                mask_path, f"label value {top} but the reader knows {len(self.class_names)} classes "
                f"({', '.join(self.class_names)}; labels.txt's {', '.join(_UNUSED)} is not one)",
            )
        pairs = [(v, v - 1) for v in range(1, top + 1)]
        masks, classes = instances_from_label(label, pairs, self.min_instance_area)
        return Sample(image=image, masks=masks, classes=classes, source=str(image_path))
