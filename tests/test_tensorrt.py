"""The TensorRT backend: pre-build ONNX checks, plan cache naming, config, and (on a GPU) real engines."""

from __future__ import annotations

import importlib.util
import json
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
from engines.bundle import DEFAULT_BUNDLE_DIR, MANIFEST_NAME, Bundle, load_bundle, write_bundle
from engines.contract import TensorSpec, segment_input, segment_output
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


def _segment_graph(num_classes: int = 1, channels: int = 3, fixed: tuple[int, int] | None = None) -> Any:
    """The segment contract's I/O (windows B x 3 x H x W -> class_probs B x (C+1) x H x W): a 1x1 conv and softmax."""
    h, w = fixed or ("height", "width")
    weight = np.random.default_rng(0).standard_normal((num_classes + 1, channels, 1, 1)).astype(np.float32)
    return helper.make_graph(
        [
            helper.make_node("Conv", ["windows", "weight"], ["logits"], name="head"),
            helper.make_node("Softmax", ["logits"], ["class_probs"], name="softmax", axis=1),
        ],
        "segment",
        [helper.make_tensor_value_info("windows", F32, ["batch", channels, h, w])],
        [helper.make_tensor_value_info("class_probs", F32, ["batch", num_classes + 1, h, w])],
        initializer=[onnx.numpy_helper.from_array(weight, "weight")],
    )


def _find_graph() -> Any:
    """The find contract's I/O (image 1 x 3 x h x w -> candidates 1 x 1 x h/8 x w/8): pool, grey, sigmoid."""
    return helper.make_graph(
        [
            helper.make_node("AveragePool", ["image"], ["pooled"], name="pool", kernel_shape=[8, 8], strides=[8, 8]),
            helper.make_node("ReduceMean", ["pooled", "axes1"], ["grey"], name="grey", keepdims=1),
            helper.make_node("Sigmoid", ["grey"], ["candidates"], name="sigmoid"),
        ],
        "find",
        [helper.make_tensor_value_info("image", F32, [1, 3, "height", "width"])],
        [helper.make_tensor_value_info("candidates", F32, [1, 1, "cells_y", "cells_x"])],
        initializer=[onnx.numpy_helper.from_array(np.array([1], np.int64), "axes1")],
    )


WINDOW = 64


def _bundle(
    tmp_path: Path,
    *,
    segment: Any = None,
    extra: dict[str, Path] | None = None,
    manifest: dict[str, Any] | None = None,
    with_find: bool = True,
) -> Bundle:
    src = tmp_path / "src"
    src.mkdir(parents=True, exist_ok=True)
    files = {"segment.onnx": _save(src, segment if segment is not None else _segment_graph(), "segment.onnx")}
    if with_find:
        files["find.onnx"] = _save(src, _find_graph(), "find.onnx")
    fields = {
        "schema_version": 3,
        "name": "synthetic",
        "created": "2025-01-01T00:00:00Z",
        "classes": ["scratch"],
        "segment": {"arch": "student_seg", "window": WINDOW, "max_windows": 8, "mean": (0, 0, 0), "std": (1, 1, 1),
                    "parameters": 8},
        "find": {"arch": "finder", "reduction": 4, "mean": (0, 0, 0), "std": (1, 1, 1), "parameters": 0}
        if with_find else None,
        "precision": "fp32",
        "graphs": {"segment": "segment.onnx", "find": "find.onnx" if with_find else None},
        "parameters": 8,
        "provenance": {"weights": "untrained", "notes": "test"},
        **(manifest or {}),
    }
    return write_bundle(tmp_path / "bundle", fields, {**files, **(extra or {})})


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
    bundle = _bundle(tmp_path)
    path = bundle.segment_graph
    report = check_onnx_for_tensorrt(path, [segment_input()], [segment_output(1)])
    assert report.ok, _causes(report)
    assert report.dynamic_axes == {"windows": {0: "batch", 2: "height", 3: "width"}}
    ranges = trt_backend.profile_ranges(bundle, trt_backend.Config(max_batch=6), "segment")
    assert ranges == {"batch": (1, 6, 6), "height": (16, WINDOW, WINDOW), "width": (16, WINDOW, WINDOW)}
    profiles = trt_backend.profile_shapes(report, {"windows": segment_input().shape}, ranges)
    assert profiles == {"windows": ((1, 3, 16, 16), (6, 3, WINDOW, WINDOW), (6, 3, WINDOW, WINDOW))}
    # without the contract, the same axes are problems: only declared names may be dynamic
    bare = check_onnx_for_tensorrt(path)
    assert any("input 'windows'" in line and "'batch'" in line for line in _causes(bare))
    assert check_onnx_for_tensorrt(path, allowed_dynamic={"batch", "height", "width"}).ok


