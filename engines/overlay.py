"""Draw an inspection result over its frame: masks tinted per class, contours, labels, verdict.

Used by ``defectsam infer``, the live view and the daemon's overlay endpoint; ``scale`` draws on a downscaled
copy, ``overlay_scale`` picks the scale that fits a requested width and a cap on the longer side.
"""

from __future__ import annotations

import cv2
import numpy as np

from engines.results import InspectionResult, Verdict

# BGR colours, one per class index (cycled); chosen to stay apart on grey metal.
CLASS_COLOURS: tuple[tuple[int, int, int], ...] = (
    (0, 0, 255),  # red
    (0, 200, 255),  # amber
    (255, 0, 255),  # magenta
    (255, 160, 0),  # azure
    (0, 255, 0),  # green
    (255, 255, 0),  # cyan
)
VERDICT_COLOURS = {
    Verdict.OK: (0, 170, 0),
    Verdict.NG: (0, 0, 230),
    Verdict.UNCERTAIN: (0, 170, 230),
    Verdict.NO_FRAME: (128, 128, 128),
}


def class_colour(class_id: int) -> tuple[int, int, int]:
    return CLASS_COLOURS[class_id % len(CLASS_COLOURS)]


def overlay_scale(width: int, height: int, max_width: int | None = None, max_side: int | None = None) -> float:
    """The scale (at most 1: never enlarged) that makes a ``width`` x ``height`` frame at most ``max_width``
    wide and at most ``max_side`` on its longer side; 1.0 for a frame of unknown size (0)."""
    scale = 1.0
    if width > 0 and max_width:
        scale = min(scale, max_width / width)
    if max(width, height) > 0 and max_side:
        scale = min(scale, max_side / max(width, height))
    return scale


def render_overlay(
    frame: np.ndarray, result: InspectionResult, *, scale: float = 1.0, alpha: float = 0.45,
    size: tuple[int, int] | None = None,
) -> np.ndarray:
    """A BGR uint8 copy of ``frame`` (mono or BGR), resized by ``scale``, with the result drawn on it.

    ``size`` (width, height) is the canvas when ``frame`` is already smaller than the frame the result's
    coordinates are in (a JPEG decoded at 1/2, 1/4 or 1/8): the frame is resized to it, the defects are
    drawn at ``scale`` of their coordinates.
    """
    canvas = frame if frame.ndim == 3 and frame.shape[2] == 3 else cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
    if size is None:
        size = (max(1, round(canvas.shape[1] * scale)), max(1, round(canvas.shape[0] * scale)))
    if size != (canvas.shape[1], canvas.shape[0]):
        canvas = cv2.resize(canvas, size, interpolation=cv2.INTER_AREA)
    else:
        canvas = canvas.copy()
    thickness = max(1, round(2 * max(canvas.shape[:2]) / 1500))
    font_scale = max(0.4, max(canvas.shape[:2]) / 1800)
    banner = f"{result.verdict.name}  {len(result.defects)} defect(s)"
    banner_scale, banner_thickness = font_scale * 1.4, thickness + 1
    (bw, bh), bbase = cv2.getTextSize(banner, cv2.FONT_HERSHEY_SIMPLEX, banner_scale, banner_thickness)
    banner_box = (8, 8, 8 + bw + 4, 8 + bh + bbase + 2)  # x0, y0, x1, y1: labels keep out of it
    for defect in result.defects:
        colour = class_colour(defect.class_id)
        x, y, w, h = defect.bbox
        x0, y0 = int(x * scale), int(y * scale)
        mask: np.ndarray = defect.mask.astype(np.uint8)
        if scale != 1.0:
            mw, mh = max(1, round(w * scale)), max(1, round(h * scale))
            mask = cv2.resize(mask, (mw, mh), interpolation=cv2.INTER_NEAREST)
        mh, mw = mask.shape
        mh, mw = min(mh, canvas.shape[0] - y0), min(mw, canvas.shape[1] - x0)
        if mh <= 0 or mw <= 0:
            continue
        mask = mask[:mh, :mw]
        roi = canvas[y0 : y0 + mh, x0 : x0 + mw]
        tint = np.empty_like(roi)
        tint[:] = colour
        blended = cv2.addWeighted(roi, 1.0 - alpha, tint, alpha, 0.0)
        roi[mask > 0] = blended[mask > 0]
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(roi, contours, -1, colour, thickness)
        label = f"{defect.class_name} {defect.score:.2f}"
        (lw, lh), lbase = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thickness)
        above = max(lh + lbase, y0 - 4)  # bottom of a label drawn above the defect
        hits_banner = x0 < banner_box[2] and x0 + lw + 4 > banner_box[0] and above - lh - lbase < banner_box[3]
        origin = (x0, y0 + mh + lh + lbase + 4) if hits_banner else (x0, above)
        _put_label(canvas, label, origin, colour, font_scale, thickness)
    _put_label(canvas, banner, (8, 8), VERDICT_COLOURS[result.verdict], banner_scale, banner_thickness, top=True)
    return canvas


def _put_label(
    canvas: np.ndarray,
    text: str,
    origin: tuple[int, int],
    colour: tuple[int, int, int],
    font_scale: float,
    thickness: int,
    *,
    top: bool = False,
) -> None:
    """Text on a filled box of ``colour``; ``origin`` is the box's bottom-left (top-left if ``top``)."""
    font = cv2.FONT_HERSHEY_SIMPLEX
    (tw, th), base = cv2.getTextSize(text, font, font_scale, thickness)
    x, y = origin
    if top:
        y += th + base
    y = max(th + base, y)
    cv2.rectangle(canvas, (x, y - th - base), (x + tw + 4, y + 2), colour, -1)
    cv2.putText(canvas, text, (x + 2, y - base // 2), font, font_scale, (255, 255, 255), thickness, cv2.LINE_AA)
