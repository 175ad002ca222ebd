"""The reference run's config: one YAML file per schedule (training/configs/reference/*.yaml).

It names the data once (train, val, the test sets that become the table's columns), the crop side
every run trains on (``window``, also the bundles' window), the teacher and its training, the
student runs (one per table row), calibration, the INT8 variant, the benchmark and the report. The
driver turns it into ordinary training configs (training.config), one per run, so every training
key below ends up validated by the same models ``defectsam-train train`` uses.

Unknown keys and bad values are a ConfigError naming the file and the dotted key, as for training
configs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from training.config import ConfigError, EvalConfig, RecipeConfig, ScheduleConfig, validation_message
from training.data.registry import DatasetSpec
from training.model.build import list_models

_KEY = re.compile(r"^[a-z][a-z0-9_]*$")
#: The field report's IoU per row (the table this run reproduces; the supervised baseline is not in it).
FIELD_REPORT = {"teacher": 0.91, "mobilesam": 0.78, "nofeature": 0.71, "blog": 0.84}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _known_model(value: str) -> str:
    if value not in list_models():
        raise ValueError(f"unknown model {value!r}; known: {', '.join(list_models())}")
    return value


class DataSection(_Strict):
    train: list[DatasetSpec] = Field(min_length=1, description="training set of every run (teacher and students)")
    val: list[DatasetSpec] = Field(
        min_length=1, description="validation: best.pt, the score threshold, the INT8 gate"
    )
    test: dict[str, str] = Field(
        min_length=1,
        description="the reported test sets: column label -> one-line dataset spec (neu_seg:test); the first is the "
        "headline the reading compares; every one must have the training classes",
    )
    classes: list[str] | None = Field(default=None, description="class list; default: the training sets' union")
    augment: bool = Field(default=True, description="photometric jitter and the 8 flips/quarter turns, every run")
    positive_fraction: float = Field(
        default=0.5, ge=0, le=1, description="share of training crops centred near a defect (of samples with one)"
    )
    workers: int = Field(default=0, ge=0, description="data-loader worker processes of every training run")

    @field_validator("test")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        for label in value:
            if not _KEY.match(label):
                raise ValueError(f"test set label {label!r}: lower-case letters, digits and _ only")
        return value


class TeacherSection(_Strict):
    arch: str = Field(default="teacher_seg", description="registry name of the teacher (trained first, supervised)")
    recipe: RecipeConfig = Field(
        default_factory=lambda: RecipeConfig(name="supervised"),
        description="its loss weights (ce_weight, dice_weight; the recipe is always supervised)",
    )
    schedule: ScheduleConfig = Field(
        default_factory=ScheduleConfig, description="its schedule: long enough that the val curve is flat"
    )
    eval: EvalConfig = Field(
        default_factory=EvalConfig, description="its validation (every: 1 gives the curve the flatness reading needs)"
    )
    cache_batch_size: int = Field(default=8, ge=1, description="images per teacher pass when caching")

    @field_validator("arch")
    @classmethod
    def _known(cls, value: str) -> str:
        return _known_model(value)

    @field_validator("recipe")
    @classmethod
    def _supervised(cls, value: RecipeConfig) -> RecipeConfig:
        if value.name != "supervised":
            raise ValueError(f"the teacher trains with recipe supervised, not {value.name!r} (leave name out)")
        return value


class StudentSection(_Strict):
    arch: str = Field(default="student_seg", description="registry name of every student")
    recipe: RecipeConfig = Field(
        default_factory=RecipeConfig, description="recipe weights shared by the student runs (the name is per run)"
    )
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="schedule of every student run")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="validation of every student run (best.pt)")

    @field_validator("arch")
    @classmethod
    def _known(cls, value: str) -> str:
        return _known_model(value)


class StudentRun(_Strict):
    key: str = Field(description="row key (results.json), run directory name")
    label: str = Field(min_length=1, description="row label in the table")
    recipe: Literal["supervised", "blog", "nofeature", "mobilesam", "kdsam"] = Field(
        description="supervised: no teacher (the baseline); blog, nofeature: from the teacher cache; mobilesam, "
        "kdsam: the teacher online (its neck features every step)"
    )

    @field_validator("key")
    @classmethod
    def _key(cls, value: str) -> str:
        if not _KEY.match(value) or value == "teacher" or value.endswith("_int8"):
            raise ValueError(f"{value!r}: lower-case letters, digits and _; not 'teacher', not ending in _int8")
        return value


class CalibrateSection(_Strict):
    enabled: bool = Field(default=True, description="choose each bundle's score threshold on val (mode whole)")
    limit: int | None = Field(default=None, ge=1, description="val images used")
    objective: Literal["f1", "image_accuracy"] = Field(default="f1", description="what the threshold maximises")
    max_false_ng: float = Field(
        default=0.01, ge=0, le=1, description="largest false-NG rate on good val images a chosen threshold may give"
    )


class Int8Section(_Strict):
    of: str | None = Field(
        default="blog",
        description="the row ('teacher' or a student key) whose bundle gets the INT8 variant (null: none)",
    )
    calib_frames: int = Field(default=32, ge=1, description="calibration images, evenly spaced over data.train (PNG)")
    held_out_limit: int | None = Field(default=None, ge=1, description="val images the precision gate measures on")
    max_drop: float = Field(default=1.0, ge=0, description="the gate's bound: semantic foreground mIoU drop, points")
    max_fallback: int = Field(default=4, ge=0, description="the gate's fallback rounds (docs/quantization.md)")


class BenchSection(_Strict):
    frames: int = Field(default=8, ge=1, description="images of the first test set the whole-image timing cycles")
    iterations: int = Field(default=30, ge=1, description="timed runs per row (whole images; and per graph batch)")
    warmup: int = Field(default=3, ge=0, description="untimed runs first")
    rounds: int = Field(default=5, ge=1, description="blocks per row (rows alternate between blocks)")
    threads: int = Field(default=0, ge=0, description="ONNX Runtime intra-op threads (0: one per core)")
    batch: int = Field(default=16, ge=2, le=256, description="windows per segment call for the cost per window")


class ReportSection(_Strict):
    overlays: int = Field(default=4, ge=0, description="example images per test set in overlays.png")
    tile: int = Field(default=200, ge=48, description="side of one overlay tile in pixels")


class ReferenceConfig(_Strict):
    schedule: Literal["reduced", "full", "smoke"] = Field(
        description="reduced: 2 CPU cores (hours); full: a GPU box; smoke: the tests' tiny run"
    )
    runs: Path = Field(description="checkpoints, cache, bundles and per-step results (ignored by git)")
    seed: int = Field(default=0, description="seed of every run")
    window: int = Field(
        default=128, ge=32, multiple_of=16, description="training crop side of every run, and the bundles' window"
    )
    data: DataSection
    teacher: TeacherSection = Field(default_factory=TeacherSection)
    student: StudentSection = Field(default_factory=StudentSection)
    students: list[StudentRun] = Field(min_length=1, description="one student run per row, in table order")
    calibrate: CalibrateSection = Field(default_factory=CalibrateSection)
    int8: Int8Section = Field(default_factory=Int8Section)
    bench: BenchSection = Field(default_factory=BenchSection)
    report: ReportSection = Field(default_factory=ReportSection)

    @model_validator(mode="after")
    def _consistent(self) -> ReferenceConfig:
        keys = [run.key for run in self.students]
        if len(set(keys)) != len(keys):
            raise ValueError(f"student run keys must be distinct, got {keys}")
        if self.int8.of is not None and self.int8.of not in ("teacher", *keys):
            raise ValueError(f"int8.of: {self.int8.of!r} is neither 'teacher' nor a student run ({', '.join(keys)})")
        return self

    @property
    def headline(self) -> str:
        """The test set the reading compares the rows on: the first of ``data.test``."""
        return next(iter(self.data.test))


def parse_reference(raw: Any, source: Path | str = "config") -> ReferenceConfig:
    """Validate a raw mapping; ConfigError (one line: the file and the dotted key) when it does not fit."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a reference config is a YAML mapping, got {type(raw).__name__}")
    try:
        return ReferenceConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {validation_message(exc)}") from None


def load_reference(path: Path | str, overrides: dict[str, Any] | None = None) -> ReferenceConfig:
    """Read and validate a reference config; ``overrides`` maps dotted keys to values (``--set``)."""
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: config cannot be read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "malformed YAML"
        raise ConfigError(f"{path}: malformed YAML: {first}") from None
    if overrides and isinstance(raw, dict):
        for dotted, value in overrides.items():
            _set(raw, dotted, value, path)
    return parse_reference(raw, path)


def _set(raw: dict[str, Any], dotted: str, value: Any, path: Path) -> None:
    """Set ``a.b.0.c`` in nested mappings and lists (a missing mapping key is created)."""
    node: Any = raw
    keys = dotted.split(".")
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"--set {dotted}: {key!r} is not an index of the list in {path}")
            if last:
                node[int(key)] = value
                return
            node = node[int(key)]
        elif isinstance(node, dict):
            if last:
                node[key] = value
                return
            node = node.setdefault(key, {})
        else:
            raise ConfigError(f"--set {dotted}: {key!r} is below a value, not a mapping, in {path}")
