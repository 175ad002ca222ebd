"""The OpenCV camera: a V4L2 device, an RTSP/HTTP stream, a GStreamer pipeline, through cv2.VideoCapture.

``device`` is a V4L2 index (0 for /dev/video0), a URL (rtsp://, http://), a GStreamer pipeline
ending in ``appsink`` (how a Jetson's CSI camera is read: ``nvarguscamerasrc ! ... ! appsink``;
it needs an OpenCV built with GStreamer, as JetPack's is and PyPI's opencv-python-headless is not),
or a local video file. A stream that stops delivering is a lost camera (reconnect with backoff); a
local video file that reaches its end stops the camera cleanly: use the ``files`` camera to loop one.
"""

from __future__ import annotations

import os
import re
from typing import Literal

import cv2
import numpy as np
from pydantic import Field, field_validator

from service.capture.base import CameraConfigBase, CameraDisconnected, EndOfStream
from service.capture.files import to_frame

KEY = "opencv"

_APIS = {"auto": cv2.CAP_ANY, "v4l2": cv2.CAP_V4L2, "ffmpeg": cv2.CAP_FFMPEG, "gstreamer": cv2.CAP_GSTREAMER}


class Config(CameraConfigBase):
    type: Literal["opencv"] = Field(default="opencv", title="Camera type", description="selects this plugin")
    device: int | str = Field(
        title="Device",
        description="a V4L2 index (0 = /dev/video0), an RTSP/HTTP URL, a GStreamer pipeline ending in appsink, "
        "or a video file",
    )
    api: Literal["auto", "v4l2", "ffmpeg", "gstreamer"] = Field(
        default="auto", title="Capture backend",
        description="'auto': V4L2 for an index, GStreamer for a pipeline (contains '!'), else OpenCV's choice",
    )
    width: int | None = Field(default=None, ge=1, title="Requested width", description="asked of a V4L2 device")
    height: int | None = Field(default=None, ge=1, title="Requested height", description="asked of a V4L2 device")
    fps: float | None = Field(default=None, gt=0, title="Requested frame rate", description="asked of a V4L2 device")
    fourcc: str | None = Field(
        default=None, min_length=4, max_length=4, title="Requested pixel format",
        description="four-character code asked of a V4L2 device, e.g. MJPG for 4 MP over USB 2",
    )
    open_timeout_s: float = Field(
        default=10.0, gt=0, le=300, title="Open timeout", description="seconds to wait for a stream to open (FFmpeg)"
    )
    read_timeout_s: float = Field(
        default=5.0, gt=0, le=300, title="Read timeout",
        description="seconds without a frame before a stream counts as lost (FFmpeg)",
    )

    @field_validator("device")
    @classmethod
    def _index_as_int(cls, value: int | str) -> int | str:
        if isinstance(value, str):
            if not value.strip():
                raise ValueError("name a device index, a URL, a pipeline or a file")
            if value.strip().isdigit():
                return int(value)
        if isinstance(value, int) and value < 0:
            raise ValueError(f"a device index is >= 0, got {value}")
        return value


# A URL's password: after 'scheme://user:', up to the token's last '@' (a password may hold '/' or '@';
# masking up to a path's '@' as well errs on the safe side).
_URL_PASSWORD = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]*):\S*@")
# A secret given as key=value: GStreamer's rtspsrc/souphttpsrc user-pw and proxy-pw, a URL query's
# password= or token=; a quoted value as a whole.
_KEY_SECRET = re.compile(
    r"(?i)(\b(?:[\w-]*-pw|[\w-]*passw(?:or)?d|passphrase|[\w-]*secret|[\w-]*token)\s*=\s*)"
    r"(\"[^\"]*\"|'[^']*'|[^\s!&;,\"']+)"
)


# A device that is one URL (no GStreamer '!'): its password runs up to the string's last '@', spaces included.
_WHOLE_URL_PASSWORD = re.compile(r"^(\s*[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]*):.*@", re.S)


def mask_credentials(text: str) -> str:
    """Passwords in a camera device string masked as '***': ``rtsp://user:pa/ss@word@host/s`` ->
    ``rtsp://user:***@host/s``; ``rtspsrc ... user-pw=secret ! ...`` -> ``... user-pw=*** ! ...``."""
    text = _KEY_SECRET.sub(r"\1***", text)  # first: a query's password may hold an '@' the URL's would run to
    url = _URL_PASSWORD if "!" in text else _WHOLE_URL_PASSWORD
    return url.sub(r"\1:***@", text)


def describe(device: int | str) -> str:
    """The device for logs and frame sources, with any password masked (mask_credentials)."""
    if isinstance(device, int):
        return f"opencv:/dev/video{device}"
    return "opencv:" + mask_credentials(device)


class OpenCVSource:
    def __init__(self, config: Config) -> None:
        device = config.device
        api = _APIS[config.api]
        if config.api == "auto":
            if isinstance(device, int):
                api = cv2.CAP_V4L2
            elif "!" in device:
                api = cv2.CAP_GSTREAMER
        self._is_file = isinstance(device, str) and os.path.isfile(device)
        self.description = describe(device)
        self.pace_fps: float | None = None  # the device, or the decoder, sets the pace
        params = [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(config.open_timeout_s * 1000),
            cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(config.read_timeout_s * 1000),
        ]
        capture = cv2.VideoCapture(device, api, params)
        if not capture.isOpened():
            capture.release()
            raise CameraDisconnected(f"{self.description}: cannot open (backend {config.api})")
        if config.fourcc is not None:
            capture.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter.fourcc(*config.fourcc))
        for prop, value in ((cv2.CAP_PROP_FRAME_WIDTH, config.width), (cv2.CAP_PROP_FRAME_HEIGHT, config.height),
                            (cv2.CAP_PROP_FPS, config.fps)):
            if value is not None:
                capture.set(prop, value)
        if not self._is_file:
            capture.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # V4L2: keep the newest frame, not a backlog
        self._capture = capture

    def read(self) -> np.ndarray:
        ok, image = self._capture.read()
        if not ok or image is None:
            if self._is_file:
                raise EndOfStream
            raise CameraDisconnected(f"{self.description}: no frame (stream ended or timed out)")
        return to_frame(image)

    def close(self) -> None:
        self._capture.release()


def open_source(config: Config) -> OpenCVSource:
    return OpenCVSource(config)
