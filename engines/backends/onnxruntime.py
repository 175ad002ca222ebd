"""ONNX Runtime backend: TensorRT EP, CUDA EP or CPU, whichever is asked for and present.

With the TensorRT execution provider, ONNX Runtime compiles TensorRT engines while the session is
created (minutes on a Jetson), so the engine reports ``building`` through ``on_state`` first.

``precision`` picks which of a bundle's graphs run: the FP32 graphs, or the INT8 (QDQ) variant
that ``defectsam-train quantize`` adds (docs/quantization.md). ``auto`` takes the INT8 variant
only when it passed the precision gate and was quantized for the provider that runs it.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, field_validator

from engines.backends.base import BackendConfigBase, EngineState, StateCallback
from engines.bundle import Bundle, Variant
from engines.contract import (
    DECODER_INPUT_NAMES,
    DECODER_OUTPUT_NAMES,
    FUSED_OUTPUT_NAMES,
    INPUT_NAME,
    TensorSpec,
)
from engines.engine import EngineOutputs
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

# The hot path asks only for what postprocessing reads; the embedding is fetched on request.
_FRAME_OUTPUTS = [name for name in FUSED_OUTPUT_NAMES if name != "image_embedding"]


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
    """Compare a session's inputs or outputs with the contract; a mismatch is a BundleError."""
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
                f"{what} {spec.name!r} has shape {list(arg.shape)} but the manifest implies {list(spec.shape)}",
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
        try:
            self.precision = choose_precision(bundle, config.precision, self._providers[0])
            self.graph_path, self._decoder_path = bundle.graphs_at(self.precision)
            variant = bundle.manifest.variants.get(self.precision)  # type: ignore[call-overload]
            # Weight-only INT8 is a storage form: with QDQ handling off, ONNX Runtime folds each weight's
            # DequantizeLinear into an FP32 initializer when the session is created, so it runs as fast as FP32.
            self._fold_weights = variant is not None and variant.mode == "weight_only"
            self._session: Any = self._open(ort, self.graph_path)
            shape = bundle.manifest.graph_shape
            _check_io(self.graph_path, self._session.get_inputs(), (shape.input_spec(),), "input")
            _check_io(self.graph_path, self._session.get_outputs(), shape.fused_outputs(), "output")
        except BaseException:
            self._session = None
            self._set_state("failed")
            raise
        # The decoder-only graph serves interactive prompts, never the per-frame path: it is opened
        # on first use (its checksum was verified with the bundle), saving its memory on a line box.
        self._ort = ort
        self._decoder: Any = None
        self._decoder_lock = threading.Lock()
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
        return f"{KEY}:{self._session.get_providers()[0]}"

    def infer(self, image: np.ndarray, *, with_embedding: bool = False) -> EngineOutputs:
        expected = self.bundle.manifest.graph_shape.input_spec().shape
        if image.shape != expected or image.dtype != np.float32:
            raise DefectsamError(
                f"engine input must be float32 {list(expected)}, got {image.dtype} {list(image.shape)}"
            )
        names = [*_FRAME_OUTPUTS, "image_embedding"] if with_embedding else _FRAME_OUTPUTS
        values = dict(zip(names, self._session.run(names, {INPUT_NAME: image}), strict=True))
        return EngineOutputs(
            heatmap=values["heatmap"][0],  # 1xCxhxw -> Cxhxw
            points=values["points"],
            point_scores=values["point_scores"],
            point_classes=values["point_classes"],
            mask_logits=values["mask_logits"],
            iou=values["iou"],
            image_embedding=values.get("image_embedding"),
        )

    def _decoder_session(self) -> Any:
        with self._decoder_lock:
            if self._decoder is None:
                path = self._decoder_path
                if path is None:
                    raise DefectsamError(f"{self.bundle.path}: bundle has no decoder-only graph for point prompts")
                session = self._open(self._ort, path)
                _check_io(path, session.get_inputs(), self.bundle.manifest.graph_shape.decoder_inputs(), "input")
                self._decoder = session
            return self._decoder

    def prompt(
        self, image_embedding: np.ndarray, point_coords: np.ndarray, point_labels: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        decoder = self._decoder_session()
        feeds = dict(
            zip(
                DECODER_INPUT_NAMES,
                (
                    np.ascontiguousarray(image_embedding, dtype=np.float32),
                    np.ascontiguousarray(point_coords, dtype=np.float32),
                    np.ascontiguousarray(point_labels, dtype=np.float32),
                ),
                strict=True,
            )
        )
        mask_logits, iou = decoder.run(list(DECODER_OUTPUT_NAMES), feeds)
        return mask_logits, iou

    def close(self) -> None:
        if self.state == "closed":
            return
        self._session = None
        self._decoder = None
        self._set_state("closed")


def open_engine(bundle: Bundle, config: Config, *, on_state: StateCallback | None = None) -> OnnxRuntimeEngine:
    return OnnxRuntimeEngine(bundle, config, on_state=on_state)
