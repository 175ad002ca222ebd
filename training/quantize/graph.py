"""The ONNX side of quantization: pre-processing, which nodes stay FP32, static QDQ and weight-only INT8.

Static (``quantize_static``): ONNX Runtime's QDQ quantizer after ``quant_pre_process``; weights
INT8 symmetric per output channel, activations from MinMax calibration. The activation type
depends on who runs the graph (``target``):

* ``cpu``: uint8 asymmetric activations. ONNX Runtime's x86 kernels multiply u8 x s8 (VNNI),
  and an asymmetric range lets the quantizer drop ReLU/ReLU6 into the preceding Q's range.
* ``tensorrt``: int8 symmetric activations (zero point 0), the only form TensorRT's explicit
  quantization accepts; ReLU6 stays a Clip between Q/DQ pairs. ONNX Runtime runs it on a CPU,
  but without the speed-up (docs/quantization.md has the figures).

Weight-only: every Conv, ConvTranspose, Gemm and MatMul weight becomes an INT8 initializer
(symmetric, per output channel) read through a DequantizeLinear node; activations and compute
stay FP32. ONNX Runtime's own ``quantize_dynamic`` is not used for it: it quantizes activations
at run time (ConvInteger, MatMulInteger), which neither keeps FP32 compute nor is a form
TensorRT consumes. MatMulNBits covers MatMul only, and this model is mostly convolutions.

Op types outside ``QUANTIZED_OP_TYPES`` are never quantized. Kept in FP32 beyond them, in every
mode (``float_nodes``): each graph's output head, from its output back to the convolution that
makes the logits (the segment graph's written-out softmax, the find graph's Sigmoid): 8-bit
logits would put steps into the probabilities the thresholds read. The precision gate may keep
more, by module group (``node_groups``).
"""

from __future__ import annotations

import ast
import inspect
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from engines.errors import DefectsamError

Target = Literal["cpu", "tensorrt"]
Mode = Literal["static", "weight_only"]

# Op types handed to ONNX Runtime's QDQ quantizer: the compute (Conv, Gemm, MatMul), the element-wise
# ops and data movement between them (so INT8 flows from one to the next without a DQ/Q round trip).
QUANTIZED_OP_TYPES: tuple[str, ...] = (
    "Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "Clip", "Relu",
    "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Concat", "Slice", "Split", "Resize", "Pad",
    "AveragePool",
)
# Named in manifests (kept_fp32.op_types): the op types of the output heads float_nodes keeps FP32 (the
# convolution making the logits aside). Every op type outside QUANTIZED_OP_TYPES stays FP32 anyway.
KEPT_FP32_OP_TYPES: tuple[str, ...] = ("Sigmoid", "ReduceMax", "Sub", "Exp", "ReduceSum", "Div")
# How far back from a graph output the head walk goes (ReduceMax, Sub, Exp, ReduceSum, Div, Conv: 6 steps).
_HEAD_WALK_DEPTH = 8
UNSCOPED = "(graph)"
_SCOPES_KEY = "pkg.torch.onnx.name_scopes"


def _onnx() -> Any:
    import onnx

    return onnx


def _quantization() -> Any:
    try:
        import onnxruntime.quantization as quantization
    except ImportError as exc:  # pragma: no cover - onnxruntime is a base dependency
        raise DefectsamError(f"quantization needs onnxruntime's quantization tools ({exc})") from None
    if "calibration_cache_path" not in inspect.signature(quantization.quantize_static).parameters:
        import onnxruntime

        raise DefectsamError(
            "defectsam-train quantize needs onnxruntime >= 1.31 (calibration caches); "
            f"this is {onnxruntime.__version__}"
        )
    return quantization


def preprocess(src: Path, dst: Path) -> None:
    """ORT's ``quant_pre_process``: shape inference and basic graph fusions (MatMul + Add -> Gemm)."""
    quantization = _quantization()
    quantization.shape_inference.quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    # Every node needs a name: exclusion lists and the gate's groups refer to nodes by name.
    onnx = _onnx()
    model = onnx.load(str(dst))
    if any(not node.name for node in model.graph.node):
        for index, node in enumerate(model.graph.node):
            if not node.name:
                node.name = f"{node.op_type}_unnamed_{index}"
        onnx.save(model, str(dst))


def _module_of(scopes: Sequence[str]) -> str:
    """A node's module group from its name scopes: the module path cut after its first index, at most 4 deep.

    ``model.encoder.blocks.3.block.0.1`` -> ``model.encoder.blocks.3``;
    ``model.decoder.steps.0.block.1`` -> ``model.decoder.steps.0``.
    """
    modules = [s for s in scopes if s.startswith("model.") or s == "model"]
    if not modules:
        return UNSCOPED
    parts = modules[-1].split(".")
    cut: list[str] = []
    for part in parts[:4]:
        cut.append(part)
        if part.isdigit():
            break
    return ".".join(cut)


