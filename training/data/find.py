"""The finder's examples: 4 MP synthetic frames reduced exactly as the runtime reduces them, with cell targets.

Each frame of a rendered set (training/data/synthetic_frames.py) holds its find input
(engines.find.reduce_grey: grey block mean, minimum, maximum at 1/r scale) and its candidate
cells (1 where a defect pixel lies in the cell). The input is normalised and edge-padded to
multiples of 16 by engines.find.FindPreprocessor, the runtime's own code. Training takes square
crops (``crop`` find pixels, offsets on a 16-pixel grid) with one of the 8 flips and quarter
turns; evaluation takes the whole frame.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from engines.bundle import FindSpec
from engines.contract import CELL_STRIDE, FIND_MEAN, FIND_STD, SIDE_MULTIPLE
from engines.find import FindGeometry, FindPreprocessor
from engines.synthetic import FRAME_HEIGHT, FRAME_WIDTH
from training.data.synthetic_frames import FrameSet


@dataclass(frozen=True)
class FindExample:
    """image float32 3xhxw (normalised find input); cells float32 1xh/8xw/8 (0/1 targets, padding 0)."""

    image: np.ndarray
    cells: np.ndarray
    index: int


class FindDataset(torch.utils.data.Dataset[FindExample]):
    """The frames of one or more rendered sets, as finder examples."""

    class_names: Sequence[str] = ("defect",)

    def __init__(self, sets: Sequence[FrameSet], *, crop: int | None, train: bool, seed: int = 0) -> None:
        if crop is not None and (crop <= 0 or crop % SIDE_MULTIPLE):
            raise ValueError(f"crop must be a positive multiple of {SIDE_MULTIPLE}, got {crop}")
        self.sets = list(sets)
        self.crop = crop if train else None
        self.train = train
        self.seed = seed
        self.epoch = 0
        self._ends = np.cumsum([s.params.frames for s in self.sets]).tolist()
        reductions = {s.params.reduction for s in self.sets}
        if len(reductions) != 1:
            raise ValueError(f"frame sets of one finder share one reduction, got {sorted(reductions)}")
        self.reduction = reductions.pop()
        spec = FindSpec(arch="training", reduction=self.reduction, mean=FIND_MEAN, std=FIND_STD, parameters=0)
        self._pre = FindPreprocessor(spec)
        self._geometry = FindGeometry(FRAME_WIDTH, FRAME_HEIGHT, self.reduction)
        self.name = " + ".join(f"synthetic_find(frames={s.params.frames},seed={s.params.seed})" for s in self.sets)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return int(self._ends[-1]) if self._ends else 0

    def __getitem__(self, index: int) -> FindExample:
        member = int(np.searchsorted(self._ends, index, side="right"))
        local = index - (self._ends[member - 1] if member else 0)
        frames = self.sets[member]
        reduced = np.asarray(frames.array("find")[local])
        cells = np.asarray(frames.array("cells")[local], dtype=np.float32)
        image = self._pre.normalise(reduced, self._geometry)[0]  # 3 x h x w, padded to multiples of 16
        h, w = image.shape[1:]
        target = np.zeros((1, h // CELL_STRIDE, w // CELL_STRIDE), np.float32)
        rows, cols = min(cells.shape[0], target.shape[1]), min(cells.shape[1], target.shape[2])
        target[0, :rows, :cols] = cells[:rows, :cols]
        if self.crop is None:
            return FindExample(image=image, cells=target, index=index)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        size = min(self.crop, h, w)
        y = int(rng.integers(0, (h - size) // SIDE_MULTIPLE + 1)) * SIDE_MULTIPLE
        x = int(rng.integers(0, (w - size) // SIDE_MULTIPLE + 1)) * SIDE_MULTIPLE
        image = image[:, y : y + size, x : x + size]
        c = CELL_STRIDE
        target = target[:, y // c : (y + size) // c, x // c : (x + size) // c]
        if rng.random() < 0.5:
            image, target = image[:, :, ::-1], target[:, :, ::-1]
        turns = int(rng.integers(4))
        if turns:
            image, target = np.rot90(image, turns, axes=(1, 2)), np.rot90(target, turns, axes=(1, 2))
        return FindExample(image=np.ascontiguousarray(image), cells=np.ascontiguousarray(target), index=index)


def collate_find(examples: Sequence[FindExample]) -> dict[str, torch.Tensor]:
    """image Bx3xhxw, cells Bx1xh/8xw/8 (examples of one size)."""
    return {
        "image": torch.from_numpy(np.stack([e.image for e in examples])),
        "cells": torch.from_numpy(np.stack([e.cells for e in examples])),
        "index": torch.tensor([e.index for e in examples], dtype=torch.int64),
    }
