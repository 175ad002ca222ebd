"""The Basler camera: GigE and USB3 Vision cameras through pypylon (extra ``basler``).

Two modes:

* ``free_run``: the camera streams at its own rate (or ``frame_rate``); pylon keeps only the
  latest image (GrabStrategy_LatestImageOnly), gaps in the camera's image numbers are reported as
  ``source_skipped``; no frame for ``grab_timeout_s`` means the camera is lost.
* ``software``: FrameStart is triggered in software; ``CameraWorker.trigger()`` asks for one
  frame, the capture thread fires the trigger and waits for the image (``grab_timeout_s`` at
  most, else the camera counts as lost). Triggers that arrive while one is in flight are served
  by that frame, which was captured after all of them were asked for.

Frames come out as BGR (``output: bgr``, converted by pylon from Bayer or RGB formats) or mono.
pylon's camera emulation (``PYLON_CAMEMU=<n>`` in the environment, serials ``0815-0000`` ...)
serves test patterns or, with ``emulation_images``, image files: that is how the tests run.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Literal

import numpy as np
from pydantic import Field

from service.capture.base import CameraConfigBase, CameraDisconnected, CameraUnavailableError

KEY = "basler"

POLL_S = 0.1  # read() returns None after this long without a frame, so that the worker can stop


class Config(CameraConfigBase):
    type: Literal["basler"] = Field(default="basler", title="Camera type", description="selects this plugin")
    serial: str | None = Field(
        default=None, min_length=1, title="Serial number", description="the camera to open; None: the first one found"
    )
    device_class: Literal["BaslerGigE", "BaslerUsb", "BaslerCamEmu"] | None = Field(
        default=None, title="Transport", description="only look at cameras of this pylon device class"
    )
    trigger: Literal["free_run", "software"] = Field(
        default="free_run", title="Acquisition mode",
        description="'free_run': the camera streams; 'software': one frame per CameraWorker.trigger()",
    )
    output: Literal["bgr", "mono"] = Field(
        default="bgr", title="Frame format", description="BGR (converted from the camera's format) or 8-bit mono"
    )
    pixel_format: str | None = Field(
        default=None, min_length=1, title="Camera pixel format",
        description="set on the camera (e.g. BayerRG8, BGR8Packed, Mono8); None keeps the camera's",
    )
    width: int | None = Field(default=None, ge=1, title="ROI width", description="pixels; None keeps the camera's")
    height: int | None = Field(default=None, ge=1, title="ROI height", description="pixels; None keeps the camera's")
    offset_x: int | None = Field(default=None, ge=0, title="ROI left", description="pixels")
    offset_y: int | None = Field(default=None, ge=0, title="ROI top", description="pixels")
    exposure_us: float | None = Field(default=None, gt=0, title="Exposure time", description="microseconds")
    frame_rate: float | None = Field(
        default=None, gt=0, title="Frame rate limit", description="free-run frames per second; None: as fast as it can"
    )
    grab_timeout_s: float = Field(
        default=5.0, gt=0, le=300, title="Grab timeout",
        description="free run: seconds without a frame before the camera counts as lost; software: per trigger",
    )
    features: dict[str, str | int | float | bool] = Field(
        default_factory=dict, title="Other GenICam features",
        description="set by name after the options above, e.g. {GevSCPSPacketSize: 8192}",
    )
    emulation_images: str | None = Field(
        default=None, min_length=1, title="Emulation image file or folder",
        description="camera emulation only: serve this image (or the images of this folder, in turn) "
        "instead of a test pattern (ImageFilename, with ImageFileMode On and TestImageSelector Off)",
    )


def _import_pylon() -> Any:
    try:
        from pypylon import genicam, pylon
    except ImportError as exc:
        raise CameraUnavailableError(
            f"camera type 'basler' needs pypylon ({exc}); install the extra: pip install 'defectsam[basler]'"
        ) from None
    return pylon, genicam


def check_available() -> None:
    """Raise CameraUnavailableError naming the extra when pypylon is missing."""
    _import_pylon()


class BaslerSource:
    def __init__(self, config: Config) -> None:
        self._pylon, self._genicam = _import_pylon()
        pylon = self._pylon
        self._config = config
        self.pace_fps: float | None = None  # the camera (or its trigger) sets the pace
        self.skipped = 0
        self.triggerable = config.trigger == "software"
        self._pending = threading.Event()
        self._last_number: int | None = None
        self._timeout_ms = int(config.grab_timeout_s * 1000)
        try:
            factory = pylon.TlFactory.GetInstance()
            wanted = pylon.DeviceInfo()
            if config.serial is not None:
                wanted.SetSerialNumber(config.serial)
            if config.device_class is not None:
                wanted.SetDeviceClass(config.device_class)
            device = factory.CreateFirstDevice(wanted)
        except self._genicam.GenericException:
            what = f"serial {config.serial}" if config.serial else "any serial"
            raise CameraDisconnected(
                f"basler: no camera found ({what}, class {config.device_class or 'any'})"
            ) from None
        self._camera = pylon.InstantCamera(device)
        self.serial = self._camera.GetDeviceInfo().GetSerialNumber()
        self.description = f"basler:{self.serial}"
        try:
            self._camera.Open()
            self._configure()
            strategy = pylon.GrabStrategy_LatestImageOnly
            self._camera.StartGrabbing(strategy)
        except self._genicam.GenericException as exc:
            self.close()
            raise CameraDisconnected(f"{self.description}: {_first_line(exc)}") from None
        self._converter = pylon.ImageFormatConverter()
        self._out_type = pylon.PixelType_BGR8packed if config.output == "bgr" else pylon.PixelType_Mono8
        self._converter.OutputPixelFormat = self._out_type
        self._last_frame = time.monotonic()

    # -- setup --------------------------------------------------------------------------------

    def _set(self, name: str, value: str | int | float | bool) -> None:
        node = self._camera.GetNodeMap().GetNode(name)
        if not self._genicam.IsAvailable(node):
            raise CameraDisconnected(f"{self.description}: has no feature {name!r}")
        text = ("1" if value else "0") if isinstance(value, bool) else str(value)
        try:
            node.FromString(text)
        except self._genicam.GenericException as exc:
            raise CameraDisconnected(f"{self.description}: cannot set {name} = {value!r}: {_first_line(exc)}") from None

    def _set_first(self, names: tuple[str, ...], value: str | int | float | bool) -> None:
        """Set the first of ``names`` the camera has (GigE and USB3 cameras name some features differently)."""
        nodemap = self._camera.GetNodeMap()
        for name in names:
            if self._genicam.IsAvailable(nodemap.GetNode(name)):
                self._set(name, value)
                return
        raise CameraDisconnected(f"{self.description}: has none of the features {', '.join(names)}")

    def _configure(self) -> None:
        c = self._config
        if c.emulation_images is not None:
            self._set("TestImageSelector", "Off")
            self._set("ImageFileMode", "On")
            self._set("ImageFilename", c.emulation_images)
        if c.pixel_format is not None:
            self._set("PixelFormat", c.pixel_format)
        if any(value is not None for value in (c.width, c.height, c.offset_x, c.offset_y)):
            # offsets to 0 first so that a larger width and height fit, then the size, then the offsets
            self._set("OffsetX", 0)
            self._set("OffsetY", 0)
            for name, value in (("Width", c.width), ("Height", c.height), ("OffsetX", c.offset_x),
                                ("OffsetY", c.offset_y)):
                if value is not None:
                    self._set(name, value)
        if c.exposure_us is not None:
            self._set_first(("ExposureTime", "ExposureTimeAbs"), c.exposure_us)
        if c.frame_rate is not None:
            self._set("AcquisitionFrameRateEnable", True)
            self._set_first(("AcquisitionFrameRate", "AcquisitionFrameRateAbs"), c.frame_rate)
        self._set("TriggerSelector", "FrameStart")
        if c.trigger == "software":
            self._set("TriggerMode", "On")
            self._set("TriggerSource", "Software")
        else:
            self._set("TriggerMode", "Off")
        for feature, setting in c.features.items():
            self._set(feature, setting)

    # -- frames -------------------------------------------------------------------------------

    def trigger(self) -> None:
        """Ask the capture thread for one frame (called from any thread; never touches the camera)."""
        if self.triggerable:
            self._pending.set()

    def read(self) -> np.ndarray | None:
        pylon = self._pylon
        camera = self._camera
        if self._config.trigger == "software":
            if not self._pending.wait(POLL_S):
                if camera.IsCameraDeviceRemoved():
                    raise CameraDisconnected(f"{self.description}: camera removed")
                return None
            self._pending.clear()
            try:
                camera.WaitForFrameTriggerReady(self._timeout_ms, pylon.TimeoutHandling_ThrowException)
                camera.ExecuteSoftwareTrigger()
                result = camera.RetrieveResult(self._timeout_ms, pylon.TimeoutHandling_Return)
            except self._genicam.GenericException as exc:
                raise CameraDisconnected(f"{self.description}: trigger failed: {_first_line(exc)}") from None
            if not result.IsValid():
                raise CameraDisconnected(
                    f"{self.description}: no frame within {self._config.grab_timeout_s:g} s of a trigger"
                )
        else:
            try:
                result = camera.RetrieveResult(int(POLL_S * 1000), pylon.TimeoutHandling_Return)
            except self._genicam.GenericException as exc:
                raise CameraDisconnected(f"{self.description}: {_first_line(exc)}") from None
            if not result.IsValid():
                if camera.IsCameraDeviceRemoved():
                    raise CameraDisconnected(f"{self.description}: camera removed")
                if time.monotonic() - self._last_frame > self._config.grab_timeout_s:
                    raise CameraDisconnected(f"{self.description}: no frame for {self._config.grab_timeout_s:g} s")
                return None
        try:
            if not result.GrabSucceeded():
                # an incomplete buffer (a lost GigE packet): skip it, the camera is still there
                self.skipped += 1
                return None
            number = int(result.ImageNumber)
            if self._last_number is not None and number > self._last_number + 1:
                self.skipped += number - self._last_number - 1
            self._last_number = number
            if result.GetPixelType() == self._out_type:
                image = result.Array  # a copy (backed by a bytearray): safe after Release
            else:
                image = self._converter.Convert(result).GetArray()
        finally:
            result.Release()
        self._last_frame = time.monotonic()
        return image

    def close(self) -> None:
        camera = getattr(self, "_camera", None)
        if camera is None:
            return
        self._camera = None
        try:
            if camera.IsGrabbing():
                camera.StopGrabbing()
            camera.Close()
        finally:
            camera.DestroyDevice()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else exc.__class__.__name__


def open_source(config: Config) -> BaslerSource:
    return BaslerSource(config)
