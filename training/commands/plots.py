"""``defectsam-train plots RUN_DIR``: redraw a training run's results.png and val_overlays.png.

results.png comes from RUN_DIR/results.csv (a run from before results.csv existed: from its
metrics.jsonl, and results.csv is written from it); val_overlays.png from the run's best.pt
(``--checkpoint`` another) on the validation data of RUN_DIR/config.yaml, the config the trainer
wrote there. Both are what the trainer draws at the end of a run (training.runlog.plots).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from engines.errors import DefectsamError
from training.runlog.history import METRICS, RESULTS, RunHistory, read_metrics_jsonl, read_results
from training.runlog.plots import OVERLAY_SAMPLES


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "plots", help="redraw a training run's results.png and val_overlays.png (from results.csv and best.pt)",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the run directory (the config's out)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="checkpoint the overlays show (default RUN_DIR/best.pt, else RUN_DIR/last.pt)")
    parser.add_argument("--samples", type=int, default=OVERLAY_SAMPLES,
                        help=f"validation samples in val_overlays.png (default {OVERLAY_SAMPLES}; 0: none)")
    parser.set_defaults(run=run)


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    results = run_dir / RESULTS
    if results.is_file():
        try:
            return list(read_results(results))
        except (OSError, ValueError) as exc:
            raise DefectsamError(f"{results}: cannot be read: {exc}") from None
    records = read_metrics_jsonl(run_dir / METRICS)
    if not records:
        raise DefectsamError(f"{run_dir}: no {RESULTS} or {METRICS}: not a training run directory")
    history = RunHistory(run_dir)
    for record in records:
        history.add(record)
    history.write()
    print(f"{run_dir}: {RESULTS} written from {METRICS} (a run from before results.csv)")
    return history.records


def _model_and_val(run_dir: Path, checkpoint: Path | None) -> tuple[Any, Any, list[str], str]:
    """(model, val data, classes, title) for the overlays; model None (and why in the title) when there is none."""
    from training.config import load_config
    from training.data.registry import MergedDataset, build_dataset, build_find_dataset
    from training.model.build import build_finder, build_model, list_finders
    from training.model.checkpoint import load_weights, read_checkpoint
    from training.trainer import run_title

    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise DefectsamError(f"{config_path}: missing: the overlays need the run's config (its validation data)")
    config = load_config(config_path)
    if not config.data.val:
        return None, None, [], run_title(config)
    if checkpoint is None:
        checkpoint = next((p for p in (run_dir / "best.pt", run_dir / "last.pt") if p.is_file()), run_dir / "best.pt")
    payload = read_checkpoint(checkpoint)
    arch = str(payload["arch"])
    classes = [str(c) for c in payload.get("classes") or config.data.classes or ()]
    if arch in list_finders():
        model: Any = build_finder(arch)
        val: Any = build_find_dataset(config.data.val, crop=None, train=False)
    else:
        if not classes:
            raise DefectsamError(f"{checkpoint}: holds no class names (not a trainer's checkpoint)")
        model = build_model(arch, num_classes=len(classes))
        val = build_dataset(config.data.val)
        if list(val.class_names) != classes:
            val = MergedDataset([val], classes)
    load_weights(model, checkpoint, arch)
    return model, val, classes, run_title(config)


def run(args: argparse.Namespace) -> int:
    from training.runlog.plots import write_run_plots

    run_dir: Path = args.run_dir
    if not run_dir.is_dir():
        raise DefectsamError(f"{run_dir}: not a directory")
    if args.samples < 0:
        raise DefectsamError(f"--samples must be >= 0, got {args.samples}")
    rows = _rows(run_dir)
    model = val = None
    classes: list[str] = []
    title = run_dir.name
    if args.samples or args.checkpoint is not None:
        model, val, classes, title = _model_and_val(run_dir, args.checkpoint)
    written = write_run_plots(run_dir, rows, model, val, classes, title=title, samples=args.samples)
    if not written:
        raise DefectsamError(f"{run_dir / RESULTS}: no epoch with a value to draw")
    print(f"wrote {', '.join(str(run_dir / name) for name in written)}")
    return 0
