"""Where the segment pass looks and how its windows come back together (engines.windows)."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest

from engines.find import FindGeometry
from engines.postprocess import PostprocessConfig, Postprocessor
from engines.windows import (
    Canvas,
    Window,
    candidate_windows,
    check_window,
    merge_windows,
    semantic_labels,
    tile_windows,
    whole_window,
)

FRAME_W, FRAME_H = 2688, 1520  # 4 MP
GEOMETRY = FindGeometry(FRAME_W, FRAME_H, 4)  # cells of 32 x 32 frame pixels, 48 x 84 of them


def _candidates(geometry: FindGeometry, cells: dict[tuple[int, int], float]) -> np.ndarray:
    """A find-graph map (input / 8, padding included) with the given (row, col) -> probability, 0.01 elsewhere."""
    probs = np.full((geometry.input_height // 8, geometry.input_width // 8), 0.01, np.float32)
    for (row, col), value in cells.items():
        probs[row, col] = value
    return probs


def _centre(geometry: FindGeometry, row: int, col: int) -> tuple[float, float]:
    """A cell's centre in frame pixels, clipped into the frame as engines.windows does."""
    cell = geometry.cell_px
    return min((col + 0.5) * cell, geometry.frame_width - 0.5), min((row + 0.5) * cell, geometry.frame_height - 0.5)


def _inside(window: Window, x: float, y: float) -> bool:
    return window.x <= x < window.x1 and window.y <= y < window.y1


def _in_frame(window: Window, width: int, height: int) -> bool:
    return window.x >= 0 and window.y >= 0 and window.x1 <= width and window.y1 <= height


# -- candidate windows -----------------------------------------------------------------------------


def test_every_candidate_cell_above_the_threshold_lies_in_a_window() -> None:
    rng = np.random.default_rng(0)
    # A scratch (a chain of cells), a cluster, lone cells at the frame's corners and edges, weak cells.
    cells = {(20, c): 0.9 - 0.01 * (c - 10) for c in range(10, 30)}
    cells.update({(r, c): 0.6 for r in range(30, 33) for c in range(50, 53)})
    cells.update({(0, 0): 0.7, (47, 83): 0.8, (47, 0): 0.5, (0, 83): 0.4, (24, 83): 0.35})
    cells.update({(int(r), int(c)): 0.29 for r, c in zip(rng.integers(0, 48, 30), rng.integers(0, 84, 30), strict=True)
                  if (int(r), int(c)) not in cells})
    probs = _candidates(GEOMETRY, cells)
    windows, uncovered = candidate_windows(probs, GEOMETRY, window=128, max_windows=64, threshold=0.3, margin=16)
    assert uncovered == 0.0
    assert 0 < len(windows) < 64
    for (row, col), value in cells.items():
        x, y = _centre(GEOMETRY, row, col)
        if value >= 0.3:
            assert any(_inside(w, x, y) for w in windows), f"candidate cell {(row, col)} at p={value} has no window"
    for w in windows:
        assert (w.width, w.height) == (128, 128) and _in_frame(w, FRAME_W, FRAME_H), w
    scores = [w.score for w in windows]
    assert scores == sorted(scores, reverse=True), "the most likely cells get their windows first"
    assert scores[0] == pytest.approx(0.9)


def test_cells_below_the_threshold_get_no_window_and_the_threshold_itself_counts() -> None:
    probs = _candidates(GEOMETRY, {(10, 10): 0.3, (40, 70): 0.2999})
    windows, uncovered = candidate_windows(probs, GEOMETRY, window=128, max_windows=8, threshold=0.3, margin=16)
    assert len(windows) == 1 and uncovered == 0.0
    assert _inside(windows[0], *_centre(GEOMETRY, 10, 10))
    assert windows[0].score == pytest.approx(0.3)
    none, uncovered = candidate_windows(_candidates(GEOMETRY, {}), GEOMETRY, window=128, max_windows=8,
                                        threshold=0.3, margin=16)
    assert none == [] and uncovered == 0.0


def test_max_windows_runs_out_and_the_uncovered_maximum_is_reported() -> None:
    # Six cells far apart, each needing its own window; only four windows are allowed.
    cells = {(5, 5): 0.95, (5, 40): 0.9, (5, 75): 0.85, (40, 5): 0.8, (40, 40): 0.7, (40, 75): 0.6}
    probs = _candidates(GEOMETRY, cells)
    windows, uncovered = candidate_windows(probs, GEOMETRY, window=128, max_windows=4, threshold=0.3, margin=16)
    assert len(windows) == 4
    assert [w.score for w in windows] == pytest.approx([0.95, 0.9, 0.85, 0.8])
    assert uncovered == pytest.approx(0.7)  # the best cell left without a window
    for (row, col) in [(40, 40), (40, 75)]:
        assert not any(_inside(w, *_centre(GEOMETRY, row, col)) for w in windows)
    # With room for all of them, nothing is left over.
    windows, uncovered = candidate_windows(probs, GEOMETRY, window=128, max_windows=6, threshold=0.3, margin=16)
    assert len(windows) == 6 and uncovered == 0.0


