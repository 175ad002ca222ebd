"""INT8 quantization of both graphs: the variant in the bundle, the runtime choosing it, the precision gate, the
CLI's errors.

Quantization here is real ONNX Runtime quantization of the tiny exported bundle (random weights, 64 px
windows). A random finder proposes nothing at the default candidate threshold, so the bundle under test is
calibrated to propose every cell (candidate threshold 0): every frame then gets its windows. The gate
refusing a harmful calibration measures on held-out frames whose truth is the FP32 graphs' own output, so
FP32 scores perfectly by construction and any damage done by quantization shows.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from engines.bundle import MANIFEST_NAME, Thresholds, load_bundle, sha256_file, update_thresholds
from engines.errors import BundleError

from .conftest import TINY_CLASSES, TINY_MAX_WINDOWS, TINY_WINDOW

pytest.importorskip("onnx", reason="quantization needs the onnx package (train/dev extras)")
pytest.importorskip("torch", reason="quantization reads its held-out data through the 'train' extra")

HELD_OUT = "synthetic,n=2,seed=2000000,width=256,height=192,pixel_scale=0.5,defect_free_prob=0.0"
EVERY_CELL = Thresholds(score_threshold=0.5, uncertain_threshold=0.3, candidate_threshold=0.0)


def _main(argv: list[str], capsys: pytest.CaptureFixture[str] | None = None) -> tuple[int, str, str]:
    from training.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse errors
            code = int(exc.code or 0)
    if capsys is not None:
        capsys.readouterr()
    return code, out.getvalue(), err.getvalue()


def _digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def _ops(path: Path) -> list[str]:
    import onnx

    return [node.op_type for node in onnx.load(str(path)).graph.node]


@pytest.fixture(scope="module")
def proposing_master(tiny_bundle_master: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny bundle with a candidate threshold of 0 (every cell a candidate); copy before changing."""
    out = tmp_path_factory.mktemp("proposing") / "tiny"
    shutil.copytree(tiny_bundle_master, out)
    update_thresholds(out, EVERY_CELL)
    return out


@pytest.fixture()
def proposing(proposing_master: Path, tmp_path: Path) -> Path:
    target = tmp_path / "proposing"
    shutil.copytree(proposing_master, target)
    return target


@pytest.fixture(scope="module")
def static_run(proposing_master: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], str]:
    """``defectsam-train quantize --calib synthetic`` run once: (bundle, FP32 digests before, stdout)."""
    out = tmp_path_factory.mktemp("quantized") / "tiny"
    shutil.copytree(proposing_master, out)
    before = _digests(out)
    # Random weights score near zero on any ground truth: the bound is wide, the machinery is the point.
    code, stdout, stderr = _main(["quantize", str(out), "--calib", "synthetic", "--n", "2", "--held-out", HELD_OUT,
                                  "--max-drop", "100"])
    assert code == 0, stderr
    return out, before, stdout


@pytest.fixture()
def quantized(static_run: tuple[Path, dict[str, str], str], tmp_path: Path) -> Path:
    target = tmp_path / "quantized"
    shutil.copytree(static_run[0], target)
    return target


