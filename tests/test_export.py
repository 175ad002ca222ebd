"""ONNX export: contract shapes, ONNX Runtime against PyTorch, bundles, the CLI end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from engines.bundle import Bundle, load_bundle
from engines.contract import FUSED_OUTPUT_NAMES
from training.cli import main
from training.export.onnx import ExportError, export_bundle, export_decoder
from training.model.build import build_model
from training.model.checkpoint import save_checkpoint
from training.model.segmenter import DefectSegmenter

ort = pytest.importorskip("onnxruntime")

REPO = Path(__file__).resolve().parents[1]
HEIGHT, WIDTH, K = 128, 256, 4


def _session(path: Path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _randomise_norms(model: DefectSegmenter) -> None:
    """Give BatchNorm non-trivial statistics, so folding them into convs is really tested."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(module.num_features, generator=generator) + 0.5)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[DefectSegmenter, Bundle]:
    torch.manual_seed(0)
    model = build_model("student_cnn", height=HEIGHT, width=WIDTH, k=K)
    _randomise_norms(model)
    out = tmp_path_factory.mktemp("bundle") / "student"
    bundle = export_bundle(
        model,
        "student_cnn",
        out,
        name="test-student",
        classes=("scratch", "dent", "pinhole"),
        provenance={"weights": "untrained", "notes": "test", "seed": 0},
        metrics={"miou": 0.0},
    )
    return model, bundle


@pytest.mark.slow
def test_bundle_is_verified_and_complete(exported) -> None:
    model, bundle = exported
    reloaded = load_bundle(bundle.path)
    manifest = reloaded.manifest
    assert manifest.arch == "student_cnn" and manifest.name == "test-student"
    assert manifest.k == K and manifest.mask_stride == 8 and manifest.precision == "fp32"
    assert (manifest.input.height, manifest.input.width) == (HEIGHT, WIDTH)
    assert manifest.input.mean == (123.675, 116.28, 103.53) and manifest.input.std == (58.395, 57.12, 57.375)
    assert manifest.graphs.fused == "model.onnx" and manifest.graphs.decoder == "decoder.onnx"
    assert manifest.parameters == sum(p.numel() for p in model.parameters())
    assert manifest.provenance.weights == "untrained" and manifest.provenance.torch_version == torch.__version__
    assert manifest.metrics == {"miou": 0.0}
    for name in manifest.files:
        onnx.checker.check_model(str(bundle.path / name))
        assert not any(p.name.endswith(".data") for p in bundle.path.iterdir()), "weights must be inside the .onnx"
        assert bundle.size_bytes(name) < 10_000_000


