"""The synthetic panel generator: exact ground truth, deterministic, visible defects."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from engines.synthetic import CLASSES, DENT, FRAME_HEIGHT, FRAME_WIDTH, PINHOLE, SCRATCH, render_frame


def test_a_4mp_frame_with_instance_masks() -> None:
    frame = render_frame(2)
    assert frame.image.shape == (FRAME_HEIGHT, FRAME_WIDTH, 3) and frame.image.dtype == np.uint8
    assert frame.masks.shape == (len(frame.classes), FRAME_HEIGHT, FRAME_WIDTH) and frame.masks.dtype == bool
    assert frame.classes.dtype == np.int64 and set(frame.classes) <= set(range(len(CLASSES)))
    assert all(mask.any() for mask in frame.masks)


def test_same_seed_same_frame_other_seed_other_frame() -> None:
    a, b, c = render_frame(7, 640, 360), render_frame(7, 640, 360), render_frame(8, 640, 360)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.masks, b.masks)
    assert not np.array_equal(a.image, c.image)


def test_every_class_appears_with_its_size_range() -> None:
    areas: dict[int, list[int]] = {SCRATCH: [], DENT: [], PINHOLE: []}
    for seed in range(40):
        frame = render_frame(seed, 1344, 760, defect_free_prob=0.0)
        for mask, class_id in zip(frame.masks, frame.classes, strict=True):
            areas[int(class_id)].append(int(mask.sum()))
    assert all(areas.values()), {CLASSES[k]: len(v) for k, v in areas.items()}
    # Pinholes are 2-8 px across; dents 15-80 px radius; scratches thin and long.
    assert max(areas[PINHOLE]) <= 64
    assert min(areas[DENT]) >= 200
    assert np.median(areas[SCRATCH]) > np.median(areas[PINHOLE])


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
    assert clean.masks.shape == (0, 180, 320) and clean.classes.size == 0
    lean = render_frame(3, 320, 180, defect_free_prob=0.0, with_masks=False)
    assert lean.masks.shape[0] == 0 and lean.classes.size >= 1
    full = render_frame(3, 320, 180, defect_free_prob=0.0)
    assert np.array_equal(lean.image, full.image) and np.array_equal(lean.classes, full.classes)


def test_pixel_scale_renders_a_whole_panel_at_engine_resolution() -> None:
    frame = render_frame(5, 1024, 576, pixel_scale=576 / FRAME_HEIGHT, defect_free_prob=0.0)
    assert frame.image.shape == (576, 1024, 3)
    assert all(mask.any() for mask in frame.masks)


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
