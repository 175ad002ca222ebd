"""What one inspection produces: the verdict and each defect's geometry, in frame pixels."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np


class Verdict(enum.IntEnum):
    """The part's verdict. The integer values are what a PLC reads; NO_FRAME fails safe (reject)."""

    OK = 1
    NG = 2
    UNCERTAIN = 3
    NO_FRAME = 4


@dataclass(frozen=True)
class Defect:
    """One defect found in a frame. Coordinates are frame pixels; ``mask`` covers ``bbox`` exactly."""

    class_id: int
    class_name: str
    score: float  # saliency peak probability at the defect's prompt point
    predicted_iou: float  # the mask decoder's own estimate of its mask quality
    area_px: int
    bbox: tuple[int, int, int, int]  # x, y, width, height
    centroid: tuple[float, float]  # x, y
    point: tuple[float, float]  # the prompt point, x, y
    mask: np.ndarray = field(repr=False, compare=False)  # bool, bbox height x bbox width

    def polygon(self, epsilon_px: float = 1.5) -> list[list[int]]:
        """Outer contour of the largest blob, simplified, as [[x, y], ...] in frame pixels."""
        contours, _ = cv2.findContours(self.mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        if not contours:
            return []
        largest = max(contours, key=cv2.contourArea)
        approx = cv2.approxPolyDP(largest, epsilon_px, True).reshape(-1, 2)
        x0, y0 = self.bbox[:2]
        return [[int(x) + x0, int(y) + y0] for x, y in approx]

    def to_dict(self, *, with_polygon: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "class_id": self.class_id,
            "class": self.class_name,
            "score": round(self.score, 4),
            "predicted_iou": round(self.predicted_iou, 4),
            "area_px": self.area_px,
            "bbox": list(self.bbox),
            "centroid": [round(self.centroid[0], 1), round(self.centroid[1], 1)],
            "point": [round(self.point[0], 1), round(self.point[1], 1)],
        }
        if with_polygon:
            out["polygon"] = self.polygon()
        return out


@dataclass(frozen=True)
class InspectionResult:
    """The verdict for one frame, its defects (highest score first) and stage timings in seconds."""

    frame_width: int
    frame_height: int
    verdict: Verdict
    defects: tuple[Defect, ...]
    max_peak_score: float  # highest peak of a region of defect size, kept or not: how close an OK frame came to NG
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self, *, with_polygons: bool = True) -> dict[str, Any]:
        return {
            "verdict": self.verdict.name,
            "frame": {"width": self.frame_width, "height": self.frame_height},
            "defect_count": len(self.defects),
            "max_peak_score": round(self.max_peak_score, 4),
            "defects": [d.to_dict(with_polygon=with_polygons) for d in self.defects],
            "timings_ms": {k: round(v * 1000.0, 2) for k, v in self.timings.items()},
        }
