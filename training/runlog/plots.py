"""A run's figures, like Ultralytics' results.png and val batches: drawn at the end of a run, redrawn by
``defectsam-train plots RUN_DIR``.

``results.png``: one panel per loss term (``train_*``), per validation metric (``val_*``; the per-class
IoUs share one panel, ``val_score`` is left out: it repeats the metric that picks best.pt) and the
learning rate, against the epoch; ``RESULTS_PANEL_PX`` each, five panels a row.

``val_overlays.png``: a few validation samples (those with defects first, spread over the set), one
row each: the image, the ground truth and the prediction of the model drawn over it (classes in the
runtime's colours, engines/overlay.py; the title gives the sample's foreground IoU). A finder's rows
are the reduced frame (its mean channel), the target cells and the predicted cell probability.

Charts use matplotlib's object API (``Figure`` + the Agg canvas: no pyplot state, no display).
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from engines.atomic import write_bytes_atomic
from engines.contract import FIND_MEAN, FIND_STD, PIXEL_MEAN, PIXEL_STD
from engines.overlay import class_colour

RESULTS_PNG = "results.png"
OVERLAYS_PNG = "val_overlays.png"
DPI = 100
RESULTS_COLUMNS = 5
RESULTS_PANEL_PX = (300, 250)  # width, height of one panel of results.png
TILE_PX = 256  # one image of val_overlays.png
LEGEND_PX = 40  # the class legend above the overlays
OVERLAY_SAMPLES = 4


def _figure(width_px: int, height_px: int) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI, layout="constrained")


def _png(figure: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """HxWx3 uint8 BGR pixels of PNG bytes."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None, "matplotlib wrote a PNG OpenCV cannot read"
    return image


# -- results.png ----------------------------------------------------------------------------------
def results_panels(rows: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """(title, columns) of each panel of results.png, in order: losses, val metrics, learning rate."""
    from training.runlog.history import columns

    names = [n for n in columns(rows) if any(isinstance(r.get(n), int | float) for r in rows)]
    panels: list[tuple[str, list[str]]] = [(n.removeprefix("train_") + " (train)", [n])
                                           for n in names if n.startswith("train_")]
    per_class = [n for n in names if n.startswith("val_iou_")]
    for name in names:
        if name.startswith("val_") and name not in per_class and name not in ("val_score", "val_cells"):
            panels.append((name.removeprefix("val_") + " (val)", [name]))
    if per_class:
        panels.append(("IoU per class (val)", per_class))
    if "lr" in names:
        panels.append(("learning rate", ["lr"]))
    return panels


def results_size(panels: int) -> tuple[int, int]:
    """(width, height) in pixels of results.png with ``panels`` panels."""
    columns = min(RESULTS_COLUMNS, max(1, panels))
    return RESULTS_PANEL_PX[0] * columns, RESULTS_PANEL_PX[1] * max(1, math.ceil(panels / RESULTS_COLUMNS))


def draw_results(rows: list[dict[str, Any]], title: str = "") -> bytes | None:
    """results.png of the rows of a results.csv (None when no row has a value to draw)."""
    from matplotlib.ticker import MaxNLocator

    panels = results_panels(rows)
    if not rows or not panels:
        return None
    width, height = results_size(len(panels))
    figure = _figure(width, height)
    if title:
        figure.suptitle(title, fontsize="medium")
    ncols = min(RESULTS_COLUMNS, len(panels))
    axes = np.atleast_1d(figure.subplots(math.ceil(len(panels) / ncols), ncols, squeeze=False)).ravel()
    for ax, (name, keys) in zip(axes, panels, strict=False):
        for key in keys:
            points = [(r["epoch"], r[key]) for r in rows
                      if isinstance(r.get(key), int | float) and math.isfinite(r[key])]
            if points:
                label = key.removeprefix("val_iou_") if len(keys) > 1 else None
                ax.plot(*zip(*points, strict=True), marker=".", linewidth=1.5, label=label)
        ax.set_title(name, fontsize="small")
        ax.set_xlabel("epoch", fontsize="small")
        ax.tick_params(labelsize="x-small")
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(keys) > 1:
            ax.legend(fontsize="x-small")
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    return _png(figure)


# -- val_overlays.png ------------------------------------------------------------------------------
def _tint(rgb: np.ndarray, label: np.ndarray, num_classes: int, alpha: float = 0.45) -> np.ndarray:
    """``rgb`` with each class (label value c+1) tinted and outlined in the runtime's colour of class c."""
    out = rgb.copy()
    for class_id in range(num_classes):
        mask = (label == class_id + 1).astype(np.uint8)
        if not mask.any():
            continue
        colour = np.array(class_colour(class_id)[::-1], dtype=np.float32)  # BGR -> RGB
        region = mask.astype(bool)
        out[region] = (out[region] * (1 - alpha) + colour * alpha).astype(np.uint8)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, tuple(int(c) for c in colour), 1)
    return out


def _fit(rgb: np.ndarray, side: int = TILE_PX) -> np.ndarray:
    """Shrink (never enlarge past 4x) ``rgb`` into a side x side tile, centred on white."""
    h, w = rgb.shape[:2]
    scale = min(side / max(h, w), 4.0)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_NEAREST
    drawn = cv2.resize(rgb, size, interpolation=interpolation)
    tile = np.full((side, side, 3), 255, np.uint8)
    dy, dx = (side - size[1]) // 2, (side - size[0]) // 2
    tile[dy : dy + size[1], dx : dx + size[0]] = drawn
    return tile


