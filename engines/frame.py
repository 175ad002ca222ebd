"""What a frame is: uint8, H x W (mono) or H x W x 3 (BGR), as OpenCV reads and cameras deliver it."""

from __future__ import annotations

import numpy as np

from engines.errors import DefectsamError


def check_frame(frame: np.ndarray) -> None:
    """Raise DefectsamError unless ``frame`` is a uint8 mono or BGR image."""
    if not isinstance(frame, np.ndarray):
        raise DefectsamError(f"frame must be a NumPy array, got {type(frame).__name__}")
    if frame.dtype != np.uint8:
        raise DefectsamError(f"frame must be uint8, got {frame.dtype}")
    if frame.ndim == 3 and frame.shape[2] not in (1, 3):
        raise DefectsamError(f"frame must have 1 or 3 channels, got {frame.shape[2]}")
    if frame.ndim not in (2, 3) or frame.shape[0] < 1 or frame.shape[1] < 1:
        raise DefectsamError(f"frame must be H x W or H x W x C with H, W >= 1, got shape {frame.shape}")
