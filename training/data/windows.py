"""Samples -> training windows at their native scale: what the segment pass sees at run time.

The runtime never resizes a window (engines/windows.py: one window pixel is one frame pixel), so
neither does training: a sample (a real crop from the datasets, or a 1:1 window cut from a 4 MP
synthetic frame, training/data/synthetic_frames.py) gives a ``window`` x ``window`` crop of itself.

Training (``train=True``): a crop centred on a random defect pixel (share ``positive_fraction`` of
the samples that have defects; the centre jittered by up to a quarter window) or anywhere,
offsets on a 16-pixel grid so cached teacher embeddings (stride 16) crop with it; a sample
smaller than the window is padded (the image's edge repeated, labels IGNORE_LABEL); then the
photometric jitter of training.data.augment and one of the 8 flips and quarter turns. Evaluation
(``train=False``): the whole sample, padded to multiples of 16, as ``inspection.mode: whole``
runs it. Images are normalised exactly as engines.preprocess.WindowCutter does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from engines.bundle import SegmentSpec
from engines.contract import PIXEL_MEAN, PIXEL_STD, SIDE_MULTIPLE
from engines.preprocess import WindowCutter
from engines.windows import Window
from training.data.augment import AugmentConfig, photometric
from training.data.errors import DatasetError
from training.data.sample import IGNORE_LABEL, Sample, SampleDataset, label_map

_GRID = 16  # crop offsets are multiples of this (the stride of cached teacher embeddings)


def segment_spec(window: int = 128) -> SegmentSpec:
    """The manifest ``segment`` section training normalises with (training.export.onnx writes the same)."""
    return SegmentSpec(arch="training", window=window, max_windows=1, mean=PIXEL_MEAN, std=PIXEL_STD, parameters=0)


@dataclass(frozen=True)
class Crop:
    """Where a training window lies in its sample, and how it was turned: pixel offsets, size, flip, turns."""

    x: int
    y: int
    size: int
    flip: bool = False
    turns: int = 0  # quarter turns counter-clockwise (np.rot90), after the flip


@dataclass(frozen=True)
class WindowExample:
    """image float32 3xHxW normalised RGB; label int64 HxW (0 background, c+1, IGNORE_LABEL); crop; source."""

    image: np.ndarray
    label: np.ndarray
    source: str
    index: int
    crop: Crop


def orient(array: np.ndarray, crop: Crop) -> np.ndarray:
    """Apply a crop's flip and quarter turns to the last two axes of ``array`` (image CxHxW, label HxW, ...)."""
    if crop.flip:
        array = np.flip(array, axis=-1)
    if crop.turns:
        array = np.rot90(array, crop.turns, axes=(-2, -1))
    return np.ascontiguousarray(array)


def orient_tensor(tensor: torch.Tensor, crop: Crop) -> torch.Tensor:
    """``orient`` for a torch tensor (..., H, W)."""
    if crop.flip:
        tensor = torch.flip(tensor, dims=(-1,))
    if crop.turns:
        tensor = torch.rot90(tensor, crop.turns, dims=(-2, -1))
    return tensor.contiguous()


def padded_size(height: int, width: int) -> tuple[int, int]:
    """A sample's size padded up to multiples of 16 (the whole-window evaluation size)."""
    return math.ceil(height / SIDE_MULTIPLE) * SIDE_MULTIPLE, math.ceil(width / SIDE_MULTIPLE) * SIDE_MULTIPLE


