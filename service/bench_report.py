"""``defectsam bench report``: every benchmark in one run, on one machine: JSON and docs/benchmarks.md.

Three parts, in this order, in one process:

1. **Pipeline.** The daemon (``service.pipeline_bench``) on synthetic 2688x1520 frames streamed faster
   than the engine takes them, its PLC server on loopback: inspected FPS against engine-only FPS of
   its own engine (pair by pair), capture -> result and capture -> PLC registers written p50/p99,
   the cores it kept busy and its peak resident memory. It runs first, so that the graphs of part 2
   are not in the memory it reports.
2. **Engine only: the inspection designs and the teacher.** The student bundle at each precision it
   carries and in each inspection design asked for (windows from the find pass at the bundle's window
   and at other window sides, the full 1:1 tiling), each the whole inspection of the same 4 MP
   synthetic test frames (engines.benchmark), and the SAM 2 teacher's reference graph (one 1024x1024
   view and its prompts), all on ONNX Runtime with the same settings, timed in alternating blocks:
   latency p50/p99, FPS, windows per frame, cores busy, memory, FPS ratios.
3. **How cost grows.** The student's two graphs alone: the find pass on a 4 MP frame's find input,
   and the segment pass on batches of 1 to 24 windows: what each window adds to a frame's time.

The teacher's graph needs torch to make; ``make bench-report`` makes it under .cache/bench with
``defectsam-train export-reference`` and then runs this command. Random weights time as trained ones do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engines.backends.onnxruntime import Config as OnnxRuntimeConfig
from engines.benchmark import (
    BenchSubject,
    EngineBenchResult,
    ReferenceGraph,
    bench_engines,
    load_reference_graph,
    machine_description,
    reset_peak_rss,
    resident_mb,
)
from engines.bundle import Bundle, load_bundle, utc_now
from engines.errors import DefectsamError
from service.config import DaemonConfig

REPORT_SCHEMA_VERSION = 1
REGENERATE = "make bench-report"
# The field report this compares with: TensorRT on a Jetson Orin Nano (student INT8, mobilesam, SAM 2 small).
FIELD_REPORT_FPS = {"student": 31.0, "mobilesam": 18.0, "teacher": 0.8}
WINDOW_BATCHES: tuple[int, ...] = (1, 4, 8, 16, 24)


@dataclass(frozen=True)
class PipelinePlan:
    """The daemon run of part 1: ``config`` is used as given (``pipeline_config`` builds the usual one)."""

    config: DaemonConfig
    duration_s: float = 60.0
    warmup_s: float = 10.0
    rounds: int = 6
    engine_iterations: int = 30


@dataclass(frozen=True)
class ReportPlan:
    student: Path
    teacher: Path | None = None
    windows: Sequence[int] = ()  # other window sides to time in windows mode (the bundle's own always is)
    tiles: bool = True  # time the full 1:1 tiling too
    batches: Sequence[int] = WINDOW_BATCHES
    backend: OnnxRuntimeConfig = field(default_factory=lambda: OnnxRuntimeConfig(providers=["cpu"]))
    iterations: int = 30
    teacher_iterations: int = 10
    scaling_iterations: int = 20
    warmup: int = 3
    pipeline: PipelinePlan | None = None


def pipeline_config(
    base: DaemonConfig, *, bundle: Path, store: Path, frame: tuple[int, int], camera_fps: float,
    backend: OnnxRuntimeConfig | None = None,
) -> DaemonConfig:
    """``base`` with the synthetic camera at ``frame`` (width, height) and ``camera_fps``, the API and the
    PLC server on loopback (any free port), the store in ``store`` and the engine on ``bundle``; an
    ONNX Runtime backend takes ``backend``'s providers, threads and spin-wait (its precision stays)."""
    from service.capture.synthetic import Config as SyntheticCamera

    engine = base.engine.model_copy(update={"bundle": bundle})
    if backend is not None and isinstance(engine.backend, OnnxRuntimeConfig):
        engine = engine.model_copy(update={"backend": engine.backend.model_copy(update={
            "providers": backend.providers, "intra_op_threads": backend.intra_op_threads,
            "spin_wait": backend.spin_wait})})
    width, height = frame
    return base.model_copy(update={
        "camera": SyntheticCamera(width=width, height=height, fps=camera_fps),
        "engine": engine,
        "api": base.api.model_copy(update={"host": "127.0.0.1", "port": 0}),
        "store": base.store.model_copy(update={"enabled": True, "path": store}),
        "plc": base.plc.model_copy(update={"enabled": True, "host": "127.0.0.1", "port": 0}),
    })


def _row(role: str, result: EngineBenchResult) -> dict[str, Any]:
    return {"role": role, **result.to_dict()}


