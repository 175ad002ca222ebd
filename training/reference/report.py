"""The reference run's report: ``results.json``, ``README.md`` (the table and its reading) and the plots.

Everything here is computed from what the steps left in RUNS (training logs, bundles, evaluation
reports, the benchmark); nothing is typed in. The headline metric is the semantic foreground mIoU
(dataset-level IoU per defect class, mean over the classes) on the first test set, in points (x100):

    teacher curve       the teacher's val curve: still rising or flat at its last epochs (``curve_reading``)
    student / teacher   the student with the feature term / teacher (target >= 0.92, the field report's 0.84 / 0.91)
    vs supervised       each distilled student - the supervised student (what distillation adds)
    feature term        student with the cosine term - student without it (the field report: +13)
    transplant          the MobileSAM-style transplant - the student with the feature term
    INT8                the INT8 row's source - the INT8 row (target <= 1 point), and its speed-up

One seed per row: a difference under ``NOISE_POINTS`` is read as noise, and the reading says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engines.atomic import write_text_atomic
from engines.bundle import load_bundle, utc_now
from engines.errors import DefectsamError
from training.reference.config import FIELD_REPORT

if TYPE_CHECKING:
    from training.reference.driver import ReferenceRun, Row

RATIO_TARGET = 0.92
INT8_TARGET_POINTS = 1.0
#: Differences between single-seed rows smaller than this (points of mIoU) are read as noise.
NOISE_POINTS = 1.0
#: The teacher's curve is still rising when its best of the last ``RISING_EVALS`` evaluations, or of the last
#: ``RISING_TAIL`` of its epochs, beats every evaluation before them by more than ``RISING_POINTS``.
RISING_TAIL = 0.2
RISING_EVALS = 3
RISING_POINTS = 0.5
AUTOMATIC_KEYS = ("precision", "recall", "f1", "tp", "fp", "fn", "image_accuracy", "false_ng_rate",
                  "false_reject_rate", "miss_rate", "good_images", "defective_images")
VAL_KEY = "val_miou_fg"


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``; None when the file is missing, unreadable or not an object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The epoch records of a run's metrics.jsonl (the last record of an epoch wins after a resume)."""
    by_epoch: dict[int, dict[str, Any]] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("epoch"), int):
            by_epoch[record["epoch"]] = record
    return [by_epoch[e] for e in sorted(by_epoch)]


