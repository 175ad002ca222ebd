"""The precision gate's measurements: held-out figures through engines/, and which module groups quantize worst.

``measure`` runs one precision of a bundle through the runtime (ONNX Runtime CPU, the
Inspector the daemon uses) with training.eval: the semantic foreground mIoU of the merged windows
(the gate metric, dataset-level), defect precision/recall, OK/NG accuracy.

``bundle._rank`` orders module groups by how much quantization damages the tensors they touch,
for the gate's per-layer fallback. Static mode: the FP32 graph runs on a few probe feeds with
every calibrated tensor exposed, and each tensor is fake-quantized with its calibrated range the
way ONNX Runtime would (``graph.fake_quant_error``); a tensor's SQNR counts against the group
that produces it and the groups that read it, and a group scores its worst tensor. A clipping
range (a bad calibration) or a heavy-tailed activation shows up as a low SQNR. Weight-only mode
scores each group's weights the same way. Lower SQNR: kept in FP32 first.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engines.bundle import Bundle
from engines.errors import DefectsamError
from training.data.sample import SampleDataset
from training.eval.evaluate import EvalReport
from training.quantize.graph import Target, fake_quant_error


def measure(bundle: Bundle, precision: str, dataset: SampleDataset, limit: int | None = None) -> EvalReport:
    """Evaluate ``bundle``'s graphs at ``precision`` on ONNX Runtime CPU through engines/."""
    from training.eval.evaluate import evaluate_bundle

    return evaluate_bundle(bundle, dataset, limit=limit, precision=precision)


def figures(report: EvalReport) -> dict[str, Any]:
    """The headline figures of a report: semantic mIoU (foreground, with background), defect P/R/F1, OK/NG."""
    auto = report["automatic"]
    semantic = report["semantic"]
    return {
        "miou_fg": semantic.get("miou_fg"),
        "miou": semantic.get("miou"),
        "precision": auto.get("precision"),
        "recall": auto.get("recall"),
        "f1": auto.get("f1"),
        "image_accuracy": auto.get("image_accuracy"),
        "false_ng_rate": auto.get("false_ng_rate"),
    }


@dataclass(frozen=True)
class GateMetric:
    """What the gate compares: the semantic foreground mIoU of the held-out set."""

    key: str = "miou_fg"
    label: str = "semantic foreground mIoU"

    @classmethod
    def for_report(cls, report: EvalReport) -> GateMetric:
        return cls()

    def value(self, report: EvalReport, dataset_name: str) -> float:
        found = figures(report)[self.key]
        if found is None:
            raise DefectsamError(
                f"held-out set {dataset_name}: no defects to measure {self.label} on; give a set with defects"
            )
        return float(found)


def agreement(bundle: Bundle, dataset: SampleDataset, limit: int | None = None) -> dict[str, Any]:
    """INT8 against FP32 on the same frames, the FP32 outputs taken as the truth.

    The INT8 defects matched to the FP32 defects (precision, recall at IoU 0.5), the share of frames
    with the same verdict and the pixel agreement of the semantic maps. Unlike the gate's drop it
    needs no good model: a weak model's FP32 outputs are still a reference.
    """
    from engines.backends import open_engine
    from engines.backends.onnxruntime import Config
    from engines.inspector import Inspector
    from engines.results import Verdict
    from engines.windows import semantic_labels
    from training.data.registry import evenly_spaced
    from training.eval.metrics import DetectionScores, Region

    manifest = bundle.manifest
    engines = [open_engine(bundle, Config(providers=["cpu"], precision=p)) for p in ("fp32", "int8")]
    detections = DetectionScores()
    same_verdict = 0
    same_pixels = 0
    pixels = 0
    indices = evenly_spaced(len(dataset), limit)
    try:
        inspectors = [Inspector(engine) for engine in engines]
        for index in indices:
            image = dataset[index].image
            height, width = image.shape[:2]
            results, maps = [], []
            for inspector in inspectors:
                outputs = inspector.run(inspector.prepare(image))
                canvases = inspector.merge(outputs)
                results.append(inspector.finish(outputs, canvases))
                maps.append(semantic_labels(canvases, width, height))
            reference, quantized = results
            same_verdict += int(reference.verdict == quantized.verdict)
            same_pixels += int(np.count_nonzero(maps[0] == maps[1]))
            pixels += maps[0].size
            detections.add_image(
                [Region(d.bbox[0], d.bbox[1], d.mask) for d in quantized.defects],
                [d.class_name for d in quantized.defects], [d.score for d in quantized.defects],
                [Region(d.bbox[0], d.bbox[1], d.mask) for d in reference.defects],
                [d.class_name for d in reference.defects],
                verdict_ng=quantized.verdict != Verdict.OK,
            )
    finally:
        for engine in engines:
            engine.close()
    auto = detections.summary(list(manifest.classes))
    return {
        "n_images": len(indices),
        "precision_vs_fp32": auto["precision"],
        "recall_vs_fp32": auto["recall"],
        "fp32_defects": auto["tp"] + auto["fn"],
        "int8_defects": auto["tp"] + auto["fp"],
        "same_verdict": same_verdict / len(indices) if indices else None,
        "same_pixel_class": same_pixels / pixels if pixels else None,
    }