@pytest.mark.slow
def test_fused_graph_matches_torch(exported) -> None:
    model, bundle = exported
    session = _session(bundle.fused_graph)
    assert [o.name for o in session.get_outputs()] == list(FUSED_OUTPUT_NAMES)
    image = torch.randn(1, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = [t.numpy() for t in model.forward_fused(image)]
    actual = session.run(None, {"image": image.numpy()})
    outputs = dict(zip(FUSED_OUTPUT_NAMES, zip(expected, actual, strict=True), strict=True))
    for name, spec in bundle.manifest.outputs.items():
        want, got = outputs[name]
        assert got.shape == tuple(spec.shape) and got.dtype == np.dtype(spec.dtype), name
    np.testing.assert_array_equal(outputs["points"][1], outputs["points"][0])
    np.testing.assert_array_equal(outputs["point_classes"][1], outputs["point_classes"][0])
    for name in ("heatmap", "point_scores", "mask_logits", "iou", "image_embedding"):
        want, got = outputs[name]
        assert np.abs(want - got).max() <= 1e-3, name


@pytest.mark.slow
@pytest.mark.parametrize("num_points", [1, 3])
def test_decoder_graph_matches_torch(exported, num_points: int) -> None:
    model, bundle = exported
    assert bundle.decoder_graph is not None
    session = _session(bundle.decoder_graph)
    generator = torch.Generator().manual_seed(num_points)
    with torch.no_grad():
        embedding, _ = model.embed(torch.randn(1, 3, HEIGHT, WIDTH, generator=generator))
        coords = torch.rand(1, num_points, 2, generator=generator) * torch.tensor([WIDTH, HEIGHT])
        labels = torch.tensor([[1.0, 0.0, -1.0][:num_points]])
        want_masks, want_iou = model.decode(embedding, None, coords, labels)
    masks, iou = session.run(
        None, {"image_embedding": embedding.numpy(), "point_coords": coords.numpy(), "point_labels": labels.numpy()}
    )
    assert masks.shape == (1, HEIGHT // 8, WIDTH // 8) and iou.shape == (1,)
    assert np.abs(masks - want_masks.numpy()).max() <= 1e-3
    assert np.abs(iou - want_iou.numpy()).max() <= 1e-3


def test_decoder_export_refuses_a_skip_model(tmp_path) -> None:
    model = build_model("student_cnn_s8", height=64, width=64, k=1)
    with pytest.raises(ExportError, match="stride-8"):
        export_decoder(model, tmp_path / "decoder.onnx")


def test_export_bundle_rejects_a_class_count_mismatch(tmp_path) -> None:
    model = build_model("student_cnn", height=64, width=64, k=1)
    with pytest.raises(ExportError, match="2 class names"):
        export_bundle(
            model, "student_cnn", tmp_path / "b", name="x", classes=("a", "b"), provenance={"weights": "untrained"}
        )
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_cli_export_end_to_end(tmp_path) -> None:
    out = tmp_path / "bundle"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "training.cli", "export", "--arch", "student_cnn", "--out", str(out),
         "--random-init", "--seed", "7", "--height", "64", "--width", "128", "--k", "2", "--classes", "scratch,dent"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["provenance"]["weights"] == "untrained" and manifest["provenance"]["seed"] == 7
    assert "random" in manifest["provenance"]["notes"]
    assert manifest["classes"] == ["scratch", "dent"] and manifest["K"] == 2
    bundle = load_bundle(out)
    heatmap = _session(bundle.fused_graph).run(["heatmap"], {"image": np.zeros((1, 3, 64, 128), np.float32)})[0]
    assert heatmap.shape == (1, 2, 4, 8)


def _run_main(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse errors
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


def test_cli_wrong_arch_checkpoint_is_one_line_exit_2(tmp_path, capsys) -> None:
    ckpt = save_checkpoint(tmp_path / "cnn.pt", "student_cnn", build_model("student_cnn", height=64, width=64, k=1))
    code, err = _run_main(
        ["export", "--arch", "student_vit", "--out", str(tmp_path / "b"), "--checkpoint", str(ckpt),
         "--height", "64", "--width", "64", "--k", "1"], capsys,
    )  # fmt: skip
    assert code == 2
    assert err.count("\n") == 1 and str(ckpt) in err and "Traceback" not in err
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["export", "--arch", "student_cnn", "--out", "x"], "--random-init"),
        (["export", "--arch", "student_cnn", "--out", "x", "--random-init", "--height", "100"], "--height"),
        (["export", "--arch", "nope", "--out", "x", "--random-init"], "--arch"),
        (["export", "--arch", "student_cnn", "--out", "x", "--random-init", "--classes", "a,,b"], "--classes"),
        (["export", "--arch", "student_cnn", "--out", "x", "--checkpoint", "/no/such.pt"], "/no/such.pt"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(argv: list[str], needle: str, capsys) -> None:
    code, err = _run_main(argv, capsys)
    assert code == 2
    assert err.count("\n") == 1 and needle in err and "Traceback" not in err


def test_cli_models_table(capsys) -> None:
    assert main(["models", "--height", "64", "--width", "128"]) == 0
    out = capsys.readouterr().out
    for name in ("student_cnn", "student_vit", "mobilesam"):
        assert name in out
