"""The files camera: a folder of images (or one image) or a video file, looped or played once.

The path is looked at when the camera opens, not when the config is validated: a folder on a
share that is not mounted yet is a camera that is not there yet (RECONNECTING), not a bad config.
A folder is listed again at each pass, so images added to it join the next loop; a folder that
disappears, or empties, is a lost camera. In 'once' mode the camera stops after the last frame
(state STOPPED, ``end_of_stream`` true, no error).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from pydantic import Field

from service.capture.base import CameraConfigBase, CameraDisconnected, EndOfStream

KEY = "files"

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm"})
FOLDER_FPS = 5.0  # a folder has no frame rate of its own

log = logging.getLogger(__name__)


class Config(CameraConfigBase):
    type: Literal["files"] = Field(default="files", title="Camera type", description="selects this plugin")
    path: Path = Field(
        title="Folder, image or video",
        description="a folder of images (played in name order), a single image, or a video file OpenCV can decode",
    )
    pattern: str = Field(
        default="*", min_length=1, title="File pattern",
        description="glob inside the folder; only image files (by suffix) are used",
    )
    mode: Literal["loop", "once"] = Field(
        default="loop", title="Play mode", description="'loop' starts over after the last frame; 'once' then stops"
    )
    fps: float | None = Field(
        default=None, ge=0, title="Frames per second",
        description=f"None: a video at its own rate, a folder at {FOLDER_FPS:g}; 0: as fast as frames decode",
    )


def to_frame(image: np.ndarray) -> np.ndarray:
    """What cv2 decodes (8/16-bit, 1/3/4 channels) -> uint8 HxW or HxWx3 BGR."""
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ValueError(f"unsupported pixel type {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    elif image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    return image


class FolderSource:
    """Images from a folder (or one image file), in name order."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._once = config.mode == "once"
        self.pace_fps: float | None = FOLDER_FPS if config.fps is None else config.fps
        self.skipped = 0  # unreadable images passed over
        self._files = self._list()
        self._index = 0
        self.description = str(self._files[0])

    def _list(self) -> list[Path]:
        path = self._config.path
        if path.is_file():
            return [path]
        if not path.is_dir():
            raise CameraDisconnected(f"{path}: no such folder")
        files = sorted(p for p in path.glob(self._config.pattern) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise CameraDisconnected(f"{path}: no images matching {self._config.pattern!r}")
        return files

    def read(self) -> np.ndarray:
        unreadable = 0
        while True:
            if self._index >= len(self._files):
                if self._once:
                    raise EndOfStream
                self._files = self._list()
                self._index = 0
            path = self._files[self._index]
            self._index += 1
            image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if image is not None:
                self.description = str(path)
                return to_frame(image)
            if not self._config.path.exists():
                raise CameraDisconnected(f"{self._config.path}: gone")
            # one bad file (half-written, corrupt) does not take the camera down, but a folder of them does
            self.skipped += 1
            unreadable += 1
            log.warning("files camera: cannot decode %s; skipped", path)
            if unreadable >= len(self._files):
                raise CameraDisconnected(f"{self._config.path}: none of {len(self._files)} images can be decoded")

    def close(self) -> None:
        self._files = []


class VideoSource:
    """Frames of a video file, decoded with cv2.VideoCapture."""

    def __init__(self, config: Config) -> None:
        self._path = config.path
        self._once = config.mode == "once"
        self._capture = self._open()
        native = self._capture.get(cv2.CAP_PROP_FPS)
        if config.fps is not None:
            self.pace_fps: float | None = config.fps
        else:
            self.pace_fps = native if 0 < native <= 1000 else FOLDER_FPS
        self._index = 0
        self.description = f"{self._path}#0"

    def _open(self) -> cv2.VideoCapture:
        capture = cv2.VideoCapture(str(self._path))
        if not capture.isOpened():
            capture.release()
            raise CameraDisconnected(f"{self._path}: cannot open the video")
        return capture

    def read(self) -> np.ndarray:
        ok, image = self._capture.read()
        if not ok:
            if self._once:
                raise EndOfStream
            # start over; reopening is more reliable across codecs than seeking to frame 0
            self._capture.release()
            self._capture = self._open()
            self._index = 0
            ok, image = self._capture.read()
            if not ok:
                raise CameraDisconnected(f"{self._path}: no frame can be decoded")
        self.description = f"{self._path}#{self._index}"
        self._index += 1
        return to_frame(image)

    def close(self) -> None:
        self._capture.release()


def open_source(config: Config) -> FolderSource | VideoSource:
    path = config.path
    if path.is_dir() or (path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES):
        return FolderSource(config)
    if path.is_file():
        return VideoSource(config)
    raise CameraDisconnected(f"{path}: no such folder or file")