def _fps_ratios(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The first student row's FPS over every other row's."""
    students = [r for r in rows if r["role"] == "student"]
    if not students:
        return []
    base = students[0]
    return [
        {"student": _what(base), "other": _what(other), "other_role": other["role"],
         "fps_ratio": round(base["fps_median"] / other["fps_median"], 2)}
        for other in rows if other is not base
    ]


def _what(row: dict[str, Any]) -> str:
    how = f", {row['mode']} {row['window']} px" if row.get("mode") else ""
    return f"{row['name']} ({row['precision']}{how})"


def run_report(plan: ReportPlan, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the three parts and return the report (the JSON document)."""
    from engines.inspector import InspectionConfig

    if plan.iterations < 1 or plan.teacher_iterations < 1 or plan.scaling_iterations < 1 or plan.warmup < 0:
        raise DefectsamError("iterations must be >= 1 and warmup >= 0")
    student = load_bundle(plan.student)
    teacher = None if plan.teacher is None else _load_teacher(plan.teacher)
    report: dict[str, Any] = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "generated": utc_now(),
        "regenerate": REGENERATE,
        "machine": machine_description(),
        "settings": {
            "providers": plan.backend.providers, "threads": plan.backend.intra_op_threads,
            "spin_wait": plan.backend.spin_wait, "iterations": plan.iterations,
            "teacher_iterations": plan.teacher_iterations, "scaling_iterations": plan.scaling_iterations,
            "warmup": plan.warmup,
        },
        "field_report_fps": FIELD_REPORT_FPS,
    }

    if plan.pipeline is not None:
        from service.pipeline_bench import bench_pipeline

        p = plan.pipeline
        log(f"pipeline: the daemon, {p.duration_s:g} s in {p.rounds} windows after {p.warmup_s:g} s")
        result = bench_pipeline(p.config, duration_s=p.duration_s, warmup_s=p.warmup_s,
                                engine_iterations=p.engine_iterations, rounds=p.rounds)
        report["pipeline"] = {**result.to_dict(), "cpu_cores": round(result.cpu_percent / 100.0, 2),
                              "settings": {"duration_s": p.duration_s, "warmup_s": p.warmup_s, "rounds": p.rounds,
                                           "engine_iterations": p.engine_iterations}}

    designs: list[tuple[str, InspectionConfig, int | None]] = []
    if student.manifest.find is not None:
        designs.append(("student", InspectionConfig(mode="windows"), None))
        designs += [("design", InspectionConfig(mode="windows", window=w), None) for w in plan.windows
                    if w != student.manifest.segment.window]
    if plan.tiles or student.manifest.find is None:
        designs.append(("design" if designs else "student", InspectionConfig(mode="tiles"), plan.teacher_iterations))
    log(f"engine only: {student.manifest.name}, {len(designs)} design(s) x {len(student.manifest.precisions)} "
        "precision(s)" + (f" vs {teacher.path.name}" if teacher is not None else ""))
    subjects, roles = [], []
    for role, inspection, count in designs:
        for precision in student.manifest.precisions:
            subjects.append(BenchSubject(student, plan.backend.model_copy(update={"precision": precision}), count,
                                         inspection=inspection))
            roles.append(role)
    if teacher is not None:
        subjects.append(BenchSubject(teacher, plan.backend, plan.teacher_iterations))
        roles.append("teacher")
    peak_reset = reset_peak_rss()
    results = bench_engines(subjects, warmup=plan.warmup, iterations=plan.iterations)
    rows = [_row(role, r) for role, r in zip(roles, results, strict=True)]
    report["engine"] = {"rows": rows, "ratios": _fps_ratios(rows), "rss_mb_peak": round(resident_mb()[1], 1),
                        "peak_since_start": peak_reset}

    log(f"scaling: the find pass, and the segment pass on {', '.join(map(str, plan.batches))} windows")
    report["scaling"] = graph_costs(student, plan.backend, plan.batches, plan.scaling_iterations, plan.warmup)
    return report


