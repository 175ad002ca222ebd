"""Frame -> the segment graph's input: 1:1 windows cut from the frame, normalised, as one batch.

Frames follow OpenCV's convention: uint8, H x W (mono) or H x W x 3 (BGR). The segment graph takes
float32 B x 3 x H x W, RGB, ``(pixel - mean) / std`` with the manifest's ``segment.mean`` / ``std``.
A window is a view into the frame (no resize: one window pixel is one frame pixel); the part of a
window beyond the frame (only a ``whole`` window of a frame whose sides are not multiples of 16)
repeats the frame's last row and column (``segment.pad: edge``, the default, as training pads), or
holds ``pad_value`` (``pad: constant``). The edge matters: NEU-Seg's 200 px images padded to 208
with the normalised mean scored 0.672 foreground mIoU on 300 val images, with the edge 0.760.

Windows are normalised by NumPy straight from views of the frame, a multiply and an add per channel
into the batch: 0.9 ms for 16 windows of 128 x 128 on one core of the CI box, where OpenCV's
``blobFromImagesWithParams`` took 2.6 ms (it copies each window first).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engines.bundle import SegmentSpec
from engines.errors import DefectsamError
from engines.frame import check_frame
from engines.windows import Window


class WindowCutter:
    """Cut and normalise windows for one segment spec."""

    def __init__(self, spec: SegmentSpec) -> None:
        self.spec = spec
        std = np.asarray(spec.std, dtype=np.float32)
        self._scale = (1.0 / std).astype(np.float32)  # per RGB channel
        self._offset = (-np.asarray(spec.mean, dtype=np.float32) / std).astype(np.float32)

    def __call__(self, frame: np.ndarray, windows: Sequence[Window]) -> np.ndarray:
        """uint8 frame + windows of one size -> float32 B x 3 x h x w."""
        check_frame(frame)
        if not windows:
            raise DefectsamError("no windows to cut")
        h, w = windows[0].height, windows[0].width
        if any((win.height, win.width) != (h, w) for win in windows):
            raise DefectsamError("the windows of one batch must share one size")
        frame_h, frame_w = frame.shape[:2]
        crops = [frame[win.y : min(win.y1, frame_h), win.x : min(win.x1, frame_w)] for win in windows]
        return self._batch(crops, h, w)

    def _batch(self, crops: list[np.ndarray], h: int, w: int) -> np.ndarray:
        out = np.full((len(crops), 3, h, w), self.spec.pad_value, dtype=np.float32)
        for i, crop in enumerate(crops):
            ch, cw = crop.shape[:2]
            for c in range(3):
                # RGB channel c is BGR channel 2 - c; mono feeds all three.
                channel = crop if crop.ndim == 2 else crop[:, :, 0 if crop.shape[2] == 1 else 2 - c]
                np.multiply(channel, self._scale[c], out=out[i, c, :ch, :cw], casting="unsafe")
                out[i, c, :ch, :cw] += self._offset[c]
            if self.spec.pad == "edge" and ch > 0 and cw > 0:
                if ch < h:
                    out[i, :, ch:, :cw] = out[i, :, ch - 1 : ch, :cw]
                if cw < w:
                    out[i, :, :, cw:] = out[i, :, :, cw - 1 : cw]
        return out
