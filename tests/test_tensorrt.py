"""The TensorRT backend: pre-build ONNX checks, plan cache naming, config, and (on a GPU) real engines."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import TypeAdapter, ValidationError

from engines.backends import BackendConfig
from engines.backends import open_engine as registry_open_engine
from engines.backends import tensorrt as trt_backend
from engines.backends.onnx_checks import (
    OPSET_RANGE,
    TENSORRT_ONNX_OPS,
    OnnxCheckError,
    check_bundle_for_tensorrt,
    check_onnx_for_tensorrt,
)
from engines.bundle import DEFAULT_BUNDLE_DIR, MANIFEST_NAME, Bundle, load_bundle, outputs_for, write_bundle
from engines.contract import GraphShape, TensorSpec
from engines.errors import BackendUnavailableError, DefectsamError

onnx = pytest.importorskip("onnx", reason="the TensorRT pre-build checks need onnx (the tensorrt/dev extra)")
from onnx import TensorProto, helper  # noqa: E402

F32 = TensorProto.FLOAT
OPSET = 18  # ReduceMean takes axes as an input from 18


# --- small graphs ------------------------------------------------------------------------------


def _save(tmp_path: Path, graph: Any, name: str = "model.onnx", opset: int = OPSET, **kwargs: Any) -> Path:
    opsets = [helper.make_opsetid("", opset), *kwargs.pop("extra_opsets", [])]
    model = helper.make_model(graph, opset_imports=opsets, **kwargs)
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def _relu_graph(in_shape: list[Any], elem: int = F32, name: str = "image") -> Any:
    return helper.make_graph(
        [helper.make_node("Relu", [name], ["out"], name="relu")],
        "g",
        [helper.make_tensor_value_info(name, elem, in_shape)],
        [helper.make_tensor_value_info("out", elem, in_shape)],
    )


def _constant(name: str, array: np.ndarray) -> Any:
    return helper.make_node(
        "Constant", [], [name], name=f"const_{name}", value=onnx.numpy_helper.from_array(array, name)
    )


def _fused_graph(shape: GraphShape, input_hw: tuple[int, int] | None = None) -> Any:
    """A graph with the fused contract's I/O: a real heatmap path, constants for the rest."""
    h, w = input_hw or (shape.height, shape.width)
    eh, ew = shape.embed_hw
    mh, mw = shape.mask_hw
    k, c = shape.k, shape.num_classes
    nodes = [
        helper.make_node("ReduceMean", ["image", "axes1"], ["gray"], name="gray", keepdims=1),
        helper.make_node("AveragePool", ["gray"], ["pooled"], name="pool", kernel_shape=[16, 16], strides=[16, 16]),
        helper.make_node("Sigmoid", ["pooled"], ["heatmap"], name="sigmoid"),
        _constant("points", np.zeros((k, 2), np.float32)),
        _constant("point_scores", np.zeros((k,), np.float32)),
        _constant("point_classes", np.zeros((k,), np.int64)),
        _constant("mask_logits", np.zeros((k, mh, mw), np.float32)),
        _constant("iou", np.zeros((k,), np.float32)),
        _constant("image_embedding", np.zeros((1, 256, eh, ew), np.float32)),
    ]
    assert c == 1, "this helper makes a one-class heatmap"
    outputs = [
        helper.make_tensor_value_info(spec.name, F32 if spec.dtype == "float32" else TensorProto.INT64, spec.shape)
        for spec in shape.fused_outputs()
    ]
    return helper.make_graph(
        nodes,
        "fused",
        [helper.make_tensor_value_info("image", F32, [1, 3, h, w])],
        outputs,
        initializer=[onnx.numpy_helper.from_array(np.array([1], np.int64), "axes1")],
    )