def test_windows_stay_inside_the_frame_and_padding_cells_do_not_count() -> None:
    # 1100 x 900 at r = 4: the find input is 288 x 240 (36 x 30 cells), the frame holds 35 x 29 of them;
    # the last column and row of cells are padding.
    geometry = FindGeometry(1100, 900, 4)
    assert geometry.cells == (29, 35) and (geometry.input_width, geometry.input_height) == (288, 240)
    probs = _candidates(geometry, {(0, 0): 0.9, (28, 34): 0.8, (10, 35): 0.99, (29, 3): 0.99})
    windows, uncovered = candidate_windows(probs, geometry, window=160, max_windows=8, threshold=0.5, margin=16)
    assert uncovered == 0.0 and len(windows) == 2  # the padding cells at 0.99 get nothing
    assert [w.score for w in windows] == pytest.approx([0.9, 0.8])
    for w in windows:
        assert _in_frame(w, 1100, 900), w
    # The corner cells' windows are pushed against the frame's edges and still hold their cells.
    assert (windows[0].x, windows[0].y) == (0, 0)
    assert (windows[1].x1, windows[1].y1) == (1100, 900)
    assert _inside(windows[1], *_centre(geometry, 28, 34))  # its centre (1104, 912) is clipped into the frame


def test_the_margin_decides_when_a_neighbouring_cell_needs_its_own_window() -> None:
    # Two cells 64 px apart: inside the core of a 160 px window without margin, outside it with 32 px of margin.
    probs = _candidates(GEOMETRY, {(20, 20): 0.9, (20, 22): 0.8})
    one, _ = candidate_windows(probs, GEOMETRY, window=160, max_windows=8, threshold=0.5, margin=0)
    two, _ = candidate_windows(probs, GEOMETRY, window=160, max_windows=8, threshold=0.5, margin=32)
    assert len(one) == 1 and len(two) == 2
    assert _inside(one[0], *_centre(GEOMETRY, 20, 22))
    assert two[1].score == pytest.approx(0.8) and _inside(two[1], *_centre(GEOMETRY, 20, 22))


def test_a_long_scratch_is_covered_by_a_chain_of_overlapping_windows() -> None:
    cells = {(row, col): 0.8 for row, col in zip(range(5, 45), range(10, 50), strict=True)}  # a diagonal
    probs = _candidates(GEOMETRY, cells)
    windows, uncovered = candidate_windows(probs, GEOMETRY, window=128, max_windows=32, threshold=0.5, margin=16)
    assert uncovered == 0.0 and len(windows) > 1
    for row, col in cells:
        assert any(_inside(w, *_centre(GEOMETRY, row, col)) for w in windows)
    ordered = sorted(windows, key=lambda w: w.x)
    for a, b in itertools.pairwise(ordered):  # neighbours along the chain touch or overlap
        assert b.x <= a.x1 and abs(b.y - a.y) <= 128