def _sqnr_db(signal: float, error: float) -> float:
    if error <= 0.0:
        return math.inf
    if signal <= 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / error)


def tensor_sqnr(
    model_path: Path,
    ranges: Mapping[str, tuple[float, float]],
    feeds: Sequence[Mapping[str, np.ndarray]],
    target: Target,
) -> dict[str, float]:
    """SQNR (dB) of fake-quantizing every calibrated tensor of ``model_path`` on ``feeds``."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(model_path))
    produced = {t for node in model.graph.node for t in node.output}
    inputs = {i.name for i in model.graph.input}
    names = sorted(t for t in ranges if t in produced or t in inputs)
    existing = {o.name for o in model.graph.output}
    for name in names:
        if name not in existing and name not in inputs:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor as it is
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    outputs = [name for name in names if name not in inputs]
    signal: dict[str, float] = defaultdict(float)
    error: dict[str, float] = defaultdict(float)
    for feed in feeds:
        values = dict(zip(outputs, session.run(outputs, dict(feed)), strict=True))
        values.update({name: np.asarray(feed[name]) for name in names if name in inputs})
        for name in names:
            value = values[name]
            if value.dtype.kind != "f":
                continue
            low, high = ranges[name]
            s, e = fake_quant_error(value, low, high, target)
            signal[name] += s
            error[name] += e
    return {name: _sqnr_db(signal[name], error[name]) for name in signal}


def weight_sqnr(model_path: Path, groups: Mapping[str, str]) -> dict[str, float]:
    """Per node with a weight (Conv, Gemm, MatMul): SQNR (dB) of its INT8 per-channel weight."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    inits = {init.name: init for init in model.graph.initializer}
    found: dict[str, float] = {}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        init = inits.get(node.input[1])
        if init is None or node.name not in groups:
            continue
        weight = numpy_helper.to_array(init).astype(np.float64)
        if weight.ndim < 2:
            continue
        rows = weight.reshape(weight.shape[0], -1)
        peak = np.abs(rows).max(axis=1, keepdims=True)
        scale = np.where(peak > 0, peak / 127.0, 1.0)
        restored = np.clip(np.rint(rows / scale), -127, 127) * scale
        found[node.name] = _sqnr_db(float(np.square(rows).sum()), float(np.square(rows - restored).sum()))
    return found


def group_scores_from_tensors(
    model_path: Path, sqnr: Mapping[str, float], groups: Mapping[str, str]
) -> dict[str, float]:
    """A group's score: the worst SQNR among the tensors its nodes produce or read."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    scores: dict[str, float] = {}
    for node in model.graph.node:
        group = groups.get(node.name)
        if group is None:
            continue
        for tensor in (*node.input, *node.output):
            if tensor in sqnr:
                scores[group] = min(scores.get(group, math.inf), sqnr[tensor])
    return scores


def merge_scores(*scores: Mapping[str, float]) -> list[tuple[str, float]]:
    """Groups by ascending score (worst first), each at its worst over the graphs."""
    merged: dict[str, float] = {}
    for table in scores:
        for group, value in table.items():
            merged[group] = min(merged.get(group, math.inf), value)
    return sorted(merged.items(), key=lambda item: (item[1], item[0]))


def output_sqnr(
    fp32_graph: Path, int8_graph: Path, feeds: Sequence[Mapping[str, np.ndarray]], names: Sequence[str]
) -> dict[str, float]:
    """SQNR (dB) of the INT8 graph's float outputs against the FP32 graph's, on the same feeds."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    cpu = ["CPUExecutionProvider"]
    sessions = [ort.InferenceSession(str(path), options, providers=cpu) for path in (fp32_graph, int8_graph)]
    signal: dict[str, float] = defaultdict(float)
    error: dict[str, float] = defaultdict(float)
    for feed in feeds:
        reference, quantized = (dict(zip(names, s.run(list(names), dict(feed)), strict=True)) for s in sessions)
        for name in names:
            r = reference[name].astype(np.float64)
            signal[name] += float(np.square(r).sum())
            error[name] += float(np.square(r - quantized[name]).sum())
    return {name: round(_sqnr_db(signal[name], error[name]), 2) for name in names}
