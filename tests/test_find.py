"""The find pass's input: the frame in grey, reduced r-fold to block mean, minimum and maximum (engines.find)."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from engines.bundle import FindSpec
from engines.contract import FIND_MEAN, FIND_STD
from engines.errors import DefectsamError, FrameGeometryError
from engines.find import FindGeometry, FindPreprocessor, find_geometry, reduce_grey, to_grey

SPEC = FindSpec(arch="finder", reduction=4, mean=FIND_MEAN, std=FIND_STD, parameters=0)


def _blocks(grey: np.ndarray, r: int) -> np.ndarray:
    """NumPy reference: the frame padded by repeating its last row and column, as ch x r x cw x r blocks."""
    h, w = grey.shape
    ch, cw = math.ceil(h / r), math.ceil(w / r)
    padded = np.pad(grey, ((0, ch * r - h), (0, cw * r - w)), mode="edge").astype(np.float64)
    return padded.reshape(ch, r, cw, r)


@pytest.mark.parametrize(("shape", "r"), [((64, 96), 4), ((37, 53), 4), ((50, 31), 2), ((41, 45), 8), ((9, 7), 3)])
def test_reduce_grey_is_the_block_mean_minimum_and_maximum(shape: tuple[int, int], r: int) -> None:
    grey = np.random.default_rng(sum(shape) + r).integers(0, 256, shape, dtype=np.uint8)
    out = reduce_grey(grey, r)
    blocks = _blocks(grey, r)
    assert out.dtype == np.uint8 and out.shape == (3, blocks.shape[0], blocks.shape[2])
    # The mean rounded to the nearest grey level (OpenCV breaks ties up at r = 2, to even at r = 4).
    assert np.abs(out[0] - blocks.mean(axis=(1, 3))).max() <= 0.5
    np.testing.assert_array_equal(out[1], blocks.min(axis=(1, 3)))
    np.testing.assert_array_equal(out[2], blocks.max(axis=(1, 3)))


def test_reduction_one_is_the_frame_three_times() -> None:
    grey = np.random.default_rng(3).integers(0, 256, (20, 30), dtype=np.uint8)
    out = reduce_grey(grey, 1)
    assert out.shape == (3, 20, 30)
    assert all(np.array_equal(channel, grey) for channel in out)


def test_a_partial_block_repeats_the_last_row_and_column() -> None:
    grey = np.zeros((5, 6), np.uint8)
    grey[4, :] = 200  # the last row
    grey[:, 5] = 10  # the last column, over it at the corner
    out = reduce_grey(grey, 4)
    assert out.shape == (3, 2, 2)
    # Block (1, 0): rows 4..7 all repeat row 4 (200), columns 0..3: mean, min and max are 200.
    assert out[:, 1, 0].tolist() == [200, 200, 200]
    # Block (0, 1): columns 4..7 = column 4 (0) and columns 5, 6, 7 repeating column 5 (10).
    assert out[:, 0, 1].tolist() == [8, 0, 10]  # mean of 0, 10, 10, 10 = 7.5: 8
    # Block (1, 1): row 4 repeated: 200 at column 4, 10 at columns 5..7 (the corner is 10).
    assert out[:, 1, 1].tolist() == [round((200 + 3 * 10) / 4), 10, 200]


def test_a_one_pixel_scratch_keeps_its_full_contrast_in_the_minimum() -> None:
    """A 4x block mean thins a 1 px line to a quarter of its contrast or less; the minimum keeps all of it."""
    frame = np.full((1520, 2688, 3), 150, np.uint8)
    cv2.line(frame, (300, 201), (2400, 201), (90, 90, 90), 1)  # dark, horizontal, 60 grey levels deep
    cv2.line(frame, (200, 400), (1300, 1450), (90, 90, 90), 1)  # dark, diagonal
    cv2.line(frame, (1500, 300), (2600, 1400), (210, 210, 210), 1)  # bright, diagonal
    reduced = reduce_grey(to_grey(frame), 4)
    mean, low, high = (channel.astype(int) for channel in reduced)
    assert reduced.shape == (3, 380, 672)
    row = 201 // 4
    assert (low[row, 300 // 4 + 1 : 2400 // 4] == 90).all()  # every block it crosses: the full 60 levels
    assert (150 - mean[row, 300 // 4 + 1 : 2400 // 4] == 15).all()  # one row of four: a quarter of them
    dark = np.zeros((1520, 2688), np.uint8)
    cv2.line(dark, (200, 400), (1300, 1450), 1, 1)
    touched = reduce_grey(dark * 255, 4)[2] > 0  # blocks the diagonal crosses
    assert (low[touched] == 90).all()
    assert (150 - mean[touched]).max() <= 15  # at most 4 of a block's 16 pixels
    bright = np.zeros((1520, 2688), np.uint8)
    cv2.line(bright, (1500, 300), (2600, 1400), 1, 1)
    lit = reduce_grey(bright * 255, 4)[2] > 0
    assert (high[lit] == 210).all() and (mean[lit] - 150).max() <= 15
    assert (low[lit] == 150).all()  # a bright line leaves the minimum alone


def test_to_grey_takes_mono_single_channel_and_bgr_frames() -> None:
    mono = np.random.default_rng(0).integers(0, 256, (8, 9), dtype=np.uint8)
    assert to_grey(mono) is mono
    np.testing.assert_array_equal(to_grey(mono[:, :, None]), mono)
    bgr = np.zeros((2, 2, 3), np.uint8)
    bgr[..., 2] = 255  # pure red
    assert int(to_grey(bgr)[0, 0]) == round(0.299 * 255)


def test_the_geometry_of_a_4mp_frame() -> None:
    geometry = find_geometry(2688, 1520, 4)
    assert (geometry.content_width, geometry.content_height) == (672, 380)
    assert (geometry.input_width, geometry.input_height) == (672, 384)
    assert geometry.cell_px == 32 and geometry.cells == (48, 84)
    odd = FindGeometry(1001, 777, 4)
    assert (odd.content_width, odd.content_height) == (251, 195)
    assert (odd.input_width, odd.input_height) == (256, 208)
    assert odd.cells == (25, 32)


def test_the_find_input_is_normalised_and_edge_padded_to_multiples_of_16() -> None:
    frame = np.random.default_rng(7).integers(0, 256, (777, 1001, 3), dtype=np.uint8)
    tensor, geometry = FindPreprocessor(SPEC)(frame)
    assert tensor.dtype == np.float32 and tensor.shape == (1, 3, 208, 256)
    assert (geometry.frame_width, geometry.frame_height, geometry.reduction) == (1001, 777, 4)
    reduced = reduce_grey(to_grey(frame), 4).astype(np.float32)  # 3 x 195 x 251
    mean, std = np.asarray(FIND_MEAN, np.float32)[:, None, None], np.asarray(FIND_STD, np.float32)[:, None, None]
    np.testing.assert_allclose(tensor[0, :, :195, :251], (reduced - mean) / std, atol=1e-6)
    # Padding repeats the last content column, then the last (padded) row: no artificial edge.
    np.testing.assert_array_equal(tensor[0, :, :195, 251:], np.repeat(tensor[0, :, :195, 250:251], 5, axis=2))
    np.testing.assert_array_equal(tensor[0, :, 195:, :], np.repeat(tensor[0, :, 194:195, :], 13, axis=1))
    mono, _ = FindPreprocessor(SPEC)(to_grey(frame))
    np.testing.assert_array_equal(mono, tensor)  # a mono frame gives the same input as its BGR original


@pytest.mark.parametrize(("width", "height"), [(63, 1000), (1000, 63), (10, 10)])
def test_a_frame_smaller_than_the_find_input_is_a_frame_geometry_error(width: int, height: int) -> None:
    with pytest.raises(FrameGeometryError) as caught:
        find_geometry(width, height, 4)
    message = str(caught.value)
    assert isinstance(caught.value, DefectsamError) and "\n" not in message
    assert f"frame {width}x{height} is smaller than the find pass's input" in message
    assert "at least 64x64 pixels" in message and "inspection.mode: tiles or whole" in message
    with pytest.raises(FrameGeometryError):
        FindPreprocessor(SPEC)(np.zeros((height, width, 3), np.uint8))
    FindPreprocessor(SPEC)(np.zeros((64, 64), np.uint8))  # the smallest that fits


def test_bad_frames_are_refused_before_reducing() -> None:
    with pytest.raises(DefectsamError, match="uint8"):
        FindPreprocessor(SPEC)(np.zeros((100, 100), np.float32))
    with pytest.raises(DefectsamError, match="1 or 3 channels"):
        FindPreprocessor(SPEC)(np.zeros((100, 100, 4), np.uint8))
