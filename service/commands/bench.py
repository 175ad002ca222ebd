"""``defectsam bench``: engine-only FPS and latency of bundles side by side, the daemon's pipeline, the PLC
latency, and ``bench report``, all of them in one run written to JSON and docs/benchmarks.md.

``bench engine``: the whole inspection of 4 MP synthetic test frames (both passes, engines.benchmark). A
bundle with an INT8 variant (``defectsam-train quantize``) is timed at FP32 and at INT8 in the same run by
default (``--precision all``), with the INT8 / FP32 ratio printed under the table; ``--modes`` and
``--windows`` time several inspection designs of each (windows from the find pass against a full tiling,
window sizes) in the same run. A reference graph (``defectsam-train export-reference --arch sam2_small``:
the SAM 2 teacher) or another bundle goes with ``--reference``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from engines.atomic import write_text_atomic
from engines.backends.onnxruntime import Config as OnnxRuntimeConfig
from engines.benchmark import (
    BenchSubject,
    bench_engines,
    describe,
    is_reference_graph,
    load_reference_graph,
    machine_description,
    markdown_table,
    precision_ratios,
)
from engines.bundle import DEFAULT_BUNDLE_DIR, load_bundle
from engines.errors import BundleError, DefectsamError
from engines.percentiles import quantile_ms


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("bench", help="benchmarks (not timed tests)")
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="KIND", parser_class=type(parser))
    engine = kinds.add_parser("engine", help="engine-only FPS, latency p50/p99, parameters, file size",
                              description="Engine-only FPS and latency of bundles, side by side, in one run.")
    engine.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE_DIR,
                        help="the bundle under test (default: the embedded default bundle)")
    engine.add_argument("--reference", type=Path, action="append", default=[], metavar="BUNDLE",
                        help="a bundle to compare against in the same run (repeatable), "
                             "or a reference graph (defectsam-train export-reference)")
    engine.add_argument("--iterations", type=int, default=30, help="timed runs per bundle (default 30)")
    engine.add_argument("--warmup", type=int, default=3, help="untimed runs per bundle first (default 3)")
    engine.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: one per core)")
    engine.add_argument("--spin-wait", action="store_true",
                        help="let ONNX Runtime's workers busy-wait between operators (backend.spin_wait; off in the "
                             "daemon by default: it costs engine-only time, gains the pipeline more; docs/service.md)")
    engine.add_argument("--providers", default="cpu",
                        help="ONNX Runtime providers, comma-separated (cpu, cuda, tensorrt) or 'auto' (default cpu)")
    engine.add_argument("--precision", default="all",
                        help="graphs to time, comma-separated: fp32, int8, or 'all' (default): every precision "
                             "each bundle carries, e.g. its FP32 graph and its INT8 variant side by side")
    engine.add_argument("--modes", default="auto",
                        help="inspection modes to time, comma-separated: auto, windows, tiles (default auto)")
    engine.add_argument("--windows", default="",
                        help="window sides to time, comma-separated pixels (default: each bundle's own)")
    engine.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    engine.set_defaults(run=run_engine)
    add_plc_parser(kinds)
    add_report_parser(kinds)

    pipeline = kinds.add_parser(
        "pipeline", help="the daemon's inspected FPS against engine-only FPS, latency, memory, in one run",
        description="The daemon itself on synthetic 4 MP frames streamed faster than the engine takes them, "
                    "its windows alternating with engine-only slices on the same engine: inspected FPS, "
                    "engine-only FPS, their ratio pair by pair, capture-to-result latency, memory and CPU.",
    )
    pipeline.add_argument("--config", type=Path, default=None,
                          help="daemon config file (default: built-in defaults; DEFECTSAM__* variables apply)")
    pipeline.add_argument("--bundle", type=Path, default=None, help="bundle (default: the config's, else the default)")
    pipeline.add_argument("--duration", type=float, default=60.0, help="measured window in seconds (default 60)")
    pipeline.add_argument("--warmup", type=float, default=10.0, help="seconds before the window opens (default 10)")
    pipeline.add_argument("--camera-fps", type=float, default=40.0,
                          help="synthetic camera rate, above the engine's FPS so the engine is the bottleneck "
                               "(default 40)")
    pipeline.add_argument("--engine-iterations", type=int, default=30,
                          help="engine-only timed runs per slice (default 30)")
    pipeline.add_argument("--rounds", type=int, default=6,
                          help="pipeline windows, each followed by an engine-only slice; the ratio is the median "
                               "of the pairs (default 6)")
    pipeline.add_argument("--no-store", action="store_true", help="keep no records (default: a temporary store)")
    pipeline.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    pipeline.set_defaults(run=run_pipeline)


def run_engine(args: argparse.Namespace) -> int:
    if args.iterations < 1 or args.warmup < 0 or args.threads < 0:
        raise DefectsamError("--iterations must be >= 1, --warmup and --threads >= 0")
    providers: Any = "auto" if args.providers == "auto" else [p.strip() for p in args.providers.split(",")]
    try:
        OnnxRuntimeConfig(providers=providers, intra_op_threads=args.threads)
    except ValueError as exc:
        raise DefectsamError(f"--providers {args.providers!r}: expected cpu, cuda, tensorrt or auto") from exc
    requested = [p.strip() for p in args.precision.split(",") if p.strip()]
    if not requested or any(p not in ("all", "fp32", "int8") for p in requested) or (
        "all" in requested and len(requested) > 1
    ):
        raise DefectsamError(f"--precision {args.precision!r}: expected 'all', or fp32 and/or int8 comma-separated")
    bundles = [load_bundle(args.bundle)]
    graphs = []
    for reference in args.reference:
        if is_reference_graph(reference):
            graphs.append(load_reference_graph(reference))
            continue
        try:
            bundles.append(load_bundle(reference))
        except BundleError as exc:
            if not reference.exists():
                raise DefectsamError(
                    f"{reference}: reference bundle does not exist; build it with "
                    f"'defectsam-train export --arch student_seg --random-init --random-finder --out {reference}'"
                ) from None
            raise exc
    inspections = _inspections(args.modes, args.windows)
    machine = machine_description()
    spin = ", spin-wait" if args.spin_wait else ""
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, onnxruntime {machine['onnxruntime']}, "
          f"threads {args.threads or 'auto'}{spin}; {args.iterations} timed inspections of 4 MP synthetic test frames "
          f"per row in alternating blocks after {args.warmup} warm-up")
    subjects = []
    for bundle in bundles:
        have = bundle.manifest.precisions
        for precision in have if requested == ["all"] else requested:
            if precision not in have:
                raise DefectsamError(f"{bundle.path}: --precision {precision}: the bundle has {', '.join(have)} "
                                     "graphs only (defectsam-train quantize adds int8)")
            config = OnnxRuntimeConfig(providers=providers, intra_op_threads=args.threads, spin_wait=args.spin_wait,
                                       precision=precision)  # type: ignore[arg-type]
            subjects += [BenchSubject(bundle, config, inspection=inspection) for inspection in inspections]
    graph_config = OnnxRuntimeConfig(providers=providers, intra_op_threads=args.threads, spin_wait=args.spin_wait)
    subjects += [BenchSubject(graph, graph_config) for graph in graphs]
    results = bench_engines(subjects, warmup=args.warmup, iterations=args.iterations)
    print(markdown_table(results))
    for line in precision_ratios(results):
        print(line)
    first = results[0]
    for other in results[1:]:
        if other.precision != first.precision:  # precision_ratios compares precisions like for like
            continue
        print(f"{describe(first)} / {describe(other)}: {first.fps_median / other.fps_median:.2f}x FPS (median latency "
              f"{first.latency_ms_p50:.1f} ms vs {other.latency_ms_p50:.1f} ms)")
    if args.json is not None:
        payload = {"machine": machine, "iterations": args.iterations, "warmup": args.warmup,
                   "threads": args.threads, "spin_wait": args.spin_wait, "results": [r.to_dict() for r in results]}
        write_text_atomic(args.json, json.dumps(payload, indent=2) + "\n")
    return 0


def _inspections(modes: str, windows: str) -> list[Any]:
    """One InspectionConfig per mode x window side asked for (DefectsamError naming the flag otherwise)."""
    from engines.inspector import InspectionConfig

    mode_list = [m.strip() for m in modes.split(",") if m.strip()]
    if not mode_list or any(m not in ("auto", "windows", "tiles") for m in mode_list):
        raise DefectsamError(f"--modes {modes!r}: expected auto, windows and/or tiles, comma-separated")
    sides: list[int | None] = []
    for part in (p.strip() for p in windows.split(",") if p.strip()):
        if not part.isdigit() or int(part) < 16 or int(part) % 16:
            raise DefectsamError(f"--windows {windows!r}: expected window sides in pixels, multiples of 16")
        sides.append(int(part))
    return [InspectionConfig(mode=m, window=w) for m in mode_list for w in (sides or [None])]  # type: ignore[arg-type]


def run_pipeline(args: argparse.Namespace) -> int:
    import tempfile

    from service.config import load_config
    from service.ops import tune_allocator
    from service.pipeline_bench import bench_pipeline, markdown_report

    tune_allocator()  # as the daemon does
    with tempfile.TemporaryDirectory(prefix="defectsam-bench-") as scratch:
        config = load_config(args.config)
        changes: dict[str, Any] = {
            "api": config.api.model_copy(update={"host": "127.0.0.1", "port": 0}),
            "store": config.store.model_copy(update={"enabled": not args.no_store, "path": Path(scratch) / "store"}),
        }
        if args.bundle is not None:
            changes["engine"] = config.engine.model_copy(update={"bundle": args.bundle})
        if config.camera.type == "synthetic":
            changes["camera"] = config.camera.model_copy(update={"fps": args.camera_fps})
        config = config.model_copy(update=changes)
        result = bench_pipeline(config, duration_s=args.duration, warmup_s=args.warmup,
                                engine_iterations=args.engine_iterations, rounds=args.rounds)
    print(markdown_report(result))
    if args.json is not None:
        payload = {"machine": machine_description(), **result.to_dict()}
        write_text_atomic(args.json, json.dumps(payload, indent=2) + "\n")
    return 0


def add_plc_parser(kinds: Any) -> None:
    plc = kinds.add_parser("plc", help="capture-to-register-update latency p50/p99 of a real daemon's PLC map",
                           description="Run a real daemon (synthetic camera, free run) with the Modbus server on "
                                       "loopback and measure capture -> result registers written, per result.")
    plc.add_argument("--bundle", type=Path, default=None, help="engine bundle (default: the embedded bundle)")
    plc.add_argument("--width", type=int, default=1024, help="synthetic frame width (default 1024)")
    plc.add_argument("--height", type=int, default=576, help="synthetic frame height (default 576)")
    plc.add_argument("--fps", type=float, default=10.0, help="synthetic camera frame rate (default 10)")
    plc.add_argument("--results", type=int, default=100, help="results to measure (default 100)")
    plc.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    plc.set_defaults(run=run_plc)


def run_plc(args: argparse.Namespace) -> int:
    """Capture -> registers (server side, at the writer's step) and a polling client's view of the same."""
    import tempfile
    import time

    from pymodbus.client import ModbusTcpClient

    from service.app import Daemon
    from service.config import DaemonConfig
    from service.ops import SystemdNotifier
    from service.plc.registers import BY_NAME, INPUT_WORDS, get

    if args.results < 1:
        raise DefectsamError("--results must be >= 1")
    with tempfile.TemporaryDirectory() as store:
        config = DaemonConfig.model_validate({
            "camera": {"type": "synthetic", "width": args.width, "height": args.height, "fps": args.fps},
            "engine": {"bundle": str(args.bundle) if args.bundle else None,
                       "backend": {"type": "onnxruntime", "providers": ["cpu"], "intra_op_threads": args.threads}},
            "api": {"host": "127.0.0.1", "port": 0},
            "store": {"enabled": False, "path": store},
            "plc": {"enabled": True, "host": "127.0.0.1", "port": 0},
        })
        daemon = Daemon(config, notifier=SystemdNotifier({}))
        daemon.start()
        try:
            if daemon.wait_engine(120.0) != "ready" or daemon.plc is None:
                raise DefectsamError("the engine did not load")
            client = ModbusTcpClient("127.0.0.1", port=daemon.plc.port or 0, timeout=3)
            client.connect()
            server_mark, publish_mark = daemon.plc.latencies.cursor(), daemon.plc.publish_latencies.cursor()
            seen, last, polled = 0, None, []
            deadline = time.monotonic() + 30 + args.results * 5 / args.fps
            while len(daemon.plc.latencies.since(server_mark)) < args.results and time.monotonic() < deadline:
                words = list(client.read_input_registers(0, count=INPUT_WORDS, device_id=1).registers)
                iid = get(words, BY_NAME["inspection_id"])
                if iid != last:
                    last, seen = iid, seen + 1
                    latest = daemon.latest()
                    if latest is not None and latest.inspection_id == iid and latest.times.captured:
                        polled.append(time.monotonic() - latest.times.captured)
                time.sleep(0.001)
            client.close()
            server_side = daemon.plc.latencies.since(server_mark)
            publish_side = daemon.plc.publish_latencies.since(publish_mark)
            snap = daemon.snapshot()
            end_to_end = snap.pipeline.latency["end_to_end"]
        finally:
            daemon.stop()
    if not server_side:
        raise DefectsamError("no results were written to the registers")

    print(f"daemon: synthetic camera {args.width}x{args.height} at {args.fps:g} fps, engine "
          f"{snap.engine.bundle} input {snap.engine.input}, onnxruntime cpu x{args.threads}")
    print("\n".join(plc_latency_rows({
        "capture -> result registers written (server)": server_side,
        "published by the pipeline -> result registers written": publish_side,
        "capture -> seen by a polling Modbus client (1 ms poll)": polled,
    })))
    print(f"| pipeline end_to_end (capture -> published), recent | {end_to_end.count} | "
          f"{end_to_end.recent_p50_ms} | p95 {end_to_end.recent_p95_ms} |")
    return 0


def plc_latency_rows(samples: dict[str, list[float]]) -> list[str]:
    """``bench plc``'s table: per measurement (samples in seconds) the count, p50 and p99 in ms."""
    def cell(values: list[float], q: float) -> str:
        value = quantile_ms(values, q)
        return "-" if value is None else f"{value:.2f}"

    rows = ["| measurement | results | p50 ms | p99 ms |", "|---|---|---|---|"]
    rows += [f"| {name} | {len(values)} | {cell(values, 0.5)} | {cell(values, 0.99)} |"
             for name, values in samples.items()]
    return rows


def _frame(text: str) -> tuple[int, int]:
    width, sep, height = text.lower().partition("x")
    try:
        size = int(width), int(height)
    except ValueError:
        size = (0, 0)
    if not sep or min(size) < 32:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 2688x1520, got {text!r}")
    return size


def add_report_parser(kinds: Any) -> None:
    report = kinds.add_parser(
        "report", help="everything in one run: the inspection designs vs the SAM 2 teacher, pipeline, PLC latency, "
                       "cost per window; JSON and docs/benchmarks.md",
        description="Every benchmark in one run on one machine: the student's inspection designs (windows from the "
                    "find pass, other window sides, the full tiling) and the SAM 2 teacher (engine only), the "
                    "daemon's pipeline and PLC latency, and what each window costs; written to JSON and markdown "
                    "(docs/benchmarks.md). 'make bench-report' prepares the teacher's graph and runs it.",
    )
    report.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE_DIR,
                        help="the student bundle (default: the embedded default bundle), at every precision it has")
    report.add_argument("--teacher", type=Path, default=None, metavar="DIR",
                        help="the SAM 2 teacher's reference graph (defectsam-train export-reference --arch sam2_small)")
    report.add_argument("--windows", default="192",
                        help="other window sides to time in windows mode, comma-separated pixels (default 192)")
    report.add_argument("--no-tiles", action="store_true", help="leave the full 1:1 tiling out (it is slow)")
    report.add_argument("--iterations", type=int, default=30, help="timed runs per engine row (default 30)")
    report.add_argument("--teacher-iterations", type=int, default=10,
                        help="timed runs of the full tiling and of the SAM 2 teacher, seconds each (default 10)")
    report.add_argument("--scaling-iterations", type=int, default=20, help="timed runs per scaling row (default 20)")
    report.add_argument("--warmup", type=int, default=3, help="untimed runs per row first (default 3)")
    report.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: one per core)")
    report.add_argument("--spin-wait", action="store_true", help="ONNX Runtime workers busy-wait between operators")
    report.add_argument("--providers", default="cpu", help="ONNX Runtime providers, comma-separated (default cpu)")
    report.add_argument("--config", type=Path, default=None,
                        help="daemon config for the pipeline part (default: built-in defaults); its camera, API, "
                             "store and PLC are replaced by the benchmark's")
    report.add_argument("--frame", type=_frame, default=(2688, 1520), metavar="WxH",
                        help="synthetic camera frame size for the pipeline part (default 2688x1520)")
    report.add_argument("--camera-fps", type=float, default=40.0,
                        help="synthetic camera rate, above the engine's FPS so the camera never bounds the pipeline "
                             "(default 40)")
    report.add_argument("--duration", type=float, default=60.0, help="pipeline windows in seconds (default 60)")
    report.add_argument("--pipeline-warmup", type=float, default=10.0,
                        help="seconds of pipeline before the windows (default 10)")
    report.add_argument("--rounds", type=int, default=6, help="pipeline windows / engine slices (default 6)")
    report.add_argument("--engine-iterations", type=int, default=30,
                        help="engine-only timed runs per slice of the pipeline part (default 30)")
    report.add_argument("--json", type=Path, default=Path("out/bench/report.json"),
                        help="the report as JSON (default out/bench/report.json)")
    report.add_argument("--markdown", type=Path, default=Path("docs/benchmarks.md"),
                        help="the report as markdown (default docs/benchmarks.md)")
    report.set_defaults(run=run_report)


