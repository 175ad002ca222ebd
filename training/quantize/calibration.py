"""Calibration frames, and the inputs each graph sees on them, made exactly as the runtime makes them.

A calibration set is either a folder of images (``--calib DIR``: the images in DIR, or in
DIR/images) or synthetic panels (``--calib synthetic``: 4 MP ``engines.synthetic.render_frame``
frames at seeds from ``CALIBRATION_SEED``, disjoint from the training, validation and test seeds of
the project's configs). Each frame is inspected by the bundle's FP32 graphs through
``engines.inspector.Inspector`` (its default mode), and what each graph was fed is kept: the find
input of the frame, and the batches of windows the segment pass cut from it. So the ranges ONNX
Runtime calibrates are those the engines see, on the windows the find pass really picks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engines.bundle import Bundle
from engines.contract import FIND_INPUT, SEGMENT_INPUT
from engines.errors import DefectsamError
from engines.synthetic import render_frame
from training.data.folder import IMAGE_SUFFIXES, read_image
from training.data.registry import evenly_spaced

# Seeds of synthetic calibration frames. The configs train on seeds from 0, validate from 1,000,000
# and test from 2,000,000 (docs/training.md); calibration takes its own range so that the precision
# gate's held-out frames are never the frames the ranges were fitted to.
CALIBRATION_SEED = 3_000_000
SYNTHETIC = "synthetic"


@dataclass(frozen=True)
class CalibrationSet:
    """Calibration frames (uint8, as a camera gives them) and where they came from."""

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


def load_calibration(bundle: Bundle, source: str | Path, n: int, *, seed: int = CALIBRATION_SEED) -> CalibrationSet:
    """``n`` calibration frames for ``bundle`` from ``source`` (``synthetic`` or a folder). DefectsamError if none."""
    if n < 1:
        raise DefectsamError(f"--n must be at least 1 calibration frame, got {n}")
    if str(source) == SYNTHETIC:
        frames = [render_frame(seed + i).image for i in range(n)]
        return CalibrationSet(frames, f"synthetic(n={n},seed={seed},2688x1520)")
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
    return CalibrationSet([read_image(path) for path in chosen], f"folder({directory},n={len(chosen)} of {len(files)})")


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


def graph_feeds(
    bundle: Bundle, frames: Sequence[np.ndarray], *, max_batch: int = 8, windows_per_frame: int = 16
) -> dict[str, list[dict[str, np.ndarray]]]:
    """What each of the bundle's graphs is fed on ``frames``: {"find": [...], "segment": [...]}.

    The FP32 graphs inspect each frame in the Inspector's default mode; the segment feeds are
    batches of at most ``max_batch`` of the windows it cut (at most ``windows_per_frame`` per frame).
    """
    from engines.backends import open_engine
    from engines.backends.onnxruntime import Config
    from engines.inspector import Inspector

    engine = open_engine(bundle, Config(providers=["cpu"], precision="fp32"))
    feeds: dict[str, list[dict[str, np.ndarray]]] = {"find": [], "segment": []}
    try:
        inspector = Inspector(engine)
        for frame in frames:
            prepared = inspector.prepare(frame)
            if prepared.find_input is not None:
                feeds["find"].append({FIND_INPUT: prepared.find_input})
            outputs = inspector.run(prepared)
            windows = outputs.windows[:windows_per_frame]
            for start in range(0, len(windows), max_batch):
                batch = inspector.cut(frame, windows[start : start + max_batch])
                feeds["segment"].append({SEGMENT_INPUT: batch})
    finally:
        engine.close()
    return feeds
