"""``defectsam-train quantize BUNDLE --calib DIR|synthetic --n N``: add a gated INT8 variant to a bundle.

Static mode (default) quantizes weights and activations of both graphs (segment, find) to QDQ graphs with
ONNX Runtime, calibrated on what each graph is fed when the bundle inspects N frames; ``--mode
weight-only`` quantizes the weights alone. The INT8 graphs are measured against the FP32 graphs on
held-out frames through engines/ (semantic foreground mIoU, the gate metric); when the drop exceeds
``--max-drop`` points even after per-layer fallback, the command fails with exit status 2 and the bundle
is left byte for byte as it was. docs/quantization.md has the details.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from engines.errors import DefectsamError


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "quantize", help="add a gated INT8 (QDQ) variant to a bundle: calibrate, quantize, measure against FP32",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("bundle", type=Path, help="engine bundle directory (its FP32 graphs are quantized)")
    parser.add_argument(
        "--calib", default=None, metavar="DIR|synthetic",
        help="calibration frames: a folder of images (or its images/ subfolder), or 'synthetic' for rendered "
        "panels at seeds disjoint from the held-out ones (required for --mode static)",
    )
    parser.add_argument("--n", type=int, default=32, help="calibration frames (default 32)")
    parser.add_argument(
        "--mode", choices=("static", "weight-only"), default="static",
        help="static: INT8 weights and activations (default); weight-only: INT8 weights, FP32 compute",
    )
    parser.add_argument(
        "--target", choices=("cpu", "tensorrt"), default="cpu",
        help="cpu: uint8 asymmetric activations, fastest on ONNX Runtime CPU (default); "
        "tensorrt: int8 symmetric activations, the QDQ form TensorRT's explicit quantization takes",
    )
    parser.add_argument(
        "--held-out", default=None, metavar="SPEC",
        help="dataset the gate measures on (training.data specs, e.g. magnetic_tile:test); default: 40 synthetic "
        "4 MP test frames (seed 2000000) for a bundle of the synthetic classes",
    )
    parser.add_argument("--limit", type=int, default=None, help="measure an evenly spaced subset of N held-out images")
    parser.add_argument(
        "--max-drop", type=float, default=1.0,
        help="largest accepted drop of the gate metric (semantic foreground mIoU on the held-out set), "
        "in points (x100; default 1.0)",
    )
    parser.add_argument(
        "--max-fallback", type=int, default=4,
        help="fallback rounds, each keeping twice as many more of the worst-quantizing module groups in FP32 "
        "(default 4; 0: no fallback)",
    )
    parser.add_argument(
        "--keep-fp32", action="append", default=[], metavar="GROUP",
        help="keep a module group (e.g. model.decoder) or a node in FP32 from the start (repeatable)",
    )
    parser.add_argument("--probe-frames", type=int, default=2,
                        help="calibration frames the fallback ranking runs on (default 2)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from training.quantize import DEFAULT_KEEP_FP32, QuantizeOptions, quantize_bundle
    from training.quantize.graph import Mode

    mode: Mode = "weight_only" if args.mode == "weight-only" else "static"
    if mode == "static" and args.calib is None:
        raise DefectsamError("--calib: give a folder of calibration images, or 'synthetic' (static mode)")
    if not args.bundle.exists():
        raise DefectsamError(f"{args.bundle}: bundle directory does not exist")
    options = QuantizeOptions(
        calib=args.calib or "synthetic", n=args.n, mode=mode, target=args.target, held_out=args.held_out,
        limit=args.limit, max_drop=args.max_drop, max_fallback=args.max_fallback,
        keep_fp32=tuple(dict.fromkeys([*DEFAULT_KEEP_FP32, *args.keep_fp32])),
        probe_frames=args.probe_frames, command=_command(args),
    )
    bundle = quantize_bundle(args.bundle, options, log=lambda m: print(m, file=sys.stderr))
    record = bundle.manifest.metrics["quantization"]
    sizes = record["sizes_bytes"]
    key = record["gate_metric"]
    print(
        f"wrote {bundle.path}: {', '.join(f'{name} {size / 1e6:.2f} MB' for name, size in sizes.items())}; "
        f"{key} FP32 {_fmt(record['fp32'][key])} INT8 {_fmt(record['int8'][key])}, drop {record['drop_points']:.2f} "
        f"points (bound {record['bound_points']:.2f}), {len(record['kept_fp32']['groups'])} module group(s) kept FP32"
    )
    return 0


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"


def _command(args: argparse.Namespace) -> str:
    parts = ["defectsam-train", "quantize", "BUNDLE"]
    if args.calib is not None:
        parts += ["--calib", str(args.calib)]
    parts += ["--n", str(args.n), "--mode", args.mode, "--target", args.target]
    if args.held_out:
        parts += ["--held-out", args.held_out]
    if args.limit:
        parts += ["--limit", str(args.limit)]
    parts += ["--max-drop", f"{args.max_drop:g}", "--max-fallback", str(args.max_fallback)]
    for group in args.keep_fp32:
        parts += ["--keep-fp32", group]
    return shlex.join(parts)
