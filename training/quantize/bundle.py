"""Quantize a bundle, gate it against its FP32 graphs, and record the INT8 variant in it.

    load + verify the bundle -> calibration frames -> pre-process each graph (segment, find)
    -> FP32 figures on the held-out set (through engines/)
    -> round 0..max_fallback:
         quantize (FP32-kept nodes + the groups the fallback chose) -> a staged candidate bundle
         -> INT8 figures on the held-out set -> drop = FP32 - INT8, in points (x100)
         -> within the bound: done; else keep the next worst-ranked module groups in FP32
    -> passed: rewrite the bundle atomically with segment.int8.onnx (+ find.int8.onnx),
       variants.int8 (gate: passed) and metrics.quantization
    -> failed: QuantizeGateError; the bundle was never written to

All intermediate files live in a temporary directory outside the bundle.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engines.bundle import Bundle, Manifest, load_bundle, utc_now, write_bundle
from engines.contract import SEGMENT_OUTPUT
from engines.errors import DefectsamError
from training.data.registry import build_dataset, dataset_name, evenly_spaced
from training.data.sample import SampleDataset
from training.quantize import graph as qgraph
from training.quantize.calibration import CalibrationSet, graph_feeds, load_calibration
from training.quantize.gate import (
    GateMetric,
    agreement,
    figures,
    group_scores_from_tensors,
    measure,
    merge_scores,
    output_sqnr,
    tensor_sqnr,
    weight_sqnr,
)

PRECISION = "int8"
HELD_OUT_SEED = 2_000_000  # the test seeds of the project's synthetic sets (docs/training.md)
DEFAULT_HELD_OUT_FRAMES = 40


class QuantizeGateError(DefectsamError):
    """The INT8 graphs lost more than the bound allows, after the fallback; the bundle is unchanged."""


# Module groups kept FP32 in every quantization (besides the op types and the heads training.quantize.graph
# keeps by rule): none for the window segmenter and the finder.
DEFAULT_KEEP_FP32: tuple[str, ...] = ()


@dataclass(frozen=True)
class QuantizeOptions:
    calib: str = "synthetic"
    n: int = 32
    mode: qgraph.Mode = "static"
    target: qgraph.Target = "cpu"
    held_out: str | None = None  # dataset spec; None: synthetic test frames at the bundle's input size
    limit: int | None = None
    max_drop: float = 1.0  # points of the gate metric (x100)
    max_fallback: int = 4
    keep_fp32: tuple[str, ...] = DEFAULT_KEEP_FP32
    probe_frames: int = 2
    command: str = ""

    def check(self) -> None:
        if self.n < 1:
            raise DefectsamError(f"--n must be at least 1 calibration frame, got {self.n}")
        if not math.isfinite(self.max_drop) or self.max_drop < 0:
            raise DefectsamError(f"--max-drop must be a number of points >= 0, got {self.max_drop}")
        if self.max_fallback < 0:
            raise DefectsamError(f"--max-fallback must be >= 0, got {self.max_fallback}")
        if self.limit is not None and self.limit < 1:
            raise DefectsamError(f"--limit must be at least 1, got {self.limit}")
        if self.probe_frames < 1:
            raise DefectsamError(f"--probe-frames must be at least 1, got {self.probe_frames}")


def default_held_out(bundle: Bundle) -> str:
    """Synthetic 4 MP test frames for a bundle of the synthetic classes; others must name their held-out set."""
    if bundle.manifest.classes != ("scratch", "dent", "pinhole"):
        raise DefectsamError(
            f"{bundle.path}: its classes {list(bundle.manifest.classes)} are not the synthetic panels'; name the "
            "held-out set the gate measures on with --held-out (e.g. neu_seg:val)"
        )
    return f"synthetic,n={DEFAULT_HELD_OUT_FRAMES},seed={HELD_OUT_SEED}"


@dataclass
class _Graph:
    """One of the bundle's graphs (segment or find) on its way to INT8."""

    role: str  # "segment" | "find"
    source: Path  # the FP32 graph in the bundle
    pre: Path  # pre-processed copy (what is quantized)
    out_name: str  # file name of the INT8 graph in the bundle
    groups: dict[str, str] = field(default_factory=dict)
    always_fp32: list[str] = field(default_factory=list)
    feeds: list[dict[str, Any]] = field(default_factory=list)
    cache: Path | None = None


