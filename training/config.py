"""Training configuration: one YAML file per run, validated by pydantic models with ``extra="forbid"``.

An unknown key or a bad value is a ConfigError whose one-line message names the file and the
dotted key (``schedule.lr``, ``data.train.0.n``). ``defectsam-train config-reference`` and
docs/training.md list every key; ``reference()`` generates that list from these models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from engines.errors import DefectsamError
from training.data.augment import AugmentConfig
from training.data.registry import DatasetSpec
from training.model.build import list_finders, list_models

RECIPES = ("supervised", "blog", "nofeature", "mobilesam", "kdsam")
#: Recipes that need a teacher (its embedding; its foreground logits for blog/nofeature; its neck for the rest).
TEACHER_RECIPES = frozenset({"blog", "nofeature", "mobilesam", "kdsam"})
#: Recipes whose teacher outputs fit the teacher cache (image embedding and foreground logits only).
CACHEABLE_RECIPES = frozenset({"blog", "nofeature"})


class ConfigError(DefectsamError):
    """A config file that cannot be read or does not validate."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    arch: str = Field(
        default="student_seg",
        description=f"registry name: segmenters {', '.join(list_models())}; finders {', '.join(list_finders())}",
    )
    window: int = Field(default=128, gt=0, multiple_of=16, description="training crop side, frame pixels (1:1)")
    init: Path | None = Field(default=None, description="start from this checkpoint's weights (same arch)")
    init_head: bool = Field(
        default=True, description="false: leave the class head fresh (init trained on other classes: transfer)"
    )

    @model_validator(mode="after")
    def _known_arch(self) -> ModelConfig:
        if self.arch not in (*list_models(), *list_finders()):
            raise ValueError(f"unknown model {self.arch!r}; known: {', '.join([*list_models(), *list_finders()])}")
        if not self.init_head and self.arch not in list_models():
            raise ValueError("init_head false is for segmenters (a finder's head has no classes)")
        return self


class DataConfig(_Strict):
    train: list[DatasetSpec] = Field(min_length=1, description="dataset specs merged into the training set")
    val: list[DatasetSpec] = Field(default_factory=list, description="dataset specs for validation (best.pt)")
    classes: list[str] | None = Field(
        default=None, description="class list (order = class channels 1..C); default: the datasets' union"
    )
    augment: bool = Field(default=True, description="photometric jitter and the 8 flips/quarter turns")
    augment_config: AugmentConfig = Field(
        default_factory=lambda: AugmentConfig(crop_prob=0.0), description="ranges of the photometric jitter"
    )
    positive_fraction: float = Field(
        default=0.7, ge=0, le=1, description="share of training crops centred near a defect (of samples with one)"
    )
    workers: int = Field(default=0, ge=0, description="data-loader worker processes (0: load in the trainer)")


class TeacherConfig(_Strict):
    kind: Literal["family", "sam2"] = Field(description="family: a checkpoint of this project's models; sam2")
    checkpoint: Path | None = Field(
        default=None, description="family: the .pt checkpoint; sam2: the local HF directory (config.json)"
    )
    arch: str | None = Field(
        default=None, description="finetune-teacher, family: registry name of the teacher to train"
    )
    cache: Path | None = Field(
        default=None, description="teacher cache root; set: outputs computed once (cache-teacher) and reused"
    )
    batch_size: int = Field(default=8, ge=1, description="images per teacher pass when caching")


class RecipeConfig(_Strict):
    name: Literal["supervised", "blog", "nofeature", "mobilesam", "kdsam"] = Field(
        default="supervised", description="the loss recipe (docs/training.md)"
    )
    ce_weight: float = Field(default=1.0, ge=0, description="per-pixel cross-entropy against ground truth")
    dice_weight: float = Field(default=1.0, ge=0, description="class dice against ground truth (blog: 0.3)")
    feature_weight: float = Field(default=0.4, ge=0, description="blog: weight of 1 - cosine(student, teacher)")
    soft_mask_weight: float = Field(default=0.3, ge=0, description="blog: weight of BCE to sigmoid(teacher / T)")
    temperature: float = Field(default=2.0, gt=0, description="blog: soft-mask temperature T")
    mse_weight: float = Field(default=1.0, ge=0, description="mobilesam/kdsam: weight of the neck-feature MSE")
    perceptual_weight: float = Field(default=0.5, ge=0, description="kdsam phase 1: weight of the perceptual term")
    phase1_epochs: int | None = Field(
        default=None, ge=0, description="kdsam: encoder epochs before the decoder phase (default: half)"
    )
    copy_decoder: bool = Field(default=True, description="mobilesam: copy the teacher's decoder into the student")


