"""Engine-only benchmark: the whole inspection of a frame in memory (both passes), several engines in one run.

A bundle's row times ``engines.inspector.Inspector.inspect`` on real frames (the synthetic test
panels, 2688 x 1520, cycled): the find input, the find graph, the windows it picks, their cutting,
the segment graph, the merge and the defects. No camera, no daemon, no disk: what the daemon adds
is ``defectsam bench pipeline``'s. The row also gives the median time of each step and the median
number of windows per frame. A bundle with an INT8 variant is timed at each precision as two
entries (``configs``), so FP32 and INT8 of the same model come from one run on the same machine state.

A reference architecture that is not a contract bundle (the SAM 2 teacher: image + points -> masks,
``defectsam-train export-reference``) is a *reference graph*: a directory with ``model.onnx``, the
inputs it is timed with (``inputs.npz``) and ``reference.json`` saying what it is. It is timed on
ONNX Runtime with the same session settings as a bundle (``bench_engines``).

Engines are timed in alternating blocks (A A A B B B A A A ...) so that drift in a shared
machine's speed falls on all of them alike; FPS is quoted from the median latency. Each row also
says how many cores the process kept busy while it ran (CPU time / wall time) and how much resident
memory opening and warming it up added.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engines.backends import BackendConfig, open_engine
from engines.backends.onnxruntime import Config as OnnxRuntimeConfig
from engines.backends.onnxruntime import resolve_providers
from engines.bundle import Bundle, sha256_file
from engines.errors import BundleError, DefectsamError
from engines.percentiles import quantile

REFERENCE_FILE = "reference.json"
REFERENCE_INPUTS_FILE = "inputs.npz"
REFERENCE_SCHEMA_VERSION = 1


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
    input_hw: tuple[int, int]  # the frame (bundles) or the model input (reference graphs), H x W
    windows: float  # median windows per frame (reference graphs: their prompts K)
    iterations: int
    latency_ms_p50: float
    latency_ms_p99: float
    latency_ms_mean: float
    fps_median: float
    cpu_cores: float = 0.0  # process CPU time / wall time over the timed runs
    rss_mb_added: float = 0.0  # resident memory that opening and warming up the engine added
    model_input_hw: tuple[int, int] | None = None  # what the model runs at, where not input_hw (SAM 2: a square)
    mode: str = ""  # the inspection mode (windows, tiles, whole); reference graphs: ""
    window: int = 0
    steps_ms: dict[str, float] | None = None  # median ms of each inspection step
    notes: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Size(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    height: int = Field(gt=0)
    width: int = Field(gt=0)


class ReferenceManifest(BaseModel):
    """``reference.json``: a reference graph, written by ``defectsam-train export-reference``."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    schema_version: int = Field(ge=1, le=REFERENCE_SCHEMA_VERSION)
    name: str = Field(min_length=1)
    arch: str = Field(min_length=1)
    created: str
    graph: str = Field(description="the ONNX file")
    inputs: str = Field(description="an .npz with one array per graph input, fed as is")
    input: _Size = Field(description="the frame tensor it takes (the student's input size)")
    model_input: _Size = Field(description="the size the model itself runs at")
    k: int = Field(alias="K", ge=1)
    parameters: int = Field(ge=0)
    precision: str
    weights: str
    notes: str = ""
    provenance: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, str] = Field(description="file name -> sha256 hex digest")


@dataclass(frozen=True)
class ReferenceGraph:
    path: Path
    manifest: ReferenceManifest

    @property
    def graph_path(self) -> Path:
        return self.path / self.manifest.graph


def is_reference_graph(directory: Path | str) -> bool:
    return (Path(directory) / REFERENCE_FILE).is_file()


