"""Defect metrics on regions (a mask stored only over its bounding box, in frame pixels), by size.

Automatic mode matches predicted defects to ground-truth instances, class-agnostic, greedily by
descending score, at IoU >= a threshold (0.5): a defect is found or not whatever its class; the
class is scored apart (``class_accuracy`` over matched pairs, per-class precision by predicted
class and recall by ground-truth class). Every ground-truth instance also keeps its best IoU with
any prediction (the per-instance IoU) and its size, so recall can be read by size: the width of a
thin defect (a scratch: 2 x area / perimeter, or the generator's nominal width), the equivalent
diameter of any other (sqrt(4 x area / pi), or the nominal diameter).

Image level: a frame is defective when it has a ground-truth instance. On good frames the
false-NG rate counts NG verdicts, the false-reject rate NG or UNCERTAIN (a line rejects both); on
defective frames the miss rate counts OK verdicts.
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
        default_factory=lambda: {"ng_as_ng": 0, "ok_as_ok": 0, "ok_as_ng": 0, "ng_as_ok": 0, "uncertain": 0,
                                 "ok_as_uncertain": 0}
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
        self.images["ok_as_uncertain"] += int(uncertain and not truth_ng)
        return pairs

    def summary(self, class_names: Sequence[str]) -> dict[str, Any]:
        precision = _ratio(self.tp, self.tp + self.fp)
        recall = _ratio(self.tp, self.tp + self.fn)
        f1 = _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)
        im = self.images
        n_images = im["ng_as_ng"] + im["ok_as_ok"] + im["ok_as_ng"] + im["ng_as_ok"]
        correct = im["ng_as_ng"] + im["ok_as_ok"]
        good = im["ok_as_ok"] + im["ok_as_ng"]
        defective = im["ng_as_ng"] + im["ng_as_ok"]
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
            "good_images": good,
            "defective_images": defective,
            # verdict_ng counts NG and UNCERTAIN alike (both reject the part): ok_as_ng holds both
            "false_reject_rate": _ratio(im["ok_as_ng"], good),
            "false_ng_rate": _ratio(im["ok_as_ng"] - im["ok_as_uncertain"], good),
            "miss_rate": _ratio(im["ng_as_ok"], defective),
            "images": dict(self.images),
            "per_class": per_class,
        }


# Size buckets: lower edges in pixels; a bucket holds sizes from its edge up to the next one.
WIDTH_EDGES: tuple[float, ...] = (0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0)
DIAMETER_EDGES: tuple[float, ...] = (0.0, 2.0, 3.0, 5.0, 8.0, 12.0, 20.0, 50.0)
THIN_ELONGATION = 4.0  # length / width at which an instance is thin (measured by its width)
RELIABLE_RECALL = 0.9


def instance_size(mask: np.ndarray, nominal: float | None = None) -> tuple[str, float]:
    """("width" or "diameter", size in px) of a ground-truth instance (bool mask over its box or the frame)."""
    area = float(np.count_nonzero(mask))
    contours, _ = cv2.findContours(np.ascontiguousarray(mask).astype(np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_NONE)
    perimeter = max(sum(cv2.arcLength(c, True) for c in contours), 1.0)
    width = max(2.0 * area / perimeter, min(area, 1.0))
    length = perimeter / 2.0
    if length >= THIN_ELONGATION * width:
        return "width", float(nominal) if nominal is not None else width
    return "diameter", float(nominal) if nominal is not None else float(np.sqrt(4.0 * area / np.pi))


def _bucket(value: float, edges: Sequence[float]) -> int:
    return max(i for i, edge in enumerate(edges) if value >= edge)


def _label(i: int, edges: Sequence[float]) -> str:
    return f"{edges[i]:g}-{edges[i + 1]:g} px" if i + 1 < len(edges) else f">= {edges[i]:g} px"


@dataclass
class SizeScores:
    """Per ground-truth instance: class, size kind and value, found (matched at the IoU threshold), best IoU."""

    rows: list[tuple[str, str, float, bool, float]] = field(default_factory=list)

    def add(self, class_name: str, kind: str, size: float, found: bool, best_iou: float) -> None:
        self.rows.append((class_name, kind, size, found, best_iou))

    def instance_iou(self, class_name: str | None = None, *, min_width: float = 0.0, min_diameter: float = 0.0,
                     ) -> dict[str, Any]:
        """Mean best IoU and recall of the instances of ``class_name`` (all when None) at or above a size."""
        picked = [r for r in self.rows if (class_name is None or r[0] == class_name)
                  and r[2] >= (min_width if r[1] == "width" else min_diameter)]
        return {
            "n": len(picked),
            "recall": _ratio(sum(r[3] for r in picked), len(picked)),
            "instance_iou": _mean([r[4] for r in picked]),
        }

    def summary(self, class_names: Sequence[str], pixel_size_um: float | None = None) -> dict[str, Any]:
        """Per class: recall and mean best IoU by size bucket, and the size from which recall stays >= 0.9."""
        out: dict[str, Any] = {}
        for name in dict.fromkeys([*class_names, *(r[0] for r in self.rows)]):
            mine = [r for r in self.rows if r[0] == name]
            per_kind: dict[str, Any] = {}
            for kind, edges in (("width", WIDTH_EDGES), ("diameter", DIAMETER_EDGES)):
                rows = [r for r in mine if r[1] == kind]
                if not rows:
                    continue
                buckets = []
                for i in range(len(edges)):
                    inside = [r for r in rows if _bucket(r[2], edges) == i]
                    if not inside:
                        continue
                    entry: dict[str, Any] = {
                        "bucket": _label(i, edges), "from_px": edges[i], "n": len(inside),
                        "recall": _ratio(sum(r[3] for r in inside), len(inside)),
                        "instance_iou": _mean([r[4] for r in inside]),
                    }
                    if pixel_size_um is not None:
                        entry["from_um"] = round(edges[i] * pixel_size_um, 2)
                    buckets.append(entry)
                reliable = None
                for j in range(len(buckets)):
                    tail = buckets[j:]
                    found = sum(round((b["recall"] or 0.0) * b["n"]) for b in tail)
                    if sum(b["n"] for b in tail) and found / sum(b["n"] for b in tail) >= RELIABLE_RECALL and all(
                        (b["recall"] or 0.0) >= RELIABLE_RECALL or b["n"] < 5 for b in tail
                    ):
                        reliable = buckets[j]["from_px"]
                        break
                per_kind[kind] = {
                    "buckets": buckets,
                    "found_from_px": reliable,
                    "found_from_um": None if reliable is None or pixel_size_um is None
                    else round(reliable * pixel_size_um, 2),
                }
            out[name] = per_kind
        return out


def format_cell(value: Any, digits: int = 3) -> str:
    """A table cell: "-" for None, a float to ``digits`` decimals, anything else as str()."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)
