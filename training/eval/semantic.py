"""Semantic segmentation metrics as the field computes them (mmsegmentation, the NEU-Seg papers).

Dataset-level: one confusion matrix over every pixel of every image, then per class
IoU = TP / (TP + FP + FN) (sum of intersections over sum of unions, not a mean of per-image
IoUs), Acc = TP / (TP + FN), and their means. A class that appears neither in the ground truth
nor in the predictions has no IoU (NaN) and is left out of the means, as mmsegmentation does.
Two means are reported: over the defect classes only (``miou_fg``, the figure NEU-Seg papers
quote as mIoU of the defect classes) and over background and defects (``miou``, the mIoU of
papers that count background, e.g. on magnetic tile). Pixels labelled IGNORE_LABEL count nowhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from training.data.sample import IGNORE_LABEL


class ConfusionMatrix:
    """(C+1) x (C+1) pixel counts: rows ground truth, columns prediction; label 0 background."""

    def __init__(self, num_classes: int) -> None:
        self.size = num_classes + 1
        self.counts = np.zeros((self.size, self.size), dtype=np.int64)

    def add(self, truth: np.ndarray, predicted: np.ndarray) -> None:
        """truth, predicted: integer label maps of one shape (truth may hold IGNORE_LABEL)."""
        if truth.shape != predicted.shape:
            raise ValueError(f"label maps differ in shape: truth {truth.shape}, prediction {predicted.shape}")
        valid = truth != IGNORE_LABEL
        t = truth[valid].astype(np.int64)
        p = predicted[valid].astype(np.int64)
        if t.size and (t.max() >= self.size or p.max() >= self.size):
            raise ValueError(f"a label is out of range for {self.size - 1} classes + background")
        self.counts += np.bincount(t * self.size + p, minlength=self.size * self.size).reshape(self.size, self.size)

    def merge(self, other: ConfusionMatrix) -> None:
        self.counts += other.counts

    def iou(self) -> np.ndarray:
        """Per class IoU (background first); NaN where the class is in neither truth nor prediction."""
        tp = np.diag(self.counts).astype(np.float64)
        union = self.counts.sum(0) + self.counts.sum(1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, tp / union, np.nan)

    def accuracy(self) -> np.ndarray:
        """Per class pixel accuracy (recall of the class's pixels); NaN where the class is not in the truth."""
        tp = np.diag(self.counts).astype(np.float64)
        support = self.counts.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(support > 0, tp / support, np.nan)

    def summary(self, class_names: Sequence[str]) -> dict[str, Any]:
        """JSON-ready: per-class IoU and Acc (background first), mIoU with and without background, aAcc."""
        iou, acc = self.iou(), self.accuracy()
        names = ["background", *class_names]
        total = self.counts.sum()
        return {
            "miou_fg": _nanmean(iou[1:]),
            "miou": _nanmean(iou),
            "macc_fg": _nanmean(acc[1:]),
            "aacc": float(np.trace(self.counts) / total) if total else None,
            "iou": {name: _value(v) for name, v in zip(names, iou, strict=True)},
            "acc": {name: _value(v) for name, v in zip(names, acc, strict=True)},
            "pixels": int(total),
        }


def _value(v: float) -> float | None:
    return None if np.isnan(v) else round(float(v), 6)


def _nanmean(values: np.ndarray) -> float | None:
    finite = values[~np.isnan(values)]
    return round(float(finite.mean()), 6) if finite.size else None
