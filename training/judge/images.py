"""The pictures a judge (a model or a person) is shown: the crop, and each mask drawn on it.

Both masks are drawn in the same colour and style, so nothing but their shape tells them apart.
Small crops are upscaled with nearest-neighbour interpolation (pixels stay pixels) so that the
longest side is about ``size``.
"""

from __future__ import annotations

import base64

import cv2
import numpy as np

from engines.errors import DefectsamError
from training.judge.base import JudgeCase, swap_for

MASK_COLOUR = (255, 255, 0)  # BGR cyan: stays apart from grey metal and the usual red/amber defects


def encode_png(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", image)
    if not ok:  # pragma: no cover - encoding a uint8 array does not fail
        raise DefectsamError("could not encode a PNG")
    return data.tobytes()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def upscale(image: np.ndarray, size: int) -> np.ndarray:
    """Scale so the longest side is about ``size`` (an integer factor >= 1 for small crops, nearest)."""
    longest = max(image.shape[:2])
    factor = max(1, size // max(1, longest))
    if factor == 1:
        return image
    return cv2.resize(image, None, fx=factor, fy=factor, interpolation=cv2.INTER_NEAREST)


def draw_mask(crop: np.ndarray, mask: np.ndarray, size: int, alpha: float = 0.3) -> np.ndarray:
    """The crop upscaled, the mask tinted at ``alpha`` and outlined (BGR uint8)."""
    canvas = upscale(crop, size).copy()
    big = upscale(mask.astype(np.uint8), size)
    if big.any():
        tint = np.empty_like(canvas)
        tint[:] = MASK_COLOUR
        blended = cv2.addWeighted(canvas, 1.0 - alpha, tint, alpha, 0.0)
        canvas[big > 0] = blended[big > 0]
        contours, _ = cv2.findContours(big, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(canvas, contours, -1, MASK_COLOUR, 1)
    return canvas


def case_pngs(case: JudgeCase, size: int) -> tuple[bytes, bytes, bytes, bool]:
    """(crop, mask A drawn, mask B drawn, swapped) as PNG bytes; swapped: A is the teacher's mask."""
    swapped = swap_for(case)
    a, b = (case.teacher, case.student) if swapped else (case.student, case.teacher)
    return (
        encode_png(upscale(case.crop, size)),
        encode_png(draw_mask(case.crop, a, size)),
        encode_png(draw_mask(case.crop, b, size)),
        swapped,
    )