@pytest.mark.slow
def test_static_quantization_adds_a_gated_int8_variant_of_both_graphs(
    static_run: tuple[Path, dict[str, str], str],
) -> None:
    path, before, out = static_run
    assert "segment.int8.onnx" in out and "find.int8.onnx" in out and "drop" in out
    bundle = load_bundle(path)  # every checksum verified, the INT8 graphs among them
    m = bundle.manifest
    assert m.schema_version == 3 and m.precision == "fp32" and m.precisions == ("fp32", "int8")
    variant = m.variants["int8"]
    assert (variant.segment, variant.find, variant.mode, variant.target, variant.gate) == (
        "segment.int8.onnx", "find.int8.onnx", "static", "cpu", "passed")
    assert set(m.files) == {"segment.onnx", "find.onnx", "segment.int8.onnx", "find.int8.onnx"}
    for name, digest in m.files.items():
        assert sha256_file(path / name) == digest
    after = _digests(path)
    assert after["segment.onnx"] == before["segment.onnx"] and after["find.onnx"] == before["find.onnx"]
    assert bundle.size_bytes("segment.int8.onnx") < 0.5 * bundle.size_bytes("segment.onnx")
    assert bundle.size_bytes("find.int8.onnx") < 0.6 * bundle.size_bytes("find.onnx")
    assert m.thresholds == EVERY_CELL  # the rest of the manifest is kept

    q = m.metrics["quantization"]
    assert q["mode"] == "static" and q["target"] == "cpu" and q["passed"] is True and q["bound_points"] == 100.0
    assert q["gate_metric"] == "miou_fg"
    assert math.isclose(q["drop_points"], (q["fp32"]["miou_fg"] - q["int8"]["miou_fg"]) * 100, abs_tol=1e-3)
    for side in ("fp32", "int8"):
        assert set(q[side]) == {"miou_fg", "miou", "precision", "recall", "f1", "image_accuracy", "false_ng_rate"}
    assert q["calibration"]["source"].startswith("synthetic(n=2,seed=3000000")  # disjoint from the held-out seeds
    assert q["calibration"]["frames"] == 2 and "seed=2000000" in q["held_out"]["dataset"]
    assert q["held_out"]["n_images"] == 2
    assert {"Exp", "Div", "Sigmoid"} <= set(q["kept_fp32"]["op_types"])
    for graph in ("segment.int8.onnx", "find.int8.onnx"):
        assert q["kept_fp32"]["nodes"][graph], "the head feeding the output Softmax / Sigmoid stays FP32"
    assert {"precision_vs_fp32", "recall_vs_fp32", "same_verdict", "same_pixel_class"} <= set(q["agreement_with_fp32"])
    assert set(q["sizes_bytes"]) == set(m.files) and set(q["output_sqnr_db"]) == {"class_probs"}

    import onnx

    for graph_name, head in (("segment.int8.onnx", "Div"), ("find.int8.onnx", "Sigmoid")):  # Div: the softmax's
        graph = onnx.load(str(path / graph_name)).graph
        ops = [n.op_type for n in graph.node]
        assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
        producer = {t: n for n in graph.node for t in n.output}
        last = producer[graph.output[0].name]
        assert last.op_type == head
        # From the output back to the logits' convolution nothing is 8-bit: no DequantizeLinear on the way.
        seen, frontier = [], [last]
        while frontier:
            node = frontier.pop()
            seen.append(node.op_type)
            if node.op_type == "Conv":
                continue
            frontier.extend(producer[t] for t in node.input if t in producer)
        assert "Conv" in seen and "DequantizeLinear" not in seen[: seen.index("Conv")], (graph_name, seen)


@pytest.mark.slow
def test_weight_only_quantization_keeps_fp32_compute(proposing: Path, capsys) -> None:
    code, _, err = _main(["quantize", str(proposing), "--mode", "weight-only", "--held-out", HELD_OUT,
                          "--max-drop", "100"], capsys)
    assert code == 0, err
    m = load_bundle(proposing).manifest
    assert m.variants["int8"].mode == "weight_only"
    assert m.metrics["quantization"]["calibration"] is None
    for graph in ("segment", "find"):
        ops = _ops(proposing / f"{graph}.int8.onnx")
        assert "QuantizeLinear" not in ops and ops.count("DequantizeLinear") >= ops.count("Conv") - 1
    # Weights stored as INT8: the segment file shrinks by about 4x, the graph is otherwise the FP32 one.
    assert (proposing / "segment.int8.onnx").stat().st_size < 0.4 * (proposing / "segment.onnx").stat().st_size
    q = m.metrics["quantization"]
    assert q["drop_points"] < 5.0 and q["agreement_with_fp32"]["same_pixel_class"] > 0.9

    from engines.backends import open_engine
    from engines.backends.onnxruntime import Config

    # The runtime folds the weights' DequantizeLinear into FP32 initializers at load: FP32 outputs, FP32 speed.
    windows = np.random.default_rng(1).standard_normal((2, 3, 64, 64)).astype(np.float32)
    probs = []
    for precision in ("fp32", "int8"):
        engine = open_engine(proposing, Config(providers=["cpu"], precision=precision))  # type: ignore[arg-type]
        probs.append(engine.segment(windows))
        engine.close()
    assert np.abs(probs[0] - probs[1]).max() < 0.05


