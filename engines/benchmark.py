"""Engine-only benchmark: latency of the fused graph on one preprocessed frame, several bundles in one run.

A bundle with an INT8 variant is timed at each precision as two entries (``configs``), so FP32 and
INT8 of the same model come from one run on the same machine state.

Bundles are timed in alternating blocks (A A A B B B A A A ...) so that drift in a shared
machine's speed falls on all of them alike; FPS is quoted from the median latency.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engines.backends import BackendConfig, open_engine
from engines.bundle import Bundle
from engines.engine import Engine


@dataclass(frozen=True)
class EngineBenchResult:
    name: str
    path: str
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
    configs: Sequence[BackendConfig] | None = None,
    warmup: int = 3,
    iterations: int = 30,
    rounds: int = 5,
    seed: int = 0,
) -> list[EngineBenchResult]:
    """Time each bundle's engine; ``configs`` (one per bundle) overrides ``config``, e.g. to time the FP32
    and the INT8 graphs of one bundle side by side (the same bundle twice, ``precision`` fp32 and int8)."""
    if iterations < 1 or warmup < 0:
        raise ValueError("iterations must be >= 1 and warmup >= 0")
    if configs is not None and len(configs) != len(bundles):
        raise ValueError("configs must hold one backend config per bundle")
    per_bundle = list(configs) if configs is not None else [config] * len(bundles)
    engines: list[Engine] = []
    try:
        for bundle, bundle_config in zip(bundles, per_bundle, strict=True):
            engines.append(open_engine(bundle, bundle_config))
    except BaseException:
        for engine in engines:
            engine.close()
        raise
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
        graph: Path = getattr(engine, "graph_path", engine.bundle.fused_graph)
        results.append(
            EngineBenchResult(
                name=manifest.name,
                path=str(engine.bundle.path),
                arch=manifest.arch,
                precision=str(getattr(engine, "precision", manifest.precision)),
                weights=manifest.provenance.weights,
                backend=backend,
                parameters=manifest.parameters,
                graph_bytes=graph.stat().st_size,
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


def precision_ratios(results: list[EngineBenchResult]) -> list[str]:
    """One line per bundle timed at more than one precision: each precision's FPS over the first's."""
    lines = []
    by_path: dict[str, list[EngineBenchResult]] = {}
    for r in results:
        by_path.setdefault(r.path, []).append(r)
    names = [rows[0].name for rows in by_path.values()]
    for path, rows in by_path.items():
        base = rows[0]
        label = base.name if names.count(base.name) == 1 else f"{base.name} ({path})"
        for other in rows[1:]:
            if other.precision == base.precision:
                continue
            lines.append(
                f"{label}: {other.precision} / {base.precision} = {other.fps_median / base.fps_median:.2f}x FPS "
                f"(median latency {other.latency_ms_p50:.1f} ms vs {base.latency_ms_p50:.1f} ms; graph "
                f"{other.graph_bytes / 1e6:.2f} MB vs {base.graph_bytes / 1e6:.2f} MB)"
            )
    return lines