@dataclass
class Round:
    excluded_groups: list[str]
    int8: dict[str, Any]
    drop_points: float

    def to_dict(self) -> dict[str, Any]:
        return {"kept_fp32_groups": list(self.excluded_groups), "int8": self.int8,
                "drop_points": round(self.drop_points, 4)}


def _int8_name(path: Path) -> str:
    return f"{path.stem}.int8{path.suffix}"


def _fields(manifest: Manifest) -> dict[str, Any]:
    fields = manifest.model_dump(mode="json")
    fields.pop("files")
    return fields


def _fp32_files(bundle: Bundle) -> dict[str, Path]:
    """The bundle's files without any earlier INT8 variant (which this run replaces)."""
    old = {name for variant in bundle.manifest.variants.values() for name in (variant.segment, variant.find) if name}
    return {name: bundle.path / name for name in bundle.manifest.files if name not in old}


def quantize_bundle(path: Path | str, options: QuantizeOptions, log: Callable[[str], None] = print) -> Bundle:
    """Add a gated INT8 variant to the bundle at ``path``; raises QuantizeGateError (bundle untouched) on failure."""
    options.check()
    bundle = load_bundle(path)
    manifest = bundle.manifest
    if manifest.precision != "fp32":
        raise DefectsamError(f"{bundle.path}: quantize starts from FP32 graphs; this bundle's are {manifest.precision}")
    held_out_spec = options.held_out or default_held_out(bundle)
    dataset = build_dataset(held_out_spec)
    calibration: CalibrationSet | None = None
    if options.mode == "static":
        calibration = load_calibration(bundle, options.calib, options.n)
        log(f"calibration: {len(calibration)} frames from {calibration.source}")

    with tempfile.TemporaryDirectory(prefix="defectsam-quantize-") as scratch:
        work = Path(scratch)
        graphs = _prepare_graphs(bundle, work, calibration)
        log(f"FP32 on {dataset_name(dataset)} (held out) ...")
        fp32_report = measure(bundle, "fp32", dataset, options.limit)
        metric = GateMetric.for_report(fp32_report)
        held_out_name = dataset_name(dataset)
        fp32_value = metric.value(fp32_report, held_out_name)
        log(f"FP32 {metric.label} {fp32_value:.4f}")

        excluded: list[str] = []  # module groups the fallback keeps FP32
        ranking: list[tuple[str, float]] | None = None
        probes: list[list[dict[str, Any]]] | None = None
        rounds: list[Round] = []
        candidate = work / "candidate"
        passed = False
        for round_index in range(options.max_fallback + 1):
            _quantize_graphs(graphs, options, excluded, work)
            staged = _stage(bundle, graphs, options, candidate, gate="pending")
            report = measure(staged, PRECISION, dataset, options.limit)
            value = metric.value(report, held_out_name)
            drop = (fp32_value - value) * 100.0
            rounds.append(Round(list(excluded), figures(report), drop))
            log(f"round {round_index}: INT8 {metric.label} {value:.4f}, drop {drop:.2f} points "
                f"(bound {options.max_drop:.2f}); {len(excluded)} group(s) kept FP32")
            if drop <= options.max_drop:
                passed = True
                break
            if round_index == options.max_fallback:
                break
            if ranking is None:
                probes = probes or _probe_feeds(bundle, dataset, graphs, options.probe_frames)
                ranking = _rank(graphs, options, probes)
                log("fallback ranking (worst first): "
                    + ", ".join(f"{g} {s:.1f} dB" for g, s in ranking[:8]) + (" ..." if len(ranking) > 8 else ""))
            fresh = [g for g, _ in ranking if g not in excluded][: 2**round_index]
            if not fresh:
                break
            excluded.extend(fresh)

        final = rounds[-1]
        if not passed:
            fallback = len(rounds) - 1
            raise QuantizeGateError(
                f"{bundle.path}: INT8 {metric.label} drop {final.drop_points:.2f} points exceeds the bound "
                f"{options.max_drop:.2f} (FP32 {fp32_value:.4f}, INT8 {final.int8[metric.key]:.4f} "
                f"on {held_out_name}, after {fallback} fallback round(s) keeping {len(excluded)} module group(s) "
                f"in FP32); the bundle is unchanged"
            )
        probes = probes or _probe_feeds(bundle, dataset, graphs, options.probe_frames)
        sqnr = output_sqnr(graphs[0].source, candidate / graphs[0].out_name, probes[0], (SEGMENT_OUTPUT,))
        log("agreement of INT8 with FP32 on the held-out frames ...")
        agreed = agreement(staged, dataset, options.limit)
        record = _record(bundle, graphs, options, calibration, held_out_name, fp32_report, metric, fp32_value,
                         rounds, sqnr, candidate)
        record["agreement_with_fp32"] = agreed
        if load_bundle(bundle.path).manifest.files != manifest.files:
            raise DefectsamError(f"{bundle.path}: the bundle changed while it was being quantized; run again")
        fields = _fields(manifest)
        fields["variants"] = {PRECISION: _variant(graphs, options, gate="passed")}
        fields["metrics"] = {**fields["metrics"], "quantization": record}
        files = {**_fp32_files(bundle), **{g.out_name: candidate / g.out_name for g in graphs}}
        return write_bundle(bundle.path, fields, files)


