"""TensorRT backend: builds TensorRT 10 engines ("plans") from a bundle's two ONNX graphs (segment,
find) on the device that runs them, caches the plans beside the bundle, and runs them with pycuda.

Plans are not portable across TensorRT versions or GPUs, so the cache file name carries both, with
the precision and a prefix of the ONNX file's SHA-256 (a plan built from other weights is never
reused)::

    <graph stem>.<sha256[:12]>.<precision>.trt<TensorRT version>.<gpu slug>-sm<major><minor>.plan
    e.g. segment.3f2a9c01d4e7.fp16.trt10.3.0.30.orin-sm87.plan

Both graphs have dynamic axes (engines.contract); each plan has one optimisation profile: the
segment graph from 1 window of 16 x 16 up to ``max_batch`` windows of ``max_side`` (optimised for
``max_batch`` windows of the bundle's window size), the find graph from 16 x 16 up to the find
input of a ``frame_width`` x ``frame_height`` frame (optimised for exactly that: the camera's size).

A plan is written to a temporary name and renamed, so a crash mid-build leaves no half plan; a
cached plan that fails to deserialize (a different TensorRT build, a truncated file) is rebuilt.
Before any build the graphs go through engines.backends.onnx_checks, and every problem is reported
at once.

Precision: ``fp32``; ``fp16`` (FP16 kernels where faster, FP32 elsewhere); ``int8`` is *explicit*
quantization: the graph must carry QuantizeLinear/DequantizeLinear pairs (the bundle's INT8 QDQ
graph, see ``source_graph``); TensorRT keeps the graph's scales, no calibrator runs here, and
layers outside the Q/DQ pairs run in FP16.

``tensorrt`` and ``pycuda`` are imported inside ``open_engine``; they come with JetPack on a
Jetson, or ``pip install 'defectsam[tensorrt]'`` on an x86 box with an NVIDIA GPU.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from engines.backends.base import BackendConfigBase
from engines.backends.onnx_checks import OnnxCheckReport, check_onnx_for_tensorrt
from engines.bundle import Bundle
from engines.contract import (
    FIND_INPUT,
    FIND_OUTPUT,
    SEGMENT_INPUT,
    SEGMENT_OUTPUT,
    SIDE_MULTIPLE,
    find_input,
    find_output,
    segment_input,
    segment_output,
)
from engines.errors import BackendUnavailableError, BundleError, DefectsamError

KEY = "tensorrt"

Precision = Literal["fp16", "int8", "fp32"]
PRECISIONS: tuple[str, ...] = ("fp16", "int8", "fp32")
BuildState = Literal["opening", "building", "ready", "failed", "closed"]

_INSTALL_HINT = (
    "backend 'tensorrt' needs the tensorrt and pycuda packages: pip install 'defectsam[tensorrt]' "
    "on a machine with an NVIDIA GPU (JetPack ships them on a Jetson)"
)
Graph = Literal["segment", "find"]

log = logging.getLogger(__name__)


class Config(BackendConfigBase):
    type: Literal["tensorrt"] = "tensorrt"
    precision: Precision = Field(
        default="fp16",
        title="Engine precision",
        description=(
            "fp16 (default), fp32, or int8: explicit quantization from the bundle's QDQ graph "
            "(segment.int8.onnx, find.int8.onnx); no calibration runs on the device"
        ),
    )
    workspace_mib: int = Field(
        default=1024, ge=16, title="Builder workspace (MiB)", description="scratch memory TensorRT may use per layer"
    )
    device: int = Field(default=0, ge=0, title="CUDA device index")
    plan_dir: Path | None = Field(
        default=None,
        title="Plan cache directory",
        description="where built plans are cached; empty keeps them beside the bundle",
    )
    build_on_open: bool = Field(
        default=True,
        title="Build at start",
        description="build a missing plan when the engine opens (minutes on a Jetson); false fails instead",
    )
    max_batch: int = Field(
        default=24, ge=1, le=256, title="Most windows per call", description="the segment plan's largest batch"
    )
    max_side: int | None = Field(
        default=None, ge=16, multiple_of=16, title="Largest window side",
        description="the segment plan's largest window (pixels); unset: the bundle's window size. Raise it for "
        "inspection.mode whole on frames larger than a window",
    )
    frame_width: int = Field(default=2688, ge=16, title="Frame width the find plan is built for", description="px")
    frame_height: int = Field(default=1520, ge=16, title="Frame height the find plan is built for", description="px")


# --- plan cache naming (pure) ------------------------------------------------------------------


def _slug(text: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug or "unknown"


def gpu_slug(gpu_name: str, compute_capability: tuple[int, int]) -> str:
    """``"NVIDIA Jetson Orin Nano", (8, 7)`` -> ``"nvidia-jetson-orin-nano-sm87"``."""
    major, minor = compute_capability
    return f"{_slug(gpu_name)}-sm{int(major)}{int(minor)}"


def plan_cache_key(
    trt_version: str, gpu_name: str, compute_capability: tuple[int, int], precision: str
) -> str:
    """The part of a plan's file name that says what it was built for, e.g.
    ``fp16.trt10.3.0.30.orin-sm87``. Only ``[a-z0-9.-]``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    version = re.sub(r"[^0-9a-z.]+", "-", trt_version.lower()).strip(".-") or "unknown"
    return f"{precision}.trt{version}.{gpu_slug(gpu_name, compute_capability)}"


