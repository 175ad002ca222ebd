"""Hard negatives mined with a real (tiny, random-weight) bundle: the windows where it sees what is not there."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from engines.backends import open_engine
from engines.backends.onnxruntime import Config as OrtConfig
from engines.bundle import Thresholds, update_thresholds
from engines.inspector import InspectionConfig, Inspector
from engines.synthetic import render_frame
from training.data.errors import DatasetError
from training.data.mining import MinedWindowsDataset, MiningParams, build_mined_set, bundle_digest, mine_frame
from training.data.registry import build_dataset
from training.data.sample import label_map
from training.data.synthetic_frames import CACHE_ENV


def _params(bundle: Path, **changes: object) -> MiningParams:
    fields: dict[str, object] = {"bundle": str(bundle), "frames": 3, "seed": 3100, "defect_free_prob": 0.0,
                                 "window": 96, "min_prob": 0.05, "per_frame": 3}
    fields.update(changes)
    return MiningParams(**fields)  # type: ignore[arg-type]


def _truth(seed: int, defect_free_prob: float) -> np.ndarray:
    frame = render_frame(seed, defect_free_prob=defect_free_prob)
    truth = np.zeros(frame.image.shape[:2], np.uint8)
    for mask, class_id in zip(frame.masks, frame.classes, strict=True):
        truth[mask] = class_id + 1
    return truth


@pytest.fixture(scope="module")
def bundle(tiny_bundle_master: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny bundle with a candidate threshold of 0: its random finder gives every frame its 4 windows."""
    target = tmp_path_factory.mktemp("bundles") / "tiny"
    shutil.copytree(tiny_bundle_master, target)
    update_thresholds(target, Thresholds(score_threshold=0.9, uncertain_threshold=0.5, candidate_threshold=0.0))
    return target


@pytest.fixture(scope="module")
def mined(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_mined_set(_params(bundle), tmp_path_factory.mktemp("cache"), workers=1)


def test_mined_windows_are_where_the_bundle_errs_with_the_frames_exact_labels(
    mined: Path, bundle: Path
) -> None:
    index = json.loads((mined / "index.json").read_text())
    arrays = {n: np.load(mined / f"{n}.npy") for n in ("windows", "labels", "origins", "frames", "scores")}
    count = index["windows"]
    assert count == len(arrays["frames"]) >= 1, "a random-weight segmenter errs somewhere at 0.05"
    assert arrays["windows"].shape == (count, 96, 96, 3) and arrays["labels"].shape == (count, 96, 96)
    assert (arrays["scores"] >= 0.05).all() and (arrays["scores"] <= 1.0).all()
    # The same frames inspected here, window by window, find the same strongest false pixels.
    engine = open_engine(bundle, OrtConfig(precision="fp32", providers=["cpu"]))
    try:
        again = [mine_frame(Inspector(engine, InspectionConfig(mode="windows")), _params(bundle), f)
                 for f in range(3)]
    finally:
        engine.close()
    np.testing.assert_array_equal(np.concatenate([a["origins"] for a in again]), arrays["origins"])
    for i in range(count):
        frame_index = int(arrays["frames"][i])
        x, y = (int(v) for v in arrays["origins"][i])
        rendered = render_frame(3100 + frame_index, defect_free_prob=0.0)
        np.testing.assert_array_equal(arrays["windows"][i], rendered.image[y : y + 96, x : x + 96])
        np.testing.assert_array_equal(arrays["labels"][i], _truth(3100 + frame_index, 0.0)[y : y + 96, x : x + 96])
    # At most per_frame windows a frame, centred on false pixels half a window apart (or clamped by the edge).
    centres = np.load(mined / "centres.npy")
    for f in range(3):
        rows = np.flatnonzero(arrays["frames"] == f)
        assert len(rows) <= 3
        for a in rows:
            cx, cy = (int(v) for v in centres[a])
            x, y = (int(v) for v in arrays["origins"][a])
            assert x <= cx < x + 96 and y <= cy < y + 96
            assert (cx - x, cy - y) == (48, 48) or x in (0, 2688 - 96) or y in (0, 1520 - 96)
            for b in rows[rows > a]:
                assert np.abs(centres[a] - centres[b]).max() >= 48


def test_the_strongest_false_pixel_keeps_clear_of_every_true_defect(bundle: Path) -> None:
    params = _params(bundle, frames=1, clearance=5)
    engine = open_engine(bundle, OrtConfig(precision="fp32", providers=["cpu"]))
    try:
        inspector = Inspector(engine, InspectionConfig(mode="windows"))
        outputs = inspector.run(inspector.prepare(render_frame(3100, defect_free_prob=0.0).image))
        part = mine_frame(inspector, params, 0)
    finally:
        engine.close()
    truth = _truth(3100, 0.0) > 0
    fg_max = 0.0
    for window, probs in zip(outputs.windows, outputs.probs, strict=True):
        x0, y0 = max(0, window.x), max(0, window.y)
        x1, y1 = min(2688, window.x + window.width), min(1520, window.y + window.height)
        fg = 1.0 - probs[0, y0 - window.y : y1 - window.y, x0 - window.x : x1 - window.x]
        fg_max = max(fg_max, float(fg.max()))
    assert part["scores"].size and part["scores"][0] <= fg_max + 1e-6
    # Each centre is a pixel at least `clearance` px from every true defect.
    near = cv2.dilate(truth.astype(np.uint8), np.ones((11, 11), np.uint8)) > 0
    assert not near[part["centres"][:, 1], part["centres"][:, 0]].any()


def test_a_mined_set_is_mined_once_and_anew_for_another_bundle(
    mined: Path, bundle: Path, tmp_path: Path
) -> None:
    stamp = (mined / "windows.npy").stat().st_mtime_ns
    assert build_mined_set(_params(bundle), mined.parent, workers=1) == mined
    assert (mined / "windows.npy").stat().st_mtime_ns == stamp
    other = tmp_path / "other"
    shutil.copytree(bundle, other)
    assert bundle_digest(other) == bundle_digest(bundle)
    update_thresholds(other, Thresholds(score_threshold=0.95, uncertain_threshold=0.5, candidate_threshold=0.0))
    assert bundle_digest(other) != bundle_digest(bundle)
    assert not [p for p in mined.parent.iterdir() if ".tmp" in p.name], "no staging left behind"


def test_mined_windows_spec_reads_the_set_as_samples(
    mined: Path, bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CACHE_ENV, str(mined.parent))
    dataset = build_dataset({"name": "mined_windows", "bundle": str(bundle), "frames": 3, "seed": 3100,
                             "defect_free_prob": 0.0, "window": 96, "min_prob": 0.05, "per_frame": 3, "workers": 1})
    assert isinstance(dataset, MinedWindowsDataset) and len(dataset) == json.loads(
        (mined / "index.json").read_text())["windows"]
    assert tuple(dataset.class_names) == ("scratch", "dent", "pinhole")
    sample = dataset[0]
    np.testing.assert_array_equal(sample.image, np.load(mined / "windows.npy")[0])
    np.testing.assert_array_equal(label_map(sample), np.load(mined / "labels.npy")[0])
    assert sample.source.startswith("synthetic:31") and ":mined0" in sample.source
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_a_mining_bundle_that_is_not_one_is_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as caught:
        build_dataset(f"mined_windows,bundle={tmp_path / 'nowhere'},frames=2")
    assert "nowhere" in str(caught.value) and "not a bundle" in str(caught.value)
