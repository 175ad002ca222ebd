"""``defectsam engine build``: build a bundle's TensorRT plans on this device, before the line starts.

The plans are built through engines/backends/tensorrt.py, exactly as the daemon would build them on
its first start, and cached under the same names (keyed by the ONNX checksum, precision, TensorRT
version and GPU), so the daemon then loads them in seconds. The bundle, precision and plan directory
default to the daemon's config (``--config``, else $DEFECTSAM_CONFIG, with DEFECTSAM__* overrides);
flags override them. stdout gets the plan paths, one per line; progress goes to stderr.

``--trtexec`` prints the equivalent ``trtexec`` command lines instead of building (same file names,
so the daemon loads plans built that way too).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from engines.backends import tensorrt as trt_backend
from engines.bundle import DEFAULT_BUNDLE_DIR, Bundle, load_bundle
from engines.errors import DefectsamError
from service.config import load_config
from service.config.loader import config_path_from_env
from service.config.models import DaemonConfig
from service.ops import setup_logging

TRTEXEC = "/usr/src/tensorrt/bin/trtexec"  # where JetPack (and the TensorRT images) install it
Graph = trt_backend.Graph
Shape = tuple[int, ...]


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("engine", help="build TensorRT engines (plans) on this device")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=type(parser))
    build = actions.add_parser("build", help="build and cache a bundle's TensorRT plans; print their paths",
                               description=__doc__.splitlines()[0])
    build.add_argument("--config", type=Path, default=None,
                       help="daemon config whose engine.bundle and tensorrt backend settings are the defaults "
                            "(default: $DEFECTSAM_CONFIG, else built-in defaults)")
    build.add_argument("--bundle", type=Path, default=None,
                       help="bundle directory (default: the config's engine.bundle, else the embedded default)")
    build.add_argument("--precision", choices=trt_backend.PRECISIONS, default=None,
                       help="fp16, int8 (explicit quantization: needs the bundle's QDQ graph) or fp32 "
                            "(default: the config's, else fp16)")
    build.add_argument("--plan-dir", type=Path, default=None,
                       help="where the plans are cached (default: the config's plan_dir, else beside the bundle)")
    build.add_argument("--workspace-mib", type=int, default=None, help="builder workspace in MiB (default: 1024)")
    build.add_argument("--device", type=int, default=None, help="CUDA device index (default: 0)")
    build.add_argument("--force", action="store_true", help="rebuild even when a cached plan loads")
    build.add_argument("--trtexec", action="store_true",
                       help="print the equivalent trtexec command lines (same plan paths); build nothing")
    build.set_defaults(run=run_build)


def build_config(config: DaemonConfig, args: argparse.Namespace) -> trt_backend.Config:
    """The TensorRT backend settings: the config's (when its backend is tensorrt), then the flags."""
    backend = config.engine.backend
    base = backend.model_dump() if isinstance(backend, trt_backend.Config) else {}
    flags = {"precision": args.precision, "plan_dir": args.plan_dir, "workspace_mib": args.workspace_mib,
             "device": args.device}
    return trt_backend.Config.model_validate({**base, **{k: v for k, v in flags.items() if v is not None},
                                              "build_on_open": True})


def graphs_of(bundle: Bundle) -> list[Graph]:
    return ["segment", "find"] if bundle.find_graph is not None else ["segment"]


def source_of(bundle: Bundle, graph: Graph, config: trt_backend.Config) -> Path:
    """The ONNX file the ``graph`` plan is built from; int8 without the bundle's QDQ graph fails here."""
    source = trt_backend.source_graph(bundle, config.precision, graph)
    if source is None:
        raise DefectsamError(f"{bundle.path}: bundle has no {graph} graph")
    return source


def trtexec_command(source: Path, plan: Path, config: trt_backend.Config,
                    profiles: dict[str, tuple[Shape, Shape, Shape]], trtexec: str = TRTEXEC) -> list[str]:
    """The trtexec (TensorRT 10) arguments that build what ``TensorRTEngine._build`` builds from ``source``.

    ``profiles``: (min, opt, max) shape per dynamic input (``tensorrt.profile_shapes``).
    """
    command = [trtexec, f"--onnx={source}", f"--saveEngine={plan}",
               f"--memPoolSize=workspace:{config.workspace_mib}", f"--device={config.device}", "--skipInference"]
    if config.precision in ("fp16", "int8"):
        command.append("--fp16")
    if config.precision == "int8":
        command.append("--int8")  # explicit quantization: the scales come from the graph's Q/DQ nodes
    for flag, which in (("--minShapes", 0), ("--optShapes", 1), ("--maxShapes", 2)):
        if profiles:
            shapes = ",".join(f"{name}:{'x'.join(str(d) for d in shape[which])}" for name, shape in profiles.items())
            command.append(f"{flag}={shapes}")
    return command


def graph_profiles(bundle: Bundle, graph: Graph, config: trt_backend.Config) -> dict[str, tuple[Shape, Shape, Shape]]:
    """The optimisation profile TensorRTEngine._build gives ``graph`` (reads the graph: needs onnx)."""
    _, profiles = trt_backend.checked_graph(bundle, source_of(bundle, graph, config), graph, config)
    return profiles


def print_trtexec(bundle: Bundle, config: trt_backend.Config) -> int:
    version, gpu, capability = trt_backend.device_identity(config.device)
    for graph in graphs_of(bundle):
        source = source_of(bundle, graph, config)
        plan = trt_backend.plan_path(bundle, config, version, gpu, capability, graph)
        print(shlex.join(trtexec_command(source, plan, config, graph_profiles(bundle, graph, config))))
    return 0


def _say(message: str) -> None:
    print(f"defectsam: {message}", file=sys.stderr, flush=True)


def run_build(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    setup_logging(config.logging)
    bundle = load_bundle(args.bundle or config.engine.bundle or DEFAULT_BUNDLE_DIR)
    trt_config = build_config(config, args)
    for graph in graphs_of(bundle):
        source_of(bundle, graph, trt_config)  # before TensorRT is needed
    if args.trtexec:
        return print_trtexec(bundle, trt_config)

    started = time.monotonic()
    built: list[str] = []

    def on_state(state: str) -> None:
        if state == "building":
            built.append(state)
            _say(f"building a TensorRT {trt_config.precision} plan of {bundle.manifest.name} "
                 f"(minutes on a Jetson) ...")

    if args.force:  # drop this device's cached plans (other GPUs' and precisions' stay)
        version, gpu, capability = trt_backend.device_identity(trt_config.device)
        for graph in graphs_of(bundle):
            trt_backend.plan_path(bundle, trt_config, version, gpu, capability, graph).unlink(missing_ok=True)
    engine = trt_backend.open_engine(bundle, trt_config, on_state=on_state)
    try:
        for graph in graphs_of(bundle):
            print(engine.plan_path(graph), flush=True)
        what = f"built in {time.monotonic() - started:.0f} s" if built else "already cached, nothing built"
        _say(f"{what}: {trt_config.precision} plan(s) for {engine.gpu_name}")
    finally:
        engine.close()
    if config.engine.backend.type != trt_backend.KEY and config_path_from_env(args.config) is not None:
        _say(f"note: the config's engine.backend.type is {config.engine.backend.type!r}: the daemon loads these "
             f"plans once it is 'tensorrt'")
    return 0
