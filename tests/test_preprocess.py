"""Letterboxing and normalisation of camera frames (engines.preprocess)."""

from __future__ import annotations

import numpy as np
import pytest

from engines.bundle import InputSpec
from engines.errors import DefectsamError
from engines.preprocess import Letterbox, Preprocessor, shrink

SPEC = InputSpec(height=576, width=1024, mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375))


def test_letterbox_of_a_4mp_frame_fills_the_height() -> None:
    box = Letterbox.fit(2688, 1520, 1024, 576)
    assert box.scale == pytest.approx(576 / 1520)
    assert box.content_height == 576
    assert box.content_width == round(2688 * 576 / 1520)  # 1019: 5 columns of padding on the right


def test_coordinates_round_trip() -> None:
    box = Letterbox.fit(2688, 1520, 1024, 576)
    points = np.array([[0.0, 0.0], [1000.5, 777.25], [2687.0, 1519.0]])
    np.testing.assert_allclose(box.to_frame(box.to_engine(points)), points, atol=1e-9)


def test_bgr_frame_is_normalised_as_rgb_and_padded() -> None:
    frame = np.empty((1520, 2688, 3), np.uint8)
    frame[:] = (10, 20, 30)  # B, G, R
    tensor, box = Preprocessor(SPEC)(frame)
    assert tensor.shape == (1, 3, 576, 1024) and tensor.dtype == np.float32
    rgb = np.array([30, 20, 10], np.float32)
    expected = (rgb - np.array(SPEC.mean, np.float32)) / np.array(SPEC.std, np.float32)
    content = tensor[0, :, :, : box.content_width]
    np.testing.assert_allclose(content.reshape(3, -1).min(axis=1), expected, atol=1e-5)
    np.testing.assert_allclose(content.reshape(3, -1).max(axis=1), expected, atol=1e-5)
    assert np.all(tensor[0, :, :, box.content_width :] == SPEC.pad_value)


def test_mono_frame_feeds_all_three_channels() -> None:
    frame = np.full((300, 200), 128, np.uint8)
    tensor, box = Preprocessor(SPEC)(frame)
    assert box.content_height == 576 and box.content_width == round(200 * 576 / 300)
    values = tensor[0, :, 0, 0]
    expected = (128 - np.array(SPEC.mean)) / np.array(SPEC.std)
    np.testing.assert_allclose(values, expected, atol=1e-5)


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (np.zeros((10, 10), np.float32), "uint8"),
        (np.zeros((10, 10, 4), np.uint8), "1 or 3 channels"),
        (np.zeros((0, 10), np.uint8), "H, W >= 1"),
        ([[1, 2]], "NumPy array"),
    ],
)
def test_bad_frames_are_refused_with_the_cause(frame: object, message: str) -> None:
    with pytest.raises(DefectsamError, match=message):
        Preprocessor(SPEC)(frame)  # type: ignore[arg-type]


def test_shrinking_a_4mp_frame_keeps_a_one_pixel_scratch() -> None:
    """The fast two-step shrink stays close to OpenCV's area average; plain bilinear would alias."""
    import cv2

    from engines.preprocess import shrink

    frame = np.full((1520, 2688, 3), 150, np.uint8)
    cv2.line(frame, (300, 200), (2400, 1300), (90, 90, 90), 1)  # a dark 1 px scratch
    box = Letterbox.fit(2688, 1520, 1024, 576)
    size = (box.content_width, box.content_height)
    fast = shrink(frame, size, box.scale).astype(np.float32)
    area = cv2.resize(frame, size, interpolation=cv2.INTER_AREA).astype(np.float32)
    assert np.abs(fast - area).mean() < 1.0
    linear = cv2.resize(frame, size, interpolation=cv2.INTER_LINEAR).astype(np.float32)
    # How dark the scratch is in each output column it crosses.
    depth_fast, depth_area, depth_linear = (150 - image.min(axis=(0, 2)) for image in (fast, area, linear))
    line_columns = depth_area > 5
    assert depth_fast[line_columns].mean() > 0.85 * depth_area[line_columns].mean()
    assert depth_fast[line_columns].min() > 0.4 * depth_area[line_columns].min()  # never vanishes
    assert depth_linear[line_columns].min() == 0  # plain bilinear loses it in places: what shrink avoids


@pytest.mark.parametrize(("width", "height"), [(2688, 1520), (700, 900)])  # pads on the right; at the bottom
def test_opencv_and_numpy_normalisation_give_the_same_tensor(width: int, height: int) -> None:
    """The fast BGR path (OpenCV's blob) and the NumPy path agree on real synthetic frames."""
    from engines.synthetic import render_frame

    preprocess = Preprocessor(SPEC)
    if preprocess._blob_params is None:
        pytest.skip("this OpenCV has no cv2.dnn.Image2BlobParams (before 4.8): only the NumPy path runs")
    frame = render_frame(3, width, height, with_masks=False).image
    fast, box = preprocess(frame)
    resized = shrink(frame, (box.content_width, box.content_height), box.scale)
    np.testing.assert_allclose(fast, preprocess._normalise_numpy(resized), atol=1e-5)
    assert fast.shape == (1, 3, 576, 1024) and fast.dtype == np.float32 and fast.flags.c_contiguous
    assert np.all(fast[0, :, :, box.content_width :] == SPEC.pad_value)
    assert np.all(fast[0, :, box.content_height :, :] == SPEC.pad_value)


@pytest.mark.parametrize(("width", "height"), [(2688, 1520), (700, 900), (1024, 576)])
def test_buffered_preprocessing_matches_and_reuses_its_buffers(width: int, height: int) -> None:
    """The pipeline's ring of buffers: the same tensors as a fresh preprocess, written in place in turn."""
    from engines.synthetic import render_frame

    fresh, ring = Preprocessor(SPEC), Preprocessor(SPEC, buffers=2)
    if ring._blob_params is None:
        pytest.skip("this OpenCV has no cv2.dnn.Image2BlobParams (before 4.8): no buffered path")
    frames = [render_frame(seed, width, height, with_masks=False).image for seed in (1, 2, 3)]
    outputs = []
    for frame in frames:
        tensor, box = ring(frame)
        np.testing.assert_allclose(tensor, fresh(frame)[0], atol=1e-5)
        assert box == fresh(frame)[1]
        outputs.append(tensor)
    assert outputs[0] is outputs[2] and outputs[0] is not outputs[1]  # two buffers, taken in turn
    assert not np.shares_memory(outputs[0], frames[2])
    mono, _ = ring(frames[0][:, :, 0])  # mono frames take the unbuffered path
    assert all(mono is not out for out in outputs)
