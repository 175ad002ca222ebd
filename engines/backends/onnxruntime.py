"""ONNX Runtime backend: TensorRT EP, CUDA EP or CPU, whichever is asked for and present.

With the TensorRT execution provider, ONNX Runtime compiles TensorRT engines while the session is
created (minutes on a Jetson), so the engine reports ``building`` through ``on_state`` first.

``precision`` picks which of a bundle's graphs run: the FP32 graphs, or the INT8 (QDQ) variant
that ``defectsam-train quantize`` adds (docs/quantization.md). ``auto`` takes the INT8 variant
only when it passed the precision gate and was quantized for the provider that runs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, field_validator

from engines.backends.base import BackendConfigBase, EngineState, StateCallback
from engines.bundle import Bundle, Variant
from engines.contract import (
    FIND_INPUT,
    FIND_OUTPUT,
    SEGMENT_INPUT,
    SEGMENT_OUTPUT,
    SIDE_MULTIPLE,
    TensorSpec,
    find_input,
    find_output,
    segment_input,
    segment_output,
)
from engines.errors import BackendUnavailableError, BundleError, DefectsamError

if TYPE_CHECKING:
    import onnxruntime as ort

KEY = "onnxruntime"

# Short names accepted in config, and the provider each stands for.
PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}

class Config(BackendConfigBase):
    type: Literal["onnxruntime"] = "onnxruntime"
    providers: list[Literal["tensorrt", "cuda", "cpu"]] | Literal["auto"] = Field(
        default="auto",
        title="Execution providers",
        description="in order of preference; 'auto' takes TensorRT, then CUDA, then CPU, as installed",
    )
    intra_op_threads: int = Field(
        default=0, ge=0, title="Threads inside an operator", description="0 lets ONNX Runtime choose (one per core)"
    )
    inter_op_threads: int = Field(default=1, ge=1, title="Threads across operators")
    spin_wait: bool = Field(
        default=False, title="Spin-wait between operators",
        description=(
            "true: ONNX Runtime's worker threads busy-wait for the next operator (a little faster on an idle "
            "machine); false: they sleep, leaving the cores to the camera, pre/postprocess and HTTP threads"
        ),
    )
    graph_optimization: Literal["disable", "basic", "extended", "all"] = Field(
        default="all", title="ONNX Runtime graph optimisation level"
    )
    precision: Literal["auto", "fp32", "int8"] = Field(
        default="auto",
        title="Graph precision",
        description=(
            "auto: the bundle's INT8 graphs when they passed the precision gate and were quantized for the "
            "first provider (target cpu on CPU, tensorrt on the TensorRT EP), else FP32; fp32; int8: the "
            "INT8 graphs (an error when the bundle has none)"
        ),
    )

    @field_validator("providers")
    @classmethod
    def _not_empty(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, list) and not value:
            raise ValueError("name at least one provider, or 'auto'")
        return value


def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - onnxruntime is a base dependency
        raise BackendUnavailableError(
            f"backend 'onnxruntime' needs the onnxruntime package ({exc}); reinstall defectsam"
        ) from None
    return onnxruntime


def resolve_providers(config: Config, available: list[str]) -> list[str]:
    """The providers to hand ONNX Runtime, in order; CPU always last as the fallback."""
    if config.providers == "auto":
        wanted = [PROVIDERS[name] for name in ("tensorrt", "cuda", "cpu")]
        chosen = [p for p in wanted if p in available]
    else:
        chosen = []
        for name in config.providers:
            provider = PROVIDERS[name]
            if provider not in available:
                raise BackendUnavailableError(
                    f"backend.providers: {name!r} ({provider}) is not in this onnxruntime build "
                    f"(available: {', '.join(available)}); install onnxruntime-gpu for CUDA/TensorRT"
                )
            chosen.append(provider)
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


# Which provider runs which quantization target's graphs well (engines.bundle.Variant.target).
_TARGET_PROVIDER = {"cpu": "CPUExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def choose_precision(bundle: Bundle, requested: str, first_provider: str) -> str:
    """The precision whose graphs run: ``requested``, or for ``auto`` the gated INT8 variant when it suits."""
    manifest = bundle.manifest
    if requested != "auto":
        if requested not in manifest.precisions:
            raise BundleError(
                bundle.path,
                f"backend.precision {requested!r}: the bundle has no {requested} graphs (it has "
                f"{', '.join(manifest.precisions)}); run 'defectsam-train quantize' or use fp32",
            )
        return requested
    variant: Variant | None = manifest.variants.get("int8")
    if variant is not None and variant.gate == "passed" and _TARGET_PROVIDER.get(variant.target) == first_provider:
        return "int8"
    return manifest.precision


def _check_io(path: Any, got: list[Any], want: tuple[TensorSpec, ...], what: str) -> None:
    """Compare a session's inputs or outputs with the contract (fixed axes exactly, dynamic axes left
    dynamic); a mismatch is a BundleError."""
    got_by_name = {arg.name: arg for arg in got}
    for spec in want:
        arg = got_by_name.get(spec.name)
        if arg is None:
            raise BundleError(path, f"graph has no {what} named {spec.name!r} (has {sorted(got_by_name)})")
        shape = tuple(d if isinstance(d, int) else "?" for d in arg.shape)
        expected = tuple(d if isinstance(d, int) else "?" for d in spec.shape)
        if shape != expected:
            raise BundleError(
                path,
                f"{what} {spec.name!r} has shape {list(arg.shape)} but the contract says {list(spec.shape)}",
            )


class OnnxRuntimeEngine:
    """A bundle's graphs as ONNX Runtime sessions.

    ``state`` follows the backend protocol (engines.backends.base): ``building`` while a session with
    the TensorRT EP compiles, then ``ready``, ``failed`` or ``closed``; ``on_state`` hears each change.
    """

    def __init__(self, bundle: Bundle, config: Config, *, on_state: StateCallback | None = None) -> None:
        self._on_state = on_state
        self.state: EngineState = "opening"
        ort = _import_ort()
        self.bundle = bundle
        self.config = config
        self._providers = resolve_providers(config, ort.get_available_providers())
        if PROVIDERS["tensorrt"] in self._providers:
            self._set_state("building")
        self._find: Any = None
        try:
            self.precision = choose_precision(bundle, config.precision, self._providers[0])
            self.segment_path, self.find_path = bundle.graphs_at(self.precision)
            variant = bundle.manifest.variants.get(self.precision)  # type: ignore[call-overload]
            # Weight-only INT8 is a storage form: with QDQ handling off, ONNX Runtime folds each weight's
            # DequantizeLinear into an FP32 initializer when the session is created, so it runs as fast as FP32.
            self._fold_weights = variant is not None and variant.mode == "weight_only"
            classes = bundle.manifest.num_classes
            self._segment: Any = self._open(ort, self.segment_path)
            _check_io(self.segment_path, self._segment.get_inputs(), (segment_input(),), "input")
            _check_io(self.segment_path, self._segment.get_outputs(), (segment_output(classes),), "output")
            if self.find_path is not None:
                self._find = self._open(ort, self.find_path)
                _check_io(self.find_path, self._find.get_inputs(), (find_input(),), "input")
                _check_io(self.find_path, self._find.get_outputs(), (find_output(),), "output")
        except BaseException:
            self._segment = self._find = None
            self._set_state("failed")
            raise
        self._set_state("ready")

    def _set_state(self, state: EngineState) -> None:
        self.state = state
        if self._on_state is not None:
            self._on_state(state)

    def _open(self, runtime: Any, path: Any) -> ort.InferenceSession:
        options = runtime.SessionOptions()
        options.intra_op_num_threads = self.config.intra_op_threads
        options.inter_op_num_threads = self.config.inter_op_threads
        options.graph_optimization_level = {
            "disable": runtime.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": runtime.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": runtime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": runtime.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[self.config.graph_optimization]
        options.log_severity_level = 3
        spin = "1" if self.config.spin_wait else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spin)
        options.add_session_config_entry("session.inter_op.allow_spinning", spin)
        if self._fold_weights:
            options.add_session_config_entry("session.disable_quant_qdq", "1")
        try:
            return runtime.InferenceSession(str(path), sess_options=options, providers=self._providers)
        except Exception as exc:  # ORT raises its own exception types for bad graphs
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            raise BundleError(path, f"ONNX Runtime cannot load the graph: {first_line}") from None

    @property
    def backend_name(self) -> str:
        return f"{KEY}:{self._segment.get_providers()[0]}"

    @property
    def has_find(self) -> bool:
        return self._find is not None

    def find(self, image: np.ndarray) -> np.ndarray:
        if self._find is None:
            raise DefectsamError(f"{self.bundle.path}: bundle has no find graph (inspect by tiles or whole frames)")
        _check_batch(image, "find input", single=True)
        (candidates,) = self._find.run([FIND_OUTPUT], {FIND_INPUT: image})
        return np.asarray(candidates[0, 0])

    def segment(self, windows: np.ndarray) -> np.ndarray:
        _check_batch(windows, "windows", single=False)
        (probs,) = self._segment.run([SEGMENT_OUTPUT], {SEGMENT_INPUT: windows})
        return np.asarray(probs)

    def close(self) -> None:
        if self.state == "closed":
            return
        self._segment = None
        self._find = None
        self._set_state("closed")


def _check_batch(tensor: np.ndarray, what: str, *, single: bool) -> None:
    """DefectsamError unless ``tensor`` is float32 Bx3xHxW with H, W multiples of 16 (B = 1 when ``single``)."""
    ok = (
        isinstance(tensor, np.ndarray) and tensor.dtype == np.float32 and tensor.ndim == 4 and tensor.shape[1] == 3
        and tensor.shape[0] >= 1 and (tensor.shape[0] == 1 or not single)
        and tensor.shape[2] % SIDE_MULTIPLE == 0 and tensor.shape[3] % SIDE_MULTIPLE == 0 and tensor.shape[2] > 0
        and tensor.shape[3] > 0
    )
    if not ok:
        shape = list(getattr(tensor, "shape", ())) or type(tensor).__name__
        want = "1" if single else "B"
        raise DefectsamError(
            f"{what} must be float32 {want} x 3 x H x W with H, W multiples of {SIDE_MULTIPLE}, got "
            f"{getattr(tensor, 'dtype', '?')} {shape}"
        )


def open_engine(bundle: Bundle, config: Config, *, on_state: StateCallback | None = None) -> OnnxRuntimeEngine:
    return OnnxRuntimeEngine(bundle, config, on_state=on_state)