def _decoder_graph(shape: GraphShape) -> Any:
    eh, ew = shape.embed_hw
    mh, mw = shape.mask_hw
    nodes = [
        helper.make_node("ReduceMean", ["image_embedding", "axes1"], ["mean"], name="embed_mean", keepdims=0),
        helper.make_node(
            "Resize", ["mean", "", "scales"], ["mask_logits"], name="upscale", mode="linear",
            coordinate_transformation_mode="half_pixel",
        ),
        helper.make_node("ReduceMean", ["point_labels", "axes1"], ["iou"], name="iou_head", keepdims=0),
    ]
    return helper.make_graph(
        nodes,
        "decoder",
        [
            helper.make_tensor_value_info("image_embedding", F32, [1, 256, eh, ew]),
            helper.make_tensor_value_info("point_coords", F32, [1, "num_points", 2]),
            helper.make_tensor_value_info("point_labels", F32, [1, "num_points"]),
        ],
        [
            helper.make_tensor_value_info("mask_logits", F32, [1, mh, mw]),
            helper.make_tensor_value_info("iou", F32, [1]),
        ],
        initializer=[
            onnx.numpy_helper.from_array(np.array([1], np.int64), "axes1"),
            onnx.numpy_helper.from_array(np.array([1.0, mh / eh, mw / ew], np.float32), "scales"),
        ],
    )


SHAPE = GraphShape(height=32, width=64, k=2, num_classes=1, mask_stride=8)


def _bundle(
    tmp_path: Path,
    *,
    input_hw: tuple[int, int] | None = None,
    extra: dict[str, Path] | None = None,
    manifest: dict[str, Any] | None = None,
) -> Bundle:
    src = tmp_path / "src"
    src.mkdir(parents=True, exist_ok=True)
    fused = _save(src, _fused_graph(SHAPE, input_hw), "model.onnx")
    decoder = _save(src, _decoder_graph(SHAPE), "decoder.onnx")
    fields = {
        "schema_version": 1,
        "name": "synthetic",
        "created": "2025-01-01T00:00:00Z",
        "arch": "student_cnn",
        "input": {"height": SHAPE.height, "width": SHAPE.width, "mean": (0, 0, 0), "std": (1, 1, 1)},
        "outputs": {k: v.model_dump() for k, v in outputs_for(SHAPE).items()},
        "K": SHAPE.k,
        "mask_stride": SHAPE.mask_stride,
        "classes": ("scratch",),
        "precision": "fp32",
        "graphs": {"fused": "model.onnx", "decoder": "decoder.onnx"},
        "parameters": 0,
        "provenance": {"weights": "untrained", "notes": "test"},
        **(manifest or {}),
    }
    return write_bundle(tmp_path / "bundle", fields, {"model.onnx": fused, "decoder.onnx": decoder, **(extra or {})})


def _causes(report: Any) -> list[str]:
    return [str(p) for p in report.problems]


# --- the checks --------------------------------------------------------------------------------


def test_clean_static_graph_passes(tmp_path: Path) -> None:
    path = _save(tmp_path, _relu_graph([1, 3, 32, 64]))
    report = check_onnx_for_tensorrt(path, [TensorSpec("image", (1, 3, 32, 64), "float32")])
    assert report.ok, _causes(report)
    assert report.opset == OPSET
    assert report.dynamic_axes == {}
    assert report.op_types == {"Relu"}
    assert not report.quantized
    report.raise_if_problems()  # no-op


def test_dynamic_and_unknown_dims_fail_naming_the_tensor(tmp_path: Path) -> None:
    path = _save(tmp_path, _relu_graph(["batch", 3, None, 64]))
    report = check_onnx_for_tensorrt(path)
    lines = _causes(report)
    assert any("input 'image'" in line and "axis 0 is dynamic ('batch')" in line for line in lines), lines
    assert any("input 'image'" in line and "axis 2 is unknown" in line for line in lines), lines
    assert any("output 'out'" in line for line in lines), lines
    assert all(line.startswith(str(path)) for line in lines)