def val_curve(records: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(epoch, validation foreground mIoU) of every evaluated epoch."""
    return [(r["epoch"], float(r[VAL_KEY])) for r in records if isinstance(r.get(VAL_KEY), int | float)]


def _gain(recent: list[float], earlier: list[float]) -> float | None:
    return round(100.0 * (max(recent) - max(earlier)), 2) if recent and earlier else None


def curve_reading(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Whether a run's validation curve still rose at its end: ``verdict`` "still rising", "flat" or "too short".

    tail_gain: best val in the last RISING_TAIL of the epochs run - best before them; recent_gain: best of the
    last RISING_EVALS evaluations - best before them (points). Still rising when either exceeds RISING_POINTS.
    """
    curve = val_curve(records)
    out: dict[str, Any] = {"evaluations": len(curve), "epochs": records[-1]["epoch"] if records else 0,
                           "tail_fraction": RISING_TAIL, "recent_evaluations": RISING_EVALS,
                           "rising_points": RISING_POINTS}
    if not curve:
        return {**out, "verdict": "too short"}
    best_epoch, best = max(curve, key=lambda item: (item[1], -item[0]))
    tail_start = out["epochs"] * (1.0 - RISING_TAIL)
    tail = [v for e, v in curve if e > tail_start]
    before_tail = [v for e, v in curve if e <= tail_start]
    values = [v for _, v in curve]
    out.update(best=best, best_epoch=best_epoch, best_in_tail=best_epoch > tail_start, last=values[-1],
               tail_gain_points=_gain(tail, before_tail),
               recent_gain_points=_gain(values[-RISING_EVALS:], values[:-RISING_EVALS]))
    if len(curve) <= RISING_EVALS:
        out["verdict"] = "too short"
        return out
    gains = [g for g in (out["tail_gain_points"], out["recent_gain_points"]) if g is not None]
    out["verdict"] = "still rising" if any(g > RISING_POINTS for g in gains) else "flat"
    return out


def training_summary(run_dir: Path, seconds: float | None) -> dict[str, Any]:
    records = read_metrics(run_dir / "metrics.jsonl")
    summary: dict[str, Any] = {"run": str(run_dir), "epochs": len(records), "step_seconds": seconds}
    if not records:
        return summary
    last = records[-1]
    summary["steps"] = last.get("step")
    summary["final_train_loss"] = last.get("train_loss")
    curve = val_curve(records)
    if curve:
        best_epoch, best = max(curve, key=lambda item: (item[1], -item[0]))
        summary.update(best_val_miou_fg=best, best_epoch=best_epoch, last_val_miou_fg=curve[-1][1])
    summary["curve"] = curve_reading(records)
    summary["log"] = [{"epoch": r["epoch"], "train_loss": r.get("train_loss"), "val_miou_fg": r.get(VAL_KEY)}
                      for r in records]
    return summary


def _bundle_facts(path: Path | None, precision: str) -> dict[str, Any]:
    if path is None:
        return {"error": "no bundle"}
    try:
        bundle = load_bundle(path)
        segment, _ = bundle.graphs_at(precision)
    except DefectsamError as exc:
        return {"error": str(exc)}
    facts: dict[str, Any] = {"arch": bundle.manifest.segment.arch, "parameters": bundle.manifest.parameters,
                             "bundle": str(bundle.path), "graph_bytes": segment.stat().st_size}
    if bundle.manifest.thresholds is not None:
        facts["score_threshold"] = bundle.manifest.thresholds.score_threshold
    return facts


def _row_result(run: ReferenceRun, row: Row, bench: dict[str, Any], steps: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {"key": row.key, "label": row.label, "kind": row.kind, "run": row.run,
                              "precision": row.precision, "recipe": row.recipe}
    result.update(_bundle_facts(run.row_bundle(row), row.precision))
    miou_fg: dict[str, float | None] = {}
    semantic: dict[str, dict[str, Any]] = {}
    automatic: dict[str, dict[str, Any]] = {}
    for test in run.config.data.test:
        report = read_json(run.eval_path(row.key, test))
        if report is None:
            miou_fg[test] = None
            continue
        s = report.get("semantic") or {}
        miou_fg[test] = s.get("miou_fg")
        semantic[test] = {key: s.get(key) for key in ("miou_fg", "miou", "aacc", "iou")}
        auto = report.get("automatic") or {}
        automatic[test] = {key: auto.get(key) for key in AUTOMATIC_KEYS}
        automatic[test]["n_images"] = report.get("n_images")
    result["miou_fg"] = miou_fg
    result["semantic"] = semantic
    result["automatic"] = automatic
    timed = (bench.get("rows") or {}).get(row.key)
    if timed:
        result["speed"] = {key: timed.get(key) for key in ("images_per_second", "ms_per_image_p50",
                                                           "segment_ms_per_image", "ms_per_window",
                                                           "ms_per_extra_window", "window", "image_hw")}
    if row.kind != "int8":
        seconds = (steps.get(f"train-{row.run}") or {}).get("seconds")
        result["training"] = training_summary(run.run_dir(row.run), seconds)
    reported = row.kind if row.kind == "teacher" else row.recipe if row.kind == "student" else ""
    result["field_report_iou"] = FIELD_REPORT.get(reported)
    return result


def _pick(rows: list[dict[str, Any]], recipe: str) -> dict[str, Any] | None:
    return next((row for row in rows if row["kind"] == "student" and row["recipe"] == recipe), None)


def _points(a: dict[str, Any] | None, b: dict[str, Any] | None, test: str) -> float | None:
    """(a - b) in points of semantic foreground mIoU on ``test``; None when either is missing."""
    if a is None or b is None:
        return None
    x, y = a["miou_fg"].get(test), b["miou_fg"].get(test)
    if x is None or y is None:
        return None
    return round(100.0 * (x - y), 2)


def _speed(row: dict[str, Any] | None, key: str) -> float | None:
    value = ((row or {}).get("speed") or {}).get(key)
    return float(value) if isinstance(value, int | float) else None


def _ratio(a: float | None, b: float | None, digits: int = 2) -> float | None:
    return round(a / b, digits) if a is not None and b else None


def reading(rows: list[dict[str, Any]], tests: list[str], quantize: dict[str, Any] | None,
            teacher_curve: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every comparison the README reads, on the headline test set (``tests[0]``) and per test set."""
    headline = tests[0]
    teacher = next((r for r in rows if r["kind"] == "teacher"), None)
    supervised, mobilesam = _pick(rows, "supervised"), _pick(rows, "mobilesam")
    blog, nofeature = _pick(rows, "blog"), _pick(rows, "nofeature")
    int8 = next((r for r in rows if r["kind"] == "int8"), None)
    int8_source = next((r for r in rows if int8 is not None and r["key"] == int8["run"] and r["kind"] != "int8"), None)
    out: dict[str, Any] = {"headline": headline, "noise_points": NOISE_POINTS, "rows_compared": {
        "teacher": teacher and teacher["key"], "supervised": supervised and supervised["key"],
        "with_feature": blog and blog["key"], "without_feature": nofeature and nofeature["key"],
        "transplant": mobilesam and mobilesam["key"], "int8": int8 and int8["key"],
        "int8_source": int8_source and int8_source["key"],
    }}
    out["teacher_curve"] = teacher_curve

    ratio = None
    if blog and teacher and blog["miou_fg"].get(headline) is not None and teacher["miou_fg"].get(headline):
        ratio = round(blog["miou_fg"][headline] / teacher["miou_fg"][headline], 3)
    out["student_teacher_ratio"] = ratio
    out["ratio_target"] = RATIO_TARGET
    out["ratio_met"] = None if ratio is None else ratio >= RATIO_TARGET
    out["student_teacher_gap_points"] = _points(teacher, blog, headline)
    out["teacher_vs_supervised_points"] = _points(teacher, supervised, headline)
    # Met only trivially: the teacher is no better than a student trained without it, or it was still learning.
    weak = out["teacher_vs_supervised_points"] is not None and out["teacher_vs_supervised_points"] < NOISE_POINTS
    rising = (teacher_curve or {}).get("verdict") == "still rising"
    out["ratio_trivial"] = bool(out["ratio_met"]) and (weak or rising)

    out["vs_supervised_points"] = {r["key"]: _points(r, supervised, headline)
                                   for r in (mobilesam, nofeature, blog) if r is not None}
    out["feature_gain_points"] = _points(blog, nofeature, headline)
    out["feature_gain_points_per_test"] = {t: _points(blog, nofeature, t) for t in tests}
    out["transplant_vs_feature_points"] = _points(mobilesam, blog, headline)
    out["transplant_vs_teacher_points"] = _points(mobilesam, teacher, headline)

    drop = _points(int8_source, int8, headline)
    out["int8_drop_points"] = drop
    out["int8_drop_points_per_test"] = {t: _points(int8_source, int8, t) for t in tests}
    out["int8_target_points"] = INT8_TARGET_POINTS
    out["int8_met"] = None if drop is None else drop <= INT8_TARGET_POINTS
    out["int8_speedup_images"] = _ratio(_speed(int8, "images_per_second"), _speed(int8_source, "images_per_second"))
    out["int8_speedup_window"] = _ratio(_speed(int8_source, "ms_per_window"), _speed(int8, "ms_per_window"))
    if quantize is not None:
        out["int8_gate"] = quantize

    student = blog or supervised
    out["speed_student"] = student and student["key"]
    out["student_teacher_speed_images"] = _ratio(_speed(student, "images_per_second"),
                                                 _speed(teacher, "images_per_second"))
    out["student_teacher_speed_window"] = _ratio(_speed(teacher, "ms_per_window"), _speed(student, "ms_per_window"))
    out["field_report"] = {
        "iou": dict(FIELD_REPORT), "feature_gain_points": 13.0,
        "student_teacher_ratio": round(FIELD_REPORT["blog"] / FIELD_REPORT["teacher"], 3),
    }
    return out


def _quantize_record(run: ReferenceRun) -> dict[str, Any] | None:
    quantize = read_json(run.quantize_path)
    if quantize is None or not quantize.get("bundle"):
        return quantize
    try:
        record = load_bundle(quantize["bundle"]).manifest.metrics.get("quantization", {})
    except DefectsamError:
        return quantize
    return {**quantize, "gate_drop_points_val": record.get("drop_points"),
            "fallback_rounds": record.get("fallback_rounds"), "held_out": record.get("held_out"),
            "kept_fp32_groups": (record.get("kept_fp32") or {}).get("groups"),
            "agreement_with_fp32": record.get("agreement_with_fp32")}


def collect(run: ReferenceRun) -> dict[str, Any]:
    """results.json's content (without ``plots``)."""
    config = run.config
    bench = read_json(run.bench_path) or {}
    steps = (read_json(run.steps_path) or {}).get("steps", {})
    rows = [_row_result(run, row, bench, steps) for row in run.rows()]
    tests = list(config.data.test)
    teacher = next(row for row in rows if row["kind"] == "teacher")
    classes = next((list(r["semantic"][t]["iou"]) for r in rows for t in r["semantic"] if r["semantic"][t].get("iou")),
                   [])
    return {
        "schedule": config.schedule,
        "config": str(run.source),
        "written": utc_now(),
        "command": f"defectsam-train reference --config {run.source} --out {run.out}",
        "window": config.window,
        "mode": "whole",
        "headline": config.headline,
        "train": [spec.model_dump(mode="json") for spec in config.data.train],
        "test_sets": dict(config.data.test),
        "classes": [c for c in classes if c != "background"],
        "teacher": {"arch": config.teacher.arch, "checkpoint": str(run.checkpoint("teacher")),
                    "training": teacher.get("training")},
        "rows": rows,
        "reading": reading(rows, tests, _quantize_record(run), (teacher.get("training") or {}).get("curve")),
        "bench": {"settings": config.bench.model_dump(), "measured": bench.get("measured"),
                  "machine": bench.get("machine"), "frames": bench.get("frames")},
        "steps": {name: record.get("seconds") for name, record in steps.items()},
        "total_step_seconds": round(sum(float(r.get("seconds") or 0) for r in steps.values()), 1),
    }


def write_report(run: ReferenceRun) -> dict[str, Any]:
    """results.json, the plots and README.md in ``run.out``; returns the results."""
    from training.reference import plots
    from training.reference.markdown import markdown

    results = collect(run)
    run.out.mkdir(parents=True, exist_ok=True)
    made = plots.write_plots(run, results, run.out)
    results["plots"] = sorted(made)
    write_text_atomic(run.out / "results.json", json.dumps(results, indent=2) + "\n")
    write_text_atomic(run.out / "README.md", markdown(results))
    run.log(f"report written to {run.out}: results.json, README.md, {', '.join(sorted(made))}")
    return results
