"""The synthetic panel generator: exact geometric ground truth, nominal sizes, deterministic, visible defects."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from engines.synthetic import (
    CLASSES,
    DENT,
    FRAME_HEIGHT,
    FRAME_WIDTH,
    PINHOLE,
    SCRATCH,
    SyntheticFrame,
    render_frame,
)


@pytest.fixture(scope="module")
def frames() -> list[SyntheticFrame]:
    """40 frames of 1344 x 760 drawn at full-frame scale (pixel_scale 1: defects of a 4 MP frame's sizes)."""
    return [render_frame(seed, 1344, 760, defect_free_prob=0.0) for seed in range(40)]


def test_a_4mp_frame_with_instance_masks_and_sizes() -> None:
    frame = render_frame(2)
    assert frame.image.shape == (FRAME_HEIGHT, FRAME_WIDTH, 3) and frame.image.dtype == np.uint8
    assert frame.masks.shape == (len(frame.classes), FRAME_HEIGHT, FRAME_WIDTH) and frame.masks.dtype == bool
    assert frame.classes.dtype == np.int64 and set(frame.classes) <= set(range(len(CLASSES)))
    assert frame.sizes.shape == frame.classes.shape and frame.sizes.dtype == np.float64
    assert all(mask.any() for mask in frame.masks)
    assert frame.class_names == CLASSES and frame.seed == 2


def test_same_seed_same_frame_other_seed_other_frame() -> None:
    a, b, c = render_frame(7, 640, 360), render_frame(7, 640, 360), render_frame(8, 640, 360)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.masks, b.masks)
    assert np.array_equal(a.sizes, b.sizes)
    assert not np.array_equal(a.image, c.image)


def test_every_class_appears_within_its_nominal_size_range(frames: list[SyntheticFrame]) -> None:
    sizes: dict[int, list[float]] = {SCRATCH: [], DENT: [], PINHOLE: []}
    for frame in frames:
        for class_id, size in zip(frame.classes, frame.sizes, strict=True):
            sizes[int(class_id)].append(float(size))
    assert all(sizes.values()), {CLASSES[k]: len(v) for k, v in sizes.items()}
    # Scratches 1-6 px wide, a third of them hairlines under 2 px; pinholes 2-12 px across; dents 15-80 px radius.
    assert min(sizes[SCRATCH]) >= 1.0 and max(sizes[SCRATCH]) <= 6.0
    assert any(s < 2.0 for s in sizes[SCRATCH]) and any(s > 3.0 for s in sizes[SCRATCH])
    assert min(sizes[PINHOLE]) >= 2.0 and max(sizes[PINHOLE]) <= 12.0
    assert any(s < 3.0 for s in sizes[PINHOLE]) and any(s > 6.0 for s in sizes[PINHOLE])
    assert min(sizes[DENT]) >= 15.0 and max(sizes[DENT]) <= 80.0


def test_ground_truth_masks_are_the_drawn_geometry(frames: list[SyntheticFrame]) -> None:
    """A pinhole's mask is the pixel centres within its radius; a scratch's a band of its width; masks are exact."""
    checked = {SCRATCH: 0, DENT: 0, PINHOLE: 0}
    for frame in frames:
        for mask, class_id, size in zip(frame.masks, frame.classes, frame.sizes, strict=True):
            area = int(mask.sum())
            count, _ = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
            if class_id == PINHOLE:
                radius = size / 2
                assert np.pi * max(radius - 1, 0) ** 2 <= area <= np.pi * (radius + 1) ** 2, (size, area)
                _, _, w, h = cv2.boundingRect(mask.astype(np.uint8))
                assert max(w, h) <= np.ceil(size) + 1, (size, w, h)
                assert count == 2  # one round pit
            elif class_id == SCRATCH:
                # A band of the nominal width around its centre line: width = 2 x area / perimeter, roughly.
                contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
                perimeter = sum(cv2.arcLength(c, True) for c in contours)
                if area >= 40 and perimeter > 0:
                    assert 0.4 * size <= 2 * area / perimeter <= size + 1.5, (size, area, perimeter)
            else:
                # Deeper than 30% of a Gaussian bump of semi-axes radius / 1.5 x (0.5..1): an ellipse of
                # semi-axes 1.035 r and 0.52..1.035 r.
                expected = np.pi * (1.035 * size) ** 2
                assert 0.45 * expected <= area <= 1.05 * expected, (size, area)
            checked[int(class_id)] += 1
    assert all(checked.values())


def test_defects_stand_out_from_the_metal_around_them() -> None:
    """Inside its mask a defect differs from the local background more than the metal does."""
    contrasts = []
    for seed in range(12):
        frame = render_frame(seed, 1344, 760, defect_free_prob=0.0)
        gray = cv2.cvtColor(frame.image, cv2.COLOR_BGR2GRAY).astype(np.float32)
        background = cv2.medianBlur(gray.astype(np.uint8), 21).astype(np.float32)
        residual = np.abs(gray - background)
        for mask in frame.masks:
            ring = cv2.dilate(mask.astype(np.uint8), np.ones((15, 15), np.uint8)).astype(bool) & ~mask
            contrasts.append(residual[mask].mean() / (residual[ring].mean() + 1e-3))
    assert np.median(contrasts) > 1.5


def test_defect_free_frames_and_frames_without_masks() -> None:
    clean = render_frame(0, 320, 180, defect_free_prob=1.0)
    assert clean.masks.shape == (0, 180, 320) and clean.classes.size == 0 and clean.sizes.size == 0
    lean = render_frame(3, 320, 180, defect_free_prob=0.0, with_masks=False)
    assert lean.masks.shape[0] == 0 and lean.classes.size >= 1 and lean.sizes.shape == lean.classes.shape
    full = render_frame(3, 320, 180, defect_free_prob=0.0)
    assert np.array_equal(lean.image, full.image) and np.array_equal(lean.classes, full.classes)
    assert np.array_equal(lean.sizes, full.sizes)
    assert render_frame(4, 320, 180, max_defects=0).classes.size == 0


def test_pixel_scale_draws_a_whole_panel_smaller() -> None:
    frame = render_frame(5, 1344, 760, pixel_scale=0.5, defect_free_prob=0.0)
    assert frame.image.shape == (760, 1344, 3)
    assert all(mask.any() for mask in frame.masks)
    # Nominal sizes are in the pixels drawn: half those of a full frame.
    for class_id, size in zip(frame.classes, frame.sizes, strict=True):
        low, high = {SCRATCH: (1.0, 6.0), DENT: (15.0, 80.0), PINHOLE: (2.0, 12.0)}[int(class_id)]
        assert 0.5 * low <= size <= 0.5 * high, (CLASSES[int(class_id)], size)
    tiny = render_frame(6, 1024, 576, pixel_scale=576 / FRAME_HEIGHT, defect_free_prob=0.0)
    assert all(mask.any() for mask in tiny.masks)  # a defect keeps at least one pixel, however small


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"width": 16, "height": 100}, "at least 32 px"),
        ({"width": 4096, "height": 2160}, "at most 2688x1520"),
        ({"defect_free_prob": 1.5}, "defect_free_prob"),
        ({"max_defects": -1}, "max_defects"),
        ({"pixel_scale": 0.0}, "pixel_scale"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        render_frame(0, **kwargs)  # type: ignore[arg-type]
