"""The reference run's speed step: what each row costs on ONNX Runtime CPU, all rows in one run.

Two figures per row, at the row's precision (FP32, or the INT8 row's INT8 graphs):

* whole images: ``engines.benchmark.bench_engines`` times ``Inspector.inspect`` in mode ``whole``
  (the way the rows are evaluated) on ``bench.frames`` images of the headline test set (a NEU-Seg
  image is 200x200, one window padded to 208x208): cutting, the segment graph, the merge and the
  defects, every row in alternating blocks so that drift in a shared machine's speed falls on all of
  them alike. The table's images per second come from the median latency; ``segment_ms`` is the
  segment graph's median share of it.
* windows: ``service.bench_report.graph_costs``, the segment graph alone on a batch of 1 and of
  ``bench.batch`` windows of the bundle's side (128 px): ms per window in a batch, and the marginal
  cost of one more window (what a 4 MP frame's windows cost).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engines.bundle import load_bundle, utc_now
from engines.windows import whole_window
from training.reference.config import BenchSection


@dataclass(frozen=True)
class BenchRow:
    """A table row to time: its key, the bundle holding its graphs and the precision it runs at."""

    key: str
    bundle: Path
    precision: str


def measure(rows: Sequence[BenchRow], frames: Sequence[np.ndarray], settings: BenchSection, *,
            frames_from: str) -> dict[str, Any]:
    """Time every row (whole images, then the segment graph on windows); the bench.json record."""
    from engines.backends.onnxruntime import Config
    from engines.benchmark import BenchSubject, bench_engines, machine_description
    from engines.inspector import InspectionConfig
    from service.bench_report import graph_costs

    backend = Config(providers=["cpu"], intra_op_threads=settings.threads)
    bundles = {row.bundle: load_bundle(row.bundle) for row in rows}
    whole = InspectionConfig(mode="whole")
    subjects = [BenchSubject(bundles[row.bundle], backend.model_copy(update={"precision": row.precision}),
                             inspection=whole) for row in rows]
    timed = bench_engines(subjects, warmup=settings.warmup, iterations=settings.iterations, rounds=settings.rounds,
                          frames=list(frames))
    batches = (1, settings.batch)
    costs = {path: graph_costs(bundle, backend, batches, settings.iterations, settings.warmup)
             for path, bundle in bundles.items()}
    out_rows: dict[str, Any] = {}
    for row, result in zip(rows, timed, strict=True):
        cost = next(r for r in costs[row.bundle]["rows"] if r["precision"] == row.precision)
        per_batch = cost["segment_ms"][str(settings.batch)]
        steps = result.steps_ms or {}
        out_rows[row.key] = {
            "bundle": str(row.bundle),
            "precision": row.precision,
            "images_per_second": result.fps_median,
            "ms_per_image_p50": result.latency_ms_p50,
            "ms_per_image_p99": result.latency_ms_p99,
            "segment_ms_per_image": steps.get("segment"),
            "image_hw": list(result.input_hw),
            "cpu_cores": result.cpu_cores,
            "graph_bytes": result.graph_bytes,
            "window": costs[row.bundle]["window"],
            "segment_ms": cost["segment_ms"],
            "ms_per_window": round(per_batch / settings.batch, 3),
            "ms_per_extra_window": cost["ms_per_window"],
        }
    first = frames[0]
    padded = whole_window(int(first.shape[1]), int(first.shape[0]))  # the one window a whole image is
    return {
        "measured": utc_now(),
        "machine": machine_description(),
        "settings": settings.model_dump(),
        "frames": {"from": frames_from, "n": len(frames), "hw": [int(first.shape[0]), int(first.shape[1])],
                   "window_hw": [padded.height, padded.width]},
        "rows": out_rows,
        "markdown": markdown_table(out_rows, settings.batch),
    }


def markdown_table(rows: dict[str, Any], batch: int) -> str:
    """The log's view of bench.json: one line per row."""
    lines = ["| row | precision | images / s (whole) | ms / image | segment ms / image "
             f"| ms / window (batch {batch}) |", "|---|---|---:|---:|---:|---:|"]
    for key, r in rows.items():
        segment = "-" if r["segment_ms_per_image"] is None else f"{r['segment_ms_per_image']:.1f}"
        lines.append(f"| {key} | {r['precision']} | {r['images_per_second']:.1f} | {r['ms_per_image_p50']:.1f} | "
                     f"{segment} | {r['ms_per_window']:.2f} |")
    return "\n".join(lines)
