"""``defectsam-train``: data, teachers, distillation, evaluation and export of the student models.

    synth             render a synthetic defect data set (training.commands.synth)
    convert           write any dataset (mvtec, coco, yolo-seg...) in the folder layout (training.commands.convert)
    train             train a segmenter or a finder from a YAML config, any recipe (resumable; runs under torchrun)
    distill           the same, for a config whose recipe has a teacher (blog, nofeature, mobilesam, kdsam)
    cache-teacher     compute a teacher's embeddings and foreground logits once, on disk
    eval              evaluate a checkpoint or a bundle (training.commands.eval)
    compare           evaluate several bundles on the same data, one table side by side (training.commands.compare)
    calibrate         choose a bundle's score threshold on held-out data (training.commands.calibrate)
    quantize          add a gated INT8 variant to a bundle (training.commands.quantize)
    export            export a model or a trained checkpoint to an engine bundle (training.commands.export)
    export-reference  export the SAM 2 teacher (random weights) as one ONNX graph for benchmarks
    models            print the model family's parameters
    config            print every key of the training config
    reference         the reference run: teacher, students, bundles, INT8, eval, benchmark, report (training.reference)
    plots             redraw a run's results.png and val_overlays.png (training.commands.plots)

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

from engines.errors import DefectsamError
from training.commands.argtypes import positive_multiple_of_16
from training.model.build import (
    PARTS,
    build_finder,
    build_model,
    count_macs,
    count_parameters,
    list_finders,
    list_models,
    parameter_counts,
)


class UsageError(DefectsamError):
    """A flag whose value cannot be used."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        """One line on stderr and exit 2, instead of argparse's usage block."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="defectsam-train", description="defectsam training: data, teachers, distillation, evaluation, export."
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    models = sub.add_parser("models", help="print every registered model's parameters per part and its cost")
    models.add_argument("--window", type=positive_multiple_of_16, default=128,
                        help="window side the segmenters' MACs are counted at (default 128)")

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
    "training.commands.export", "training.commands.synth", "training.commands.convert",
    "training.commands.eval", "training.commands.calibrate", "training.commands.quantize",
    "training.reference.command",
    "training.commands.compare",
    "training.commands.plots",
)


def _add_training_commands(sub: Any) -> None:
    def config_flag(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--config", required=True, type=Path, help="training config YAML (docs/training.md)")
        parser.add_argument(
            "--set", action="append", default=[], metavar="KEY=VALUE",
            help="override a config key, e.g. --set schedule.epochs=2 (YAML value; repeatable)",
        )

    for command, helptext in (
        ("train", "train a segmenter or a finder with the config's recipe (resumes from OUT/last.pt; torchrun)"),
        ("distill", "train a student with a teacher recipe (blog, nofeature, mobilesam, kdsam); as train otherwise"),
    ):
        parser = sub.add_parser(command, help=helptext)
        config_flag(parser)
        parser.add_argument("--fresh", action="store_true", help="ignore OUT/last.pt and start over")
        parser.set_defaults(run=_cmd_train, command_name=command)

    cache = sub.add_parser(
        "cache-teacher", help="compute the config's teacher outputs for its training data once, into teacher.cache"
    )
    config_flag(cache)
    cache.set_defaults(run=_cmd_cache_teacher)

    reference = sub.add_parser("config", help="print every training config key with its default and meaning")
    reference.set_defaults(run=_cmd_config_reference)

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


def _cmd_train(args: argparse.Namespace) -> int:
    from training.config import TEACHER_RECIPES
    from training.trainer import train

    config = _load(args)
    if args.command_name == "distill" and config.recipe.name not in TEACHER_RECIPES:
        raise UsageError(
            f"{args.config}: distill is for recipes with a teacher ({', '.join(sorted(TEACHER_RECIPES))}); recipe "
            f"{config.recipe.name!r} trains on ground truth alone: run 'defectsam-train train'"
        )
    summary = train(config, fresh=args.fresh, log=lambda m: print(m, file=sys.stderr))
    if summary.get("world_size", 1) == 1 or _rank() == 0:
        print(f"trained {config.name}: checkpoints in {summary['out']} (best: {summary['checkpoint']})")
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
    teacher = build_teacher(config.teacher, num_classes=len(classes))
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
    header = ["model", *PARTS, "total", "GMAC/MP"]
    rows = []
    for name in list_models():
        model = build_model(name)
        counts = parameter_counts(model)
        macs = count_macs(model, args.window, args.window) / (args.window * args.window) * 1e6 / 1e9
        rows.append([name, *(f"{counts[p] / 1e6:.3f}M" for p in PARTS), f"{counts['total'] / 1e6:.3f}M", f"{macs:.2f}"])
    for name in list_finders():
        finder = build_finder(name)
        macs = count_macs(finder, 384, 672) / (384 * 672) * 1e6 / 1e9
        rows.append([f"{name} (finder)", *("" for _ in PARTS), f"{count_parameters(finder) / 1e6:.3f}M", f"{macs:.2f}"])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"parameters per part; multiply-accumulates per megapixel of input (segmenters at "
          f"{args.window}x{args.window} "
          "windows, finders at 384x672)")
    for row in [header, *rows]:
        cells = zip(row, widths, strict=True)
        print("  ".join(str(cell).rjust(w) if i else str(cell).ljust(w) for i, (cell, w) in enumerate(cells)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "models":
            return _cmd_models(args)
        return int(args.run(args) or 0)
    except DefectsamError as exc:
        print(f"defectsam-train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("defectsam-train: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
