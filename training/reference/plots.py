"""The reference run's figures: loss curves, prompted IoU per class, example overlays (small PNGs).

Charts are drawn with matplotlib's object API (``Figure`` + the Agg canvas: no pyplot state, no display);
the overlays are composed with OpenCV from the bundles' own prompted masks, run through engines/ as the
evaluation runs them (one foreground point at each ground-truth instance's interior point).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from engines.bundle import load_bundle
from training.reference.report import read_metrics

if TYPE_CHECKING:
    from training.reference.driver import ReferenceRun

DPI = 80
GT_COLOUR = (0, 200, 0)  # BGR
MASK_COLOUR = (0, 0, 255)
POINT_COLOUR = (255, 255, 0)


def write_plots(run: ReferenceRun, results: dict[str, Any], out: Path) -> list[str]:
    """Write the figures into ``out``; returns the file names written."""
    made = []
    if loss_curves(run, out / "loss_curves.png"):
        made.append("loss_curves.png")
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


def loss_curves(run: ReferenceRun, path: Path) -> bool:
    """Training loss and validation mIoU per epoch of the teacher and every student run."""
    series = [("teacher", read_metrics(run.teacher_dir / "metrics.jsonl"))]
    series += [(s.key, read_metrics(run.student_dir(s.key) / "metrics.jsonl")) for s in run.config.students]
    series = [(name, records) for name, records in series if records]
    if not series:
        return False
    figure = _figure(10, 3.4)
    loss_ax, val_ax = figure.subplots(1, 2)
    for name, records in series:
        epochs = [r["epoch"] for r in records]
        loss_ax.plot(epochs, [r.get("train_loss") for r in records], marker=".", label=name)
        scored = [(r["epoch"], r["val_miou"]) for r in records if isinstance(r.get("val_miou"), int | float)]
        if scored:
            val_ax.plot(*zip(*scored, strict=True), marker=".", label=name)
    loss_ax.set(title="training loss (each recipe's own total)", xlabel="epoch", yscale="log")
    val_ax.set(title="validation prompted mIoU", xlabel="epoch")
    val_ax.legend(fontsize="small")
    from matplotlib.ticker import MaxNLocator

    for ax in (loss_ax, val_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _save(figure, path)
    return True


def iou_per_class(results: dict[str, Any], path: Path) -> bool:
    """Grouped bars: prompted IoU per class of every row, one panel per test set."""
    tests = [t for t in results["test_sets"] if any(row["per_class_iou"].get(t) for row in results["rows"])]
    if not tests:
        return False
    rows = results["rows"]
    figure = _figure(10, 2.8 * len(tests))
    axes = np.atleast_1d(figure.subplots(len(tests), 1))
    width = 0.8 / max(1, len(rows))
    for ax, test in zip(axes, tests, strict=True):
        classes = list(dict.fromkeys(c for row in rows for c in row["per_class_iou"].get(test, {})))
        x = np.arange(len(classes))
        for i, row in enumerate(rows):
            values = row["per_class_iou"].get(test, {})
            heights = [(values.get(c) or {}).get("iou") or 0.0 for c in classes]
            ax.bar(x + (i - (len(rows) - 1) / 2) * width, heights, width, label=row["key"])
        ax.set_xticks(x, classes)
        ax.set(title=f"prompted IoU per class, {test}", ylim=(0, 1))
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize="small", ncols=min(len(rows), 6))
    _save(figure, path)
    return True


def _tile(image: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, float, tuple[int, int]]:
    """The image scaled into a size[0] x size[1] tile (letterboxed, centred): tile, scale, (dx, dy)."""
    th, tw = size
    h, w = image.shape[:2]
    scale = min(th / h, tw / w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    canvas = np.full((th, tw, 3), 255, dtype=np.uint8)
    dy, dx = (th - nh) // 2, (tw - nw) // 2
    small = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA)
    if small.ndim == 2:
        small = cv2.cvtColor(small, cv2.COLOR_GRAY2BGR)
    canvas[dy : dy + nh, dx : dx + nw] = small
    return canvas, scale, (dx, dy)


def _paint(tile: np.ndarray, mask: np.ndarray, scale: float, offset: tuple[int, int], colour: tuple[int, int, int],
           *, fill: bool) -> None:
    """Draw a frame-sized bool mask onto the tile: tinted fill and/or contour."""
    h, w = mask.shape
    small = cv2.resize(mask.astype(np.uint8), (max(1, round(w * scale)), max(1, round(h * scale))),
                       interpolation=cv2.INTER_NEAREST).astype(bool)
    dx, dy = offset
    region = tile[dy : dy + small.shape[0], dx : dx + small.shape[1]]
    if fill:
        region[small] = (0.5 * region[small] + 0.5 * np.array(colour)).astype(np.uint8)
    else:
        contours, _ = cv2.findContours(small.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(region, contours, -1, colour, 1)


def _samples(dataset: Any, n: int) -> list[Any]:
    """Up to ``n`` samples with defects, spread over the set."""
    from training.data.registry import evenly_spaced

    picked: list[Any] = []
    for index in evenly_spaced(len(dataset), min(len(dataset), max(4 * n, 32))):
        sample = dataset[index]
        if len(sample.masks):
            picked.append(sample)
    return [picked[i] for i in evenly_spaced(len(picked), n)] if picked else []


def _prompted_masks(engine: Any, sample: Any) -> list[np.ndarray]:
    """The engine's mask for one foreground point at each instance's interior point, frame-sized bool."""
    from engines.contract import LABEL_FOREGROUND
    from engines.postprocess import PostprocessConfig
    from engines.preprocess import Preprocessor
    from training.data.prepare import interior_point
    from training.eval.evaluate import logits_to_region

    manifest = engine.bundle.manifest
    tensor, box = Preprocessor(manifest.input)(sample.image)
    outputs = engine.infer(tensor, with_embedding=True)
    h, w = sample.image.shape[:2]
    masks = []
    labels = np.full((1, 1), LABEL_FOREGROUND, dtype=np.float32)
    for instance in sample.masks:
        point = box.to_engine(np.array([interior_point(instance)], dtype=np.float64)).astype(np.float32)
        logits, _ = engine.prompt(outputs.image_embedding, point.reshape(1, 1, 2), labels)
        region = logits_to_region(logits[0], box, int(manifest.mask_stride), PostprocessConfig().mask_threshold)
        full = np.zeros((h, w), dtype=bool)
        rh, rw = region.mask.shape
        full[region.y : region.y + rh, region.x : region.x + rw] = region.mask[: h - region.y, : w - region.x]
        masks.append(full)
    return masks


def overlays(run: ReferenceRun, path: Path) -> bool:
    """A grid: per test set, a few images with defects; columns: ground truth, then every FP32 row's masks."""
    from engines.backends import open_engine
    from engines.backends.onnxruntime import Config
    from training.data.prepare import interior_point
    from training.data.registry import build_dataset

    config = run.config
    n = config.report.overlays
    rows = [row for row in run.rows() if row.precision == "fp32"]
    bundles = {row.key: run.row_bundle(row) for row in rows}
    rows = [row for row in rows if (p := bundles[row.key]) is not None and (p / "manifest.json").is_file()]
    if n == 0 or not rows:
        return False
    th = config.report.tile_height
    size = (th, round(th * 1.25))
    samples = [(test, s) for test, spec in config.data.test.items() for s in _samples(build_dataset(spec), n)]
    if not samples:
        return False
    columns: list[list[np.ndarray]] = []
    gt_column = []
    for _, sample in samples:
        tile, scale, offset = _tile(sample.image, size)
        for mask in sample.masks:
            _paint(tile, mask, scale, offset, GT_COLOUR, fill=True)
        gt_column.append(tile)
    columns.append(gt_column)
    for row in rows:
        bundle = load_bundle(bundles[row.key])  # type: ignore[arg-type]
        engine = open_engine(bundle, Config(providers=["cpu"], precision="fp32"))
        column = []
        try:
            for _, sample in samples:
                tile, scale, offset = _tile(sample.image, size)
                for mask in _prompted_masks(engine, sample):
                    _paint(tile, mask, scale, offset, MASK_COLOUR, fill=True)
                for mask in sample.masks:
                    _paint(tile, mask, scale, offset, GT_COLOUR, fill=False)
                    x, y = interior_point(mask)
                    cv2.circle(tile, (round(x * scale) + offset[0], round(y * scale) + offset[1]), 2, POINT_COLOUR, -1)
                column.append(tile)
        finally:
            engine.close()
        columns.append(column)
    header_h = 18
    labels = ["ground truth", *(row.key for row in rows)]
    grid_rows = []
    header = np.full((header_h, size[1] * len(columns), 3), 255, dtype=np.uint8)
    for i, label in enumerate(labels):
        cv2.putText(header, label, (i * size[1] + 4, header_h - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1,
                    cv2.LINE_AA)
    grid_rows.append(header)
    for r, (test, _) in enumerate(samples):
        line = np.concatenate([column[r] for column in columns], axis=1)
        cv2.putText(line, test, (4, th - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0), 1, cv2.LINE_AA)
        grid_rows.append(line)
    grid = np.concatenate(grid_rows, axis=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, data = cv2.imencode(".png", grid, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    if not ok:
        return False
    from engines.atomic import write_bytes_atomic

    write_bytes_atomic(path, data.tobytes())
    return True
