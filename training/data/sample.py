"""One labelled image, as every dataset reader returns it.

Readers (synthetic, generic folder, magnetic tile, NEU-Seg) all yield ``Sample``; crop and
prompt sampling, augmentation, the teacher cache and evaluation consume nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class Sample:
    """An image and its defect instances.

    image     HxWx3 uint8, BGR (OpenCV's order; mono sources are replicated to 3 channels)
    masks     NxHxW bool, one mask per defect instance (N may be 0: a defect-free image)
    classes   N int64, index into the dataset's ``class_names``
    source    where it came from (a path, or "synthetic:<seed>"), for reports and errors
    """

    image: np.ndarray
    masks: np.ndarray
    classes: np.ndarray
    source: str

    def __post_init__(self) -> None:
        h, w = self.image.shape[:2]
        if self.image.dtype != np.uint8 or self.image.ndim != 3 or self.image.shape[2] != 3:
            raise ValueError(f"{self.source}: image must be HxWx3 uint8, got {self.image.dtype} {self.image.shape}")
        if self.masks.ndim != 3 or self.masks.shape[1:] != (h, w):
            raise ValueError(f"{self.source}: masks {self.masks.shape} do not match image size {h}x{w}")
        if self.classes.shape != (self.masks.shape[0],):
            raise ValueError(f"{self.source}: {self.classes.shape[0]} classes for {self.masks.shape[0]} masks")


class SampleDataset(Protocol):
    """A finite, indexable set of samples with named classes."""

    class_names: Sequence[str]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Sample: ...