def _scopes(node: Any) -> list[str]:
    for prop in node.metadata_props:
        if prop.key == _SCOPES_KEY:
            try:
                value = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return []
            return [str(v) for v in value] if isinstance(value, list) else []
    return []


def node_groups(original: Path, preprocessed: Path) -> dict[str, str]:
    """Node name in the pre-processed graph -> module group (from the exporter's scopes in the original).

    Pre-processing renames fused nodes (``X/MatMulAddFusion``) and drops metadata; a node is found
    by its name, the name before '/', an output tensor it shares with the original, or its neighbours.
    """
    onnx = _onnx()
    source = onnx.load(str(original), load_external_data=False)
    by_name: dict[str, str] = {}
    by_tensor: dict[str, str] = {}
    for node in source.graph.node:
        group = _module_of(_scopes(node))
        by_name[node.name] = group
        for tensor in node.output:
            by_tensor[tensor] = group
    target = onnx.load(str(preprocessed), load_external_data=False)
    groups: dict[str, str] = {}
    pending: list[Any] = []
    for node in target.graph.node:
        found = by_name.get(node.name) or by_name.get(node.name.split("/")[0])
        if found is None:
            found = next((by_tensor[t] for t in node.output if t in by_tensor), None)
        if found is None:
            pending.append(node)
        else:
            groups[node.name] = found
    # Nodes the optimiser made up (reshapes around a Gemm): the group of a neighbour.
    producer = {t: n.name for n in target.graph.node for t in n.output}
    consumers: dict[str, list[str]] = defaultdict(list)
    for node in target.graph.node:
        for tensor in node.input:
            consumers[tensor].append(node.name)
    for _ in range(3):
        still = []
        for node in pending:
            near = [producer.get(t) for t in node.input] + [c for t in node.output for c in consumers[t]]
            found = next((groups[n] for n in near if n is not None and n in groups), None)
            if found is None:
                still.append(node)
            else:
                groups[node.name] = found
        pending = still
    for node in pending:
        groups[node.name] = UNSCOPED
    return groups


def float_nodes(model_path: Path) -> list[str]:
    """Nodes kept FP32 by rule, beyond the op types never quantized: the output head of each graph.

    Both graphs end in probabilities: the segment graph in a softmax over the classes written out as
    ReduceMax, Sub, Exp, ReduceSum, Div (engines' contract, training.export.onnx), the find graph in a
    Sigmoid. Every node from a graph output back to the convolution that makes the logits stays FP32,
    that convolution included: 8-bit logits put ties into the class argmax and steps into the
    probabilities the thresholds read (0.5 for a mask pixel, the calibrated score and candidate
    thresholds).
    """
    onnx = _onnx()
    model = onnx.load(str(model_path), load_external_data=False)
    producer = {t: n for n in model.graph.node for t in n.output}
    keep: set[str] = set()
    frontier = [producer[o.name] for o in model.graph.output if o.name in producer]
    for _ in range(_HEAD_WALK_DEPTH):
        upstream: list[Any] = []
        for node in frontier:
            if node.name in keep:
                continue
            keep.add(node.name)
            if node.op_type in ("Conv", "ConvTranspose"):
                continue  # the logits: the head ends here
            upstream.extend(producer[t] for t in node.input if t in producer)
        frontier = upstream
    return sorted(keep)


def groups_to_nodes(groups: Mapping[str, str], exact: Iterable[str] = (), under: Iterable[str] = ()) -> list[str]:
    """Nodes whose group is one of ``exact`` (the gate's ranked groups), or whose group or name is one
    of ``under`` or lies below it (``--keep-fp32 model.decoder`` takes every part of the decoder)."""
    exact, under = set(exact), list(under)
    return sorted(
        name for name, group in groups.items()
        if group in exact or any(group == u or group.startswith(u + ".") or name == u for u in under)
    )


