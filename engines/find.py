"""Frame -> the find graph's input: the frame in grey, reduced r-fold, three channels per block.

Per r x r block of the frame the find input holds the mean grey level, the minimum and the
maximum. Averaging alone would thin a 1 px scratch to a quarter of its contrast at r = 4; the
minimum (a dark scratch or pinhole) and the maximum (a bright one) keep all of it, at a
sixteenth of the pixels. Each channel is normalised with the manifest's ``find.mean`` /
``find.std``; a frame whose sides are not multiples of r is padded by repeating its last row and
column, and the reduced image is padded (repeated edge) to multiples of 16, so no artificial
edge enters the finder. Training builds its find inputs with this same code.

On a 4 MP frame (2688 x 1520, r = 4): grey 0.5 ms, mean 0.7 ms, min and max 0.6 ms each on one
core of the CI box; the result is 1 x 3 x 384 x 672.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from engines.bundle import FindSpec
from engines.contract import CELL_STRIDE, SIDE_MULTIPLE
from engines.errors import DefectsamError, FrameGeometryError
from engines.frame import check_frame


@dataclass(frozen=True)
class FindGeometry:
    """How a frame maps to the find input and its candidate cells."""

    frame_width: int
    frame_height: int
    reduction: int

    @property
    def content_width(self) -> int:
        """Find-input pixels holding the frame (the rest is padding)."""
        return math.ceil(self.frame_width / self.reduction)

    @property
    def content_height(self) -> int:
        return math.ceil(self.frame_height / self.reduction)

    @property
    def input_width(self) -> int:
        return math.ceil(self.content_width / SIDE_MULTIPLE) * SIDE_MULTIPLE

    @property
    def input_height(self) -> int:
        return math.ceil(self.content_height / SIDE_MULTIPLE) * SIDE_MULTIPLE

    @property
    def cell_px(self) -> int:
        """Frame pixels per candidate cell, each way."""
        return CELL_STRIDE * self.reduction

    @property
    def cells(self) -> tuple[int, int]:
        """(rows, columns) of candidate cells that hold frame content."""
        return math.ceil(self.frame_height / self.cell_px), math.ceil(self.frame_width / self.cell_px)


def find_geometry(frame_width: int, frame_height: int, reduction: int) -> FindGeometry:
    """The geometry of a frame's find pass; DefectsamError when the frame is too small to reduce."""
    smallest = SIDE_MULTIPLE * reduction
    if frame_width < smallest or frame_height < smallest:
        raise FrameGeometryError(
            f"frame {frame_width}x{frame_height} is smaller than the find pass's input: at reduction {reduction} it "
            f"needs at least {smallest}x{smallest} pixels (inspection.mode: tiles or whole inspects small frames)"
        )
    return FindGeometry(frame_width, frame_height, reduction)


def reduce_grey(grey: np.ndarray, reduction: int) -> np.ndarray:
    """uint8 HxW -> uint8 3 x ceil(H/r) x ceil(W/r): block mean, minimum, maximum."""
    r = reduction
    h, w = grey.shape
    ch, cw = math.ceil(h / r), math.ceil(w / r)
    if (ch * r, cw * r) != (h, w):
        grey = cv2.copyMakeBorder(grey, 0, ch * r - h, 0, cw * r - w, cv2.BORDER_REPLICATE)
    if r == 1:
        return np.stack([grey, grey, grey])
    out = np.empty((3, ch, cw), np.uint8)
    # An integer-factor INTER_AREA is an exact box average; erode / dilate with an r x r kernel anchored
    # at its top-left corner give each pixel the min / max of the block starting there.
    out[0] = cv2.resize(grey, (cw, ch), interpolation=cv2.INTER_AREA)
    kernel = np.ones((r, r), np.uint8)
    out[1] = cv2.erode(grey, kernel, anchor=(0, 0), borderType=cv2.BORDER_REPLICATE)[::r, ::r]
    out[2] = cv2.dilate(grey, kernel, anchor=(0, 0), borderType=cv2.BORDER_REPLICATE)[::r, ::r]
    return out


def to_grey(frame: np.ndarray) -> np.ndarray:
    """uint8 HxW or HxWx{1,3} (BGR) -> uint8 HxW."""
    if frame.ndim == 2:
        return frame
    if frame.shape[2] == 1:
        return frame[:, :, 0]
    return cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)


class FindPreprocessor:
    """Frames -> find inputs for one finder spec."""

    def __init__(self, spec: FindSpec) -> None:
        self.spec = spec
        self._scale = (1.0 / np.asarray(spec.std, np.float32)).reshape(3, 1, 1)
        self._offset = (-np.asarray(spec.mean, np.float32) * self._scale[:, 0, 0]).reshape(3, 1, 1)

    def geometry(self, frame_width: int, frame_height: int) -> FindGeometry:
        return find_geometry(frame_width, frame_height, self.spec.reduction)

    def __call__(self, frame: np.ndarray) -> tuple[np.ndarray, FindGeometry]:
        """uint8 HxW or HxWx{1,3} BGR -> (float32 1x3xhxw, FindGeometry)."""
        check_frame(frame)
        geometry = self.geometry(frame.shape[1], frame.shape[0])
        return self.normalise(reduce_grey(to_grey(frame), self.spec.reduction), geometry), geometry

    def normalise(self, reduced: np.ndarray, geometry: FindGeometry) -> np.ndarray:
        """uint8 3 x ch x cw (reduce_grey) -> float32 1 x 3 x h x w, padded to multiples of 16 by edge repeat."""
        ch, cw = reduced.shape[1:]
        pad_h, pad_w = geometry.input_height - ch, geometry.input_width - cw
        if pad_h < 0 or pad_w < 0:
            raise DefectsamError(f"reduced frame {cw}x{ch} does not fit the find input {geometry.input_width}x"
                                 f"{geometry.input_height}")
        tensor = np.empty((1, 3, geometry.input_height, geometry.input_width), np.float32)
        body = tensor[0, :, :ch, :cw]
        np.multiply(reduced, self._scale, out=body, casting="unsafe")
        body += self._offset
        if pad_w:
            tensor[0, :, :ch, cw:] = tensor[0, :, :ch, cw - 1 : cw]
        if pad_h:
            tensor[0, :, ch:, :] = tensor[0, :, ch - 1 : ch, :]
        return tensor