def test_custom_domain_op_fails_naming_node_and_op(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("FancyPool", ["x"], ["y"], name="fancy_1", domain="com.acme")],
        "g",
        [helper.make_tensor_value_info("x", F32, [1, 4])],
        [helper.make_tensor_value_info("y", F32, [1, 4])],
    )
    path = _save(tmp_path, graph, extra_opsets=[helper.make_opsetid("com.acme", 1)])
    report = check_onnx_for_tensorrt(path)
    assert any(
        "node 'fancy_1' (FancyPool)" in line and "com.acme::FancyPool" in line and "plugin" in line
        for line in _causes(report)
    ), _causes(report)


def test_standard_op_tensorrt_lacks_fails_also_inside_subgraphs(tmp_path: Path) -> None:
    assert "Det" not in TENSORRT_ONNX_OPS and "Unique" not in TENSORRT_ONNX_OPS
    branch = helper.make_graph(
        [helper.make_node("Det", ["x"], ["d"], name="det_inner")],
        "then",
        [],
        [helper.make_tensor_value_info("d", F32, [2])],
    )
    other = helper.make_graph(
        [helper.make_node("ReduceSum", ["x", "axes12"], ["d2"], name="sum_inner", keepdims=0)],
        "else",
        [],
        [helper.make_tensor_value_info("d2", F32, [2])],
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=branch, else_branch=other)],
        "g",
        [
            helper.make_tensor_value_info("x", F32, [2, 3, 3]),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", F32, [2])],
        initializer=[onnx.numpy_helper.from_array(np.array([1, 2], np.int64), "axes12")],
    )
    report = check_onnx_for_tensorrt(_save(tmp_path, graph))
    lines = _causes(report)
    assert any(
        "node 'branch' (If) > node 'det_inner' (Det)" in line and "op 'Det' is not supported" in line for line in lines
    ), lines
    assert not any("sum_inner" in line for line in lines)


def test_ops_inside_local_functions_are_checked(tmp_path: Path) -> None:
    function = helper.make_function(
        "local.fn", "Block", ["a"], ["b"], [helper.make_node("Det", ["a"], ["b"], name="det_in_fn")],
        opset_imports=[helper.make_opsetid("", OPSET)],
    )
    graph = helper.make_graph(
        [helper.make_node("Block", ["x"], ["y"], name="call_block", domain="local.fn")],
        "g",
        [helper.make_tensor_value_info("x", F32, [2, 3, 3])],
        [helper.make_tensor_value_info("y", F32, [2])],
    )
    path = _save(tmp_path, graph, functions=[function], extra_opsets=[helper.make_opsetid("local.fn", 1)])
    lines = _causes(check_onnx_for_tensorrt(path))
    assert any("function Block > node 'det_in_fn' (Det)" in line for line in lines), lines
    assert not any("call_block" in line for line in lines), lines  # a local function is not a custom op


def test_float64_tensors_fail(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["x"], ["x64"], name="to_double", to=TensorProto.DOUBLE),
            helper.make_node("Cast", ["x64"], ["y"], name="to_float", to=F32),
        ],
        "g",
        [helper.make_tensor_value_info("x", F32, [1, 4])],
        [helper.make_tensor_value_info("y", F32, [1, 4])],
    )
    lines = _causes(check_onnx_for_tensorrt(_save(tmp_path, graph)))
    assert any("node 'to_double' (Cast) target" in line and "float64" in line for line in lines), lines
    assert any("tensor 'x64'" in line and "float64" in line for line in lines), lines

    lines = _causes(check_onnx_for_tensorrt(_save(tmp_path, _relu_graph([1, 4], TensorProto.DOUBLE), "d.onnx")))
    assert any("input 'image'" in line and "float64" in line for line in lines), lines


@pytest.mark.parametrize("opset", [OPSET_RANGE[0] - 1, OPSET_RANGE[1] + 1])
def test_opset_outside_tensorrt_range_fails(tmp_path: Path, opset: int) -> None:
    path = _save(tmp_path, _relu_graph([1, 4]), opset=opset)
    report = check_onnx_for_tensorrt(path)
    assert report.opset == opset
    assert any(f"opset {opset} is outside" in line for line in _causes(report)), _causes(report)