def load_reference_graph(directory: Path | str) -> ReferenceGraph:
    """Read ``reference.json`` and verify the checksum of its graph and inputs. Raises BundleError."""
    directory = Path(directory)
    path = directory / REFERENCE_FILE
    try:
        manifest = ReferenceManifest.model_validate_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(path, "missing: not a reference graph (defectsam-train export-reference makes one)") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        raise BundleError(path, f"key '{'.'.join(str(p) for p in first['loc'])}': {first['msg']}") from None
    for name in (manifest.graph, manifest.inputs):
        if name not in manifest.files or not (directory / name).is_file():
            raise BundleError(directory / name, "missing, or not listed in reference.json's files")
        if sha256_file(directory / name) != manifest.files[name].lower():
            raise BundleError(directory / name, "checksum mismatch with reference.json")
    return ReferenceGraph(path=directory.resolve(), manifest=manifest)


@dataclass(frozen=True)
class BenchSubject:
    """One row of a benchmark: a bundle's engine (``config`` picks backend and precision) or a reference
    graph (``config`` must be ONNX Runtime's); ``iterations`` overrides the run's count for this row."""

    target: Bundle | ReferenceGraph
    config: BackendConfig | None = None
    iterations: int | None = None
    inspection: Any = None  # engines.inspector.InspectionConfig for a bundle (None: its defaults)


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


def resident_mb() -> tuple[float, float]:
    """(current, peak) resident memory of this process in MB, from /proc; zeros where there is none."""
    values = {}
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, amount = line.split(":", 1)
                    values[key] = int(amount.split()[0]) / 1024.0
    except OSError:
        pass
    return values.get("VmRSS", 0.0), values.get("VmHWM", 0.0)


