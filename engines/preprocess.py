"""Frame -> engine input: letterbox a camera frame to the engine's H x W and normalise it.

Frames follow OpenCV's convention: uint8, H x W (mono) or H x W x 3 (BGR). The engine input is
float32 1 x 3 x H x W, RGB, ``(pixel - mean) / std`` with the manifest's mean and std; the
letterbox padding (right and bottom) holds ``pad_value``. ``Letterbox`` maps coordinates both ways.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from engines.bundle import InputSpec
from engines.errors import DefectsamError


@dataclass(frozen=True)
class Letterbox:
    """How a frame sits inside the engine input: scaled by ``scale``, placed at the top-left."""

    frame_width: int
    frame_height: int
    engine_width: int
    engine_height: int
    scale: float  # engine pixels per frame pixel

    @classmethod
    def fit(cls, frame_width: int, frame_height: int, engine_width: int, engine_height: int) -> Letterbox:
        scale = min(engine_width / frame_width, engine_height / frame_height)
        return cls(frame_width, frame_height, engine_width, engine_height, scale)

    @property
    def content_width(self) -> int:
        """Width in engine pixels of the resized frame (the rest is padding)."""
        return min(self.engine_width, max(1, round(self.frame_width * self.scale)))

    @property
    def content_height(self) -> int:
        return min(self.engine_height, max(1, round(self.frame_height * self.scale)))

    def to_frame(self, xy: np.ndarray) -> np.ndarray:
        """Engine-pixel coordinates (..., 2) -> frame-pixel coordinates, clipped to the frame."""
        out = np.asarray(xy, dtype=np.float64) / self.scale
        out[..., 0] = np.clip(out[..., 0], 0, self.frame_width - 1)
        out[..., 1] = np.clip(out[..., 1], 0, self.frame_height - 1)
        return out

    def to_engine(self, xy: np.ndarray) -> np.ndarray:
        """Frame-pixel coordinates (..., 2) -> engine-pixel coordinates."""
        return np.asarray(xy, dtype=np.float64) * self.scale


def check_frame(frame: np.ndarray) -> None:
    """Raise DefectsamError unless ``frame`` is a uint8 mono or BGR image."""
    if not isinstance(frame, np.ndarray):
        raise DefectsamError(f"frame must be a NumPy array, got {type(frame).__name__}")
    if frame.dtype != np.uint8:
        raise DefectsamError(f"frame must be uint8, got {frame.dtype}")
    if frame.ndim == 3 and frame.shape[2] not in (1, 3):
        raise DefectsamError(f"frame must have 1 or 3 channels, got {frame.shape[2]}")
    if frame.ndim not in (2, 3) or frame.shape[0] < 1 or frame.shape[1] < 1:
        raise DefectsamError(f"frame must be H x W or H x W x C with H, W >= 1, got shape {frame.shape}")


def shrink(frame: np.ndarray, size: tuple[int, int], scale: float, out: np.ndarray | None = None) -> np.ndarray:
    """Resize ``frame`` to ``size`` (width, height), ``scale`` being their ratio, without aliasing.

    Shrinking must average, or a 1 px scratch in a 4 MP frame flickers in and out of the engine's
    view. OpenCV's INTER_AREA does that but is slow for a non-integer factor (11 ms for 4 MP to
    1019x576 on one core); its integer-factor path is a fast box filter. So a shrink beyond 2x
    takes the largest integer factor with INTER_AREA, then the rest (between 0.5x and 1x) bilinear:
    1.5 ms, within 0.8 grey levels of INTER_AREA, keeping 96% of a thin scratch's contrast.

    ``out`` (``size`` high and wide, the frame's channels; a view into a larger image will do)
    receives the result instead of a new array.
    """
    if (frame.shape[1], frame.shape[0]) == size:
        if out is None:
            return frame
        np.copyto(out, frame)
        return out
    if scale >= 1.0:
        return cv2.resize(frame, size, dst=out, interpolation=cv2.INTER_LINEAR)
    if scale >= 0.5:
        return cv2.resize(frame, size, dst=out, interpolation=cv2.INTER_AREA)
    factor = int(1.0 / scale)
    coarse = cv2.resize(frame, (frame.shape[1] // factor, frame.shape[0] // factor), interpolation=cv2.INTER_AREA)
    return cv2.resize(coarse, size, dst=out, interpolation=cv2.INTER_LINEAR)


class Preprocessor:
    """Letterbox and normalise frames for one engine input spec.

    A BGR frame is normalised by OpenCV's ``blobFromImageWithParams`` (per-channel mean and scale,
    BGR -> RGB and HWC -> CHW in one multi-threaded pass): 1.2 ms for 1024x576 on the 2-core CI box
    against 2.3 ms for the NumPy loop, which stays for mono frames and OpenCV builds without it
    (before 4.8). Both give the same tensor (tests/test_preprocess.py).

    ``buffers`` > 0 (the daemon's pipeline) keeps that many padded-frame and tensor buffers and
    writes BGR frames into them in turn: a returned tensor is overwritten ``buffers`` calls later.
    A steady stream then touches the same warm pages instead of page-faulting a fresh 7 MB tensor
    in every frame. 0 (the default) returns a new array each call.
    """

    def __init__(self, spec: InputSpec, *, buffers: int = 0) -> None:
        self.spec = spec
        std = np.asarray(spec.std, dtype=np.float32)
        self._scale = (1.0 / std).astype(np.float32)  # per RGB channel
        self._offset = (-np.asarray(spec.mean, dtype=np.float32) / std).astype(np.float32)
        self._blob_params = _blob_params(spec)
        shape = (spec.height, spec.width)
        self._ring = [
            (np.zeros((*shape, 3), np.uint8), np.zeros((1, 3, *shape), np.float32))
            for _ in range(buffers if self._blob_params is not None else 0)
        ]
        self._turn = 0

    def __call__(self, frame: np.ndarray) -> tuple[np.ndarray, Letterbox]:
        """uint8 HxW or HxWx{1,3} BGR -> (float32 1x3xHxW, Letterbox)."""
        check_frame(frame)
        box = Letterbox.fit(frame.shape[1], frame.shape[0], self.spec.width, self.spec.height)
        size = (box.content_width, box.content_height)
        if self._blob_params is not None and frame.ndim == 3 and frame.shape[2] == 3:
            return self._normalise_bgr(frame, size, box.scale), box
        resized = shrink(frame, size, box.scale)
        if resized.ndim == 3 and resized.shape[2] == 1:
            resized = resized[:, :, 0]
        return self._normalise_numpy(resized), box

    def _normalise_bgr(self, frame: np.ndarray, size: tuple[int, int], scale: float) -> np.ndarray:
        """Shrink into a padded frame and normalise it with OpenCV: the next ring buffers, or new ones."""
        assert self._blob_params is not None  # only called with it
        if self._ring:
            padded, tensor = self._ring[self._turn]
            self._turn = (self._turn + 1) % len(self._ring)
        else:
            padded = np.empty((self.spec.height, self.spec.width, 3), np.uint8)
            tensor = np.empty((1, 3, self.spec.height, self.spec.width), np.float32)
        w, h = size
        shrink(frame, size, scale, out=padded[:h, :w])
        cv2.dnn.blobFromImageWithParams(padded, tensor, self._blob_params)
        tensor[0, :, h:, :] = self.spec.pad_value  # the padding holds pad_value, as in the NumPy path
        tensor[0, :, :h, w:] = self.spec.pad_value
        return tensor

    def _normalise_numpy(self, resized: np.ndarray) -> np.ndarray:
        out = np.full((1, 3, self.spec.height, self.spec.width), self.spec.pad_value, dtype=np.float32)
        h, w = resized.shape[:2]
        for c in range(3):
            # RGB channel c is BGR channel 2 - c; mono feeds all three.
            channel = resized if resized.ndim == 2 else resized[:, :, 2 - c]
            np.multiply(channel, self._scale[c], out=out[0, c, :h, :w], casting="unsafe")
            out[0, c, :h, :w] += self._offset[c]
        return out


def _blob_params(spec: InputSpec) -> cv2.dnn.Image2BlobParams | None:
    """OpenCV's blob parameters for ``spec`` from BGR uint8, or None where this OpenCV lacks them."""
    if not hasattr(cv2, "dnn") or not hasattr(cv2.dnn, "Image2BlobParams"):
        return None
    return cv2.dnn.Image2BlobParams(
        scalefactor=tuple(1.0 / s for s in spec.std), size=(spec.width, spec.height), mean=tuple(spec.mean),
        swapRB=True, ddepth=cv2.CV_32F,
    )