@pytest.mark.parametrize("opset", OPSET_RANGE)
def test_opset_at_the_range_ends_passes(tmp_path: Path, opset: int) -> None:
    report = check_onnx_for_tensorrt(_save(tmp_path, _relu_graph([1, 4]), opset=opset))
    assert report.ok, _causes(report)


def test_manifest_input_mismatch_fails(tmp_path: Path) -> None:
    path = _save(tmp_path, _relu_graph([1, 3, 32, 32]))
    report = check_onnx_for_tensorrt(path, [TensorSpec("image", (1, 3, 64, 64), "float32")])
    assert any(
        "input 'image'" in line and "[1, 3, 32, 32] does not match the manifest's [1, 3, 64, 64]" in line
        for line in _causes(report)
    ), _causes(report)
    report = check_onnx_for_tensorrt(path, [TensorSpec("pixels", (1, 3, 32, 32), "float32")])
    assert any("input 'pixels'" in line and "missing" in line for line in _causes(report)), _causes(report)
    report = check_onnx_for_tensorrt(path, [TensorSpec("image", (1, 3, 32, 32), "int64")])
    assert any("dtype float32 does not match the manifest's int64" in line for line in _causes(report))


def test_allowed_dynamic_axis_passes_and_is_reported(tmp_path: Path) -> None:
    path = _save(tmp_path, _decoder_graph(SHAPE), "decoder.onnx")
    report = check_onnx_for_tensorrt(path, SHAPE.decoder_inputs(), SHAPE.decoder_outputs())
    assert report.ok, _causes(report)
    assert report.dynamic_axes == {"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}}
    profiles = trt_backend.profile_shapes(report, {s.name: s.shape for s in SHAPE.decoder_inputs()}, 16)
    assert profiles == {
        "point_coords": ((1, 1, 2), (1, 2, 2), (1, 16, 2)),
        "point_labels": ((1, 1), (1, 2), (1, 16)),
    }
    # without the contract, the same axis is a problem: only declared names may be dynamic
    bare = check_onnx_for_tensorrt(path)
    assert any("input 'point_coords'" in line and "'num_points'" in line for line in _causes(bare))
    assert check_onnx_for_tensorrt(path, allowed_dynamic={"num_points"}).ok


def test_parser_restrictions_resize_and_qdq(tmp_path: Path) -> None:
    scales = onnx.numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    scale = onnx.numpy_helper.from_array(np.array(0.1, np.float32), "s")
    zero = onnx.numpy_helper.from_array(np.array(3, np.int8), "zp")
    graph = helper.make_graph(
        [
            helper.make_node("Resize", ["x", "", "scales"], ["r"], name="up_cubic", mode="cubic"),
            helper.make_node("QuantizeLinear", ["r", "s", "zp"], ["q"], name="quant"),
            helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], name="dequant"),
        ],
        "g",
        [helper.make_tensor_value_info("x", F32, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("y", F32, [1, 1, 8, 8])],
        initializer=[scales, scale, zero],
    )
    report = check_onnx_for_tensorrt(_save(tmp_path, graph))
    lines = _causes(report)
    assert report.quantized
    assert any("node 'up_cubic' (Resize)" in line and "mode 'cubic'" in line for line in lines), lines
    assert any("node 'quant' (QuantizeLinear)" in line and "zero_point" in line for line in lines), lines


