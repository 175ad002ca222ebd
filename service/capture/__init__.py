"""Camera sources, chosen by ``camera.type`` in config, each run by a CameraWorker in its own thread.

The config union is built from the plugins' own models, so the config schema and the set of
camera types cannot drift apart. See service/capture/base.py for what a plugin provides.
"""

from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import Field, TypeAdapter, ValidationError

from service.capture import basler as _basler
from service.capture import files as _files
from service.capture import opencv as _opencv
from service.capture import synthetic as _synthetic
from service.capture.base import (
    CameraConfigBase,
    CameraDisconnected,
    CameraError,
    CameraState,
    CameraStats,
    CameraUnavailableError,
    CameraWorker,
    EndOfStream,
    Frame,
    FrameSource,
    LatestFrameSlot,
    ReconnectConfig,
)

__all__ = [
    "CameraConfig",
    "CameraConfigBase",
    "CameraConfigError",
    "CameraDisconnected",
    "CameraError",
    "CameraState",
    "CameraStats",
    "CameraUnavailableError",
    "CameraWorker",
    "EndOfStream",
    "Frame",
    "FrameSource",
    "LatestFrameSlot",
    "ReconnectConfig",
    "camera_types",
    "check_available",
    "create_worker",
    "open_source",
    "parse_camera_config",
]

_PLUGINS = {plugin.KEY: plugin for plugin in (_synthetic, _files, _opencv, _basler)}

CameraConfig = Annotated[
    Union[_synthetic.Config, _files.Config, _opencv.Config, _basler.Config],  # noqa: UP007 - a discriminated union needs Union
    Field(discriminator="type"),
]

_ADAPTER: TypeAdapter[Any] = TypeAdapter(CameraConfig)


class CameraConfigError(CameraError):
    """A camera config that does not validate; one line per problem, each naming the dotted key."""


def camera_types() -> list[str]:
    return sorted(_PLUGINS)


def parse_camera_config(data: Any, *, key: str = "camera") -> CameraConfig:
    """Validate a camera config mapping; errors name the dotted key (``camera.fps: ...``)."""
    try:
        config: CameraConfig = _ADAPTER.validate_python(data)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            loc = [str(part) for part in error["loc"]]
            got = error.get("input")
            if loc and isinstance(data, dict) and loc[0] == data.get("type"):
                loc = loc[1:]  # pydantic puts the union's tag first; the key path does not have it
            elif error["type"] in ("union_tag_invalid", "union_tag_not_found"):
                loc = [*loc, "type"]
                got = data.get("type") if isinstance(data, dict) else data
                error["msg"] = f"must be one of {', '.join(repr(name) for name in camera_types())}"
            where = ".".join([key, *loc])
            lines.append(f"{where}: {error['msg']} (got {got!r})")
        raise CameraConfigError("; ".join(lines)) from None
    return config


def check_available(config: CameraConfig) -> None:
    """Raise CameraUnavailableError (naming the extra) when the camera type's optional package is missing."""
    check = getattr(_PLUGINS[config.type], "check_available", None)
    if check is not None:
        check()


def open_source(config: CameraConfig) -> FrameSource:
    """Open the configured camera (blocking; normally called by a CameraWorker in its thread)."""
    source: FrameSource = _PLUGINS[config.type].open_source(config)
    return source


def create_worker(config: CameraConfig, slot: LatestFrameSlot | None = None, *, name: str = "camera0") -> CameraWorker:
    """A CameraWorker for ``config``, not started; fails now if the camera type cannot run here."""
    check_available(config)
    return CameraWorker(config, slot, name=name)
