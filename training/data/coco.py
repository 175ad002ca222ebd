"""COCO instance segmentation JSON (CVAT, Label Studio, Roboflow exports), read in place.

The file: ``images`` (``id``, ``file_name``, ``width``, ``height``), ``categories`` (``id``,
``name``) and ``annotations`` (``image_id``, ``category_id``, ``segmentation``). A segmentation
is a list of polygons (``[[x1, y1, x2, y2, ...], ...]``, pixels, continuous coordinates) or an
RLE (``{"size": [h, w], "counts": [...]}`` uncompressed or ``"counts": "..."`` compressed); both
are decoded here (training.data.mask_codecs), exactly as pycocotools decodes them. Every
annotation is one instance, kept apart from the others (crowd annotations too); an image
without annotations is defect-free.

Classes are the categories in id order. Categories of one name merge; a category that no
annotation uses and that other categories name as their ``supercategory`` (Roboflow's project
entry) is left out.

``root`` is the JSON file, or a folder where it is found (``split`` picks among several):
``annotations/instances_SPLIT.json``, ``annotations/SPLIT.json``, ``SPLIT/_annotations.coco.json``,
``SPLIT.json``; without a split ``annotations/instances_default.json`` (CVAT),
``result.json`` (Label Studio), ``_annotations.coco.json`` (Roboflow), ``annotations.json``, or
the only ``.json`` there. Images are looked for by ``file_name`` under ``images`` when given, else
beside the JSON, in ``images/`` beside it, or in ``images/`` beside its folder (CVAT's
``annotations/`` + ``images/``), each also by the file name alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from training.data.errors import DatasetError
from training.data.folder import read_image
from training.data.mask_codecs import MaskCodecError, polygon_mask, rle_mask
from training.data.sample import Sample


@dataclass(frozen=True)
class _Annotation:
    id: Any
    class_index: int
    segmentation: Any  # list of polygons, or an RLE dict


@dataclass(frozen=True)
class _Image:
    id: Any
    path: Path
    width: int
    height: int
    annotations: tuple[_Annotation, ...]


def find_annotation_file(root: Path, split: str | None) -> Path:
    """The COCO JSON a ``root`` (file or folder) and ``split`` name (module docstring)."""
    if root.is_file():
        if split is not None:
            raise DatasetError(root, "is a COCO file; split picks a file inside a folder root (give the folder, "
                                     "or drop split)")
        return root
    if not root.is_dir():
        raise DatasetError(root, "COCO file or folder does not exist")
    if split is not None:
        tried = [f"annotations/instances_{split}.json", f"annotations/{split}.json",
                 f"{split}/_annotations.coco.json", f"{split}.json"]
    else:
        tried = ["annotations/instances_default.json", "result.json", "_annotations.coco.json", "annotations.json"]
    for name in tried:
        if (root / name).is_file():
            return root / name
    if split is None:
        found = sorted(p for folder in (root, root / "annotations") if folder.is_dir() for p in folder.glob("*.json"))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            names = ", ".join(str(p.relative_to(root)) for p in found[:4])
            raise DatasetError(root, f"holds several COCO files ({names}); name one as root or pick one with split")
    raise DatasetError(root, f"no COCO file found (looked for {', '.join(tried)})")


def _load_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(path, f"COCO file cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(path, f"is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    if not isinstance(raw, dict):
        raise DatasetError(path, "is not a COCO file (the top level is not an object)")
    for key in ("images", "annotations", "categories"):
        if not isinstance(raw.get(key), list):
            raise DatasetError(path, f"is not a COCO instances file: '{key}' is missing or not a list")
    return raw


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class CocoDataset:
    """The images of one COCO instances file with their annotations as instance masks."""

    def __init__(
        self, root: Path | str, split: str | None = None, *, images: Path | str | None = None,
        min_instance_area: int = 1,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.min_instance_area = min_instance_area
        self.path = find_annotation_file(self.root, split)
        self.name = f"coco:{self.path}"
        raw = _load_json(self.path)
        self.class_names: Sequence[str]
        category_class = self._categories(raw)
        bases = self._image_bases(Path(images) if images is not None else None)
        annotations: dict[Any, list[_Annotation]] = {}
        image_ids = set()
        for index, entry in enumerate(raw["images"]):
            image_id = entry.get("id") if isinstance(entry, dict) else None
            if not isinstance(image_id, (int, str)) or isinstance(image_id, bool):
                raise DatasetError(self.path, f"images[{index}] needs an 'id' (a number or a string)")
            if image_id in image_ids:
                raise DatasetError(self.path, f"images[{index}]: image id {image_id!r} appears twice")
            image_ids.add(image_id)
        for index, entry in enumerate(raw["annotations"]):
            annotation = self._annotation(index, entry, category_class, image_ids)
            annotations.setdefault(entry["image_id"], []).append(annotation)
        self.images: list[_Image] = []
        for index, entry in enumerate(raw["images"]):
            self.images.append(self._image(index, entry, bases, tuple(annotations.get(entry["id"], ()))))
        if not self.images:
            raise DatasetError(self.path, "lists no images")

    def _categories(self, raw: dict[str, Any]) -> dict[Any, int]:
        entries: dict[Any, str] = {}
        parents = set()
        for index, entry in enumerate(raw["categories"]):
            if not isinstance(entry, dict) or not isinstance(entry.get("id"), (int, str)) \
                    or not isinstance(entry.get("name"), str) or not entry["name"].strip():
                raise DatasetError(self.path, f"categories[{index}] needs an 'id' and a 'name'")
            if entry["id"] in entries:
                raise DatasetError(self.path, f"categories[{index}]: category id {entry['id']!r} appears twice")
            entries[entry["id"]] = entry["name"].strip()
            parent = entry.get("supercategory")
            if isinstance(parent, str) and parent != entry["name"]:
                parents.add(parent)
        used = {a.get("category_id") for a in raw["annotations"]
                if isinstance(a, dict) and isinstance(a.get("category_id"), (int, str))}
        kept = {cid: name for cid, name in entries.items() if cid in used or name not in parents}
        if not kept:
            raise DatasetError(self.path, "names no category")
        order = sorted(kept, key=lambda cid: (not isinstance(cid, int), cid if isinstance(cid, int) else str(cid)))
        names = tuple(dict.fromkeys(kept[cid] for cid in order))
        self.class_names = names
        self._known = ", ".join(str(cid) for cid in order)
        return {cid: names.index(kept[cid]) for cid in order}

    def _annotation(self, index: int, entry: Any, category_class: dict[Any, int], image_ids: set[Any]) -> _Annotation:
        where = f"annotations[{index}]"
        if not isinstance(entry, dict):
            raise DatasetError(self.path, f"{where} is not an object")
        if "id" in entry:
            where += f" (id {entry['id']})"
        if not isinstance(entry.get("image_id"), (int, str)) or entry.get("image_id") not in image_ids:
            raise DatasetError(self.path, f"{where}: image_id {entry.get('image_id')!r} is not among the images")
        category = entry.get("category_id")
        if not isinstance(category, (int, str)) or category not in category_class:
            raise DatasetError(self.path, f"{where}: unknown category id {category!r} (the categories are "
                                          f"{self._known})")
        segmentation = entry.get("segmentation")
        if isinstance(segmentation, list) and segmentation and all(_is_number(v) for v in segmentation):
            segmentation = [segmentation]  # one polygon written flat
        if isinstance(segmentation, list) and segmentation:
            for polygon in segmentation:
                if not isinstance(polygon, list) or not all(_is_number(v) for v in polygon):
                    raise DatasetError(self.path, f"{where}: a polygon must be a list of numbers x1, y1, x2, y2, ...")
                if len(polygon) % 2:
                    raise DatasetError(self.path, f"{where}: polygon has an odd number of coordinates "
                                                  f"({len(polygon)})")
                if len(polygon) < 6:
                    raise DatasetError(self.path, f"{where}: polygon has {len(polygon) // 2} point(s); a polygon "
                                                  f"needs at least 3")
        elif isinstance(segmentation, dict):
            size, counts = segmentation.get("size"), segmentation.get("counts")
            if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size)):
                raise DatasetError(self.path, f"{where}: RLE needs 'size': [height, width]")
            if not (isinstance(counts, str) or (isinstance(counts, list) and all(isinstance(v, int) for v in counts))):
                raise DatasetError(self.path, f"{where}: RLE 'counts' must be a list of run lengths or a string")
        else:
            raise DatasetError(self.path, f"{where} has no segmentation (a box-only export? export polygons or "
                                          f"masks)")
        return _Annotation(entry.get("id", index), category_class[category], segmentation)

    def _image_bases(self, images: Path | None) -> list[Path]:
        if images is not None:
            if not images.is_dir():
                raise DatasetError(images, "images folder does not exist")
            return [images]
        folder = self.path.parent
        return [folder, folder / "images", folder.parent / "images"]

    def _image(self, index: int, entry: Any, bases: list[Path], annotations: tuple[_Annotation, ...]) -> _Image:
        file_name = entry.get("file_name")
        width, height = entry.get("width"), entry.get("height")
        if not isinstance(file_name, str) or not file_name.strip():
            raise DatasetError(self.path, f"images[{index}] (id {entry['id']!r}) has no 'file_name'")
        if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
            raise DatasetError(self.path, f"images[{index}] ({file_name}) needs a positive integer width and height")
        relative = PurePosixPath(file_name.replace("\\", "/"))
        candidates = [base / relative for base in bases if not relative.is_absolute()]
        candidates += [Path(relative)] if relative.is_absolute() else []
        candidates += [base / relative.name for base in bases]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            looked = ", ".join(str(b) for b in bases)
            raise DatasetError(self.path, f"image {file_name!r} not found (looked in {looked}); give its folder as "
                                          f"images=DIR")
        for annotation in annotations:
            if isinstance(annotation.segmentation, dict) and annotation.segmentation["size"] != [height, width]:
                raise DatasetError(self.path, f"annotation {annotation.id} ({file_name}): RLE size "
                                              f"{annotation.segmentation['size']} is not the image's [{height}, "
                                              f"{width}] (height, width)")
        return _Image(entry["id"], path, width, height, annotations)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Sample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        entry = self.images[index]
        image = read_image(entry.path)
        h, w = image.shape[:2]
        if (h, w) != (entry.height, entry.width):
            raise DatasetError(entry.path, f"image is {w}x{h} but {self.path.name} says {entry.width}x{entry.height}")
        masks: list[np.ndarray] = []
        classes: list[int] = []
        for annotation in entry.annotations:
            segmentation = annotation.segmentation
            try:
                if isinstance(segmentation, dict):
                    mask = rle_mask(segmentation["counts"], h, w)
                else:
                    mask = polygon_mask(segmentation, h, w)
            except MaskCodecError as exc:
                raise DatasetError(self.path, f"annotation {annotation.id} ({entry.path.name}): {exc}") from None
            if int(mask.sum()) >= max(1, self.min_instance_area):
                masks.append(mask)
                classes.append(annotation.class_index)
        stacked = np.stack(masks) if masks else np.zeros((0, h, w), dtype=bool)
        return Sample(image=image, masks=stacked, classes=np.asarray(classes, dtype=np.int64), source=str(entry.path))
