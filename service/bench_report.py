"""``defectsam bench report``: every benchmark in one run, on one machine: JSON and docs/benchmarks.md.

Three parts, in this order, in one process:

1. **Pipeline.** The daemon (``service.pipeline_bench``) on synthetic 2688x1520 frames streamed faster
   than the engine takes them, its PLC server on loopback: inspected FPS against engine-only FPS of
   its own engine (pair by pair), capture -> result and capture -> PLC registers written p50/p99,
   the cores it kept busy and its peak resident memory. It runs first, so that the graphs of part 2
   are not in the memory it reports.
2. **Engine only, against the reference architectures.** The student bundle at each precision it
   carries, the ``mobilesam`` reference bundle and the SAM 2 teacher's reference graph, all on ONNX
   Runtime with the same settings and the same 576x1024 input (SAM 2 letterboxes it to its 1024x1024
   square inside its graph), timed in alternating blocks: latency p50/p99, FPS, cores busy, memory,
   and FPS ratios student / mobilesam and student / teacher.
3. **How cost grows.** Bundles of the student's architecture at other input sizes, and at other K
   (prompts per frame), each series timed in alternating blocks.

The graphs of parts 2 and 3 need torch to make; ``make bench-report`` makes them under .cache/bench
with ``defectsam-train`` and then runs this command. Random weights time as trained ones do.
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
    mobilesam: Path | None = None
    teacher: Path | None = None
    sizes: Sequence[Path] = ()
    prompts: Sequence[Path] = ()
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


def _precision_subjects(bundle: Bundle, backend: OnnxRuntimeConfig, precisions: Sequence[str] | None = None,
                        iterations: int | None = None) -> list[BenchSubject]:
    chosen = bundle.manifest.precisions if precisions is None else precisions
    return [BenchSubject(bundle, backend.model_copy(update={"precision": p}), iterations) for p in chosen]


def _fps_ratios(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each student row's FPS over each reference row's (and latency the other way round)."""
    ratios = []
    for student in (r for r in rows if r["role"] == "student"):
        for reference in (r for r in rows if r["role"] != "student"):
            ratios.append({
                "student": f"{student['name']} ({student['precision']})",
                "reference": f"{reference['name']} ({reference['precision']})",
                "reference_role": reference["role"],
                "student_precision": student["precision"],
                "fps_ratio": round(student["fps_median"] / reference["fps_median"], 2),
            })
    return ratios


def _growth(rows: list[dict[str, Any]], key: Callable[[dict[str, Any]], float]) -> list[dict[str, Any]]:
    """Add, to each row, its ``key`` and its p50 latency over the first row's."""
    base_key, base_ms = key(rows[0]), rows[0]["latency_ms_p50"]
    for row in rows:
        row["size_ratio"] = round(key(row) / base_key, 3)
        row["latency_ratio"] = round(row["latency_ms_p50"] / base_ms, 3)
    return rows


