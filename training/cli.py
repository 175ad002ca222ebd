"""``defectsam-train``: list the model family, export engine bundles.

Bad input (a flag, a file) is reported as one line on stderr naming it, with exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from engines.bundle import sha256_file
from engines.errors import DefectsamError
from training.model.build import PARTS, build_model, count_macs, list_models, parameter_counts

DEFAULT_CLASSES = "scratch,dent,pinhole"


class UsageError(DefectsamError):
    """A flag whose value cannot be used."""


def _positive_multiple_of_16(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value <= 0 or value % 16:
        raise argparse.ArgumentTypeError(f"must be a positive multiple of 16, got {value}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        """One line on stderr and exit 2, instead of argparse's usage block."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="defectsam-train", description="defectsam training tools: the student models and their export."
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    models = sub.add_parser("models", help="print every registered model's parameters per part")
    models.add_argument("--height", type=_positive_multiple_of_16, default=576, help="input height (default 576)")
    models.add_argument("--width", type=_positive_multiple_of_16, default=1024, help="input width (default 1024)")
    models.add_argument("--macs", action="store_true", help="also count multiply-accumulates of one fused pass")

    export = sub.add_parser(
        "export", help="export a model to an engine bundle (model.onnx, decoder.onnx, manifest.json)"
    )
    export.add_argument("--arch", required=True, choices=list_models(), help="model name in the registry")
    export.add_argument("--out", required=True, type=Path, help="bundle directory to write (replaced atomically)")
    weights = export.add_mutually_exclusive_group()
    weights.add_argument("--checkpoint", type=Path, help="trained checkpoint {'arch', 'config', 'model'} to export")
    weights.add_argument(
        "--random-init", action="store_true", help="export random weights (marked 'untrained' in the manifest)"
    )
    export.add_argument("--seed", type=int, default=0, help="random seed for --random-init (default 0)")
    export.add_argument("--height", type=_positive_multiple_of_16, default=576, help="input height (default 576)")
    export.add_argument("--width", type=_positive_multiple_of_16, default=1024, help="input width (default 1024)")
    export.add_argument("--k", type=_positive_int, default=8, help="peaks (mask prompts) per frame (default 8)")
    export.add_argument(
        "--classes", default=DEFAULT_CLASSES, help=f"comma-separated class names (default {DEFAULT_CLASSES})"
    )
    export.add_argument("--name", help="bundle name in the manifest (default: the architecture name)")
    export.add_argument("--notes", default="", help="free text added to the manifest's provenance notes")
    return parser


def _cmd_models(args: argparse.Namespace) -> int:
    header = ["model", *PARTS, "total"] + (["GMACs"] if args.macs else [])
    rows = []
    for name in list_models():
        model = build_model(name, height=args.height, width=args.width)
        counts = parameter_counts(model)
        row = [name, *(f"{counts[p] / 1e6:.3f}M" for p in PARTS), f"{counts['total'] / 1e6:.3f}M"]
        if args.macs:
            row.append(f"{count_macs(model) / 1e9:.2f}")
        rows.append(row)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"parameters per part at {args.height}x{args.width}")
    for row in [header, *rows]:
        cells = zip(row, widths, strict=True)
        print("  ".join(str(cell).rjust(w) if i else str(cell).ljust(w) for i, (cell, w) in enumerate(cells)))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import torch

    from training.export.onnx import export_bundle
    from training.model.checkpoint import load_weights

    classes = [c.strip() for c in args.classes.split(",")]
    if not all(classes) or len(set(classes)) != len(classes):
        raise UsageError(f"--classes: expected distinct non-empty comma-separated names, got {args.classes!r}")
    if args.checkpoint is None and not args.random_init:
        raise UsageError("export: give --checkpoint PATH, or --random-init to export untrained weights")
    grid = (args.height // 16) * (args.width // 16)
    if args.k > grid:
        raise UsageError(f"--k: {args.k} is more than the {grid} heatmap cells of a {args.height}x{args.width} input")

    torch.manual_seed(args.seed)
    model = build_model(args.arch, height=args.height, width=args.width, num_classes=len(classes), k=args.k)
    if args.checkpoint is not None:
        payload = load_weights(model, args.checkpoint, args.arch)
        provenance = {
            "weights": "trained",
            "notes": args.notes,
            "checkpoint_sha256": sha256_file(args.checkpoint),
            **{key: payload[key] for key in ("teacher", "recipe") if isinstance(payload.get(key), str)},
        }
        if isinstance(payload.get("seed"), int):
            provenance["seed"] = payload["seed"]
    else:
        notes = "random stand-in weights (--random-init), not trained: masks and heatmaps are meaningless"
        provenance = {"weights": "untrained", "notes": f"{notes}. {args.notes}".strip(" ."), "seed": args.seed}
    bundle = export_bundle(
        model, args.arch, args.out, name=args.name or args.arch, classes=classes, provenance=provenance
    )
    sizes = ", ".join(f"{n} {bundle.size_bytes(n) / 1e6:.1f} MB" for n in bundle.manifest.files)
    print(f"wrote {bundle.path} ({args.arch}, {bundle.manifest.parameters:,} parameters; {sizes})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "models":
            return _cmd_models(args)
        return _cmd_export(args)
    except DefectsamError as exc:
        print(f"defectsam-train: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