@pytest.mark.slow
def test_the_engine_runs_the_int8_graphs_with_the_contract_shapes(quantized: Path) -> None:
    from engines.backends import open_engine
    from engines.backends.onnxruntime import Config
    from engines.engine import running_precision
    from engines.inspector import Inspector
    from engines.synthetic import render_frame

    bundle = load_bundle(quantized)
    engine = open_engine(bundle, Config(providers=["cpu"], precision="int8"))
    try:
        assert engine.precision == "int8" and running_precision(engine) == "int8"  # type: ignore[attr-defined]
        assert engine.segment_path.name == "segment.int8.onnx"  # type: ignore[attr-defined]
        assert engine.find_path.name == "find.int8.onnx"  # type: ignore[attr-defined]
        windows = np.random.default_rng(0).standard_normal((3, 3, 64, 96)).astype(np.float32)
        probs = engine.segment(windows)
        assert probs.shape == (3, len(TINY_CLASSES) + 1, 64, 96) and probs.dtype == np.float32
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-3)
        candidates = engine.find(np.zeros((1, 3, 64, 96), np.float32))
        assert candidates.shape == (8, 12) and 0.0 <= float(candidates.min()) <= float(candidates.max()) <= 1.0
        frame = render_frame(4, 320, 256, pixel_scale=0.5).image
        result = Inspector(engine).inspect(frame)
        assert set(result.timings) >= {"find", "segment"} and (result.frame_width, result.frame_height) == (320, 256)
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
    assert choose_precision(bundle, "auto", "TensorrtExecutionProvider") == "fp32"  # a cpu-target variant
    raw = json.loads((quantized / MANIFEST_NAME).read_text())
    raw["variants"]["int8"]["gate"] = "pending"
    (quantized / MANIFEST_NAME).write_text(json.dumps(raw))
    assert choose_precision(load_bundle(quantized), "auto", "CPUExecutionProvider") == "fp32"


def test_int8_asked_of_a_bundle_without_it_is_one_line(tiny_bundle: Path) -> None:
    from engines.backends import open_engine
    from engines.backends.onnxruntime import Config

    with pytest.raises(BundleError) as caught:
        open_engine(tiny_bundle, Config(providers=["cpu"], precision="int8"))
    message = str(caught.value)
    assert "backend.precision 'int8': the bundle has no int8 graphs (it has fp32)" in message and "\n" not in message
    assert "defectsam-train quantize" in message


def test_the_loader_verifies_the_int8_graphs(quantized: Path) -> None:
    for name in ("find.int8.onnx", "segment.int8.onnx"):
        with (quantized / name).open("ab") as handle:
            handle.write(b"\0")
        with pytest.raises(BundleError, match=rf"{name.replace('.', r'[.]')}: checksum mismatch"):
            load_bundle(quantized)


def test_a_plain_bundle_writes_no_variants(tiny_bundle: Path) -> None:
    plain = json.loads((tiny_bundle / MANIFEST_NAME).read_text())
    assert "variants" not in plain and load_bundle(tiny_bundle).manifest.variants == {}
    assert "variants" not in load_bundle(tiny_bundle).manifest.to_json()


def test_bench_times_fp32_and_int8_of_one_bundle_in_one_run(quantized: Path) -> None:
    from engines.backends.onnxruntime import Config
    from engines.benchmark import BenchSubject, bench_engines, precision_ratios
    from engines.synthetic import render_frame

    bundle = load_bundle(quantized)
    subjects = [BenchSubject(bundle, Config(providers=["cpu"], precision=p)) for p in ("fp32", "int8")]  # type: ignore[arg-type]
    frames = [render_frame(2_000_000 + i, 512, 384).image for i in range(2)]
    results = bench_engines(subjects, warmup=0, iterations=2, rounds=1, frames=frames)
    assert [r.precision for r in results] == ["fp32", "int8"]
    assert results[1].graph_bytes == bundle.size_bytes("segment.int8.onnx") + bundle.size_bytes("find.int8.onnx")
    assert all(r.mode == "windows" and r.window == TINY_WINDOW and r.windows == TINY_MAX_WINDOWS for r in results)
    assert {"preprocess", "find", "segment", "postprocess", "total"} <= set(results[0].steps_ms or {})
    (line,) = precision_ratios(results)
    assert "int8 / fp32" in line


@pytest.mark.slow
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


