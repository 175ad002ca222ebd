"""Metrics on hand-made masks and sizes; a bundle scored through the runtime against truths it must score
perfectly on; the eval command."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from engines.backends import open_engine
from engines.backends.onnxruntime import Config as OrtConfig
from engines.errors import DefectsamError
from engines.inspector import InspectionConfig, Inspector
from engines.windows import semantic_labels
from training.eval.metrics import DetectionScores, Region, SizeScores, dice, instance_size, iou, match

from .conftest import TINY_CLASSES
from .support import run_command_module

torch = pytest.importorskip("torch", reason="evaluating needs the 'train' extra (torch)")

from training.commands import eval as eval_command  # noqa: E402
from training.data.registry import build_dataset  # noqa: E402
from training.eval.evaluate import TargetPrecision, evaluate_bundle  # noqa: E402

CLASSES = ("scratch", "dent", "pinhole")
DATA = "synthetic,n=3,seed=7,width=256,height=192"


def _square(x: int, y: int, side: int, shape: tuple[int, int] = (100, 100)) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[y : y + side, x : x + side] = True
    return mask


# -- metrics -----------------------------------------------------------------------------------


def test_target_precision_ignores_predictions_on_defects_under_the_floor() -> None:
    """Scratches >= 2 px: a hit on a 3 px scratch counts, one on a 1 px hairline (matched or only lying on
    it) counts neither way, a scratch where there is none is a false positive; other classes stay out."""
    wide, hair = Region(0, 0, np.ones((3, 60), bool)), Region(0, 20, np.ones((1, 60), bool))
    truths, classes, sizes = [wide, hair], ["scratch", "scratch"], [("width", 3.0), ("width", 1.0)]
    on_hair_poorly = Region(0, 19, np.ones((4, 30), bool))  # IoU with the hairline 30 / 120: unmatched
    nowhere = Region(0, 60, np.ones((2, 40), bool))
    predictions = [wide, hair, on_hair_poorly, nowhere, Region(80, 80, np.ones((5, 5), bool))]
    predicted = ["scratch", "scratch", "scratch", "scratch", "pinhole"]
    pairs = [(0, 0, 1.0), (1, 1, 1.0)]
    target = TargetPrecision()
    target.add(predictions, predicted, pairs, truths, classes, sizes)
    assert target.counts["scratch"] == [1, 1]
    assert target.precision("scratch") == 0.5
    assert target.counts["pinhole"] == [0, 1] and target.precision("pinhole") == 0.0
    assert TargetPrecision().precision("scratch") is None  # nothing predicted: no figure


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


def test_detection_scores_precision_recall_and_image_rates() -> None:
    scores = DetectionScores(threshold=0.5)
    t0, t1 = Region.from_mask(_square(10, 10, 20)), Region.from_mask(_square(60, 60, 20))
    hit, miss = Region.from_mask(_square(11, 11, 20)), Region.from_mask(_square(40, 5, 10))
    # Image 1: two truths, one found with the wrong class, one false alarm -> tp 1, fp 1, fn 1.
    scores.add_image([hit, miss], ["dent", "scratch"], [0.9, 0.7], [t0, t1], ["scratch", "scratch"], verdict_ng=True)
    # Image 2: a clean part passed; image 3: a clean part flagged UNCERTAIN (rejected, as NG is).
    scores.add_image([], [], [], [], [], verdict_ng=False)
    scores.add_image([], [], [], [], [], verdict_ng=True, uncertain=True)
    # Image 4: a defective part missed entirely.
    scores.add_image([], [], [], [t0], ["dent"], verdict_ng=False)
    summary = scores.summary(CLASSES)
    assert (summary["tp"], summary["fp"], summary["fn"]) == (1, 1, 2)
    assert summary["precision"] == pytest.approx(0.5)
    assert summary["recall"] == pytest.approx(1 / 3)
    assert summary["f1"] == pytest.approx(2 * 1 / (2 * 1 + 1 + 2))
    assert summary["class_accuracy"] == 0.0 and summary["matched_miou"] == pytest.approx(iou(hit, t0))
    assert summary["image_accuracy"] == pytest.approx(2 / 4)
    assert summary["images"] == {"ng_as_ng": 1, "ok_as_ok": 1, "ok_as_ng": 1, "ng_as_ok": 1, "uncertain": 1,
                                 "ok_as_uncertain": 1}
    assert (summary["good_images"], summary["defective_images"]) == (2, 2)
    assert summary["false_reject_rate"] == pytest.approx(0.5)  # the UNCERTAIN clean part is rejected...
    assert summary["false_ng_rate"] == 0.0  # ...but was not called NG
    assert summary["miss_rate"] == pytest.approx(0.5)
    per_class = summary["per_class"]
    assert per_class["scratch"] == {"precision": 0.0, "recall": 0.5, "n_gt": 2, "n_pred": 1}
    assert per_class["dent"] == {"precision": 1.0, "recall": 0.0, "n_gt": 1, "n_pred": 1}
    assert per_class["pinhole"]["recall"] is None
    json.dumps(summary)


def test_instance_sizes_are_widths_of_thin_defects_and_diameters_of_the_others() -> None:
    line = np.zeros((50, 120), bool)
    line[20:22, 5:105] = True  # 2 px wide, 100 long
    kind, width = instance_size(line)
    assert kind == "width" and width == pytest.approx(2.0, abs=0.1)
    assert instance_size(line, nominal=1.7) == ("width", 1.7)  # the generator's nominal width wins
    yy, xx = np.mgrid[0:40, 0:40]
    disk = (xx - 20) ** 2 + (yy - 20) ** 2 <= 7**2
    kind, diameter = instance_size(disk)
    assert kind == "diameter" and diameter == pytest.approx(np.sqrt(4 * disk.sum() / np.pi)) and 13 < diameter < 15
    dot = np.zeros((5, 5), bool)
    dot[2, 2] = True
    assert instance_size(dot) == ("diameter", pytest.approx(np.sqrt(4 / np.pi)))


def test_recall_by_size_and_the_size_it_becomes_reliable_from() -> None:
    sizes = SizeScores()
    for i in range(10):
        sizes.add("scratch", "width", 1.5, i < 2, 0.3)  # hairlines: 2 of 10 found
        sizes.add("scratch", "width", 2.5, True, 0.8)  # 10 of 10
        sizes.add("scratch", "width", 4.5, i < 9, 0.7)  # 9 of 10
        sizes.add("pinhole", "diameter", 2.5, i < 3, 0.2)
    summary = sizes.summary(["scratch", "dent", "pinhole"], pixel_size_um=5.0)
    widths = summary["scratch"]["width"]
    assert [(b["bucket"], b["n"], b["recall"]) for b in widths["buckets"]] == [
        ("1-2 px", 10, 0.2), ("2-3 px", 10, 1.0), ("4-6 px", 10, 0.9)]
    assert widths["buckets"][0]["from_um"] == 5.0 and widths["buckets"][1]["instance_iou"] == pytest.approx(0.8)
    assert widths["found_from_px"] == 2.0 and widths["found_from_um"] == 10.0  # 90% of scratches from 2 px on
    assert summary["pinhole"]["diameter"]["found_from_px"] is None  # never 90%
    assert summary["dent"] == {}
    assert sizes.instance_iou("scratch", min_width=2.0) == {"n": 20, "recall": pytest.approx(19 / 20),
                                                            "instance_iou": pytest.approx(0.75)}
    assert sizes.instance_iou()["n"] == 40
    json.dumps(summary)


# -- a bundle scored through the runtime ---------------------------------------------------------


def _pseudo_truths(bundle: Path, root: Path) -> tuple[Path, Path]:
    """Folders of the dataset's images whose truths are the tiny bundle's own output in tiles mode:
    ``semantic`` holds its per-pixel label maps (label PNGs), ``defects`` its defects (one PNG each)."""
    dataset = build_dataset(DATA)
    engine = open_engine(bundle, OrtConfig(providers=["cpu"]))
    semantic, defects = root / "semantic", root / "defects"
    for folder in (semantic, defects):
        (folder / "images").mkdir(parents=True)
        (folder / "masks").mkdir()
        (folder / "classes.txt").write_text("\n".join(TINY_CLASSES) + "\n")
    try:
        inspector = Inspector(engine, InspectionConfig(mode="tiles"))
        for i in range(len(dataset)):
            image = dataset[i].image
            outputs = inspector.run(inspector.prepare(image))
            canvases = inspector.merge(outputs)
            result = inspector.finish(outputs, canvases)
            name = f"{i:03d}"
            for folder in (semantic, defects):
                cv2.imwrite(str(folder / "images" / f"{name}.png"), image)
            cv2.imwrite(str(semantic / "masks" / f"{name}.png"), semantic_labels(canvases, image.shape[1],
                                                                                  image.shape[0]))
            (defects / "masks" / name).mkdir()
            for j, d in enumerate(result.defects):
                mask = np.zeros(image.shape[:2], np.uint8)
                x, y, w, h = d.bbox
                mask[y : y + h, x : x + w] = d.mask.astype(np.uint8) * 255
                cv2.imwrite(str(defects / "masks" / name / f"{j:02d}_{d.class_name}.png"), mask)
    finally:
        engine.close()
    return semantic, defects


@pytest.fixture(scope="module")
def truths(tiny_bundle_master: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _pseudo_truths(tiny_bundle_master, tmp_path_factory.mktemp("truths"))


@pytest.mark.slow
def test_a_bundle_scores_perfectly_on_its_own_semantic_output(tiny_bundle: Path, truths: tuple[Path, Path]) -> None:
    semantic, _ = truths
    report = evaluate_bundle(tiny_bundle, build_dataset(f"folder,root={semantic}"),
                             inspection=InspectionConfig(mode="tiles"))
    json.dumps(report)
    assert report["n_images"] == 3 and report["mode"] == "tiles" and report["window"] == 64
    assert report["classes"] == list(TINY_CLASSES) and report["model"] == "bundle:tiny-student (fp32)"
    sem = report["semantic"]
    assert sem["aacc"] == 1.0 and sem["pixels"] == 3 * 256 * 192
    present = {name: value for name, value in sem["iou"].items() if value is not None}
    assert len(present) >= 2 and set(present.values()) == {1.0}
    assert sem["miou"] == 1.0 and (sem["miou_fg"] == 1.0 or sem["miou_fg"] is None)
    assert report["timing"]["median_ms"] > 0 and report["timing"]["windows_median"] > 1
    assert report["seconds"] >= 0.0


@pytest.mark.slow
def test_a_bundle_finds_every_one_of_its_own_defects(tiny_bundle: Path, truths: tuple[Path, Path]) -> None:
    _, defects = truths
    dataset = build_dataset(f"folder,root={defects}")
    n_truth = sum(len(dataset[i].masks) for i in range(len(dataset)))
    if n_truth == 0:
        pytest.skip("the random tiny bundle found no defect on the frames")
    report = evaluate_bundle(tiny_bundle, dataset, inspection=InspectionConfig(mode="tiles"), pixel_size_um=10.0)
    auto = report["automatic"]
    assert (auto["tp"], auto["fp"], auto["fn"]) == (n_truth, 0, 0)
    assert auto["precision"] == auto["recall"] == auto["f1"] == 1.0
    assert auto["matched_miou"] == pytest.approx(1.0) and auto["class_accuracy"] == 1.0
    assert auto["miss_rate"] in (0.0, None)
    for kinds in auto["by_size"].values():
        for entry in kinds.values():
            assert all(b["recall"] == 1.0 and "from_um" in b for b in entry["buckets"])


def test_evaluation_refuses_classes_that_are_not_the_bundles(tiny_bundle: Path) -> None:
    renamed = build_dataset("synthetic,n=1,width=128,height=96,class_map.dent=bump")
    with pytest.raises(DefectsamError) as caught:
        evaluate_bundle(tiny_bundle, renamed)
    message = str(caught.value)
    assert "its classes ['scratch', 'bump', 'pinhole'] are not the bundle's" in message and "class_map" in message
    with pytest.raises(DefectsamError, match="--pixel-size-um must be a number of micrometres > 0"):
        evaluate_bundle(tiny_bundle, build_dataset("synthetic,n=1,width=128,height=96"), pixel_size_um=0.0)


# -- the eval command --------------------------------------------------------------------------


@pytest.mark.slow
def test_eval_command_prints_the_tables_and_writes_json(
    tiny_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "report.json"
    code, out, _ = run_command_module(
        eval_command, ["eval", "--bundle", str(tiny_bundle), "--data", DATA, "--limit", "2", "--json", str(report)],
        capsys,
    )
    assert code == 0
    first = out.splitlines()[0]
    assert first.startswith("bundle:tiny-student (fp32) on synthetic(n=3,seed=7,256x192): 2 image(s), mode windows")
    assert "window 64 px" in first
    for heading in ("semantic (dataset-level, as mmsegmentation)", "defects (matched at IoU >= 0.5",
                    "images: OK/NG accuracy", "recall by size"):
        assert heading in out
    written = json.loads(report.read_text())
    assert written["n_images"] == 2 and set(written) >= {"semantic", "automatic", "dataset", "timing", "targets"}
    code, out, _ = run_command_module(
        eval_command, ["eval", "--bundle", str(tiny_bundle), "--data", DATA, "--limit", "1", "--mode", "tiles",
                       "--window", "48"], capsys,
    )
    assert code == 0 and "mode tiles, window 48 px" in out.splitlines()[0]


@pytest.mark.slow
def test_eval_command_records_its_figures_in_the_bundle(
    tiny_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from engines.bundle import load_bundle

    files = load_bundle(tiny_bundle).manifest.files
    code, _, err = run_command_module(
        eval_command, ["eval", "--bundle", str(tiny_bundle), "--data", DATA, "--limit", "2", "--record",
                       "synthetic_test"], capsys,
    )
    assert code == 0, err
    manifest = load_bundle(tiny_bundle).manifest
    recorded = manifest.metrics["synthetic_test"]
    assert recorded["n_images"] == 2 and recorded["mode"] == "windows" and recorded["window"] == 64
    assert set(recorded["semantic"]) == {"miou_fg", "miou", "aacc", "iou"}
    assert set(recorded["automatic"]) >= {"precision", "recall", "image_accuracy", "false_ng_rate", "per_class"}
    assert "--limit 2 --record synthetic_test" in recorded["command"]
    assert manifest.files == files  # what was measured is what ships


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--bundle", "{tmp}/nope", "--data", "synthetic,n=1"], "bundle directory does not exist"),
        (["--bundle", "{bundle}", "--data", "magnetic_tile:tset"], "key 'split'"),
        (["--bundle", "{bundle}", "--data", "folder,root={tmp}/empty"], "dataset folder does not exist"),
        (["--checkpoint", "{tmp}/missing.pt", "--data", "synthetic,n=1"], "checkpoint does not exist"),
        (["--bundle", "{bundle}", "--data", "synthetic,n=1", "--limit", "0"], "--limit must be at least 1"),
        (["--bundle", "{bundle}", "--data", "synthetic,n=1", "--pixel-size-um", "-2"], "--pixel-size-um"),
        (["--bundle", "{bundle}", "--data", "synthetic,n=1", "--window", "100"], "--window/--max-windows"),
        (["--bundle", "{bundle}", "--data", "synthetic,n=1", "--score-threshold", "2"], "--score-threshold"),
        (["--bundle", "{bundle}", "--data", "synthetic,n=1", "--json", "{tmp}"], "--json is a directory"),
        (["--bundle", "{bundle}", "--data", "synthetic,n=1", "--finder", "f.pt"], "--finder goes with --checkpoint"),
        (["--checkpoint", "{tmp}/x.pt", "--data", "synthetic,n=1", "--record", "k"], "--record needs --bundle"),
    ],
)
def test_eval_command_bad_input_is_one_line_and_exit_2(
    tiny_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], expected: str
) -> None:
    filled = [a.format(tmp=tmp_path, bundle=tiny_bundle) for a in argv]
    code, out, err = run_command_module(eval_command, ["eval", *filled], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and expected in err


@pytest.mark.slow
def test_eval_of_a_checkpoint_and_its_finder_runs_through_a_temporary_bundle(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from training.model.build import build_finder, build_model
    from training.model.checkpoint import save_checkpoint

    torch.manual_seed(0)
    segmenter = save_checkpoint(tmp_path / "seg.pt", "student_seg", build_model("student_seg"), classes=list(CLASSES))
    finder = save_checkpoint(tmp_path / "finder.pt", "finder", build_finder())
    code, out, err = run_command_module(
        eval_command, ["eval", "--checkpoint", str(segmenter), "--finder", str(finder), "--data",
                       "synthetic,n=1,seed=3,width=256,height=192", "--window", "64"], capsys,
    )
    assert code == 0, err
    first = out.splitlines()[0]
    assert first.startswith(f"checkpoint:{segmenter} + {finder} on synthetic(n=1,seed=3,256x192): 1 image(s)")
    assert "mode windows" in first and "window 64 px" in first
