"""README.md of the reference run, from results.json's content (training.reference.report.collect).

Every sentence with a number is generated from the numbers; where a reading is within the noise of
a single seed, or a target is met only because the teacher gives nothing to beat, the text says so.
"""

from __future__ import annotations

from typing import Any

from training.eval.metrics import format_cell as _fmt
from training.reference.report import NOISE_POINTS


def _signed(value: float | None) -> str:
    if value is None:
        return "-"
    shown = round(value, 1)
    return f"{shown if shown else 0.0:+.1f}"  # no "-0.0"


def _mb(value: Any) -> str:
    return "-" if not isinstance(value, int | float) else f"{value / 1e6:.2f}"


def _met(flag: bool | None) -> str:
    return "not measured" if flag is None else ("**met**" if flag else "**not met**")


def _noise(points: float | None) -> str:
    """' (noise: ...)' for a difference within the single-seed noise band, else ''."""
    if points is None or abs(points) >= NOISE_POINTS:
        return ""
    return f" (within {NOISE_POINTS:g} point: noise for one seed per row, no difference shown)"


def _share(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}"


def table(results: dict[str, Any]) -> list[str]:
    tests = list(results["test_sets"])
    headline = results["headline"]
    frames = (results["bench"].get("frames") or {}).get("window_hw") or ["?", "?"]
    header = ["row", "params (M)", "graph (MB)"]
    header += [f"mIoU fg {t}" for t in tests] + [f"mIoU with bg {headline}"]
    header += [f"P / R {t}" for t in tests]
    header += [f"ms / {results['window']} px window", f"images / s ({frames[0]}x{frames[1]})", "field report IoU"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for row in results["rows"]:
        params = row.get("parameters")
        cells = [row["label"], "-" if params is None else f"{params / 1e6:.2f}", _mb(row.get("graph_bytes"))]
        cells += [f"**{_fmt(row['miou_fg'].get(t))}**" if t == headline else _fmt(row["miou_fg"].get(t)) for t in tests]
        cells.append(_fmt((row["semantic"].get(headline) or {}).get("miou")))
        for t in tests:
            auto = row["automatic"].get(t) or {}
            cells.append(f"{_share(auto.get('precision'))} / {_share(auto.get('recall'))}")
        speed = row.get("speed") or {}
        cells += [_fmt(speed.get("ms_per_window"), 2), _fmt(speed.get("images_per_second"), 1),
                  _fmt(row.get("field_report_iou"), 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _curve_line(curve: dict[str, Any] | None) -> str:
    if not curve or curve.get("best") is None:
        return "- **Teacher's validation curve.** Not measured (no validation in its metrics.jsonl)."
    if curve["verdict"] == "too short":
        return (f"- **Teacher's validation curve.** Best {_fmt(curve['best'])} at epoch {curve['best_epoch']} of "
                f"{curve['epochs']}, last {_fmt(curve['last'])}: **too few evaluations** ({curve['evaluations']}; "
                f"the reading needs more than {curve['recent_evaluations']}) to say whether it had flattened.")
    text = (f"- **Teacher's validation curve.** Best {_fmt(curve['best'])} at epoch {curve['best_epoch']} of "
            f"{curve['epochs']}, last {_fmt(curve['last'])}; best of the last {curve['recent_evaluations']} "
            f"evaluations against every earlier one {_signed(curve.get('recent_gain_points'))} points, best of the "
            f"last {curve['tail_fraction']:.0%} of the epochs against the rest "
            f"{_signed(curve.get('tail_gain_points'))} points: ")
    verdict = curve["verdict"]
    if verdict == "still rising":
        return text + (f"**still rising** (a gain over {curve['rising_points']:g} points at the end): the teacher is "
                       "under-trained, and every comparison with it below says less than it seems; give it more "
                       "epochs.")
    tail = (" Its best lies in the last epochs, but by less than the bound: flat within noise."
            if curve.get("best_in_tail") else "")
    return text + f"**flat** (no gain over {curve['rising_points']:g} points at the end).{tail}"


def reading_lines(results: dict[str, Any]) -> list[str]:
    r = results["reading"]
    headline = r["headline"]
    rows = {row["key"]: row for row in results["rows"]}
    names = r["rows_compared"]

    def iou(key: str | None) -> str:
        return _fmt(rows[key]["miou_fg"].get(headline)) if key in rows else "-"

    lines = [_curve_line(r.get("teacher_curve"))]
    trivial = ""
    if r.get("ratio_trivial"):
        reasons = []
        over = r.get("teacher_vs_supervised_points")
        if over is not None and over < NOISE_POINTS:
            reasons.append(f"the teacher beats the supervised student by {_signed(over)} points, less than "
                           f"{NOISE_POINTS:g}, so it has little to give")
        if (r.get("teacher_curve") or {}).get("verdict") == "still rising":
            reasons.append("the teacher was still learning when it stopped")
        trivial = f" Met only trivially: {'; '.join(reasons)}."
    lines.append(
        f"- **Student vs teacher.** {iou(names['with_feature'])} / {iou(names['teacher'])} = "
        f"{_fmt(r['student_teacher_ratio'])} of the teacher ({_signed(r['student_teacher_gap_points'])} points between "
        f"them); target >= {r['ratio_target']}: {_met(r['ratio_met'])}.{trivial} The field report: 0.84 / 0.91 = "
        f"{r['field_report']['student_teacher_ratio']}."
    )
    if names["supervised"]:
        parts = [f"{key} {_signed(points)}{' (noise)' if points is not None and abs(points) < NOISE_POINTS else ''}"
                 for key, points in r["vs_supervised_points"].items()]
        lines.append(
            f"- **Distillation vs the supervised baseline** ({iou(names['supervised'])}, the same student trained on "
            f"the labels alone): {', '.join(parts) or '-'} points; the teacher itself "
            f"{_signed(r['teacher_vs_supervised_points'])}. A recipe that does not beat the baseline by more than the "
            "noise has not shown that the teacher helps."
        )
    per_test = ", ".join(f"{t} {_signed(v)}" for t, v in r["feature_gain_points_per_test"].items())
    lines.append(
        f"- **Feature term.** With the cosine term the student reaches {iou(names['with_feature'])}, without it "
        f"{iou(names['without_feature'])}: {_signed(r['feature_gain_points'])} points ({per_test})"
        f"{_noise(r['feature_gain_points'])}. The field report had +13 (0.84 vs 0.71)."
    )
    lines.append(
        f"- **MobileSAM-style transplant** (the teacher's decoder copied in and frozen, the neck features regressed): "
        f"{iou(names['transplant'])}, {_signed(r['transplant_vs_feature_points'])} points against the student with the "
        f"feature term{_noise(r['transplant_vs_feature_points'])}, {_signed(r['transplant_vs_teacher_points'])} "
        "against the teacher. The field report: 0.78."
    )
    lines.append(_int8_line(r, rows, iou))
    lines.append(
        f"- **Speed.** The student ({r['speed_student']}) inspects {_fmt(r['student_teacher_speed_images'], 2)}x "
        "as many whole images per second as the teacher, and its segment graph costs "
        f"1/{_fmt(r['student_teacher_speed_window'], 2)} of the teacher's per window (ONNX Runtime CPU, FP32)."
    )
    lines.append(
        "- One seed per row: the spread between seeds is not measured here, so a difference under "
        f"{NOISE_POINTS:g} point between rows is not evidence of anything."
    )
    return lines


def _int8_line(r: dict[str, Any], rows: dict[str, Any], iou: Any) -> str:
    names = r["rows_compared"]
    if not names["int8"]:
        return "- **INT8.** No INT8 row in this config (int8.of: null)."
    gate = r.get("int8_gate") or {}
    gate_text = ""
    if gate:
        verdict = "passed" if gate.get("passed") else f"refused it ({gate.get('error')}); the row is an ungated copy"
        gate_text = (
            f" The precision gate on val (bound {gate.get('max_drop')} points, measured by quantize_bundle in the "
            f"bundle's default inspection mode, which it does not take as an option) {verdict}: drop "
            f"{_fmt(gate.get('gate_drop_points_val'), 2)} points, {gate.get('fallback_rounds')} fallback round(s)."
        )
    per_test = ", ".join(f"{t} {_signed(v)}" for t, v in r["int8_drop_points_per_test"].items())
    return (
        f"- **INT8.** {iou(names['int8'])} against FP32 {iou(names['int8_source'])}: drop "
        f"{_signed(r['int8_drop_points'])} points ({per_test}); target <= {r['int8_target_points']:g} point: "
        f"{_met(r['int8_met'])}. Speed-up {_fmt(r['int8_speedup_images'], 2)}x whole images per second, "
        f"{_fmt(r['int8_speedup_window'], 2)}x per window.{gate_text}"
    )


def per_class_lines(results: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for test in results["test_sets"]:
        classes = next((list(row["semantic"][test]["iou"]) for row in results["rows"]
                        if (row["semantic"].get(test) or {}).get("iou")), [])
        if not classes:
            continue
        lines += [f"**{test}** (semantic IoU per class, dataset-level; background included)", ""]
        lines.append("| row | " + " | ".join(classes) + " | mIoU fg | mIoU with bg | pixel acc |")
        lines.append("|---|" + "---:|" * (len(classes) + 3))
        for row in results["rows"]:
            s = row["semantic"].get(test) or {}
            cells = [_fmt((s.get("iou") or {}).get(c)) for c in classes]
            cells += [_fmt(s.get("miou_fg")), _fmt(s.get("miou")), _fmt(s.get("aacc"))]
            lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def image_lines(results: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for test in results["test_sets"]:
        first = next((row["automatic"][test] for row in results["rows"] if row["automatic"].get(test)), None)
        if first is None:
            continue
        good, defective = first.get("good_images") or 0, first.get("defective_images") or 0
        note = ("" if good else " It holds no defect-free image, so the false-NG rate is undefined and OK/NG "
                "accuracy only counts misses.")
        lines += [f"**{test}**: {first.get('n_images')} images, {defective} with defects, {good} without.{note}", ""]
        lines += ["| row | score threshold | defects TP / FP / FN | F1 | OK/NG accuracy | false NG | miss rate |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for row in results["rows"]:
            a = row["automatic"].get(test) or {}
            lines.append(f"| {row['label']} | {_fmt(row.get('score_threshold'), 2)} | {a.get('tp', '-')} / "
                         f"{a.get('fp', '-')} / {a.get('fn', '-')} | {_fmt(a.get('f1'))} | "
                         f"{_fmt(a.get('image_accuracy'))} | {_fmt(a.get('false_ng_rate'))} | "
                         f"{_fmt(a.get('miss_rate'))} |")
        lines.append("")
    return lines


def teacher_curve_lines(results: dict[str, Any]) -> list[str]:
    """The teacher's epochs: validation foreground mIoU and training loss, the plot beside them."""
    training = results["teacher"].get("training") or {}
    log = training.get("log") or []
    if not log:
        return ["No epoch of the teacher is logged (its metrics.jsonl is missing).", ""]
    lines = ["| epoch | val mIoU fg | train loss |", "|---:|---:|---:|"]
    lines += [f"| {e['epoch']} | {_fmt(e.get('val_miou_fg'))} | {_fmt(e.get('train_loss'), 4)} |" for e in log]
    lines.append("")
    if "teacher_curve.png" in results.get("plots", []):
        lines += ["![the teacher's validation curve](teacher_curve.png)", ""]
    return lines


def markdown(results: dict[str, Any]) -> str:
    bench = results["bench"]
    machine = bench.get("machine") or {}
    frames = bench.get("frames") or {}
    settings = bench["settings"]
    tests = ", ".join(f"`{spec}`" for spec in results["test_sets"].values())
    train = ", ".join(f"`{spec.get('name')}" + (f":{spec['split']}" if spec.get("split") else "") + "`"
                      + (f" ({spec['limit']} images)" if spec.get("limit") else "") for spec in results["train"])
    lines = [
        f"# Reference run ({results['schedule']} schedule)",
        "",
        f"Written by `{results['command']}` ({results['written']}); every figure below comes from that run "
        "(results.json holds them all). What the run does: docs/reference.md.",
        "",
        f"Every run trains on {results['window']} px crops of {train} at native scale; every row is evaluated on "
        f"whole images of {tests} (inspection mode whole: each image one window, padded to a multiple of 16) through "
        "engines/ on ONNX Runtime CPU. **mIoU fg**: the semantic foreground mIoU, the field's NEU-Seg metric "
        "(dataset-level IoU of each defect class, mean over the classes), the headline on "
        f"`{results['headline']}` (bold); mIoU with bg adds the background class. P / R: defects (connected "
        "components) matched one to one at IoU 0.5, at the score threshold calibrated on val. Speed: ONNX Runtime "
        f"CPU on {machine.get('cpu', '?')} ({machine.get('cores', '?')} cores, ONNX Runtime "
        f"{machine.get('onnxruntime', '?')}), every row in one run, at the row's precision: ms per "
        f"{results['window']} px window is the segment graph alone on batches of {settings['batch']}; images / s "
        f"is the whole inspection of {frames.get('n', '?')} images of {frames.get('from', '?')}, median of "
        f"{settings['iterations']} timed runs in alternating blocks. Graph: the segment graph file at the row's "
        "precision. The field report's IoU is its own metric on its own data: a reference point, not the same "
        "measurement.",
        "",
        *table(results),
        "",
        "## Reading (generated from the numbers)",
        "",
        *reading_lines(results),
        "",
        "## The teacher's validation curve",
        "",
        *teacher_curve_lines(results),
        "## IoU per class",
        "",
        *per_class_lines(results),
        "## Defects and images",
        "",
        *image_lines(results),
        "## Plots",
        "",
    ]
    for name, title in (("curves.png", "training loss and validation mIoU of every run"),
                        ("iou_per_class.png", "IoU per class"), ("overlays.png", "example overlays")):
        if name in results.get("plots", []):
            lines += [f"![{title}]({name})", ""]
    lines += ["## Runs and steps", "",
              "| run | epochs | steps | best val mIoU fg (epoch) | last val mIoU fg | curve at the end | "
              "final train loss | seconds |", "|---|---:|---:|---:|---:|---|---:|---:|"]
    for row in results["rows"]:
        summary = row.get("training")
        if not summary:
            continue
        verdict = (summary.get("curve") or {}).get("verdict", "-")
        lines.append(f"| {row['key']} | {summary.get('epochs', '-')} | {summary.get('steps', '-')} | "
                     f"{_fmt(summary.get('best_val_miou_fg'))} ({summary.get('best_epoch', '-')}) | "
                     f"{_fmt(summary.get('last_val_miou_fg'))} | {verdict} | {_fmt(summary.get('final_train_loss'))} | "
                     f"{_fmt(summary.get('step_seconds'), 0)} |")
    lines += ["", f"Step times (seconds of the invocation that did each step; {results['total_step_seconds']:.0f} s "
              "in all):", "", "| step | seconds |", "|---|---:|"]
    lines += [f"| {name} | {_fmt(seconds, 1)} |" for name, seconds in results["steps"].items()]
    return "\n".join(lines) + "\n"
