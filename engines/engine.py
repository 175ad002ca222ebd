"""The ``Engine`` protocol every backend implements: the bundle's two graphs, ready to run."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from engines.bundle import Bundle


@runtime_checkable
class Engine(Protocol):
    """A loaded, verified bundle ready to run on one backend."""

    bundle: Bundle

    @property
    def backend_name(self) -> str:
        """Short name of the backend and where it runs, e.g. ``onnxruntime:CPUExecutionProvider``."""
        ...

    @property
    def has_find(self) -> bool:
        """Whether the bundle has a find graph (else it inspects by tiles or whole frames)."""
        ...

    def find(self, image: np.ndarray) -> np.ndarray:
        """Run the find graph on one find input, float32 1 x 3 x h x w (engines.find).

        Returns the candidate probabilities, float32 h/8 x w/8. Raises DefectsamError without a find graph.
        """
        ...

    def segment(self, windows: np.ndarray) -> np.ndarray:
        """Run the segment graph on a batch of windows, float32 B x 3 x H x W (engines.preprocess).

        Returns class probabilities, float32 B x (C+1) x H x W (channel 0 background).
        """
        ...

    def close(self) -> None:
        """Release the backend's resources. The engine is unusable afterwards."""
        ...


def running_precision(engine: Engine) -> str:
    """The precision of the graphs ``engine`` runs: its own ``precision`` where the backend chooses among a
    bundle's graphs (ONNX Runtime: FP32 or the gated INT8 variant), else the manifest's."""
    return str(getattr(engine, "precision", None) or engine.bundle.manifest.precision)
