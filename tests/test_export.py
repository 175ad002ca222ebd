"""ONNX export: both graphs against the contract, ONNX Runtime against PyTorch, bundles, the CLI end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch", reason="exporting needs the 'train' extra (torch)")

from engines.bundle import Bundle, load_bundle  # noqa: E402
from engines.contract import find_input, find_output, segment_input, segment_output  # noqa: E402
from training.cli import main  # noqa: E402
from training.export.bundle import export_checkpoints  # noqa: E402
from training.export.onnx import ExportError, check_graph, export_bundle  # noqa: E402
from training.model.build import build_finder, build_model, count_parameters  # noqa: E402
from training.model.checkpoint import CheckpointError, save_checkpoint  # noqa: E402
from training.model.finder import CandidateFinder  # noqa: E402
from training.model.segmenter import WindowSegmenter  # noqa: E402

ort = pytest.importorskip("onnxruntime")

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("scratch", "dent", "pinhole")


def _session(path: Path):  # type: ignore[no-untyped-def]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _randomise_norms(model: torch.nn.Module, seed: int) -> None:
    """Give BatchNorm non-trivial statistics, so folding them into convs is really tested."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(module.num_features, generator=generator) * 0.1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[WindowSegmenter, CandidateFinder, Bundle]:
    torch.manual_seed(0)
    model, finder = build_model("student_seg", num_classes=3), build_finder("finder")
    _randomise_norms(model, 1)
    _randomise_norms(finder, 2)
    out = tmp_path_factory.mktemp("bundle") / "student"
    bundle = export_bundle(
        model, "student_seg", out, name="test-student", classes=CLASSES, finder=finder, finder_arch="finder",
        window=96, max_windows=12, provenance={"weights": "untrained", "notes": "test", "seed": 0},
        metrics={"miou_fg": 0.0},
    )
    return model, finder, bundle


@pytest.mark.slow
def test_bundle_is_verified_and_complete(exported: tuple[WindowSegmenter, CandidateFinder, Bundle]) -> None:
    model, finder, bundle = exported
    manifest = load_bundle(bundle.path).manifest
    assert manifest.name == "test-student" and manifest.schema_version == 3 and manifest.precision == "fp32"
    assert (manifest.segment.arch, manifest.segment.window, manifest.segment.max_windows) == ("student_seg", 96, 12)
    assert manifest.segment.mean == (123.675, 116.28, 103.53) and manifest.segment.std == (58.395, 57.12, 57.375)
    assert manifest.find is not None and (manifest.find.arch, manifest.find.reduction) == ("finder", 4)
    assert manifest.segment.parameters == count_parameters(model)
    assert manifest.find.parameters == count_parameters(finder)
    assert manifest.parameters == count_parameters(model) + count_parameters(finder)
    assert manifest.provenance.weights == "untrained" and manifest.provenance.torch_version == torch.__version__
    assert manifest.metrics == {"miou_fg": 0.0} and manifest.classes == CLASSES
    assert not any(p.name.endswith(".data") for p in bundle.path.iterdir()), "weights must be inside the .onnx"
    for name in manifest.files:
        onnx.checker.check_model(str(bundle.path / name))
        assert bundle.size_bytes(name) < 10_000_000
    # The dynamic axes carry the contract's names (TensorRT's optimisation profiles use them).
    for path, specs in ((bundle.segment_graph, (segment_input(), segment_output(3))),
                        (bundle.find_graph, (find_input(), find_output()))):
        graph = onnx.load(str(path)).graph
        values = [*graph.input, *graph.output]
        assert [v.name for v in values] == [s.name for s in specs]
        for value, spec in zip(values, specs, strict=True):
            dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            assert dims == list(spec.shape), value.name
        check_graph(path, specs[:1], specs[1:])


