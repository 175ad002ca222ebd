"""Mask and defect metrics on regions: a mask stored only over its bounding box, in frame pixels.

Prompted mode scores one predicted mask per ground-truth instance (IoU, dice). Automatic mode
matches predicted defects to ground-truth instances, class-agnostic, greedily by descending
score, at IoU >= a threshold (0.5): a defect is found or not whatever its class; the class is
scored apart (``class_accuracy`` over matched pairs, per-class precision by predicted class and
recall by ground-truth class). Image level: a frame is NG when it has a ground-truth instance,
predicted NG when the verdict is not OK (UNCERTAIN is rejected on the line, so it counts as NG).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np


@dataclass(frozen=True)
class Region:
    """A binary mask stored over its bounding box: ``mask`` (bool h x w) placed at (x, y)."""

    x: int
    y: int
    mask: np.ndarray

    @property
    def area(self) -> int:
        return int(np.count_nonzero(self.mask))

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """x, y, width, height."""
        return self.x, self.y, int(self.mask.shape[1]), int(self.mask.shape[0])

    @classmethod
    def from_mask(cls, mask: np.ndarray) -> Region:
        """A full-size bool mask -> its region (an empty mask gives an empty 0x0 region)."""
        x, y, w, h = cv2.boundingRect(np.ascontiguousarray(mask).view(np.uint8))
        return cls(int(x), int(y), np.ascontiguousarray(mask[y : y + h, x : x + w]))

    @classmethod
    def empty(cls) -> Region:
        return cls(0, 0, np.zeros((0, 0), dtype=bool))


def intersection(a: Region, b: Region) -> int:
    """Pixels set in both regions."""
    ax, ay, aw, ah = a.bbox
    bx, by, bw, bh = b.bbox
    x0, y0 = max(ax, bx), max(ay, by)
    x1, y1 = min(ax + aw, bx + bw), min(ay + ah, by + bh)
    if x1 <= x0 or y1 <= y0:
        return 0
    pa = a.mask[y0 - ay : y1 - ay, x0 - ax : x1 - ax]
    pb = b.mask[y0 - by : y1 - by, x0 - bx : x1 - bx]
    return int(np.count_nonzero(pa & pb))


def iou(a: Region, b: Region) -> float:
    """Intersection over union; two empty masks agree perfectly (1.0)."""
    inter = intersection(a, b)
    union = a.area + b.area - inter
    return 1.0 if union == 0 else inter / union


def dice(a: Region, b: Region) -> float:
    """2|A and B| / (|A| + |B|); two empty masks agree perfectly (1.0)."""
    total = a.area + b.area
    return 1.0 if total == 0 else 2.0 * intersection(a, b) / total


def match(
    predictions: Sequence[Region], scores: Sequence[float], truths: Sequence[Region], threshold: float = 0.5
) -> list[tuple[int, int, float]]:
    """Greedy one-to-one matching: predictions by descending score take their best unmatched truth.

    Returns (prediction index, truth index, IoU) for every pair with IoU >= ``threshold``.
    """
    if not predictions or not truths:
        return []
    table = np.array([[iou(p, t) for t in truths] for p in predictions], dtype=np.float64)
    taken = np.zeros(len(truths), dtype=bool)
    pairs: list[tuple[int, int, float]] = []
    for p in np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable"):
        candidates = np.where(taken, -1.0, table[p])
        t = int(np.argmax(candidates))
        if candidates[t] >= threshold:
            taken[t] = True
            pairs.append((int(p), t, float(candidates[t])))
    return pairs


def _ratio(num: float, den: float) -> float | None:
    return None if den == 0 else num / den


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


@dataclass
class PromptedScores:
    """Per ground-truth instance IoU and dice of the mask from one point prompt, by class name."""

    ious: dict[str, list[float]] = field(default_factory=dict)
    dices: dict[str, list[float]] = field(default_factory=dict)

    def add(self, class_name: str, prediction: Region, truth: Region) -> None:
        self.ious.setdefault(class_name, []).append(iou(prediction, truth))
        self.dices.setdefault(class_name, []).append(dice(prediction, truth))

    def summary(self, class_names: Sequence[str]) -> dict[str, Any]:
        """miou and mdice: means over classes with instances of each class's mean over instances."""
        names = list(dict.fromkeys([*class_names, *self.ious]))
        per_class = {
            name: {"iou": _mean(self.ious.get(name, [])), "dice": _mean(self.dices.get(name, [])),
                   "n": len(self.ious.get(name, []))}
            for name in names
        }
        present = [(c["iou"], c["dice"]) for c in per_class.values() if c["n"]]
        every_iou = [v for values in self.ious.values() for v in values]
        return {
            "miou": _mean([float(i) for i, _ in present if i is not None]),
            "mdice": _mean([float(d) for _, d in present if d is not None]),
            "instance_miou": _mean(every_iou),
            "n": len(every_iou),
            "per_class": per_class,
        }