def run_report(plan: ReportPlan, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the three parts and return the report (the JSON document)."""
    if plan.iterations < 1 or plan.teacher_iterations < 1 or plan.scaling_iterations < 1 or plan.warmup < 0:
        raise DefectsamError("iterations must be >= 1 and warmup >= 0")
    student = load_bundle(plan.student)
    hw = (student.manifest.input.height, student.manifest.input.width)
    mobilesam = None if plan.mobilesam is None else _load_reference_bundle(plan.mobilesam, hw)
    teacher = None if plan.teacher is None else _load_teacher(plan.teacher, hw)
    sizes = sorted((load_bundle(p) for p in plan.sizes),
                   key=lambda b: (b.manifest.input.height * b.manifest.input.width, b.manifest.k))
    prompts = sorted((load_bundle(p) for p in plan.prompts), key=lambda b: b.manifest.k)
    if len({(b.manifest.input.height, b.manifest.input.width) for b in prompts}) > 1:
        raise DefectsamError("--k-bundle: the K series must share one input size")
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

    log(f"engine only: {student.manifest.name}"
        + "".join(f" vs {ref.path.name}" for ref in (mobilesam, teacher) if ref is not None))
    subjects = _precision_subjects(student, plan.backend)
    roles = ["student"] * len(subjects)
    if mobilesam is not None:
        more = _precision_subjects(mobilesam, plan.backend)
        subjects += more
        roles += ["mobilesam"] * len(more)
    if teacher is not None:
        subjects.append(BenchSubject(teacher, plan.backend, plan.teacher_iterations))
        roles.append("teacher")
    peak_reset = reset_peak_rss()
    results = bench_engines(subjects, warmup=plan.warmup, iterations=plan.iterations)
    rows = [_row(role, r) for role, r in zip(roles, results, strict=True)]
    report["engine"] = {"input_hw": list(hw), "rows": rows, "ratios": _fps_ratios(rows),
                        "rss_mb_peak": round(resident_mb()[1], 1), "peak_since_start": peak_reset}

    scaling: dict[str, Any] = {}
    for series, bundles, key in (
        ("input_size", sizes, lambda r: r["input_hw"][0] * r["input_hw"][1]),
        ("prompts", prompts, lambda r: r["k"]),
    ):
        if not bundles:
            continue
        log(f"scaling ({series}): " + ", ".join(_label(b) for b in bundles))
        subjects = [s for b in bundles for s in _precision_subjects(b, plan.backend, [b.manifest.precision])]
        timed = bench_engines(subjects, warmup=plan.warmup, iterations=plan.scaling_iterations)
        scaling[series] = _growth([_row("scaling", r) for r in timed], key)
    if scaling:
        scaling["notes"] = [f"{b.manifest.name}: arch {b.manifest.arch}, the student is {student.manifest.arch}"
                            for b in {b.path: b for b in [*sizes, *prompts]}.values()
                            if b.manifest.arch != student.manifest.arch]
        report["scaling"] = scaling
    return report


def _label(bundle: Bundle) -> str:
    m = bundle.manifest
    return f"{m.input.height}x{m.input.width} K={m.k}"


def _load_reference_bundle(path: Path, hw: tuple[int, int]) -> Bundle:
    if not path.exists():
        raise DefectsamError(f"{path}: reference bundle does not exist; make it with 'defectsam-train export "
                             f"--arch mobilesam --random-init --out {path}' (make bench-report)")
    bundle = load_bundle(path)
    _check_input(path, (bundle.manifest.input.height, bundle.manifest.input.width), hw)
    return bundle


def _load_teacher(path: Path, hw: tuple[int, int]) -> ReferenceGraph:
    if not path.exists():
        raise DefectsamError(f"{path}: teacher reference graph does not exist; make it with "
                             f"'defectsam-train export-reference --arch sam2_small --out {path}' (make bench-report)")
    reference = load_reference_graph(path)
    _check_input(path, (reference.manifest.input.height, reference.manifest.input.width), hw)
    return reference


def _check_input(path: Path, got: tuple[int, int], hw: tuple[int, int]) -> None:
    """A reference is compared with the student at the student's input size only."""
    if got != hw:
        raise DefectsamError(f"{path}: input {got[0]}x{got[1]}, the student's is {hw[0]}x{hw[1]}; compare at one size")


# --- markdown ---------------------------------------------------------------------------------------

def _hw(hw: Sequence[int]) -> str:
    return f"{hw[0]}x{hw[1]}"


def _engine_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    lines = [
        "| model | role | arch | precision | weights | params (M) | graph (MB) | input (model input) | K "
        "| p50 ms | p99 ms | FPS (median) | cores busy | memory added (MB) |",
        "|---|---|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        model_input = f" ({_hw(r['model_input_hw'])} letterbox)" if r.get("model_input_hw") else ""
        lines.append(
            f"| {r['name']} | {r['role']} | {r['arch']} | {r['precision']} | {r['weights']} "
            f"| {r['parameters'] / 1e6:.2f} | {r['graph_bytes'] / 1e6:.1f} | {_hw(r['input_hw'])}{model_input} "
            f"| {r['k']} | {r['latency_ms_p50']:.1f} | {r['latency_ms_p99']:.1f} | {r['fps_median']:.2f} "
            f"| {r['cpu_cores']:.2f} | {r['rss_mb_added']:.0f} |"
        )
    return lines


def _scaling_table(rows: Sequence[dict[str, Any]], what: str) -> list[str]:
    header = "| input | K | arch | precision | p50 ms | p99 ms | FPS (median) | cores busy "
    if what == "input_size":
        header += "| pixels / first | latency / first |"
    else:
        header += "| K / first | latency / first |"
    lines = [header, "|---|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {_hw(r['input_hw'])} | {r['k']} | {r['arch']} | {r['precision']} | {r['latency_ms_p50']:.1f} "
            f"| {r['latency_ms_p99']:.1f} | {r['fps_median']:.2f} | {r['cpu_cores']:.2f} "
            f"| {r['size_ratio']:.2f}x | {r['latency_ratio']:.2f}x |"
        )
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
            f"## Engine only: the student against the reference architectures ({_hw(engine['input_hw'])})",
            "",
            f"{settings['iterations']} timed runs per row ({settings['teacher_iterations']} for the SAM 2 teacher) "
            f"after {settings['warmup']} warm-up, in alternating blocks; one preprocessed frame; FPS from the median "
            "latency. Cores busy: the process's CPU time over wall time while the row ran. Memory added: resident "
            "memory that opening and warming up the row's session added.",
            "",
            *_engine_table(rows),
            "",
        ]
        for r in rows:
            if r.get("notes") and r["role"] == "teacher":
                out += [f"SAM 2 teacher: {r['notes']}.", ""]
        if engine["ratios"]:
            out += ["FPS ratios (this run):", ""]
            out += [f"- {q['student']} / {q['reference']}: **{q['fps_ratio']:.2f}x**" for q in engine["ratios"]]
            out.append("")
        field_fps = report["field_report_fps"]
        out += [
            "The field report (TensorRT on a Jetson Orin Nano): student {s:g}, mobilesam {m:g}, SAM 2 small {t:g} FPS, "
            "i.e. student / mobilesam {sm:.2f}x and student / teacher {st:.1f}x.".format(
                s=field_fps["student"], m=field_fps["mobilesam"], t=field_fps["teacher"],
                sm=field_fps["student"] / field_fps["mobilesam"], st=field_fps["student"] / field_fps["teacher"]),
            f"Peak resident memory of this part (all its sessions open at once): {engine['rss_mb_peak']:.0f} MB.",
            "",
        ]
    pipeline = report.get("pipeline")
    if pipeline is not None:
        p = pipeline
        plc = ("-" if p["plc_latency_ms_p50"] is None
               else f"{p['plc_latency_ms_p50']:.1f} / {p['plc_latency_ms_p99']:.1f} ({p['plc_results']} results)")
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
    if scaling is not None:
        out += ["## How cost grows", "",
                f"Random-weight exports of the student's architecture, {settings['scaling_iterations']} timed runs "
                "per row in alternating blocks, each series in its own run; their own (FP32) graphs.", ""]
        if "input_size" in scaling:
            out += ["### Against input size", "", *_scaling_table(scaling["input_size"], "input_size"), ""]
        if "prompts" in scaling:
            out += ["### Against K (prompts per frame)", "", *_scaling_table(scaling["prompts"], "prompts"), ""]
        out += [f"Note: {note}." for note in scaling.get("notes", [])]
    return "\n".join(out).rstrip() + "\n"
