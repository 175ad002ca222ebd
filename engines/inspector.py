"""One frame, both passes: find -> windows -> segment -> merge -> defects, with each step timed.

    frame --prepare--> find input (grey block mean/min/max, 1/r scale)           engines/find.py
          --run------> find graph -> candidate cells -> 1:1 windows            engines/windows.py
                       -> windows cut and normalised -> segment graph          engines/preprocess.py
          --finish---> windows merged into frame coordinates -> defects, verdict  engines/postprocess.py

The daemon's pipeline runs ``prepare``, ``run`` and ``finish`` on its three stage threads;
``inspect`` chains them for one-shot use (``defectsam infer``, evaluation, tests).

Modes (``InspectionConfig.mode``): ``windows`` (the find pass chooses where to look: fast),
``tiles`` (1:1 tiles over the whole frame: slow, the full scan for hairlines the find pass may
miss), ``whole`` (the frame is one window: small frames and the crop datasets); ``auto`` takes
windows when the bundle has a find graph and the frame is larger than a window, else tiles when
the frame is larger than a window, else whole (the bundle's window only: a window set in the
config that is larger than the frame is refused, FrameGeometryError).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from engines.engine import Engine
from engines.errors import DefectsamError, FrameGeometryError
from engines.find import FindGeometry, FindPreprocessor
from engines.frame import check_frame
from engines.postprocess import PostprocessConfig, Postprocessor, with_calibrated
from engines.preprocess import WindowCutter
from engines.results import InspectionResult
from engines.windows import (
    Canvas,
    Window,
    candidate_windows,
    check_window,
    merge_windows,
    tile_windows,
    whole_window,
)

Mode = Literal["windows", "tiles", "whole"]
DEFAULT_CANDIDATE_THRESHOLD = 0.3


class InspectionConfig(BaseModel):
    """Where the segment pass looks (both passes' runtime settings; the bundle gives the defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["auto", "windows", "tiles", "whole"] = Field(
        default="auto", title="Inspection mode",
        description="windows: the find pass picks 1:1 windows (fast); tiles: 1:1 tiles over the whole frame (slow, "
        "misses no hairline the segmenter sees); whole: the frame as one window (small frames); auto: windows "
        "with a find graph, else tiles, else whole for a frame no larger than a window",
    )
    window: int | None = Field(
        default=None, ge=16, multiple_of=16, title="Window side",
        description="frame pixels (1:1), a multiple of 16; unset: the bundle's segment.window",
    )
    max_windows: int | None = Field(
        default=None, ge=1, le=256, title="Most windows per frame",
        description="windows mode: the find pass's cells beyond this stay uncovered (then UNCERTAIN if no defect); "
        "unset: the bundle's segment.max_windows",
    )
    margin: int = Field(
        default=16, ge=0, le=64, title="Window margin",
        description="pixels at each window edge that count as seen but not covered: a cell there gets its own window",
    )
    tile_overlap: int = Field(
        default=32, ge=0, title="Tile overlap",
        description="tiles mode: pixels neighbours share; unset, at most half the window",
    )
    candidate_threshold: float | None = Field(
        default=None, ge=0.0, le=1.0, title="Candidate threshold",
        description="find-pass probability at which a cell gets a window; unset: the bundle's calibrated value, "
        f"else {DEFAULT_CANDIDATE_THRESHOLD}",
    )
    batch: int = Field(default=16, ge=1, le=256, title="Windows per segment call")


@dataclass
class Prepared:
    """A frame ready for ``Inspector.run``: the find input where the mode has a find pass."""

    frame: np.ndarray
    mode: Mode
    find_input: np.ndarray | None = None
    geometry: FindGeometry | None = None
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class PassOutputs:
    """What both passes saw of one frame: the windows and their class probabilities (B x (C+1) x h x w)."""

    frame_width: int
    frame_height: int
    mode: Mode
    windows: list[Window]
    probs: np.ndarray
    candidates: np.ndarray | None  # the find pass's probabilities (cells), or None
    uncovered: float  # highest candidate left without a window (max_windows ran out), else 0
    timings: dict[str, float] = field(default_factory=dict)


