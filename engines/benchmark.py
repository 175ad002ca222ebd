"""Engine-only benchmark: latency of the fused graph on one preprocessed frame, several bundles in one run.

Bundles are timed in alternating blocks (A A A B B B A A A ...) so that drift in a shared
machine's speed falls on all of them alike; FPS is quoted from the median latency.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from engines.backends import BackendConfig, open_engine
from engines.bundle import Bundle
from engines.engine import Engine


@dataclass(frozen=True)
class EngineBenchResult:
    name: str
    arch: str
    precision: str
    weights: str
    backend: str
    parameters: int
    graph_bytes: int
    input_hw: tuple[int, int]
    k: int
    iterations: int
    latency_ms_p50: float
    latency_ms_p99: float
    latency_ms_mean: float
    fps_median: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def machine_description() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import onnxruntime

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
    }


def _bench_input(engine: Engine, seed: int) -> np.ndarray:
    shape = engine.bundle.manifest.graph_shape.input_spec().shape
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape, dtype=np.float32)  # type: ignore[arg-type]


def bench_bundles(
    bundles: list[Bundle],
    config: BackendConfig | None = None,
    *,
    warmup: int = 3,
    iterations: int = 30,
    rounds: int = 5,
    seed: int = 0,
) -> list[EngineBenchResult]:
    if iterations < 1 or warmup < 0:
        raise ValueError("iterations must be >= 1 and warmup >= 0")
    engines = [open_engine(bundle, config) for bundle in bundles]
    backends = [engine.backend_name for engine in engines]
    inputs = [_bench_input(engine, seed) for engine in engines]
    latencies: list[list[float]] = [[] for _ in engines]
    try:
        for engine, image in zip(engines, inputs, strict=True):
            for _ in range(warmup):
                engine.infer(image)
        # Blocks, not single calls, alternate: an ONNX Runtime session's threads keep spinning
        # for a while after a run and would tax whichever session runs next.
        rounds = min(rounds, iterations)
        for round_index in range(rounds):
            block = iterations // rounds + (1 if round_index < iterations % rounds else 0)
            for index, (engine, image) in enumerate(zip(engines, inputs, strict=True)):
                engine.infer(image)  # one untimed run after the switch
                for _ in range(block):
                    start = time.perf_counter()
                    engine.infer(image)
                    latencies[index].append(time.perf_counter() - start)
    finally:
        for engine in engines:
            engine.close()
    results = []
    for engine, backend, times in zip(engines, backends, latencies, strict=True):
        manifest = engine.bundle.manifest
        ms = np.asarray(times) * 1000.0
        p50 = float(np.percentile(ms, 50))
        results.append(
            EngineBenchResult(
                name=manifest.name,
                arch=manifest.arch,
                precision=manifest.precision,
                weights=manifest.provenance.weights,
                backend=backend,
                parameters=manifest.parameters,
                graph_bytes=engine.bundle.fused_graph.stat().st_size,
                input_hw=(manifest.input.height, manifest.input.width),
                k=manifest.k,
                iterations=iterations,
                latency_ms_p50=round(p50, 2),
                latency_ms_p99=round(float(np.percentile(ms, 99)), 2),
                latency_ms_mean=round(float(ms.mean()), 2),
                fps_median=round(1000.0 / p50, 2),
            )
        )
    return results


def markdown_table(results: list[EngineBenchResult]) -> str:
    """One row per bundle; the last column is the first bundle's FPS over this one's."""
    base = results[0].fps_median if results else 1.0
    lines = [
        "| bundle | arch | precision | params (M) | graph (MB) | input | K "
        "| p50 ms | p99 ms | FPS (median) | first / this |",
        "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {r.arch} | {r.precision} | {r.parameters / 1e6:.2f} | {r.graph_bytes / 1e6:.2f} | "
            f"{r.input_hw[0]}x{r.input_hw[1]} | {r.k} | {r.latency_ms_p50:.1f} | {r.latency_ms_p99:.1f} | "
            f"{r.fps_median:.1f} | {base / r.fps_median:.2f}x |"
        )
    return "\n".join(lines)