def source_graph(bundle: Bundle, precision: str, graph: Graph = "segment") -> Path | None:
    """The ONNX file a plan of ``precision`` is built from; None for a find graph the bundle lacks.

    INT8 wants a QDQ graph: the graph itself when the manifest says ``precision: int8``, else the
    manifest's INT8 variant when it was quantized for TensorRT (``--target tensorrt``: int8
    symmetric activations; a ``cpu`` variant's uint8 activations or a weight-only variant are
    refused, TensorRT's explicit quantization takes neither).
    """
    fp32 = bundle.segment_graph if graph == "segment" else bundle.find_graph
    if fp32 is None:
        return None
    if precision != "int8" or bundle.manifest.precision == "int8":
        return fp32
    variant = bundle.manifest.variants.get("int8")
    if variant is None:
        raise DefectsamError(
            f"{bundle.path}: backend.precision 'int8' needs the bundle's INT8 QDQ graphs, which it does not have; "
            f"run 'defectsam-train quantize {bundle.path} --target tensorrt' first, or use fp16"
        )
    if variant.mode != "static" or variant.target != "tensorrt":
        raise DefectsamError(
            f"{bundle.path}: its INT8 variant was quantized for mode {variant.mode!r}, target "
            f"{variant.target!r}; TensorRT's explicit INT8 needs mode 'static', target 'tensorrt' "
            f"(int8 symmetric activations): run 'defectsam-train quantize {bundle.path} --target tensorrt' "
            f"on a copy of the bundle, or use precision fp16"
        )
    name = variant.segment if graph == "segment" else variant.find
    return None if name is None else bundle.path / name


def plan_path(
    bundle: Bundle,
    config: Config,
    trt_version: str,
    gpu_name: str,
    compute_capability: tuple[int, int],
    graph: Graph = "segment",
) -> Path:
    """Where the plan for ``graph`` of ``bundle`` lives for this TensorRT, GPU, precision and profile."""
    source = source_graph(bundle, config.precision, graph)
    if source is None:
        raise DefectsamError(f"{bundle.path}: bundle has no find graph")
    digest = bundle.manifest.files.get(source.name, "")[:12] or "nosha"
    key = plan_cache_key(trt_version, gpu_name, compute_capability, config.precision)
    ranges = profile_ranges(bundle, config, graph)
    profile = "-".join(f"{high}" for _, _, high in ranges.values())  # a plan is only good for its profile's max
    directory = config.plan_dir if config.plan_dir is not None else bundle.path
    return Path(directory) / f"{source.stem}.{digest}.{key}.max{profile}.plan"


