"""Semantic segmentation metrics as the field computes them: dataset-level IoU (training.eval.semantic)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from training.data.sample import IGNORE_LABEL
from training.eval.semantic import ConfusionMatrix

CLASSES = ("scratch", "dent", "pinhole")


def test_iou_and_accuracy_against_hand_counted_pixels() -> None:
    truth = np.array([
        [0, 0, 1, 1],
        [0, 0, 1, 1],
        [2, 2, 0, 0],
        [2, 2, 0, 0],
    ], np.uint8)
    predicted = np.array([
        [0, 1, 1, 1],  # one background pixel called scratch
        [0, 0, 1, 0],  # one scratch pixel missed
        [2, 0, 0, 0],  # one dent pixel missed
        [2, 2, 2, 0],  # one background pixel called dent
    ], np.uint8)
    matrix = ConfusionMatrix(len(CLASSES))
    matrix.add(truth, predicted)
    # background: TP 6 (of 8), FP 2 (missed scratch, missed dent), FN 2 -> 6 / 10
    # scratch: TP 3, FP 1, FN 1 -> 3 / 5; dent: TP 3, FP 1, FN 1 -> 3 / 5; pinhole: nowhere -> NaN
    iou = matrix.iou()
    np.testing.assert_allclose(iou[:3], [6 / 10, 3 / 5, 3 / 5])
    assert math.isnan(iou[3])
    acc = matrix.accuracy()
    np.testing.assert_allclose(acc[:3], [6 / 8, 3 / 4, 3 / 4])
    assert math.isnan(acc[3])
    summary = matrix.summary(CLASSES)
    assert summary["miou_fg"] == pytest.approx((3 / 5 + 3 / 5) / 2)  # pinhole left out, not counted as 0
    assert summary["miou"] == pytest.approx((6 / 10 + 3 / 5 + 3 / 5) / 3)
    assert summary["macc_fg"] == pytest.approx(3 / 4)
    assert summary["aacc"] == pytest.approx(12 / 16)
    assert summary["iou"] == {"background": 0.6, "scratch": 0.6, "dent": 0.6, "pinhole": None}
    assert summary["acc"]["pinhole"] is None and summary["pixels"] == 16
    json.dumps(summary)  # None, not NaN: valid JSON


def test_a_class_predicted_but_absent_from_the_truth_scores_zero_and_counts() -> None:
    truth = np.zeros((4, 4), np.uint8)
    truth[0, 0] = 1
    predicted = truth.copy()
    predicted[3, 3] = 3  # a false pinhole: IoU 0, in the mean
    matrix = ConfusionMatrix(len(CLASSES))
    matrix.add(truth, predicted)
    summary = matrix.summary(CLASSES)
    assert summary["iou"]["scratch"] == 1.0 and summary["iou"]["pinhole"] == 0.0 and summary["iou"]["dent"] is None
    assert summary["miou_fg"] == pytest.approx(0.5)
    assert summary["acc"]["pinhole"] is None  # no pinhole pixel in the truth: no accuracy


def test_ignored_pixels_count_nowhere() -> None:
    truth = np.array([[1, 1, IGNORE_LABEL, IGNORE_LABEL], [0, 0, IGNORE_LABEL, IGNORE_LABEL]], np.uint8)
    predicted = np.array([[1, 1, 2, 0], [0, 0, 3, 1]], np.uint8)
    matrix = ConfusionMatrix(len(CLASSES))
    matrix.add(truth, predicted)
    assert matrix.counts.sum() == 4
    summary = matrix.summary(CLASSES)
    assert summary["iou"] == {"background": 1.0, "scratch": 1.0, "dent": None, "pinhole": None}
    assert summary["pixels"] == 4 and summary["aacc"] == 1.0
    wide = truth.astype(np.int64)  # the label maps training uses (int64) give the same counts
    other = ConfusionMatrix(len(CLASSES))
    other.add(wide, predicted.astype(np.int64))
    np.testing.assert_array_equal(other.counts, matrix.counts)


def test_iou_is_over_the_dataset_not_a_mean_over_images() -> None:
    # Image 1: a 10 x 10 scratch found exactly; image 2: a 2 x 2 scratch missed. Per image the scratch IoUs are
    # 1 and 0 (mean 0.5); over the dataset it is 100 / 104.
    big_truth = np.zeros((20, 20), np.uint8)
    big_truth[5:15, 5:15] = 1
    small_truth = np.zeros((20, 20), np.uint8)
    small_truth[2:4, 2:4] = 1
    matrix = ConfusionMatrix(len(CLASSES))
    matrix.add(big_truth, big_truth)
    matrix.add(small_truth, np.zeros_like(small_truth))
    summary = matrix.summary(CLASSES)
    assert summary["iou"]["scratch"] == pytest.approx(100 / 104, abs=1e-6)
    assert summary["iou"]["scratch"] != pytest.approx(0.5, abs=0.1)
    # Two matrices merged are one matrix over both images.
    first, second = ConfusionMatrix(len(CLASSES)), ConfusionMatrix(len(CLASSES))
    first.add(big_truth, big_truth)
    second.add(small_truth, np.zeros_like(small_truth))
    first.merge(second)
    np.testing.assert_array_equal(first.counts, matrix.counts)


def test_an_empty_matrix_has_no_figures() -> None:
    summary = ConfusionMatrix(2).summary(("a", "b"))
    assert summary["miou"] is None and summary["miou_fg"] is None and summary["aacc"] is None
    assert summary["pixels"] == 0


def test_label_maps_that_do_not_fit_are_refused() -> None:
    matrix = ConfusionMatrix(len(CLASSES))
    with pytest.raises(ValueError, match=r"label maps differ in shape: truth \(2, 2\), prediction \(2, 3\)"):
        matrix.add(np.zeros((2, 2), np.uint8), np.zeros((2, 3), np.uint8))
    with pytest.raises(ValueError, match="out of range for 3 classes"):
        matrix.add(np.full((2, 2), 4, np.uint8), np.zeros((2, 2), np.uint8))
    with pytest.raises(ValueError, match="out of range"):
        matrix.add(np.zeros((2, 2), np.uint8), np.full((2, 2), 7, np.uint8))
    assert matrix.counts.sum() == 0
