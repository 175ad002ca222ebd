"""Instance masks from the geometry label tools export: polygons, and COCO run-length encodings.

Coordinates are continuous, as COCO and YOLO write them: pixel (i, j) covers ``[i, i+1) x [j, j+1)``,
so its centre is ``(i + 0.5, j + 0.5)``. A polygon covers the pixels whose centres lie inside it or
on its edge (pycocotools' convention to within its 1/5-pixel sampling; a polygon traced through
the centres of a mask's boundary pixels gives that mask back).

COCO RLE (pycocotools' ``maskApi.c``) runs over the mask in column-major order, alternating
background and foreground, starting with background. ``counts`` is a list of run lengths
(uncompressed) or a string (compressed): each run, less the run two before it from the fourth run
on, in 5-bit groups, low first, each char ``48 + group`` with ``0x20`` marking that more follow and
``0x10`` in the last group the sign.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class MaskCodecError(ValueError):
    """Geometry that makes no mask; the reader adds the file and the annotation to the message."""


def polygon_mask(polygons: Sequence[Sequence[float] | np.ndarray], height: int, width: int) -> np.ndarray:
    """HxW bool: the union of ``polygons``, each a flat ``x1, y1, x2, y2, ...`` in pixels (continuous).

    Each polygon is rasterised exactly as pycocotools' ``frPyObjects`` does (``rleFrPoly``: the
    boundary traced at 5x, a pixel is inside where its centre falls between the traced edges), so a
    COCO file reads as detectron2 or mmdetection read it. MaskCodecError for an odd number of
    coordinates, fewer than 3 points, a value that is not a finite number, or a point more than
    an image size outside the image.
    """
    mask = np.zeros((height, width), dtype=bool)
    for polygon in polygons:
        flat = np.asarray(polygon, dtype=np.float64).reshape(-1)
        if flat.size % 2:
            raise MaskCodecError(f"polygon has an odd number of coordinates ({flat.size})")
        if flat.size < 6:
            raise MaskCodecError(f"polygon has {flat.size // 2} point(s); a polygon needs at least 3")
        if not np.isfinite(flat).all():
            raise MaskCodecError("polygon has a coordinate that is not a finite number")
        xs, ys = flat[0::2], flat[1::2]
        if xs.min() < -width or xs.max() > 2 * width or ys.min() < -height or ys.max() > 2 * height:
            raise MaskCodecError(f"polygon reaches ({xs[np.argmax(np.abs(xs - width / 2))]:g}, "
                                 f"{ys[np.argmax(np.abs(ys - height / 2))]:g}), far outside the "
                                 f"{width}x{height} image")
        mask |= rle_mask(_polygon_runs(flat, height, width), height, width)
    return mask


def _c_int(values: np.ndarray) -> np.ndarray:
    """C's (int) cast: truncation toward zero."""
    return np.trunc(values).astype(np.int64)