def _prepare_graphs(bundle: Bundle, work: Path, calibration: CalibrationSet | None) -> list[_Graph]:
    graphs = []
    sources = [("segment", bundle.segment_graph)]
    if bundle.find_graph is not None:
        sources.append(("find", bundle.find_graph))
    for role, source in sources:
        pre = work / f"{role}.pre.onnx"
        qgraph.preprocess(source, pre)
        graphs.append(_Graph(role=role, source=source, pre=pre, out_name=_int8_name(source),
                             groups=qgraph.node_groups(source, pre), always_fp32=qgraph.float_nodes(pre),
                             cache=work / f"{role}.ranges.json"))
    if calibration is not None:
        feeds = graph_feeds(bundle, calibration.frames)
        for g in graphs:
            g.feeds = feeds[g.role]
            if not g.feeds:
                raise DefectsamError(f"calibration {calibration.source}: gave the {g.role} graph no input (no windows)")
    return graphs


def _quantize_graphs(graphs: list[_Graph], options: QuantizeOptions, excluded: list[str], work: Path) -> None:
    for g in graphs:
        exclude = sorted({*g.always_fp32, *qgraph.groups_to_nodes(g.groups, excluded, options.keep_fp32)})
        target = work / g.out_name
        if options.mode == "static":
            assert g.cache is not None
            qgraph.quantize_static(g.pre, target, g.feeds, target=options.target, exclude=exclude, cache=g.cache)
        else:
            qgraph.quantize_weights(g.pre, target, exclude=exclude)


def _variant(graphs: list[_Graph], options: QuantizeOptions, gate: str) -> dict[str, Any]:
    return {
        "segment": graphs[0].out_name,
        "find": graphs[1].out_name if len(graphs) > 1 else None,
        "mode": options.mode,
        "target": options.target,
        "gate": gate,
    }


