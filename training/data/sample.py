"""One labelled image, as every dataset reader returns it.

Readers (synthetic, generic folder, magnetic tile, NEU-Seg, MVTec, COCO, YOLO-seg) all yield ``Sample``; crop and
prompt sampling, augmentation, the teacher cache and evaluation consume nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np


@dataclass(frozen=True)
class Sample:
    """An image and its defect instances.

    image     HxWx3 uint8, BGR (OpenCV's order; mono sources are replicated to 3 channels)
    masks     NxHxW bool, one mask per defect instance (N may be 0: a defect-free image)
    classes   N int64, index into the dataset's ``class_names``
    source    where it came from (a path, or "synthetic:<seed>"), for reports and errors
    sizes     N float64 or None: each instance's nominal size in pixels where the source knows it (the
              synthetic generator's scratch width, pinhole diameter, dent radius), for recall by size
    """

    image: np.ndarray
    masks: np.ndarray
    classes: np.ndarray
    source: str
    sizes: np.ndarray | None = None

    def __post_init__(self) -> None:
        h, w = self.image.shape[:2]
        if self.image.dtype != np.uint8 or self.image.ndim != 3 or self.image.shape[2] != 3:
            raise ValueError(f"{self.source}: image must be HxWx3 uint8, got {self.image.dtype} {self.image.shape}")
        if self.masks.ndim != 3 or self.masks.shape[1:] != (h, w):
            raise ValueError(f"{self.source}: masks {self.masks.shape} do not match image size {h}x{w}")
        if self.classes.shape != (self.masks.shape[0],):
            raise ValueError(f"{self.source}: {self.classes.shape[0]} classes for {self.masks.shape[0]} masks")
        if self.sizes is not None and self.sizes.shape != self.classes.shape:
            raise ValueError(f"{self.source}: {self.sizes.shape[0]} sizes for {self.classes.shape[0]} instances")


class SampleDataset(Protocol):
    """A finite, indexable set of samples with named classes."""

    class_names: Sequence[str]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Sample: ...


IGNORE_LABEL = 255  # label-map value of pixels that count in no loss and no metric (padding)


class Instances(Protocol):
    """What ``label_map`` reads: a Sample, or a rendered engines.synthetic.SyntheticFrame."""

    @property
    def image(self) -> np.ndarray: ...
    @property
    def masks(self) -> np.ndarray: ...
    @property
    def classes(self) -> np.ndarray: ...


def label_map(sample: Instances) -> np.ndarray:
    """uint8 HxW semantic labels of a sample: 0 background, c+1 where instance class c lies.

    Where instances overlap, the later one wins (readers list them in class order; a label image
    read back this way gives the label image it was read from).
    """
    h, w = sample.image.shape[:2]
    labels = np.zeros((h, w), np.uint8)
    for mask, class_id in zip(sample.masks, sample.classes, strict=True):
        labels[mask] = int(class_id) + 1
    return labels


def interior_point(mask: np.ndarray) -> tuple[float, float]:
    """(x, y) pixel centre of the pixel deepest inside ``mask`` (the distance transform's maximum).

    mask: bool HxW with at least one pixel set. Ties go to the first pixel in row-major order.
    """
    x, y, w, h = cv2.boundingRect(np.ascontiguousarray(mask).view(np.uint8))
    if w == 0:
        raise ValueError("interior_point of an empty mask")
    roi = np.zeros((h + 2, w + 2), dtype=np.uint8)  # one pixel of background all round
    roi[1:-1, 1:-1] = mask[y : y + h, x : x + w]
    distance = cv2.distanceTransform(roi, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    iy, ix = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return float(x + ix - 1) + 0.5, float(y + iy - 1) + 0.5
