"""Cutting and normalising 1:1 windows of camera frames for the segment pass (engines.preprocess)."""

from __future__ import annotations

import numpy as np
import pytest

from engines.bundle import SegmentSpec
from engines.contract import PIXEL_MEAN, PIXEL_STD
from engines.errors import DefectsamError
from engines.preprocess import WindowCutter
from engines.windows import Window, whole_window

SPEC = SegmentSpec(arch="student_seg", window=64, max_windows=4, mean=PIXEL_MEAN, std=PIXEL_STD, parameters=0)
MEAN = np.asarray(PIXEL_MEAN, np.float32)[:, None, None]
STD = np.asarray(PIXEL_STD, np.float32)[:, None, None]


def _reference(frame: np.ndarray, window: Window) -> np.ndarray:
    """NumPy reference: the window's pixels as RGB, normalised; 3 x h x w (inside the frame only)."""
    crop = frame[window.y : window.y1, window.x : window.x1].astype(np.float32)
    rgb = np.stack([crop] * 3) if crop.ndim == 2 else crop[:, :, ::-1].transpose(2, 0, 1)
    return (rgb - MEAN) / STD


def test_windows_are_cut_one_to_one_as_normalised_rgb() -> None:
    frame = np.random.default_rng(0).integers(0, 256, (1520, 2688, 3), dtype=np.uint8)
    windows = [Window(0, 0, 64, 64), Window(2624, 1456, 64, 64), Window(1000, 333, 64, 64)]
    batch = WindowCutter(SPEC)(frame, windows)
    assert batch.shape == (3, 3, 64, 64) and batch.dtype == np.float32 and batch.flags.c_contiguous
    for tensor, window in zip(batch, windows, strict=True):
        np.testing.assert_allclose(tensor, _reference(frame, window), atol=1e-5)


def test_a_bgr_colour_is_normalised_as_rgb() -> None:
    frame = np.empty((100, 100, 3), np.uint8)
    frame[:] = (10, 20, 30)  # B, G, R
    (tensor,) = WindowCutter(SPEC)(frame, [Window(10, 10, 32, 48)])
    assert tensor.shape == (3, 48, 32)
    expected = (np.array([30, 20, 10], np.float32) - np.asarray(PIXEL_MEAN, np.float32)) / np.asarray(PIXEL_STD)
    np.testing.assert_allclose(tensor.reshape(3, -1).min(axis=1), expected, atol=1e-5)
    np.testing.assert_allclose(tensor.reshape(3, -1).max(axis=1), expected, atol=1e-5)


@pytest.mark.parametrize("shape", [(90, 120), (90, 120, 1)])
def test_a_mono_frame_feeds_all_three_channels(shape: tuple[int, ...]) -> None:
    frame = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    (tensor,) = WindowCutter(SPEC)(frame, [Window(16, 8, 64, 64)])
    grey = frame.reshape(90, 120)[8:72, 16:80].astype(np.float32)
    for c in range(3):
        np.testing.assert_allclose(tensor[c], (grey - PIXEL_MEAN[c]) / PIXEL_STD[c], atol=1e-5)


def test_a_whole_window_beyond_the_frame_repeats_the_frames_edge() -> None:
    frame = np.random.default_rng(2).integers(0, 256, (200, 190, 3), dtype=np.uint8)
    window = whole_window(190, 200)  # 192 x 208
    (tensor,) = WindowCutter(SPEC)(frame, [window])
    assert SPEC.pad == "edge" and tensor.shape == (3, 208, 192)
    inside = _reference(frame, Window(0, 0, 190, 200))
    np.testing.assert_allclose(tensor[:, :200, :190], inside, atol=1e-5)
    np.testing.assert_array_equal(tensor[:, 200:, :190], np.repeat(tensor[:, 199:200, :190], 8, axis=1))  # last row
    np.testing.assert_array_equal(tensor[:, :, 190:], np.repeat(tensor[:, :, 189:190], 2, axis=2))  # last column
    # as training pads (training.data.windows.pad_to): the same tensor from the padded image
    padded_image = np.pad(frame, ((0, 8), (0, 2), (0, 0)), mode="edge")
    np.testing.assert_allclose(tensor, _reference(padded_image, Window(0, 0, 192, 208)), atol=1e-5)


def test_a_constant_pad_holds_the_pad_value() -> None:
    frame = np.random.default_rng(2).integers(0, 256, (200, 190, 3), dtype=np.uint8)
    padded = SPEC.model_copy(update={"pad": "constant", "pad_value": -1.5})
    (tensor,) = WindowCutter(padded)(frame, [whole_window(190, 200)])
    np.testing.assert_allclose(tensor[:, :200, :190], _reference(frame, Window(0, 0, 190, 200)), atol=1e-5)
    assert np.all(tensor[:, 200:, :] == -1.5) and np.all(tensor[:, :, 190:] == -1.5)


def test_windows_of_one_batch_share_one_size() -> None:
    frame = np.zeros((200, 200, 3), np.uint8)
    with pytest.raises(DefectsamError, match="share one size"):
        WindowCutter(SPEC)(frame, [Window(0, 0, 64, 64), Window(0, 0, 32, 32)])
    with pytest.raises(DefectsamError, match="no windows"):
        WindowCutter(SPEC)(frame, [])


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (np.zeros((10, 10), np.float32), "uint8"),
        (np.zeros((10, 10, 4), np.uint8), "1 or 3 channels"),
        (np.zeros((0, 10), np.uint8), "H, W >= 1"),
        (np.zeros((2, 2, 2, 2), np.uint8), "H x W or H x W x C"),
        ([[1, 2]], "NumPy array"),
    ],
)
def test_bad_frames_are_refused_with_the_cause(frame: object, message: str) -> None:
    with pytest.raises(DefectsamError, match=message) as caught:
        WindowCutter(SPEC)(frame, [Window(0, 0, 16, 16)])  # type: ignore[arg-type]
    assert "\n" not in str(caught.value)
