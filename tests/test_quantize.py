"""INT8 quantization: the variant in the bundle, the runtime choosing it, the precision gate, the CLI's errors.

Quantization here is real ONNX Runtime quantization of real bundles: the tiny exported student
(random weights, 128x256) for the machinery, and a copy of the embedded default bundle for the
gate refusing a harmful calibration (a trained model, so that harm shows in its figures).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engines.bundle import DEFAULT_BUNDLE_DIR, MANIFEST_NAME, load_bundle, sha256_file, write_bundle
from engines.errors import BundleError

from .conftest import TINY_HW

pytest.importorskip("onnx", reason="quantization needs the onnx package (train/dev extras)")

H, W = TINY_HW
HELD_OUT = f"synthetic,n=3,seed=2000000,width={W},height={H}"


def _main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from training.cli import main

    try:
        code = main(argv)
    except SystemExit as exc:  # argparse errors
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def _ops(path: Path) -> list[str]:
    import onnx

    return [node.op_type for node in onnx.load(str(path)).graph.node]


@pytest.fixture(scope="module")
def quantized_master(tiny_bundle_master: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny bundle with a static INT8 variant (synthetic calibration), made once; copy before changing."""
    from training.quantize import QuantizeOptions, quantize_bundle

    out = tmp_path_factory.mktemp("quantized") / "tiny"
    shutil.copytree(tiny_bundle_master, out)
    # Random weights score near zero on any ground truth: the bound is wide, the machinery is the point.
    quantize_bundle(out, QuantizeOptions(calib="synthetic", n=4, held_out=HELD_OUT, max_drop=100.0,
                                         command="test"), log=lambda _: None)
    return out


@pytest.fixture()
def quantized(quantized_master: Path, tmp_path: Path) -> Path:
    target = tmp_path / "quantized"
    shutil.copytree(quantized_master, target)
    return target