def profile_ranges(bundle: Bundle, config: Config, graph: Graph) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of every dynamic axis of ``graph``'s input, by its contract name."""
    if graph == "segment":
        window = bundle.manifest.segment.window
        side = config.max_side or window
        if side < window:
            raise DefectsamError(f"backend.max_side {side} is smaller than the bundle's window {window}")
        return {"batch": (1, config.max_batch, config.max_batch), "height": (SIDE_MULTIPLE, window, side),
                "width": (SIDE_MULTIPLE, window, side)}
    spec = bundle.manifest.find
    if spec is None:
        raise DefectsamError(f"{bundle.path}: bundle has no find graph")
    r = spec.reduction

    def input_side(frame: int) -> int:  # engines.find.FindGeometry's input side for a frame side
        return math.ceil(math.ceil(frame / r) / SIDE_MULTIPLE) * SIDE_MULTIPLE

    h, w = input_side(config.frame_height), input_side(config.frame_width)
    return {"height": (SIDE_MULTIPLE, h, h), "width": (SIDE_MULTIPLE, w, w)}


def profile_shapes(
    report: OnnxCheckReport, input_shapes: Mapping[str, Sequence[int | str]], ranges: Mapping[str, tuple[int, int, int]]
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) shapes of every input with a dynamic axis, for one optimisation profile."""
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {}
    for name, axes in report.dynamic_axes.items():
        dims = list(input_shapes[name])
        picked: list[list[int]] = [[], [], []]
        for axis, dim in enumerate(dims):
            if axis in axes:
                if axes[axis] not in ranges:
                    raise DefectsamError(
                        f"{report.file}: input '{name}' axis {axis} '{axes[axis]}' has no optimisation profile range"
                    )
                for i in range(3):
                    picked[i].append(ranges[axes[axis]][i])
            else:
                for i in range(3):
                    picked[i].append(int(dim))
        shapes[name] = (tuple(picked[0]), tuple(picked[1]), tuple(picked[2]))
    return shapes


def checked_graph(
    bundle: Bundle, source: Path, graph: Graph, config: Config
) -> tuple[OnnxCheckReport, dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]]:
    """Check ``source`` (the bundle's ``graph`` at some precision) against the contract for TensorRT
    and derive its optimisation profile: (report, profile shapes). Raises on a graph TensorRT cannot take."""
    if graph == "segment":
        inputs, outputs = (segment_input(),), (segment_output(bundle.manifest.num_classes),)
    else:
        inputs, outputs = (find_input(),), (find_output(),)
    report = check_onnx_for_tensorrt(source, inputs, outputs)
    report.raise_if_problems()
    return report, profile_shapes(report, {s.name: s.shape for s in inputs}, profile_ranges(bundle, config, graph))


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary sibling and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        with tmp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --- runtime (needs tensorrt + pycuda) -----------------------------------------------------------


def _import_runtime() -> tuple[Any, Any]:
    try:
        import pycuda.driver as cuda
        import tensorrt as trt
    except ImportError:  # also raised by pycuda when libcuda is missing
        raise BackendUnavailableError(_INSTALL_HINT) from None
    return trt, cuda


def _open_device(cuda: Any, index: int) -> tuple[Any, str, tuple[int, int]]:
    """Init CUDA and retain the primary context of device ``index``: (context, name, cc)."""
    try:
        cuda.init()
        count = cuda.Device.count()
    except Exception as exc:  # pycuda.driver.Error: no driver, no device
        raise BackendUnavailableError(
            f"backend 'tensorrt' found no usable NVIDIA GPU (CUDA: {exc}); use backend.type: onnxruntime"
        ) from None
    if count == 0:
        raise BackendUnavailableError("backend 'tensorrt' found no NVIDIA GPU; use backend.type: onnxruntime")
    if index >= count:
        raise BackendUnavailableError(
            f"backend.device: {index} does not exist; this machine has {count} CUDA device(s) (0..{count - 1})"
        )
    device = cuda.Device(index)
    major, minor = device.compute_capability()
    return device.retain_primary_context(), str(device.name()), (int(major), int(minor))


def device_identity(index: int = 0) -> tuple[str, str, tuple[int, int]]:
    """(TensorRT version, GPU name, compute capability) of CUDA device ``index``: what a plan's
    cache name is keyed by (``plan_path``). Raises BackendUnavailableError without TensorRT/pycuda/GPU."""
    trt, cuda = _import_runtime()
    context, name, capability = _open_device(cuda, index)
    context.detach()
    return str(trt.__version__), name, capability


class _Plan:
    """One deserialized TensorRT engine, its execution context, stream and I/O buffers.

    Buffers are allocated once at the largest shape the engine accepts (the profile's max for a
    dynamic input); host buffers are page-locked so the copies run asynchronously on the stream.
    """

    def __init__(self, trt: Any, cuda: Any, engine: Any, path: Path) -> None:
        self.trt = trt
        self.cuda = cuda
        self.engine = engine
        self.path = path
        self.context = engine.create_execution_context()
        if self.context is None:
            raise DefectsamError(f"{path}: TensorRT could not create an execution context (out of GPU memory?)")
        self.stream = cuda.Stream()
        self.names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in self.names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in self.names if n not in self.inputs]
        self.dynamic: set[str] = set()
        self.static_shapes: dict[str, tuple[int, ...]] = {}
        for name in self.inputs:
            shape = tuple(engine.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                self.dynamic.add(name)
                shape = tuple(engine.get_tensor_profile_shape(name, 0)[2])  # (min, opt, max)
            else:
                self.static_shapes[name] = shape
            if not self.context.set_input_shape(name, shape):
                raise DefectsamError(f"{path}: TensorRT rejected shape {list(shape)} for input '{name}'")
        self.host: dict[str, np.ndarray] = {}
        self.device: dict[str, Any] = {}
        for name in self.names:
            shape = tuple(self.context.get_tensor_shape(name))  # max shapes are set: outputs resolve
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            size = max(int(np.prod(shape)), 1)
            self.host[name] = cuda.pagelocked_empty(size, dtype)
            self.device[name] = cuda.mem_alloc(self.host[name].nbytes)
            self.context.set_tensor_address(name, int(self.device[name]))

    def run(self, feeds: Mapping[str, np.ndarray], wanted: Sequence[str]) -> dict[str, np.ndarray]:
        cuda = self.cuda
        for name, array in feeds.items():
            host = self.host[name]
            array = np.ascontiguousarray(array, dtype=host.dtype)
            want = self.static_shapes.get(name)
            if want is not None and array.shape != want:
                raise DefectsamError(f"input '{name}' must be {list(want)}, got {list(array.shape)}")
            if name in self.dynamic and (
                array.size > host.size or not self.context.set_input_shape(name, array.shape)
            ):
                raise DefectsamError(f"input '{name}' shape {list(array.shape)} is outside the engine's profile")
            view = host[: array.size]
            np.copyto(view, array.reshape(-1))
            cuda.memcpy_htod_async(self.device[name], view, self.stream)
        if not self.context.execute_async_v3(stream_handle=self.stream.handle):
            raise DefectsamError(f"{self.path}: TensorRT execution failed (see the TensorRT log above)")
        results: dict[str, tuple[np.ndarray, tuple[int, ...]]] = {}
        for name in wanted:
            shape = tuple(self.context.get_tensor_shape(name))
            view = self.host[name][: int(np.prod(shape))]
            cuda.memcpy_dtoh_async(view, self.device[name], self.stream)
            results[name] = (view, shape)
        self.stream.synchronize()
        return {name: view.reshape(shape).copy() for name, (view, shape) in results.items()}

    def release(self) -> None:
        for allocation in self.device.values():
            allocation.free()
        self.device.clear()
        self.host.clear()
        self.context = None
        self.engine = None


class _TrtLogger:
    """TensorRT's log lines go to Python logging (created lazily: needs trt.ILogger)."""

    @staticmethod
    def create(trt: Any) -> Any:
        class Logger(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)

            def log(self, severity: Any, msg: str) -> None:
                if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                    log.error("TensorRT: %s", msg)
                elif severity == trt.ILogger.Severity.WARNING:
                    log.warning("TensorRT: %s", msg)
                else:
                    log.debug("TensorRT: %s", msg)

        return Logger()


class TensorRTEngine:
    """A bundle's graphs as TensorRT engines on one GPU.

    ``state`` is "opening" while cached plans are looked up, "building" while a plan is being built
    (minutes on a Jetson: the service reports it in /readyz), then "ready"; ``on_state`` is called
    with each new state, from the thread that opens the engine.
    """

    def __init__(
        self, bundle: Bundle, config: Config, *, on_state: Callable[[BuildState], None] | None = None
    ) -> None:
        self.bundle = bundle
        self.config = config
        self._on_state = on_state
        self.state: BuildState = "opening"
        self._lock = threading.Lock()
        trt, cuda = _import_runtime()
        self._trt, self._cuda = trt, cuda
        self._ctx, self.gpu_name, self.compute_capability = _open_device(cuda, config.device)
        self._logger = _TrtLogger.create(trt)
        self._segment: _Plan | None = None
        self._find: _Plan | None = None
        self._ctx.push()
        try:
            trt.init_libnvinfer_plugins(self._logger, "")
            self._runtime = trt.Runtime(self._logger)
            self._segment = self._load("segment")
            if bundle.find_graph is not None:
                self._find = self._load("find")
            self._check_io()
        except BaseException:
            self._release()
            self._cuda.Context.pop()
            self._ctx.detach()
            self._set_state("failed")
            raise
        self._cuda.Context.pop()
        self._set_state("ready")

    # -- plans --

    def _set_state(self, state: BuildState) -> None:
        self.state = state
        if self._on_state is not None:
            self._on_state(state)

    def plan_path(self, graph: Graph = "segment") -> Path:
        return plan_path(
            self.bundle, self.config, self._trt.__version__, self.gpu_name, self.compute_capability, graph
        )

    def _load(self, graph: Graph) -> _Plan:
        path = self.plan_path(graph)
        if path.is_file():
            engine = self._deserialize(path.read_bytes())
            if engine is not None:
                log.info("TensorRT plan %s loaded from cache", path)
                return _Plan(self._trt, self._cuda, engine, path)
            log.warning("cached TensorRT plan %s does not deserialize; rebuilding it", path)
        if not self.config.build_on_open:
            raise DefectsamError(
                f"{path}: no usable TensorRT plan and backend.build_on_open is false; "
                f"build it with build_on_open: true once on this device"
            )
        source = source_graph(self.bundle, self.config.precision, graph)
        if source is None:  # pragma: no cover - callers only ask for graphs the bundle has
            raise DefectsamError(f"{self.bundle.path}: bundle has no {graph} graph")
        self._set_state("building")
        data = self._build(source, graph)
        write_atomic(path, data)
        log.info("TensorRT plan %s built and cached", path)
        engine = self._deserialize(data)
        if engine is None:
            raise DefectsamError(f"{path}: TensorRT built a plan it cannot deserialize")
        return _Plan(self._trt, self._cuda, engine, path)

    def _deserialize(self, data: bytes) -> Any:
        try:
            return self._runtime.deserialize_cuda_engine(data)
        except Exception as exc:  # some TensorRT builds raise instead of returning None
            log.warning("TensorRT cannot deserialize a plan: %s", exc)
            return None

    def _build(self, source: Path, graph: Graph) -> bytes:
        trt = self._trt
        report, profiles = checked_graph(self.bundle, source, graph, self.config)
        precision = self.config.precision
        if precision == "int8" and not report.quantized:
            raise DefectsamError(
                f"{source}: backend.precision 'int8' is explicit quantization and needs a QDQ graph, "
                f"but this graph has no QuantizeLinear/DequantizeLinear nodes"
            )
        builder = trt.Builder(self._logger)
        network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse_from_file(str(source)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BundleError(source, f"TensorRT's ONNX parser rejected the graph: {errors}")
        build_config = builder.create_builder_config()
        build_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.config.workspace_mib << 20)
        if precision in ("fp16", "int8"):
            build_config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8" and report.quantized:
            build_config.set_flag(trt.BuilderFlag.INT8)  # explicit quantization: scales come from Q/DQ
        if profiles:
            profile = builder.create_optimization_profile()
            for name, (low, opt, high) in profiles.items():
                profile.set_shape(name, low, opt, high)
            build_config.add_optimization_profile(profile)
        log.info("building TensorRT %s plan from %s (this takes minutes on a Jetson)", precision, source)
        serialized = builder.build_serialized_network(network, build_config)
        if serialized is None:
            raise DefectsamError(f"{source}: TensorRT failed to build a {precision} engine (see the TensorRT log)")
        return bytes(serialized)

    def _check_io(self) -> None:
        for plan, inputs, outputs in (
            (self._segment, (SEGMENT_INPUT,), (SEGMENT_OUTPUT,)),
            (self._find, (FIND_INPUT,), (FIND_OUTPUT,)),
        ):
            if plan is None:
                continue
            if sorted(plan.inputs) != sorted(inputs) or sorted(plan.outputs) != sorted(outputs):
                raise BundleError(
                    plan.path,
                    f"engine I/O {sorted(plan.inputs)} -> {sorted(plan.outputs)} does not match the contract "
                    f"{sorted(inputs)} -> {sorted(outputs)}; delete the plan to rebuild it",
                )

    # -- Engine protocol --

    @property
    def backend_name(self) -> str:
        return f"{KEY}:{self.config.precision}:{self.gpu_name}"

    @property
    def has_find(self) -> bool:
        return self._find is not None

    def find(self, image: np.ndarray) -> np.ndarray:
        if image.ndim != 4 or image.shape[:2] != (1, 3) or image.dtype != np.float32:
            raise DefectsamError(f"find input must be float32 1 x 3 x h x w, got {image.dtype} {list(image.shape)}")
        with self._lock:
            plan = self._require(self._find, "engine is closed, or the bundle has no find graph")
            self._ctx.push()
            try:
                values = plan.run({FIND_INPUT: image}, [FIND_OUTPUT])
            finally:
                self._cuda.Context.pop()
        return values[FIND_OUTPUT][0, 0]

    def segment(self, windows: np.ndarray) -> np.ndarray:
        if windows.ndim != 4 or windows.shape[1] != 3 or windows.dtype != np.float32:
            raise DefectsamError(f"windows must be float32 B x 3 x H x W, got {windows.dtype} {list(windows.shape)}")
        with self._lock:
            plan = self._require(self._segment, "engine is closed")
            self._ctx.push()
            try:
                values = plan.run({SEGMENT_INPUT: windows}, [SEGMENT_OUTPUT])
            finally:
                self._cuda.Context.pop()
        return values[SEGMENT_OUTPUT]

    @staticmethod
    def _require(plan: _Plan | None, message: str) -> _Plan:
        if plan is None:
            raise DefectsamError(message)
        return plan

    def close(self) -> None:
        with self._lock:
            if self.state == "closed":
                return
            self._ctx.push()
            try:
                self._release()
            finally:
                self._cuda.Context.pop()
            self._ctx.detach()
            self._set_state("closed")

    def _release(self) -> None:
        for plan in (self._segment, self._find):
            if plan is not None:
                plan.release()
        self._segment = self._find = None


def open_engine(
    bundle: Bundle, config: Config, *, on_state: Callable[[BuildState], None] | None = None
) -> TensorRTEngine:
    """Open ``bundle`` on TensorRT, building and caching missing plans (see the module docstring)."""
    return TensorRTEngine(bundle, config, on_state=on_state)
