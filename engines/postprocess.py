"""Engine outputs -> defects in frame coordinates and a verdict. Shared by every backend.

The K prompt masks come out at stride ``mask_stride`` (8 for students: 72 x 128 at 576 x 1024).
Work stays at that resolution for as long as it can: masks above threshold are united and split
into connected components there (two peaks on one scratch make one defect), and only each
component's own region of interest is upsampled to frame pixels for its area, bbox and centroid.
A 4 MP frame is never upsampled whole.
"""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from engines.engine import EngineOutputs
from engines.preprocess import Letterbox
from engines.results import Defect, InspectionResult, Verdict

_OUTSIDE_LOGIT = -30.0  # logit given to cells outside a component so neighbours do not bleed in


def upsample_cells(
    logits: np.ndarray, origin: tuple[int, int], box: Letterbox, stride: int, threshold: float
) -> tuple[int, int, np.ndarray] | None:
    """Mask logits over a block of cells -> the pixels above ``threshold`` in frame coordinates.

    logits: float32 h x w, the cells from ``origin`` (cell x, cell y) on, at ``stride`` engine
    pixels per cell. Cell edges map to frame pixels through the letterbox and the block is resized
    edge to edge (bilinear); the result is trimmed to its set pixels: (frame x, frame y, bool mask),
    or None when no pixel is set.
    """
    cx0, cy0 = origin
    cx1, cy1 = cx0 + logits.shape[1], cy0 + logits.shape[0]
    fx0 = math.floor(cx0 * stride / box.scale)
    fy0 = math.floor(cy0 * stride / box.scale)
    full_x1 = math.ceil(cx1 * stride / box.scale)
    full_y1 = math.ceil(cy1 * stride / box.scale)
    fx1, fy1 = min(box.frame_width, full_x1), min(box.frame_height, full_y1)
    if fx1 <= fx0 or fy1 <= fy0:
        return None
    upsampled = cv2.resize(
        np.ascontiguousarray(logits, dtype=np.float32), (full_x1 - fx0, full_y1 - fy0), interpolation=cv2.INTER_LINEAR
    )
    mask = upsampled[: fy1 - fy0, : fx1 - fx0] > threshold
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    tx0, ty0 = int(xs.min()), int(ys.min())
    return fx0 + tx0, fy0 + ty0, mask[ty0 : int(ys.max()) + 1, tx0 : int(xs.max()) + 1].copy()