def test_unreadable_files_are_reported_not_raised(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\xffnot a protobuf" * 10)
    for path in (garbage, tmp_path / "missing.onnx"):
        report = check_onnx_for_tensorrt(path)
        assert not report.ok and report.problems[0].where == "model"


def test_check_error_lists_every_problem_one_per_line(tmp_path: Path) -> None:
    path = _save(tmp_path, _relu_graph(["batch", 3, 8, 8], TensorProto.DOUBLE), opset=OPSET_RANGE[1] + 1)
    report = check_onnx_for_tensorrt(path)
    with pytest.raises(OnnxCheckError) as caught:
        report.raise_if_problems()
    message = str(caught.value)
    assert isinstance(caught.value, DefectsamError)
    assert f"{len(report.problems)} problems" in message.splitlines()[0]
    assert message.splitlines()[1:] == [f"  {p}" for p in report.problems]


def test_synthetic_bundle_checks_against_its_manifest(tmp_path: Path) -> None:
    reports = check_bundle_for_tensorrt(_bundle(tmp_path / "good"))
    assert [r.file.name for r in reports] == ["model.onnx", "decoder.onnx"]
    assert all(r.ok for r in reports), [_causes(r) for r in reports]

    wrong = check_bundle_for_tensorrt(_bundle(tmp_path / "bad", input_hw=(64, 64)))
    assert any("input 'image'" in line and "manifest" in line for line in _causes(wrong[0])), _causes(wrong[0])


def test_default_bundle_passes_the_checks() -> None:
    if not (DEFAULT_BUNDLE_DIR / MANIFEST_NAME).is_file():
        pytest.skip(f"the default bundle is not exported yet ({DEFAULT_BUNDLE_DIR / MANIFEST_NAME} missing)")
    bundle = load_bundle(DEFAULT_BUNDLE_DIR)
    reports = check_bundle_for_tensorrt(bundle)
    assert all(r.ok for r in reports), [_causes(r) for r in reports]
    if bundle.decoder_graph is not None:
        assert reports[1].dynamic_axes, "the decoder's num_points axis should be reported for a profile"


def test_exported_student_passes_the_checks(request: pytest.FixtureRequest) -> None:
    pytest.importorskip("torch", reason="exporting a bundle needs the 'train' extra (torch)")
    if importlib.util.find_spec("training.export.onnx") is None:
        pytest.skip("training.export.onnx is not written yet")
    bundle = load_bundle(request.getfixturevalue("tiny_bundle_master"))
    reports = check_bundle_for_tensorrt(bundle)
    assert all(r.ok for r in reports), [_causes(r) for r in reports]


# --- plan cache naming -------------------------------------------------------------------------

SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def test_plan_cache_key_is_deterministic_distinct_and_filename_safe() -> None:
    base = ("10.3.0.30", "NVIDIA Jetson Orin Nano (8GB)", (8, 7), "fp16")
    key = trt_backend.plan_cache_key(*base)
    assert key == trt_backend.plan_cache_key(*base)
    assert key == "fp16.trt10.3.0.30.nvidia-jetson-orin-nano-8gb-sm87"
    variants = [
        ("10.7.0", *base[1:]),
        (base[0], "NVIDIA GeForce RTX 4090", (8, 9), "fp16"),
        (base[0], base[1], (8, 6), "fp16"),
        (*base[:3], "int8"),
        (*base[:3], "fp32"),
    ]
    keys = {trt_backend.plan_cache_key(*v) for v in variants} | {key}
    assert len(keys) == len(variants) + 1
    weird = trt_backend.plan_cache_key("10.3.0+cuda12/x", "Tesla T4 / \\ ..", (7, 5), "fp32")
    assert all(SAFE_NAME.match(k) for k in (*keys, weird)), keys
    with pytest.raises(ValueError, match="precision"):
        trt_backend.plan_cache_key(base[0], base[1], base[2], "int4")


def test_plan_path_beside_bundle_or_in_plan_dir(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path)
    args = ("10.3.0.30", "Orin", (8, 7))
    fused = trt_backend.plan_path(bundle, trt_backend.Config(), *args)
    assert fused == trt_backend.plan_path(bundle, trt_backend.Config(), *args)
    sha = bundle.manifest.files["model.onnx"][:12]
    assert fused == bundle.path / f"model.{sha}.fp16.trt10.3.0.30.orin-sm87.plan"
    decoder = trt_backend.plan_path(bundle, trt_backend.Config(), *args, graph="decoder")
    assert decoder.parent == bundle.path and decoder.name.startswith("decoder.") and decoder != fused
    elsewhere = trt_backend.plan_path(bundle, trt_backend.Config(plan_dir=tmp_path / "plans"), *args)
    assert elsewhere == tmp_path / "plans" / fused.name
    fp32 = trt_backend.plan_path(bundle, trt_backend.Config(precision="fp32"), *args)
    assert fp32 != fused and SAFE_NAME.match(fp32.name)


def test_int8_needs_a_qdq_graph(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path / "plain")
    with pytest.raises(DefectsamError, match=r"model\.int8\.onnx"):
        trt_backend.plan_path(bundle, trt_backend.Config(precision="int8"), "10.3", "Orin", (8, 7))

    qdq = _save(tmp_path, _relu_graph([1, 4]), "model.int8.onnx")
    quantized = _bundle(tmp_path / "quantized", extra={"model.int8.onnx": qdq})
    path = trt_backend.plan_path(quantized, trt_backend.Config(precision="int8"), "10.3", "Orin", (8, 7))
    assert path.name.startswith(f"model.int8.{quantized.manifest.files['model.int8.onnx'][:12]}.int8.trt10.3.")


@pytest.mark.parametrize(("mode", "target"), [("static", "cpu"), ("weight_only", "tensorrt"), ("static", "tensorrt")])
def test_int8_takes_only_a_variant_quantized_for_tensorrt(tmp_path: Path, mode: str, target: str) -> None:
    qdq = _save(tmp_path, _relu_graph([1, 4]), "model.q.onnx")
    decoder = _save(tmp_path, _decoder_graph(SHAPE), "decoder.q.onnx")
    variant = {"fused": "model.q.onnx", "decoder": "decoder.q.onnx", "mode": mode, "target": target, "gate": "passed"}
    bundle = _bundle(
        tmp_path / mode / target,
        extra={"model.q.onnx": qdq, "decoder.q.onnx": decoder},
        manifest={"schema_version": 2, "variants": {"int8": variant}},
    )
    config = trt_backend.Config(precision="int8")
    if (mode, target) == ("static", "tensorrt"):
        assert trt_backend.source_graph(bundle, "int8") == bundle.path / "model.q.onnx"
        return
    with pytest.raises(DefectsamError, match=rf"mode '{mode}', target '{target}'.*--target tensorrt"):
        trt_backend.plan_path(bundle, config, "10.3", "Orin", (8, 7))


def test_write_atomic_replaces_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "plans" / "model.plan"
    trt_backend.write_atomic(target, b"first")
    trt_backend.write_atomic(target, b"second")
    assert target.read_bytes() == b"second"
    assert [p.name for p in target.parent.iterdir()] == ["model.plan"]


# --- config --------------------------------------------------------------------------------------


def test_config_defaults_and_validation() -> None:
    config = trt_backend.Config()
    assert (config.type, config.precision, config.build_on_open, config.plan_dir) == ("tensorrt", "fp16", True, None)

    adapter: TypeAdapter[Any] = TypeAdapter(BackendConfig)
    assert isinstance(adapter.validate_python({"type": "tensorrt", "precision": "int8"}), trt_backend.Config)
    with pytest.raises(ValidationError) as caught:
        adapter.validate_python({"type": "tensorrt", "precision": "int4"})
    assert caught.value.errors()[0]["loc"][-1] == "precision"
    with pytest.raises(ValidationError) as caught:
        adapter.validate_python({"type": "tensorrt", "workspace_gb": 2})
    assert caught.value.errors()[0]["loc"][-1] == "workspace_gb"
    assert caught.value.errors()[0]["type"] == "extra_forbidden"
    with pytest.raises(ValidationError):
        trt_backend.Config(max_points=0)


# --- opening without TensorRT ----------------------------------------------------------------------

_HAVE_TRT = importlib.util.find_spec("tensorrt") is not None and importlib.util.find_spec("pycuda") is not None


@pytest.mark.skipif(_HAVE_TRT, reason="tensorrt and pycuda are installed here")
def test_open_engine_without_tensorrt_names_the_extra(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path)
    states: list[str] = []
    with pytest.raises(BackendUnavailableError, match=re.escape("pip install 'defectsam[tensorrt]'")):
        trt_backend.open_engine(bundle, trt_backend.Config(), on_state=states.append)
    with pytest.raises(BackendUnavailableError, match="backend 'tensorrt'"):
        registry_open_engine(bundle.path, trt_backend.Config())
    assert states == []  # nothing started, so nothing to report
    assert not list(bundle.path.glob("*.plan"))


# --- on a GPU ------------------------------------------------------------------------------------


@pytest.fixture()
def gpu_bundle(tmp_path: Path) -> Bundle:
    pytest.importorskip("tensorrt", reason="needs tensorrt and an NVIDIA GPU")
    pytest.importorskip("pycuda.driver", reason="needs tensorrt and an NVIDIA GPU")
    import pycuda.driver as cuda

    try:
        cuda.init()
        if cuda.Device.count() == 0:
            pytest.skip("needs tensorrt and an NVIDIA GPU")
    except cuda.Error:
        pytest.skip("needs tensorrt and an NVIDIA GPU")
    if not (DEFAULT_BUNDLE_DIR / MANIFEST_NAME).is_file():
        pytest.skip("needs the default bundle")
    return load_bundle(DEFAULT_BUNDLE_DIR)


@pytest.mark.gpu
@pytest.mark.slow
def test_tensorrt_matches_onnxruntime_and_caches_the_plan(gpu_bundle: Bundle, tmp_path: Path) -> None:
    from engines.backends import onnxruntime as ort_backend

    config = trt_backend.Config(precision="fp32", plan_dir=tmp_path / "plans")
    states: list[str] = []
    engine = trt_backend.open_engine(gpu_bundle, config, on_state=states.append)
    reference = ort_backend.open_engine(gpu_bundle, ort_backend.Config(providers=["cpu"]))
    try:
        assert states == ["building", "ready"] and engine.state == "ready"
        assert engine.plan_path().is_file()
        rng = np.random.default_rng(0)
        shape = gpu_bundle.manifest.graph_shape
        image = rng.standard_normal((1, 3, shape.height, shape.width)).astype(np.float32)
        got, want = engine.infer(image, with_embedding=True), reference.infer(image, with_embedding=True)
        assert got.heatmap.shape == want.heatmap.shape and got.heatmap.ndim == 3
        np.testing.assert_allclose(got.heatmap, want.heatmap, atol=1e-3)
        np.testing.assert_allclose(got.mask_logits, want.mask_logits, atol=1e-2, rtol=1e-2)
        assert got.point_classes.dtype == np.int64
        assert got.image_embedding is not None and want.image_embedding is not None
        assert got.image_embedding.shape == want.image_embedding.shape
        embedding = want.image_embedding
        assert engine.infer(image).image_embedding is None
        if gpu_bundle.decoder_graph is not None:
            coords = np.array([[[10.0, 12.0], [40.0, 30.0], [0.0, 0.0]]], np.float32)
            labels = np.array([[1.0, 0.0, -1.0]], np.float32)
            got_mask, got_iou = engine.prompt(embedding, coords, labels)
            want_mask, want_iou = reference.prompt(embedding, coords, labels)
            np.testing.assert_allclose(got_mask, want_mask, atol=1e-2, rtol=1e-2)
            np.testing.assert_allclose(got_iou, want_iou, atol=1e-3)
            with pytest.raises(DefectsamError, match="max_points"):
                engine.prompt(embedding, np.zeros((1, 17, 2), np.float32), np.ones((1, 17), np.float32))
    finally:
        engine.close()
        reference.close()

    states.clear()
    cached = trt_backend.open_engine(gpu_bundle, config, on_state=states.append)
    cached.close()
    assert states == ["ready", "closed"]  # loaded from the cache: no build

    engine.plan_path().write_bytes(b"not a plan")
    states.clear()
    rebuilt = trt_backend.open_engine(gpu_bundle, config, on_state=states.append)
    rebuilt.close()
    assert states[0] == "building"