class ScheduleConfig(_Strict):
    epochs: int = Field(default=10, ge=1, description="passes over the training set")
    batch_size: int = Field(default=4, ge=1, description="images per step on each process")
    lr: float = Field(default=1e-3, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(default=1e-4, ge=0, description="AdamW weight decay")
    warmup_steps: int = Field(default=0, ge=0, description="linear warm-up steps before the cosine decay")
    min_lr_ratio: float = Field(default=0.05, ge=0, le=1, description="final learning rate / peak")
    grad_clip: float = Field(default=1.0, ge=0, description="clip the gradient norm (0: off)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto", description="autocast on CUDA only (auto: bf16 where supported); CPU runs fp32"
    )
    max_steps: int | None = Field(default=None, ge=1, description="stop after this many steps (smoke tests)")


class EvalConfig(_Strict):
    every: int = Field(default=1, ge=1, description="validate every N epochs (and after the last)")
    limit: int | None = Field(default=None, ge=1, description="validate on at most this many samples")
    metric: Literal["miou", "ap", "loss"] = Field(
        default="miou",
        description="picks best.pt: semantic foreground mIoU on data.val (segmenters), candidate-cell average "
        "precision (finders), or the training loss",
    )


class TrainConfig(_Strict):
    name: str = Field(default="run", description="run name (bundle name on export)")
    out: Path = Field(
        description="run directory: last.pt, best.pt, config.yaml, results.csv, results.png, val_overlays.png "
        "(docs/training.md)"
    )
    seed: int = Field(default=0, description="seed of initialisation, shuffling and augmentation")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    teacher: TeacherConfig | None = Field(default=None, description="omit for the supervised recipe")
    recipe: RecipeConfig = Field(default_factory=RecipeConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @property
    def task(self) -> Literal["segment", "find"]:
        """What the run trains: a window segmenter or a candidate finder (by ``model.arch``)."""
        return "find" if self.model.arch in list_finders() else "segment"

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.recipe.name in TEACHER_RECIPES and self.teacher is None:
            raise ValueError(f"recipe {self.recipe.name!r} needs a 'teacher' section")
        if self.teacher is not None and self.teacher.cache is not None and self.recipe.name not in CACHEABLE_RECIPES:
            raise ValueError(
                f"teacher.cache holds embeddings and foreground logits: recipe {self.recipe.name!r} needs the "
                "teacher's "
                "neck features every step (leave teacher.cache unset)"
            )
        if self.task == "find" and (self.recipe.name != "supervised" or self.teacher is not None):
            raise ValueError(f"a finder ({self.model.arch}) trains with recipe supervised and no teacher")
        if self.task == "find" and self.eval.metric == "miou":
            raise ValueError("a finder is validated by eval.metric ap (or loss), not miou")
        return self


def _dotted(loc: tuple[Any, ...]) -> str:
    # pydantic puts the union member's tag in the path (data.train.0.synthetic.n): drop it.
    tags = {"synthetic", "synthetic_windows", "synthetic_find", "mined_windows", "folder", "magnetic_tile", "neu_seg"}
    parts = [str(p) for p in loc if p not in tags or loc[0] != "data"]
    return ".".join(parts) or "(top level)"


def validation_message(error: ValidationError) -> str:
    first = error.errors()[0]
    value = first.get("input")
    shown = f" (got {value!r})" if not isinstance(value, dict | list) and first["type"] != "missing" else ""
    return f"key '{_dotted(tuple(first['loc']))}': {first['msg']}{shown}"


def parse_config(raw: Any, source: Path | str = "config") -> TrainConfig:
    """Validate a raw mapping; ConfigError (one line, the dotted key) when it does not fit."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a training config is a YAML mapping, got {type(raw).__name__}")
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {validation_message(exc)}") from None


def load_config(path: Path | str, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read and validate a YAML config; relative paths in it stay relative to the working directory."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: config cannot be read: {exc.strerror or exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "malformed YAML"
        raise ConfigError(f"{path}: malformed YAML: {first}") from None
    if overrides and isinstance(raw, dict):
        for dotted, value in overrides.items():
            node = raw
            *parents, leaf = dotted.split(".")
            for key in parents:
                node = node.setdefault(key, {})
            node[leaf] = value
    return parse_config(raw, path)


def reference() -> str:
    """Markdown list of every config key, its type, default and description (docs/training.md)."""
    lines: list[str] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            key = f"{prefix}{name}"
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                lines.append(f"- `{key}`: {field.description or ''}".rstrip(": "))
                walk(annotation, f"{key}.")
                continue
            nested = getattr(annotation, "__args__", ())
            sub = next((a for a in nested if isinstance(a, type) and issubclass(a, BaseModel)), None)
            default = "required" if field.is_required() else f"default `{_show(field)}`"
            lines.append(f"- `{key}` ({default}): {field.description or ''}")
            if sub is not None:
                walk(sub, f"{key}.")

    walk(TrainConfig, "")
    return "\n".join(lines)


def _show(field: Any) -> str:
    if field.default_factory is not None:
        try:
            value = field.default_factory()
        except TypeError:
            return "..."
        return "{...}" if isinstance(value, BaseModel) else repr(value)
    return repr(field.default)
