"""What the pipeline publishes, counted: verdicts, defects per class, per-stage latency histograms, frame rate.

``PipelineCounters`` is fed by the pipeline's publishing thread; ``snapshot()`` is the pipeline's part of
the daemon's stats (``service.metrics.StatsSnapshot.pipeline``), which /api/status and /metrics render.
"""

from __future__ import annotations

import bisect
import collections
import threading
import time
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field

from engines.percentiles import quantile_ms
from engines.results import Verdict
from service.pipeline.record import STAGES, InspectionRecord

# Upper bounds in seconds; a 4 MP frame through a CPU engine takes 50-500 ms, a Jetson 10-50 ms.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
                   1.0, 2.0, 5.0)
FPS_WINDOW_S = 5.0
_RECENT = 256  # latencies kept per stage for the status page's recent percentiles


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True)


class LatencyStats(_Model):
    """One stage's latency: cumulative histogram since start, percentiles of the recent frames."""

    count: int = Field(description="frames measured since start")
    sum_s: float = Field(description="total seconds since start")
    buckets: list[tuple[float | None, int]] = Field(
        description="(upper bound s, cumulative count), as Prometheus has it; the last bound, +Inf, is null")
    recent_p50_ms: float | None = Field(description="median of the last frames (up to 256)")
    recent_p95_ms: float | None = Field(description="95th percentile of the last frames")
    recent_max_ms: float | None = Field(description="slowest of the last frames")


class PipelineStats(_Model):
    mode: str
    running: bool
    frames_processed: int = Field(description="frames inspected since start")
    fps: float = Field(description="frames inspected per second over the last 5 s")
    errors: int = Field(description="frames whose inspection raised (published as NO_FRAME)")
    verdicts: dict[str, int] = Field(description="results per verdict since start")
    defects: dict[str, int] = Field(description="defects found per class since start")
    triggers: dict[str, int] = Field(description="triggers per outcome: inspected, no_frame, overflow")
    latency: dict[str, LatencyStats] = Field(description="per stage: " + ", ".join(STAGES))
    last_inspection_id: int | None
    last_result_age_s: float | None = Field(description="seconds since the last result was published")


class PipelineCounters:
    """Thread-safe accumulators fed by the pipeline's publishing thread."""

    def __init__(self, mode: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.mode = mode
        self._clock = clock
        self._lock = threading.Lock()
        self._processed = 0
        self._errors = 0
        self._verdicts = dict.fromkeys((v.name for v in Verdict), 0)
        self._defects: collections.Counter[str] = collections.Counter()
        self._triggers = {"inspected": 0, "no_frame": 0, "overflow": 0}
        self._hist = {stage: [0] * (len(LATENCY_BUCKETS) + 1) for stage in STAGES}  # per bucket, +Inf last
        self._sum = dict.fromkeys(STAGES, 0.0)
        self._count = dict.fromkeys(STAGES, 0)
        self._recent: dict[str, collections.deque[float]] = {
            stage: collections.deque(maxlen=_RECENT) for stage in STAGES
        }
        self._done: collections.deque[float] = collections.deque(maxlen=4096)
        self._last_id: int | None = None
        self._last_at: float | None = None
        self.running = False

    def record(self, record: InspectionRecord) -> None:
        latencies = record.times.latencies()
        now = self._clock()
        with self._lock:
            self._verdicts[record.verdict.name] += 1
            for defect in record.result.defects:
                self._defects[defect.class_name] += 1
            if latencies:
                self._processed += 1
                self._done.append(now)
            for stage, seconds in latencies.items():
                self._hist[stage][bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
                self._sum[stage] += seconds
                self._count[stage] += 1
                self._recent[stage].append(seconds)
            if record.trigger_id is not None:
                self._triggers["inspected" if record.frame is not None else "no_frame"] += 1
            self._last_id = record.inspection_id
            self._last_at = now

    def error(self) -> None:
        with self._lock:
            self._errors += 1

    def overflow(self) -> None:
        with self._lock:
            self._triggers["overflow"] += 1

    def snapshot(self) -> PipelineStats:
        now = self._clock()
        with self._lock:
            while self._done and self._done[0] < now - FPS_WINDOW_S:
                self._done.popleft()
            fps = (len(self._done) - 1) / max(now - self._done[0], 1e-6) if len(self._done) >= 2 else 0.0
            latency = {}
            for stage in STAGES:
                cumulative, buckets = 0, []
                for bound, n in zip((*LATENCY_BUCKETS, float("inf")), self._hist[stage], strict=True):
                    cumulative += n
                    buckets.append((None if bound == float("inf") else bound, cumulative))  # JSON has no +Inf
                recent = list(self._recent[stage])
                latency[stage] = LatencyStats(
                    count=self._count[stage], sum_s=self._sum[stage], buckets=buckets,
                    recent_p50_ms=quantile_ms(recent, 0.50), recent_p95_ms=quantile_ms(recent, 0.95),
                    recent_max_ms=round(max(recent) * 1000, 2) if recent else None,
                )
            return PipelineStats(
                mode=self.mode, running=self.running, frames_processed=self._processed, fps=round(fps, 3),
                errors=self._errors, verdicts=dict(self._verdicts), defects=dict(self._defects),
                triggers=dict(self._triggers), latency=latency, last_inspection_id=self._last_id,
                last_result_age_s=None if self._last_at is None else round(now - self._last_at, 3),
            )
