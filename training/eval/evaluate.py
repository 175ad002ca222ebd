"""Evaluate an exported bundle on a dataset through the runtime's own inspection (engines.inspector).

What ships is what is measured: every frame goes through ``Inspector`` on an engines backend, both
passes, the merge and the postprocess, in frame pixels, against the dataset's own masks. A
checkpoint is evaluated the same way, after an export to a temporary bundle
(``evaluate_checkpoint``). The dataset's classes are matched to the bundle's by name (``align_classes``):
a bundle may list them in another order or know more. Three families of figures per run:

* semantic (training.eval.semantic): the field's dataset-level IoU per class and mIoU, foreground
  only and with background, from the per-pixel most probable class of the merged windows;
* automatic (training.eval.metrics): defects matched to ground-truth instances at IoU 0.5,
  precision, recall, per-class figures, each instance's best IoU, recall by size bucket and the
  size from which the model finds 90% of a class (in px, and in µm given ``pixel_size_um``);
* image: OK/NG accuracy, false-NG and false-reject rates on good frames, the miss rate on
  defective ones; and the inspection's time per frame and windows per frame.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from engines.backends import open_engine
from engines.backends.onnxruntime import Config as OrtConfig
from engines.bundle import Bundle, load_bundle
from engines.errors import DefectsamError
from engines.inspector import InspectionConfig, Inspector, PassOutputs
from engines.postprocess import PostprocessConfig
from engines.windows import semantic_labels
from training.data.registry import MergedDataset, dataset_name, evenly_spaced
from training.data.sample import Sample, SampleDataset, label_map
from training.eval.metrics import DetectionScores, Region, SizeScores, instance_size, intersection, iou
from training.eval.semantic import ConfusionMatrix


class EvalReport(TypedDict):
    """What ``evaluate_bundle`` returns; JSON-serialisable (None where undefined)."""

    dataset: str
    model: str
    n_images: int
    classes: list[str]
    mode: str
    window: int
    semantic: dict[str, Any]
    automatic: dict[str, Any]
    targets: dict[str, Any]
    timing: dict[str, Any]
    seconds: float


def _regions(sample: Sample) -> list[Region]:
    return [Region.from_mask(m) for m in sample.masks]


def _samples(dataset: SampleDataset, limit: int | None) -> Iterator[tuple[int, Sample]]:
    for index in evenly_spaced(len(dataset), limit):
        yield index, dataset[index]


def evaluate_bundle(
    bundle: Bundle | Path | str,
    dataset: SampleDataset,
    *,
    precision: str = "auto",
    inspection: InspectionConfig | None = None,
    postprocess: PostprocessConfig | None = None,
    limit: int | None = None,
    pixel_size_um: float | None = None,
    iou_threshold: float = 0.5,
    progress: Any = None,
) -> EvalReport:
    """Inspect every sample of ``dataset`` with ``bundle`` (ONNX Runtime, CPU) and score it."""
    if pixel_size_um is not None and not (math.isfinite(pixel_size_um) and pixel_size_um > 0):
        raise DefectsamError(f"--pixel-size-um must be a number of micrometres > 0, got {pixel_size_um}")
    if not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle)
    dataset = align_classes(dataset, bundle.manifest.classes)
    engine = open_engine(bundle, OrtConfig(precision=precision, providers=["cpu"]))  # type: ignore[arg-type]
    try:
        inspector = Inspector(engine, inspection, postprocess)
        label = f"bundle:{bundle.manifest.name} ({getattr(engine, 'precision', '?')})"
        return _evaluate(inspector, dataset, label=label,
                         limit=limit, pixel_size_um=pixel_size_um, iou_threshold=iou_threshold, progress=progress)
    finally:
        engine.close()


def _evaluate(
    inspector: Inspector, dataset: SampleDataset, *, label: str, limit: int | None, pixel_size_um: float | None,
    iou_threshold: float, progress: Any,
) -> EvalReport:
    _check_classes(inspector, dataset)
    started = time.monotonic()
    passes = inspect_samples(inspector, dataset, limit, progress)
    report = score(inspector, passes, label=label, dataset=dataset_name(dataset), pixel_size_um=pixel_size_um,
                   iou_threshold=iou_threshold)
    report["seconds"] = round(time.monotonic() - started, 2)
    return report


def align_classes(dataset: SampleDataset, classes: Sequence[str]) -> SampleDataset:
    """``dataset`` with its class indices in the order of ``classes`` (a bundle's), matched by name: the
    dataset itself when the orders agree. A bundle that knows every class of the dataset, in another order
    or with more, is scored on it; a dataset class the bundle lacks is a DefectsamError naming it."""
    names, wanted = list(dataset.class_names), list(classes)
    if names == wanted:
        return dataset
    missing = [name for name in names if name not in wanted]
    if missing:
        raise DefectsamError(
            f"{dataset_name(dataset)}: its classes {names} are not the bundle's {wanted} (it has no "
            f"{', '.join(map(repr, missing))}; rename them with class_map in the dataset spec)"
        )
    aligned: SampleDataset = MergedDataset([dataset], class_names=wanted)
    return aligned


def _check_classes(inspector: Inspector, dataset: SampleDataset) -> None:
    classes = list(inspector.engine.bundle.manifest.classes)
    if list(dataset.class_names) != classes:
        raise DefectsamError(
            f"{dataset_name(dataset)}: its classes {list(dataset.class_names)} are not the bundle's {classes} "
            "(rename them with class_map in the dataset spec)"
        )


def inspect_samples(
    inspector: Inspector, dataset: SampleDataset, limit: int | None, progress: Any = None
) -> list[tuple[Sample, PassOutputs, float]]:
    """Both passes over every sample (the expensive part): (sample, outputs, ms) per frame, for ``score``."""
    _check_classes(inspector, dataset)
    passes = []
    for _, sample in _samples(dataset, limit):
        t0 = time.perf_counter()
        outputs = inspector.run(inspector.prepare(sample.image))
        passes.append((sample, outputs, (time.perf_counter() - t0) * 1000.0))
        if progress is not None:
            progress(1)
    return passes


def score(
    inspector: Inspector, passes: list[tuple[Sample, PassOutputs, float]], *, label: str, dataset: str,
    pixel_size_um: float | None = None, iou_threshold: float = 0.5,
) -> EvalReport:
    """Merge, postprocess (with ``inspector``'s thresholds) and score inspected samples."""
    classes = list(inspector.engine.bundle.manifest.classes)
    semantic = ConfusionMatrix(len(classes))
    detection = DetectionScores(threshold=iou_threshold)
    sizes = SizeScores()
    in_range = TargetPrecision()
    frame_ms: list[float] = []
    windows: list[int] = []
    modes: set[str] = set()
    for sample, outputs, ms in passes:
        t0 = time.perf_counter()
        canvases = inspector.merge(outputs)
        result = inspector.finish(outputs, canvases)
        frame_ms.append(ms + (time.perf_counter() - t0) * 1000.0)
        windows.append(len(outputs.windows))
        modes.add(outputs.mode)
        height, width = sample.image.shape[:2]
        semantic.add(label_map(sample), semantic_labels(canvases, width, height))
        truths = _regions(sample)
        predictions = [Region(d.bbox[0], d.bbox[1], d.mask) for d in result.defects]
        truth_classes = [classes[int(c)] for c in sample.classes]
        pairs = detection.add_image(
            predictions, [d.class_name for d in result.defects], [d.score for d in result.defects], truths,
            truth_classes, verdict_ng=result.verdict.name != "OK", uncertain=result.verdict.name == "UNCERTAIN",
        )
        found = {t for _, t, _ in pairs}
        truth_sizes = []
        for t, truth in enumerate(truths):
            best = max((iou(p, truth) for p in predictions), default=0.0)
            nominal = None if sample.sizes is None else float(sample.sizes[t])
            if nominal is not None and truth_classes[t] == "dent":
                nominal = None  # a dent's nominal size is its radius: measure its mask's diameter instead
            kind, size = instance_size(truth.mask, nominal)
            sizes.add(truth_classes[t], kind, size, t in found, best)
            truth_sizes.append((kind, size))
        in_range.add(predictions, [d.class_name for d in result.defects], pairs, truths, truth_classes, truth_sizes)
    automatic = detection.summary(classes)
    automatic["by_size"] = sizes.summary(classes, pixel_size_um)
    for name in classes:
        automatic["per_class"].setdefault(name, {}).update(sizes.instance_iou(name))
    timing = {
        "median_ms": round(float(np.median(frame_ms)), 2) if frame_ms else None,
        "windows_median": float(np.median(windows)) if windows else None,
        "windows_max": int(max(windows)) if windows else None,
    }
    return {
        "dataset": dataset,
        "model": label,
        "n_images": len(passes),
        "classes": classes,
        "mode": ",".join(sorted(modes)),
        "window": inspector.window,
        "semantic": semantic.summary(classes),
        "automatic": automatic,
        "targets": targets_view(sizes, in_range, classes),
        "timing": timing,
        "seconds": 0.0,
    }


# The synthetic targets: (class, size kind, floor in px). Scratches >= 2 px wide, pinholes >= 3 px across.
TARGET_FLOORS: tuple[tuple[str, str, float], ...] = (("scratch", "width", 2.0), ("pinhole", "diameter", 3.0))


class TargetPrecision:
    """Precision of the predictions of a class at or above its size floor (TARGET_FLOORS), as COCO's
    "ignore" regions do: a prediction matched to a defect under the floor, or unmatched but lying
    mostly on one (its largest overlap), counts neither for nor against the figure; an unmatched one
    elsewhere is a false positive; one matched to a defect at or above the floor a true positive."""

    def __init__(self) -> None:
        self.counts: dict[str, list[int]] = {name: [0, 0] for name, _, _ in TARGET_FLOORS}  # [tp, fp]

    def add(self, predictions: list[Region], predicted_classes: list[str], pairs: list[tuple[int, int, float]],
            truths: list[Region], truth_classes: list[str], truth_sizes: list[tuple[str, float]]) -> None:
        floors = {name: (kind, floor) for name, kind, floor in TARGET_FLOORS}

        def small(t: int) -> bool:
            rule = floors.get(truth_classes[t])
            return rule is not None and truth_sizes[t][0] == rule[0] and truth_sizes[t][1] < rule[1]

        matched = {p: t for p, t, _ in pairs}
        for p, name in enumerate(predicted_classes):
            if name not in self.counts:
                continue
            if p in matched:
                if not small(matched[p]):
                    self.counts[name][0] += 1
                continue
            overlaps = [intersection(predictions[p], truth) for truth in truths]
            if overlaps and max(overlaps) > 0 and small(int(np.argmax(overlaps))):
                continue
            self.counts[name][1] += 1

    def precision(self, name: str) -> float | None:
        tp, fp = self.counts[name]
        return None if tp + fp == 0 else tp / (tp + fp)


def targets_view(sizes: SizeScores, in_range: TargetPrecision, classes: list[str]) -> dict[str, Any]:
    """The issue's synthetic targets where the classes exist: recall, instance IoU and precision of
    scratches >= 2 px wide and pinholes >= 3 px across (TARGET_FLOORS)."""
    out: dict[str, Any] = {}
    for name, kind, floor in TARGET_FLOORS:
        if name in classes:
            key = "min_width" if kind == "width" else "min_diameter"
            entry = sizes.instance_iou(name, **{key: floor})
            entry["precision"] = in_range.precision(name)
            out[f"{name}_from_{floor:g}px"] = entry
    return out


def evaluate_checkpoint(
    checkpoint: Path | str, dataset: SampleDataset, *, finder: Path | str | None = None, **kwargs: Any
) -> EvalReport:
    """Export a trainer checkpoint (and a finder's) to a temporary bundle and evaluate it (``evaluate_bundle``)."""
    from training.export.bundle import export_checkpoints

    with tempfile.TemporaryDirectory(prefix="defectsam-eval-") as tmp:
        bundle = export_checkpoints(checkpoint, Path(tmp) / "bundle", finder=finder, name="checkpoint under evaluation",
                                    classes=list(dataset.class_names))
        report = evaluate_bundle(bundle, dataset, **kwargs)
    report["model"] = f"checkpoint:{checkpoint}" + (f" + {finder}" if finder else "")
    return report
