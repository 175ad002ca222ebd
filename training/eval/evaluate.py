"""Evaluate a PyTorch model or an exported bundle on a dataset, through the runtime's own stages.

Both paths share everything but the forward pass: ``engines.preprocess.Preprocessor`` letterboxes
and normalises each frame, ``engines.postprocess.Postprocessor`` turns the fused outputs into
defects in frame pixels, and every metric is computed in frame pixels against the dataset's own
masks. A bundle runs on an ``engines`` backend (its fused graph, and its decoder-only graph through
``Engine.prompt`` for prompted mode); a model runs in PyTorch, its encoder batched. So what ships
is what is measured, and a model and its export score alike.

Prompted mode: for every ground-truth instance, one foreground point at its interior point (the
maximum of its distance transform), decoded alone; the mask's IoU and dice with the instance.
Automatic mode: the fused graph's own saliency points, no ground truth; defect-level precision
and recall at IoU 0.5 and image-level OK/NG accuracy (training.eval.metrics).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, TypedDict

import cv2
import numpy as np

from engines.bundle import Bundle, InputSpec, load_bundle
from engines.contract import LABEL_FOREGROUND
from engines.engine import Engine, EngineOutputs
from engines.errors import DefectsamError
from engines.postprocess import PostprocessConfig, Postprocessor, upsample_cells, with_calibrated
from engines.preprocess import Letterbox, Preprocessor
from engines.results import Verdict
from training.data.errors import DatasetError
from training.data.prepare import input_spec, interior_point
from training.data.registry import dataset_name, evenly_spaced
from training.data.sample import Sample, SampleDataset
from training.eval.metrics import DetectionScores, PromptedScores, Region


class EvalReport(TypedDict):
    """What ``evaluate_model`` and ``evaluate_bundle`` return; JSON-serialisable (None where undefined)."""

    dataset: str
    model: str
    n_images: int
    classes: list[str]
    prompted: dict[str, Any] | None  # None when the bundle has no decoder-only graph
    automatic: dict[str, Any]
    seconds: float


def logits_to_region(logits: np.ndarray, box: Letterbox, stride: int, threshold: float = 0.0) -> Region:
    """One mask's logits (hm x wm, stride ``stride`` of the engine input) -> its region in frame pixels.

    Only the cells above ``threshold`` and a one-cell border are upsampled, as the Postprocessor does.
    """
    valid_h = min(logits.shape[0], math.ceil(box.content_height / stride))
    valid_w = min(logits.shape[1], math.ceil(box.content_width / stride))
    logits = logits[:valid_h, :valid_w]
    on = np.ascontiguousarray(logits > threshold)
    x, y, w, h = cv2.boundingRect(on.view(np.uint8))
    if w == 0 or h == 0:
        return Region.empty()
    cx0, cy0 = max(0, x - 1), max(0, y - 1)
    cx1, cy1 = min(valid_w, x + w + 1), min(valid_h, y + h + 1)
    region = upsample_cells(logits[cy0:cy1, cx0:cx1], (cx0, cy0), box, stride, threshold)
    if region is None:
        return Region.empty()
    fx, fy, mask = region
    return Region(fx, fy, mask)


class _Runner(Protocol):
    """The forward passes evaluation needs: the fused graph, and one single-point prompt at a time."""

    spec: InputSpec
    classes: tuple[str, ...]
    mask_stride: int
    label: str

    def infer(self, images: Sequence[np.ndarray]) -> list[tuple[EngineOutputs, Any]]:
        """Preprocessed images (each 1x3xHxW) -> per image (outputs, a handle for ``prompt``)."""
        ...

    def prompt(self, handle: Any, points: np.ndarray) -> list[np.ndarray] | None:
        """P single-point foreground prompts (Px2 input pixels) -> P mask logits (hm x wm), or None."""
        ...


class _EngineRunner:
    def __init__(self, engine: Engine) -> None:
        manifest = engine.bundle.manifest
        self.engine = engine
        self.spec = manifest.input
        self.classes = tuple(manifest.classes)
        self.mask_stride = int(manifest.mask_stride)
        self.label = f"bundle:{manifest.name} ({getattr(engine, 'precision', manifest.precision)})"
        self.has_decoder = engine.bundle.decoder_graph is not None

    def infer(self, images: Sequence[np.ndarray]) -> list[tuple[EngineOutputs, Any]]:
        results = []
        for image in images:
            outputs = self.engine.infer(image, with_embedding=self.has_decoder)
            results.append((outputs, outputs.image_embedding))
        return results

    def prompt(self, handle: Any, points: np.ndarray) -> list[np.ndarray] | None:
        if not self.has_decoder:
            return None
        labels = np.full((1, 1), LABEL_FOREGROUND, dtype=np.float32)
        masks = []
        for point in points:
            logits, _ = self.engine.prompt(handle, point.reshape(1, 1, 2).astype(np.float32), labels)
            masks.append(logits[0])
        return masks


class _TorchRunner:
    def __init__(self, model: Any, classes: Sequence[str], spec: InputSpec) -> None:
        import torch

        self.torch = torch
        self.model = model
        self.device = next(model.parameters()).device
        self.spec = spec
        self.classes = tuple(classes)
        self.mask_stride = int(model.mask_stride)
        self.label = f"model:{type(model).__name__}"

    def infer(self, images: Sequence[np.ndarray]) -> list[tuple[EngineOutputs, Any]]:
        from training.model.saliency import pick_peaks
        from training.model.segmenter import EMBED_STRIDE

        torch, model = self.torch, self.model
        batch = torch.from_numpy(np.concatenate(images)).to(self.device)
        embeddings, skips = model.embed(batch)  # Bx256xhxw, BxCsx2hx2w
        heatmaps = torch.sigmoid(model.heatmap(embeddings))
        points, scores, classes = pick_peaks(heatmaps, model.k, EMBED_STRIDE)  # BxKx2, BxK, BxK
        results = []
        for i in range(batch.shape[0]):
            embedding = embeddings[i : i + 1]
            skip = None if skips is None else skips[i : i + 1]
            # Each peak is one single-point foreground prompt, as forward_fused: Kx2 -> Kx1x2.
            coords = points[i].reshape(model.k, 1, 2)
            labels = torch.ones(model.k, 1, dtype=coords.dtype, device=coords.device)
            masks, iou = model.decode(embedding, skip, coords, labels)
            outputs = EngineOutputs(
                heatmap=heatmaps[i].float().cpu().numpy(),
                points=points[i].float().cpu().numpy(),
                point_scores=scores[i].float().cpu().numpy(),
                point_classes=classes[i].cpu().numpy().astype(np.int64),
                mask_logits=masks.float().cpu().numpy(),
                iou=iou.float().cpu().numpy(),
            )
            results.append((outputs, (embedding, skip)))
        return results

    def prompt(self, handle: Any, points: np.ndarray) -> list[np.ndarray] | None:
        torch = self.torch
        embedding, skip = handle
        if len(points) == 0:
            return []
        coords = torch.from_numpy(points.astype(np.float32)).reshape(-1, 1, 2).to(self.device)  # Px2 -> Px1x2
        labels = torch.ones(coords.shape[0], 1, dtype=coords.dtype, device=self.device)
        masks, _ = self.model.decode(embedding, skip, coords, labels)
        return list(masks.float().cpu().numpy())


def _indices(dataset: SampleDataset, limit: int | None) -> list[int]:
    if len(dataset) == 0:
        raise DatasetError(dataset_name(dataset), "dataset holds no samples")
    if limit is not None and limit < 1:
        raise DefectsamError(f"limit must be at least 1, got {limit}")
    return evenly_spaced(len(dataset), limit)


def _batches(dataset: SampleDataset, indices: list[int], size: int) -> Iterator[list[Sample]]:
    for start in range(0, len(indices), size):
        yield [dataset[i] for i in indices[start : start + size]]


def _evaluate(
    runner: _Runner,
    dataset: SampleDataset,
    *,
    limit: int | None,
    batch_size: int,
    postprocess: PostprocessConfig | None,
    iou_threshold: float,
    prompted: bool,
) -> EvalReport:
    started = time.perf_counter()
    indices = _indices(dataset, limit)
    preprocess = Preprocessor(runner.spec)
    postprocessor = Postprocessor(runner.classes, runner.mask_stride, postprocess)
    truth_names = list(dataset.class_names)
    prompt_scores = PromptedScores()
    detections = DetectionScores(threshold=iou_threshold)
    prompted_available = prompted
    for samples in _batches(dataset, indices, batch_size):
        prepared = [preprocess(sample.image) for sample in samples]
        results = runner.infer([tensor for tensor, _ in prepared])
        for sample, (_, box), (outputs, handle) in zip(samples, prepared, results, strict=True):
            truths = [Region.from_mask(mask) for mask in sample.masks]
            truth_classes = [truth_names[int(c)] for c in sample.classes]

            result = postprocessor(outputs, box)
            predictions = [Region(d.bbox[0], d.bbox[1], d.mask) for d in result.defects]
            detections.add_image(
                predictions,
                [d.class_name for d in result.defects],
                [d.score for d in result.defects],
                truths,
                truth_classes,
                verdict_ng=result.verdict != Verdict.OK,
                uncertain=result.verdict == Verdict.UNCERTAIN,
            )

            if prompted_available and truths:
                frame_points = np.array([interior_point(mask) for mask in sample.masks], dtype=np.float64)
                engine_points = box.to_engine(frame_points).astype(np.float32)
                logits = runner.prompt(handle, engine_points)
                if logits is None:
                    prompted_available = False
                    continue
                threshold = postprocessor.config.mask_threshold
                for mask_logits, truth, name in zip(logits, truths, truth_classes, strict=True):
                    prediction = logits_to_region(mask_logits, box, runner.mask_stride, threshold)
                    prompt_scores.add(name, prediction, truth)
    return EvalReport(
        dataset=dataset_name(dataset),
        model=runner.label,
        n_images=len(indices),
        classes=truth_names,
        prompted=prompt_scores.summary(truth_names) if prompted_available else None,
        automatic=detections.summary(truth_names),
        seconds=round(time.perf_counter() - started, 3),
    )


def evaluate_model(
    model: Any,
    dataset: SampleDataset,
    *,
    limit: int | None = None,
    batch_size: int = 4,
    class_names: Sequence[str] | None = None,
    spec: InputSpec | None = None,
    postprocess: PostprocessConfig | None = None,
    iou_threshold: float = 0.5,
    prompted: bool = True,
) -> EvalReport:
    """Evaluate a DefectSegmenter (or a DDP/compiled wrapper of one) in PyTorch, on its own device.

    ``class_names``: the model's classes (default: the dataset's; their count must match the
    model's). ``spec``: the normalisation (default: what training.export.onnx writes for the
    model's size). ``limit`` takes an evenly spaced subset. The model is put in eval mode for the
    run and given back in the mode it came in.
    """
    import torch

    inner = getattr(model, "module", model)
    inner = getattr(inner, "_orig_mod", inner)
    names = tuple(class_names) if class_names is not None else tuple(dataset.class_names)
    if len(names) != inner.num_classes:
        raise DefectsamError(
            f"the model has {inner.num_classes} classes but {len(names)} class names were given "
            f"({', '.join(names)}); pass class_names"
        )
    height, width = inner.input_size
    spec = spec or input_spec(height, width)
    if (spec.height, spec.width) != (height, width):
        raise DefectsamError(f"spec is {spec.height}x{spec.width} but the model takes {height}x{width}")
    was_training = inner.training
    inner.eval()
    try:
        with torch.inference_mode():
            return _evaluate(
                _TorchRunner(inner, names, spec), dataset, limit=limit, batch_size=max(1, batch_size),
                postprocess=postprocess, iou_threshold=iou_threshold, prompted=prompted,
            )
    finally:
        inner.train(was_training)


def evaluate_bundle(
    bundle: Bundle | Path | str,
    dataset: SampleDataset,
    *,
    limit: int | None = None,
    engine: Engine | None = None,
    postprocess: PostprocessConfig | None = None,
    iou_threshold: float = 0.5,
    prompted: bool = True,
    precision: str = "auto",
) -> EvalReport:
    """Evaluate an engine bundle through engines/: its fused graph, postprocessing, decoder-only graph.

    Opens the bundle on ONNX Runtime (default backend config, ``precision``: auto, fp32 or int8, as the
    daemon's ``backend.precision``) unless an open ``engine`` is given. Prompted mode is None in the
    report when the bundle has no decoder-only graph.
    """
    from engines.backends import open_engine
    from engines.backends.onnxruntime import Config

    if not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle)
    own = engine is None
    engine = engine or open_engine(bundle, Config(precision=precision))  # type: ignore[arg-type]
    try:
        return _evaluate(
            _EngineRunner(engine), dataset, limit=limit, batch_size=1,
            postprocess=with_calibrated(postprocess, bundle.manifest.thresholds),
            iou_threshold=iou_threshold, prompted=prompted,
        )
    finally:
        if own:
            engine.close()
