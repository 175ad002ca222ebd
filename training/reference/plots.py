"""The reference run's figures (small PNGs): training curves, the teacher's val curve, IoU per class, overlays.

Charts are drawn with matplotlib's object API (``Figure`` + the Agg canvas: no pyplot state, no
display). The overlays are the runtime's own drawing (``engines.overlay.render_overlay``) of what
each FP32 row's bundle finds on a few test images, inspected by ``engines.inspector.Inspector`` in
mode whole as the evaluation inspects them; the first column draws the ground truth the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from engines.atomic import write_bytes_atomic
from training.reference.report import RISING_TAIL, read_metrics, val_curve

if TYPE_CHECKING:
    from engines.results import InspectionResult
    from training.data.sample import Sample
    from training.reference.driver import ReferenceRun

DPI = 80
HEADER_PX = 18
# render_overlay sizes its labels for frames of hundreds of pixels: draw at this many times the tile, then shrink.
RENDER_SCALE = 3


def write_plots(run: ReferenceRun, results: dict[str, Any], out: Path) -> list[str]:
    """Write the figures into ``out``; returns the file names written."""
    made = []
    if curves(run, out / "curves.png"):
        made.append("curves.png")
    if teacher_curve(run, out / "teacher_curve.png"):
        made.append("teacher_curve.png")
    if iou_per_class(results, out / "iou_per_class.png"):
        made.append("iou_per_class.png")
    if overlays(run, out / "overlays.png"):
        made.append("overlays.png")
    return made


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _save(figure: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp, dpi=DPI)
    tmp.replace(path)


def _integer_epochs(*axes: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def curves(run: ReferenceRun, path: Path) -> bool:
    """Training loss and validation foreground mIoU per epoch of the teacher and every student run."""
    series = [(name, read_metrics(run.run_dir(name) / "metrics.jsonl")) for name in ["teacher", *(
        s.key for s in run.config.students)]]
    series = [(name, records) for name, records in series if records]
    if not series:
        return False
    figure = _figure(10, 3.4)
    loss_ax, val_ax = figure.subplots(1, 2)
    for name, records in series:
        losses = [(r["epoch"], r["train_loss"]) for r in records if isinstance(r.get("train_loss"), int | float)]
        if losses:
            loss_ax.plot(*zip(*losses, strict=True), marker=".", label=name)
        scored = val_curve(records)
        if scored:
            val_ax.plot(*zip(*scored, strict=True), marker=".", label=name)
    loss_ax.set(title="training loss (each recipe's own total)", xlabel="epoch", yscale="log")
    val_ax.set(title="validation semantic foreground mIoU", xlabel="epoch")
    val_ax.legend(fontsize="small")
    _integer_epochs(loss_ax, val_ax)
    _save(figure, path)
    return True


def teacher_curve(run: ReferenceRun, path: Path) -> bool:
    """The teacher's validation curve, its last RISING_TAIL of epochs shaded and its best marked."""
    records = read_metrics(run.teacher_dir / "metrics.jsonl")
    scored = val_curve(records)
    if not scored:
        return False
    figure = _figure(6, 3.2)
    ax = figure.subplots()
    epochs = records[-1]["epoch"]
    ax.axvspan(epochs * (1 - RISING_TAIL), epochs + 0.5, color="0.9", label=f"last {RISING_TAIL:.0%} of epochs")
    ax.plot(*zip(*scored, strict=True), marker=".", color="C0", label="val mIoU fg")
    best = max(scored, key=lambda item: (item[1], -item[0]))
    ax.plot([best[0]], [best[1]], marker="*", markersize=12, color="C3", linestyle="", label=f"best ({best[1]:.3f})")
    ax.set(title=f"teacher ({run.config.teacher.arch}): validation", xlabel="epoch", ylabel="semantic mIoU fg")
    ax.legend(fontsize="small", loc="lower right")
    _integer_epochs(ax)
    _save(figure, path)
    return True


def iou_per_class(results: dict[str, Any], path: Path) -> bool:
    """Grouped bars: semantic IoU per defect class of every row, one panel per test set."""
    rows = results["rows"]
    tests = [t for t in results["test_sets"] if any((row["semantic"].get(t) or {}).get("iou") for row in rows)]
    if not tests:
        return False
    figure = _figure(10, 2.8 * len(tests))
    axes = np.atleast_1d(figure.subplots(len(tests), 1))
    width = 0.8 / max(1, len(rows))
    for ax, test in zip(axes, tests, strict=True):
        classes = [c for c in next(list(row["semantic"][test]["iou"]) for row in rows
                                   if (row["semantic"].get(test) or {}).get("iou")) if c != "background"]
        x = np.arange(len(classes))
        for i, row in enumerate(rows):
            values = (row["semantic"].get(test) or {}).get("iou") or {}
            heights = [values.get(c) or 0.0 for c in classes]
            ax.bar(x + (i - (len(rows) - 1) / 2) * width, heights, width, label=row["key"])
        ax.set_xticks(x, classes)
        ax.set(title=f"semantic IoU per class, {test}", ylim=(0, 1))
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize="small", ncols=min(len(rows), 6))
    _save(figure, path)
    return True


