"""Both passes over a frame on real exported bundles: modes, windows, merge, errors, timings (engines.inspector)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from engines.backends import open_engine
from engines.backends.onnxruntime import Config as OrtConfig
from engines.bundle import MANIFEST_NAME, Thresholds, load_bundle, update_thresholds, write_bundle
from engines.engine import Engine
from engines.errors import DefectsamError, FrameGeometryError
from engines.inspector import DEFAULT_CANDIDATE_THRESHOLD, InspectionConfig, Inspector
from engines.results import Verdict
from engines.synthetic import render_frame
from engines.windows import candidate_windows, semantic_labels, tile_windows, whole_window

from .conftest import TINY_CLASSES, TINY_MAX_WINDOWS, TINY_WINDOW

STEPS = {"preprocess", "segment", "postprocess", "total"}


@pytest.fixture()
def engine(tiny_bundle: Path) -> Iterator[Engine]:
    opened = open_engine(tiny_bundle, OrtConfig(providers=["cpu"]))
    yield opened
    opened.close()


@pytest.fixture(scope="module")
def frame() -> np.ndarray:
    """A synthetic panel of 704 x 512 with defects (BGR)."""
    return render_frame(11, 704, 512, pixel_scale=0.5, defect_free_prob=0.0).image


def segment_only(bundle_dir: Path, out: Path) -> Path:
    """The same bundle without its find graph (a real bundle that inspects by tiles)."""
    bundle = load_bundle(bundle_dir)
    fields = json.loads((bundle_dir / MANIFEST_NAME).read_text())
    for key in ("files", "find"):
        fields.pop(key)
    fields["graphs"] = {"segment": bundle.manifest.graphs.segment, "find": None}
    write_bundle(out, fields, {bundle.manifest.graphs.segment: bundle.segment_graph})
    return out


def _check_result(result, frame: np.ndarray, steps: set[str]) -> None:  # type: ignore[no-untyped-def]
    assert (result.frame_width, result.frame_height) == (frame.shape[1], frame.shape[0])
    assert result.verdict in (Verdict.OK, Verdict.NG, Verdict.UNCERTAIN)
    assert set(result.timings) == steps
    assert all(value >= 0.0 for value in result.timings.values())
    assert result.timings["total"] == pytest.approx(sum(v for k, v in result.timings.items() if k != "total"))
    for defect in result.defects:
        x, y, w, h = defect.bbox
        assert x >= 0 and y >= 0 and x + w <= frame.shape[1] and y + h <= frame.shape[0]
        assert defect.class_name in TINY_CLASSES and defect.mask.shape == (h, w)


def test_auto_mode_with_a_find_graph_inspects_by_windows(engine: Engine, frame: np.ndarray) -> None:
    # A random finder puts every cell near p = 0.01: a threshold of 0 makes every cell a candidate.
    inspector = Inspector(engine, InspectionConfig(candidate_threshold=0.0))
    assert inspector.window == TINY_WINDOW and inspector.max_windows == TINY_MAX_WINDOWS
    prepared = inspector.prepare(frame)
    assert prepared.mode == "windows" and prepared.find_input is not None and prepared.geometry is not None
    assert prepared.find_input.shape == (1, 3, 128, 176)  # 704 x 512 at 1/4, padded to multiples of 16
    outputs = inspector.run(prepared)
    assert outputs.mode == "windows" and len(outputs.windows) == TINY_MAX_WINDOWS  # the most it may place
    assert outputs.candidates is not None and outputs.candidates.shape == (16, 22)
    np.testing.assert_array_equal(outputs.candidates, engine.find(prepared.find_input))
    expected, uncovered = candidate_windows(outputs.candidates, prepared.geometry, window=TINY_WINDOW,
                                            max_windows=TINY_MAX_WINDOWS, threshold=0.0, margin=16)
    assert outputs.windows == expected and outputs.uncovered == uncovered > 0.0
    assert outputs.probs.shape == (TINY_MAX_WINDOWS, len(TINY_CLASSES) + 1, TINY_WINDOW, TINY_WINDOW)
    np.testing.assert_allclose(outputs.probs.sum(axis=1), 1.0, atol=1e-4)  # the segment graph's softmax
    np.testing.assert_allclose(outputs.probs, engine.segment(inspector.cut(frame, outputs.windows)), atol=1e-6)
    for w in outputs.windows:
        assert (w.width, w.height) == (TINY_WINDOW, TINY_WINDOW)
        assert w.x >= 0 and w.y >= 0 and w.x1 <= frame.shape[1] and w.y1 <= frame.shape[0]
    result = inspector.finish(outputs)
    _check_result(result, frame, STEPS | {"find"})
    assert inspector.last_windows == TINY_MAX_WINDOWS
    # Cells were left without a window (max_windows ran out) at p >= the threshold: never OK.
    assert result.verdict in (Verdict.NG, Verdict.UNCERTAIN)
    assert result.max_peak_score >= outputs.uncovered


def test_windows_mode_with_no_candidate_runs_no_segment_pass(engine: Engine, frame: np.ndarray) -> None:
    inspector = Inspector(engine, InspectionConfig(mode="windows", candidate_threshold=1.0))
    outputs = inspector.run(inspector.prepare(frame))
    assert outputs.windows == [] and outputs.uncovered == 0.0
    assert outputs.probs.shape == (0, len(TINY_CLASSES) + 1, TINY_WINDOW, TINY_WINDOW)
    result = inspector.finish(outputs)
    _check_result(result, frame, STEPS | {"find"})
    assert result.verdict is Verdict.OK and not result.defects and result.max_peak_score == 0.0
    assert inspector.merge(outputs) == []


def test_tiles_mode_scans_the_whole_frame(engine: Engine, frame: np.ndarray) -> None:
    inspector = Inspector(engine, InspectionConfig(mode="tiles", tile_overlap=16, batch=5))
    prepared = inspector.prepare(frame)
    assert prepared.mode == "tiles" and prepared.find_input is None
    outputs = inspector.run(prepared)
    assert outputs.windows == tile_windows(704, 512, window=TINY_WINDOW, overlap=16)
    assert outputs.candidates is None and outputs.uncovered == 0.0
    assert outputs.probs.shape[0] == len(outputs.windows) > 5  # several segment calls of at most 5 windows
    single = Inspector(engine, InspectionConfig(mode="tiles", tile_overlap=16, batch=256)).run(prepared)
    np.testing.assert_allclose(outputs.probs, single.probs, atol=1e-5)  # batching does not change a window
    canvases = inspector.merge(outputs)
    assert len(canvases) == 1 and (canvases[0].x, canvases[0].y, canvases[0].width, canvases[0].height) == (
        0, 0, 704, 512)  # the tiles overlap: one cluster, the frame
    labels = semantic_labels(canvases, 704, 512)
    assert labels.shape == (512, 704) and int(labels.max()) <= len(TINY_CLASSES)
    result = inspector.finish(outputs, canvases)
    _check_result(result, frame, STEPS)


def test_whole_mode_is_one_window_of_the_frame_padded(engine: Engine) -> None:
    image = render_frame(3, 200, 150, pixel_scale=0.5, defect_free_prob=0.0).image
    inspector = Inspector(engine, InspectionConfig(mode="whole"))
    outputs = inspector.run(inspector.prepare(image))
    assert outputs.mode == "whole" and outputs.windows == [whole_window(200, 150)]
    assert outputs.probs.shape == (1, len(TINY_CLASSES) + 1, 160, 208)
    (canvas,) = inspector.merge(outputs)
    assert (canvas.width, canvas.height) == (200, 150)  # clipped back to the frame
    _check_result(inspector.finish(outputs), image, STEPS)


def test_auto_picks_whole_for_a_frame_smaller_than_a_window_and_tiles_without_a_finder(
    engine: Engine, tiny_bundle: Path, tmp_path: Path, frame: np.ndarray
) -> None:
    small = frame[:50, :60]
    inspector = Inspector(engine)
    assert inspector.mode_for(60, 50) == "whole" and inspector.mode_for(704, 512) == "windows"
    result = inspector.inspect(small)
    _check_result(result, small, STEPS)
    tiles_only = open_engine(segment_only(tiny_bundle, tmp_path / "segment-only"), OrtConfig(providers=["cpu"]))
    try:
        assert not tiles_only.has_find
        plain = Inspector(tiles_only)
        assert plain.mode_for(704, 512) == "tiles" and plain.mode_for(60, 50) == "whole"
        _check_result(plain.inspect(frame), frame, STEPS)
        with pytest.raises(DefectsamError, match="bundle has no find graph"):
            tiles_only.find(np.zeros((1, 3, 64, 64), np.float32))
        with pytest.raises(DefectsamError) as caught:
            Inspector(tiles_only, InspectionConfig(mode="windows"))
        message = str(caught.value)
        assert "inspection.mode windows needs a find graph" in message and "'tiny-student'" in message
        assert "(use tiles or whole)" in message and "\n" not in message
    finally:
        tiles_only.close()


@pytest.mark.parametrize("mode", ["windows", "tiles", "auto"])
def test_a_window_larger_than_the_frame_is_a_frame_geometry_error(engine: Engine, mode: str) -> None:
    inspector = Inspector(engine, InspectionConfig(mode=mode, window=128))  # type: ignore[arg-type]
    with pytest.raises(FrameGeometryError) as caught:
        inspector.prepare(np.zeros((100, 300, 3), np.uint8))
    message = str(caught.value)
    assert "inspection.window 128 is larger than the frame (300x100)" in message and "\n" not in message
    assert "inspection.mode: whole" in message


def test_a_frame_smaller_than_the_find_input_is_a_frame_geometry_error(engine: Engine) -> None:
    inspector = Inspector(engine, InspectionConfig(mode="windows", window=32, tile_overlap=8))  # not r x 16
    with pytest.raises(FrameGeometryError, match="frame 300x48 is smaller than the find pass's input"):
        inspector.prepare(np.zeros((48, 300), np.uint8))
    tiles = Inspector(engine, InspectionConfig(mode="tiles", window=32, tile_overlap=8))
    _check_result(tiles.inspect(np.zeros((48, 300), np.uint8)), np.zeros((48, 300)), STEPS)


def test_settings_that_cannot_work_are_refused(engine: Engine) -> None:
    with pytest.raises(DefectsamError, match=r"inspection.tile_overlap \(64\) must be smaller than the window \(64\)"):
        Inspector(engine, InspectionConfig(tile_overlap=64))
    for bad in ({"window": 100}, {"window": 0}, {"max_windows": 0}, {"mode": "grid"}, {"windows": 3},
                {"candidate_threshold": 1.5}):
        with pytest.raises(ValidationError):
            InspectionConfig(**bad)  # type: ignore[arg-type]
    with pytest.raises(DefectsamError, match="uint8"):
        Inspector(engine).inspect(np.zeros((100, 100), np.float32))


def test_the_split_steps_give_what_inspect_gives(engine: Engine, frame: np.ndarray) -> None:
    inspector = Inspector(engine, InspectionConfig(mode="tiles"))
    whole = inspector.inspect(frame)
    stepped = inspector.finish(inspector.run(inspector.prepare(frame)))
    assert whole.verdict == stepped.verdict and whole.max_peak_score == pytest.approx(stepped.max_peak_score)
    assert [d.bbox for d in whole.defects] == [d.bbox for d in stepped.defects]


def test_the_bundles_calibrated_candidate_threshold_applies_unless_the_config_names_one(
    tiny_bundle: Path, frame: np.ndarray
) -> None:
    update_thresholds(tiny_bundle, Thresholds(score_threshold=0.6, uncertain_threshold=0.4, candidate_threshold=0.0))
    engine = open_engine(tiny_bundle, OrtConfig(providers=["cpu"]))
    try:
        calibrated = Inspector(engine)
        assert calibrated.candidate_threshold == 0.0
        assert calibrated.postprocess.config.score_threshold == 0.6
        assert len(calibrated.run(calibrated.prepare(frame)).windows) == TINY_MAX_WINDOWS
        explicit = Inspector(engine, InspectionConfig(candidate_threshold=1.0, max_windows=2))
        assert explicit.candidate_threshold == 1.0 and explicit.max_windows == 2
        assert explicit.run(explicit.prepare(frame)).windows == []
    finally:
        engine.close()


def test_without_calibration_the_default_candidate_threshold_applies(engine: Engine) -> None:
    assert engine.bundle.manifest.thresholds is None
    assert Inspector(engine).candidate_threshold == DEFAULT_CANDIDATE_THRESHOLD == 0.3


def test_inspecting_real_defect_images(engine: Engine, dataset_images: list[Path]) -> None:
    for path in dataset_images:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        for config in (InspectionConfig(), InspectionConfig(mode="tiles"), InspectionConfig(mode="whole")):
            inspector = Inspector(engine, config)
            mode = inspector.mode_for(image.shape[1], image.shape[0])
            assert mode == ("windows" if config.mode == "auto" else config.mode)
            steps = STEPS | ({"find"} if mode == "windows" else set())
            _check_result(inspector.inspect(image), image, steps)
        grey = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)  # mono frames, as a mono camera gives them
        _check_result(Inspector(engine).inspect(grey), grey, STEPS | {"find"})
