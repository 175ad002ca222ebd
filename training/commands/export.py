"""``defectsam-train export --out DIR (--checkpoint PATH | --random-init --arch A)``: write an engine bundle.

The segmenter checkpoint (or random weights of ``--arch``) and the finder (``--finder PATH``, or a random one
with ``--random-finder``; without one the bundle scans by tiles) are exported to ONNX and sealed with their
manifest by ``training.export.bundle.export_checkpoints``, which the reference run calls too. The bundle
directory is replaced atomically. docs/bundle.md has the layout.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from engines.errors import DefectsamError
from training.commands.argtypes import positive_int, positive_multiple_of_16
from training.model.build import list_models

DEFAULT_CLASSES = "scratch,dent,pinhole"


def add_parser(commands: Any) -> None:
    export = commands.add_parser(
        "export", help="export a segmenter (and a finder) to an engine bundle (segment.onnx, find.onnx, manifest.json)",
        description=__doc__.splitlines()[0],
    )
    export.add_argument("--out", required=True, type=Path, help="bundle directory to write (replaced atomically)")
    weights = export.add_mutually_exclusive_group()
    weights.add_argument("--checkpoint", type=Path, help="trained segmenter checkpoint {'arch', 'config', 'model'}")
    weights.add_argument(
        "--random-init", action="store_true", help="export random weights (marked 'untrained' in the manifest)"
    )
    export.add_argument("--finder", type=Path, help="trained finder checkpoint (without it the bundle scans by tiles)")
    export.add_argument("--random-finder", action="store_true", help="with --random-init: a random finder too")
    export.add_argument("--arch", choices=list_models(), help="segmenter to build for --random-init")
    export.add_argument("--seed", type=int, default=0, help="random seed for --random-init (default 0)")
    export.add_argument("--window", type=positive_multiple_of_16, default=None,
                        help="the bundle's default window side in pixels (default 128)")
    export.add_argument("--max-windows", type=positive_int, default=None,
                        help="the bundle's default most windows per frame (default 24)")
    export.add_argument(
        "--classes", help=f"comma-separated class names (default: the checkpoint's, else {DEFAULT_CLASSES})"
    )
    export.add_argument("--name", help="bundle name in the manifest (default: the architecture name)")
    export.add_argument("--notes", default="", help="free text added to the manifest's provenance notes")

    export.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import tempfile

    import torch

    from training.export.bundle import export_checkpoints
    from training.export.onnx import DEFAULT_MAX_WINDOWS, DEFAULT_WINDOW
    from training.model.build import build_finder
    from training.model.checkpoint import save_checkpoint

    if args.checkpoint is None and not args.random_init:
        raise DefectsamError("export: give --checkpoint PATH, or --random-init to export untrained weights")
    if args.random_init and args.arch is None:
        raise DefectsamError("--arch: name the segmenter to export with --random-init")
    if args.random_finder and not args.random_init:
        raise DefectsamError("--random-finder goes with --random-init (a trained bundle takes --finder PATH)")
    classes = None
    if args.classes is not None:
        classes = [c.strip() for c in args.classes.split(",")]
        if not all(classes) or len(set(classes)) != len(classes):
            raise DefectsamError(f"--classes: expected distinct non-empty comma-separated names, got {args.classes!r}")
    with tempfile.TemporaryDirectory(prefix="defectsam-finder-") as tmp:
        finder = args.finder
        if args.random_finder:
            torch.manual_seed(args.seed)
            finder = save_checkpoint(Path(tmp) / "finder.pt", "finder", build_finder("finder"))
        bundle = export_checkpoints(
            args.checkpoint, args.out, finder=finder, name=args.name, classes=classes, arch=args.arch,
            window=args.window or DEFAULT_WINDOW, max_windows=args.max_windows or DEFAULT_MAX_WINDOWS,
            notes=args.notes, seed=args.seed,
        )
    sizes = ", ".join(f"{n} {bundle.size_bytes(n) / 1e6:.2f} MB" for n in bundle.manifest.files)
    print(f"wrote {bundle.path} ({bundle.manifest.segment.arch}, {bundle.manifest.parameters:,} parameters; {sizes})")
    return 0
