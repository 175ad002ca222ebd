"""Metrics on hand-made masks; a model and its exported bundle scored alike; the eval command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engines.postprocess import PostprocessConfig
from engines.preprocess import Letterbox
from training.commands import eval as eval_command
from training.data.prepare import collate, prepare_example
from training.data.registry import build_dataset
from training.eval.evaluate import logits_to_region
from training.eval.metrics import DetectionScores, PromptedScores, Region, dice, iou, match

from .support import run_command_module

torch = pytest.importorskip("torch", reason="evaluating a model needs the 'train' extra (torch)")

HW = (128, 256)
CLASSES = ("scratch", "dent", "pinhole")


def _square(x: int, y: int, side: int, shape: tuple[int, int] = (100, 100)) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[y : y + side, x : x + side] = True
    return mask


# -- metrics -----------------------------------------------------------------------------------


def test_iou_and_dice_of_known_overlaps() -> None:
    a = Region.from_mask(_square(10, 10, 20))  # 400 px
    b = Region.from_mask(_square(20, 10, 20))  # 400 px, 200 shared
    assert iou(a, b) == pytest.approx(200 / 600)
    assert dice(a, b) == pytest.approx(400 / 800)
    assert iou(a, a) == 1.0 and dice(a, a) == 1.0
    far = Region.from_mask(_square(70, 70, 10))
    assert iou(a, far) == 0.0 and dice(a, far) == 0.0
    assert iou(Region.empty(), Region.empty()) == 1.0
    assert iou(a, Region.empty()) == 0.0
    assert a.bbox == (10, 10, 20, 20) and a.area == 400


def test_matching_is_one_to_one_by_score() -> None:
    truth = [Region.from_mask(_square(10, 10, 20)), Region.from_mask(_square(60, 60, 20))]
    good = Region.from_mask(_square(12, 10, 20))  # IoU 360/440 with truth 0
    also = Region.from_mask(_square(10, 12, 20))  # as good, lower score: a duplicate
    poor = Region.from_mask(_square(70, 60, 20))  # IoU 200/600 with truth 1: below 0.5
    pairs = match([also, good, poor], [0.6, 0.9, 0.8], truth, threshold=0.5)
    assert pairs == [(1, 0, pytest.approx(360 / 440))]


def test_detection_scores_precision_recall_and_image_accuracy() -> None:
    scores = DetectionScores(threshold=0.5)
    t0, t1 = Region.from_mask(_square(10, 10, 20)), Region.from_mask(_square(60, 60, 20))
    hit, miss = Region.from_mask(_square(11, 11, 20)), Region.from_mask(_square(40, 5, 10))
    # Image 1: two truths, one found with the wrong class, one false alarm -> tp 1, fp 1, fn 1.
    scores.add_image([hit, miss], ["dent", "scratch"], [0.9, 0.7], [t0, t1], ["scratch", "scratch"], verdict_ng=True)
    # Image 2: a clean part passed; image 3: a clean part flagged UNCERTAIN (counts as NG).
    scores.add_image([], [], [], [], [], verdict_ng=False)
    scores.add_image([], [], [], [], [], verdict_ng=True, uncertain=True)
    # Image 4: a defective part missed entirely.
    scores.add_image([], [], [], [t0], ["dent"], verdict_ng=False)
    summary = scores.summary(CLASSES)
    assert (summary["tp"], summary["fp"], summary["fn"]) == (1, 1, 2)
    assert summary["precision"] == pytest.approx(0.5)
    assert summary["recall"] == pytest.approx(1 / 3)
    assert summary["f1"] == pytest.approx(2 * 1 / (2 * 1 + 1 + 2))
    assert summary["class_accuracy"] == 0.0
    assert summary["image_accuracy"] == pytest.approx(2 / 4)
    assert summary["images"] == {"ng_as_ng": 1, "ok_as_ok": 1, "ok_as_ng": 1, "ng_as_ok": 1, "uncertain": 1}
    per_class = summary["per_class"]
    assert per_class["scratch"] == {"precision": 0.0, "recall": 0.5, "n_gt": 2, "n_pred": 1}
    assert per_class["dent"] == {"precision": 1.0, "recall": 0.0, "n_gt": 1, "n_pred": 1}
    assert per_class["pinhole"]["recall"] is None
    json.dumps(summary)


def test_prompted_scores_average_per_class_then_over_classes() -> None:
    scores = PromptedScores()
    truth = Region.from_mask(_square(10, 10, 20))
    scores.add("scratch", Region.from_mask(_square(10, 10, 20)), truth)  # IoU 1
    scores.add("scratch", Region.from_mask(_square(20, 10, 20)), truth)  # IoU 1/3
    scores.add("dent", Region.empty(), truth)  # IoU 0
    summary = scores.summary(CLASSES)
    assert summary["per_class"]["scratch"]["iou"] == pytest.approx(2 / 3)
    assert summary["per_class"]["scratch"]["dice"] == pytest.approx(0.75)
    assert summary["per_class"]["pinhole"] == {"iou": None, "dice": None, "n": 0}
    assert summary["miou"] == pytest.approx((2 / 3 + 0) / 2)
    assert summary["instance_miou"] == pytest.approx((1 + 1 / 3) / 3)
    assert summary["n"] == 3


def test_mask_logits_map_back_to_frame_pixels() -> None:
    """A blob drawn at stride 8 of a letterboxed frame comes back where it was, at frame resolution."""
    frame_mask = np.zeros((450, 800), bool)
    yy, xx = np.mgrid[0:450, 0:800]
    frame_mask[(xx - 500) ** 2 + ((yy - 200) * 1.5) ** 2 < 90**2] = True
    box = Letterbox.fit(800, 450, 256, 128)
    stride = 8
    cells = np.zeros((128 // stride, 256 // stride), np.float32)
    centres_y, centres_x = (np.mgrid[0 : cells.shape[0], 0 : cells.shape[1]] + 0.5) * stride / box.scale
    inside = frame_mask[np.clip(centres_y.astype(int), 0, 449), np.clip(centres_x.astype(int), 0, 799)]
    cells[:] = np.where(inside, 8.0, -8.0)
    region = logits_to_region(cells, box, stride)
    assert iou(region, Region.from_mask(frame_mask)) > 0.85
    assert logits_to_region(np.full_like(cells, -5.0), box, stride).area == 0


# -- model and bundle agree --------------------------------------------------------------------


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """A random-init student whose BatchNorm statistics are set on real frames, and its bundle.

    Freshly initialised, the model's embedding is ~1e-7 and its heatmap flat, so peak picking is
    decided by rounding and a model and its export legitimately differ. Setting the BatchNorm
    statistics on a few frames (no gradient) gives it input-dependent outputs.
    """
    from training.export.onnx import export_bundle
    from training.model.build import build_model

    torch.manual_seed(0)
    model = build_model("student_cnn", height=HW[0], width=HW[1], num_classes=len(CLASSES), k=4)
    frames = build_dataset("synthetic,n=6,seed=100,width=512,height=288")
    batch = collate([prepare_example(frames[i], height=HW[0], width=HW[1], num_classes=3) for i in range(6)])
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average: one pass sets the statistics
    model.train()
    with torch.no_grad():
        embedding, _ = model.embed(batch["image"])
        model.heatmap(embedding)
    model.eval()
    out = tmp_path_factory.mktemp("eval") / "bundle"
    export_bundle(model, "student_cnn", out, name="calibrated", classes=CLASSES,
                  provenance={"weights": "untrained", "notes": "test_eval fixture"})
    return model, out


@pytest.mark.slow
def test_model_and_bundle_evaluations_agree(calibrated: tuple[Any, Path]) -> None:
    from training.eval.evaluate import evaluate_bundle, evaluate_model

    model, bundle = calibrated
    dataset = build_dataset("synthetic,n=5,seed=7,width=512,height=288")
    # Score threshold 0: every peak becomes a defect, so automatic mode has matches to compare.
    post = PostprocessConfig(score_threshold=0.0, uncertain_threshold=0.0)
    by_model = evaluate_model(model, dataset, postprocess=post, batch_size=3)
    by_bundle = evaluate_bundle(bundle, dataset, postprocess=post)
    json.dumps(by_model)
    json.dumps(by_bundle)
    assert by_model["n_images"] == by_bundle["n_images"] == 5
    assert by_model["dataset"] == by_bundle["dataset"] == "synthetic(n=5,seed=7,512x288)"
    pm, pb = by_model["prompted"], by_bundle["prompted"]
    assert pm is not None and pb is not None and pm["n"] == pb["n"] > 0
    assert abs(pm["miou"] - pb["miou"]) < 0.02
    assert abs(pm["mdice"] - pb["mdice"]) < 0.02
    am, ab = by_model["automatic"], by_bundle["automatic"]
    assert am["tp"] + am["fp"] > 0
    for key in ("tp", "fp", "fn"):
        assert abs(am[key] - ab[key]) <= 1, key
    assert am["images"] == ab["images"]
    assert model.training is False  # given back in the mode it came in


@pytest.mark.slow
def test_prompt_masks_from_torch_and_the_decoder_graph_match(calibrated: tuple[Any, Path]) -> None:
    """The two runners' raw prompt logits, on the same embedding and point."""
    from engines.backends import open_engine
    from engines.preprocess import Preprocessor
    from training.data.prepare import input_spec
    from training.eval.evaluate import _EngineRunner, _TorchRunner

    model, bundle = calibrated
    sample = build_dataset("synthetic,n=1,seed=9,width=512,height=288")[0]
    tensor, _ = Preprocessor(input_spec(*HW))(sample.image)
    engine = open_engine(bundle)
    points = np.array([[40.5, 60.5], [200.0, 20.0]], np.float32)
    with torch.inference_mode():
        torch_runner = _TorchRunner(model, CLASSES, input_spec(*HW))
        (outputs_t, handle_t), = torch_runner.infer([tensor])
        masks_t = torch_runner.prompt(handle_t, points)
    engine_runner = _EngineRunner(engine)
    (outputs_e, handle_e), = engine_runner.infer([tensor])
    masks_e = engine_runner.prompt(handle_e, points)
    assert masks_t is not None and masks_e is not None
    np.testing.assert_allclose(outputs_t.heatmap, outputs_e.heatmap, atol=1e-4)
    np.testing.assert_array_equal(outputs_t.points, outputs_e.points)
    for a, b in zip(masks_t, masks_e, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-3)
    engine.close()