def quantize_static(
    src: Path,
    dst: Path,
    feeds: Sequence[Mapping[str, np.ndarray]],
    *,
    target: Target,
    exclude: Sequence[str],
    cache: Path,
) -> None:
    """Static QDQ quantization of the pre-processed graph ``src`` into ``dst``.

    The first call with a given ``cache`` calibrates on ``feeds`` and stores the ranges there; later
    calls (other exclusions) reuse them, so the gate's fallback rounds cost no new calibration.
    """
    from training.quantize.calibration import FeedReader

    quantization = _quantization()
    symmetric = target == "tensorrt"
    quantization.quantize_static(
        str(src),
        str(dst),
        FeedReader([dict(feed) for feed in feeds]),
        quant_format=quantization.QuantFormat.QDQ,
        per_channel=True,
        activation_type=quantization.QuantType.QInt8 if symmetric else quantization.QuantType.QUInt8,
        weight_type=quantization.QuantType.QInt8,
        op_types_to_quantize=list(QUANTIZED_OP_TYPES),
        nodes_to_exclude=list(exclude),
        calibrate_method=quantization.CalibrationMethod.MinMax,
        calibration_cache_path=str(cache),
        extra_options={
            "ActivationSymmetric": symmetric,
            "WeightSymmetric": True,
            # Not CalibMaxIntermediateOutputs: ORT 1.31 drops the collected ranges when it is reached.
            # MinMax keeps one min and one max per tensor and frame, little memory at any input size.
        },
    )


def read_ranges(cache: Path) -> dict[str, tuple[float, float]]:
    """The calibrated (min, max) of every tensor in a calibration cache written by ``quantize_static``."""
    from onnxruntime.quantization.calibrate import load_tensors_data

    ranges = {}
    for name, data in load_tensors_data(cache).items():
        low, high = data.range_value
        ranges[name] = (float(np.min(low)), float(np.max(high)))
    return ranges


# Weight input of each op a weight-only pass quantizes, and the axis of its output channels.
def _weight_axis(node: Any, model_inits: Mapping[str, Any]) -> int | None:
    op = node.op_type
    if op == "Conv":
        return 0
    if op == "ConvTranspose":
        return 1
    if op == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if op == "MatMul":
        weight = model_inits.get(node.input[1])
        return 1 if weight is not None and len(weight.dims) == 2 else None
    return None


def quantize_weights(src: Path, dst: Path, *, exclude: Sequence[str]) -> int:
    """INT8 weights read through DequantizeLinear, FP32 compute. Returns how many weights were quantized."""
    onnx = _onnx()
    from onnx import numpy_helper

    model = onnx.load(str(src))
    inits = {init.name: init for init in model.graph.initializer}
    excluded = set(exclude)
    uses: dict[str, list[tuple[Any, int | None]]] = defaultdict(list)
    for node in model.graph.node:
        for position, tensor in enumerate(node.input):
            if tensor in inits:
                axis = _weight_axis(node, inits) if position == 1 and node.name not in excluded else None
                uses[tensor].append((node, axis))
    dq_nodes = []
    count = 0
    for name, users in uses.items():
        axes = {axis for _, axis in users}
        if len(axes) != 1 or None in axes:
            continue  # a bias, a constant, or a weight shared with a node that keeps it FP32
        axis = axes.pop()
        weight = numpy_helper.to_array(inits[name])
        if weight.dtype != np.float32 or weight.ndim < 2:
            continue
        assert axis is not None
        moved = np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1)
        peak = np.abs(moved).max(axis=1)
        scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
        shape = [1] * weight.ndim
        shape[axis] = -1
        quantized = np.clip(np.rint(weight / scale.reshape(shape)), -127, 127).astype(np.int8)
        model.graph.initializer.remove(inits[name])
        model.graph.initializer.extend([
            numpy_helper.from_array(quantized, f"{name}_int8"),
            numpy_helper.from_array(scale, f"{name}_scale"),
            numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), f"{name}_zero_point"),
        ])
        dq_nodes.append(onnx.helper.make_node(
            "DequantizeLinear", [f"{name}_int8", f"{name}_scale", f"{name}_zero_point"], [name],
            name=f"{name}_DequantizeLinear", axis=axis,
        ))
        count += 1
    # DequantizeLinear of an initializer depends on nothing: first in topological order.
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend([*dq_nodes, *nodes])
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return count


def fake_quant_error(values: np.ndarray, low: float, high: float, target: Target) -> tuple[float, float]:
    """(signal energy, error energy) of quantizing ``values`` with the calibrated range, as ORT would."""
    x = values.astype(np.float64, copy=False)
    if target == "tensorrt":
        peak = max(abs(low), abs(high))
        if peak == 0:
            return float(np.square(x).sum()), float(np.square(x).sum())
        scale = peak / 127.0
        restored = np.clip(np.rint(x / scale), -127, 127) * scale
    else:
        low, high = min(low, 0.0), max(high, 0.0)
        if high == low:
            return float(np.square(x).sum()), float(np.square(x).sum())
        scale = (high - low) / 255.0
        zero = np.rint(-low / scale)
        restored = (np.clip(np.rint(x / scale) + zero, 0, 255) - zero) * scale
    return float(np.square(x).sum()), float(np.square(x - restored).sum())