def run_report(args: argparse.Namespace) -> int:
    import tempfile

    from service.bench_report import PipelinePlan, ReportPlan, pipeline_config, render_markdown
    from service.bench_report import run_report as run
    from service.config import load_config
    from service.ops import tune_allocator

    if args.threads < 0 or args.rounds < 1 or args.engine_iterations < 1 or args.duration <= 0:
        raise DefectsamError("--threads must be >= 0, --rounds and --engine-iterations >= 1, --duration > 0")
    providers: Any = "auto" if args.providers == "auto" else [p.strip() for p in args.providers.split(",")]
    try:
        backend = OnnxRuntimeConfig(providers=providers, intra_op_threads=args.threads, spin_wait=args.spin_wait)
    except ValueError as exc:
        raise DefectsamError(f"--providers {args.providers!r}: expected cpu, cuda, tensorrt or auto") from exc
    if args.teacher is None:
        print("note: no --teacher: the report leaves the SAM 2 teacher out (make bench-report prepares it)")
    sides = [i.window for i in _inspections("windows", args.windows) if i.window is not None]
    tune_allocator()  # as the daemon does
    with tempfile.TemporaryDirectory(prefix="defectsam-bench-") as scratch:
        daemon = pipeline_config(load_config(args.config), bundle=args.bundle, store=Path(scratch) / "store",
                                 frame=args.frame, camera_fps=args.camera_fps, backend=backend)
        plan = ReportPlan(
            student=args.bundle, teacher=args.teacher, windows=sides, tiles=not args.no_tiles,
            backend=backend, iterations=args.iterations,
            teacher_iterations=args.teacher_iterations, scaling_iterations=args.scaling_iterations,
            warmup=args.warmup,
            pipeline=PipelinePlan(config=daemon, duration_s=args.duration, warmup_s=args.pipeline_warmup,
                                  rounds=args.rounds, engine_iterations=args.engine_iterations),
        )
        report = run(plan, log=lambda line: print(line, flush=True))
    markdown = render_markdown(report)
    write_text_atomic(args.json, json.dumps(report, indent=2) + "\n")
    write_text_atomic(args.markdown, markdown)
    print(markdown)
    print(f"wrote {args.json} and {args.markdown}")
    return 0