def test_profile_ranges_of_both_graphs(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path)
    larger = trt_backend.profile_ranges(bundle, trt_backend.Config(max_side=256), "segment")
    assert larger["height"] == (16, WINDOW, 256) and larger["batch"] == (1, 24, 24)
    # The find plan is built for the camera's frame: 2688 x 1520 at 1/4 is 672 x 380, padded to 384.
    assert trt_backend.profile_ranges(bundle, trt_backend.Config(), "find") == {
        "height": (16, 384, 384), "width": (16, 672, 672)}
    small = trt_backend.Config(frame_width=1001, frame_height=777)
    assert trt_backend.profile_ranges(bundle, small, "find") == {"height": (16, 208, 208), "width": (16, 256, 256)}
    with pytest.raises(DefectsamError, match=r"backend\.max_side 32 is smaller than the bundle's window 64"):
        trt_backend.profile_ranges(bundle, trt_backend.Config(max_side=32), "segment")
    plain = _bundle(tmp_path / "plain", with_find=False)
    with pytest.raises(DefectsamError, match="bundle has no find graph"):
        trt_backend.profile_ranges(plain, trt_backend.Config(), "find")
    assert trt_backend.source_graph(plain, "fp16", "find") is None


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


def test_synthetic_bundle_checks_against_the_contract(tmp_path: Path) -> None:
    reports = check_bundle_for_tensorrt(_bundle(tmp_path / "good"))
    assert [r.file.name for r in reports] == ["segment.onnx", "find.onnx"]
    assert all(r.ok for r in reports), [_causes(r) for r in reports]
    assert reports[1].dynamic_axes == {"image": {2: "height", 3: "width"}}

    fixed = check_bundle_for_tensorrt(_bundle(tmp_path / "fixed", segment=_segment_graph(fixed=(64, 64))))
    lines = _causes(fixed[0])
    want = "does not match the manifest's [batch, 3, height, width]"
    assert any("input 'windows'" in line and want in line for line in lines)
    other = check_bundle_for_tensorrt(_bundle(tmp_path / "classes", segment=_segment_graph(num_classes=2)))
    assert any("output 'class_probs'" in line for line in _causes(other[0])), _causes(other[0])


def test_default_bundle_passes_the_checks() -> None:
    manifest = DEFAULT_BUNDLE_DIR / MANIFEST_NAME
    if not manifest.is_file():
        pytest.skip(f"the default bundle is not exported yet ({manifest} missing)")
    if json.loads(manifest.read_text()).get("schema_version") != 3:
        pytest.skip("the embedded default bundle is a single-pass bundle (schema < 3), not yet replaced")
    reports = check_bundle_for_tensorrt(load_bundle(DEFAULT_BUNDLE_DIR))
    assert all(r.ok for r in reports), [_causes(r) for r in reports]


def test_exported_student_passes_the_checks(request: pytest.FixtureRequest) -> None:
    pytest.importorskip("torch", reason="exporting a bundle needs the 'train' extra (torch)")
    bundle = load_bundle(request.getfixturevalue("tiny_bundle_master"))
    reports = check_bundle_for_tensorrt(bundle)
    assert [r.file.name for r in reports] == ["segment.onnx", "find.onnx"]
    assert all(r.ok for r in reports), [_causes(r) for r in reports]
    assert reports[0].dynamic_axes == {"windows": {0: "batch", 2: "height", 3: "width"}}
    config = trt_backend.Config(max_batch=4)
    _, profiles = trt_backend.checked_graph(bundle, bundle.segment_graph, "segment", config)
    assert profiles == {"windows": ((1, 3, 16, 16), (4, 3, 64, 64), (4, 3, 64, 64))}
    assert bundle.find_graph is not None
    _, profiles = trt_backend.checked_graph(bundle, bundle.find_graph, "find", config)
    assert profiles == {"image": ((1, 3, 16, 16), (1, 3, 384, 672), (1, 3, 384, 672))}


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
    segment = trt_backend.plan_path(bundle, trt_backend.Config(), *args)
    assert segment == trt_backend.plan_path(bundle, trt_backend.Config(), *args)
    sha = bundle.manifest.files["segment.onnx"][:12]
    assert segment == bundle.path / f"segment.{sha}.fp16.trt10.3.0.30.orin-sm87.max24-64-64.plan"
    find = trt_backend.plan_path(bundle, trt_backend.Config(), *args, graph="find")
    assert find.name == f"find.{bundle.manifest.files['find.onnx'][:12]}.fp16.trt10.3.0.30.orin-sm87.max384-672.plan"
    elsewhere = trt_backend.plan_path(bundle, trt_backend.Config(plan_dir=tmp_path / "plans"), *args)
    assert elsewhere == tmp_path / "plans" / segment.name
    fp32 = trt_backend.plan_path(bundle, trt_backend.Config(precision="fp32"), *args)
    assert fp32 != segment and SAFE_NAME.match(fp32.name)
    # A plan is only good for its profile: another batch, window side or camera gets its own.
    assert trt_backend.plan_path(bundle, trt_backend.Config(max_batch=8), *args) != segment
    assert trt_backend.plan_path(bundle, trt_backend.Config(max_side=128), *args) != segment
    assert trt_backend.plan_path(bundle, trt_backend.Config(frame_width=1920), *args, graph="find") != find
    plain = _bundle(tmp_path / "plain", with_find=False)
    with pytest.raises(DefectsamError, match="bundle has no find graph"):
        trt_backend.plan_path(plain, trt_backend.Config(), *args, graph="find")