def _polygon_runs(flat: np.ndarray, height: int, width: int) -> list[int]:
    """pycocotools' rleFrPoly, vectorised: one polygon -> RLE run lengths."""
    scale = 5.0
    xy = flat.reshape(-1, 2)  # within one image size of the image (polygon_mask checks)
    x = _c_int(scale * xy[:, 0] + 0.5)
    y = _c_int(scale * xy[:, 1] + 0.5)
    xs, ys = x, y
    xe, ye = np.roll(x, -1), np.roll(y, -1)
    dx, dy = np.abs(xe - xs), np.abs(ys - ye)
    along_x = dx >= dy
    flip = (along_x & (xs > xe)) | (~along_x & (ys > ye))
    xs, xe = np.where(flip, xe, xs), np.where(flip, xs, xe)
    ys, ye = np.where(flip, ye, ys), np.where(flip, ys, ye)
    steps = np.where(along_x, dx, dy)
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = np.where(along_x, (ye - ys) / np.maximum(dx, 1), (xe - xs) / np.maximum(dy, 1))
    # every edge j gives steps[j] + 1 points d = 0..steps[j]
    edge = np.repeat(np.arange(len(steps)), steps + 1)
    starts = np.concatenate(([0], np.cumsum(steps + 1)[:-1]))
    d = np.arange(edge.size) - starts[edge]
    t = np.where(flip[edge], steps[edge] - d, d)
    u = np.where(along_x[edge], t + xs[edge], _c_int(xs[edge] + slope[edge] * t + 0.5))
    v = np.where(along_x[edge], _c_int(ys[edge] + slope[edge] * t + 0.5), t + ys[edge])
    # points where the traced boundary crosses a pixel column, downsampled
    moved = np.flatnonzero(u[1:] != u[:-1]) + 1
    uj, uk, vj, vk = u[moved], u[moved - 1], v[moved], v[moved - 1]
    xd = (np.where(uj < uk, uj, uj - 1).astype(np.float64) + 0.5) / scale - 0.5
    keep = (np.floor(xd) == xd) & (xd >= 0) & (xd <= width - 1)
    yd = (np.where(vj < vk, vj, vk).astype(np.float64) + 0.5) / scale - 0.5
    yd = np.ceil(np.clip(yd, 0, height))
    starts_at = np.sort(np.concatenate((xd[keep].astype(np.int64) * height + yd[keep].astype(np.int64),
                                        [height * width])))
    gaps = np.diff(np.concatenate(([0], starts_at))).tolist()
    runs = [gaps[0]]
    j = 1
    while j < len(gaps):  # a zero gap toggles twice: merge the runs around it
        if gaps[j] > 0:
            runs.append(gaps[j])
            j += 1
        else:
            j += 1
            if j < len(gaps):
                runs[-1] += gaps[j]
                j += 1
    return [int(r) for r in runs]


def rle_counts_from_string(text: str) -> list[int]:
    """A compressed COCO RLE string -> its run lengths. MaskCodecError for a character out of range."""
    counts: list[int] = []
    position = 0
    while position < len(text):
        value = shift = 0
        more = True
        while more:
            if position >= len(text):
                raise MaskCodecError("compressed RLE ends inside a run length")
            code = ord(text[position]) - 48
            if not 0 <= code < 64:
                raise MaskCodecError(f"compressed RLE has character {text[position]!r}, outside '0'..'o'")
            value |= (code & 0x1F) << shift
            more = bool(code & 0x20)
            position += 1
            shift += 5
            if not more and code & 0x10:
                value -= 1 << shift  # the sign bit: extend
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def rle_counts_to_string(counts: Sequence[int]) -> str:
    """Run lengths -> pycocotools' compressed string (the inverse of ``rle_counts_from_string``)."""
    chars: list[str] = []
    for index, count in enumerate(counts):
        value = int(count) - (int(counts[index - 2]) if index > 2 else 0)
        more = True
        while more:
            code = value & 0x1F
            value >>= 5
            more = value != -1 if code & 0x10 else value != 0
            if more:
                code |= 0x20
            chars.append(chr(code + 48))
    return "".join(chars)


def rle_mask(counts: Sequence[int] | str, height: int, width: int) -> np.ndarray:
    """HxW bool from COCO RLE run lengths (or their compressed string), column-major.

    MaskCodecError for a negative run or runs that do not add up to height x width.
    """
    runs = rle_counts_from_string(counts) if isinstance(counts, str) else [int(c) for c in counts]
    lengths = np.asarray(runs, dtype=np.int64)
    if lengths.size and lengths.min() < 0:
        raise MaskCodecError("RLE has a negative run length")
    total = int(lengths.sum())
    if total != height * width:
        raise MaskCodecError(f"RLE runs cover {total} pixels but its size {width}x{height} has {height * width}")
    values = np.zeros(lengths.size, dtype=bool)
    values[1::2] = True  # runs alternate, background first
    flat = np.repeat(values, lengths)
    return flat.reshape(width, height).T.copy()  # column-major -> HxW


def rle_counts(mask: np.ndarray) -> list[int]:
    """HxW bool -> COCO RLE run lengths (column-major, background first)."""
    flat = np.ascontiguousarray(mask.T).reshape(-1).astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    edges = np.concatenate(([0], changes, [flat.size]))
    runs = np.diff(edges).tolist()
    if flat.size and flat[0]:
        runs.insert(0, 0)
    return [int(r) for r in runs]
