"""The reference run (training/reference): the whole driver on a tiny NEU-Seg schedule, its report, resume,
and the pieces that need no run (plan, training configs, reading, the curve's flatness, config errors)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

torch = pytest.importorskip("torch")
pytest.importorskip("matplotlib")

from engines.bundle import load_bundle  # noqa: E402
from training.cli import main  # noqa: E402
from training.config import ConfigError  # noqa: E402
from training.reference.config import load_reference, parse_reference  # noqa: E402
from training.reference.driver import MARKER, ReferenceRun, ReferenceRunError  # noqa: E402
from training.reference.report import curve_reading, reading  # noqa: E402

from .conftest import DATASETS  # noqa: E402
from .support import set_dotted  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
needs_neu = pytest.mark.skipif(not (DATASETS / "neu_seg").is_dir(), reason="NEU-Seg is not in ../shared/datasets")
ROWS = ["teacher", "supervised", "mobilesam", "nofeature", "blog", "blog_int8"]


def tiny(tmp_path: Path, **changes: object) -> dict:
    """A schedule of seconds: 4 NEU training images, one or two steps per run, 64 px crops, two tiny test sets."""
    schedule = {"epochs": 1, "batch_size": 4, "lr": 0.003, "warmup_steps": 1}
    raw: dict = {
        "schedule": "smoke",
        "runs": str(tmp_path / "runs"),
        "window": 64,
        "data": {
            "train": [{"name": "neu_seg", "split": "train", "limit": 4}],
            "val": [{"name": "neu_seg", "split": "val", "limit": 2}],
            "test": {"set_a": "neu_seg:test,limit=3", "set_b": "neu_seg:val,limit=2"},
        },
        "teacher": {"schedule": {**schedule, "epochs": 2}, "eval": {"every": 1, "limit": 2}, "cache_batch_size": 4},
        "student": {"schedule": schedule, "eval": {"limit": 2}},
        "students": [
            {"key": "supervised", "label": "student, supervised", "recipe": "supervised"},
            {"key": "mobilesam", "label": "MobileSAM-style transplant", "recipe": "mobilesam"},
            {"key": "nofeature", "label": "student without the feature term", "recipe": "nofeature"},
            {"key": "blog", "label": "student with the feature term", "recipe": "blog"},
        ],
        "calibrate": {"limit": 2},
        "int8": {"of": "blog", "calib_frames": 2, "held_out_limit": 2, "max_fallback": 0, "max_drop": 100.0},
        "bench": {"frames": 2, "iterations": 2, "warmup": 1, "rounds": 1, "batch": 2},
        "report": {"overlays": 1, "tile": 64},
    }
    return set_dotted(raw, changes)


def write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "reference.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@needs_neu
@pytest.mark.slow
def test_reference_run_end_to_end_then_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config, out, runs = write(tmp_path, tiny(tmp_path)), tmp_path / "report", tmp_path / "runs"
    assert main(["reference", "--config", str(config), "--out", str(out)]) == 0
    first = capsys.readouterr()
    assert "reference run (smoke) written to" in first.out and "on set_a" in first.out

    results = json.loads((out / "results.json").read_text())
    rows = {row["key"]: row for row in results["rows"]}
    assert list(rows) == ROWS
    for key, row in rows.items():
        assert row["parameters"] > 0 and row["graph_bytes"] > 0, key
        assert row["speed"]["images_per_second"] > 0 and row["speed"]["ms_per_window"] > 0, key
        assert row["speed"]["window"] == 64 and row["speed"]["image_hw"] == [200, 200]
        for test in ("set_a", "set_b"):
            # computed from the run: the row's figures are its evaluation report's, through engines/, whole images
            report = json.loads((runs / "eval" / f"{key}__{test}.json").read_text())
            assert report["mode"] == "whole" and report["n_images"] == (3 if test == "set_a" else 2)
            assert isinstance(row["miou_fg"][test], float), (key, test)
            assert row["miou_fg"][test] == report["semantic"]["miou_fg"]
            assert row["semantic"][test]["iou"] == report["semantic"]["iou"]
            assert row["automatic"][test]["recall"] == report["automatic"]["recall"]
            assert {"precision", "recall", "image_accuracy", "miss_rate"} <= set(row["automatic"][test])
    assert results["classes"] == ["Inclusions", "Patches", "Scratches"]
    assert rows["blog_int8"]["precision"] == "int8" and rows["blog"]["precision"] == "fp32"
    assert rows["blog_int8"]["graph_bytes"] < rows["blog"]["graph_bytes"]  # segment.int8.onnx against segment.onnx
    assert rows["teacher"]["parameters"] > rows["blog"]["parameters"]
    assert rows["teacher"]["training"]["epochs"] == 2 and rows["blog"]["training"]["steps"] == 1
    for run in ("teacher", "supervised", "mobilesam", "nofeature", "blog"):
        manifest = load_bundle(runs / "bundles" / run).manifest
        assert manifest.find is None and manifest.segment.window == 64
        assert manifest.thresholds is not None and manifest.thresholds.calibration["mode"] == "whole"
    assert load_bundle(runs / "bundles" / "mobilesam").manifest.provenance.recipe == "mobilesam"

    r = results["reading"]
    assert r["headline"] == "set_a"
    gain = round(100 * (rows["blog"]["miou_fg"]["set_a"] - rows["nofeature"]["miou_fg"]["set_a"]), 2)
    assert r["feature_gain_points"] == gain
    drop = round(100 * (rows["blog"]["miou_fg"]["set_a"] - rows["blog_int8"]["miou_fg"]["set_a"]), 2)
    assert r["int8_drop_points"] == drop and r["int8_gate"]["passed"] is True
    assert set(r["vs_supervised_points"]) == {"mobilesam", "nofeature", "blog"}
    assert r["teacher_curve"]["evaluations"] == 2 and r["teacher_curve"]["verdict"] == "too short"
    assert r["student_teacher_speed_images"] > 0 and r["int8_speedup_window"] > 0

    readme = (out / "README.md").read_text()
    assert "| row | params (M) | graph (MB) | mIoU fg set_a | mIoU fg set_b |" in readme
    for row in rows.values():
        assert f"| {row['label']} |" in readme
    for heading in ("**Teacher's validation curve.**", "**Student vs teacher.**", "**Distillation vs the supervised",
                    "**Feature term.**", "**MobileSAM-style transplant**", "**INT8.**", "**Speed.**"):
        assert heading in readme
    assert "too few evaluations" in readme
    for name in ("curves.png", "teacher_curve.png", "iou_per_class.png", "overlays.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 1_000_000, name
        assert f"]({name})" in readme
    steps = json.loads((runs / "steps.json").read_text())["steps"]
    assert {"train-teacher", "cache-teacher", "train-supervised", "train-mobilesam", "train-blog", "export-teacher",
            "calibrate-blog", "quantize-blog", "eval-blog_int8-set_b", "bench"} <= set(steps)

    # A second invocation finds every step done: nothing is trained, exported or measured again.
    stamps = {p: p.stat().st_mtime_ns for p in [runs / "bench.json", runs / "students" / "blog" / "best.pt",
                                                 runs / "bundles" / "blog" / "segment.int8.onnx"]}
    assert main(["reference", "--config", str(config), "--out", str(out)]) == 0
    second = capsys.readouterr()
    assert second.err.count("skipped") == len(steps)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert json.loads((out / "results.json").read_text())["rows"] == results["rows"]

    assert main(["reference", "--config", str(config), "--out", str(out), "--plan"]) == 0
    assert all(line.startswith("done") for line in capsys.readouterr().out.splitlines())


def test_plan_and_the_training_configs_of_each_row(tmp_path: Path) -> None:
    run = ReferenceRun(parse_reference(tiny(tmp_path)), tmp_path / "out")
    names = [step.name for step in run.steps()]
    assert names[:6] == ["train-teacher", "cache-teacher", "train-supervised", "train-mobilesam", "train-nofeature",
                         "train-blog"]
    assert names.index("export-blog") < names.index("calibrate-teacher") < names.index("quantize-blog")
    assert names.index("quantize-blog") < names.index("eval-teacher-set_a") and names[-1] == "bench"
    assert [row.key for row in run.rows()] == ROWS

    teacher = run.teacher_config()
    assert teacher.recipe.name == "supervised" and teacher.teacher is None and teacher.model.arch == "teacher_seg"
    assert teacher.model.window == 64 and teacher.schedule.epochs == 2 and teacher.eval.every == 1
    students = {s.key: run.student_config(s) for s in run.config.students}
    assert students["supervised"].teacher is None and students["supervised"].recipe.name == "supervised"
    for key in ("nofeature", "blog"):  # from the cache
        assert students[key].teacher is not None and students[key].teacher.cache == tmp_path / "runs" / "cache"
    mobilesam = students["mobilesam"].teacher  # the teacher online: its neck features every step, no cache
    assert mobilesam is not None and mobilesam.cache is None
    assert mobilesam.checkpoint == tmp_path / "runs" / "teacher" / "best.pt"
    assert all(c.model.arch == "student_seg" and c.data.augment and c.data.positive_fraction == 0.5
               for c in students.values())
    # The blog weights stay the recipe's own (0.3 dice) unless the config sets them.
    assert "dice_weight" not in students["blog"].recipe.model_fields_set

    # No cacheable recipe: no cache step. The teacher's INT8 row follows the teacher.
    other = ReferenceRun(parse_reference(tiny(tmp_path, int8__of="teacher", students=[
        {"key": "supervised", "label": "s", "recipe": "supervised"},
        {"key": "kd", "label": "k", "recipe": "kdsam"}])), tmp_path / "out")
    assert "cache-teacher" not in [step.name for step in other.steps()]
    assert [row.key for row in other.rows()] == ["teacher", "teacher_int8", "supervised", "kd"]
    assert other.student_config(other.config.students[1]).teacher.cache is None  # type: ignore[union-attr]


@needs_neu
def test_val_and_test_sets_must_have_the_training_classes(tmp_path: Path) -> None:
    good = ReferenceRun(parse_reference(tiny(tmp_path)), tmp_path / "out")
    good.check_data()
    assert good.classes() == ["Inclusions", "Patches", "Scratches"]
    raw = tiny(tmp_path)
    raw["data"]["test"]["panels"] = "synthetic,n=1,width=64,height=64"
    bad = ReferenceRun(parse_reference(raw), tmp_path / "out", source="ref.yaml")
    with pytest.raises(ConfigError, match=r"^ref.yaml: key 'data.test.panels': its classes \['scratch'") as caught:
        bad.check_data()
    assert "\n" not in str(caught.value)


def test_reading_compares_the_rows_it_names() -> None:
    def row(key: str, kind: str, recipe: str, value: float, run: str | None = None, ips: float = 100.0,
            window_ms: float = 1.0) -> dict:
        return {"key": key, "kind": kind, "recipe": recipe, "run": run or key, "miou_fg": {"a": value, "b": 0.5},
                "speed": {"images_per_second": ips, "ms_per_window": window_ms}}

    rows = [row("teacher", "teacher", "supervised", 0.80, ips=20.0, window_ms=4.0),
            row("supervised", "student", "supervised", 0.70), row("mobilesam", "student", "mobilesam", 0.50),
            row("nofeature", "student", "nofeature", 0.705), row("blog", "student", "blog", 0.75),
            row("blog_int8", "int8", "blog", 0.745, run="blog", ips=150.0, window_ms=0.5)]
    r = reading(rows, ["a", "b"], None, {"verdict": "flat"})
    assert r["headline"] == "a"
    assert r["feature_gain_points"] == 4.5 and r["feature_gain_points_per_test"] == {"a": 4.5, "b": 0.0}
    assert r["student_teacher_ratio"] == 0.938 and r["ratio_met"] is True and r["ratio_trivial"] is False
    assert r["vs_supervised_points"] == {"mobilesam": -20.0, "nofeature": 0.5, "blog": 5.0}
    assert r["int8_drop_points"] == 0.5 and r["int8_met"] is True
    assert r["int8_speedup_images"] == 1.5 and r["int8_speedup_window"] == 2.0
    assert r["transplant_vs_feature_points"] == -25.0 and r["transplant_vs_teacher_points"] == -30.0
    assert r["student_teacher_speed_images"] == 5.0 and r["student_teacher_speed_window"] == 4.0
    # A teacher no better than the supervised student makes the ratio target trivial; so does a rising curve.
    weak = [{**rows[0], "miou_fg": {"a": 0.705}}, *rows[1:]]
    assert reading(weak, ["a"], None, {"verdict": "flat"})["ratio_trivial"] is True
    assert reading(rows, ["a"], None, {"verdict": "still rising"})["ratio_trivial"] is True


def test_the_teacher_curve_reads_flat_or_still_rising() -> None:
    def records(values: list[float]) -> list[dict]:
        return [{"epoch": i + 1, "val_miou_fg": v} for i, v in enumerate(values)]

    flat = curve_reading(records([0.3, 0.5, 0.6, 0.64, 0.65, 0.652, 0.651, 0.653, 0.652, 0.654]))
    assert flat["verdict"] == "flat" and flat["best_epoch"] == 10 and flat["best_in_tail"] is True
    assert flat["recent_gain_points"] == 0.2 and flat["tail_gain_points"] == 0.1
    rising = curve_reading(records([0.3, 0.4, 0.45, 0.5, 0.52, 0.54, 0.56, 0.58, 0.6, 0.62]))
    assert rising["verdict"] == "still rising" and rising["recent_gain_points"] == 6.0
    dipped = curve_reading(records([0.3, 0.6, 0.61, 0.6, 0.58, 0.59, 0.6, 0.6, 0.59, 0.6]))
    assert dipped["verdict"] == "flat" and dipped["best_epoch"] == 3 and not dipped["best_in_tail"]
    assert curve_reading(records([0.3, 0.6]))["verdict"] == "too short"
    assert curve_reading([])["verdict"] == "too short"


@pytest.mark.parametrize(("changes", "key"), [
    ({"int8__of": "nothing"}, r"int8\.of"),
    ({"students": []}, "students"),
    ({"students": [{"key": "teacher", "label": "t", "recipe": "blog"}]}, r"students\.0\.key"),
    ({"students": [{"key": "Blog-2", "label": "t", "recipe": "blog"}]}, r"students\.0\.key"),
    ({"students": [{"key": "blog_int8", "label": "t", "recipe": "blog"}]}, r"students\.0\.key"),
    ({"students": [{"key": "a", "label": "t", "recipe": "blog"}, {"key": "a", "label": "u", "recipe": "blog"}]},
     "distinct"),
    ({"students": [{"key": "a", "label": "t", "recipe": "blog", "judge": {"kind": "contour"}}]},
     r"students\.0\.judge"),
    ({"students": [{"key": "a", "label": "t", "recipe": "judge"}]}, r"students\.0\.recipe"),
    ({"input": {"height": 576}}, "input"),
    ({"teacher__arch": "teacher_vit"}, r"teacher\.arch"),
    ({"teacher__recipe": {"name": "blog"}}, r"teacher\.recipe"),
    ({"teacher__finetune": False}, r"teacher\.finetune"),
    ({"window": 100}, "window"),
    ({"data__test": {"Bad Label": "neu_seg:test"}}, r"data\.test"),
    ({"student__schedule__epochs": 0}, r"student\.schedule\.epochs"),
])
def test_bad_configs_are_one_line_naming_the_key(tmp_path: Path, changes: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key) as caught:
        parse_reference(tiny(tmp_path, **changes), "ref.yaml")
    assert "\n" not in str(caught.value) and str(caught.value).startswith("ref.yaml: ")


def test_the_command_reports_config_errors_and_overrides(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write(tmp_path, tiny(tmp_path))
    assert main(["reference", "--config", str(config), "--out", str(tmp_path / "o"),
                 "--set", "student.schedule.epochs=0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "key 'student.schedule.epochs'" in err
    assert main(["reference", "--config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "missing.yaml: config cannot be read" in capsys.readouterr().err
    overridden = load_reference(config, {"data.train.0.limit": 3, "students.3.label": "changed"})
    assert overridden.data.train[0].limit == 3 and overridden.students[3].label == "changed"
    with pytest.raises(ConfigError, match="index"):
        load_reference(config, {"data.train.5.limit": 3})
    assert main(["reference", "--config", str(config), "--out", str(tmp_path / "o"), "--plan"]) == 0
    plan = capsys.readouterr().out.splitlines()
    assert plan[0].split() == ["pending", "train-teacher"] and len(plan) == len(ReferenceRun(
        load_reference(config), tmp_path / "o").steps())


def test_fresh_refuses_a_directory_it_did_not_make(tmp_path: Path) -> None:
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "precious.txt").write_text("keep me")
    run = ReferenceRun(parse_reference(tiny(tmp_path)), tmp_path / "out", log=lambda m: None)
    with pytest.raises(ReferenceRunError, match=MARKER):
        run.run(fresh=True)
    assert (tmp_path / "runs" / "precious.txt").read_text() == "keep me"
    (tmp_path / "runs" / MARKER).write_text("made by the driver")
    run._clear()  # what --fresh does first
    assert not (tmp_path / "runs").exists()


def test_committed_configs_validate() -> None:
    for name in ("reduced", "full"):
        config = load_reference(REPO / "training" / "configs" / "reference" / f"{name}.yaml")
        assert config.schedule == name and config.window == 128
        assert list(config.data.test) == ["neu_seg"] and config.data.test["neu_seg"] == "neu_seg:test"
        assert [spec.name for spec in config.data.train] == ["neu_seg"]
        assert (config.teacher.arch, config.student.arch) == ("teacher_seg", "student_seg")
        assert [run.recipe for run in config.students] == ["supervised", "mobilesam", "nofeature", "blog"]
        assert config.int8.of == "blog" and config.int8.max_drop == 1.0 and config.teacher.eval.every == 1
        assert config.student.schedule.epochs > config.teacher.schedule.epochs * 0.9
    reduced = load_reference(REPO / "training" / "configs" / "reference" / "reduced.yaml")
    assert (reduced.teacher.schedule.epochs, reduced.student.schedule.epochs) == (16, 20)
    for schedule in (reduced.teacher.schedule, reduced.student.schedule):
        assert schedule.batch_size == 16 and schedule.lr == 0.003 and schedule.warmup_steps > 0
