"""The reference run's config: one YAML file per schedule (training/configs/reference/*.yaml).

It names the data once (train, val, the test sets that become the table's columns), the input size the
runs train and are evaluated at, the teacher and the student runs (one per table row), the INT8 variant
and the speed benchmark. The driver turns it into ordinary training configs (training.config), one per
run, so every key below ends up validated by the same models the ``distill`` command uses.

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
from training.judge.config import JudgeConfig
from training.model.build import list_models

_KEY = re.compile(r"^[a-z][a-z0-9_]*$")
# The field report's prompted IoU per row (the table this run reproduces).
FIELD_REPORT = {"teacher": 0.91, "mobilesam": 0.78, "nofeature": 0.71, "blog": 0.84}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSize(_Strict):
    height: int = Field(
        default=576, gt=0, multiple_of=16, description="input height every run trains and is evaluated at"
    )
    width: int = Field(default=1024, gt=0, multiple_of=16, description="input width")
    k: int = Field(default=8, ge=1, description="peaks (mask prompts) per frame in the exported graphs")


class BenchSection(_Strict):
    height: int = Field(default=576, gt=0, multiple_of=16, description="input height the graphs are timed at")
    width: int = Field(default=1024, gt=0, multiple_of=16, description="input width the graphs are timed at")
    iterations: int = Field(default=30, ge=1, description="timed runs per row, in alternating blocks")
    warmup: int = Field(default=3, ge=0, description="untimed runs per row first")
    rounds: int = Field(default=5, ge=1, description="blocks per row (rows alternate between blocks)")
    threads: int = Field(default=0, ge=0, description="ONNX Runtime intra-op threads (0: one per core)")


class DataSection(_Strict):
    train: list[DatasetSpec] = Field(min_length=1, description="training set of every run (teacher and students)")
    val: list[DatasetSpec] = Field(min_length=1, description="validation: best.pt, the score threshold, the INT8 gate")
    test: dict[str, str] = Field(
        min_length=1, description="the reported test sets: column label -> one-line dataset spec (magnetic_tile:test)"
    )
    classes: list[str] | None = Field(default=None, description="class list; default: the training sets' union")
    workers: int = Field(default=0, ge=0, description="data-loader worker processes of every training run")

    @field_validator("test")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        for label in value:
            if not _KEY.match(label):
                raise ValueError(f"test set label {label!r}: lower-case letters, digits and _ only")
        return value


class TeacherSection(_Strict):
    kind: Literal["family", "sam2"] = Field(
        default="family", description="family: a model of this project's family; sam2: a local SAM 2 checkpoint"
    )
    arch: str | None = Field(default="teacher_cnn", description="family: registry name of the teacher to fine-tune")
    checkpoint: Path | None = Field(
        default=None, description="family: start from this .pt (optional); sam2: the local HF directory (required)"
    )
    finetune: bool = Field(
        default=True, description="fine-tune on data.train first; false: use checkpoint as it is (a trained teacher)"
    )
    augment: bool = Field(default=True, description="augment the teacher's fine-tuning data")
    recipe: RecipeConfig = Field(
        default_factory=lambda: RecipeConfig(name="supervised"),
        description="fine-tuning loss (recipe supervised; its focal/dice weights, grown targets)",
    )
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="fine-tuning schedule")
    cache_batch_size: int = Field(default=8, ge=1, description="images per teacher pass when caching")

    @model_validator(mode="after")
    def _consistent(self) -> TeacherSection:
        if self.kind == "family" and self.arch is not None and self.arch not in list_models():
            raise ValueError(f"unknown model {self.arch!r}; known: {', '.join(list_models())}")
        if self.kind == "family" and self.arch is None and self.checkpoint is None:
            raise ValueError("a family teacher needs arch or checkpoint")
        if self.kind == "sam2" and self.checkpoint is None:
            raise ValueError("a sam2 teacher needs checkpoint: the local directory with config.json")
        if not self.finetune and self.checkpoint is None:
            raise ValueError("finetune: false needs checkpoint (the trained teacher to distill)")
        return self


class StudentSection(_Strict):
    arch: str = Field(default="student_cnn", description="registry name of every student")
    recipe: RecipeConfig = Field(
        default_factory=RecipeConfig, description="recipe weights shared by the student runs (name set per run)"
    )
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="schedule of every student run")

    @field_validator("arch")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in list_models():
            raise ValueError(f"unknown model {value!r}; known: {', '.join(list_models())}")
        return value


class StudentRun(_Strict):
    key: str = Field(description="row key (results.json), run directory name")
    label: str = Field(description="row label in the table")
    recipe: Literal["blog", "nofeature", "mobilesam", "kdsam", "supervised"] = Field(description="the run's recipe")
    judge: JudgeConfig | None = Field(default=None, description="the judge loop for this run (docs/judge.md)")

    @field_validator("key")
    @classmethod
    def _key(cls, value: str) -> str:
        if not _KEY.match(value) or value == "teacher" or value.endswith("_int8"):
            raise ValueError(f"{value!r}: lower-case letters, digits and _; not 'teacher', not ending in _int8")
        return value


class Int8Section(_Strict):
    of: str | None = Field(
        default="blog", description="the student run whose bundle gets the INT8 variant (null: none)"
    )
    calib_frames: int = Field(default=32, ge=1, description="calibration frames, evenly spaced over data.train")
    held_out_limit: int | None = Field(default=None, ge=1, description="val images the precision gate measures on")
    max_drop: float = Field(default=1.0, ge=0, description="the gate's bound: prompted mIoU drop in points")
    max_fallback: int = Field(default=4, ge=0, description="the gate's fallback rounds (docs/quantization.md)")


class CalibrateSection(_Strict):
    enabled: bool = Field(default=True, description="choose each bundle's score threshold on val")
    limit: int | None = Field(default=None, ge=1, description="val images used")
    objective: Literal["f1", "image_accuracy"] = Field(default="f1", description="what the threshold maximises")


class ReportSection(_Strict):
    overlays: int = Field(default=4, ge=0, description="example images per test set in overlays.png")
    tile_height: int = Field(default=112, ge=32, description="height of one overlay tile in pixels")


class ReferenceConfig(_Strict):
    schedule: Literal["reduced", "full", "smoke"] = Field(
        description="reduced: 2 CPU cores in about an hour; full: a GPU box; smoke: the tests' tiny run"
    )
    runs: Path = Field(description="checkpoints, caches, bundles and per-step results (ignored by git)")
    seed: int = Field(default=0, description="seed of every run")
    input: InputSize = Field(default_factory=InputSize)
    bench: BenchSection = Field(default_factory=BenchSection)
    data: DataSection
    eval: EvalConfig = Field(default_factory=EvalConfig, description="validation during training (best.pt)")
    teacher: TeacherSection = Field(default_factory=TeacherSection)
    student: StudentSection = Field(default_factory=StudentSection)
    students: list[StudentRun] = Field(min_length=1, description="one distillation run per row, in table order")
    int8: Int8Section = Field(default_factory=Int8Section)
    calibrate: CalibrateSection = Field(default_factory=CalibrateSection)
    report: ReportSection = Field(default_factory=ReportSection)

    @model_validator(mode="after")
    def _consistent(self) -> ReferenceConfig:
        keys = [run.key for run in self.students]
        if len(set(keys)) != len(keys):
            raise ValueError(f"student run keys must be distinct, got {keys}")
        if self.int8.of is not None and self.int8.of not in keys:
            raise ValueError(f"int8.of: {self.int8.of!r} is not a student run ({', '.join(keys)})")
        if self.teacher.kind == "sam2" and any(run.recipe == "mobilesam" for run in self.students):
            raise ValueError("recipe mobilesam copies a family teacher's decoder: drop that run with a sam2 teacher")
        return self

    @property
    def speed_copies(self) -> bool:
        """Whether the graphs are timed at another size than they are trained at (re-exported for it)."""
        return (self.bench.height, self.bench.width) != (self.input.height, self.input.width)


def parse_reference(raw: Any, source: Path | str = "config") -> ReferenceConfig:
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
