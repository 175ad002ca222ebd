"""What the pipeline publishes for every inspected frame (and every trigger that got none)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np

from engines.results import InspectionResult, Verdict

# Latency stages, in the order a frame passes them; names are also the metric's `stage` label.
STAGES = ("capture_to_preprocess", "preprocess", "infer", "postprocess", "end_to_end")


@dataclass(frozen=True)
class StageTimes:
    """time.monotonic() stamps of one frame through the pipeline (0.0: the stage did not run)."""

    captured: float = 0.0
    preprocess_start: float = 0.0
    preprocess_done: float = 0.0
    infer_done: float = 0.0
    post_done: float = 0.0
    triggered: float = 0.0  # when the trigger was requested; 0.0 in free run

    def latencies(self) -> dict[str, float]:
        """Seconds per stage (STAGES); empty for a result that never reached the engine."""
        if not self.post_done or not self.captured:
            return {}
        return {
            "capture_to_preprocess": max(0.0, self.preprocess_start - self.captured),
            "preprocess": self.preprocess_done - self.preprocess_start,
            "infer": self.infer_done - self.preprocess_done,
            "postprocess": self.post_done - self.infer_done,
            "end_to_end": self.post_done - self.captured,
        }


@dataclass(frozen=True)
class InspectionRecord:
    """One published result: the verdict and defects, where the frame came from, and when.

    ``frame`` is the camera's own array (never copied, never mutated); ``None`` for NO_FRAME.
    ``inspection_id`` is unique across restarts and crashes (service.ids: blocks reserved on disk first).
    """

    inspection_id: int
    acquisition_id: int  # the camera's frame counter; 0 when no frame was captured
    source: str
    result: InspectionResult
    wall_time: float  # time.time() of the capture (of the trigger for NO_FRAME)
    times: StageTimes
    bundle: str
    part_id: str | None = None
    trigger_id: int | None = None
    reason: str | None = None  # why a NO_FRAME result has no frame
    frame: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def verdict(self) -> Verdict:
        return self.result.verdict

    def without_frame(self) -> InspectionRecord:
        return dataclasses.replace(self, frame=None)

    def to_dict(self, *, with_polygons: bool = True) -> dict[str, Any]:
        result = self.result.to_dict(with_polygons=with_polygons)
        result.pop("timings_ms", None)
        return {
            "id": self.inspection_id,
            "acquisition_id": self.acquisition_id,
            "part_id": self.part_id,
            "trigger_id": self.trigger_id,
            "source": self.source,
            "bundle": self.bundle,
            "captured_at": iso_time(self.wall_time),
            "wall_time": round(self.wall_time, 6),
            **result,
            "reason": self.reason,
            "latency_ms": {k: round(v * 1000.0, 2) for k, v in self.times.latencies().items()},
        }


def no_frame_result() -> InspectionResult:
    return InspectionResult(frame_width=0, frame_height=0, verdict=Verdict.NO_FRAME, defects=(), max_peak_score=0.0)


def iso_time(wall_time: float) -> str:
    return datetime.fromtimestamp(wall_time, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