def _stage(bundle: Bundle, graphs: list[_Graph], options: QuantizeOptions, out: Path, gate: str) -> Bundle:
    """A candidate bundle in the scratch directory: the FP32 files plus this round's INT8 graphs."""
    fields = _fields(bundle.manifest)
    fields["variants"] = {PRECISION: _variant(graphs, options, gate)}
    files = {**_fp32_files(bundle), **{g.out_name: out.parent / g.out_name for g in graphs}}
    return write_bundle(out, fields, files)


def _probe_feeds(bundle: Bundle, dataset: SampleDataset, graphs: list[_Graph], n: int) -> list[list[dict[str, Any]]]:
    """Feeds per graph from the first ``n`` held-out images (images only; their masks are not read here).

    Not the calibration frames: a range fitted to them quantizes them well whatever it does to real frames.
    """
    frames = [dataset[i].image for i in evenly_spaced(len(dataset), n)]
    feeds = graph_feeds(bundle, frames)
    return [feeds[g.role] for g in graphs]


def _fp32_session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _rank(
    graphs: list[_Graph], options: QuantizeOptions, probes: list[list[dict[str, Any]]]
) -> list[tuple[str, float]]:
    """Module groups by quantization damage on the probe frames, worst first (groups with nothing quantized
    are left out)."""
    tables = []
    for g, probe in zip(graphs, probes, strict=True):
        if options.mode == "static":
            assert g.cache is not None
            ranges = qgraph.read_ranges(g.cache)
            sqnr = tensor_sqnr(g.pre, ranges, probe, options.target)
            always = set(g.always_fp32)
            groups = {name: group for name, group in g.groups.items() if name not in always}
            tables.append(group_scores_from_tensors(g.pre, sqnr, groups))
        else:
            per_node = weight_sqnr(g.pre, g.groups)
            scores: dict[str, float] = {}
            for node, value in per_node.items():
                group = g.groups[node]
                scores[group] = min(scores.get(group, math.inf), value)
            tables.append(scores)
    return merge_scores(*tables)


def _record(
    bundle: Bundle,
    graphs: list[_Graph],
    options: QuantizeOptions,
    calibration: CalibrationSet | None,
    held_out_name: str,
    fp32_report: Any,
    metric: GateMetric,
    fp32_value: float,
    rounds: list[Round],
    sqnr: dict[str, float],
    candidate: Path,
) -> dict[str, Any]:
    final = rounds[-1]
    keep = options.keep_fp32
    sizes = {g.source.name: g.source.stat().st_size for g in graphs}
    sizes.update({g.out_name: (candidate / g.out_name).stat().st_size for g in graphs})
    kept_nodes = {
        g.out_name: sorted({*g.always_fp32, *qgraph.groups_to_nodes(g.groups, final.excluded_groups, keep)})
        for g in graphs
    }
    activations = {"cpu": "uint8 asymmetric, per tensor", "tensorrt": "int8 symmetric, per tensor"}[options.target]
    return {
        "mode": options.mode,
        "target": options.target,
        "weights": "int8 symmetric, per output channel",
        "activations": activations if options.mode == "static" else "float32 (weight-only)",
        "calibration": None if calibration is None else {
            "source": calibration.source, "frames": len(calibration), "method": "minmax",
        },
        "held_out": {"dataset": held_out_name, "n_images": fp32_report["n_images"]},
        "gate_metric": metric.key,
        "fp32": figures(fp32_report),
        "int8": final.int8,
        "drop_points": round(final.drop_points, 4),
        "bound_points": options.max_drop,
        "passed": True,
        "fallback_rounds": len(rounds) - 1,
        "rounds": [r.to_dict() for r in rounds],
        "kept_fp32": {
            "op_types": list(qgraph.KEPT_FP32_OP_TYPES),
            "requested": list(options.keep_fp32),
            "groups": final.excluded_groups,
            "nodes": kept_nodes,
        },
        "output_sqnr_db": sqnr,
        "sizes_bytes": sizes,
        "onnxruntime": _ort_version(),
        "measured": utc_now(),
        "command": options.command,
    }


def _ort_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)
