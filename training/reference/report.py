"""The reference run's report: ``results.json``, ``README.md`` (the table and its reading) and the plots.

Everything here is computed from what the steps left in RUNS (training logs, bundles, evaluation
reports, the benchmark); nothing is typed in. The reading compares the rows by the mean over the test
sets of each set's prompted mIoU (mean over classes present), in points (x100):

    feature-term gain   student with the cosine term - student without it
    student / teacher   student with the term / teacher (target >= 0.92, the field report's 0.84 / 0.91)
    INT8 drop           the INT8 row's source - the INT8 row (target <= 1 point)
    judge effect        the run with the judge loop - the same recipe without it
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engines.atomic import write_text_atomic
from engines.bundle import load_bundle, utc_now
from engines.errors import DefectsamError
from training.eval.metrics import format_cell as _fmt
from training.reference.config import FIELD_REPORT

if TYPE_CHECKING:
    from training.reference.driver import ReferenceRun, Row

RATIO_TARGET = 0.92
INT8_TARGET_POINTS = 1.0
AUTOMATIC_KEYS = ("precision", "recall", "f1", "image_accuracy", "tp", "fp", "fn")


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``; None when the file is missing, unreadable or not an object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if isinstance(v, int | float)]
    return sum(present) / len(present) if present else None


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


def training_summary(run_dir: Path, seconds: float | None) -> dict[str, Any]:
    records = read_metrics(run_dir / "metrics.jsonl")
    summary: dict[str, Any] = {"run": str(run_dir), "epochs": len(records), "step_seconds": seconds}
    if not records:
        return summary
    last = records[-1]
    summary["steps"] = last.get("step")
    summary["final_train_loss"] = last.get("train_loss")
    scored = [r for r in records if isinstance(r.get("val_miou"), int | float)]
    if scored:
        best = max(scored, key=lambda r: r["val_miou"])
        summary["best_val_miou"] = best["val_miou"]
        summary["best_epoch"] = best["epoch"]
    judged = [r for r in records if "judge_cases" in r]
    if judged:
        summary["judge"] = {
            "passes": len(judged),
            **{key: sum(int(r.get(key) or 0) for r in judged)
               for key in ("judge_cases", "judge_judged", "judge_student", "judge_teacher", "judge_tie",
                           "judge_abstain")},
            "judge_weighted_last": judged[-1].get("judge_weighted"),
            "judge_truth_agreement_last": judged[-1].get("judge_truth_agreement"),
        }
    return summary


def _row_result(run: ReferenceRun, row: Row, bench: dict[str, Any], steps: dict[str, Any]) -> dict[str, Any]:
    config = run.config
    result: dict[str, Any] = {
        "key": row.key, "label": row.label, "kind": row.kind, "run": row.run, "precision": row.precision,
        "recipe": row.recipe, "judge": row.judge,
    }
    path = run.row_bundle(row)
    bench_path = run.row_bench_bundle(row)
    try:
        bundle = load_bundle(path) if path is not None else None
        bench_bundle = load_bundle(bench_path) if bench_path is not None else None
    except DefectsamError as exc:
        result["error"] = str(exc)
        bundle = bench_bundle = None
    if bundle is not None:
        result.update(arch=bundle.manifest.arch, parameters=bundle.manifest.parameters, bundle=str(bundle.path))
        if bundle.manifest.thresholds is not None:
            result["score_threshold"] = bundle.manifest.thresholds.score_threshold
    if bench_bundle is not None:
        try:
            fused, decoder = bench_bundle.graphs_at(row.precision)
            result["file_bytes"] = fused.stat().st_size
            result["decoder_bytes"] = decoder.stat().st_size if decoder is not None else None
        except DefectsamError as exc:
            result["error"] = str(exc)
    prompted: dict[str, float | None] = {}
    per_class: dict[str, dict[str, Any]] = {}
    automatic: dict[str, dict[str, Any]] = {}
    for test in config.data.test:
        report = read_json(run.eval_path(row.key, test))
        if report is None:
            prompted[test] = None
            continue
        p = report.get("prompted") or {}
        prompted[test] = p.get("miou")
        per_class[test] = {name: {"iou": c.get("iou"), "n": c.get("n")}
                           for name, c in (p.get("per_class") or {}).items() if c.get("n")}
        auto = report.get("automatic") or {}
        automatic[test] = {key: auto.get(key) for key in AUTOMATIC_KEYS}
        automatic[test]["n_images"] = report.get("n_images")
    result["prompted_miou"] = {**prompted, "mean": _mean(list(prompted.values()))}
    result["per_class_iou"] = per_class
    result["automatic"] = automatic
    timed = bench.get("rows", {}).get(row.key)
    if timed:
        result["fps"] = timed.get("fps_median")
        result["latency_ms_p50"] = timed.get("latency_ms_p50")
        result["bench_input"] = timed.get("input_hw")
    if row.kind != "int8":
        run_dir = run.teacher_dir if row.run == "teacher" else run.student_dir(row.run)
        step = "finetune-teacher" if row.run == "teacher" else f"distill-{row.run}"
        result["training"] = training_summary(run_dir, (steps.get(step) or {}).get("seconds"))
    reported = {"teacher": "teacher", "student": row.recipe if row.judge == "none" else ""}.get(row.kind, "")
    result["field_report_iou"] = FIELD_REPORT.get(reported)
    return result


def _pick(rows: list[dict[str, Any]], recipe: str, *, kind: str = "student", judged: bool = False) -> dict | None:
    for row in rows:
        if row["kind"] == kind and row["recipe"] == recipe and (row["judge"] != "none") == judged:
            return row
    return None


def _points(a: dict | None, b: dict | None, test: str = "mean") -> float | None:
    """(a - b) in points of prompted mIoU, None when either is missing."""
    if a is None or b is None:
        return None
    x, y = a["prompted_miou"].get(test), b["prompted_miou"].get(test)
    if x is None or y is None:
        return None
    return round(100.0 * (x - y), 2)


def reading(rows: list[dict[str, Any]], tests: list[str], quantize: dict[str, Any] | None) -> dict[str, Any]:
    teacher = next((r for r in rows if r["kind"] == "teacher"), None)
    blog, nofeature = _pick(rows, "blog"), _pick(rows, "nofeature")
    mobilesam, judged = _pick(rows, "mobilesam"), _pick(rows, "blog", judged=True)
    int8 = next((r for r in rows if r["kind"] == "int8"), None)
    int8_source = next((r for r in rows if int8 is not None and r["key"] == int8["run"]), None)
    out: dict[str, Any] = {"rows_compared": {
        "teacher": teacher and teacher["key"], "with_feature": blog and blog["key"],
        "without_feature": nofeature and nofeature["key"], "transplant": mobilesam and mobilesam["key"],
        "int8": int8 and int8["key"], "judge": judged and judged["key"],
    }}
    out["feature_gain_points"] = _points(blog, nofeature)
    out["feature_gain_points_per_test"] = {t: _points(blog, nofeature, t) for t in tests}
    ratio = None
    if blog and teacher and blog["prompted_miou"]["mean"] is not None and teacher["prompted_miou"]["mean"]:
        ratio = round(blog["prompted_miou"]["mean"] / teacher["prompted_miou"]["mean"], 3)
    out["student_teacher_ratio"] = ratio
    out["ratio_target"] = RATIO_TARGET
    out["ratio_met"] = None if ratio is None else ratio >= RATIO_TARGET
    out["student_teacher_gap_points"] = _points(teacher, blog)
    drop = _points(int8_source, int8)
    out["int8_drop_points"] = drop
    out["int8_drop_points_per_test"] = {t: _points(int8_source, int8, t) for t in tests}
    out["int8_target_points"] = INT8_TARGET_POINTS
    out["int8_met"] = None if drop is None else drop <= INT8_TARGET_POINTS
    if quantize is not None:
        out["int8_gate"] = quantize
    out["transplant_vs_feature_points"] = _points(mobilesam, blog)
    out["judge_effect_points"] = _points(judged, blog)
    out["judge_effect_points_per_test"] = {t: _points(judged, blog, t) for t in tests}
    out["field_report"] = {
        "iou": dict(FIELD_REPORT), "feature_gain_points": 13.0,
        "student_teacher_ratio": round(FIELD_REPORT["blog"] / FIELD_REPORT["teacher"], 3),
    }
    return out


def collect(run: ReferenceRun) -> dict[str, Any]:
    config = run.config
    bench = read_json(run.bench_path) or {}
    steps = (read_json(run.steps_path) or {}).get("steps", {})
    quantize = read_json(run.quantize_path)
    if quantize is not None and quantize.get("bundle"):
        try:
            record = load_bundle(quantize["bundle"]).manifest.metrics.get("quantization", {})
            quantize = {**quantize, "gate_drop_points_val": record.get("drop_points"),
                        "fallback_rounds": record.get("fallback_rounds"),
                        "kept_fp32_groups": record.get("kept_fp32", {}).get("groups")}
        except DefectsamError:
            pass
    rows = [_row_result(run, row, bench, steps) for row in run.rows()]
    tests = list(config.data.test)
    return {
        "schedule": config.schedule,
        "config": str(run.source),
        "written": utc_now(),
        "command": f"defectsam-train reference --config {run.source} --out {run.out}",
        "input": config.input.model_dump(),
        "bench": {**config.bench.model_dump(), "measured": bench.get("measured"), "machine": bench.get("machine")},
        "test_sets": dict(config.data.test),
        "teacher": {
            "kind": config.teacher.kind, "arch": run.teacher_arch(), "checkpoint": str(run.teacher_checkpoint()),
            "training": training_summary(run.teacher_dir, (steps.get("finetune-teacher") or {}).get("seconds")),
        },
        "rows": rows,
        "reading": reading(rows, tests, quantize),
        "steps": {name: record.get("seconds") for name, record in steps.items()},
        "total_step_seconds": round(sum(float(r.get("seconds") or 0) for r in steps.values()), 1),
    }


def write_report(run: ReferenceRun) -> dict[str, Any]:
    """results.json, the plots and README.md in ``run.out``; returns the results."""
    from training.reference import plots

    results = collect(run)
    run.out.mkdir(parents=True, exist_ok=True)
    made = plots.write_plots(run, results, run.out)
    results["plots"] = sorted(made)
    write_text_atomic(run.out / "results.json", json.dumps(results, indent=2) + "\n")
    write_text_atomic(run.out / "README.md", markdown(results))
    run.log(f"report written to {run.out}: results.json, README.md, {', '.join(sorted(made))}")
    return results


# -- markdown ---------------------------------------------------------------------------------------
def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1f}"


def _gap(points: float | None) -> str:
    if points is None:
        return "gap not measured"
    return f"{abs(points):.1f} points {'behind' if points >= 0 else 'ahead'}"


def _mb(value: Any) -> str:
    return "-" if not isinstance(value, int | float) else f"{value / 1e6:.2f}"


def _met(flag: bool | None) -> str:
    return "not measured" if flag is None else ("**met**" if flag else "**not met**")


def table(results: dict[str, Any]) -> list[str]:
    tests = list(results["test_sets"])
    bench = results["bench"]
    header = ["row", "params (M)", "file (MB)"]
    header += [f"prompted mIoU {t}" for t in tests] + ["prompted mIoU mean"]
    header += [f"auto P / R {t}" for t in tests]
    header += [f"FPS ({bench['height']}x{bench['width']})", "field report IoU"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for row in results["rows"]:
        params = row.get("parameters")
        cells = [row["label"], "-" if params is None else f"{params / 1e6:.2f}", _mb(row.get("file_bytes"))]
        cells += [_fmt(row["prompted_miou"].get(t)) for t in tests] + [f"**{_fmt(row['prompted_miou'].get('mean'))}**"]
        for t in tests:
            auto = row["automatic"].get(t) or {}
            cells.append(f"{_fmt(auto.get('precision'), 2)} / {_fmt(auto.get('recall'), 2)}")
        cells += [_fmt(row.get("fps"), 1), _fmt(row.get("field_report_iou"), 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def reading_lines(results: dict[str, Any]) -> list[str]:
    r = results["reading"]
    rows = {row["key"]: row for row in results["rows"]}
    names = r["rows_compared"]

    def iou(key: str | None) -> str:
        return _fmt(rows[key]["prompted_miou"]["mean"]) if key in rows else "-"

    lines = []
    per_test = ", ".join(f"{t} {_signed(v)}" for t, v in r["feature_gain_points_per_test"].items())
    lines.append(
        f"- **Feature term.** With the cosine term the student reaches {iou(names['with_feature'])}, without it "
        f"{iou(names['without_feature'])}: {_signed(r['feature_gain_points'])} points of mean prompted mIoU "
        f"({per_test}). The field report had +13 (0.84 vs 0.71)."
    )
    lines.append(
        f"- **Student vs teacher.** {iou(names['with_feature'])} / {iou(names['teacher'])} = "
        f"{_fmt(r['student_teacher_ratio'])} of the teacher ({_gap(r['student_teacher_gap_points'])}); "
        f"target >= {r['ratio_target']}: {_met(r['ratio_met'])}. The field report: 0.84 / 0.91 = "
        f"{r['field_report']['student_teacher_ratio']}."
    )
    gate = r.get("int8_gate") or {}
    gate_text = ""
    if gate:
        verdict = "passed" if gate.get("passed") else f"refused it ({gate.get('error')}); the row is an ungated copy"
        gate_text = (
            f" The precision gate on val (bound {gate.get('max_drop')} points) {verdict}: drop "
            f"{_fmt(gate.get('gate_drop_points_val'), 2)} points, {gate.get('fallback_rounds')} fallback round(s)."
        )
    per_test = ", ".join(f"{t} {_signed(v)}" for t, v in r["int8_drop_points_per_test"].items())
    lines.append(
        f"- **INT8.** {iou(names['int8'])} against FP32 {iou(rows[names['int8']]['run'] if names['int8'] else None)}: "
        f"drop {_signed(r['int8_drop_points'])} points ({per_test}); target <= {r['int8_target_points']} point: "
        f"{_met(r['int8_met'])}.{gate_text}"
    )
    lines.append(
        f"- **MobileSAM-style transplant** (encoder MSE, the teacher's decoder frozen in): "
        f"{iou(names['transplant'])}, {_signed(r['transplant_vs_feature_points'])} points against the student with "
        "the feature term. The field report: 0.78."
    )
    if names["judge"]:
        judge = (rows[names["judge"]].get("training") or {}).get("judge") or {}
        stats = ""
        if judge:
            stats = (f" The loop ran {judge.get('passes')} pass(es): {judge.get('judge_cases')} cases, "
                     f"{judge.get('judge_judged')} judged (student {judge.get('judge_student')}, teacher "
                     f"{judge.get('judge_teacher')}, tie {judge.get('judge_tie')}); {judge.get('judge_weighted_last')} "
                     "instances re-weighted after the last pass.")
        per_test = ", ".join(f"{t} {_signed(v)}" for t, v in r["judge_effect_points_per_test"].items())
        lines.append(
            f"- **Judge loop** (re-weighted vs not, same recipe and seed): {iou(names['judge'])} against "
            f"{iou(names['with_feature'])}, {_signed(r['judge_effect_points'])} points ({per_test}).{stats}"
        )
    lines.append(
        "- One seed per row: run-to-run spread is not measured here, so differences of a point or two between "
        "rows are not evidence of anything."
    )
    return lines


def per_class_lines(results: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for test in results["test_sets"]:
        classes = list(dict.fromkeys(c for row in results["rows"] for c in row["per_class_iou"].get(test, {})))
        if not classes:
            continue
        counts = {c: next((row["per_class_iou"][test][c]["n"] for row in results["rows"]
                           if c in row["per_class_iou"].get(test, {})), 0) for c in classes}
        lines += [f"**{test}** (instances per class: " + ", ".join(f"{c} {counts[c]}" for c in classes) + ")", ""]
        lines.append("| row | " + " | ".join(classes) + " |")
        lines.append("|---|" + "---:|" * len(classes))
        for row in results["rows"]:
            values = row["per_class_iou"].get(test, {})
            cells = [_fmt((values.get(c) or {}).get("iou")) for c in classes]
            lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def markdown(results: dict[str, Any]) -> str:
    size, bench = results["input"], results["bench"]
    machine = bench.get("machine") or {}
    tests = ", ".join(f"`{spec}`" for spec in results["test_sets"].values())
    lines = [
        f"# Reference run ({results['schedule']} schedule)",
        "",
        f"Written by `{results['command']}` ({results['written']}); every figure below comes from that run "
        "(results.json holds them all). What the run does: docs/reference.md.",
        "",
        f"Training and evaluation at {size['height']}x{size['width']} (letterboxed), K = {size['k']}; test sets "
        f"{tests}, through engines/ on ONNX Runtime CPU. FPS: the fused graph of the same weights at "
        f"{bench['height']}x{bench['width']}, engine only, all rows in one run ({bench['iterations']} timed runs "
        f"each in alternating blocks), on {machine.get('cpu', '?')} ({machine.get('cores', '?')} cores, ONNX Runtime "
        f"{machine.get('onnxruntime', '?')}). File: the fused graph at that size and precision. Automatic P / R: "
        "defects matched at IoU 0.5, score threshold calibrated on val.",
        "",
        *table(results),
        "",
        "## Reading (generated from the numbers)",
        "",
        *reading_lines(results),
        "",
        "## IoU per class (prompted)",
        "",
        *per_class_lines(results),
        "## Plots",
        "",
    ]
    for name, title in (("loss_curves.png", "loss curves"), ("iou_per_class.png", "IoU per class"),
                        ("overlays.png", "example overlays")):
        if name in results.get("plots", []):
            lines += [f"![{title}]({name})", ""]
    lines += ["## Runs and steps", "", "| run | epochs | steps | best val mIoU (epoch) | final train loss |",
              "|---|---:|---:|---:|---:|"]
    trainings = [("teacher", results["teacher"]["training"])] + [
        (row["key"], row["training"]) for row in results["rows"] if row.get("training") and row["kind"] == "student"
    ]
    for key, summary in trainings:
        lines.append(f"| {key} | {summary.get('epochs', '-')} | {summary.get('steps', '-')} | "
                     f"{_fmt(summary.get('best_val_miou'))} ({summary.get('best_epoch', '-')}) | "
                     f"{_fmt(summary.get('final_train_loss'))} |")
    lines += ["", f"Step times (seconds of the invocation that did each step; {results['total_step_seconds']:.0f} s "
              "in all):", "", "| step | seconds |", "|---|---:|"]
    lines += [f"| {name} | {_fmt(seconds, 1)} |" for name, seconds in results["steps"].items()]
    return "\n".join(lines) + "\n"