@pytest.mark.parametrize(
    ("window", "width", "height", "message"),
    [
        (100, 2688, 1520, "multiple of 16"),
        (0, 2688, 1520, "multiple of 16"),
        (256, 200, 1520, "larger than the frame (200x1520)"),
        (256, 1000, 240, "larger than the frame (1000x240)"),
    ],
)
def test_a_window_that_does_not_fit_is_refused_naming_the_cause(window: int, width: int, height: int,
                                                                message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as caught:
        check_window(window, width, height)
    assert "\n" not in str(caught.value)
    if width >= 256 and height >= 256:
        geometry = FindGeometry(width, height, 4)
        with pytest.raises(ValueError, match="multiple of 16"):
            candidate_windows(_candidates(geometry, {}), geometry, window=window, max_windows=4, threshold=0.5,
                              margin=16)
    else:
        with pytest.raises(ValueError, match="larger than the frame"):
            tile_windows(width, height, window=window, overlap=32)


# -- tiles and the whole frame ---------------------------------------------------------------------


@pytest.mark.parametrize(("width", "height", "window", "overlap"),
                         [(2688, 1520, 128, 32), (700, 300, 160, 0), (256, 256, 256, 32), (1000, 130, 128, 100)])
def test_tiles_cover_every_pixel_with_the_overlap(width: int, height: int, window: int, overlap: int) -> None:
    tiles = tile_windows(width, height, window=window, overlap=overlap)
    seen = np.zeros((height, width), np.int32)
    for tile in tiles:
        assert (tile.width, tile.height) == (window, window) and _in_frame(tile, width, height), tile
        assert tile.score == 1.0
        seen[tile.y : tile.y1, tile.x : tile.x1] += 1
    assert seen.min() >= 1, "a pixel no tile covers"
    xs = sorted({t.x for t in tiles})
    ys = sorted({t.y for t in tiles})
    assert xs[0] == 0 and ys[0] == 0 and xs[-1] + window == width and ys[-1] + window == height
    for starts in (xs, ys):
        for a, b in itertools.pairwise(starts):
            assert a + window - b >= overlap, "neighbours overlap by at least the overlap"
    assert len(tiles) == len(xs) * len(ys)


def test_tile_overlap_must_be_smaller_than_the_window() -> None:
    with pytest.raises(ValueError, match=re.escape("tile_overlap must be within 0..127")):
        tile_windows(512, 512, window=128, overlap=128)
    with pytest.raises(ValueError, match="tile_overlap"):
        tile_windows(512, 512, window=128, overlap=-1)


def test_the_whole_frame_is_one_window_rounded_up_to_multiples_of_16() -> None:
    assert whole_window(200, 200) == Window(0, 0, 208, 208)
    assert whole_window(2688, 1520) == Window(0, 0, 2688, 1520)
    assert whole_window(17, 33) == Window(0, 0, 32, 48)
    assert Window(3, 4, 10, 20, 0.123456).to_dict() == {"x": 3, "y": 4, "width": 10, "height": 20, "score": 0.1235}


# -- merging ---------------------------------------------------------------------------------------


def _probs(height: int, width: int, defect: np.ndarray | None = None, channels: int = 4) -> np.ndarray:
    """(C+1) x h x w class probabilities: background 1 - p, class 1 (dent) p where ``defect`` (h x w) gives p."""
    out = np.zeros((channels, height, width), np.float32)
    p = np.zeros((height, width), np.float32) if defect is None else defect.astype(np.float32)
    out[0] = 1.0 - p
    out[2] = p
    return out


def test_a_lone_window_is_its_own_canvas_clipped_to_the_frame() -> None:
    rng = np.random.default_rng(1)
    probs = rng.random((1, 4, 112, 208)).astype(np.float32)
    (canvas,) = merge_windows([whole_window(200, 100)], probs, 200, 100)
    assert (canvas.x, canvas.y, canvas.width, canvas.height) == (0, 0, 200, 100)
    np.testing.assert_array_equal(canvas.probs, probs[0, :, :100, :200])
    far = [Window(0, 0, 64, 64), Window(500, 300, 64, 64)]
    canvases = merge_windows(far, rng.random((2, 4, 64, 64)).astype(np.float32), 1000, 800)
    assert sorted((c.x, c.y) for c in canvases) == [(0, 0), (500, 300)]


def test_overlapping_windows_average_with_weights_that_fall_towards_each_edge() -> None:
    a, b = Window(0, 0, 64, 64), Window(32, 0, 64, 64)
    pa = _probs(64, 64, np.full((64, 64), 0.9))
    pb = _probs(64, 64, np.full((64, 64), 0.1))
    (canvas,) = merge_windows([a, b], np.stack([pa, pb]), 200, 100, ramp=16)
    assert (canvas.x, canvas.y, canvas.width, canvas.height) == (0, 0, 96, 64)
    dent = canvas.probs[2]
    # Only one window over a pixel: that window's value, whatever its weight there.
    assert dent[32, 0] == pytest.approx(0.9) and dent[32, 10] == pytest.approx(0.9)
    assert dent[32, 95] == pytest.approx(0.1) and dent[32, 70] == pytest.approx(0.1)
    # Column 40 is 23.5 px inside a's right edge (weight 1) and 8.5 px inside b's left edge (weight 8.5 / 16);
    # row 32 is deep inside both.
    wa, wb = 1.0, 8.5 / 16
    assert dent[32, 40] == pytest.approx((0.9 * wa + 0.1 * wb) / (wa + wb), abs=1e-6)
    # Column 63 is a's last column (0.5 px: the floor weight 0.05) and 31.5 px into b (weight 1): b decides.
    assert dent[32, 63] == pytest.approx((0.9 * 0.05 + 0.1 * 1.0) / 1.05, abs=1e-6)
    # Column 50: 13.5 px inside a's edge (weight 13.5 / 16), 18.5 px inside b's (weight 1).
    assert dent[32, 50] == pytest.approx((0.9 * 13.5 / 16 + 0.1) / (13.5 / 16 + 1.0), abs=1e-6)
    np.testing.assert_allclose(canvas.probs.sum(axis=0), 1.0, atol=1e-5)  # still a distribution everywhere


def test_a_defect_cut_by_a_window_edge_is_whole_after_the_merge() -> None:
    # A horizontal dent from x 50 to 89 (rows 30-33). Window a (x 0..63) sees only its left part, cut by its
    # right edge; window b (x 32..95) sees all of it. Each window is right where it looks.
    truth = np.zeros((100, 200), bool)
    truth[30:34, 50:90] = True
    a, b = Window(0, 0, 64, 64), Window(32, 0, 64, 64)
    pa = _probs(64, 64, np.where(truth[:64, 0:64], 0.95, 0.02))
    pb = _probs(64, 64, np.where(truth[:64, 32:96], 0.95, 0.02))
    canvases = merge_windows([a, b], np.stack([pa, pb]), 200, 100, ramp=16)
    result = Postprocessor(("scratch", "dent", "pinhole"), PostprocessConfig())(canvases, 200, 100)
    assert len(result.defects) == 1, [d.bbox for d in result.defects]
    defect = result.defects[0]
    assert defect.class_name == "dent" and defect.bbox == (50, 30, 40, 4) and defect.area_px == 160
    labels = semantic_labels(canvases, 200, 100)
    assert np.array_equal(labels == 2, truth)


def test_windows_that_touch_form_one_cluster_and_its_gaps_are_background() -> None:
    # Corner to corner: one cluster whose 128 x 128 canvas has two quadrants no window saw.
    a, b = Window(0, 0, 64, 64), Window(64, 64, 64, 64)
    probs = np.stack([_probs(64, 64, np.full((64, 64), 0.8)), _probs(64, 64, np.full((64, 64), 0.7))])
    (canvas,) = merge_windows([a, b], probs, 300, 300)
    assert (canvas.x, canvas.y, canvas.width, canvas.height) == (0, 0, 128, 128)
    assert np.all(canvas.probs[0, 64:, :64] == 1.0) and np.all(canvas.probs[1:, 64:, :64] == 0.0)
    assert np.all(canvas.probs[0, :64, 64:] == 1.0)
    np.testing.assert_allclose(canvas.probs[2, :64, :64], 0.8, atol=1e-6)
    np.testing.assert_allclose(canvas.probs[2, 64:, 64:], 0.7, atol=1e-6)


def test_merge_refuses_probabilities_that_do_not_match_the_windows() -> None:
    with pytest.raises(ValueError, match="2 windows but 1 probability maps"):
        merge_windows([Window(0, 0, 64, 64), Window(100, 0, 64, 64)], np.zeros((1, 4, 64, 64), np.float32), 300, 300)


# -- the semantic label map ------------------------------------------------------------------------


def test_semantic_labels_are_the_argmax_and_background_where_no_window_looked() -> None:
    left = np.zeros((4, 10, 10), np.float32)
    left[0] = 0.4
    left[3, :, :5] = 0.6  # pinhole (label 3) in the left half
    left[1, :, 5:] = 0.6  # scratch (label 1) in the right half
    right = np.zeros((4, 5, 5), np.float32)
    right[0] = 0.9
    right[2, 2, 2] = 0.95  # one dent pixel
    labels = semantic_labels([Canvas(2, 3, left), Canvas(20, 10, right)], 30, 20)
    assert labels.shape == (20, 30) and labels.dtype == np.uint8
    expected = np.zeros((20, 30), np.uint8)
    expected[3:13, 2:7] = 3
    expected[3:13, 7:12] = 1
    expected[12, 22] = 2
    np.testing.assert_array_equal(labels, expected)


def test_a_clusters_gap_never_hides_a_label_another_cluster_saw() -> None:
    # Cluster A's canvas spans (0..127)^2 with a gap (background) at the bottom left, where cluster B has a pinhole.
    gap = np.zeros((4, 128, 128), np.float32)
    gap[0] = 1.0
    gap[1, :64, :64], gap[0, :64, :64] = 0.9, 0.1
    spot = np.zeros((4, 32, 32), np.float32)
    spot[0] = 1.0
    spot[3, 10, 10], spot[0, 10, 10] = 0.8, 0.2
    labels = semantic_labels([Canvas(0, 0, gap), Canvas(10, 80, spot)], 200, 200)
    assert labels[90, 20] == 3 and labels[10, 10] == 1 and labels[100, 100] == 0
    assert int((labels == 3).sum()) == 1 and int((labels == 1).sum()) == 64 * 64