def graph_costs(
    bundle: Bundle, backend: OnnxRuntimeConfig, batches: Sequence[int], iterations: int, warmup: int
) -> dict[str, Any]:
    """Median ms of the find graph on a 4 MP frame's find input and of the segment graph on ``batches``
    windows of the bundle's size, at each precision the bundle carries (random inputs: time is content-free)."""
    import functools
    import time

    import numpy as np

    from engines.backends import open_engine
    from engines.find import find_geometry

    window = bundle.manifest.segment.window
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {"window": window, "rows": []}
    for precision in bundle.manifest.precisions:
        engine = open_engine(bundle, backend.model_copy(update={"precision": precision}))
        try:
            def timed(run: Callable[[], object]) -> float:
                for _ in range(warmup):
                    run()
                times = []
                for _ in range(iterations):
                    start = time.perf_counter()
                    run()
                    times.append(time.perf_counter() - start)
                return round(float(np.median(times)) * 1000.0, 2)

            row: dict[str, Any] = {"precision": precision}
            if bundle.manifest.find is not None:
                geometry = find_geometry(2688, 1520, bundle.manifest.find.reduction)
                image = rng.standard_normal((1, 3, geometry.input_height, geometry.input_width), dtype=np.float32)
                row["find_ms"] = timed(functools.partial(engine.find, image))
                row["find_input"] = [geometry.input_height, geometry.input_width]
            segment = {}
            for batch in batches:
                windows = rng.standard_normal((batch, 3, window, window), dtype=np.float32)
                segment[str(batch)] = timed(functools.partial(engine.segment, windows))
            row["segment_ms"] = segment
            first, last = batches[0], batches[-1]
            row["ms_per_window"] = round((segment[str(last)] - segment[str(first)]) / max(1, last - first), 3)
            out["rows"].append(row)
        finally:
            engine.close()
    return out


def _load_teacher(path: Path) -> ReferenceGraph:
    if not path.exists():
        raise DefectsamError(f"{path}: teacher reference graph does not exist; make it with "
                             f"'defectsam-train export-reference --arch sam2_small --out {path}' (make bench-report)")
    return load_reference_graph(path)


# --- markdown ---------------------------------------------------------------------------------------

def _hw(hw: Sequence[int]) -> str:
    return f"{hw[0]}x{hw[1]}"