def reset_peak_rss() -> bool:
    """Reset this process's peak resident memory (VmHWM) to its current one; False where Linux says no."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


BENCH_FRAME_SEED = 2_000_000  # the synthetic test panels (docs/training.md)


def bench_frames(count: int = 8, seed: int = BENCH_FRAME_SEED) -> list[np.ndarray]:
    """The frames a bundle is timed on: ``count`` 4 MP synthetic test panels (their defects vary the windows)."""
    from engines.synthetic import render_frame

    return [render_frame(seed + i, with_masks=False).image for i in range(count)]


@dataclass(frozen=True)
class _Opened:
    """An open engine or reference session: ``run`` is one inference; ``describe(latencies_s, cores,
    rss_mb_added)`` makes its row."""

    run: Callable[[], object]
    describe: Callable[[list[float], float, float], EngineBenchResult]
    close: Callable[[], None]


def _open_bundle(
    bundle: Bundle, config: BackendConfig | None, iterations: int, frames: Sequence[np.ndarray],
    inspection: Any = None,
) -> _Opened:
    from engines.inspector import Inspector

    engine = open_engine(bundle, config)
    inspector = Inspector(engine, inspection)
    manifest = bundle.manifest
    backend = engine.backend_name
    segment: Path = getattr(engine, "segment_path", bundle.segment_graph)
    find: Path | None = getattr(engine, "find_path", bundle.find_graph)
    graph_bytes = segment.stat().st_size + (find.stat().st_size if find is not None else 0)
    cursor: dict[str, Any] = {"i": 0, "windows": [], "steps": {}}

    def run() -> object:
        frame = frames[cursor["i"] % len(frames)]
        cursor["i"] += 1
        result = inspector.inspect(frame)
        cursor["windows"].append(inspector.last_windows)
        for key, value in result.timings.items():
            cursor["steps"].setdefault(key, []).append(value)
        return result

    def describe(times: list[float], cores: float, rss_added: float) -> EngineBenchResult:
        frame = frames[0]
        steps = {k: round(float(np.median(v)) * 1000.0, 2) for k, v in cursor["steps"].items()}
        windows = float(np.median(cursor["windows"])) if cursor["windows"] else 0.0
        return _row(times, cores, rss_added, name=manifest.name, path=str(bundle.path), arch=_arch(manifest),
                    precision=str(getattr(engine, "precision", manifest.precision)),
                    weights=manifest.provenance.weights, backend=backend, parameters=manifest.parameters,
                    graph_bytes=graph_bytes, input_hw=(int(frame.shape[0]), int(frame.shape[1])), windows=windows,
                    iterations=iterations, mode=inspector.mode_for(frame.shape[1], frame.shape[0]),
                    window=inspector.window, steps_ms=steps)

    return _Opened(run, describe, engine.close)


def _arch(manifest: Any) -> str:
    return manifest.segment.arch + (f" + {manifest.find.arch}" if manifest.find is not None else "")


def _open_reference(reference: ReferenceGraph, config: BackendConfig | None, iterations: int) -> _Opened:
    """An ONNX Runtime session on the graph with the session settings the onnxruntime backend uses
    (engines/backends/onnxruntime.py, OnnxRuntimeEngine._open), fed the inputs stored beside it."""
    import onnxruntime as ort

    config = config if config is not None else OnnxRuntimeConfig(providers=["cpu"])
    if not isinstance(config, OnnxRuntimeConfig):
        raise DefectsamError(f"{reference.path}: a reference graph runs on the onnxruntime backend only")
    options = ort.SessionOptions()
    options.intra_op_num_threads = config.intra_op_threads
    options.inter_op_num_threads = config.inter_op_threads
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[config.graph_optimization]
    options.log_severity_level = 3
    spin = "1" if config.spin_wait else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spin)
    options.add_session_config_entry("session.inter_op.allow_spinning", spin)
    providers = resolve_providers(config, ort.get_available_providers())
    try:
        session = ort.InferenceSession(str(reference.graph_path), sess_options=options, providers=providers)
    except Exception as exc:  # ORT raises its own exception types for bad graphs
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BundleError(reference.graph_path, f"ONNX Runtime cannot load the graph: {first}") from None
    with np.load(reference.path / reference.manifest.inputs) as stored:
        feeds = {name: np.ascontiguousarray(stored[name]) for name in stored.files}
    wanted = [arg.name for arg in session.get_inputs()]
    if sorted(wanted) != sorted(feeds):
        stored_names = sorted(feeds)
        raise BundleError(reference.path, f"the graph takes {wanted}, {reference.manifest.inputs} holds {stored_names}")
    m = reference.manifest

    def describe(times: list[float], cores: float, rss_added: float) -> EngineBenchResult:
        model_hw = (m.model_input.height, m.model_input.width)
        input_hw = (m.input.height, m.input.width)
        return _row(times, cores, rss_added, name=m.name, path=str(reference.path), arch=m.arch,
                    precision=m.precision, weights=m.weights,
                    backend=f"onnxruntime:{session.get_providers()[0]}", parameters=m.parameters,
                    graph_bytes=reference.graph_path.stat().st_size, input_hw=input_hw, windows=float(m.k),
                    iterations=iterations, model_input_hw=None if model_hw == input_hw else model_hw, notes=m.notes)

    return _Opened(lambda: session.run(None, feeds), describe, lambda: None)


def _row(times: list[float], cores: float, rss_added: float, **fields: Any) -> EngineBenchResult:
    p50, p99 = quantile(times, 0.50), quantile(times, 0.99)
    if p50 is None or p99 is None:
        raise ValueError("no timings to summarise")
    return EngineBenchResult(
        **fields,
        latency_ms_p50=round(p50 * 1000.0, 2),
        latency_ms_p99=round(p99 * 1000.0, 2),
        latency_ms_mean=round(1000.0 * sum(times) / len(times), 2),
        fps_median=round(1.0 / p50, 2),
        cpu_cores=round(cores, 2),
        rss_mb_added=round(rss_added, 1),
    )


def bench_engines(
    subjects: Sequence[BenchSubject], *, warmup: int = 3, iterations: int = 30, rounds: int = 5, seed: int = 0,
    frames: Sequence[np.ndarray] | None = None,
) -> list[EngineBenchResult]:
    """Time every subject in alternating blocks (``rounds`` of them), one result per subject, in order.

    Bundles inspect ``frames`` (default ``bench_frames()``) in turn.
    """
    if frames is None and any(not isinstance(s.target, ReferenceGraph) for s in subjects):
        frames = bench_frames(seed=BENCH_FRAME_SEED + seed)
    counts = [s.iterations if s.iterations is not None else iterations for s in subjects]
    if any(n < 1 for n in counts) or warmup < 0 or rounds < 1:
        raise ValueError("iterations and rounds must be >= 1 and warmup >= 0")
    opened: list[_Opened] = []
    rss_added: list[float] = []
    latencies: list[list[float]] = [[] for _ in subjects]
    cpu = [0.0] * len(subjects)
    wall = [0.0] * len(subjects)
    try:
        for subject, count in zip(subjects, counts, strict=True):
            before = resident_mb()[0]
            if isinstance(subject.target, ReferenceGraph):
                entry = _open_reference(subject.target, subject.config, count)
            else:
                assert frames is not None
                entry = _open_bundle(subject.target, subject.config, count, frames, subject.inspection)
            opened.append(entry)
            for _ in range(warmup):
                entry.run()
            rss_added.append(resident_mb()[0] - before)
        # Blocks, not single calls, alternate: an ONNX Runtime session's threads keep spinning
        # for a while after a run and would tax whichever session runs next.
        rounds = min(rounds, *counts) if counts else rounds
        for round_index in range(rounds):
            for index, (entry, count) in enumerate(zip(opened, counts, strict=True)):
                block = count // rounds + (1 if round_index < count % rounds else 0)
                entry.run()  # one untimed run after the switch
                cpu_start, wall_start = time.process_time(), time.perf_counter()
                for _ in range(block):
                    start = time.perf_counter()
                    entry.run()
                    latencies[index].append(time.perf_counter() - start)
                cpu[index] += time.process_time() - cpu_start
                wall[index] += time.perf_counter() - wall_start
        return [entry.describe(times, c / w if w > 0 else 0.0, added)
                for entry, times, c, w, added in zip(opened, latencies, cpu, wall, rss_added, strict=True)]
    finally:
        for entry in opened:
            entry.close()


def markdown_table(results: list[EngineBenchResult]) -> str:
    """One row per bundle; the last column is the first bundle's FPS over this one's."""
    base = results[0].fps_median if results else 1.0
    lines = [
        "| bundle | arch | precision | params (M) | graphs (MB) | frame | mode, window | windows "
        "| p50 ms | p99 ms | FPS (median) | first / this |",
        "|---|---|---|---:|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        how = f"{r.mode}, {r.window} px" if r.mode else "reference"
        lines.append(
            f"| {r.name} | {r.arch} | {r.precision} | {r.parameters / 1e6:.2f} | {r.graph_bytes / 1e6:.2f} | "
            f"{r.input_hw[1]}x{r.input_hw[0]} | {how} | {r.windows:g} | {r.latency_ms_p50:.1f} | "
            f"{r.latency_ms_p99:.1f} | {r.fps_median:.1f} | {base / r.fps_median:.2f}x |"
        )
    return "\n".join(lines)


def describe(result: EngineBenchResult) -> str:
    """'name (int8, windows 128 px)': a row of the table in words."""
    how = f", {result.mode} {result.window} px" if result.mode else ""
    return f"{result.name} ({result.precision}{how})"


def precision_ratios(results: list[EngineBenchResult]) -> list[str]:
    """One line per bundle and inspection (mode, window) timed at more than one precision: each
    precision's FPS over the first's, like for like."""
    lines = []
    by_path: dict[tuple[str, str, int], list[EngineBenchResult]] = {}
    for r in results:
        by_path.setdefault((r.path, r.mode, r.window), []).append(r)
    paths_of: dict[str, set[str]] = {}
    for (path, _, _), rows in by_path.items():
        paths_of.setdefault(rows[0].name, set()).add(path)
    for (path, mode, window), rows in by_path.items():
        base = rows[0]
        label = base.name if len(paths_of[base.name]) == 1 else f"{base.name} ({path})"
        if mode:
            label += f", {mode} {window} px"
        for other in rows[1:]:
            if other.precision == base.precision:
                continue
            lines.append(
                f"{label}: {other.precision} / {base.precision} = {other.fps_median / base.fps_median:.2f}x FPS "
                f"(median latency {other.latency_ms_p50:.1f} ms vs {base.latency_ms_p50:.1f} ms; graph "
                f"{other.graph_bytes / 1e6:.2f} MB vs {base.graph_bytes / 1e6:.2f} MB)"
            )
    return lines