class Inspector:
    def __init__(
        self, engine: Engine, inspection: InspectionConfig | None = None, postprocess: PostprocessConfig | None = None
    ) -> None:
        manifest = engine.bundle.manifest
        self.engine = engine
        self.config = inspection or InspectionConfig()
        self.window = self.config.window or manifest.segment.window
        self.max_windows = self.config.max_windows or manifest.segment.max_windows
        calibrated = manifest.thresholds.candidate_threshold if manifest.thresholds else None
        self.candidate_threshold = (
            self.config.candidate_threshold if self.config.candidate_threshold is not None
            else calibrated if calibrated is not None else DEFAULT_CANDIDATE_THRESHOLD
        )
        if self.config.mode == "windows" and manifest.find is None:
            raise DefectsamError(
                f"inspection.mode windows needs a find graph, and bundle {manifest.name!r} has none "
                "(use tiles or whole)"
            )
        # The default overlap shrinks to half of a small window; one asked for must fit as it is.
        explicit = "tile_overlap" in self.config.model_fields_set
        self.tile_overlap = self.config.tile_overlap if explicit else min(self.config.tile_overlap, self.window // 2)
        if self.tile_overlap >= self.window:
            raise DefectsamError(
                f"inspection.tile_overlap ({self.tile_overlap}) must be smaller than the window ({self.window})"
            )
        self.find_preprocess = FindPreprocessor(manifest.find) if manifest.find is not None else None
        self.cut = WindowCutter(manifest.segment)
        self.postprocess = Postprocessor(manifest.classes, with_calibrated(postprocess, manifest.thresholds))
        self.last_windows = 0  # windows the last finished frame was inspected with (benchmarks, metrics)

    def mode_for(self, frame_width: int, frame_height: int) -> Mode:
        """The mode a frame of this size is inspected in; DefectsamError when it cannot be (too small)."""
        mode = self.config.mode
        fits = self.window <= frame_width and self.window <= frame_height
        if mode == "auto":
            if not fits and self.config.window is not None:
                # A window asked for by name that does not fit is refused, not quietly replaced by the frame.
                try:
                    check_window(self.window, frame_width, frame_height)
                except ValueError as exc:
                    raise FrameGeometryError(str(exc)) from None
            if not fits:
                return "whole"
            return "windows" if self.find_preprocess is not None else "tiles"
        if mode in ("windows", "tiles"):
            try:
                check_window(self.window, frame_width, frame_height)
            except ValueError as exc:
                raise FrameGeometryError(str(exc)) from None
        return mode

    def prepare(self, frame: np.ndarray) -> Prepared:
        """The frame's find input (windows mode), timed."""
        check_frame(frame)
        t0 = time.perf_counter()
        mode = self.mode_for(frame.shape[1], frame.shape[0])
        prepared = Prepared(frame=frame, mode=mode)
        if mode == "windows":
            assert self.find_preprocess is not None  # mode_for chose windows only with one
            prepared.find_input, prepared.geometry = self.find_preprocess(frame)
        prepared.timings["preprocess"] = time.perf_counter() - t0
        return prepared

    def run(self, prepared: Prepared) -> PassOutputs:
        """Both passes: the find graph (windows mode), the windows, the segment graph on them."""
        frame = prepared.frame
        height, width = frame.shape[:2]
        timings = dict(prepared.timings)
        t0 = time.perf_counter()
        candidates: np.ndarray | None = None
        uncovered = 0.0
        if prepared.mode == "windows":
            assert prepared.find_input is not None and prepared.geometry is not None
            candidates = self.engine.find(prepared.find_input)
            t1 = time.perf_counter()
            timings["find"] = t1 - t0
            windows, uncovered = candidate_windows(
                candidates, prepared.geometry, window=self.window, max_windows=self.max_windows,
                threshold=self.candidate_threshold, margin=self.config.margin,
            )
            t0 = t1
        elif prepared.mode == "tiles":
            windows = tile_windows(width, height, window=self.window, overlap=self.tile_overlap)
        else:
            windows = [whole_window(width, height)]
        channels = len(self.engine.bundle.manifest.classes) + 1
        if windows:
            batches = []
            for start in range(0, len(windows), self.config.batch):
                batches.append(self.engine.segment(self.cut(frame, windows[start : start + self.config.batch])))
            probs = batches[0] if len(batches) == 1 else np.concatenate(batches)
        else:
            probs = np.zeros((0, channels, self.window, self.window), np.float32)
        timings["segment"] = time.perf_counter() - t0
        return PassOutputs(width, height, prepared.mode, windows, probs, candidates, uncovered, timings)

    def merge(self, outputs: PassOutputs) -> list[Canvas]:
        """The windows' probabilities in frame coordinates (engines.windows.merge_windows)."""
        return merge_windows(outputs.windows, outputs.probs, outputs.frame_width, outputs.frame_height,
                             ramp=max(1, self.config.margin))

    def finish(self, outputs: PassOutputs, canvases: list[Canvas] | None = None) -> InspectionResult:
        """Merge the windows and make the defects and the verdict; the result carries every step's time."""
        t0 = time.perf_counter()
        canvases = self.merge(outputs) if canvases is None else canvases
        result = self.postprocess(
            canvases, outputs.frame_width, outputs.frame_height, uncovered=outputs.uncovered,
            uncovered_threshold=self.candidate_threshold,
        )
        timings = dict(outputs.timings)
        timings["postprocess"] = time.perf_counter() - t0
        self.last_windows = len(outputs.windows)
        timings["total"] = sum(timings[k] for k in ("preprocess", "find", "segment", "postprocess") if k in timings)
        result.timings.update(timings)
        return result

    def inspect(self, frame: np.ndarray) -> InspectionResult:
        """uint8 frame (mono or BGR) -> InspectionResult with timings (seconds) per step."""
        return self.finish(self.run(self.prepare(frame)))
