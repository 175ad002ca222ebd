"""Engine outputs -> defects in frame pixels and a verdict (engines.postprocess)."""

from __future__ import annotations

import numpy as np
import pytest

from engines.engine import EngineOutputs
from engines.postprocess import PostprocessConfig, Postprocessor
from engines.preprocess import Letterbox
from engines.results import Verdict

CLASSES = ("scratch", "dent", "pinhole")
STRIDE = 8
H, W = 576, 1024
BOX = Letterbox.fit(2688, 1520, W, H)  # scale 576/1520, 5 engine columns of padding


def outputs(
    scores: list[float], classes: list[int], points: list[tuple[float, float]], masks: list[np.ndarray]
) -> EngineOutputs:
    k = len(scores)
    return EngineOutputs(
        heatmap=np.zeros((len(CLASSES), H // 16, W // 16), np.float32),
        points=np.asarray(points, np.float32).reshape(k, 2),
        point_scores=np.asarray(scores, np.float32),
        point_classes=np.asarray(classes, np.int64),
        mask_logits=np.stack(masks).astype(np.float32),
        iou=np.full(k, 0.9, np.float32),
    )


def rect_logits(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """Mask logits at stride 8: +8 inside cells [x0, x1) x [y0, y1), -8 elsewhere."""
    logits = np.full((H // STRIDE, W // STRIDE), -8.0, np.float32)
    logits[y0:y1, x0:x1] = 8.0
    return logits


def empty() -> np.ndarray:
    return np.full((H // STRIDE, W // STRIDE), -8.0, np.float32)


def test_a_rectangle_mask_maps_back_to_frame_pixels() -> None:
    # cells x 10..20, y 5..9 -> engine pixels x 80..160, y 40..72 -> frame pixels / (576/1520)
    out = outputs([0.9, 0.1], [1, 0], [(120.0, 56.0), (500.0, 300.0)], [rect_logits(10, 5, 20, 9), empty()])
    result = Postprocessor(CLASSES, STRIDE)(out, BOX)
    assert result.verdict is Verdict.NG
    assert len(result.defects) == 1
    defect = result.defects[0]
    assert defect.class_name == "dent" and defect.class_id == 1
    scale = 576 / 1520
    x, y, w, h = defect.bbox
    # Bilinear upsampling puts the 0-crossing half a cell outside the cell centres: allow one cell.
    cell = STRIDE / scale
    assert abs(x - 80 / scale) <= cell and abs(y - 40 / scale) <= cell
    assert abs((x + w) - 160 / scale) <= cell and abs((y + h) - 72 / scale) <= cell
    assert defect.mask.shape == (h, w) and defect.mask.sum() == defect.area_px
    expected_area = (80 / scale) * (32 / scale)
    assert 0.7 * expected_area < defect.area_px < 1.3 * expected_area
    assert defect.centroid == pytest.approx((120 / scale, 56 / scale), abs=cell)
    assert defect.point == pytest.approx((120 / scale, 56 / scale), abs=1e-3)
    assert result.max_peak_score == pytest.approx(0.9)


def test_two_peaks_on_one_region_make_one_defect_with_the_stronger_class() -> None:
    out = outputs(
        [0.8, 0.95], [0, 2], [(100.0, 100.0), (180.0, 100.0)],
        [rect_logits(10, 10, 20, 14), rect_logits(18, 10, 30, 14)],
    )
    result = Postprocessor(CLASSES, STRIDE)(out, BOX)
    assert len(result.defects) == 1
    assert result.defects[0].class_name == "pinhole"
    assert result.defects[0].score == pytest.approx(0.95)


def test_separate_regions_are_separate_defects_sorted_by_score() -> None:
    out = outputs(
        [0.7, 0.9], [0, 1], [(100.0, 100.0), (700.0, 400.0)],
        [rect_logits(10, 10, 16, 14), rect_logits(85, 48, 90, 52)],
    )
    result = Postprocessor(CLASSES, STRIDE)(out, BOX)
    assert [d.class_name for d in result.defects] == ["dent", "scratch"]
    assert result.to_dict()["defect_count"] == 2


def test_a_weak_peak_makes_the_verdict_uncertain_and_no_peak_ok() -> None:
    post = Postprocessor(CLASSES, STRIDE, PostprocessConfig(score_threshold=0.5, uncertain_threshold=0.3))
    weak = post(outputs([0.4], [0], [(100.0, 100.0)], [rect_logits(10, 10, 20, 14)]), BOX)
    assert weak.verdict is Verdict.UNCERTAIN and not weak.defects
    calm = post(outputs([0.1], [0], [(100.0, 100.0)], [rect_logits(10, 10, 20, 14)]), BOX)
    assert calm.verdict is Verdict.OK


def test_peaks_in_the_letterbox_padding_are_ignored() -> None:
    # x = 1022 engine pixels lies in the padding (content is 1019 wide).
    out = outputs([0.99], [0], [(1022.0, 100.0)], [rect_logits(120, 10, 128, 14)])
    result = Postprocessor(CLASSES, STRIDE)(out, BOX)
    assert result.verdict is Verdict.OK and result.max_peak_score == 0.0


def test_a_confident_peak_with_an_empty_mask_is_not_a_defect() -> None:
    out = outputs([0.9], [0], [(100.0, 100.0)], [empty()])
    result = Postprocessor(CLASSES, STRIDE)(out, BOX)
    assert not result.defects and result.verdict is Verdict.UNCERTAIN


def test_min_area_and_max_defects_are_applied() -> None:
    masks = [rect_logits(10 + 10 * i, 10, 12 + 10 * i, 12) for i in range(4)]
    points = [(88.0 + 80 * i, 88.0) for i in range(4)]
    out = outputs([0.9, 0.8, 0.7, 0.6], [0] * 4, points, masks)
    capped = Postprocessor(CLASSES, STRIDE, PostprocessConfig(max_defects=2))(out, BOX)
    assert [d.score for d in capped.defects] == pytest.approx([0.9, 0.8])
    none = Postprocessor(CLASSES, STRIDE, PostprocessConfig(min_area_px=10**6))(out, BOX)
    assert not none.defects


def test_polygon_outlines_the_mask_in_frame_pixels() -> None:
    out = outputs([0.9], [0], [(120.0, 56.0)], [rect_logits(10, 5, 20, 9)])
    defect = Postprocessor(CLASSES, STRIDE)(out, BOX).defects[0]
    polygon = np.asarray(defect.polygon())
    x, y, w, h = defect.bbox
    assert len(polygon) >= 4
    assert polygon[:, 0].min() >= x and polygon[:, 0].max() <= x + w
    assert polygon[:, 1].min() >= y and polygon[:, 1].max() <= y + h


def test_config_rejects_inverted_thresholds() -> None:
    with pytest.raises(ValueError, match="uncertain_threshold"):
        PostprocessConfig(score_threshold=0.3, uncertain_threshold=0.6)


def test_overlay_tints_each_defect_with_its_class_colour() -> None:
    from engines.overlay import class_colour, render_overlay

    out = outputs([0.9], [2], [(120.0, 56.0)], [rect_logits(10, 5, 20, 9)])
    result = Postprocessor(CLASSES, STRIDE)(out, BOX)
    frame = np.full((1520, 2688), 128, np.uint8)
    overlay = render_overlay(frame, result)
    assert overlay.shape == (1520, 2688, 3)
    x, y, w, h = result.defects[0].bbox
    inside = overlay[y + h // 2, x + w // 2].astype(int)
    blue, _, red = class_colour(2)
    assert (inside[0] > 128) == (blue > 128) and (inside[2] > 128) == (red > 128)  # pinhole's magenta tint
    far = overlay[1400, 2500]
    assert np.array_equal(far, [128, 128, 128])  # untouched outside defects and banner
    small = render_overlay(frame, result, scale=0.25)
    assert small.shape == (380, 672, 3)
