"""What every backend plugin provides.

A plugin is one module in engines/backends/ with:

* ``KEY``: its name in config (``backend.type``),
* ``Config``: a pydantic model with ``type: Literal[KEY]`` and the backend's own options,
* ``open_engine(bundle, config) -> Engine``.

A plugin module imports only the standard library, NumPy and pydantic at import time; its
runtime package (onnxruntime, tensorrt) is imported inside ``open_engine``, and a missing one
raises BackendUnavailableError naming the backend and the extra to install.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class BackendConfigBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