def _samples(dataset: Any, n: int) -> list[Sample]:
    """Up to ``n`` samples with defects, spread over the set."""
    from training.data.registry import evenly_spaced

    picked = [s for s in (dataset[i] for i in evenly_spaced(len(dataset), min(len(dataset), max(4 * n, 16))))
              if len(s.masks)]
    return [picked[i] for i in evenly_spaced(len(picked), n)] if picked else []


def truth_result(sample: Sample, classes: list[str]) -> InspectionResult:
    """The sample's ground truth as an InspectionResult (score 1), so that it is drawn as the rows are."""
    from engines.results import Defect, InspectionResult, Verdict

    defects = []
    for mask, class_id in zip(sample.masks, sample.classes, strict=True):
        ys, xs = np.nonzero(mask)
        if not len(xs):
            continue
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        centre = (float(xs.mean()), float(ys.mean()))
        defects.append(Defect(class_id=int(class_id), class_name=classes[int(class_id)], score=1.0, predicted_iou=1.0,
                              area_px=len(xs), bbox=(x0, y0, x1 - x0, y1 - y0), centroid=centre, point=centre,
                              mask=mask[y0:y1, x0:x1]))
    h, w = sample.image.shape[:2]
    return InspectionResult(frame_width=w, frame_height=h, verdict=Verdict.NG if defects else Verdict.OK,
                            defects=tuple(defects), max_peak_score=1.0 if defects else 0.0)


def _tile(image: np.ndarray, result: InspectionResult, side: int) -> np.ndarray:
    """``render_overlay`` of the result, drawn at RENDER_SCALE x the tile and shrunk into a side x side tile
    (centred, white margins)."""
    from engines.overlay import render_overlay

    h, w = image.shape[:2]
    drawn = render_overlay(image, result, scale=RENDER_SCALE * side / max(h, w))
    size = (max(1, round(w * side / max(h, w))), max(1, round(h * side / max(h, w))))
    drawn = cv2.resize(drawn, size, interpolation=cv2.INTER_AREA)
    tile = np.full((side, side, 3), 255, dtype=np.uint8)
    dh, dw = min(side, drawn.shape[0]), min(side, drawn.shape[1])
    dy, dx = (side - dh) // 2, (side - dw) // 2
    tile[dy : dy + dh, dx : dx + dw] = drawn[:dh, :dw]
    return tile


def overlays(run: ReferenceRun, path: Path) -> bool:
    """A grid: per test set, a few images with defects; columns: ground truth, then every FP32 row's inspection."""
    from engines.backends import open_engine
    from engines.backends.onnxruntime import Config
    from engines.bundle import load_bundle
    from engines.inspector import Inspector
    from training.data.registry import build_dataset
    from training.reference.driver import WHOLE

    config = run.config
    n = config.report.overlays
    rows = [row for row in run.rows() if row.precision == "fp32"]
    rows = [row for row in rows if (run.bundle_dir(row.run) / "manifest.json").is_file()]
    if n == 0 or not rows:
        return False
    side = config.report.tile
    samples = [(test, s) for test, spec in config.data.test.items() for s in _samples(build_dataset(spec), n)]
    if not samples:
        return False
    bundles = [load_bundle(run.bundle_dir(row.run)) for row in rows]
    classes = list(bundles[0].manifest.classes)
    columns = [[_tile(s.image, truth_result(s, classes), side) for _, s in samples]]
    for bundle in bundles:
        engine = open_engine(bundle, Config(providers=["cpu"], precision="fp32"))
        try:
            inspector = Inspector(engine, WHOLE)
            columns.append([_tile(s.image, inspector.inspect(s.image), side) for _, s in samples])
        finally:
            engine.close()
    header = np.full((HEADER_PX, side * len(columns), 3), 255, dtype=np.uint8)
    for i, label in enumerate(["ground truth", *(row.key for row in rows)]):
        cv2.putText(header, label, (i * side + 4, HEADER_PX - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1,
                    cv2.LINE_AA)
    lines = [header]
    for r, (test, _) in enumerate(samples):
        line = np.concatenate([column[r] for column in columns], axis=1)
        cv2.putText(line, test, (4, side - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0), 1, cv2.LINE_AA)
        lines.append(line)
    ok, data = cv2.imencode(".png", np.concatenate(lines, axis=0), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    if not ok:
        return False
    write_bytes_atomic(path, data.tobytes())
    return True
