"""The offline judge: which mask's boundary runs along the image's edges?

For each mask, its boundary (the pixels on either side of the mask's edge: dilation minus erosion
with a 3x3 cross) is laid over the gradient magnitude of the grey crop (Sobel, 3x3), normalised by
the crop's own gradient distribution (divided by its ``percentile``-th percentile, clipped to 1),
so a faint scratch and a deep dent score on one scale. A mask's score is the mean normalised
gradient along its boundary, in [0, 1]; an empty mask scores 0. The higher score wins; scores
closer than ``tie_margin`` are a tie. The confidence is the score difference.

No model and no network: NumPy and OpenCV on the crop, a few milliseconds a case.
"""

from __future__ import annotations

import cv2
import numpy as np

from training.judge.base import Better, JudgeCase, Verdict

_CROSS = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))


def gradient_magnitude(crop: np.ndarray, percentile: float = 95.0) -> np.ndarray:
    """BGR uint8 h x w x 3 -> float32 h x w in [0, 1]: Sobel magnitude / its percentile (clipped)."""
    grey = cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY).astype(np.float32)
    gx = cv2.Sobel(grey, cv2.CV_32F, 1, 0, ksize=3, borderType=cv2.BORDER_REPLICATE)
    gy = cv2.Sobel(grey, cv2.CV_32F, 0, 1, ksize=3, borderType=cv2.BORDER_REPLICATE)
    magnitude = cv2.magnitude(gx, gy)
    scale = float(np.percentile(magnitude, percentile))
    if scale <= 1e-6:
        return np.zeros_like(magnitude)
    return np.minimum(magnitude / scale, 1.0)


def boundary(mask: np.ndarray) -> np.ndarray:
    """bool h x w: the pixels just inside and just outside the mask's edge (morphological gradient)."""
    m = mask.astype(np.uint8)
    return cv2.morphologyEx(m, cv2.MORPH_GRADIENT, _CROSS, borderType=cv2.BORDER_CONSTANT, borderValue=0) > 0


def boundary_score(magnitude: np.ndarray, mask: np.ndarray) -> float:
    """Mean of ``magnitude`` along the boundary of ``mask``; 0 for an empty mask."""
    edge = boundary(mask)
    if not edge.any():
        return 0.0
    return float(magnitude[edge].mean())


class ContourJudge:
    """Scores both masks' boundaries against the crop's gradients; the better-aligned mask wins."""

    name = "contour"

    def __init__(self, tie_margin: float = 0.05, percentile: float = 95.0) -> None:
        self.tie_margin = tie_margin
        self.percentile = percentile

    def scores(self, case: JudgeCase) -> tuple[float, float]:
        """(student score, teacher score), each in [0, 1]."""
        magnitude = gradient_magnitude(case.crop, self.percentile)
        return boundary_score(magnitude, case.student), boundary_score(magnitude, case.teacher)

    def judge(self, case: JudgeCase) -> Verdict:
        student, teacher = self.scores(case)
        diff = student - teacher
        better: Better = "tie" if abs(diff) <= self.tie_margin else ("student" if diff > 0 else "teacher")
        return Verdict(
            case_id=case.case_id, better=better, confidence=round(min(1.0, abs(diff)), 4), judge=self.name,
            reason=f"boundary gradient: student {student:.3f}, teacher {teacher:.3f}",
        )