# -- the eval command --------------------------------------------------------------------------


@pytest.mark.slow
def test_eval_command_prints_a_table_and_writes_json(
    calibrated: tuple[Any, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, bundle = calibrated
    report = tmp_path / "report.json"
    code, out, _ = run_command_module(eval_command,
        ["eval", "--bundle", str(bundle), "--data", "synthetic,n=3,seed=1,width=384,height=216",
         "--json", str(report)], capsys,
    )
    assert code == 0
    assert "bundle:calibrated (fp32) on synthetic(n=3,seed=1,384x216): 3 image(s)" in out
    assert "mean over classes" in out and "image OK/NG accuracy" in out
    written = json.loads(report.read_text())
    assert written["n_images"] == 3 and set(written) >= {"prompted", "automatic", "dataset"}


def test_eval_command_records_its_figures_in_the_bundle(
    calibrated: tuple[Any, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    from engines.bundle import load_bundle

    _, master = calibrated
    bundle = tmp_path / "bundle"
    shutil.copytree(master, bundle)
    files = load_bundle(bundle).manifest.files
    code, _, err = run_command_module(eval_command,
        ["eval", "--bundle", str(bundle), "--data", "synthetic,n=2,seed=1,width=384,height=216",
         "--record", "synthetic_test"], capsys,
    )
    assert code == 0, err
    manifest = load_bundle(bundle).manifest
    recorded = manifest.metrics["synthetic_test"]
    assert recorded["n_images"] == 2 and recorded["prompted"]["miou"] is not None
    assert set(recorded["automatic"]) >= {"precision", "recall", "image_accuracy"}
    assert "--record synthetic_test" in recorded["command"]
    assert manifest.files == files  # what was measured is what ships
    code, _, err = run_command_module(eval_command,
        ["eval", "--checkpoint", str(tmp_path / "x.pt"), "--data", "synthetic,n=1", "--record", "k"], capsys)
    assert code == 2 and "--record needs --bundle" in err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--bundle", "{tmp}/nope", "--data", "synthetic,n=1"], "bundle directory does not exist"),
        (["--bundle", "{bundle}", "--data", "magnetic_tile:tset"], "key 'split'"),
        (["--bundle", "{bundle}", "--data", "folder,root={tmp}/empty"], "dataset folder does not exist"),
        (["--checkpoint", "{tmp}/missing.pt", "--data", "synthetic,n=1"], "checkpoint does not exist"),
        (["--bundle", "{bundle}", "--data", "synthetic,n=1", "--limit", "0"], "--limit must be at least 1"),
    ],
)
def test_eval_command_bad_input_is_one_line_and_exit_2(
    calibrated: tuple[Any, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], expected: str
) -> None:
    _, bundle = calibrated
    filled = [a.format(tmp=tmp_path, bundle=bundle) for a in argv]
    code, out, err = run_command_module(eval_command, ["eval", *filled], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and expected in err
