"""The ``Engine`` protocol every backend implements, and the outputs it returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from engines.bundle import Bundle


@dataclass(frozen=True)
class EngineOutputs:
    """One frame's raw outputs of the fused graph (engines.contract), batch axis dropped where noted.

    heatmap          C x h16 x w16  float32  per-class defect probability
    points           K x 2          float32  (x, y) of each peak in engine-input pixels
    point_scores     K              float32
    point_classes    K              int64
    mask_logits      K x hm x wm    float32  hm = H / mask_stride
    iou              K              float32
    image_embedding  1 x 256 x h16 x w16, or None when the backend was not asked for it
    """

    heatmap: np.ndarray
    points: np.ndarray
    point_scores: np.ndarray
    point_classes: np.ndarray
    mask_logits: np.ndarray
    iou: np.ndarray
    image_embedding: np.ndarray | None = None


@runtime_checkable
class Engine(Protocol):
    """A loaded, verified bundle ready to run on one backend."""

    bundle: Bundle

    @property
    def backend_name(self) -> str:
        """Short name of the backend and where it runs, e.g. ``onnxruntime:CPUExecutionProvider``."""
        ...

    def infer(self, image: np.ndarray, *, with_embedding: bool = False) -> EngineOutputs:
        """Run the fused graph on one preprocessed image, float32 1 x 3 x H x W (engines.preprocess)."""
        ...

    def prompt(
        self, image_embedding: np.ndarray, point_coords: np.ndarray, point_labels: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Run the decoder-only graph: embedding 1x256xh16xw16, coords 1xPx2, labels 1xP.

        Returns (mask_logits 1 x hm x wm, iou 1). Raises DefectsamError when the bundle has no decoder.
        """
        ...

    def close(self) -> None:
        """Release the backend's resources. The engine is unusable afterwards."""
        ...


def running_precision(engine: Engine) -> str:
    """The precision of the graphs ``engine`` runs: its own ``precision`` where the backend chooses among a
    bundle's graphs (ONNX Runtime: FP32 or the gated INT8 variant), else the manifest's."""
    return str(getattr(engine, "precision", None) or engine.bundle.manifest.precision)