@pytest.mark.slow
@pytest.mark.parametrize(("batch", "height", "width"), [(3, 96, 96), (1, 48, 112), (2, 16, 16)])
def test_segment_graph_matches_torch_at_any_window(
    exported: tuple[WindowSegmenter, CandidateFinder, Bundle], batch: int, height: int, width: int
) -> None:
    model, _, bundle = exported
    windows = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(height + batch))
    with torch.no_grad():
        want = torch.softmax(model(windows), dim=1).numpy()
    (got,) = _session(bundle.segment_graph).run(["class_probs"], {"windows": windows.numpy()})
    assert got.shape == (batch, 4, height, width) and got.dtype == np.float32
    assert np.abs(got - want).max() <= 1e-4
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(("height", "width"), [(384, 672), (64, 96)])
def test_find_graph_matches_torch_at_any_frame_size(
    exported: tuple[WindowSegmenter, CandidateFinder, Bundle], height: int, width: int
) -> None:
    _, finder, bundle = exported
    assert bundle.find_graph is not None
    image = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(width))
    with torch.no_grad():
        want = torch.sigmoid(finder(image)).numpy()
    (got,) = _session(bundle.find_graph).run(["candidates"], {"image": image.numpy()})
    assert got.shape == (1, 1, height // 8, width // 8)
    assert np.abs(got - want).max() <= 1e-4


def test_check_graph_refuses_a_graph_that_breaks_the_contract(
    exported: tuple[WindowSegmenter, CandidateFinder, Bundle],
) -> None:
    _, _, bundle = exported
    assert bundle.find_graph is not None
    with pytest.raises(ExportError) as caught:
        check_graph(bundle.find_graph, (segment_input(),), (segment_output(3),))
    assert str(bundle.find_graph) in str(caught.value)
    assert "graph inputs are ['image'], the contract says ['windows']" in str(caught.value)
    with pytest.raises(ExportError, match=r"output class_probs is \['batch', 4, 'height', 'width'\] float32"):
        check_graph(bundle.segment_graph, (segment_input(),), (segment_output(2),))


def test_export_bundle_rejects_a_class_count_mismatch_and_a_nameless_finder(tmp_path: Path) -> None:
    model = build_model("student_seg", num_classes=3)
    with pytest.raises(ExportError, match="2 class names given, the model has 3 classes"):
        export_bundle(model, "student_seg", tmp_path / "b", name="x", classes=("a", "b"),
                      provenance={"weights": "untrained"})
    with pytest.raises(ExportError, match="a finder and its architecture name come together"):
        export_bundle(model, "student_seg", tmp_path / "b", name="x", classes=CLASSES,
                      provenance={"weights": "untrained"}, finder=build_finder())
    assert not (tmp_path / "b").exists()


def test_export_checkpoints_refuses_checkpoints_that_do_not_fit(tmp_path: Path) -> None:
    finder = save_checkpoint(tmp_path / "finder.pt", "finder", build_finder())
    with pytest.raises(CheckpointError, match="holds a finder; give it with --finder") as caught:
        export_checkpoints(finder, tmp_path / "b")
    assert str(finder) in str(caught.value)
    student = save_checkpoint(tmp_path / "student.pt", "student_seg", build_model("student_seg"), classes=list(CLASSES))
    with pytest.raises(CheckpointError, match="holds 'student_seg', not a finder") as caught:
        export_checkpoints(student, tmp_path / "b", finder=student)
    with pytest.raises(Exception, match=r"--classes a,b,c: .*student\.pt was trained for scratch,dent,pinhole"):
        export_checkpoints(student, tmp_path / "b", classes=["a", "b", "c"])
    legacy = tmp_path / "legacy.pt"  # a single-pass student from before the redesign
    torch.save({"arch": "student_cnn", "config": {"height": 576, "width": 1024}, "model": {}}, legacy)
    with pytest.raises(CheckpointError) as caught:
        export_checkpoints(legacy, tmp_path / "b")
    message = str(caught.value)
    assert str(legacy) in message and "'student_cnn'" in message and "student_seg" in message and "\n" not in message
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_cli_export_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "training.cli", "export", "--arch", "student_seg", "--out", str(out),
         "--random-init", "--random-finder", "--seed", "7", "--window", "32", "--max-windows", "2",
         "--classes", "scratch,dent", "--name", "cli-test"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"wrote {out.resolve()}" in result.stdout and "segment.onnx" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["provenance"]["weights"] == "untrained" and manifest["provenance"]["seed"] == 7
    assert "random" in manifest["provenance"]["notes"]
    assert manifest["classes"] == ["scratch", "dent"] and manifest["name"] == "cli-test"
    assert (manifest["segment"]["window"], manifest["segment"]["max_windows"]) == (32, 2)
    assert manifest["find"]["arch"] == "finder" and manifest["provenance"]["finder_checkpoint_sha256"]
    bundle = load_bundle(out)
    (probs,) = _session(bundle.segment_graph).run(["class_probs"], {"windows": np.zeros((1, 3, 32, 32), np.float32)})
    assert probs.shape == (1, 3, 32, 32)


def _run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse errors
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["export", "--arch", "student_seg", "--out", "x"], "--random-init"),
        (["export", "--random-init", "--out", "x"], "--arch"),
        (["export", "--arch", "student_seg", "--out", "x", "--random-init", "--window", "100"], "--window"),
        (["export", "--arch", "nope", "--out", "x", "--random-init"], "--arch"),
        (["export", "--arch", "student_seg", "--out", "x", "--random-init", "--classes", "a,,b"], "--classes"),
        (["export", "--arch", "student_seg", "--out", "x", "--random-finder", "--checkpoint", "c.pt"],
         "--random-finder"),
        (["export", "--arch", "student_seg", "--out", "x", "--random-init", "--max-windows", "0"], "--max-windows"),
        (["export", "--out", "x", "--checkpoint", "/no/such.pt"], "/no/such.pt"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str],
                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, err = _run_main(argv, capsys)
    assert code == 2
    assert err.count("\n") == 1 and needle in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_cli_wrong_checkpoint_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = save_checkpoint(tmp_path / "finder.pt", "finder", build_finder())
    code, err = _run_main(["export", "--out", str(tmp_path / "b"), "--checkpoint", str(ckpt)], capsys)
    assert code == 2
    assert err.count("\n") == 1 and str(ckpt) in err and "holds a finder" in err and "Traceback" not in err
    assert not (tmp_path / "b").exists()


def test_cli_models_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--window", "64"]) == 0
    out = capsys.readouterr().out
    assert "64x64 windows" in out and "GMAC/MP" in out
    rows = {line.split()[0]: line for line in out.splitlines()[2:]}
    assert set(rows) == {"student_seg", "teacher_seg", "finder"}
    assert "(finder)" in rows["finder"] and "0.698M" in rows["student_seg"]
