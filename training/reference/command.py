"""``defectsam-train reference --config F --out DIR``: the reference run, every step in order (resumable)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from engines.errors import DefectsamError


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "reference",
        help="the reference run: teacher, students, bundles, INT8, evaluation, benchmark and report (resumable)",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument(
        "--config", required=True, type=Path,
        help="reference config, e.g. training/configs/reference/reduced.yaml (docs/reference.md)",
    )
    parser.add_argument(
        "--out", required=True, type=Path,
        help="report directory: results.json, README.md, plots (checkpoints go to the config's 'runs')",
    )
    parser.add_argument(
        "--fresh", action="store_true", help="delete the config's runs directory first and redo every step"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a reference config key, e.g. --set student.schedule.epochs=2 (YAML value; repeatable)",
    )
    parser.add_argument(
        "--plan", action="store_true", help="list the steps and which are done; run nothing"
    )
    parser.set_defaults(run=run)


def _overrides(items: list[str]) -> dict[str, Any]:
    import yaml

    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise DefectsamError(f"--set: expected KEY=VALUE, got {item!r}")
        try:
            overrides[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise DefectsamError(f"--set {key}: value {value!r} is not valid YAML") from None
    return overrides


def run(args: argparse.Namespace) -> int:
    from training.reference.config import load_reference
    from training.reference.driver import ReferenceRun

    config = load_reference(args.config, _overrides(args.set))
    reference = ReferenceRun(config, args.out, source=args.config)
    if args.plan:
        for name, done in reference.status():
            print(f"{'done   ' if done else 'pending'}  {name}")
        return 0
    results = reference.run(fresh=args.fresh)
    reading = results["reading"]
    curve = (reading.get("teacher_curve") or {}).get("verdict", "-")
    print(
        f"reference run ({config.schedule}) written to {args.out}: on {reading['headline']}, "
        f"student/teacher {reading.get('student_teacher_ratio')}, "
        f"feature-term gain {_points(reading.get('feature_gain_points'))} points, "
        f"INT8 drop {_points(reading.get('int8_drop_points'))} points; teacher's val curve {curve}",
        file=sys.stdout,
    )
    return 0


def _points(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1f}"