@pytest.mark.slow
def test_ranking_puts_groups_with_clipping_ranges_first(proposing_master: Path, tmp_path: Path) -> None:
    """Ranges fitted to all-white frames clip real frames: the groups reading them rank worst."""
    from training.quantize import graph as qgraph
    from training.quantize.calibration import graph_feeds, load_calibration
    from training.quantize.gate import group_scores_from_tensors, merge_scores, tensor_sqnr

    bundle = load_bundle(proposing_master)
    pre = tmp_path / "pre.onnx"
    qgraph.preprocess(bundle.segment_graph, pre)
    groups = qgraph.node_groups(bundle.segment_graph, pre)
    assert any(g.startswith("model.encoder.blocks.") for g in groups.values())  # scopes survive pre-processing
    assert any(g.startswith("model.decoder.") for g in groups.values())
    white = graph_feeds(bundle, [np.full((256, 256, 3), 255, np.uint8)] * 2)["segment"]
    synthetic = graph_feeds(bundle, load_calibration(bundle, "synthetic", 2).frames)["segment"]
    # The probe: the synthetic windows themselves. The tiny bundle's windows are a frame's first cells, so
    # another frame's would be another part of the panel; what is tested is that white ranges clip real windows.
    probe = synthetic
    assert probe and white and synthetic
    worst, input_sqnr = {}, {}
    for name, feeds in (("white", white), ("synthetic", synthetic)):
        cache = tmp_path / f"{name}.json"
        qgraph.quantize_static(pre, tmp_path / f"{name}.onnx", feeds, target="cpu", exclude=qgraph.float_nodes(pre),
                               cache=cache)
        sqnr = tensor_sqnr(pre, qgraph.read_ranges(cache), probe, "cpu")
        worst[name] = merge_scores(group_scores_from_tensors(pre, sqnr, groups))[0]
        input_sqnr[name] = sqnr["windows"]
    assert worst["white"][1] < 5.0 < worst["synthetic"][1]
    assert input_sqnr["synthetic"] > 30.0 > input_sqnr["white"]  # a real calibration quantizes the input well


@pytest.fixture(scope="module")
def pseudo_truth(proposing_master: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Held-out frames whose truth is the FP32 graphs' own semantic output (label PNGs)."""
    from engines.backends import open_engine
    from engines.backends.onnxruntime import Config
    from engines.inspector import Inspector
    from engines.windows import semantic_labels
    from training.data.registry import build_dataset

    folder = tmp_path_factory.mktemp("pseudo") / "truth"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    (folder / "classes.txt").write_text("\n".join(TINY_CLASSES) + "\n")
    engine = open_engine(proposing_master, Config(providers=["cpu"], precision="fp32"))
    try:
        inspector = Inspector(engine)
        dataset = build_dataset(HELD_OUT)
        for i in range(len(dataset)):
            image = dataset[i].image
            outputs = inspector.run(inspector.prepare(image))
            labels = semantic_labels(inspector.merge(outputs), image.shape[1], image.shape[0])
            cv2.imwrite(str(folder / "images" / f"{i:03d}.png"), image)
            cv2.imwrite(str(folder / "masks" / f"{i:03d}.png"), labels)
    finally:
        engine.close()
    return folder


@pytest.mark.slow
def test_the_gate_refuses_a_harmful_calibration_and_leaves_the_bundle_untouched(
    proposing: Path, pseudo_truth: Path, tmp_path: Path
) -> None:
    from training.data.registry import build_dataset
    from training.quantize.gate import measure

    fp32 = measure(load_bundle(proposing), "fp32", build_dataset(f"folder,root={pseudo_truth}"))
    assert fp32["semantic"]["miou_fg"] == 1.0  # the truth is FP32's own output
    white = tmp_path / "white"
    white.mkdir()
    for i in range(2):  # calibrating on blank, overexposed frames: every range fits a flat image
        cv2.imwrite(str(white / f"white{i}.png"), np.full((128, 128, 3), 255, np.uint8))
    before = _digests(proposing)
    siblings = sorted(p.name for p in proposing.parent.iterdir())
    code, out, err = _main(["quantize", str(proposing), "--calib", str(white), "--n", "2", "--held-out",
                            f"folder,root={pseudo_truth}", "--max-fallback", "1"])  # the default bound, 1 point
    assert code == 2, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("defectsam-train: error: ") and "Traceback" not in err
    assert "drop" in lines[-1] and "exceeds the bound 1.00" in lines[-1] and "unchanged" in lines[-1]
    assert "1 fallback round" in lines[-1] and "FP32 1.0000" in lines[-1]
    assert out == ""
    assert _digests(proposing) == before  # byte for byte
    assert sorted(p.name for p in proposing.parent.iterdir()) == siblings  # no staging left beside it
    assert load_bundle(proposing).manifest.variants == {}


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
        (["quantize", "{bundle}", "--calib", "synthetic", "--limit", "0"], "--limit must be at least 1"),
        (["quantize", "{bundle}", "--calib", "synthetic", "--held-out", "magnetic_tile:tset"], "key 'split'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv: list[str], needle: str, tiny_bundle: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    before = _digests(tiny_bundle)
    code, _, err = _main([a.format(bundle=tiny_bundle, empty=empty) for a in argv])
    assert code == 2
    assert err.count("\n") == 1 and needle in err and "Traceback" not in err
    assert _digests(tiny_bundle) == before