def test_int8_needs_a_qdq_graph(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path / "plain")
    with pytest.raises(DefectsamError, match="needs the bundle's INT8 QDQ graphs") as caught:
        trt_backend.plan_path(bundle, trt_backend.Config(precision="int8"), "10.3", "Orin", (8, 7))
    assert "defectsam-train quantize" in str(caught.value) and "--target tensorrt" in str(caught.value)


@pytest.mark.parametrize(("mode", "target"), [("static", "cpu"), ("weight_only", "tensorrt"), ("static", "tensorrt")])
def test_int8_takes_only_a_variant_quantized_for_tensorrt(tmp_path: Path, mode: str, target: str) -> None:
    qdq = _save(tmp_path, _segment_graph(), "segment.q.onnx")
    find = _save(tmp_path, _find_graph(), "find.q.onnx")
    variant = {"segment": "segment.q.onnx", "find": "find.q.onnx", "mode": mode, "target": target, "gate": "passed"}
    bundle = _bundle(
        tmp_path / mode / target,
        extra={"segment.q.onnx": qdq, "find.q.onnx": find},
        manifest={"variants": {"int8": variant}},
    )
    config = trt_backend.Config(precision="int8")
    if (mode, target) == ("static", "tensorrt"):
        assert trt_backend.source_graph(bundle, "int8") == bundle.path / "segment.q.onnx"
        assert trt_backend.source_graph(bundle, "int8", "find") == bundle.path / "find.q.onnx"
        path = trt_backend.plan_path(bundle, config, "10.3", "Orin", (8, 7))
        assert path.name.startswith(f"segment.q.{bundle.manifest.files['segment.q.onnx'][:12]}.int8.trt10.3.")
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
    assert (config.max_batch, config.max_side, config.frame_width, config.frame_height) == (24, None, 2688, 1520)

    adapter: TypeAdapter[Any] = TypeAdapter(BackendConfig)
    assert isinstance(adapter.validate_python({"type": "tensorrt", "precision": "int8"}), trt_backend.Config)
    with pytest.raises(ValidationError) as caught:
        adapter.validate_python({"type": "tensorrt", "precision": "int4"})
    assert caught.value.errors()[0]["loc"][-1] == "precision"
    with pytest.raises(ValidationError) as caught:
        adapter.validate_python({"type": "tensorrt", "workspace_gb": 2})
    assert caught.value.errors()[0]["loc"][-1] == "workspace_gb"
    assert caught.value.errors()[0]["type"] == "extra_forbidden"
    for bad in ({"max_batch": 0}, {"max_side": 100}, {"max_points": 16}):
        with pytest.raises(ValidationError):
            trt_backend.Config(**bad)  # type: ignore[arg-type]


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
def gpu_bundle(request: pytest.FixtureRequest) -> Bundle:
    pytest.importorskip("tensorrt", reason="needs tensorrt and an NVIDIA GPU")
    pytest.importorskip("pycuda.driver", reason="needs tensorrt and an NVIDIA GPU")
    import pycuda.driver as cuda

    try:
        cuda.init()
        if cuda.Device.count() == 0:
            pytest.skip("needs tensorrt and an NVIDIA GPU")
    except cuda.Error:
        pytest.skip("needs tensorrt and an NVIDIA GPU")
    return load_bundle(request.getfixturevalue("tiny_bundle_master"))


@pytest.mark.gpu
@pytest.mark.slow
def test_tensorrt_matches_onnxruntime_and_caches_the_plans(gpu_bundle: Bundle, tmp_path: Path) -> None:
    from engines.backends import onnxruntime as ort_backend

    config = trt_backend.Config(precision="fp32", plan_dir=tmp_path / "plans", max_batch=4, frame_width=512,
                                frame_height=384)
    states: list[str] = []
    engine = trt_backend.open_engine(gpu_bundle, config, on_state=states.append)
    reference = ort_backend.open_engine(gpu_bundle, ort_backend.Config(providers=["cpu"]))
    try:
        assert states[0] == "building" and states[-1] == "ready" and engine.state == "ready"
        assert engine.plan_path().is_file() and engine.plan_path("find").is_file() and engine.has_find
        rng = np.random.default_rng(0)
        for batch, side in ((4, 64), (1, 32)):  # the profile's largest batch, and a smaller window
            windows = rng.standard_normal((batch, 3, side, side)).astype(np.float32)
            got, want = engine.segment(windows), reference.segment(windows)
            assert got.shape == want.shape == (batch, 4, side, side)
            np.testing.assert_allclose(got, want, atol=1e-3)
        image = rng.standard_normal((1, 3, 96, 128)).astype(np.float32)
        np.testing.assert_allclose(engine.find(image), reference.find(image), atol=1e-3)
        with pytest.raises(DefectsamError, match="outside the engine's profile"):
            engine.segment(rng.standard_normal((5, 3, 64, 64)).astype(np.float32))
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