@pytest.mark.slow
def test_static_quantization_adds_a_gated_int8_variant(tiny_bundle: Path, capsys) -> None:
    before = _digests(tiny_bundle)
    code, out, err = _main(["quantize", str(tiny_bundle), "--calib", "synthetic", "--n", "4",
                            "--held-out", HELD_OUT, "--max-drop", "100"], capsys)
    assert code == 0, err
    assert "model.int8.onnx" in out and "drop" in out

    bundle = load_bundle(tiny_bundle)  # every checksum verified, the INT8 graphs among them
    m = bundle.manifest
    assert m.schema_version == 2 and m.precision == "fp32"
    variant = m.variants["int8"]
    assert (variant.fused, variant.decoder, variant.mode, variant.target, variant.gate) == (
        "model.int8.onnx", "decoder.int8.onnx", "static", "cpu", "passed")
    assert set(m.files) == {"model.onnx", "decoder.onnx", "model.int8.onnx", "decoder.int8.onnx"}
    for name, digest in m.files.items():
        assert sha256_file(tiny_bundle / name) == digest
    after = _digests(tiny_bundle)
    assert after["model.onnx"] == before["model.onnx"] and after["decoder.onnx"] == before["decoder.onnx"]
    assert bundle.size_bytes("model.int8.onnx") < 0.5 * bundle.size_bytes("model.onnx")

    q = m.metrics["quantization"]
    assert q["mode"] == "static" and q["passed"] is True and q["bound_points"] == 100.0
    assert q["gate_metric"] == "prompted_miou"
    assert math.isclose(q["drop_points"], (q["fp32"]["prompted_miou"] - q["int8"]["prompted_miou"]) * 100, abs_tol=1e-3)
    for side in ("fp32", "int8"):
        assert {"prompted_miou", "precision", "recall", "f1"} <= set(q[side])
    assert q["calibration"]["source"].startswith("synthetic(n=4,seed=3000000")  # disjoint from the held-out seeds
    assert "seed=2000000" in q["held_out"]["dataset"]
    assert {"LayerNormalization", "Softmax"} <= set(q["kept_fp32"]["op_types"])
    assert q["kept_fp32"]["nodes"]["model.int8.onnx"]  # the positional-encoding path and attention MatMuls
    assert {"prompted_miou_vs_fp32", "precision_vs_fp32", "recall_vs_fp32"} <= set(q["agreement_with_fp32"])
    assert set(q["sizes_bytes"]) == set(m.files)

    import onnx

    graph = onnx.load(str(tiny_bundle / "model.int8.onnx")).graph
    ops = [n.op_type for n in graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    quantized_inputs = {t for n in graph.node if n.op_type == "QuantizeLinear" for t in n.input[:1]}
    for node in graph.node:  # LayerNorm and Softmax compute in FP32: their outputs are not quantized...
        if node.op_type in ("LayerNormalization", "Softmax"):
            assert node.input[0] not in quantized_inputs
            if node.op_type == "Softmax":  # ...and attention weights reach the MatMul in FP32
                assert node.output[0] not in quantized_inputs


@pytest.mark.slow
def test_weight_only_quantization_keeps_fp32_compute(tiny_bundle: Path, capsys) -> None:
    code, _, err = _main(["quantize", str(tiny_bundle), "--mode", "weight-only", "--held-out", HELD_OUT,
                          "--max-drop", "100"], capsys)
    assert code == 0, err
    m = load_bundle(tiny_bundle).manifest
    assert m.variants["int8"].mode == "weight_only"
    assert m.metrics["quantization"]["calibration"] is None
    ops = _ops(tiny_bundle / "model.int8.onnx")
    assert "QuantizeLinear" not in ops and ops.count("DequantizeLinear") >= ops.count("Conv")
    # Weights stored as INT8: the file shrinks by about 4x, the graph is otherwise the FP32 one.
    assert (tiny_bundle / "model.int8.onnx").stat().st_size < 0.4 * (tiny_bundle / "model.onnx").stat().st_size
    q = m.metrics["quantization"]
    assert q["drop_points"] < 5.0 and q["agreement_with_fp32"]["prompted_miou_vs_fp32"] > 0.5

    from engines.backends import open_engine
    from engines.backends.onnxruntime import Config

    # The runtime folds the weights' DequantizeLinear into FP32 initializers at load: FP32 outputs, FP32 speed.
    image = np.random.default_rng(1).standard_normal((1, 3, H, W)).astype(np.float32)
    heatmaps = []
    for precision in ("fp32", "int8"):
        engine = open_engine(tiny_bundle, Config(providers=["cpu"], precision=precision))  # type: ignore[arg-type]
        heatmaps.append(engine.infer(image).heatmap)
        engine.close()
    assert np.abs(heatmaps[0] - heatmaps[1]).max() < 0.05


@pytest.mark.slow
def test_the_engine_runs_the_int8_graphs_with_the_contract_shapes(quantized: Path) -> None:
    from engines.backends import open_engine
    from engines.backends.onnxruntime import Config
    from engines.engine import running_precision

    bundle = load_bundle(quantized)
    shape = bundle.manifest.graph_shape
    image = np.random.default_rng(0).standard_normal((1, 3, H, W)).astype(np.float32)
    engine = open_engine(bundle, Config(providers=["cpu"], precision="int8"))
    try:
        assert engine.precision == "int8" and engine.graph_path.name == "model.int8.onnx"  # type: ignore[attr-defined]
        assert running_precision(engine) == "int8"
        out = engine.infer(image, with_embedding=True)
        want = {spec.name: spec for spec in shape.fused_outputs()}
        assert out.heatmap.shape == want["heatmap"].shape[1:]
        assert out.points.shape == want["points"].shape and out.mask_logits.shape == want["mask_logits"].shape
        assert out.point_classes.dtype == np.int64 and out.iou.shape == want["iou"].shape
        assert out.image_embedding is not None and out.image_embedding.shape == want["image_embedding"].shape
        labels = np.ones((1, 1), np.float32)
        masks, iou = engine.prompt(out.image_embedding, out.points[:1].reshape(1, 1, 2), labels)
        assert masks.shape == (1, *shape.mask_hw) and iou.shape == (1,)
    finally:
        engine.close()
    # auto: the gated INT8 variant, quantized for the CPU, on the CPU; fp32 when asked for.
    for requested, expected in (("auto", "int8"), ("fp32", "fp32")):
        engine = open_engine(bundle, Config(providers=["cpu"], precision=requested))  # type: ignore[arg-type]
        assert running_precision(engine) == expected
        engine.close()


def test_auto_takes_fp32_unless_the_variant_passed_the_gate_and_suits_the_provider(quantized: Path) -> None:
    from engines.backends.onnxruntime import choose_precision

    bundle = load_bundle(quantized)
    assert choose_precision(bundle, "auto", "CPUExecutionProvider") == "int8"
    assert choose_precision(bundle, "auto", "CUDAExecutionProvider") == "fp32"
    raw = json.loads((quantized / MANIFEST_NAME).read_text())
    raw["variants"]["int8"]["gate"] = "pending"
    (quantized / MANIFEST_NAME).write_text(json.dumps(raw))
    assert choose_precision(load_bundle(quantized), "auto", "CPUExecutionProvider") == "fp32"


def test_int8_asked_of_a_bundle_without_it_is_one_line(tiny_bundle: Path) -> None:
    from engines.backends import open_engine
    from engines.backends.onnxruntime import Config

    with pytest.raises(BundleError) as caught:
        open_engine(tiny_bundle, Config(providers=["cpu"], precision="int8"))
    assert "no int8 graphs" in str(caught.value) and "\n" not in str(caught.value)


def test_the_loader_verifies_the_int8_graph(quantized: Path) -> None:
    with (quantized / "model.int8.onnx").open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(BundleError, match=r"model\.int8\.onnx: checksum mismatch"):
        load_bundle(quantized)


def test_variants_need_schema_version_2_and_fp32_bundles_stay_version_1(quantized: Path, tiny_bundle: Path) -> None:
    raw = json.loads((quantized / MANIFEST_NAME).read_text())
    raw["schema_version"] = 1
    (quantized / MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="'variants' needs schema_version 2"):
        load_bundle(quantized)
    plain = json.loads((tiny_bundle / MANIFEST_NAME).read_text())
    assert plain["schema_version"] == 1 and "variants" not in plain  # readable by runtimes before variants
    assert "variants" not in load_bundle(tiny_bundle).manifest.to_json()


def test_bench_times_fp32_and_int8_of_one_bundle_in_one_run(quantized: Path) -> None:
    from engines.backends.onnxruntime import Config
    from engines.benchmark import bench_bundles, precision_ratios

    bundle = load_bundle(quantized)
    configs = [Config(providers=["cpu"], precision=p) for p in ("fp32", "int8")]  # type: ignore[arg-type]
    results = bench_bundles([bundle, bundle], configs=configs, warmup=0, iterations=2, rounds=1)
    assert [r.precision for r in results] == ["fp32", "int8"]
    assert results[1].graph_bytes == bundle.size_bytes("model.int8.onnx")
    (line,) = precision_ratios(results)
    assert "int8 / fp32" in line


def test_bench_engine_command_prints_both_precisions(quantized: Path, capsys) -> None:
    from service.cli import main as service_main

    assert service_main(["bench", "engine", "--bundle", str(quantized), "--iterations", "2", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "| fp32 |" in out and "| int8 |" in out and "int8 / fp32 =" in out


@pytest.mark.slow
def test_eval_runs_the_precision_asked_for(quantized: Path, capsys) -> None:
    code, out, err = _main(["eval", "--bundle", str(quantized), "--precision", "int8", "--data", HELD_OUT], capsys)
    assert code == 0, err
    assert "(int8)" in out.splitlines()[0]


def test_ranking_puts_groups_with_clipping_ranges_first(tiny_bundle_master: Path, tmp_path: Path) -> None:
    """Ranges fitted to all-white frames clip real frames: the first convolution, reading the image, ranks worst."""
    from training.quantize import graph as qgraph
    from training.quantize.calibration import CalibrationSet, fused_feeds, load_calibration
    from training.quantize.gate import group_scores_from_tensors, merge_scores, tensor_sqnr

    bundle = load_bundle(tiny_bundle_master)
    pre = tmp_path / "pre.onnx"
    qgraph.preprocess(bundle.fused_graph, pre)
    groups = qgraph.node_groups(bundle.fused_graph, pre)
    assert any(g.startswith("model.encoder.blocks.") for g in groups.values())  # scopes survive pre-processing
    probe = fused_feeds(load_calibration(bundle, "synthetic", 2, seed=2_000_000))
    from engines.preprocess import Preprocessor

    white_frame = Preprocessor(bundle.manifest.input)(np.full((H, W, 3), 255, np.uint8))[0]
    white = CalibrationSet([white_frame, white_frame], "white")
    worst = {}
    for name, calibration in (("white", white), ("synthetic", load_calibration(bundle, "synthetic", 4))):
        cache = tmp_path / f"{name}.json"
        qgraph.quantize_static(pre, tmp_path / f"{name}.onnx", fused_feeds(calibration), target="cpu",
                               exclude=qgraph.float_nodes(pre), cache=cache)
        sqnr = tensor_sqnr(pre, qgraph.read_ranges(cache), probe, "cpu")
        worst[name] = merge_scores(group_scores_from_tensors(pre, sqnr, groups))[0]
    assert worst["white"][1] < 5.0 < worst["synthetic"][1]
    assert sqnr["image"] > 30.0  # a real calibration quantizes the input well


def _variant_files(manifest: Any) -> set[str]:
    return {name for variant in manifest.variants.values() for name in (variant.fused, variant.decoder) if name}


@pytest.fixture(scope="module")
def default_copy_with_pseudo_truth(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A copy of the default bundle, and a held-out folder whose masks are its own FP32 detections.

    The truth is the FP32 graph's output, so FP32 scores perfect precision and recall on it by
    construction and any damage done by quantization shows, however weak the model is against
    the synthetic ground truth (the first default bundle's prompted mIoU there is 0.03).
    """
    import cv2

    from engines.backends import open_engine
    from engines.backends.onnxruntime import Config
    from engines.postprocess import Postprocessor
    from engines.preprocess import Preprocessor
    from engines.synthetic import render_frame
    from training.quantize.calibration import synthetic_pixel_scale

    root = tmp_path_factory.mktemp("default")
    bundle_dir = root / "bundle"
    # The FP32 graphs only: the default bundle ships its own gated INT8 variant, which this test makes anew.
    source = load_bundle(DEFAULT_BUNDLE_DIR)
    fields = source.manifest.model_dump(mode="json", by_alias=True)
    fields.pop("files")
    fields["variants"] = {}
    fp32 = [name for name in source.manifest.files if name not in _variant_files(source.manifest)]
    bundle = write_bundle(bundle_dir, fields, {name: source.path / name for name in fp32})
    spec = bundle.manifest.input
    folder = root / "pseudo"
    (folder / "images").mkdir(parents=True)
    (folder / "classes.txt").write_text("\n".join(bundle.manifest.classes) + "\n")
    engine = open_engine(bundle, Config(providers=["cpu"], precision="fp32"))
    preprocess = Preprocessor(spec)
    postprocess = Postprocessor(bundle.manifest.classes, bundle.manifest.mask_stride)
    kept = 0
    try:
        for seed in range(2_500_000, 2_500_040):
            image = render_frame(seed, spec.width, spec.height, pixel_scale=synthetic_pixel_scale(spec.width,
                                                                                                  spec.height)).image
            tensor, box = preprocess(image)
            defects = postprocess(engine.infer(tensor), box).defects
            if not defects:
                continue
            cv2.imwrite(str(folder / "images" / f"{seed}.png"), image)
            (folder / "masks" / str(seed)).mkdir(parents=True)
            for i, d in enumerate(defects):
                mask = np.zeros(image.shape[:2], np.uint8)
                x, y = d.bbox[0], d.bbox[1]
                mask[y : y + d.mask.shape[0], x : x + d.mask.shape[1]] = d.mask.astype(np.uint8) * 255
                cv2.imwrite(str(folder / "masks" / str(seed) / f"{i:02d}_{d.class_name}.png"), mask)
            kept += 1
            if kept == 4:
                break
    finally:
        engine.close()
    if kept == 0:
        pytest.skip("the default bundle detects nothing on 40 synthetic frames")
    return bundle_dir, folder


@pytest.mark.slow
def test_the_gate_refuses_a_harmful_calibration_and_leaves_the_bundle_untouched(
    default_copy_with_pseudo_truth: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    import cv2

    bundle_dir, truth = default_copy_with_pseudo_truth
    white = tmp_path / "white"
    white.mkdir()
    for i in range(2):  # calibrating on blank, overexposed frames: every range fits a flat image
        cv2.imwrite(str(white / f"white{i}.png"), np.full((64, 64, 3), 255, np.uint8))
    before = _digests(bundle_dir)
    siblings = sorted(p.name for p in bundle_dir.parent.iterdir())
    code, out, err = _main(["quantize", str(bundle_dir), "--calib", str(white), "--n", "2", "--held-out",
                            f"folder,root={truth}", "--max-fallback", "1"], capsys)  # the default bound, 1 point
    assert code == 2, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("defectsam-train: error: ") and "Traceback" not in err
    assert "drop" in lines[-1] and "exceeds the bound 1.00" in lines[-1] and "unchanged" in lines[-1]
    assert "1 fallback round" in lines[-1]
    assert out == ""
    assert _digests(bundle_dir) == before  # byte for byte
    assert sorted(p.name for p in bundle_dir.parent.iterdir()) == siblings  # no staging left beside it
    assert load_bundle(bundle_dir).manifest.variants == {}


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["quantize", "/no/such/bundle", "--calib", "synthetic"], "/no/such/bundle: bundle directory does not exist"),
        (["quantize", "{bundle}", "--calib", "{empty}"], "holds no images"),
        (["quantize", "{bundle}", "--calib", "{empty}/nothing"], "no such directory"),
        (["quantize", "{bundle}", "--calib", "synthetic", "--n", "0"], "--n must be at least 1"),
        (["quantize", "{bundle}", "--calib", "synthetic", "--n", "-3"], "--n must be at least 1"),
        (["quantize", "{bundle}"], "--calib"),
        (["quantize", "{bundle}", "--calib", "synthetic", "--max-drop", "-1"], "--max-drop"),
        (["quantize", "{bundle}", "--calib", "synthetic", "--mode", "fp4"], "--mode"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv: list[str], needle: str, tiny_bundle: Path, tmp_path: Path,
                                          capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    before = _digests(tiny_bundle)
    code, _, err = _main([a.format(bundle=tiny_bundle, empty=empty) for a in argv], capsys)
    assert code == 2
    assert err.count("\n") == 1 and needle in err and "Traceback" not in err
    assert _digests(tiny_bundle) == before
