"""Checks an ONNX graph must pass before TensorRT is asked to build an engine from it.

A TensorRT build takes minutes on a Jetson and fails with a parser message about one node at a
time. These checks read the graph with the ``onnx`` package alone (no GPU, no TensorRT), so they
run on a development box, in CI and at the start of every build, and they report every problem at
once, one line each, naming the file, the node or tensor, and the cause:

* the model loads and passes ``onnx.checker``;
* every graph input and output has a fully static shape, except axes the contract names (the
  segment graph's batch, both graphs' height and width) or ``allowed_dynamic`` lists; those are
  reported in ``OnnxCheckReport.dynamic_axes`` so the builder gives each an optimisation profile;
* the default-domain opset is within what TensorRT 10's ONNX parser supports (``OPSET_RANGE``);
* every node, inside If/Loop/Scan bodies and model-local functions too, is an op in
  ``TENSORRT_ONNX_OPS``; ops of other domains (custom ops) would need a TensorRT plugin;
* a few documented parser restrictions the models could hit: Resize modes, TopK's K,
  non-zero quantization zero points (TensorRT quantizes symmetrically);
* no tensor of a type TensorRT lacks (float64, string, complex, 16/32/64-bit unsigned, int16);
* graph inputs and outputs match the contract (engines.contract) when expected specs are given.

``onnx`` is imported inside the functions: it is in the ``tensorrt``, ``train`` and ``dev`` extras,
not in the base install.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engines.contract import TensorSpec
from engines.errors import BackendUnavailableError, DefectsamError

if TYPE_CHECKING:
    import onnx

    from engines.bundle import Bundle

# The default-domain opsets TensorRT 10's ONNX parser accepts. Source: onnx/onnx-tensorrt
# docs/operators.md for TensorRT 10.0 ("supports operators in the inclusive range of opset 9 to
# opset 20"). Later 10.x parsers accept more (10.15: 9 to 24), but JetPack 6 ships TensorRT 10.3,
# and a bundle must build on the oldest TensorRT 10 a station runs.
OPSET_RANGE = (9, 20)

# ONNX ops (default domain) TensorRT 10's ONNX parser imports. Source: onnx/onnx-tensorrt
# docs/operators.md, "Operator Support Matrix", the rows marked Y in the TensorRT 10.15 edition,
# minus the ops that onnx-tensorrt's docs/Changelog.md says were added after TensorRT 10.3 (the
# JetPack 6 version): BlackmanWindow, HammingWindow, HannWindow (10.4), STFT (10.5), Attention
# (10.14), RotaryEmbedding, RMSNormalization, TensorScatter (10.15). Per-op restrictions in that
# table (types, constant inputs) are checked only where listed in _RESTRICTIONS below.
TENSORRT_ONNX_OPS: frozenset[str] = frozenset(
    {
        "Abs", "Acos", "Acosh", "Add", "And", "ArgMax", "ArgMin", "Asin", "Asinh", "Atan", "Atanh",
        "AveragePool", "BatchNormalization", "Cast", "CastLike", "Ceil", "Celu", "Clip", "Concat",
        "Constant", "ConstantOfShape", "Conv", "ConvTranspose", "Cos", "Cosh", "CumSum", "DeformConv",
        "DepthToSpace", "DequantizeLinear", "Div", "Dropout", "Einsum", "Elu", "Equal", "Erf", "Exp",
        "Expand", "EyeLike", "Flatten", "Floor", "Gather", "GatherElements", "GatherND", "Gelu", "Gemm",
        "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "Greater", "GreaterOrEqual", "GridSample",
        "GroupNormalization", "GRU", "HardSigmoid", "HardSwish", "Hardmax", "Identity", "If",
        "ImageScaler", "InstanceNormalization", "IsInf", "IsNaN", "LayerNormalization", "LeakyRelu",
        "Less", "LessOrEqual", "Log", "LogSoftmax", "Loop", "LRN", "LSTM", "LpNormalization", "LpPool",
        "MatMul", "Max", "MaxPool", "Mean", "MeanVarianceNormalization", "Min", "Mish", "Mod", "Mul",
        "Neg", "NonMaxSuppression", "NonZero", "Not", "OneHot", "Or", "Pad", "ParametricSoftplus", "Pow",
        "PRelu", "QuantizeLinear", "RandomNormal", "RandomNormalLike", "RandomUniform",
        "RandomUniformLike", "Range", "Reciprocal", "ReduceL1", "ReduceL2", "ReduceLogSum",
        "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum",
        "ReduceSumSquare", "Relu", "Reshape", "Resize", "ReverseSequence", "RNN", "RoiAlign", "Round",
        "ScaledTanh", "Scan", "Scatter", "ScatterElements", "ScatterND", "Selu", "Shape", "Shrink",
        "Sigmoid", "Sign", "Sin", "Sinh", "Size", "Slice", "Softmax", "Softplus", "Softsign",
        "SpaceToDepth", "Split", "Sqrt", "Squeeze", "Sub", "Sum", "Tan", "Tanh", "ThresholdedRelu",
        "Tile", "TopK", "Transpose", "Trilu", "Unsqueeze", "Upsample", "Where", "Xor",
    }
)  # fmt: skip

# ONNX element types TensorRT cannot hold. TensorRT 10 lists DOUBLE as "limited support" (cast
# down to float with clamping); we reject it so that what is built is what was validated.
_REJECTED_TYPES = {
    11: "float64",
    8: "string",
    14: "complex64",
    15: "complex128",
    4: "uint16",
    12: "uint32",
    13: "uint64",
    5: "int16",
}

# Resize attributes the parser supports (operators.md, Resize row).
_RESIZE_MODES = frozenset({"nearest", "linear"})
_RESIZE_COORDINATE_MODES = frozenset(
    {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}
)
_TOPK_MAX_K = 3840  # operators.md, TopK row: "K input must be less than 3840"

_DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class Problem:
    """One reason a graph cannot be built by TensorRT. ``str()`` is one line."""

    file: Path
    where: str  # "node 'decoder/Resize_3' (Resize)", "input 'image'", "model", ...
    cause: str

    def __str__(self) -> str:
        return f"{self.file}: {self.where}: {self.cause}"


@dataclass
class OnnxCheckReport:
    """What the checks found in one graph."""

    file: Path
    problems: list[Problem] = field(default_factory=list)
    opset: int | None = None
    # graph input name -> {axis index: dim_param}, for the allowed dynamic axes found on inputs
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    quantized: bool = False  # the graph holds QuantizeLinear/DequantizeLinear nodes (QDQ)
    op_types: frozenset[str] = frozenset()

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_if_problems(self) -> None:
        if self.problems:
            raise OnnxCheckError(self.file, self.problems)


class OnnxCheckError(DefectsamError):
    """A graph TensorRT cannot build; ``problems`` holds every reason, the message lists them."""

    def __init__(self, file: Path, problems: Sequence[Problem]) -> None:
        self.file = file
        self.problems = list(problems)
        count = len(self.problems)
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"{file}: {count} problem{'s' if count != 1 else ''} before a TensorRT build:\n{lines}")


def _import_onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise BackendUnavailableError(
            "the TensorRT pre-build checks need the onnx package: pip install 'defectsam[tensorrt]'"
        ) from None
    return onnx


def check_onnx_for_tensorrt(
    path: Path | str,
    expected_inputs: Sequence[TensorSpec] | None = None,
    expected_outputs: Sequence[TensorSpec] | None = None,
    *,
    allowed_dynamic: Collection[str] = (),
    opset_range: tuple[int, int] = OPSET_RANGE,
) -> OnnxCheckReport:
    """Check one ONNX file for a TensorRT 10 build; never raises for a bad graph, returns problems.

    ``expected_inputs`` / ``expected_outputs`` (engines.contract specs) are compared with the
    graph's inputs and outputs by name, shape and dtype; a ``str`` dim in a spec names an axis
    allowed to be dynamic, as does every name in ``allowed_dynamic``.
    """
    onnx = _import_onnx()
    path = Path(path)
    report = OnnxCheckReport(file=path)
    problems = report.problems

    def problem(where: str, cause: str) -> None:
        problems.append(Problem(path, where, cause))

    try:
        model = onnx.load(str(path))
    except FileNotFoundError:
        problem("model", "file does not exist")
        return report
    except Exception as exc:  # protobuf DecodeError, missing external data, ...
        problem("model", f"cannot be loaded by onnx: {_first_line(exc)}")
        return report
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # onnx.checker.ValidationError and friends
        problem("model", f"fails onnx.checker: {_first_line(exc)}")

    # opset
    default_opsets = [imp.version for imp in model.opset_import if imp.domain in _DEFAULT_DOMAINS]
    low, high = opset_range
    if not default_opsets:
        problem("model", "imports no default-domain ('ai.onnx') opset")
    else:
        report.opset = max(default_opsets)
        if not low <= report.opset <= high:
            problem(
                "model",
                f"opset {report.opset} is outside what TensorRT 10's ONNX parser supports ({low}..{high}); "
                f"re-export with opset_version={min(max(report.opset, low), high)}",
            )

    allowed = set(allowed_dynamic)
    for specs in (expected_inputs, expected_outputs):
        for spec in specs or ():
            allowed.update(d for d in spec.shape if isinstance(d, str))

    graph = model.graph
    initializer_names = {init.name for init in graph.initializer}
    real_inputs = [value for value in graph.input if value.name not in initializer_names]
    for kind, values in (("input", real_inputs), ("output", list(graph.output))):
        for value in values:
            where = f"{kind} '{value.name}'"
            shape, shape_problem = _value_shape(value)
            if shape_problem:
                problem(where, shape_problem)
                continue
            for axis, dim in enumerate(shape):
                if isinstance(dim, int):
                    continue
                if dim and dim in allowed:
                    if kind == "input":
                        report.dynamic_axes.setdefault(value.name, {})[axis] = dim
                    continue
                what = f"dynamic ('{dim}')" if dim else "unknown"
                problem(
                    where,
                    f"axis {axis} is {what}; TensorRT needs static shapes here "
                    f"(dynamic axes allowed: {sorted(allowed) or 'none'})",
                )

    if expected_inputs is not None:
        _compare_specs(onnx, path, "input", real_inputs, expected_inputs, problems)
    if expected_outputs is not None:
        _compare_specs(onnx, path, "output", list(graph.output), expected_outputs, problems)

    # element types: run shape inference so intermediate tensors carry their types
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # inference is best effort: a graph it cannot type still gets the checks below
        inferred = model
    for where, elem_type in _typed_tensors(inferred):
        if elem_type in _REJECTED_TYPES:
            problem(where, f"has type {_REJECTED_TYPES[elem_type]}, which TensorRT does not support")

    # operators
    functions = {(f.domain, f.name): f for f in model.functions}
    seen_ops: set[str] = set()
    constants = _constant_values(onnx, graph)
    for scope, node in _all_nodes(graph, functions):
        label = _node_label(scope, node)
        if node.domain not in _DEFAULT_DOMAINS:
            if (node.domain, node.op_type) in functions:
                continue  # a model-local function: its body is walked by _all_nodes
            problem(
                label,
                f"op '{node.domain}::{node.op_type}' is outside the ONNX standard domain; "
                f"TensorRT would need a plugin for it",
            )
            continue
        seen_ops.add(node.op_type)
        if node.op_type not in TENSORRT_ONNX_OPS:
            problem(label, f"op '{node.op_type}' is not supported by TensorRT 10's ONNX parser")
            continue
        for cause in _restrictions(onnx, node, constants):
            problem(label, cause)

    report.op_types = frozenset(seen_ops)
    report.quantized = bool(seen_ops & {"QuantizeLinear", "DequantizeLinear"})
    return report


def check_bundle_for_tensorrt(bundle: Bundle, *, precision: str = "fp32") -> list[OnnxCheckReport]:
    """Check a bundle's segment graph and find graph at ``precision`` (``int8``: its INT8 QDQ variant)
    against the contract. One report per graph, segment first."""
    from engines.contract import find_input, find_output, segment_input, segment_output

    segment, find = bundle.graphs_at(None if precision == bundle.manifest.precision else precision)
    reports = [check_onnx_for_tensorrt(segment, (segment_input(),), (segment_output(bundle.manifest.num_classes),))]
    if find is not None:
        reports.append(check_onnx_for_tensorrt(find, (find_input(),), (find_output(),)))
    return reports


# --- helpers -----------------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else exc.__class__.__name__


def _value_shape(value: onnx.ValueInfoProto) -> tuple[list[int | str], str | None]:
    """The dims of a graph input/output: int for static, dim_param for named dynamic, "" for unknown."""
    if not value.type.HasField("tensor_type"):
        return [], f"is not a tensor (type {value.type.WhichOneof('value')})"
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return [], "has no shape; TensorRT needs static shapes (export with fixed input sizes)"
    dims: list[int | str] = []
    for dim in tensor_type.shape.dim:
        if dim.HasField("dim_value") and dim.dim_value >= 0:
            dims.append(int(dim.dim_value))
        elif dim.HasField("dim_param"):
            dims.append(dim.dim_param)
        else:
            dims.append("")
    return dims, None


def _compare_specs(
    onnx: Any,
    path: Path,
    kind: str,
    values: Sequence[onnx.ValueInfoProto],
    specs: Sequence[TensorSpec],
    problems: list[Problem],
) -> None:
    by_name = {value.name: value for value in values}
    for spec in specs:
        value = by_name.get(spec.name)
        if value is None:
            problems.append(
                Problem(path, f"{kind} '{spec.name}'", f"missing: the graph's {kind}s are {sorted(by_name)}")
            )
            continue
        shape, shape_problem = _value_shape(value)
        if shape_problem:
            continue  # already reported
        got = ["?" if isinstance(d, str) else d for d in shape]
        want = ["?" if isinstance(d, str) else d for d in spec.shape]
        if got != want:
            problems.append(
                Problem(
                    path,
                    f"{kind} '{spec.name}'",
                    f"shape {_show(shape)} does not match the manifest's {_show(list(spec.shape))}",
                )
            )
        elem = value.type.tensor_type.elem_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(elem).name if elem else "undefined"
        if dtype != spec.dtype:
            problems.append(
                Problem(path, f"{kind} '{spec.name}'", f"dtype {dtype} does not match the manifest's {spec.dtype}")
            )
    extra = sorted(set(by_name) - {spec.name for spec in specs})
    if extra and kind == "input":
        problems.append(
            Problem(path, "model", f"unexpected graph inputs {extra} (the contract has {[s.name for s in specs]})")
        )


def _show(shape: Sequence[int | str]) -> str:
    return "[" + ", ".join(str(d) if d != "" else "?" for d in shape) + "]"


def _typed_tensors(model: onnx.ModelProto) -> Iterator[tuple[str, int]]:
    """(where, ONNX element type) of every typed tensor: graph I/O, value_info, initializers,
    Constant values and Cast targets, in subgraphs and functions too."""

    def walk(graph: onnx.GraphProto, scope: str) -> Iterator[tuple[str, int]]:
        prefix = f"{scope}/" if scope else ""
        for kind, values in (("input", graph.input), ("output", graph.output), ("tensor", graph.value_info)):
            for value in values:
                if value.type.HasField("tensor_type"):
                    yield f"{kind} '{prefix}{value.name}'", value.type.tensor_type.elem_type
        for init in graph.initializer:
            yield f"initializer '{prefix}{init.name}'", init.data_type
        for node in graph.node:
            yield from node_types(node, scope)
            for attr in node.attribute:
                for sub in _subgraphs(attr):
                    yield from walk(sub, _node_label(scope, node))

    def node_types(node: onnx.NodeProto, scope: str) -> Iterator[tuple[str, int]]:
        for attr in node.attribute:
            if node.op_type == "Constant" and attr.name == "value" and attr.HasField("t"):
                yield _node_label(scope, node), attr.t.data_type
            elif node.op_type == "Constant" and attr.name in ("value_string", "value_strings"):
                yield _node_label(scope, node), 8
            elif node.op_type in ("Cast", "CastLike") and attr.name == "to":
                yield f"{_node_label(scope, node)} target", attr.i

    yield from walk(model.graph, "")
    for function in model.functions:
        for node in function.node:
            yield from node_types(node, f"function {function.name}")


def _subgraphs(attr: onnx.AttributeProto) -> list[onnx.GraphProto]:
    graphs = list(attr.graphs)
    if attr.HasField("g"):
        graphs.append(attr.g)
    return graphs


def _all_nodes(
    graph: onnx.GraphProto, functions: dict[tuple[str, str], onnx.FunctionProto], scope: str = ""
) -> Iterator[tuple[str, onnx.NodeProto]]:
    """Every node with the scope it sits in: the graph, subgraphs of If/Loop/Scan, and the bodies of
    model-local functions the graph calls (each once)."""
    called: set[tuple[str, str]] = set()

    def walk(nodes: Sequence[onnx.NodeProto], where: str) -> Iterator[tuple[str, onnx.NodeProto]]:
        for node in nodes:
            yield where, node
            key = (node.domain, node.op_type)
            if key in functions and key not in called:
                called.add(key)
                yield from walk(functions[key].node, f"function {node.op_type}")
            for attr in node.attribute:
                for sub in _subgraphs(attr):
                    yield from walk(sub.node, _node_label(where, node))

    yield from walk(graph.node, scope)


def _node_label(scope: str, node: onnx.NodeProto) -> str:
    name = node.name or (f"-> {node.output[0]}" if node.output else "(unnamed)")
    label = f"node '{name}' ({node.op_type})"
    return f"{scope} > {label}" if scope else label


def _constant_values(onnx: Any, graph: onnx.GraphProto) -> dict[str, Any]:
    """Top-level initializers and Constant outputs as NumPy arrays (for the restriction checks)."""
    values: dict[str, Any] = {}
    for init in graph.initializer:
        try:
            values[init.name] = onnx.numpy_helper.to_array(init)
        except Exception:  # an exotic type: the type check reports it
            continue
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value" and attr.HasField("t"):
                    try:
                        values[node.output[0]] = onnx.numpy_helper.to_array(attr.t)
                    except Exception:
                        continue
    return values


def _restrictions(onnx: Any, node: onnx.NodeProto, constants: dict[str, Any]) -> Iterator[str]:
    """Documented parser restrictions (operators.md) for the ops a SAM-style student uses."""
    attrs = {attr.name: onnx.helper.get_attribute_value(attr) for attr in node.attribute}
    if node.op_type == "Resize":
        mode = _text(attrs.get("mode", b"nearest"))
        if mode not in _RESIZE_MODES:
            yield f"Resize mode '{mode}' is not supported (TensorRT: {sorted(_RESIZE_MODES)}); export bilinear"
        coord = _text(attrs.get("coordinate_transformation_mode", b"half_pixel"))
        if coord not in _RESIZE_COORDINATE_MODES:
            yield f"Resize coordinate_transformation_mode '{coord}' is not supported by TensorRT"
        if attrs.get("antialias", 0):
            yield "Resize with antialias=1 is not supported by TensorRT"
    elif node.op_type == "TopK" and len(node.input) > 1:
        k = constants.get(node.input[1])
        if k is not None and k.size == 1 and int(k.reshape(-1)[0]) >= _TOPK_MAX_K:
            yield f"TopK K={int(k.reshape(-1)[0])} must be less than {_TOPK_MAX_K} for TensorRT"
    elif node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2 and node.input[2]:
        zero_point = constants.get(node.input[2])
        if zero_point is not None and zero_point.size and bool((zero_point != 0).any()):
            yield "non-zero zero_point: TensorRT supports symmetric quantization only"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
