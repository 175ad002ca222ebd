"""Calibration frames: engine inputs preprocessed exactly as the runtime does, and readers feeding them to ORT.

A calibration set is either a folder of images (``--calib DIR``: the images in DIR, or in
DIR/images) or synthetic panels (``--calib synthetic``: ``engines.synthetic.render_frame`` at
seeds from ``CALIBRATION_SEED``, disjoint from the training, validation and test seeds of the
project's configs). Every frame goes through ``engines.preprocess.Preprocessor``, the runtime's
own letterbox and normalisation, so the ranges ONNX Runtime calibrates are those the engine sees.

The decoder-only graph is calibrated on what it is fed at run time: the FP32 fused graph's image
embedding of each calibration frame, prompted with one foreground point at each of its peaks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engines.bundle import Bundle
from engines.contract import DECODER_INPUT_NAMES, INPUT_NAME, LABEL_FOREGROUND
from engines.errors import DefectsamError
from engines.preprocess import Preprocessor
from engines.synthetic import FRAME_HEIGHT, FRAME_WIDTH, render_frame
from training.data.folder import IMAGE_SUFFIXES, read_image
from training.data.registry import evenly_spaced

# Seeds of synthetic calibration frames. The configs train on seeds from 0, validate from 1,000,000
# and test from 2,000,000 (docs/training.md); calibration takes its own range so that the precision
# gate's held-out frames are never the frames the ranges were fitted to.
CALIBRATION_SEED = 3_000_000
SYNTHETIC = "synthetic"


@dataclass(frozen=True)
class CalibrationSet:
    """Preprocessed engine inputs (each float32 1x3xHxW) and where they came from."""

    frames: list[np.ndarray]
    source: str

    def __len__(self) -> int:
        return len(self.frames)


def image_files(directory: Path) -> list[Path]:
    """The image files directly in ``directory``, else in ``directory/images``; sorted by name."""
    for folder in (directory, directory / "images"):
        if folder.is_dir():
            found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if found:
                return found
    return []


def synthetic_pixel_scale(width: int, height: int) -> float:
    """The defect scale of a full 4 MP frame letterboxed to width x height (as training.data.synthetic)."""
    return min(max(min(width / FRAME_WIDTH, height / FRAME_HEIGHT), 0.05), 4.0)


def load_calibration(bundle: Bundle, source: str | Path, n: int, *, seed: int = CALIBRATION_SEED) -> CalibrationSet:
    """``n`` calibration frames for ``bundle`` from ``source`` (``synthetic`` or a folder). DefectsamError if none."""
    if n < 1:
        raise DefectsamError(f"--n must be at least 1 calibration frame, got {n}")
    spec = bundle.manifest.input
    preprocess = Preprocessor(spec)
    if str(source) == SYNTHETIC:
        scale = synthetic_pixel_scale(spec.width, spec.height)
        frames = [
            preprocess(render_frame(seed + i, spec.width, spec.height, pixel_scale=scale).image)[0] for i in range(n)
        ]
        return CalibrationSet(frames, f"synthetic(n={n},seed={seed},{spec.width}x{spec.height})")
    directory = Path(source)
    if not directory.exists():
        raise DefectsamError(f"--calib {directory}: no such directory (give a folder of images, or 'synthetic')")
    if not directory.is_dir():
        raise DefectsamError(f"--calib {directory}: is not a directory (give a folder of images, or 'synthetic')")
    files = image_files(directory)
    if not files:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise DefectsamError(f"--calib {directory}: holds no images ({suffixes}), neither directly nor in images/")
    chosen = [files[i] for i in evenly_spaced(len(files), n)]
    frames = [preprocess(read_image(path))[0] for path in chosen]
    return CalibrationSet(frames, f"folder({directory},n={len(frames)} of {len(files)})")


class FeedReader:
    """An ``onnxruntime.quantization.CalibrationDataReader`` over prepared feeds (dicts of name -> array).

    ORT's base class is not subclassed so that importing this module needs no ONNX Runtime; ORT only
    calls ``get_next`` (and ``rewind`` / ``__len__`` where it strides).
    """

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]) -> None:
        self._feeds = list(feeds)
        self._iter: Iterator[dict[str, np.ndarray]] = iter(self._feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = iter(self._feeds)

    def __len__(self) -> int:
        return len(self._feeds)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self._feeds)


def fused_feeds(calibration: CalibrationSet) -> list[dict[str, np.ndarray]]:
    return [{INPUT_NAME: frame} for frame in calibration.frames]


def decoder_feeds(fp32_session: Any, calibration: CalibrationSet, prompts_per_frame: int = 4) -> list[dict[str, Any]]:
    """Decoder inputs as the runtime feeds them: the FP32 embedding, one foreground point at each peak."""
    feeds: list[dict[str, Any]] = []
    labels = np.full((1, 1), LABEL_FOREGROUND, dtype=np.float32)
    for frame in calibration.frames:
        embedding, points = fp32_session.run(["image_embedding", "points"], {INPUT_NAME: frame})
        for point in points[:prompts_per_frame]:
            coords = np.ascontiguousarray(point.reshape(1, 1, 2), dtype=np.float32)  # x, y -> 1x1x2
            feeds.append(dict(zip(DECODER_INPUT_NAMES, (embedding, coords, labels), strict=True)))
    return feeds