def _engine_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    lines = [
        "| model | role | precision | design | frame (model input) | windows / frame | params (M) | graphs (MB) "
        "| p50 ms | p99 ms | FPS (median) | cores busy | memory added (MB) |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        model_input = f" ({_hw(r['model_input_hw'])} letterbox)" if r.get("model_input_hw") else ""
        design = f"{r['mode']}, {r['window']} px" if r.get("mode") else f"{r['windows']:g} prompts"
        frame = f"{r['input_hw'][1]}x{r['input_hw'][0]}"
        lines.append(
            f"| {r['name']} | {r['role']} | {r['precision']} | {design} | {frame}{model_input} "
            f"| {r['windows']:g} | {r['parameters'] / 1e6:.2f} | {r['graph_bytes'] / 1e6:.1f} "
            f"| {r['latency_ms_p50']:.1f} | {r['latency_ms_p99']:.1f} | {r['fps_median']:.2f} "
            f"| {r['cpu_cores']:.2f} | {r['rss_mb_added']:.0f} |"
        )
    return lines


def _scaling_table(scaling: dict[str, Any], batches: Sequence[str]) -> list[str]:
    lines = ["| precision | find pass (4 MP) ms | " + " | ".join(f"{b} windows ms" for b in batches)
             + " | ms per extra window |",
             "|---|---:|" + "---:|" * len(batches) + "---:|"]
    for r in scaling["rows"]:
        find = f"{r['find_ms']:.1f}" if "find_ms" in r else "-"
        lines.append(f"| {r['precision']} | {find} | " + " | ".join(f"{r['segment_ms'][b]:.1f}" for b in batches)
                     + f" | {r['ms_per_window']:.2f} |")
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    """docs/benchmarks.md from a report: every figure comes from the report's own numbers."""
    machine, settings = report["machine"], report["settings"]
    threads = settings["threads"] or "one per core"
    providers = settings["providers"]
    providers = ", ".join(providers) if isinstance(providers, list) else providers
    spin = "on" if settings["spin_wait"] else "off"
    out = [
        "# Benchmarks",
        "",
        f"<!-- Generated by `defectsam bench report` on {report['generated']}; do not edit by hand. -->",
        f"Generated file: `{report['regenerate']}` regenerates it (it makes the reference and scaling graphs "
        "under `.cache/bench` with `defectsam-train`, then runs `defectsam bench report`, which writes this "
        "page and `out/bench/report.json`). Everything below comes from one run on one machine, "
        f"{report['generated']}:",
        "",
        f"- machine: {machine['cpu']}, {machine['cores']} cores, Python {machine['python']}, "
        f"ONNX Runtime {machine['onnxruntime']} ({providers} provider), intra-op threads: {threads}, spin-wait {spin}",
        "- random weights where the table says `untrained`: they time as trained weights do",
        "- not timed tests: figures vary with the machine's load; compare rows of one run, not runs",
        "",
    ]
    engine = report.get("engine")
    if engine is not None:
        rows = engine["rows"]
        out += [
            "## Engine only: the whole inspection of a 4 MP frame, by design, and the SAM 2 teacher",
            "",
            f"{settings['iterations']} timed inspections per row ({settings['teacher_iterations']} for the full tiling "
            f"and the SAM 2 teacher) after {settings['warmup']} warm-up, in alternating blocks, of the same 2688x1520 "
            "synthetic test frames in turn: the find input, the find graph, the windows it picks, their cutting, the "
            "segment graph, the merge and the defects (engines.benchmark). FPS from the median latency. Cores busy: "
            "the process's CPU time over wall time while the row ran. Memory added: resident memory that opening "
            "and warming up the row's session added. The teacher row is one SAM 2 view of 1024x1024 with its prompts "
            "(what the teacher costs per view; it would need several views to cover a 4 MP frame at 1:1).",
            "",
            *_engine_table(rows),
            "",
        ]
        for r in rows:
            if r.get("notes") and r["role"] == "teacher":
                out += [f"SAM 2 teacher: {r['notes']}.", ""]
        steps = [r for r in rows if r.get("steps_ms")]
        if steps:
            out += ["Median time of each step (ms):", "", "| row | " + " | ".join(
                ("preprocess", "find", "segment", "postprocess")) + " |", "|---|---:|---:|---:|---:|"]
            for r in steps:
                cells = " | ".join(f"{r['steps_ms'].get(k, 0.0):.1f}" for k in ("preprocess", "find", "segment",
                                                                                  "postprocess"))
                out.append(f"| {_what(r)} | {cells} |")
            out.append("")
        if engine["ratios"]:
            out += ["FPS ratios (this run):", ""]
            out += [f"- {q['student']} / {q['other']}: **{q['fps_ratio']:.2f}x**" for q in engine["ratios"]]
            out.append("")
        field_fps = report["field_report_fps"]
        out += [
            "The field report (TensorRT on a Jetson Orin Nano): student {s:g}, SAM 2 small {t:g} FPS, i.e. student / "
            "teacher {st:.1f}x.".format(s=field_fps["student"], t=field_fps["teacher"],
                                       st=field_fps["student"] / field_fps["teacher"]),
            f"Peak resident memory of this part (all its sessions open at once): {engine['rss_mb_peak']:.0f} MB.",
            "",
        ]
    pipeline = report.get("pipeline")
    if pipeline is not None:
        p = pipeline
        plc = ("-" if p["plc_latency_ms_p50"] is None
               else f"{p['plc_latency_ms_p50']:.2f} / {p['plc_latency_ms_p99']:.2f} ({p['plc_results']} results)")
        out += [
            f"## Pipeline: the daemon on {p['frame']} frames",
            "",
            f"`{p['bundle']}` ({p['precision']}) on {p['backend']}; the synthetic camera streams at "
            f"{p['camera_fps']:.1f} FPS, "
            + ("faster than the engine; " if p["camera_fps"] > p["engine_fps_median"] else
               "**not faster than the engine, so the camera bounds the pipeline and the ratio** (raise "
               "`--camera-fps`); ")
            + f"{p['window_s']:.0f} s of pipeline windows in "
            f"{len(p['rounds'])} rounds after {p['settings']['warmup_s']:g} s of warm-up, each followed by an "
            "engine-only slice on the daemon's own engine (docs/service.md, \"Measured\"). The PLC server runs on "
            "loopback; its latency is capture to the result registers written.",
            "",
            "| measure | value |",
            "|---|---:|",
            f"| pipeline FPS (inspected) | {p['pipeline_fps']:.2f} |",
            f"| engine-only FPS (same engine, median of the slices) | {p['engine_fps_median']:.2f} |",
            f"| pipeline / engine-only (median of the {len(p['rounds'])} pairs) | **{p['ratio']:.3f}** |",
            f"| capture -> result published p50 / p99 ms | {p['latency_ms_p50']:.1f} / {p['latency_ms_p99']:.1f} |",
            f"| capture -> PLC registers written p50 / p99 ms | {plc} |",
            f"| CPU: cores busy over the windows | {p['cpu_cores']:.2f} |",
            f"| resident memory start / end / peak MB | {p['rss_mb_start']:.0f} / {p['rss_mb_end']:.0f} / "
            f"{p['rss_mb_peak']:.0f} |",
            f"| frames captured / dropped at the slot | {p['frames_captured']} / {p['frames_dropped']} |",
            "",
        ]
    scaling = report.get("scaling")
    if scaling is not None and scaling.get("rows"):
        batches = list(scaling["rows"][0]["segment_ms"])
        out += ["## How cost grows: the two graphs alone", "",
                f"The find graph on a 4 MP frame's find input and the segment graph on batches of "
                f"{scaling['window']} px windows, {settings['scaling_iterations']} timed runs each (median): "
                "what each window the find pass asks for adds to a frame's time.", "",
                *_scaling_table(scaling, batches), ""]
    return "\n".join(out).rstrip() + "\n"
