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
from engines.bundle import Bundle, load_bundle
from engines.engine import Engine

_PLUGINS = {plugin.KEY: plugin for plugin in (_onnxruntime, _tensorrt)}

BackendConfig = Annotated[
    Union[_onnxruntime.Config, _tensorrt.Config],  # noqa: UP007 - a discriminated union needs Union
    Field(discriminator="type"),
]


def backend_names() -> list[str]:
    return sorted(_PLUGINS)


def open_engine(bundle: Bundle | Path | str, config: BackendConfig | None = None) -> Engine:
    """Verify ``bundle`` (a Bundle or a path) and open it on the configured backend (ONNX Runtime by default)."""
    if not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle)
    if config is None:
        config = _onnxruntime.Config()
    return _PLUGINS[config.type].open_engine(bundle, config)
