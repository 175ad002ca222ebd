"""``defectsam bench engine``: engine-only FPS and latency of bundles, side by side, in one run.

The ``mobilesam`` reference is a bundle like any other; build it once with
``defectsam-train export --arch mobilesam --random-init --out .cache/reference/mobilesam``
(random weights time the same as trained ones) and pass it with ``--reference``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from engines.atomic import write_text_atomic
from engines.backends.onnxruntime import Config as OnnxRuntimeConfig
from engines.benchmark import bench_bundles, machine_description, markdown_table
from engines.bundle import DEFAULT_BUNDLE_DIR, load_bundle
from engines.errors import BundleError, DefectsamError


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("bench", help="benchmarks (not timed tests)")
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="KIND", parser_class=type(parser))
    engine = kinds.add_parser("engine", help="engine-only FPS, latency p50/p99, parameters, file size",
                              description=__doc__.splitlines()[0])
    engine.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE_DIR,
                        help="the bundle under test (default: the embedded default bundle)")
    engine.add_argument("--reference", type=Path, action="append", default=[], metavar="BUNDLE",
                        help="a bundle to compare against in the same run (repeatable), e.g. a mobilesam export")
    engine.add_argument("--iterations", type=int, default=30, help="timed runs per bundle (default 30)")
    engine.add_argument("--warmup", type=int, default=3, help="untimed runs per bundle first (default 3)")
    engine.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: one per core)")
    engine.add_argument("--providers", default="cpu",
                        help="ONNX Runtime providers, comma-separated (cpu, cuda, tensorrt) or 'auto' (default cpu)")
    engine.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    engine.set_defaults(run=run_engine)


def run_engine(args: argparse.Namespace) -> int:
    if args.iterations < 1 or args.warmup < 0 or args.threads < 0:
        raise DefectsamError("--iterations must be >= 1, --warmup and --threads >= 0")
    providers: Any = "auto" if args.providers == "auto" else [p.strip() for p in args.providers.split(",")]
    try:
        config = OnnxRuntimeConfig(providers=providers, intra_op_threads=args.threads)
    except ValueError as exc:
        raise DefectsamError(f"--providers {args.providers!r}: expected cpu, cuda, tensorrt or auto") from exc
    bundles = [load_bundle(args.bundle)]
    for reference in args.reference:
        try:
            bundles.append(load_bundle(reference))
        except BundleError as exc:
            if not reference.exists():
                raise DefectsamError(
                    f"{reference}: reference bundle does not exist; build it with "
                    f"'defectsam-train export --arch mobilesam --random-init --out {reference}'"
                ) from None
            raise exc
    shapes = {(b.manifest.input.height, b.manifest.input.width) for b in bundles}
    if len(shapes) > 1:
        raise DefectsamError(f"bundles have different input sizes {sorted(shapes)}; compare at one size")
    machine = machine_description()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, onnxruntime {machine['onnxruntime']}, "
          f"threads {args.threads or 'auto'}; {args.iterations} timed runs per bundle in alternating blocks "
          f"after {args.warmup} warm-up")
    results = bench_bundles(bundles, config, warmup=args.warmup, iterations=args.iterations)
    print(markdown_table(results))
    first = results[0]
    for other in results[1:]:
        print(f"{first.name} / {other.name}: {first.fps_median / other.fps_median:.2f}x FPS (median latency "
              f"{first.latency_ms_p50:.1f} ms vs {other.latency_ms_p50:.1f} ms)")
    if args.json is not None:
        payload = {"machine": machine, "iterations": args.iterations, "warmup": args.warmup,
                   "threads": args.threads, "results": [r.to_dict() for r in results]}
        write_text_atomic(args.json, json.dumps(payload, indent=2) + "\n")
    return 0