def _pick(count: int, has_defect: Any, n: int) -> list[int]:
    """Up to ``n`` indices spread over ``range(count)``, those with defects first (of 4n looked at)."""
    from training.data.registry import evenly_spaced

    looked = evenly_spaced(count, max(4 * n, 16))
    with_defects = [i for i in looked if has_defect(i)]
    chosen = [with_defects[i] for i in evenly_spaced(len(with_defects), n)]
    return (chosen + [i for i in looked if i not in chosen])[:n]


def _segmenter_rows(model: Any, val: Any, classes: list[str], n: int, device: torch.device) -> list[Any]:
    from training.data.sample import IGNORE_LABEL
    from training.data.windows import WindowDataset

    whole = WindowDataset(val, train=False, num_classes=len(classes))
    rows = []
    for i in _pick(len(whole), lambda i: bool(len(val[i].masks)), n):
        example = whole[i]
        with torch.no_grad():
            logits = model(torch.from_numpy(example.image)[None].to(device))
        predicted = logits[0].argmax(0).cpu().numpy()
        valid = example.label != IGNORE_LABEL
        truth = np.where(valid, example.label, 0)
        predicted = np.where(valid, predicted, 0)
        rgb = example.image.transpose(1, 2, 0) * np.array(PIXEL_STD) + np.array(PIXEL_MEAN)
        rgb = np.clip(rgb, 0, 255).astype(np.uint8)
        union = ((truth > 0) | (predicted > 0)).sum()
        iou = float(((truth > 0) & (predicted > 0)).sum() / union) if union else None
        rows.append((str(example.source), [rgb, _tint(rgb, truth, len(classes)), _tint(rgb, predicted, len(classes))],
                     "no defect, none found" if iou is None else f"fg IoU {iou:.2f}"))
    return rows


def _finder_rows(model: Any, val: Any, n: int, device: torch.device) -> list[Any]:
    rows = []
    for i in _pick(len(val), lambda i: bool(val[i].cells.any()), n):
        example = val[i]
        with torch.no_grad():
            probs = torch.sigmoid(model(torch.from_numpy(example.image)[None].to(device)))[0, 0].cpu().numpy()
        grey = np.clip(example.image[0] * FIND_STD[0] + FIND_MEAN[0], 0, 255).astype(np.uint8)
        rgb = np.repeat(grey[..., None], 3, axis=2)
        h, w = grey.shape

        def heat(cells: np.ndarray, grey_rgb: np.ndarray = rgb, size: tuple[int, int] = (w, h)) -> np.ndarray:
            up = cv2.resize(cells.astype(np.float32), size, interpolation=cv2.INTER_NEAREST)
            red = np.zeros_like(grey_rgb)
            red[..., 0] = 255
            a = (0.6 * up)[..., None]
            return (grey_rgb * (1 - a) + red * a).astype(np.uint8)

        rows.append((f"frame {example.index}", [rgb, heat(example.cells[0]), heat(probs)],
                     f"max cell probability {float(probs.max()):.2f}"))
    return rows


def _rgb01(class_id: int) -> tuple[float, float, float]:
    b, g, r = class_colour(class_id)
    return r / 255, g / 255, b / 255


def draw_overlays(model: Any, val: Any, classes: list[str], *, n: int = OVERLAY_SAMPLES,
                  device: torch.device | None = None) -> bytes | None:
    """val_overlays.png of ``model`` (a WindowSegmenter or a CandidateFinder) on ``n`` samples of ``val``."""
    from training.model.finder import CandidateFinder

    if val is None or len(val) == 0 or n < 1:
        return None
    device = device or torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        finder = isinstance(model, CandidateFinder)
        rows = _finder_rows(model, val, n, device) if finder else _segmenter_rows(model, val, classes, n, device)
    finally:
        model.train(was_training)
    heads = ("reduced frame", "target cells", "predicted cells") if finder else ("image", "ground truth", "prediction")
    figure = _figure(3 * TILE_PX, len(rows) * TILE_PX + LEGEND_PX)
    if not finder:
        from matplotlib.patches import Patch

        handles = [Patch(color=_rgb01(c), label=name) for c, name in enumerate(classes)]
        figure.legend(handles=handles, loc="outside upper center", ncols=len(classes), fontsize="small")
    axes = figure.subplots(len(rows), 3, squeeze=False)
    for r, (source, tiles, note) in enumerate(rows):
        for c, tile in enumerate(tiles):
            ax = axes[r][c]
            ax.imshow(_fit(tile))
            ax.set_axis_off()
            text = heads[c] if c != 2 else f"{heads[c]}: {note}"
            ax.set_title(text if c else f"{source[-28:]}", fontsize="x-small")
    return _png(figure)


def write_png(path: Path, data: bytes) -> np.ndarray:
    """Write the PNG atomically; returns its pixels (for TensorBoard)."""
    write_bytes_atomic(path, data)
    return decode_png(data)


def write_run_plots(out: Path, rows: list[dict[str, Any]], model: Any, val: Any, classes: list[str], *,
                    title: str = "", samples: int = OVERLAY_SAMPLES, device: torch.device | None = None,
                    ) -> dict[str, np.ndarray]:
    """results.png from ``rows`` and val_overlays.png of ``model`` on ``val`` (when there is one), into ``out``.

    Returns the pixels of each file written, by name.
    """
    written: dict[str, np.ndarray] = {}
    results = draw_results(rows, title)
    if results is not None:
        written[RESULTS_PNG] = write_png(out / RESULTS_PNG, results)
    overlays = draw_overlays(model, val, classes, n=samples, device=device) if model is not None else None
    if overlays is not None:
        written[OVERLAYS_PNG] = write_png(out / OVERLAYS_PNG, overlays)
    return written
