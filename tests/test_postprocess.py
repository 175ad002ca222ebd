"""Merged window probabilities -> defects in frame pixels and a verdict (engines.postprocess), and the overlay."""

from __future__ import annotations

import numpy as np
import pytest

from engines.postprocess import PostprocessConfig, Postprocessor
from engines.results import Verdict
from engines.windows import Canvas

CLASSES = ("scratch", "dent", "pinhole")
FRAME_W, FRAME_H = 2688, 1520


def canvas(x: int, y: int, height: int, width: int, regions: list[tuple[int, int, int, int, int, float]]) -> Canvas:
    """A canvas at frame pixel (x, y): background everywhere but ``regions`` of (x0, y0, x1, y1, class, p),
    canvas coordinates, where class ``class`` has probability p and background 1 - p."""
    probs = np.zeros((len(CLASSES) + 1, height, width), np.float32)
    probs[0] = 1.0
    for x0, y0, x1, y1, class_id, p in regions:
        probs[:, y0:y1, x0:x1] = 0.0
        probs[0, y0:y1, x0:x1] = 1.0 - p
        probs[class_id + 1, y0:y1, x0:x1] = p
    return Canvas(x, y, probs)


def test_a_rectangle_in_a_canvas_is_a_defect_in_frame_pixels() -> None:
    c = canvas(1000, 600, 128, 128, [(20, 40, 60, 50, 1, 0.9)])  # a dent, 40 x 10, at canvas (20, 40)
    c.probs[0, 45, 30], c.probs[2, 45, 30] = 0.03, 0.97  # its strongest pixel
    result = Postprocessor(CLASSES)([c], FRAME_W, FRAME_H)
    assert result.verdict is Verdict.NG and (result.frame_width, result.frame_height) == (FRAME_W, FRAME_H)
    (defect,) = result.defects
    assert (defect.class_id, defect.class_name) == (1, "dent")
    assert defect.bbox == (1020, 640, 40, 10) and defect.area_px == 400
    assert defect.mask.shape == (10, 40) and defect.mask.all()
    assert defect.score == pytest.approx(0.97) and result.max_peak_score == pytest.approx(0.97)
    assert defect.point == (1030.5, 645.5)  # the centre of the highest-probability pixel
    assert defect.centroid == pytest.approx((1039.5, 644.5))
    assert defect.predicted_iou == pytest.approx((399 * 0.9 + 0.97) / 400)  # nothing just outside it


def test_one_region_of_two_classes_is_one_defect_of_the_class_with_more_probability() -> None:
    c = canvas(0, 0, 64, 64, [(10, 10, 30, 20, 0, 0.8), (30, 10, 34, 20, 2, 0.95)])  # mostly scratch, a pinhole end
    (defect,) = Postprocessor(CLASSES)([c], 64, 64).defects
    assert defect.class_name == "scratch" and defect.score == pytest.approx(0.95)
    assert defect.bbox == (10, 10, 24, 10)


def test_separate_regions_are_separate_defects_highest_score_first_across_canvases() -> None:
    a = canvas(0, 0, 64, 64, [(5, 5, 15, 15, 0, 0.7)])
    b = canvas(500, 300, 64, 64, [(0, 0, 4, 4, 2, 0.9), (40, 40, 60, 44, 1, 0.6)])
    result = Postprocessor(CLASSES)([a, b], 1000, 1000)
    assert [d.class_name for d in result.defects] == ["pinhole", "scratch", "dent"]
    assert [d.bbox[:2] for d in result.defects] == [(500, 300), (5, 5), (540, 340)]
    assert result.to_dict()["defect_count"] == 3


def test_a_weak_peak_makes_the_verdict_uncertain_and_no_peak_ok() -> None:
    post = Postprocessor(CLASSES, PostprocessConfig(score_threshold=0.5, uncertain_threshold=0.3))
    weak = post([canvas(0, 0, 32, 32, [(4, 4, 12, 12, 0, 0.4)])], 32, 32)
    assert weak.verdict is Verdict.UNCERTAIN and not weak.defects and weak.max_peak_score == pytest.approx(0.4)
    calm = post([canvas(0, 0, 32, 32, [(4, 4, 12, 12, 0, 0.2)])], 32, 32)
    # A region under both thresholds is no region: nothing of defect size came close.
    assert calm.verdict is Verdict.OK and calm.max_peak_score == 0.0
    specks = post([canvas(0, 0, 32, 32, [(4, 4, 5, 5, 0, 0.9), (20, 20, 21, 22, 1, 0.9)])], 32, 32)
    assert specks.verdict is Verdict.OK and specks.max_peak_score == 0.0  # 1 and 2 px: under min_area_px (3)
    assert post([], 32, 32).verdict is Verdict.OK  # no window at all


def test_a_mask_whose_peak_is_under_the_score_threshold_is_not_a_defect() -> None:
    post = Postprocessor(CLASSES, PostprocessConfig(score_threshold=0.8, uncertain_threshold=0.3))
    result = post([canvas(0, 0, 32, 32, [(4, 4, 12, 12, 1, 0.7)])], 32, 32)  # a mask (>= 0.5) peaking at 0.7
    assert not result.defects and result.verdict is Verdict.UNCERTAIN


