"""``defectsam-train``: data, teachers, distillation, evaluation and export of the student models.

    synth             render a synthetic defect data set (training.commands.synth)
    finetune-teacher  train a teacher on labelled defects (dice + BCE on ground truth)
    cache-teacher     compute a teacher's embeddings and mask logits once, on disk
    distill           train a student with a recipe from a YAML config (resumable; runs under torchrun)
    eval              evaluate a checkpoint or a bundle (training.commands.eval)
    calibrate         choose a bundle's score threshold on held-out data (training.commands.calibrate)
    quantize          add a gated INT8 variant to a bundle (training.commands.quantize)
    export            export a model or a trained checkpoint to an engine bundle
    export-reference  export the SAM 2 teacher (random weights) as one ONNX graph for benchmarks
    models            print the model family's parameters
    config            print every key of the training config
    judge             the judge loop's cases offline: re-judge, review page, decisions, audit (training.judge.cli)
    reference         the reference run: teacher, students, bundles, INT8, eval, benchmark, report (training.reference)

Bad input (a flag, a file, a config key) is reported as one line on stderr naming it, with exit
status 2; a config error names the dotted key.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
        prog="defectsam-train", description="defectsam training: data, teachers, distillation, evaluation, export."
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    models = sub.add_parser("models", help="print every registered model's parameters per part")
    models.add_argument("--height", type=_positive_multiple_of_16, default=576, help="input height (default 576)")
    models.add_argument("--width", type=_positive_multiple_of_16, default=1024, help="input width (default 1024)")
    models.add_argument("--macs", action="store_true", help="also count multiply-accumulates of one fused pass")

    export = sub.add_parser(
        "export", help="export a model to an engine bundle (model.onnx, decoder.onnx, manifest.json)"
    )
    export.add_argument(
        "--arch", choices=list_models(), help="model name in the registry (default with --checkpoint: the checkpoint's)"
    )
    export.add_argument("--out", required=True, type=Path, help="bundle directory to write (replaced atomically)")
    weights = export.add_mutually_exclusive_group()
    weights.add_argument("--checkpoint", type=Path, help="trained checkpoint {'arch', 'config', 'model'} to export")
    weights.add_argument(
        "--random-init", action="store_true", help="export random weights (marked 'untrained' in the manifest)"
    )
    export.add_argument("--seed", type=int, default=0, help="random seed for --random-init (default 0)")
    export.add_argument(
        "--height", type=_positive_multiple_of_16, help="input height (default: the checkpoint's, else 576)"
    )
    export.add_argument(
        "--width", type=_positive_multiple_of_16, help="input width (default: the checkpoint's, else 1024)"
    )
    export.add_argument("--k", type=_positive_int, help="peaks (mask prompts) per frame (default: checkpoint or 8)")
    export.add_argument(
        "--classes", help=f"comma-separated class names (default: the checkpoint's, else {DEFAULT_CLASSES})"
    )
    export.add_argument("--name", help="bundle name in the manifest (default: the architecture name)")
    export.add_argument("--notes", default="", help="free text added to the manifest's provenance notes")

    _add_training_commands(sub)
    for module in _OPTIONAL_COMMANDS:
        try:
            importlib.import_module(module).add_parser(sub)
        except ModuleNotFoundError as exc:
            if exc.name != module:  # the module exists but something it imports is missing
                raise
    return parser


# Command modules of the data and evaluation half (each has add_parser(subparsers) setting run=).
_OPTIONAL_COMMANDS = (
    "training.commands.synth", "training.commands.eval", "training.commands.calibrate", "training.commands.quantize",
    "training.reference.command",
)


def _add_training_commands(sub: Any) -> None:
    def config_flag(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--config", required=True, type=Path, help="training config YAML (docs/training.md)")
        parser.add_argument(
            "--set", action="append", default=[], metavar="KEY=VALUE",
            help="override a config key, e.g. --set schedule.epochs=2 (YAML value; repeatable)",
        )

    distill = sub.add_parser(
        "distill", help="train a student with the config's recipe (resumes from OUT/last.pt; runs under torchrun)"
    )
    config_flag(distill)
    distill.add_argument("--fresh", action="store_true", help="ignore OUT/last.pt and start over")
    distill.set_defaults(run=_cmd_distill)

    finetune = sub.add_parser(
        "finetune-teacher", help="train the config's teacher on labelled defects (dice + BCE on ground truth)"
    )
    config_flag(finetune)
    finetune.add_argument("--fresh", action="store_true", help="ignore OUT/last.pt and start over (family teacher)")
    finetune.set_defaults(run=_cmd_finetune_teacher)

    cache = sub.add_parser(
        "cache-teacher", help="compute the config's teacher outputs for its training data once, into teacher.cache"
    )
    config_flag(cache)
    cache.set_defaults(run=_cmd_cache_teacher)

    reference = sub.add_parser("config", help="print every training config key with its default and meaning")
    reference.set_defaults(run=_cmd_config_reference)

    from training.judge.cli import add_parser as add_judge_parser

    add_judge_parser(sub)

    from training.export.reference import add_parser as add_reference_parser

    add_reference_parser(sub)


def _load(args: argparse.Namespace) -> Any:
    import yaml

    from training.config import ConfigError, load_config

    overrides: dict[str, Any] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set: expected KEY=VALUE, got {item!r}")
        try:
            overrides[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"--set {key}: value {value!r} is not valid YAML") from None
    return load_config(args.config, overrides)


def _cmd_distill(args: argparse.Namespace) -> int:
    from training.trainer import train

    config = _load(args)
    summary = train(config, fresh=args.fresh, log=lambda m: print(m, file=sys.stderr))
    if summary.get("world_size", 1) == 1 or _rank() == 0:
        print(f"trained {config.name}: checkpoints in {summary['out']} (best: {summary['checkpoint']})")
    return 0


def _cmd_finetune_teacher(args: argparse.Namespace) -> int:
    from training.teachers.finetune import family_finetune_config, finetune_sam2
    from training.trainer import train

    config = _load(args)
    if config.teacher is None:
        raise UsageError(f"{args.config}: finetune-teacher needs a 'teacher' section")
    if config.teacher.kind == "sam2":
        if config.teacher.checkpoint is None:
            raise UsageError(f"{args.config}: teacher.checkpoint: the local SAM 2 directory to fine-tune")
        target = finetune_sam2(config, log=lambda m: print(m, file=sys.stderr))
        print(f"fine-tuned SAM 2 teacher written to {target} (use it as teacher.checkpoint)")
        return 0
    summary = train(family_finetune_config(config), fresh=args.fresh, log=lambda m: print(m, file=sys.stderr))
    if _rank() == 0:
        print(f"teacher trained: {summary['checkpoint']} (use it as teacher.checkpoint, kind family)")
    return 0


def _cmd_cache_teacher(args: argparse.Namespace) -> int:
    import time

    import torch

    from training.teachers import build_teacher
    from training.trainer import cache_teacher, load_datasets

    config = _load(args)
    if config.teacher is None or config.teacher.cache is None:
        raise UsageError(f"{args.config}: cache-teacher needs teacher.checkpoint and teacher.cache in the config")
    started = time.monotonic()
    train_samples, _, classes = load_datasets(config)
    m = config.model
    teacher = build_teacher(config.teacher, height=m.height, width=m.width, num_classes=len(classes))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cache = cache_teacher(config, teacher, train_samples, classes, device)
    print(
        f"teacher cache {cache.path}: {len(cache.entries)} samples of {teacher.teacher_id} "
        f"({time.monotonic() - started:.1f} s)"
    )
    return 0


def _cmd_config_reference(args: argparse.Namespace) -> int:
    from training.config import reference

    print(reference())
    return 0


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", "0"))


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
    from training.model.checkpoint import load_weights, read_checkpoint

    if args.checkpoint is None and not args.random_init:
        raise UsageError("export: give --checkpoint PATH, or --random-init to export untrained weights")
    saved: dict[str, Any] = read_checkpoint(args.checkpoint) if args.checkpoint is not None else {}
    if args.arch is None:
        if not saved:
            raise UsageError("--arch: name the model to export with --random-init")
        args.arch = saved["arch"]
    stored = saved.get("config", {}) if saved.get("arch") == args.arch else {}
    args.height = args.height or int(stored.get("height", 576))
    args.width = args.width or int(stored.get("width", 1024))
    args.k = args.k or int(stored.get("k", 8))
    saved_classes = saved.get("classes")
    if args.classes is None:
        args.classes = ",".join(saved_classes) if isinstance(saved_classes, list) else DEFAULT_CLASSES
    classes = [c.strip() for c in args.classes.split(",")]
    if not all(classes) or len(set(classes)) != len(classes):
        raise UsageError(f"--classes: expected distinct non-empty comma-separated names, got {args.classes!r}")
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
    metrics = saved.get("metrics") if isinstance(saved.get("metrics"), dict) else None
    bundle = export_bundle(
        model, args.arch, args.out, name=args.name or args.arch, classes=classes, provenance=provenance,
        metrics={f"val_{k}": v for k, v in (metrics or {}).items() if isinstance(v, int | float)},
    )
    sizes = ", ".join(f"{n} {bundle.size_bytes(n) / 1e6:.1f} MB" for n in bundle.manifest.files)
    print(f"wrote {bundle.path} ({args.arch}, {bundle.manifest.parameters:,} parameters; {sizes})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "models":
            return _cmd_models(args)
        if args.command == "export":
            return _cmd_export(args)
        return int(args.run(args) or 0)
    except DefectsamError as exc:
        print(f"defectsam-train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("defectsam-train: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