class PostprocessConfig(BaseModel):
    """Thresholds that turn engine outputs into defects and a verdict."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    score_threshold: float = Field(
        default=0.5, ge=0.0, le=1.0, title="Defect score threshold",
        description="saliency peak probability at or above which a peak's mask becomes a defect",
    )
    uncertain_threshold: float = Field(
        default=0.3, ge=0.0, le=1.0, title="Uncertain score threshold",
        description="with no defect, a peak at or above this makes the verdict UNCERTAIN instead of OK",
    )
    mask_threshold: float = Field(default=0.0, title="Mask logit threshold", description="0 is probability 0.5")
    min_predicted_iou: float = Field(
        default=0.0, ge=0.0, le=1.0, title="Minimum predicted IoU",
        description="masks the decoder itself rates below this are dropped",
    )
    min_area_px: int = Field(default=4, ge=0, title="Minimum defect area", description="in frame pixels")
    max_defects: int = Field(default=32, ge=1, title="Most defects reported per frame")

    @model_validator(mode="after")
    def _ordered(self) -> PostprocessConfig:
        if self.uncertain_threshold > self.score_threshold:
            raise ValueError(
                f"uncertain_threshold ({self.uncertain_threshold}) must not exceed "
                f"score_threshold ({self.score_threshold})"
            )
        return self


def with_calibrated(config: PostprocessConfig | None, calibrated: Any | None) -> PostprocessConfig:
    """``config`` with a bundle's calibrated thresholds (manifest ``thresholds``) wherever ``config``
    leaves them unset. A threshold set in the config (YAML, environment, a flag) always wins; an
    unset uncertain threshold never exceeds the score threshold."""
    config = config or PostprocessConfig()
    if calibrated is None:
        return config
    explicit = config.model_fields_set
    values = config.model_dump()
    for key in ("score_threshold", "uncertain_threshold"):
        if key not in explicit:
            values[key] = float(getattr(calibrated, key))
    if "uncertain_threshold" not in explicit:
        values["uncertain_threshold"] = min(values["uncertain_threshold"], values["score_threshold"])
    return PostprocessConfig(**values)


class Postprocessor:
    def __init__(self, classes: tuple[str, ...], mask_stride: int, config: PostprocessConfig | None = None) -> None:
        self.classes = classes
        self.mask_stride = mask_stride
        self.config = config or PostprocessConfig()

    def __call__(self, outputs: EngineOutputs, box: Letterbox) -> InspectionResult:
        cfg = self.config
        s = self.mask_stride
        # Mask cells that hold frame content (the rest is letterbox padding).
        valid_h = min(outputs.mask_logits.shape[1], math.ceil(box.content_height / s))
        valid_w = min(outputs.mask_logits.shape[2], math.ceil(box.content_width / s))
        logits = outputs.mask_logits[:, :valid_h, :valid_w]

        scores = outputs.point_scores.astype(np.float64)
        inside = (outputs.points[:, 0] < box.content_width) & (outputs.points[:, 1] < box.content_height)
        scores = np.where(inside, scores, 0.0)
        max_peak = float(scores.max()) if scores.size else 0.0

        kept = [
            i for i in np.argsort(-scores, kind="stable")
            if scores[i] >= cfg.score_threshold and outputs.iou[i] >= cfg.min_predicted_iou
        ]
        defects: list[Defect] = []
        if kept:
            binary = logits[kept] > cfg.mask_threshold  # k x h x w
            union = np.asarray(binary.any(axis=0), dtype=np.uint8)
            count, labels, stats, _ = cv2.connectedComponentsWithStats(union, connectivity=8)
            for component in range(1, count):
                defect = self._component_defect(
                    component, labels, stats[component], binary, kept, logits, outputs, scores, box
                )
                if defect is not None and defect.area_px >= cfg.min_area_px:
                    defects.append(defect)
        defects.sort(key=lambda d: (-d.score, -d.area_px))
        defects = defects[: cfg.max_defects]

        if defects:
            verdict = Verdict.NG
        elif max_peak >= cfg.uncertain_threshold:
            verdict = Verdict.UNCERTAIN
        else:
            verdict = Verdict.OK
        return InspectionResult(
            frame_width=box.frame_width,
            frame_height=box.frame_height,
            verdict=verdict,
            defects=tuple(defects),
            max_peak_score=max_peak,
        )

    def _component_defect(
        self,
        component: int,
        labels: np.ndarray,
        stat: np.ndarray,
        binary: np.ndarray,
        kept: list[int],
        logits: np.ndarray,
        outputs: EngineOutputs,
        scores: np.ndarray,
        box: Letterbox,
    ) -> Defect | None:
        s = self.mask_stride
        in_component = labels == component
        members = [kept[j] for j in range(len(kept)) if np.any(binary[j] & in_component)]
        lead = max(members, key=lambda i: scores[i])

        # Region of interest in mask cells: the component's box grown by one cell for the upsampling.
        x, y, w, h = (int(v) for v in stat[:4])
        cx0, cy0 = max(0, x - 1), max(0, y - 1)
        cx1, cy1 = min(labels.shape[1], x + w + 1), min(labels.shape[0], y + h + 1)
        near = cv2.dilate(in_component[cy0:cy1, cx0:cx1].astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
        roi = logits[members, cy0:cy1, cx0:cx1].max(axis=0)
        roi = np.where(near, roi, _OUTSIDE_LOGIT).astype(np.float32)

        region = upsample_cells(roi, (cx0, cy0), box, s, self.config.mask_threshold)
        if region is None:
            return None
        fx, fy, mask = region
        ys, xs = np.nonzero(mask)
        class_id = int(outputs.point_classes[lead])
        class_name = self.classes[class_id] if 0 <= class_id < len(self.classes) else f"class_{class_id}"
        point = box.to_frame(outputs.points[lead])
        return Defect(
            class_id=class_id,
            class_name=class_name,
            score=float(scores[lead]),
            predicted_iou=float(outputs.iou[lead]),
            area_px=int(ys.size),
            bbox=(fx, fy, mask.shape[1], mask.shape[0]),
            centroid=(fx + float(xs.mean()), fy + float(ys.mean())),
            point=(float(point[0]), float(point[1])),
            mask=mask,
        )
