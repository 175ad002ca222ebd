"""The reference run (training/reference): the whole driver on a tiny synthetic schedule, its report, resume,
and the pieces that need no run (plan, reading, config errors)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

torch = pytest.importorskip("torch")
pytest.importorskip("matplotlib")

from training.cli import main  # noqa: E402
from training.config import ConfigError  # noqa: E402
from training.reference.config import load_reference, parse_reference  # noqa: E402
from training.reference.driver import MARKER, ReferenceRun, ReferenceRunError  # noqa: E402
from training.reference.report import reading  # noqa: E402

from .support import set_dotted  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SYNTH = "width=128,height=72,pixel_scale=1.0,defect_free_prob=0.0"
SPEC = {"name": "synthetic", "width": 128, "height": 72, "pixel_scale": 1.0, "defect_free_prob": 0.0}


def tiny(tmp_path: Path, **changes: object) -> dict:
    raw: dict = {
        "schedule": "smoke",
        "runs": str(tmp_path / "runs"),
        "input": {"height": 64, "width": 128, "k": 2},
        "bench": {"height": 64, "width": 128, "iterations": 2, "warmup": 1, "rounds": 1},
        "data": {
            "train": [{**SPEC, "n": 4, "seed": 0}],
            "val": [{**SPEC, "n": 2, "seed": 100000}],
            "test": {"set_a": f"synthetic,n=2,seed=2000000,{SYNTH}", "set_b": f"synthetic,n=2,seed=2100000,{SYNTH}"},
        },
        "teacher": {"arch": "teacher_cnn", "schedule": {"epochs": 1, "batch_size": 2, "max_steps": 1}},
        "student": {"arch": "student_cnn", "schedule": {"epochs": 1, "batch_size": 2, "max_steps": 1}},
        "students": [
            {"key": "mobilesam", "label": "MobileSAM-style transplant", "recipe": "mobilesam"},
            {"key": "nofeature", "label": "student without the feature term", "recipe": "nofeature"},
            {"key": "blog", "label": "student with the feature term", "recipe": "blog"},
        ],
        "int8": {"of": "blog", "calib_frames": 2, "held_out_limit": 2, "max_fallback": 0, "max_drop": 100.0},
        "calibrate": {"limit": 2},
        "report": {"overlays": 1, "tile_height": 48},
    }
    return set_dotted(raw, changes)


def write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "reference.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.slow
def test_reference_run_end_to_end_then_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config, out, runs = write(tmp_path, tiny(tmp_path)), tmp_path / "report", tmp_path / "runs"
    assert main(["reference", "--config", str(config), "--out", str(out)]) == 0
    first = capsys.readouterr()
    assert "reference run (smoke) written to" in first.out

    results = json.loads((out / "results.json").read_text())
    rows = {row["key"]: row for row in results["rows"]}
    assert list(rows) == ["teacher", "mobilesam", "nofeature", "blog", "blog_int8"]
    for key, row in rows.items():
        assert row["parameters"] > 0 and row["file_bytes"] > 0, key
        assert isinstance(row["fps"], float) and row["fps"] > 0, key
        assert row["bench_input"] == [64, 128]
        for test in ("set_a", "set_b"):
            assert isinstance(row["prompted_miou"][test], float), (key, test)
            assert {"precision", "recall", "f1", "image_accuracy"} <= set(row["automatic"][test])
            # computed from the run: the row's figure is its evaluation report's, through engines/
            report = json.loads((runs / "eval" / f"{key}__{test}.json").read_text())
            assert row["prompted_miou"][test] == report["prompted"]["miou"]
            assert row["automatic"][test]["recall"] == report["automatic"]["recall"]
        assert isinstance(row["prompted_miou"]["mean"], float)
    assert rows["blog_int8"]["precision"] == "int8" and rows["blog"]["precision"] == "fp32"
    assert rows["blog_int8"]["file_bytes"] < rows["blog"]["file_bytes"]  # model.int8.onnx against model.onnx
    assert rows["teacher"]["parameters"] > rows["blog"]["parameters"]
    assert rows["teacher"]["training"]["epochs"] == 1 and rows["blog"]["training"]["steps"] == 1

    r = results["reading"]
    gain = round(100 * (rows["blog"]["prompted_miou"]["mean"] - rows["nofeature"]["prompted_miou"]["mean"]), 2)
    assert r["feature_gain_points"] == gain
    drop = round(100 * (rows["blog"]["prompted_miou"]["mean"] - rows["blog_int8"]["prompted_miou"]["mean"]), 2)
    assert r["int8_drop_points"] == drop and r["int8_gate"]["passed"] is True
    assert r["judge_effect_points"] is None  # no judged run in this config

    readme = (out / "README.md").read_text()
    assert "| row | params (M) | file (MB) | prompted mIoU set_a" in readme
    for row in rows.values():
        assert f"| {row['label']} |" in readme
    assert "**Feature term.**" in readme and "**INT8.**" in readme
    for name in ("loss_curves.png", "iou_per_class.png", "overlays.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 1_000_000, name
        assert f"]({name})" in readme
    steps = json.loads((runs / "steps.json").read_text())["steps"]
    assert {"finetune-teacher", "cache-teacher", "distill-blog", "export-teacher", "quantize-blog",
            "eval-blog_int8-set_b", "bench"} <= set(steps)

    # A second invocation finds every step done: nothing is trained, exported or measured again.
    stamps = {p: p.stat().st_mtime_ns for p in [runs / "bench.json", runs / "students" / "blog" / "best.pt",
                                                 runs / "bundles" / "blog" / "model.int8.onnx"]}
    assert main(["reference", "--config", str(config), "--out", str(out)]) == 0
    second = capsys.readouterr()
    assert second.err.count("skipped") == len(steps)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert json.loads((out / "results.json").read_text())["rows"] == results["rows"]

    assert main(["reference", "--config", str(config), "--out", str(out), "--plan"]) == 0
    assert all(line.startswith("done") for line in capsys.readouterr().out.splitlines())


def test_plan_adds_speed_copies_when_the_benchmark_size_differs(tmp_path: Path) -> None:
    same = ReferenceRun(parse_reference(tiny(tmp_path)), tmp_path / "out")
    names = [step.name for step in same.steps()]
    assert not [n for n in names if "bench-" in n]
    assert names[:2] == ["finetune-teacher", "cache-teacher"] and names[-1] == "bench"

    other = ReferenceRun(parse_reference(tiny(tmp_path, bench__height=576, bench__width=1024)), tmp_path / "out")
    names = [step.name for step in other.steps()]
    assert {"export-bench-teacher", "export-bench-blog", "quantize-bench-blog"} <= set(names)
    assert names.index("quantize-bench-blog") > names.index("quantize-blog")
    rows = other.rows()
    assert other.row_bench_bundle(rows[0]) == tmp_path / "runs" / "bundles-bench" / "teacher"
    # Student runs train from the teacher's cache on un-augmented data; the judged run keeps its judge.
    judged = parse_reference(tiny(tmp_path, students=[
        {"key": "blog", "label": "b", "recipe": "blog"},
        {"key": "blog_judge", "label": "j", "recipe": "blog", "judge": {"kind": "contour", "samples": 4}},
    ]))
    run = ReferenceRun(judged, tmp_path / "out")
    config = run.student_config(judged.students[1])
    assert config.judge.kind == "contour" and config.judge.samples == 4 and not config.data.augment
    assert config.teacher is not None and config.teacher.checkpoint == tmp_path / "runs" / "teacher" / "best.pt"
    assert run.teacher_config().recipe.name == "supervised" and run.teacher_config().data.augment


def test_a_sam2_teacher_has_no_teacher_row_and_no_transplant(tmp_path: Path) -> None:
    raw = tiny(tmp_path, teacher={"kind": "sam2", "checkpoint": str(tmp_path / "sam2-local")},
               students=[{"key": "nofeature", "label": "n", "recipe": "nofeature"},
                         {"key": "blog", "label": "b", "recipe": "blog"}])
    run = ReferenceRun(parse_reference(raw), tmp_path / "out")
    assert [row.key for row in run.rows()] == ["nofeature", "blog", "blog_int8"]
    assert run.teacher_checkpoint() == tmp_path / "runs" / "teacher" / "sam2"  # finetune_sam2 writes it there
    assert run.teacher_config().teacher.kind == "sam2"  # type: ignore[union-attr]
    student = run.student_config(run.config.students[1]).teacher
    assert student is not None and student.kind == "sam2" and student.checkpoint == run.teacher_checkpoint()
    assert "export-teacher" not in [step.name for step in run.steps()]


def test_reading_compares_the_rows_it_names() -> None:
    def row(key: str, kind: str, recipe: str, mean: float, judge: str = "none", run: str | None = None) -> dict:
        return {"key": key, "kind": kind, "recipe": recipe, "judge": judge, "run": run or key,
                "prompted_miou": {"a": mean, "mean": mean}}

    rows = [row("teacher", "teacher", "supervised", 0.80), row("mobilesam", "student", "mobilesam", 0.50),
            row("nofeature", "student", "nofeature", 0.60), row("blog", "student", "blog", 0.75),
            row("blog_int8", "int8", "blog", 0.745, run="blog"),
            row("blog_judge", "student", "blog", 0.77, judge="contour")]
    r = reading(rows, ["a"], None)
    assert r["feature_gain_points"] == 15.0 and r["feature_gain_points_per_test"] == {"a": 15.0}
    assert r["student_teacher_ratio"] == 0.938 and r["ratio_met"] is True
    assert r["int8_drop_points"] == 0.5 and r["int8_met"] is True
    assert r["judge_effect_points"] == 2.0 and r["transplant_vs_feature_points"] == -25.0


def test_config_errors_are_one_line_naming_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write(tmp_path, tiny(tmp_path))
    assert main(["reference", "--config", str(config), "--out", str(tmp_path / "o"),
                 "--set", "student.schedule.epochs=0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "key 'student.schedule.epochs'" in err
    with pytest.raises(ConfigError, match=r"int8\.of"):
        parse_reference(tiny(tmp_path, int8__of="nothing"))
    with pytest.raises(ConfigError, match="students"):
        parse_reference(tiny(tmp_path, students=[]))
    with pytest.raises(ConfigError, match="mobilesam"):
        parse_reference(tiny(tmp_path, teacher={"kind": "sam2", "checkpoint": str(tmp_path)}))
    overridden = load_reference(config, {"data.train.0.n": 3, "students.2.label": "changed"})
    assert overridden.data.train[0].n == 3 and overridden.students[2].label == "changed"  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="index"):
        load_reference(config, {"data.train.5.n": 3})


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
        assert config.schedule == name
        assert (config.bench.height, config.bench.width) == (576, 1024)
        assert list(config.data.test) == ["magnetic_tile", "neu_seg"]
        assert [run.recipe for run in config.students][:3] == ["mobilesam", "nofeature", "blog"]
