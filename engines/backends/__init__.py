"""Backend plugins, chosen by ``backend.type`` in config.

The config union is built from the plugins' own models, so the config schema and the set of
backends cannot drift apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Union

from pydantic import Field

from engines.backends import onnxruntime as _onnxruntime
from engines.backends import tensorrt as _tensorrt
from engines.backends.base import EngineState, StateCallback
from engines.bundle import Bundle, load_bundle
from engines.engine import Engine

__all__ = ["BackendConfig", "EngineState", "StateCallback", "backend_names", "open_engine"]

_PLUGINS = {plugin.KEY: plugin for plugin in (_onnxruntime, _tensorrt)}

BackendConfig = Annotated[
    Union[_onnxruntime.Config, _tensorrt.Config],  # noqa: UP007 - a discriminated union needs Union
    Field(discriminator="type"),
]


def backend_names() -> list[str]:
    return sorted(_PLUGINS)


def open_engine(
    bundle: Bundle | Path | str, config: BackendConfig | None = None, *, on_state: StateCallback | None = None
) -> Engine:
    """Verify ``bundle`` (a Bundle or a path) and open it on the configured backend (ONNX Runtime by default).

    ``on_state`` hears the engine's state changes (engines.backends.base), ``building`` among them.
    """
    if not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle)
    if config is None:
        config = _onnxruntime.Config()
    return _PLUGINS[config.type].open_engine(bundle, config, on_state=on_state)
