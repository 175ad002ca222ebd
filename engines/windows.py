"""Where the segment pass looks, and how its windows come back together in frame coordinates.

Three ways to choose windows, all 1:1 with the frame (a window pixel is a frame pixel):

* ``candidate_windows``: from the find pass's candidate map. The most likely uncovered cell gets a
  window centred on it (shifted to stay inside the frame); every cell whose centre falls in that
  window's core (the window less ``margin`` on each side) counts as covered; repeat until no
  uncovered cell reaches the threshold or ``max_windows`` are placed. A long scratch is covered
  by a chain of overlapping windows, as SAM's automatic mask generator covers an image by crops.
* ``tile_windows``: a grid covering the whole frame with ``overlap`` pixels between neighbours,
  as SAHI and anomalib's tiler do (the full scan: slow, misses nothing the segmenter can see).
* ``whole_window``: the frame itself as one window, padded to multiples of 16 (small frames and
  the crop datasets).

``merge_windows`` puts the windows' per-pixel class probabilities back into frame coordinates:
windows that overlap or touch form a cluster with one canvas; where windows overlap, each
pixel's probabilities are the average of the windows over it, weighted by distance from each
window's border (a window sees least context at its edge), so a defect cut by one window's edge is
whole in the canvas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from engines.contract import SIDE_MULTIPLE
from engines.find import FindGeometry

_MIN_WEIGHT = 0.05  # a window's weight at its very edge (never 0: a pixel only one window covers keeps its value)


@dataclass(frozen=True)
class Window:
    """A square-ish region of the frame the segmenter looks at: top-left (x, y), size, in frame pixels.

    A window may reach beyond the frame (``whole_window`` of a frame whose sides are not multiples
    of 16); the cutter pads that part. ``score``: the candidate probability that placed it (1.0 for
    tiles and the whole frame).
    """

    x: int
    y: int
    width: int
    height: int
    score: float = 1.0

    @property
    def x1(self) -> int:
        return self.x + self.width

    @property
    def y1(self) -> int:
        return self.y + self.height

    def to_dict(self) -> dict[str, float | int]:
        return {"x": self.x, "y": self.y, "width": self.width, "height": self.height, "score": round(self.score, 4)}


def check_window(window: int, frame_width: int, frame_height: int) -> None:
    """ValueError unless a ``window`` x ``window`` window fits the frame and is a multiple of 16."""
    if window <= 0 or window % SIDE_MULTIPLE:
        raise ValueError(f"inspection.window must be a positive multiple of {SIDE_MULTIPLE}, got {window}")
    if window > frame_width or window > frame_height:
        raise ValueError(
            f"inspection.window {window} is larger than the frame ({frame_width}x{frame_height}); use a smaller "
            "window or inspection.mode: whole"
        )


def _placed(centre: float, size: int, limit: int) -> int:
    """Left (or top) edge of a window of ``size`` centred on ``centre``, kept inside 0..limit."""
    return int(min(max(0, round(centre - size / 2)), limit - size))


def candidate_windows(
    candidates: np.ndarray,
    geometry: FindGeometry,
    *,
    window: int,
    max_windows: int,
    threshold: float,
    margin: int,
) -> tuple[list[Window], float]:
    """Windows covering the candidate cells at or above ``threshold``, most likely first.

    candidates: float32 rows x cols (the find graph's map, padding included); only cells over frame
    content count. Returns (windows, the highest probability of a cell left uncovered when
    ``max_windows`` ran out; 0.0 when every cell at or above the threshold is covered).
    """
    check_window(window, geometry.frame_width, geometry.frame_height)
    rows, cols = geometry.cells
    probs = np.asarray(candidates[:rows, :cols], dtype=np.float32)
    cell = geometry.cell_px
    # Cell centres in frame pixels (the last cell may reach past the frame: its centre is clipped in).
    cy = np.minimum((np.arange(rows) + 0.5) * cell, geometry.frame_height - 0.5)
    cx = np.minimum((np.arange(cols) + 0.5) * cell, geometry.frame_width - 0.5)
    open_cells = probs >= threshold
    core = max(1, window - 2 * margin)
    windows: list[Window] = []
    while open_cells.any():
        if len(windows) == max_windows:
            return windows, float(probs[open_cells].max())
        flat = int(np.argmax(np.where(open_cells, probs, -1.0)))
        iy, ix = divmod(flat, cols)
        x = _placed(cx[ix], window, geometry.frame_width)
        y = _placed(cy[iy], window, geometry.frame_height)
        windows.append(Window(x, y, window, window, float(probs[iy, ix])))
        # Cells whose centres fall in the window's core are covered (the core is centred in the window).
        inset = (window - core) / 2
        in_x = (cx >= x + inset) & (cx < x + window - inset)
        in_y = (cy >= y + inset) & (cy < y + window - inset)
        covered = in_y[:, None] & in_x[None, :]
        covered[iy, ix] = True  # the seed cell always (a window pushed against the frame edge may not centre it)
        open_cells &= ~covered
    return windows, 0.0


def tile_windows(frame_width: int, frame_height: int, *, window: int, overlap: int) -> list[Window]:
    """A grid of ``window`` x ``window`` tiles covering the frame, neighbours overlapping by at least ``overlap``."""
    check_window(window, frame_width, frame_height)
    if not 0 <= overlap < window:
        raise ValueError(f"inspection.tile_overlap must be within 0..{window - 1} (the window less 1), got {overlap}")

    def starts(length: int) -> list[int]:
        if length <= window:
            return [0]
        count = math.ceil((length - overlap) / (window - overlap))
        step = (length - window) / (count - 1)
        return [round(i * step) for i in range(count)]

    return [Window(x, y, window, window) for y in starts(frame_height) for x in starts(frame_width)]


def whole_window(frame_width: int, frame_height: int) -> Window:
    """The whole frame as one window, its sides rounded up to multiples of 16."""
    def up(v: int) -> int:
        return math.ceil(v / SIDE_MULTIPLE) * SIDE_MULTIPLE

    return Window(0, 0, up(frame_width), up(frame_height))


@dataclass(frozen=True)
class Canvas:
    """Class probabilities over one cluster of windows: float32 (C+1) x h x w from frame pixel (x, y)."""

    x: int
    y: int
    probs: np.ndarray

    @property
    def width(self) -> int:
        return int(self.probs.shape[2])

    @property
    def height(self) -> int:
        return int(self.probs.shape[1])


def _clusters(windows: list[Window]) -> list[list[int]]:
    """Indices of windows grouped by overlap or contact (union-find over rectangles)."""
    parent = list(range(len(windows)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, a in enumerate(windows):
        for j in range(i):
            b = windows[j]
            if a.x <= b.x1 and b.x <= a.x1 and a.y <= b.y1 and b.y <= a.y1:
                parent[root(i)] = root(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(windows)):
        groups.setdefault(root(i), []).append(i)
    return list(groups.values())


def _edge_weights(height: int, width: int, ramp: int) -> np.ndarray:
    """float32 h x w: 1 inside, falling linearly to _MIN_WEIGHT over ``ramp`` pixels at the border."""
    def ramp_1d(n: int) -> np.ndarray:
        d = np.minimum(np.arange(n) + 0.5, n - np.arange(n) - 0.5)
        return np.clip(d / max(ramp, 1), _MIN_WEIGHT, 1.0).astype(np.float32)

    return np.minimum(ramp_1d(height)[:, None], ramp_1d(width)[None, :])


def merge_windows(
    windows: list[Window], probs: np.ndarray, frame_width: int, frame_height: int, *, ramp: int = 16
) -> list[Canvas]:
    """Per-window probabilities (B x (C+1) x h x w, window order) -> one canvas per cluster of windows.

    Canvases are clipped to the frame. Where windows overlap, probabilities are averaged with
    weights that fall towards each window's border over ``ramp`` pixels.
    """
    if len(windows) != probs.shape[0]:
        raise ValueError(f"{len(windows)} windows but {probs.shape[0]} probability maps")
    canvases: list[Canvas] = []
    weights_by_size: dict[tuple[int, int], np.ndarray] = {}
    channels = probs.shape[1]
    for group in _clusters(windows):
        if len(group) == 1:
            w = windows[group[0]]
            x1, y1 = min(w.x1, frame_width), min(w.y1, frame_height)
            canvases.append(Canvas(w.x, w.y, np.ascontiguousarray(probs[group[0], :, : y1 - w.y, : x1 - w.x])))
            continue
        x0 = min(windows[i].x for i in group)
        y0 = min(windows[i].y for i in group)
        x1 = min(max(windows[i].x1 for i in group), frame_width)
        y1 = min(max(windows[i].y1 for i in group), frame_height)
        acc = np.zeros((channels, y1 - y0, x1 - x0), np.float32)
        total = np.zeros((y1 - y0, x1 - x0), np.float32)
        for i in group:
            w = windows[i]
            size = (w.height, w.width)
            if size not in weights_by_size:
                weights_by_size[size] = _edge_weights(w.height, w.width, ramp)
            weight = weights_by_size[size]
            h, wd = min(w.y1, frame_height) - w.y, min(w.x1, frame_width) - w.x
            region = (slice(w.y - y0, w.y - y0 + h), slice(w.x - x0, w.x - x0 + wd))
            acc[:, region[0], region[1]] += probs[i, :, :h, :wd] * weight[:h, :wd]
            total[region] += weight[:h, :wd]
        covered = total > 0
        acc /= np.where(covered, total, 1.0)
        acc[0][~covered] = 1.0  # gaps between windows of a cluster: background
        canvases.append(Canvas(x0, y0, acc))
    return canvases


def semantic_labels(canvases: list[Canvas], frame_width: int, frame_height: int) -> np.ndarray:
    """uint8 frame_height x frame_width: the most probable class per pixel (0 background; c+1 class c).

    Pixels no window covered are background. The field's semantic metrics (mIoU) read this map.
    """
    labels = np.zeros((frame_height, frame_width), np.uint8)
    for canvas in canvases:
        region = labels[canvas.y : canvas.y + canvas.height, canvas.x : canvas.x + canvas.width]
        # Clusters never overlap where they have windows, but one cluster's bounding canvas may span another's
        # windows with its own gap (background, 0) there: the maximum keeps the label of whichever saw the pixel.
        np.maximum(region, np.argmax(canvas.probs, axis=0).astype(np.uint8), out=region)
    return labels
