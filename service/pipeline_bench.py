"""Pipeline benchmark: does the daemon keep up with its engine? One run, two measurements, interleaved.

The daemon (``service.app.Daemon``: camera thread, pipeline threads, HTTP server, live view and
store as configured) starts once, with the synthetic camera streaming 4 MP frames faster than the
engine can take them, so the engine is the bottleneck. After a warm-up the run alternates
``rounds`` times between

1. a pipeline window: inspected FPS, capture-to-result latency from each published record's
   stage stamps, the process's CPU; and
2. an engine-only slice: the pipeline held (``Pipeline.hold``: the engine idle, the camera still
   capturing), the daemon's own inspector (both passes, engines.inspector) run on the synthetic
   camera's own frames (its pool, at its size) in turn, ``engine_iterations`` times; FPS from the
   median latency.

The ratio pipeline FPS / engine FPS says how much the overlapped stages cost the engine (1.0:
nothing). It is taken pair by pair and the median quoted, so a shared machine whose speed drifts
over the run (the 2-core CI box swings by a third within a minute) moves both sides of each pair
together instead of deciding the figure. Resident memory is sampled once a minute; its peak is
counted from the daemon's start (the process's peak is reset there where Linux allows).

With the daemon's PLC server enabled (``plc.enabled``; ``defectsam bench report`` serves it on
loopback), the latency from capture to the result registers written is collected over the same
windows: the figure a line's PLC sees, under full load.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from engines.benchmark import reset_peak_rss, resident_mb
from engines.errors import DefectsamError
from engines.inspector import Inspector
from engines.percentiles import quantile_ms
from engines.synthetic import FRAME_HEIGHT, FRAME_WIDTH, render_frame
from service.app import Daemon
from service.capture.synthetic import SyntheticSource
from service.config import DaemonConfig
from service.pipeline.record import InspectionRecord, StageTimes


@dataclass(frozen=True)
class PipelineBenchResult:
    bundle: str
    backend: str
    frame: str
    engine_fps_median: float
    engine_latency_ms_p50: float
    engine_latency_ms_p99: float
    pipeline_fps: float
    ratio: float  # median over the rounds of pipeline FPS / engine FPS
    rounds: list[tuple[float, float, float]]  # (pipeline FPS, engine FPS, ratio) per round
    camera_fps: float
    frames_captured: int
    frames_dropped: int
    inspected: int
    window_s: float
    latency_ms_p50: float  # capture -> result published
    latency_ms_p99: float
    stage_ms_p50: dict[str, float]
    rss_mb_start: float
    rss_mb_end: float
    rss_mb_peak: float
    cpu_percent: float  # of one core, averaged over the pipeline windows
    store_written: int  # records the store wrote, warm-up and engine slices included
    store_dropped: int  # and dropped (queue full, disk full, error)
    rss_mb_series: list[tuple[float, float]] = field(default_factory=list)  # (seconds, MB), one a minute
    precision: str = ""  # of the daemon's engine: the graphs it ran (fp32, int8)
    peak_since_start: bool = False  # rss_mb_peak counts from the daemon's start (else from the process's)
    plc_results: int = 0  # results written to the PLC registers during the windows
    plc_latency_ms_p50: float | None = None  # capture -> result registers written (None: no PLC)
    plc_latency_ms_p99: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _engine_slice(inspector: Inspector, frames: list[np.ndarray], iterations: int) -> list[float]:
    """Engine-only: the whole inspection of the daemon's own frames, in turn (engines.benchmark's measure)."""
    times = []
    for i in range(iterations):
        start = time.perf_counter()
        inspector.inspect(frames[i % len(frames)])
        times.append(time.perf_counter() - start)
    return times


def bench_pipeline(
    config: DaemonConfig, *, duration_s: float = 60.0, warmup_s: float = 10.0, engine_iterations: int = 30,
    rounds: int = 6,
) -> PipelineBenchResult:
    if duration_s <= 0 or warmup_s < 0 or engine_iterations < 1 or rounds < 1:
        raise DefectsamError("--duration must be > 0, --warmup >= 0, --engine-iterations and --rounds >= 1")

    # Stage stamps only: keeping whole records (their masks) grew this process by ~7 MB a minute in a
    # 10-minute run on defect-rich frames, which the memory figure would have blamed on the daemon.
    stamps: list[StageTimes] = []
    collecting = threading.Event()

    def collect(record: InspectionRecord) -> None:
        if collecting.is_set() and record.frame is not None:
            stamps.append(record.times)

    peak_since_start = reset_peak_rss()
    daemon = Daemon(config)
    daemon.start()
    try:
        if daemon.wait_engine(120.0) != "ready" or daemon.pipeline is None:
            raise DefectsamError(f"the daemon's engine did not load: {'; '.join(daemon.not_ready())}")
        pipeline = daemon.pipeline
        engine = pipeline.engine
        plc = daemon.plc
        plc_latencies: list[float] = []
        camera = config.camera
        if camera.type == "synthetic":  # the very frames the camera plays (its pool, at its size), not 4 MP ones
            source = SyntheticSource(camera)
            frames = [source.read() for _ in range(camera.pool_size)]
            source.close()
        else:
            frames = [render_frame(seed, FRAME_WIDTH, FRAME_HEIGHT, with_masks=False).image for seed in range(4)]
        inspector = pipeline.inspector
        with pipeline.hold():
            _engine_slice(inspector, frames, 3)  # the engine's own warm-up
        pipeline.subscribe("bench", collect)
        time.sleep(warmup_s)
        rss_start, _ = resident_mb()
        series = [(0.0, round(rss_start, 1))]
        engine_times: list[float] = []
        pairs: list[tuple[float, float]] = []  # (pipeline FPS, engine FPS) per round
        inspected = captured = dropped = 0
        window = cpu = 0.0
        begun = next_sample = time.monotonic()
        next_sample += 60.0
        slice_s = duration_s / rounds
        for _ in range(rounds):
            before = daemon.snapshot()
            cpu_before, t_before = sum(os.times()[:2]), time.monotonic()
            plc_mark = plc.latencies.cursor() if plc is not None else 0
            collecting.set()
            while (now := time.monotonic()) < t_before + slice_s:
                time.sleep(min(1.0, t_before + slice_s - now))
                if now >= next_sample:
                    series.append((round(now - begun, 1), round(resident_mb()[0], 1)))
                    next_sample += 60.0
            collecting.clear()
            if plc is not None:
                plc_latencies += plc.latencies.since(plc_mark)
            after = daemon.snapshot()
            elapsed = time.monotonic() - t_before
            cpu += sum(os.times()[:2]) - cpu_before
            window += elapsed
            done = after.pipeline.frames_processed - before.pipeline.frames_processed
            inspected += done
            captured += after.camera.frames_captured - before.camera.frames_captured
            dropped += after.camera.frames_dropped - before.camera.frames_dropped
            with pipeline.hold():
                times = _engine_slice(inspector, frames, engine_iterations)
            engine_times += times
            pairs.append((done / elapsed, 1.0 / float(np.median(times))))
        store = daemon.snapshot().store
        rss_end, rss_peak = resident_mb()
        name, backend = engine.bundle.manifest.name, engine.backend_name
        precision = str(getattr(engine, "precision", engine.bundle.manifest.precision))
    finally:
        daemon.stop()

    latencies = [times.latencies() for times in stamps]
    latencies = [lat for lat in latencies if lat]
    if not latencies:
        raise DefectsamError("no frame was inspected during the window; is the camera producing frames?")
    end_to_end_s = [lat["end_to_end"] for lat in latencies]
    stages = {key: round(float(np.median([lat[key] for lat in latencies])) * 1000.0, 1)
              for key in latencies[0] if key != "end_to_end"}
    series.append((round(time.monotonic() - begun, 1), round(rss_end, 1)))
    return PipelineBenchResult(
        bundle=name,
        backend=backend,
        frame=_frame_size(config),
        engine_fps_median=round(1.0 / float(np.median(engine_times)), 2),
        engine_latency_ms_p50=_ms(engine_times, 0.50),
        engine_latency_ms_p99=_ms(engine_times, 0.99),
        pipeline_fps=round(inspected / window, 2),
        ratio=round(float(np.median([fps / engine for fps, engine in pairs])), 3),
        rounds=[(round(fps, 2), round(engine, 2), round(fps / engine, 3)) for fps, engine in pairs],
        camera_fps=round(captured / window, 2),
        frames_captured=captured,
        frames_dropped=dropped,
        inspected=inspected,
        window_s=round(window, 1),
        latency_ms_p50=_ms(end_to_end_s, 0.50),
        latency_ms_p99=_ms(end_to_end_s, 0.99),
        stage_ms_p50=stages,
        rss_mb_start=round(rss_start, 1),
        rss_mb_end=round(rss_end, 1),
        rss_mb_peak=round(rss_peak, 1),
        cpu_percent=round(100.0 * cpu / window, 1),
        store_written=store.written,
        store_dropped=sum(store.dropped.values()),
        rss_mb_series=series,
        precision=precision,
        peak_since_start=peak_since_start,
        plc_results=len(plc_latencies),
        plc_latency_ms_p50=quantile_ms(plc_latencies, 0.50),
        plc_latency_ms_p99=quantile_ms(plc_latencies, 0.99),
    )


def _ms(seconds: list[float], q: float) -> float:
    value = quantile_ms(seconds, q)
    if value is None:
        raise DefectsamError("no samples to take a percentile of")
    return value


def _frame_size(config: DaemonConfig) -> str:
    camera = config.camera
    if camera.type == "synthetic":
        return f"{camera.width}x{camera.height} synthetic"
    return f"{camera.type} camera"


def markdown_report(result: PipelineBenchResult) -> str:
    r = result
    plc = ([f"| capture -> PLC result registers written p50 / p99 ms ({r.plc_results} results) | "
            f"{r.plc_latency_ms_p50:.2f} / {r.plc_latency_ms_p99:.2f} |"]
           if r.plc_latency_ms_p50 is not None and r.plc_latency_ms_p99 is not None else [])
    return "\n".join([
        f"bundle {r.bundle} ({r.precision or 'fp32'}) on {r.backend}, {r.frame} frames",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| engine-only FPS (median of {len(r.rounds)} slices) | {r.engine_fps_median:.2f} |",
        f"| engine latency p50 / p99 ms | {r.engine_latency_ms_p50:.1f} / {r.engine_latency_ms_p99:.1f} |",
        f"| pipeline FPS (inspected, {r.window_s:.0f} s in {len(r.rounds)} windows) | {r.pipeline_fps:.2f} |",
        f"| pipeline / engine (median of the {len(r.rounds)} pairs) | {r.ratio:.3f} |",
        "| each pair: pipeline / engine FPS = ratio | "
        + ", ".join(f"{p:.1f}/{e:.1f}={q:.2f}" for p, e, q in r.rounds) + " |",
        f"| camera FPS, frames dropped at the slot | {r.camera_fps:.1f}, {r.frames_dropped} |",
        f"| capture -> result p50 / p99 ms | {r.latency_ms_p50:.1f} / {r.latency_ms_p99:.1f} |",
        *plc,
        "| stage p50 ms | " + ", ".join(f"{k} {v:.1f}" for k, v in r.stage_ms_p50.items()) + " |",
        f"| resident memory start / end / peak MB | {r.rss_mb_start:.0f} / {r.rss_mb_end:.0f} / {r.rss_mb_peak:.0f} |",
        f"| CPU (% of one core) | {r.cpu_percent:.0f} |",
        f"| records stored / dropped | {r.store_written} / {r.store_dropped} |",
    ])