def test_a_cell_the_find_pass_left_uncovered_makes_a_clean_frame_uncertain() -> None:
    post = Postprocessor(CLASSES)
    clean = [canvas(0, 0, 32, 32, [])]
    left = post(clean, 100, 100, uncovered=0.6, uncovered_threshold=0.3)
    assert left.verdict is Verdict.UNCERTAIN and left.max_peak_score == pytest.approx(0.6)
    assert post(clean, 100, 100, uncovered=0.2, uncovered_threshold=0.3).verdict is Verdict.OK
    found = post([canvas(0, 0, 32, 32, [(4, 4, 12, 12, 0, 0.9)])], 100, 100, uncovered=0.6, uncovered_threshold=0.3)
    assert found.verdict is Verdict.NG  # a defect decides, whatever was left


def test_min_area_and_max_defects_are_applied() -> None:
    # four 2 x 2 defects 18 px apart (farther than twice the default join distance)
    regions = [(10 + 20 * i, 10, 12 + 20 * i, 12, 0, 0.9 - 0.1 * i) for i in range(4)]
    c = canvas(0, 0, 64, 128, regions)
    capped = Postprocessor(CLASSES, PostprocessConfig(max_defects=2))([c], 128, 64)
    assert [d.score for d in capped.defects] == pytest.approx([0.9, 0.8])
    assert not Postprocessor(CLASSES, PostprocessConfig(min_area_px=5))([c], 128, 64).defects
    assert len(Postprocessor(CLASSES, PostprocessConfig(min_area_px=4))([c], 128, 64).defects) == 4


def test_predicted_iou_counts_the_probability_just_outside_the_mask() -> None:
    probs = np.zeros((4, 32, 32), np.float32)
    probs[0] = 1.0
    probs[0, 9:15, 9:15], probs[1, 9:15, 9:15] = 0.7, 0.3  # a 1 px ring at 0.3 (below the mask threshold)
    probs[0, 10:14, 10:14], probs[1, 10:14, 10:14] = 0.1, 0.9  # the 4 x 4 mask at 0.9
    (defect,) = Postprocessor(CLASSES)([Canvas(0, 0, probs)], 32, 32).defects
    assert defect.area_px == 16
    assert defect.predicted_iou == pytest.approx(16 * 0.9 / (16 + 20 * 0.3), abs=1e-6)
    crisp = canvas(0, 0, 32, 32, [(10, 10, 14, 14, 0, 1.0)])
    assert Postprocessor(CLASSES)([crisp], 32, 32).defects[0].predicted_iou == pytest.approx(1.0)
    strict = Postprocessor(CLASSES, PostprocessConfig(min_predicted_iou=0.7))
    assert not strict([Canvas(0, 0, probs)], 32, 32).defects


def test_polygon_outlines_the_mask_in_frame_pixels() -> None:
    c = canvas(200, 100, 128, 128, [(20, 40, 60, 70, 0, 0.9)])
    defect = Postprocessor(CLASSES)([c], 1000, 1000).defects[0]
    polygon = np.asarray(defect.polygon())
    x, y, w, h = defect.bbox
    assert len(polygon) >= 4
    assert polygon[:, 0].min() == x and polygon[:, 0].max() == x + w - 1
    assert polygon[:, 1].min() == y and polygon[:, 1].max() == y + h - 1
    assert defect.to_dict()["polygon"] == polygon.tolist()


def test_config_rejects_inverted_thresholds() -> None:
    with pytest.raises(ValueError, match="uncertain_threshold"):
        PostprocessConfig(score_threshold=0.3, uncertain_threshold=0.6)


def test_overlay_tints_each_defect_with_its_class_colour() -> None:
    from engines.overlay import class_colour, render_overlay

    c = canvas(1000, 600, 128, 128, [(20, 40, 100, 100, 2, 0.9)])  # a pinhole-class region
    result = Postprocessor(CLASSES)([c], FRAME_W, FRAME_H)
    frame = np.full((FRAME_H, FRAME_W), 128, np.uint8)
    overlay = render_overlay(frame, result)
    assert overlay.shape == (FRAME_H, FRAME_W, 3)
    x, y, w, h = result.defects[0].bbox
    inside = overlay[y + h // 2, x + w // 2].astype(int)
    blue, _, red = class_colour(2)
    assert (inside[0] > 128) == (blue > 128) and (inside[2] > 128) == (red > 128)  # pinhole's magenta tint
    far = overlay[1400, 2500]
    assert np.array_equal(far, [128, 128, 128])  # untouched outside defects and banner
    small = render_overlay(frame, result, scale=0.25)
    assert small.shape == (380, 672, 3)


def test_pieces_of_a_faded_scratch_are_one_defect_with_their_own_pixels() -> None:
    # a 3 px scratch in three pieces 6 px apart, and a pinhole 40 px away
    pieces = [(10, 20, 30, 23, 0, 0.9), (36, 20, 56, 23, 0, 0.95), (62, 20, 80, 23, 0, 0.9), (100, 60, 104, 64, 2, 0.9)]
    c = canvas(0, 0, 96, 128, pieces)
    scratch, pinhole = Postprocessor(CLASSES)([c], 128, 96).defects[:2]
    assert scratch.class_name == "scratch" and scratch.bbox == (10, 20, 70, 3)
    assert scratch.area_px == (20 + 20 + 18) * 3  # the gaps stay background
    assert pinhole.class_name == "pinhole" and pinhole.area_px == 16
    apart = Postprocessor(CLASSES, PostprocessConfig(join_px=0))([c], 128, 96).defects
    assert sorted(d.area_px for d in apart) == [16, 54, 60, 60]
