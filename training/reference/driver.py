"""The reference run's driver: every step of the table in order, each skipped when its output is there.

    train-teacher -> cache-teacher -> train-<student>... -> export-<run>... -> calibrate-<run>...
    -> quantize-<of> -> eval-<row>-<test set>... -> bench -> report (always)

Each step calls the functions the ``defectsam-train`` commands call, in this process: the trainer
(``train``, ``cache_teacher``), ``export_checkpoints``, the calibration sweep (in inspection mode
whole, training/reference/thresholds.py), ``quantize_bundle``, ``evaluate_bundle`` and the benchmark
(training/reference/bench.py). A step is done when ``RUNS/steps.json`` records it and its output
exists; an interrupted training run resumes from its ``last.pt``. ``fresh`` deletes ``RUNS`` first
(only a directory this driver made: it holds ``.defectsam-reference``).

Layout of ``RUNS`` (config ``runs``, ignored by git):

    teacher/                 the teacher's training run (best.pt, last.pt, metrics.jsonl)
    cache/                   its embeddings and foreground logits (training.teachers.cache)
    students/<run>/          one student run per row (best.pt, metrics.jsonl)
    bundles/<run>/           the bundles (no finder: they inspect whole images), calibrated; INT8 added to int8.of
    calib/                   the INT8 calibration images (PNG, evenly spaced over data.train)
    data/val.yaml            the validation spec, for the INT8 gate
    eval/<row>__<set>.json   each row's evaluation report on each test set (through engines/, mode whole)
    bench.json               the benchmark of every row
    quantize.json            the INT8 gate's outcome
    steps.json               the steps done and their seconds
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from engines.atomic import write_text_atomic
from engines.bundle import load_bundle, utc_now
from engines.errors import DefectsamError
from engines.inspector import InspectionConfig
from training.config import CACHEABLE_RECIPES, TEACHER_RECIPES, ConfigError, TrainConfig, parse_config
from training.reference.config import ReferenceConfig, StudentRun
from training.reference.report import read_json

MARKER = ".defectsam-reference"
STEPS_FILE = "steps.json"
#: How every row is evaluated: each image is one window, padded to a multiple of 16 (as the NEU-Seg papers do).
WHOLE = InspectionConfig(mode="whole")
# The gate's bound for the ungated copy the table measures when the real gate refuses (no bound at all).
UNGATED_DROP = 1e6


class ReferenceRunError(DefectsamError):
    """A step of the reference run that cannot go on (one line naming the step)."""


@dataclass(frozen=True)
class Row:
    """One row of the table."""

    key: str  # results.json key: "teacher", a student run's key, "<run>_int8"
    label: str
    kind: Literal["teacher", "student", "int8"]
    run: str  # the training run whose weights it is: "teacher" or a student run's key
    precision: Literal["fp32", "int8"]
    recipe: str


@dataclass(frozen=True)
class Step:
    name: str
    action: Callable[[], Any]
    output: Callable[[], bool]  # True when the step's output is present


class ReferenceRun:
    """The steps of one reference config; ``run()`` does the missing ones and writes the report."""

    def __init__(
        self, config: ReferenceConfig, out: Path | str, *, source: Path | str = "config",
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.out = Path(out)
        self.source = Path(source)
        self.runs = config.runs
        self.log = log or (lambda message: print(message, file=sys.stderr, flush=True))

    # -- paths --------------------------------------------------------------------------------------
    @property
    def teacher_dir(self) -> Path:
        return self.runs / "teacher"

    def student_dir(self, key: str) -> Path:
        return self.runs / "students" / key

    def run_dir(self, run: str) -> Path:
        """The training run directory of ``run`` ("teacher" or a student key)."""
        return self.teacher_dir if run == "teacher" else self.student_dir(run)

    def checkpoint(self, run: str) -> Path:
        return self.run_dir(run) / "best.pt"

    @property
    def cache_root(self) -> Path:
        return self.runs / "cache"

    def bundle_dir(self, run: str) -> Path:
        return self.runs / "bundles" / run

    def eval_path(self, row: str, test: str) -> Path:
        return self.runs / "eval" / f"{row}__{test}.json"

    @property
    def val_spec(self) -> Path:
        return self.runs / "data" / "val.yaml"

    @property
    def steps_path(self) -> Path:
        return self.runs / STEPS_FILE

    @property
    def quantize_path(self) -> Path:
        return self.runs / "quantize.json"

    @property
    def bench_path(self) -> Path:
        return self.runs / "bench.json"

    def int8_bundle(self) -> Path | None:
        """The bundle whose INT8 graphs the INT8 row runs: the gated one, or an ungated copy when the gate refused."""
        record = read_json(self.quantize_path)
        return Path(record["bundle"]) if record and record.get("bundle") else None

    # -- rows ---------------------------------------------------------------------------------------
    def rows(self) -> list[Row]:
        """Table order: the teacher, the student runs, the INT8 row right after its source."""
        config = self.config
        rows = [Row("teacher", f"teacher ({config.teacher.arch}, supervised)", "teacher", "teacher", "fp32",
                    "supervised")]
        rows += [Row(run.key, run.label, "student", run.key, "fp32", run.recipe) for run in config.students]
        of = config.int8.of
        if of is not None:
            at = next(i for i, row in enumerate(rows) if row.key == of)
            source = rows[at]
            rows.insert(at + 1, Row(f"{of}_int8", f"{source.label}, INT8", "int8", of, "int8", source.recipe))
        return rows

    def bundle_runs(self) -> list[str]:
        """Training runs exported as bundles (every row's)."""
        return list(dict.fromkeys(row.run for row in self.rows()))

    def row_bundle(self, row: Row) -> Path | None:
        return self.int8_bundle() if row.kind == "int8" else self.bundle_dir(row.run)

    # -- training configs ---------------------------------------------------------------------------
    def _data(self) -> dict[str, Any]:
        data = self.config.data
        return {
            "train": [spec.model_dump(mode="json") for spec in data.train],
            "val": [spec.model_dump(mode="json") for spec in data.val],
            "classes": data.classes,
            "augment": data.augment,
            "positive_fraction": data.positive_fraction,
            "workers": data.workers,
        }

    def teacher_config(self) -> TrainConfig:
        config, teacher = self.config, self.config.teacher
        raw = {
            "name": "reference-teacher",
            "out": str(self.teacher_dir),
            "seed": config.seed,
            "model": {"arch": teacher.arch, "window": config.window},
            "data": self._data(),
            "recipe": {**teacher.recipe.model_dump(mode="json", exclude_unset=True), "name": "supervised"},
            "schedule": teacher.schedule.model_dump(mode="json", exclude_unset=True),
            "eval": teacher.eval.model_dump(mode="json", exclude_unset=True),
        }
        return parse_config(raw, f"{self.source} (teacher)")

    def student_config(self, run: StudentRun) -> TrainConfig:
        """The run's training config: blog/nofeature from the teacher cache, mobilesam/kdsam with the teacher
        online (they regress its neck features every step), supervised without a teacher."""
        config = self.config
        teacher: dict[str, Any] | None = None
        if run.recipe in TEACHER_RECIPES:
            teacher = {"kind": "family", "checkpoint": str(self.checkpoint("teacher")),
                       "batch_size": config.teacher.cache_batch_size}
            if run.recipe in CACHEABLE_RECIPES:
                teacher["cache"] = str(self.cache_root)
        raw = {
            "name": f"reference-{run.key}",
            "out": str(self.student_dir(run.key)),
            "seed": config.seed,
            "model": {"arch": config.student.arch, "window": config.window},
            "data": self._data(),
            "teacher": teacher,
            "recipe": {**config.student.recipe.model_dump(mode="json", exclude_unset=True), "name": run.recipe},
            "schedule": config.student.schedule.model_dump(mode="json", exclude_unset=True),
            "eval": config.student.eval.model_dump(mode="json", exclude_unset=True),
        }
        return parse_config(raw, f"{self.source} (students: {run.key})")

    # -- steps --------------------------------------------------------------------------------------
    def steps(self) -> list[Step]:
        config = self.config
        steps = [Step("train-teacher", _bind(self._train, self.teacher_config), self.checkpoint("teacher").is_file)]
        if any(run.recipe in CACHEABLE_RECIPES for run in config.students):
            steps.append(Step("cache-teacher", self._cache_teacher, self._has_cache))
        for run in config.students:
            steps.append(Step(f"train-{run.key}", _bind(self._train, _bind(self.student_config, run)),
                              self.checkpoint(run.key).is_file))
        for name in self.bundle_runs():
            steps.append(Step(f"export-{name}", _bind(self._export, name),
                              (self.bundle_dir(name) / "manifest.json").is_file))
        if config.calibrate.enabled:
            for name in self.bundle_runs():
                steps.append(Step(f"calibrate-{name}", _bind(self._calibrate, name),
                                  _bind(_has_thresholds, self.bundle_dir(name))))
        if config.int8.of is not None:
            of = config.int8.of
            steps.append(Step(f"quantize-{of}", _bind(self._quantize, of),
                              lambda: (bundle := self.int8_bundle()) is not None and _has_int8(bundle)))
        for row in self.rows():
            for test in config.data.test:
                steps.append(Step(f"eval-{row.key}-{test}", _bind(self._evaluate, row, test),
                                  self.eval_path(row.key, test).is_file))
        steps.append(Step("bench", self._bench, self.bench_path.is_file))
        return steps

    def status(self) -> list[tuple[str, bool]]:
        done = self._done()
        return [(step.name, step.name in done and step.output()) for step in self.steps()]

    def run(self, *, fresh: bool = False) -> dict[str, Any]:
        """Do every step not done yet, then write the report; returns results.json's content."""
        if fresh:
            self._clear()
        self.check_data()
        self.runs.mkdir(parents=True, exist_ok=True)
        (self.runs / MARKER).write_text(f"reference run of {self.source}\n", encoding="utf-8")
        self._write_val_spec()
        steps = self.steps()
        for index, step in enumerate(steps, 1):
            done = self._done()
            if step.name in done and step.output():
                self.log(f"[{index}/{len(steps)}] {step.name}: done ({done[step.name]['seconds']:.1f} s), skipped")
                continue
            self.log(f"[{index}/{len(steps)}] {step.name}")
            started = time.monotonic()
            try:
                step.action()
            except DefectsamError as exc:
                raise ReferenceRunError(f"step {step.name}: {exc}") from exc
            seconds = time.monotonic() - started
            self._record(step.name, seconds)
            self.log(f"[{index}/{len(steps)}] {step.name}: {seconds:.1f} s")
        from training.reference.report import write_report

        return write_report(self)

    def classes(self) -> list[str]:
        """The training classes: ``data.classes``, else the ordered union of train and val (as the trainer does)."""
        from training.data.registry import build_dataset

        data = self.config.data
        if data.classes:
            return list(data.classes)
        names = [*build_dataset(data.train).class_names, *build_dataset(data.val).class_names]
        return list(dict.fromkeys(names))

    def check_data(self) -> None:
        """ConfigError naming the key unless val and every test set have exactly the training classes (the bundles'
        classes: evaluation, calibration and the INT8 gate compare class by class)."""
        from training.data.registry import build_dataset

        data = self.config.data
        classes = self.classes()
        sets: list[tuple[str, Any]] = [("data.val", data.val)]
        sets += [(f"data.test.{label}", spec) for label, spec in data.test.items()]
        for key, spec in sets:
            found = list(build_dataset(spec).class_names)
            if found != classes:
                raise ConfigError(
                    f"{self.source}: key '{key}': its classes {found} are not the training classes {classes} "
                    "(rename them with class_map in its spec, or set data.classes)"
                )

    def _done(self) -> dict[str, Any]:
        record = read_json(self.steps_path) or {}
        steps = record.get("steps", {})
        return steps if isinstance(steps, dict) else {}

    def _record(self, name: str, seconds: float) -> None:
        steps = self._done()
        steps[name] = {"seconds": round(seconds, 1), "finished": utc_now()}
        write_text_atomic(self.steps_path, json.dumps({"steps": steps}, indent=2) + "\n")

    def _clear(self) -> None:
        if not self.runs.exists():
            return
        if not (self.runs / MARKER).is_file():
            raise ReferenceRunError(
                f"--fresh: {self.runs} exists but was not made by the reference driver (no {MARKER}); "
                "delete it yourself or point 'runs' elsewhere"
            )
        self.log(f"--fresh: removing {self.runs}")
        shutil.rmtree(self.runs)

    def _write_val_spec(self) -> None:
        import yaml

        specs = [spec.model_dump(mode="json") for spec in self.config.data.val]
        write_text_atomic(self.val_spec, yaml.safe_dump(specs, sort_keys=False))

    def _has_cache(self) -> bool:
        return self.cache_root.is_dir() and any(self.cache_root.glob("*/index.json"))

    # -- actions ------------------------------------------------------------------------------------
    def _train(self, make_config: Callable[[], TrainConfig]) -> None:
        from training.trainer import train

        train(make_config(), log=self.log)

    def _cache_teacher(self) -> None:
        import torch

        from training.teachers import build_teacher
        from training.trainer import cache_teacher, load_datasets

        run = next(run for run in self.config.students if run.recipe in CACHEABLE_RECIPES)
        config = self.student_config(run)
        assert config.teacher is not None
        train_samples, _, classes = load_datasets(config)
        teacher = build_teacher(config.teacher, num_classes=len(classes))
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        cache = cache_teacher(config, teacher, train_samples, classes, device)
        self.log(f"teacher cache {cache.path}: {len(cache.entries)} samples of {teacher.teacher_id}")

    def _export(self, run: str) -> None:
        from training.export.bundle import export_checkpoints

        config = self.config
        bundle = export_checkpoints(
            self.checkpoint(run), self.bundle_dir(run), name=f"reference-{run.replace('_', '-')}",
            window=config.window, notes=f"reference run ({config.schedule} schedule, {self.source})", seed=config.seed,
        )
        self.log(f"exported {bundle.path} ({bundle.manifest.segment.arch}, {bundle.manifest.parameters:,} parameters)")

    def _val_dataset(self) -> Any:
        from training.data.registry import build_dataset

        return build_dataset(self.config.data.val)

    def _calibrate(self, run: str) -> None:
        from training.reference.thresholds import calibrate_whole

        c = self.config.calibrate
        thresholds = calibrate_whole(
            self.bundle_dir(run), self._val_dataset(), data=str(self.val_spec), limit=c.limit, objective=c.objective,
            max_false_ng=c.max_false_ng,
        )
        self.log(f"calibrated {self.bundle_dir(run)}: score threshold {thresholds.score_threshold:g} "
                 f"({c.objective} on val, mode whole)")

    def _calibration_frames(self) -> Path:
        """``int8.calib_frames`` training images, evenly spaced, as PNGs in RUNS/calib (quantize's calib DIR)."""
        import cv2

        from training.data.registry import build_dataset, evenly_spaced

        target = self.runs / "calib"
        n = self.config.int8.calib_frames
        if target.is_dir() and len(list(target.glob("*.png"))) == n:
            return target
        dataset = build_dataset(self.config.data.train)
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for order, index in enumerate(evenly_spaced(len(dataset), n)):
            if not cv2.imwrite(str(tmp / f"{order:04d}.png"), dataset[index].image):
                raise ReferenceRunError(f"{tmp}: cannot write calibration image {order:04d}.png")
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        return target

    def _quantize_options(self, **changes: Any) -> Any:
        from training.quantize import DEFAULT_KEEP_FP32, QuantizeOptions

        q = self.config.int8
        options: dict[str, Any] = {
            "calib": str(self._calibration_frames()), "n": q.calib_frames, "held_out": str(self.val_spec),
            "limit": q.held_out_limit, "max_drop": q.max_drop, "max_fallback": q.max_fallback,
            "keep_fp32": DEFAULT_KEEP_FP32, "command": "defectsam-train reference (training/reference/driver.py)",
        }
        options.update(changes)
        return QuantizeOptions(**options)

    def _quantize(self, of: str) -> None:
        from training.quantize import QuantizeGateError, quantize_bundle

        source = self.bundle_dir(of)
        record: dict[str, Any] = {"of": of, "gated_bundle": str(source), "max_drop": self.config.int8.max_drop}
        try:
            bundle = quantize_bundle(source, self._quantize_options(), log=self.log)
            record.update(passed=True, error=None, bundle=str(bundle.path))
        except QuantizeGateError as exc:
            # Report what INT8 does anyway, from a copy marked as such: the gated bundle stays FP32 only.
            self.log(f"INT8 gate refused {source}: {exc}; measuring an ungated copy for the table")
            copy = source.with_name(f"{of}-int8-ungated")
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(source, copy)
            bundle = quantize_bundle(copy, self._quantize_options(max_drop=UNGATED_DROP, max_fallback=0),
                                     log=self.log)
            record.update(passed=False, error=str(exc), bundle=str(bundle.path))
        write_text_atomic(self.quantize_path, json.dumps(record, indent=2) + "\n")

    def _evaluate(self, row: Row, test: str) -> None:
        from training.data.registry import build_dataset
        from training.eval.evaluate import evaluate_bundle

        path = self.row_bundle(row)
        if path is None:
            raise ReferenceRunError(f"row {row.key}: no bundle (quantize first)")
        dataset = build_dataset(self.config.data.test[test])
        report = evaluate_bundle(load_bundle(path), dataset, precision=row.precision, inspection=WHOLE)
        write_text_atomic(self.eval_path(row.key, test), json.dumps(report, indent=2) + "\n")
        self.log(f"{row.key} on {test}: semantic foreground mIoU {report['semantic']['miou_fg']}")

    def _bench(self) -> None:
        from training.data.registry import build_dataset, evenly_spaced
        from training.reference.bench import BenchRow, measure

        rows = self.rows()
        subjects = []
        for row in rows:
            path = self.row_bundle(row)
            if path is None:
                raise ReferenceRunError(f"bench: no bundle for row {row.key} (quantize first)")
            subjects.append(BenchRow(row.key, path, row.precision))
        headline = self.config.headline
        dataset = build_dataset(self.config.data.test[headline])
        frames = [dataset[i].image for i in evenly_spaced(len(dataset), self.config.bench.frames)]
        spec = self.config.data.test[headline]
        record = measure(subjects, frames, self.config.bench, frames_from=f"{headline} ({spec})")
        write_text_atomic(self.bench_path, json.dumps(record, indent=2) + "\n")
        self.log(record["markdown"])


def _bind(function: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    return lambda: function(*args)


def _has_thresholds(path: Path) -> bool:
    try:
        return load_bundle(path).manifest.thresholds is not None
    except DefectsamError:
        return False


def _has_int8(path: Path) -> bool:
    try:
        return "int8" in load_bundle(path).manifest.variants
    except DefectsamError:
        return False
