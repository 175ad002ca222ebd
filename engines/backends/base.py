"""What every backend plugin provides.

A plugin is one module in engines/backends/ with:

* ``KEY``: its name in config (``backend.type``),
* ``Config``: a pydantic model with ``type: Literal[KEY]`` and the backend's own options,
* ``open_engine(bundle, config, *, on_state=None) -> Engine``; ``on_state`` (an ``EngineState``
  callback) hears ``building`` when opening compiles an engine (minutes on a Jetson), then
  ``ready``, ``failed`` or, after ``close()``, ``closed``; the service shows it in /readyz.

A plugin module imports only the standard library, NumPy and pydantic at import time; its
runtime package (onnxruntime, tensorrt) is imported inside ``open_engine``, and a missing one
raises BackendUnavailableError naming the backend and the extra to install.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict

EngineState = Literal["opening", "building", "ready", "failed", "closed"]
StateCallback = Callable[[EngineState], None]


class BackendConfigBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