def pad_to(image: np.ndarray, label: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 HxWx3 image and HxW labels padded (bottom, right) to ``height`` x ``width``; labels with IGNORE_LABEL.

    The image is padded by repeating its edge, as the find pass pads: the normalised value does not
    matter to the loss (its labels are ignored), and a repeated edge adds no artificial one.
    """
    h, w = label.shape
    if (h, w) == (height, width):
        return image, label
    pad = ((0, height - h), (0, width - w))
    return np.pad(image, (*pad, (0, 0)), mode="edge"), np.pad(label, pad, constant_values=IGNORE_LABEL)


def choose_crop(
    label: np.ndarray, window: int, rng: np.random.Generator, positive_fraction: float, augment: bool
) -> Crop:
    """A training crop of ``window`` px in a label map of at least that size (see the module docstring)."""
    h, w = label.shape
    defect = (label > 0) & (label != IGNORE_LABEL)
    if defect.any() and rng.random() < positive_fraction:
        ys, xs = np.nonzero(defect)
        pick = int(rng.integers(ys.size))
        jitter = rng.uniform(-window / 4, window / 4, size=2)
        cx, cy = xs[pick] + jitter[0], ys[pick] + jitter[1]
    else:
        cx, cy = rng.uniform(window / 2, w - window / 2 + 1e-6), rng.uniform(window / 2, h - window / 2 + 1e-6)

    def offset(centre: float, length: int) -> int:
        last = (length - window) // _GRID * _GRID  # the last grid offset that keeps the crop inside
        return int(min(max(0, round((centre - window / 2) / _GRID) * _GRID), last))

    x, y = offset(cx, w), offset(cy, h)
    if not augment:
        return Crop(x, y, window)
    return Crop(x, y, window, flip=bool(rng.random() < 0.5), turns=int(rng.integers(4)))


class WindowDataset(torch.utils.data.Dataset[WindowExample]):
    """A SampleDataset seen as windows (module docstring): for a DataLoader with ``collate_fn=collate_windows``.

    Example ``i`` of epoch ``e`` draws its crop and augmentation from ``default_rng([seed, e, i])``:
    the same on every worker count and rank, different every epoch (call ``set_epoch``).
    """

    def __init__(
        self,
        samples: SampleDataset,
        *,
        window: int = 128,
        train: bool = True,
        augment: bool | AugmentConfig = True,
        positive_fraction: float = 0.7,
        seed: int = 0,
        num_classes: int | None = None,
    ) -> None:
        if window <= 0 or window % SIDE_MULTIPLE:
            raise ValueError(f"window must be a positive multiple of {SIDE_MULTIPLE}, got {window}")
        self.samples = samples
        self.window = window
        self.train = train
        self.augment: AugmentConfig | None = None
        if train and augment:
            self.augment = augment if isinstance(augment, AugmentConfig) else AugmentConfig(crop_prob=0.0)
        self.positive_fraction = positive_fraction
        self.seed = seed
        self.epoch = 0
        self.num_classes = len(samples.class_names) if num_classes is None else num_classes
        self._cutter = WindowCutter(segment_spec(window))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> WindowExample:
        sample = self.samples[index]
        labels = label_map(sample)
        if sample.classes.size and int(sample.classes.max()) >= self.num_classes:
            raise DatasetError(sample.source, f"class index {int(sample.classes.max())} but the model has "
                                              f"{self.num_classes} classes")
        if not self.train:
            height, width = padded_size(*labels.shape)
            image, labels = pad_to(sample.image, labels, height, width)
            return self._example(image, labels, sample, index, Crop(0, 0, 0))
        rng = np.random.default_rng([self.seed, self.epoch, index])
        height, width = max(self.window, labels.shape[0]), max(self.window, labels.shape[1])
        image, labels = pad_to(sample.image, labels, height, width)
        crop = choose_crop(labels, self.window, rng, self.positive_fraction, self.augment is not None)
        image = image[crop.y : crop.y + crop.size, crop.x : crop.x + crop.size]
        labels = labels[crop.y : crop.y + crop.size, crop.x : crop.x + crop.size]
        if self.augment is not None:
            image = photometric(np.ascontiguousarray(image), rng, self.augment)
        return self._example(image, labels, sample, index, crop)

    def _example(self, image: np.ndarray, labels: np.ndarray, sample: Sample, index: int, crop: Crop) -> WindowExample:
        h, w = labels.shape
        tensor = self._cutter(np.ascontiguousarray(image), [Window(0, 0, w, h)])[0]
        return WindowExample(
            image=orient(tensor, crop), label=orient(labels, crop).astype(np.int64), source=sample.source,
            index=index, crop=crop,
        )


def collate_windows(examples: Sequence[WindowExample]) -> dict[str, torch.Tensor]:
    """image Bx3xHxW float32, label BxHxW int64, index B int64 (examples of one size)."""
    if not examples:
        raise ValueError("collate_windows needs at least one example")
    return {
        "image": torch.from_numpy(np.stack([e.image for e in examples])),
        "label": torch.from_numpy(np.stack([e.label for e in examples])),
        "index": torch.tensor([e.index for e in examples], dtype=torch.int64),
    }
