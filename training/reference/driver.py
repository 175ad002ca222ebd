"""The reference run's driver: every step of the table in order, each skipped when its output is there.

    finetune-teacher -> cache-teacher -> distill-<run>... -> export-<run>... (-> export-bench-<run>...)
    -> calibrate-<run>... -> quantize-<of> (-> quantize-bench-<of>) -> eval-<row>-<test set>...
    -> bench -> report (always)

Each step calls the code the ``defectsam-train`` commands call (the trainer, the teacher cache, ``export``
and ``calibrate`` through the CLI's own entry point, quantize_bundle, evaluate_bundle, bench_bundles) in
this process. A step is done when ``RUNS/steps.json`` records it and its output exists; an interrupted
training run resumes from its ``last.pt``. ``fresh`` deletes ``RUNS`` first (only a directory this driver
made: it holds ``.defectsam-reference``).

Layout of ``RUNS`` (config ``runs``, ignored by git):

    teacher/                 the fine-tuned teacher (best.pt; sam2/ for a SAM 2 teacher)
    cache/                   its embeddings and mask logits (training.teachers.cache)
    students/<run>/          one distillation run per row (best.pt, metrics.jsonl)
    bundles/<run>/           engine bundles at the training input size (calibrated; INT8 added to int8.of)
    bundles-bench/<run>/     the same weights exported at the benchmark size, when it differs
    calib/                   the INT8 calibration frames (PNG, evenly spaced over data.train)
    data/val.yaml            the validation spec, for calibrate and the INT8 gate
    eval/<row>__<set>.json   each row's evaluation report on each test set (through engines/)
    bench.json               one benchmark run over every row
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
from typing import Any

from engines.atomic import write_text_atomic
from engines.bundle import load_bundle, utc_now
from engines.errors import DefectsamError
from training.config import TrainConfig, parse_config
from training.reference.config import ReferenceConfig, StudentRun
from training.reference.report import read_json

MARKER = ".defectsam-reference"
STEPS_FILE = "steps.json"
# The speed copy of the INT8 graphs is quantized like the gated one (same FP32-kept groups) and not gated
# again: at another input size than the model was trained at, its figures would say little.
UNGATED_DROP = 1e6


class ReferenceRunError(DefectsamError):
    """A step of the reference run that cannot go on (one line naming the step)."""


@dataclass(frozen=True)
class Row:
    """One row of the table."""

    key: str  # results.json key: "teacher", a student run's key, "<run>_int8"
    label: str
    kind: str  # "teacher" | "student" | "int8"
    run: str  # the training run whose weights it is: "teacher" or a student run's key
    precision: str  # "fp32" | "int8"
    recipe: str
    judge: str = "none"


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

    def bundle_dir(self, run: str) -> Path:
        return self.runs / "bundles" / run

    def bench_dir(self, run: str) -> Path:
        return self.runs / "bundles-bench" / run if self.config.speed_copies else self.bundle_dir(run)

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

    def teacher_checkpoint(self) -> Path:
        teacher = self.config.teacher
        if not teacher.finetune:
            assert teacher.checkpoint is not None  # the config validator requires it
            return teacher.checkpoint
        return self.teacher_dir / ("sam2" if teacher.kind == "sam2" else "best.pt")

    def int8_bundle(self) -> Path | None:
        """The bundle whose INT8 graphs the INT8 row runs: the gated one, or an ungated copy when the gate refused."""
        record = read_json(self.quantize_path)
        return Path(record["bundle"]) if record and record.get("bundle") else None

    # -- rows ---------------------------------------------------------------------------------------
    def teacher_arch(self) -> str:
        teacher = self.config.teacher
        if teacher.kind == "sam2":
            return "sam2"
        if teacher.checkpoint is not None and (teacher.arch is None or not teacher.finetune):
            from training.model.checkpoint import read_checkpoint

            return str(read_checkpoint(teacher.checkpoint)["arch"])
        return str(teacher.arch)

    def rows(self) -> list[Row]:
        """Table order: the teacher (a family teacher has a bundle), the student runs, INT8 after its source."""
        config = self.config
        rows: list[Row] = []
        if config.teacher.kind == "family":
            rows.append(Row("teacher", f"teacher ({self.teacher_arch()}, fine-tuned)"
                            if config.teacher.finetune else f"teacher ({self.teacher_arch()})",
                            "teacher", "teacher", "fp32", "supervised"))
        for run in config.students:
            judge = run.judge.kind if run.judge is not None else "none"
            rows.append(Row(run.key, run.label, "student", run.key, "fp32", run.recipe, judge))
            if run.key == config.int8.of:
                rows.append(Row(f"{run.key}_int8", f"{run.label}, INT8", "int8", run.key, "int8", run.recipe, judge))
        return rows

    def bundle_runs(self) -> list[str]:
        """Training runs exported as bundles."""
        return list(dict.fromkeys(row.run for row in self.rows()))

    def row_bundle(self, row: Row) -> Path | None:
        if row.kind == "int8":
            return self.int8_bundle()
        return self.bundle_dir(row.run)

    def row_bench_bundle(self, row: Row) -> Path | None:
        if row.kind == "int8" and not self.config.speed_copies:
            return self.int8_bundle()
        return self.bench_dir(row.run)

    # -- training configs ---------------------------------------------------------------------------
    def _data(self, augment: bool) -> dict[str, Any]:
        data = self.config.data
        return {
            "train": [spec.model_dump(mode="json") for spec in data.train],
            "val": [spec.model_dump(mode="json") for spec in data.val],
            "classes": data.classes,
            "augment": augment,
            "workers": data.workers,
        }

    def _model(self, arch: str) -> dict[str, Any]:
        size = self.config.input
        return {"arch": arch, "height": size.height, "width": size.width, "k": size.k}

    def teacher_config(self) -> TrainConfig:
        config, teacher = self.config, self.config.teacher
        raw = {
            "name": "reference-teacher",
            "out": str(self.teacher_dir),
            "seed": config.seed,
            "model": self._model(teacher.arch if teacher.kind == "family" and teacher.arch else config.student.arch),
            "data": self._data(teacher.augment),
            "teacher": {
                "kind": teacher.kind,
                "arch": teacher.arch if teacher.kind == "family" else None,
                "checkpoint": None if teacher.checkpoint is None else str(teacher.checkpoint),
            },
            "recipe": {**teacher.recipe.model_dump(mode="json", exclude_unset=True), "name": "supervised"},
            "schedule": teacher.schedule.model_dump(mode="json", exclude_unset=True),
            "eval": config.eval.model_dump(mode="json", exclude_unset=True),
        }
        return parse_config(raw, f"{self.source} (teacher)")

    def student_config(self, run: StudentRun) -> TrainConfig:
        config = self.config
        raw = {
            "name": f"reference-{run.key}",
            "out": str(self.student_dir(run.key)),
            "seed": config.seed,
            "model": self._model(config.student.arch),
            "data": self._data(False),  # the teacher's outputs are cached for un-augmented images
            "teacher": {
                "kind": config.teacher.kind,
                "checkpoint": str(self.teacher_checkpoint()),
                "cache": str(self.runs / "cache"),
                "batch_size": config.teacher.cache_batch_size,
            },
            "recipe": {**config.student.recipe.model_dump(mode="json", exclude_unset=True), "name": run.recipe},
            "schedule": config.student.schedule.model_dump(mode="json", exclude_unset=True),
            "eval": config.eval.model_dump(mode="json", exclude_unset=True),
            "judge": run.judge.model_dump(mode="json", exclude_unset=True) if run.judge else {"kind": "none"},
        }
        return parse_config(raw, f"{self.source} (students: {run.key})")

    # -- steps --------------------------------------------------------------------------------------
    def steps(self) -> list[Step]:
        config = self.config
        steps: list[Step] = []
        if config.teacher.finetune:
            steps.append(Step("finetune-teacher", self._finetune_teacher, self.teacher_checkpoint().exists))
        if any(run.recipe != "supervised" for run in config.students):
            steps.append(Step("cache-teacher", self._cache_teacher, (self.runs / "cache").is_dir))
        for run in config.students:
            steps.append(Step(f"distill-{run.key}", _bind(self._distill, run),
                              (self.student_dir(run.key) / "best.pt").is_file))
        for name in self.bundle_runs():
            steps.append(Step(f"export-{name}", _bind(self._export, name, False),
                              (self.bundle_dir(name) / "manifest.json").is_file))
        if config.speed_copies:
            for name in self.bundle_runs():
                steps.append(Step(f"export-bench-{name}", _bind(self._export, name, True),
                                  (self.bench_dir(name) / "manifest.json").is_file))
        if config.calibrate.enabled:
            for name in self.bundle_runs():
                steps.append(Step(f"calibrate-{name}", _bind(self._calibrate, name),
                                  _bind(_has_thresholds, self.bundle_dir(name))))
        if config.int8.of is not None:
            of = config.int8.of
            steps.append(Step(f"quantize-{of}", _bind(self._quantize, of),
                              lambda: (bundle := self.int8_bundle()) is not None and _has_int8(bundle)))
            if config.speed_copies:
                steps.append(Step(f"quantize-bench-{of}", _bind(self._quantize_bench, of),
                                  _bind(_has_int8, self.bench_dir(of))))
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

    # -- actions ------------------------------------------------------------------------------------
    def _finetune_teacher(self) -> None:
        from training.teachers.finetune import family_finetune_config, finetune_sam2
        from training.trainer import train

        config = self.teacher_config()
        if self.config.teacher.kind == "sam2":
            finetune_sam2(config, log=self.log)
        else:
            train(family_finetune_config(config), log=self.log)

    def _cache_teacher(self) -> None:
        import torch

        from training.teachers import build_teacher
        from training.trainer import cache_teacher, load_datasets

        run = next(run for run in self.config.students if run.recipe != "supervised")
        config = self.student_config(run)
        assert config.teacher is not None
        train_samples, _, classes = load_datasets(config)
        m = config.model
        teacher = build_teacher(config.teacher, height=m.height, width=m.width, num_classes=len(classes))
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        cache = cache_teacher(config, teacher, train_samples, classes, device)
        self.log(f"teacher cache {cache.path}: {len(cache.entries)} samples of {teacher.teacher_id}")

    def _distill(self, run: StudentRun) -> None:
        from training.trainer import train

        train(self.student_config(run), log=self.log)

    def _checkpoint(self, run: str) -> Path:
        return self.teacher_checkpoint() if run == "teacher" else self.student_dir(run) / "best.pt"

    def _export(self, run: str, bench: bool) -> None:
        from training.cli import main

        target = self.bench_dir(run) if bench else self.bundle_dir(run)
        argv = ["export", "--checkpoint", str(self._checkpoint(run)), "--out", str(target),
                "--name", f"reference-{run.replace('_', '-')}",
                "--notes", f"reference run ({self.config.schedule} schedule, {self.source})"]
        if bench:
            argv += ["--height", str(self.config.bench.height), "--width", str(self.config.bench.width)]
        _cli(main, argv)

    def _calibrate(self, run: str) -> None:
        from training.cli import main

        argv = ["calibrate", str(self.bundle_dir(run)), "--data", str(self.val_spec),
                "--objective", self.config.calibrate.objective]
        if self.config.calibrate.limit:
            argv += ["--limit", str(self.config.calibrate.limit)]
        _cli(main, argv)

    def _calibration_frames(self) -> Path:
        """``int8.calib_frames`` training images, evenly spaced, as PNGs in RUNS/calib (quantize --calib DIR)."""
        import cv2

        from training.data.registry import build_dataset, evenly_spaced

        target = self.runs / "calib"
        n = self.config.int8.calib_frames
        if target.is_dir() and len(list(target.glob("*.png"))) == n:
            return target
        dataset = build_dataset([spec.model_dump(mode="json") for spec in self.config.data.train])
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for order, index in enumerate(evenly_spaced(len(dataset), n)):
            cv2.imwrite(str(tmp / f"{order:04d}.png"), dataset[index].image)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        return target

    def _quantize_options(self, **changes: Any) -> Any:
        from training.commands.quantize import DEFAULT_KEEP_FP32
        from training.quantize import QuantizeOptions

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

    def _quantize_bench(self, of: str) -> None:
        from training.quantize import quantize_bundle

        gated = self.int8_bundle()
        if gated is None:
            raise ReferenceRunError(f"quantize-bench-{of}: no INT8 bundle recorded in {self.quantize_path}")
        kept = load_bundle(gated).manifest.metrics.get("quantization", {}).get("kept_fp32", {})
        keep = tuple(dict.fromkeys([*kept.get("requested", []), *kept.get("groups", [])]))
        options = self._quantize_options(keep_fp32=keep, max_drop=UNGATED_DROP, max_fallback=0,
                                         limit=2, probe_frames=1)
        quantize_bundle(self.bench_dir(of), options, log=self.log)

    def _evaluate(self, row: Row, test: str) -> None:
        from engines.backends import open_engine
        from engines.backends.onnxruntime import Config
        from training.data.registry import build_dataset
        from training.eval.evaluate import evaluate_bundle

        path = self.row_bundle(row)
        if path is None:
            raise ReferenceRunError(f"row {row.key}: no bundle (quantize first)")
        bundle = load_bundle(path)
        dataset = build_dataset(self.config.data.test[test])
        engine = open_engine(bundle, Config(providers=["cpu"], precision=row.precision))  # type: ignore[arg-type]
        try:
            report = evaluate_bundle(bundle, dataset, engine=engine)
        finally:
            engine.close()
        write_text_atomic(self.eval_path(row.key, test), json.dumps(report, indent=2) + "\n")

    def _bench(self) -> None:
        from engines.backends.onnxruntime import Config
        from engines.benchmark import bench_bundles, machine_description, markdown_table

        bench = self.config.bench
        rows = self.rows()
        paths = [self.row_bench_bundle(row) for row in rows]
        missing = [row.key for row, path in zip(rows, paths, strict=True) if path is None]
        if missing:
            raise ReferenceRunError(f"bench: no bundle for {', '.join(missing)}")
        configs = [
            Config(providers=["cpu"], precision=row.precision, intra_op_threads=bench.threads)  # type: ignore[arg-type]
            for row in rows
        ]
        bundles = [load_bundle(path) for path in paths if path is not None]
        results = bench_bundles(bundles, configs=configs, warmup=bench.warmup, iterations=bench.iterations,
                                rounds=bench.rounds)
        record: dict[str, Any] = {
            "measured": utc_now(),
            "machine": machine_description(),
            "settings": bench.model_dump(),
            "rows": {row.key: result.to_dict() for row, result in zip(rows, results, strict=True)},
            "markdown": markdown_table(results),
        }
        write_text_atomic(self.bench_path, json.dumps(record, indent=2) + "\n")
        self.log(record["markdown"])


def _bind(function: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    return lambda: function(*args)


def _cli(main: Callable[[list[str]], int], argv: list[str]) -> None:
    code = main(argv)
    if code:
        raise ReferenceRunError(f"defectsam-train {argv[0]} exited with status {code} (its error is above)")


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