@dataclass
class DetectionScores:
    """Defect-level matches and image-level verdicts, accumulated image by image."""

    threshold: float = 0.5
    tp: int = 0
    fp: int = 0
    fn: int = 0
    class_correct: int = 0
    matched_ious: list[float] = field(default_factory=list)
    gt_count: dict[str, int] = field(default_factory=dict)
    gt_found: dict[str, int] = field(default_factory=dict)
    pred_count: dict[str, int] = field(default_factory=dict)
    pred_matched: dict[str, int] = field(default_factory=dict)
    images: dict[str, int] = field(
        default_factory=lambda: {"ng_as_ng": 0, "ok_as_ok": 0, "ok_as_ng": 0, "ng_as_ok": 0, "uncertain": 0}
    )

    def add_image(
        self,
        predictions: Sequence[Region],
        pred_classes: Sequence[str],
        scores: Sequence[float],
        truths: Sequence[Region],
        truth_classes: Sequence[str],
        *,
        verdict_ng: bool,
        uncertain: bool = False,
    ) -> list[tuple[int, int, float]]:
        """One image: its predicted defects and ground-truth instances. Returns the matches."""
        pairs = match(predictions, scores, truths, self.threshold)
        self.tp += len(pairs)
        self.fp += len(predictions) - len(pairs)
        self.fn += len(truths) - len(pairs)
        for name in truth_classes:
            self.gt_count[name] = self.gt_count.get(name, 0) + 1
        for name in pred_classes:
            self.pred_count[name] = self.pred_count.get(name, 0) + 1
        for p, t, value in pairs:
            self.matched_ious.append(value)
            self.gt_found[truth_classes[t]] = self.gt_found.get(truth_classes[t], 0) + 1
            self.pred_matched[pred_classes[p]] = self.pred_matched.get(pred_classes[p], 0) + 1
            self.class_correct += int(pred_classes[p] == truth_classes[t])
        truth_ng = len(truths) > 0
        key = f"{'ng' if truth_ng else 'ok'}_as_{'ng' if verdict_ng else 'ok'}"
        self.images[key] += 1
        self.images["uncertain"] += int(uncertain)
        return pairs

    def summary(self, class_names: Sequence[str]) -> dict[str, Any]:
        precision = _ratio(self.tp, self.tp + self.fp)
        recall = _ratio(self.tp, self.tp + self.fn)
        f1 = _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)
        n_images = sum(v for k, v in self.images.items() if k != "uncertain")
        correct = self.images["ng_as_ng"] + self.images["ok_as_ok"]
        names = list(dict.fromkeys([*class_names, *self.gt_count, *self.pred_count]))
        per_class = {
            name: {
                "precision": _ratio(self.pred_matched.get(name, 0), self.pred_count.get(name, 0)),
                "recall": _ratio(self.gt_found.get(name, 0), self.gt_count.get(name, 0)),
                "n_gt": self.gt_count.get(name, 0),
                "n_pred": self.pred_count.get(name, 0),
            }
            for name in names
        }
        return {
            "iou_threshold": self.threshold,
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "matched_miou": _mean(self.matched_ious),
            "class_accuracy": _ratio(self.class_correct, self.tp),
            "image_accuracy": _ratio(correct, n_images),
            "images": dict(self.images),
            "per_class": per_class,
        }


def format_cell(value: Any, digits: int = 3) -> str:
    """A table cell: "-" for None, a float to ``digits`` decimals, anything else as str()."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)
