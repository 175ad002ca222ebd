"""Datasets by name, from a small pydantic spec (YAML configs) or a one-line spec (``--data``).

Specs, discriminated by ``name``::

    {name: synthetic, n: 200, seed: 0, width: 1024, height: 576}
    {name: synthetic_windows, frames: 1500, seed: 0}  # 1:1 windows of 4 MP frames (rendered once, cached)
    {name: synthetic_find, frames: 1500, seed: 0}     # the same frames reduced for the finder
    {name: mined_windows, bundle: runs/bundles/b, frames: 1500, seed: 3000000}  # where bundle b errs
    {name: folder, root: /data/line3, split: val}
    {name: magnetic_tile, split: test}            # root defaults to ../shared/datasets/magnetic_tile
    {name: neu_seg, split: test}
    {name: mvtec, root: /data/mvtec_ad/bottle, split: test}  # one MVTec AD category
    {name: coco, root: /data/export/annotations/instances_default.json}  # or a folder + split
    {name: yolo-seg, root: /data/roboflow/data.yaml, split: val}

Every spec also takes ``class_map`` (rename classes, e.g. ``{Crack: scratch}``; two names mapped to
one merge) and ``limit`` (an evenly spaced subset of that many samples). A list of specs builds one
``MergedDataset`` whose class list is the ordered union of the members' (renamed) class names.

One-line form: ``NAME[:SPLIT][,KEY=VALUE...]``, several joined by ``+``, or the path of a ``.json``
or ``.yaml`` file holding a spec or a list of them::

    magnetic_tile:test        synthetic,n=50,seed=7,width=1024,height=576
    folder,root=/data/line3,split=val+neu_seg:train
    magnetic_tile:train,class_map.Crack=scratch,class_map.Blowhole=pinhole
    mvtec:test,root=/data/mvtec_ad/bottle    coco,root=/data/cvat_export    yolo-seg:val,root=/data/rf/data.yaml
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from engines.synthetic import FRAME_HEIGHT, FRAME_WIDTH
from training.data.coco import CocoDataset
from training.data.errors import DatasetError
from training.data.find import FindDataset
from training.data.folder import FolderDataset
from training.data.magnetic_tile import MagneticTileDataset
from training.data.mining import MinedWindowsDataset, MiningParams
from training.data.mvtec import MvtecDataset
from training.data.neu_seg import NeuSegDataset
from training.data.sample import Sample, SampleDataset
from training.data.synthetic import SyntheticDataset
from training.data.synthetic_frames import FrameSet, FrameSetParams, SyntheticWindowsDataset, build_frame_set
from training.data.yolo_seg import YoloSegDataset

DATASETS_ENV = "DEFECTSAM_DATASETS"
_REPO = Path(__file__).resolve().parents[2]


def datasets_root() -> Path:
    """Where the shared real datasets live: $DEFECTSAM_DATASETS, else ../shared/datasets beside the repo."""
    env = os.environ.get(DATASETS_ENV)
    return Path(env) if env else _REPO.parent / "shared" / "datasets"


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    class_map: dict[str, str] = Field(
        default_factory=dict, description="rename classes: {dataset name: new name}; names mapped alike merge"
    )
    limit: int | None = Field(default=None, ge=1, description="use an evenly spaced subset of this many samples")


class SyntheticSpec(_Spec):
    name: Literal["synthetic"] = "synthetic"
    n: int = Field(default=1000, ge=1, description="frames in the set")
    seed: int = Field(default=0, description="sample i is engines.synthetic.render_frame(seed + i)")
    width: int = Field(default=FRAME_WIDTH, ge=32, description="frame width in pixels")
    height: int = Field(default=FRAME_HEIGHT, ge=32, description="frame height in pixels")
    defect_free_prob: float = Field(default=0.15, ge=0.0, le=1.0, description="share of defect-free frames")
    max_defects: int = Field(default=6, ge=0, description="most defects in a frame")
    pixel_scale: float | None = Field(
        default=None, ge=0.05, le=4.0, description="defect size scale; default: the frame's size relative to 4 MP"
    )


class _FrameSetFields(_Spec):
    frames: int = Field(default=1500, ge=1, description="4 MP frames rendered (once; cached under .cache/data)")
    seed: int = Field(default=0, description="frame i is engines.synthetic.render_frame(seed + i)")
    per_frame: int = Field(default=8, ge=1, le=64, description="1:1 windows cut from each frame")
    window: int = Field(default=160, ge=32, multiple_of=16, description="side of the cut windows, pixels")
    reduction: int = Field(default=4, ge=1, le=16, description="the finder's reduction of the frame")
    defect_free_prob: float = Field(default=0.15, ge=0.0, le=1.0, description="share of defect-free frames")
    max_defects: int = Field(default=6, ge=0, description="most defects in a frame")
    workers: int | None = Field(default=None, ge=1, description="render processes (default: up to 4)")

    def params(self) -> FrameSetParams:
        return FrameSetParams(
            frames=self.frames, seed=self.seed, per_frame=self.per_frame, window=self.window, reduction=self.reduction,
            defect_free_prob=self.defect_free_prob, max_defects=self.max_defects,
        )


class SyntheticWindowsSpec(_FrameSetFields):
    name: Literal["synthetic_windows"] = "synthetic_windows"


class SyntheticFindSpec(_FrameSetFields):
    name: Literal["synthetic_find"] = "synthetic_find"


class MinedWindowsSpec(_Spec):
    name: Literal["mined_windows"] = "mined_windows"
    bundle: Path = Field(description="the bundle whose false detections are mined (training.data.mining)")
    frames: int = Field(default=1500, ge=1, description="4 MP frames rendered and inspected (once; cached)")
    seed: int = Field(default=3000000, description="frame i is engines.synthetic.render_frame(seed + i)")
    defect_free_prob: float = Field(default=0.5, ge=0.0, le=1.0, description="share of defect-free frames")
    max_defects: int = Field(default=6, ge=0, description="most defects in a frame")
    per_frame: int = Field(default=4, ge=1, le=64, description="most windows kept from one frame")
    window: int = Field(default=160, ge=32, multiple_of=16, description="side of the cut windows, pixels")
    min_prob: float = Field(
        default=0.5, gt=0.0, lt=1.0, description="a window is kept where the foreground probability reaches this "
        "away from every true defect"
    )
    clearance: int = Field(default=3, ge=0, le=64, description="pixels around a true defect that never count")
    workers: int | None = Field(default=None, ge=1, description="mining processes (default: up to 4)")

    def params(self) -> MiningParams:
        return MiningParams(
            bundle=str(self.bundle), frames=self.frames, seed=self.seed, defect_free_prob=self.defect_free_prob,
            max_defects=self.max_defects, per_frame=self.per_frame, window=self.window, min_prob=self.min_prob,
            clearance=self.clearance,
        )


class FolderSpec(_Spec):
    name: Literal["folder"] = "folder"
    root: Path = Field(description="the folder holding images/, masks/ (and classes.txt, splits/)")
    split: str | None = Field(default=None, description="read splits/SPLIT.txt; default: every image")
    mask_format: Literal["auto", "label", "binary"] = Field(
        default="auto", description="label-index or 0/255 masks; auto: binary when a mask holds only 0 and 255"
    )
    allow_missing_masks: bool = Field(default=False, description="an image without a mask is defect-free")
    min_instance_area: int = Field(
        default=1, ge=1, description="components of label/binary masks smaller than this are dropped"
    )


class MagneticTileSpec(_Spec):
    name: Literal["magnetic_tile"] = "magnetic_tile"
    root: Path | None = Field(default=None, description="default: <datasets>/magnetic_tile")
    split: Literal["train", "val", "test"] = "test"
    min_instance_area: int = Field(default=1, ge=1, description="smaller components are dropped")
    free_limit: int | None = Field(
        default=None, ge=0, description="keep at most this many MT_Free (defect-free) images, evenly spaced"
    )


class NeuSegSpec(_Spec):
    name: Literal["neu_seg"] = "neu_seg"
    root: Path | None = Field(default=None, description="default: <datasets>/neu_seg")
    split: Literal["train", "val", "test"] = "test"
    min_instance_area: int = Field(default=1, ge=1, description="smaller components are dropped")


class MvtecSpec(_Spec):
    name: Literal["mvtec"] = "mvtec"
    root: Path = Field(description="one MVTec AD category: the folder holding train/, test/, ground_truth/")
    split: str = Field(default="test", description="train (good images only) or test")
    min_instance_area: int = Field(default=1, ge=1, description="smaller components are dropped")


class CocoSpec(_Spec):
    name: Literal["coco"] = "coco"
    root: Path = Field(description="the COCO instances JSON, or the export folder holding it")
    split: str | None = Field(
        default=None, description="with a folder root: read annotations/instances_SPLIT.json (or SPLIT/...; see docs)"
    )
    images: Path | None = Field(default=None, description="the images' folder (default: found beside the JSON)")
    min_instance_area: int = Field(default=1, ge=1, description="smaller instances are dropped")


class YoloSegSpec(_Spec):
    name: Literal["yolo-seg"] = "yolo-seg"
    root: Path = Field(description="the dataset YAML (names:, train:, val:), or the folder holding it")
    split: str | None = Field(default=None, description="the YAML's train, val or test; default: all of them")
    min_instance_area: int = Field(default=1, ge=1, description="smaller instances are dropped")


AnySpec = Union[  # noqa: UP007 - a runtime alias
    SyntheticSpec, SyntheticWindowsSpec, SyntheticFindSpec, MinedWindowsSpec, FolderSpec, MagneticTileSpec,
    NeuSegSpec, MvtecSpec, CocoSpec, YoloSegSpec,
]
DatasetSpec = Annotated[AnySpec, Field(discriminator="name")]
_SPEC = TypeAdapter(DatasetSpec)
_SPECS = TypeAdapter(list[DatasetSpec])
NAMES: tuple[str, ...] = (
    "synthetic", "synthetic_windows", "synthetic_find", "mined_windows", "folder", "magnetic_tile", "neu_seg",
    "mvtec", "coco", "yolo-seg",
)


def evenly_spaced(length: int, limit: int | None) -> list[int]:
    """``limit`` indices spread evenly over ``range(length)`` (all of them when limit is None or larger)."""
    if limit is None or limit >= length:
        return list(range(length))
    return [int(i) for i in np.linspace(0, length - 1, limit).round()]


class SubsetDataset:
    """The samples of ``dataset`` at ``indices``."""

    def __init__(self, dataset: SampleDataset, indices: Sequence[int], name: str | None = None) -> None:
        self.dataset = dataset
        self.indices = list(indices)
        self.class_names: Sequence[str] = tuple(dataset.class_names)
        self.name = name or dataset_name(dataset)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Sample:
        return self.dataset[self.indices[index]]


class RenamedDataset:
    """``dataset`` with its classes renamed by ``class_map``; names mapped to one target merge."""

    def __init__(self, dataset: SampleDataset, class_map: Mapping[str, str]) -> None:
        unknown = sorted(set(class_map) - set(dataset.class_names))
        if unknown:
            raise DatasetError(
                dataset_name(dataset),
                f"class_map renames {', '.join(map(repr, unknown))}, which the dataset does not have "
                f"(it has {', '.join(dataset.class_names)})",
            )
        renamed = [class_map.get(name, name) for name in dataset.class_names]
        names = tuple(dict.fromkeys(renamed))
        self.class_names: Sequence[str] = names
        self._lookup = np.asarray([names.index(name) for name in renamed], dtype=np.int64)
        self.dataset = dataset
        self.name = dataset_name(dataset)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Sample:
        sample = self.dataset[index]
        return dataclasses.replace(sample, classes=self._lookup[sample.classes])


class MergedDataset:
    """Several datasets in a row, with one class list: the ordered union of their class names.

    ``class_names`` may be given to fix the order (it must contain every member's names).
    """

    def __init__(self, datasets: Sequence[SampleDataset], class_names: Sequence[str] | None = None) -> None:
        if not datasets:
            raise DatasetError("data", "no dataset to merge")
        union = tuple(dict.fromkeys(name for d in datasets for name in d.class_names))
        if class_names is not None:
            missing = [name for name in union if name not in class_names]
            if missing:
                raise DatasetError("data", f"class list lacks {', '.join(map(repr, missing))}")
            union = tuple(class_names)
        self.class_names: Sequence[str] = union
        self.datasets = list(datasets)
        self._lookups = [
            np.asarray([union.index(name) for name in d.class_names], dtype=np.int64) for d in self.datasets
        ]
        self._ends = np.cumsum([len(d) for d in self.datasets]).tolist()
        if not self._ends or self._ends[-1] == 0:
            raise DatasetError("data", "the merged datasets hold no samples")
        self.name = " + ".join(dataset_name(d) for d in self.datasets)

    def __len__(self) -> int:
        return int(self._ends[-1])

    def __getitem__(self, index: int) -> Sample:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        member = bisect.bisect_right(self._ends, index)
        start = self._ends[member - 1] if member else 0
        sample = self.datasets[member][index - start]
        return dataclasses.replace(sample, classes=self._lookups[member][sample.classes])


def dataset_name(dataset: SampleDataset) -> str:
    """A short description of a dataset for reports."""
    return str(getattr(dataset, "name", type(dataset).__name__))


def _build_one(spec: AnySpec) -> SampleDataset:
    dataset: SampleDataset
    if isinstance(spec, SyntheticFindSpec):
        raise DatasetError("synthetic_find", "is the finder's data (a model.arch finder), not a set of samples")
    if isinstance(spec, SyntheticWindowsSpec):
        dataset = SyntheticWindowsDataset(spec.params(), workers=spec.workers, log=_log)
    elif isinstance(spec, MinedWindowsSpec):
        dataset = MinedWindowsDataset(spec.params(), workers=spec.workers, log=_log)
    elif isinstance(spec, SyntheticSpec):
        try:
            dataset = SyntheticDataset(
                spec.n, seed=spec.seed, width=spec.width, height=spec.height,
                defect_free_prob=spec.defect_free_prob, max_defects=spec.max_defects, pixel_scale=spec.pixel_scale,
            )
        except ValueError as exc:
            raise DatasetError("synthetic", str(exc)) from None
    elif isinstance(spec, FolderSpec):
        dataset = FolderDataset(
            spec.root, spec.split, mask_format=spec.mask_format,
            allow_missing_masks=spec.allow_missing_masks, min_instance_area=spec.min_instance_area,
        )
    elif isinstance(spec, MagneticTileSpec):
        root = spec.root or datasets_root() / "magnetic_tile"
        dataset = MagneticTileDataset(root, spec.split, min_instance_area=spec.min_instance_area,
                                      free_limit=spec.free_limit)
    elif isinstance(spec, NeuSegSpec):
        root = spec.root or datasets_root() / "neu_seg"
        dataset = NeuSegDataset(root, spec.split, min_instance_area=spec.min_instance_area)
    elif isinstance(spec, MvtecSpec):
        dataset = MvtecDataset(spec.root, spec.split, min_instance_area=spec.min_instance_area)
    elif isinstance(spec, CocoSpec):
        dataset = CocoDataset(spec.root, spec.split, images=spec.images, min_instance_area=spec.min_instance_area)
    else:
        dataset = YoloSegDataset(spec.root, spec.split, min_instance_area=spec.min_instance_area)
    name = dataset_name(dataset)
    if len(dataset) == 0:
        raise DatasetError(name, "dataset holds no samples")
    if spec.class_map:
        dataset = RenamedDataset(dataset, spec.class_map)
    if spec.limit is not None and spec.limit < len(dataset):
        dataset = SubsetDataset(dataset, evenly_spaced(len(dataset), spec.limit), f"{name}[{spec.limit}]")
    return dataset


def _scalar(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


_TEXT_KEYS = ("root", "split", "images")  # kept as written (a split "7" or a folder "1e3" is not a number)


def parse_spec(text: str) -> list[dict[str, Any]]:
    """A one-line spec (module docstring) or a spec file -> raw spec dicts. DatasetError when malformed."""
    text = text.strip()
    if not text:
        raise DatasetError("--data", "empty dataset spec")
    path = Path(text)
    head = re.split(r"[,:+]", text, maxsplit=1)[0].strip()
    if path.suffix.lower() in (".json", ".yaml", ".yml") and head not in NAMES:  # not yolo-seg,root=data.yaml
        return _read_spec_file(path)
    specs: list[dict[str, Any]] = []
    for part in text.split("+"):
        head, *pairs = [p.strip() for p in part.split(",")]
        name, _, split = head.partition(":")
        if name not in NAMES:
            raise DatasetError(part or text, f"unknown dataset {name!r}; known: {', '.join(NAMES)}")
        raw: dict[str, Any] = {"name": name}
        if split:
            raw["split"] = split
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or not key.strip():
                raise DatasetError(part, f"expected KEY=VALUE after the dataset name, got {pair!r}")
            key, value = key.strip(), value.strip()
            field, dot, sub = key.partition(".")
            if dot:  # class_map.Crack=scratch
                entry = raw.setdefault(field, {})
                if not isinstance(entry, dict):
                    raise DatasetError(part, f"{field!r} given both as a value and as {key!r}")
                entry[sub] = value
            else:
                raw[key] = value if key in _TEXT_KEYS else _scalar(value)
        specs.append(raw)
    return specs


def _read_spec_file(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DatasetError(path, f"dataset spec file cannot be read: {exc.strerror or exc}") from None
    try:
        if path.suffix.lower() == ".json":
            raw = json.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text)
    except Exception as exc:  # json and yaml raise their own types; one line either way
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise DatasetError(path, f"malformed dataset spec: {first}") from None
    items = raw if isinstance(raw, list) else [raw]
    if not items or not all(isinstance(item, dict) for item in items):
        raise DatasetError(path, "a dataset spec file holds a mapping or a list of mappings")
    return items


def _validation_message(error: ValidationError) -> str:
    first = error.errors()[0]
    loc = list(first["loc"])
    if loc and isinstance(loc[0], int):  # a list index, then the discriminator's tag: not the user's keys
        loc = loc[2:] if len(loc) > 1 and loc[1] in NAMES else loc[1:]
    key = ".".join(str(part) for part in loc) or "(top level)"
    return f"key '{key}': {first['msg']}"


SpecLike = Union[str, AnySpec, Mapping[str, Any], Sequence[Any]]  # noqa: UP007 - a runtime alias


def build_dataset(spec: SpecLike) -> SampleDataset:
    """A dataset from a spec model, a raw mapping, a one-line spec or spec file, or a list of them.

    A list (or a ``+``-joined line) gives a MergedDataset. Raises DatasetError, one line, for a bad
    spec, a missing split file, a mask that does not fit its image, or an empty dataset.
    """
    raws: list[Any]
    if isinstance(spec, str):
        label, raws = spec, list(parse_spec(spec))
    elif isinstance(spec, _Spec):
        label, raws = str(getattr(spec, "name", "data")), [spec.model_dump()]
    elif isinstance(spec, Mapping):
        label, raws = str(spec.get("name", "data")), [dict(spec)]
    else:
        label, raws = "data", [s.model_dump() if isinstance(s, BaseModel) else s for s in spec]
    try:
        specs = _SPECS.validate_python(raws)
    except ValidationError as exc:
        raise DatasetError(label, f"bad dataset spec: {_validation_message(exc)}") from None
    datasets = [_build_one(s) for s in specs]
    if len(datasets) == 1:
        return datasets[0]
    merged: SampleDataset = MergedDataset(datasets)
    return merged


def build_find_dataset(specs: Sequence[Any], *, crop: int | None, train: bool, seed: int = 0) -> FindDataset:
    """The finder's data: ``synthetic_find`` specs (one, or several merged). DatasetError for any other kind."""
    try:
        validated = _SPECS.validate_python([s.model_dump() if isinstance(s, BaseModel) else s for s in specs])
    except ValidationError as exc:
        raise DatasetError("data", f"bad dataset spec: {_validation_message(exc)}") from None
    sets = []
    for spec in validated:
        if not isinstance(spec, SyntheticFindSpec):
            raise DatasetError(spec.name, "a finder trains on synthetic_find frame sets (4 MP frames, reduced)")
        sets.append(FrameSet(build_frame_set(spec.params(), workers=spec.workers, log=_log)))
    return FindDataset(sets, crop=crop, train=train, seed=seed)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
