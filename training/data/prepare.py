"""Sample -> training example at model resolution, letterboxed and normalised exactly as the runtime does.

The image goes through the one resize the runtime's ``engines.preprocess.Preprocessor`` does
(same size, same interpolation), then through ``Preprocessor`` itself for normalisation and
padding, so an un-augmented example is bit-for-bit the engine input of the same frame. Masks
are resized once too (only their bounding box, for large frames), to the same letterbox.

Per instance an example carries:

* ``points``: one positive prompt inside the instance, at a pixel centre in input pixels; a
  random pixel of the instance in training (``rng`` given), its interior point (the maximum of
  the distance transform, the pixel deepest inside) in evaluation (``rng=None``);
* ``anchors``: the interior point, always; the saliency target peaks at its stride-16 cell;
* ``neg_points`` / ``neg_labels``: optional negative prompts just outside the instance
  (label 0), padded with label -1 where the instance leaves no room.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np
import torch

from engines.bundle import InputSpec
from engines.contract import EMBED_STRIDE, LABEL_BACKGROUND, LABEL_PADDING, PIXEL_MEAN, PIXEL_STD
from engines.preprocess import Letterbox, Preprocessor, shrink
from training.data.augment import AugmentConfig, flip, photometric, sample_crop, sample_flips
from training.data.errors import DatasetError
from training.data.sample import Sample, SampleDataset

_ROI_RESIZE_PIXELS = 1 << 20  # masks larger than this are resized by their bounding box only


@lru_cache(maxsize=16)
def input_spec(height: int, width: int) -> InputSpec:
    """The manifest ``input`` that training.export.onnx writes for a model of this size."""
    return InputSpec(height=height, width=width, mean=PIXEL_MEAN, std=PIXEL_STD)


@lru_cache(maxsize=16)
def _preprocessor(spec: InputSpec) -> Preprocessor:
    return Preprocessor(spec)


@dataclass(frozen=True)
class TrainExample:
    """One sample at model input resolution H x W (N instances, C classes, M negatives per instance).

    image       float32 3xHxW  normalised RGB, letterboxed (padding right and bottom = pad_value)
    masks       bool NxHxW     instance masks, letterboxed
    classes     int64 N
    points      float32 Nx2    one positive prompt per instance, (x, y) in input pixels
    heatmap     float32 Cxhxw  saliency target (h, w = H/16, W/16): a Gaussian per instance at its
                               anchor's cell (1.0 there), max over instances, per class
    valid       bool HxW       True where the input holds image content (not letterbox padding)
    source      str            the sample's source
    anchors     float32 Nx2    interior point of each instance (distance-transform maximum)
    neg_points  float32 NxMx2  negative prompts outside each instance
    neg_labels  float32 NxM    0 (background point) or -1 (padding: no room for a negative)
    letterbox   Letterbox      how the (possibly cropped) image sits in the input
    """

    image: np.ndarray
    masks: np.ndarray
    classes: np.ndarray
    points: np.ndarray
    heatmap: np.ndarray
    valid: np.ndarray
    source: str
    anchors: np.ndarray
    neg_points: np.ndarray
    neg_labels: np.ndarray
    letterbox: Letterbox


def resize_image(image: np.ndarray, box: Letterbox) -> np.ndarray:
    """The runtime's resize (engines.preprocess.shrink): to the letterbox content size."""
    return shrink(image, (box.content_width, box.content_height), box.scale)


def resize_mask(mask: np.ndarray, box: Letterbox) -> np.ndarray:
    """bool HxW (frame) -> bool content_height x content_width: pixels at least half covered.

    Shrinking uses area averaging, so a pixel is set when the instance covers half of it; an
    instance thinner than that (a hairline scratch on a 4 MP frame) keeps its most-covered pixels
    instead of vanishing. Large masks are resized by their bounding box only.
    """
    cw, ch = box.content_width, box.content_height
    src = mask.view(np.uint8)
    height, width = mask.shape
    out = np.zeros((ch, cw), dtype=bool)
    if box.scale >= 1.0 or height * width <= _ROI_RESIZE_PIXELS:
        region, target = src, (slice(0, ch), slice(0, cw))
    else:
        x, y, w, h = cv2.boundingRect(src)
        if w == 0 or h == 0:
            return out
        s = box.scale
        u0, u1 = math.floor(x * s), min(cw, math.ceil((x + w) * s))
        v0, v1 = math.floor(y * s), min(ch, math.ceil((y + h) * s))
        a0, a1 = math.floor(u0 / s), min(width, math.ceil(u1 / s))
        b0, b1 = math.floor(v0 / s), min(height, math.ceil(v1 / s))
        region, target = src[b0:b1, a0:a1], (slice(v0, v1), slice(u0, u1))
    size = (target[1].stop - target[1].start, target[0].stop - target[0].start)
    if size[0] <= 0 or size[1] <= 0:
        return out
    interpolation = cv2.INTER_AREA if box.scale < 1.0 else cv2.INTER_LINEAR
    resized = cv2.resize(region, size, interpolation=interpolation) if region.shape[::-1] != size else region
    if not resized.any() and region.any():
        coverage = cv2.resize(region.astype(np.float32), size, interpolation=cv2.INTER_AREA)
        out[target] = coverage >= 0.5 * float(coverage.max())
    else:
        out[target] = resized.astype(bool)
    return out


def interior_point(mask: np.ndarray) -> tuple[float, float]:
    """(x, y) pixel centre of the pixel deepest inside ``mask`` (the distance transform's maximum).

    mask: bool HxW with at least one pixel set. Ties go to the first pixel in row-major order.
    """
    x, y, w, h = cv2.boundingRect(np.ascontiguousarray(mask).view(np.uint8))
    if w == 0:
        raise ValueError("interior_point of an empty mask")
    roi = np.zeros((h + 2, w + 2), dtype=np.uint8)  # one pixel of background all round
    roi[1:-1, 1:-1] = mask[y : y + h, x : x + w]
    distance = cv2.distanceTransform(roi, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    iy, ix = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return float(x + ix - 1) + 0.5, float(y + iy - 1) + 0.5


def random_point(mask: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    """(x, y) pixel centre of a uniformly random pixel of ``mask`` (bool HxW, not empty)."""
    x, y, w, h = cv2.boundingRect(np.ascontiguousarray(mask).view(np.uint8))
    flat = np.flatnonzero(mask[y : y + h, x : x + w])
    pick = int(flat[rng.integers(flat.size)])
    return float(x + pick % w) + 0.5, float(y + pick // w) + 0.5


def negative_points(
    mask: np.ndarray, valid_hw: tuple[int, int], count: int, rng: np.random.Generator | None
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` background prompts near an instance: pixels outside it in its box grown by half its size.

    Returns (points Mx2 float32, labels M float32: 0, or -1 padding when there is no room).
    Deterministic (evenly spaced candidates) when ``rng`` is None.
    """
    points = np.zeros((count, 2), dtype=np.float32)
    labels = np.full(count, LABEL_PADDING, dtype=np.float32)
    if count == 0:
        return points, labels
    vh, vw = valid_hw
    x, y, w, h = cv2.boundingRect(np.ascontiguousarray(mask).view(np.uint8))
    gx, gy = max(4, w // 2), max(4, h // 2)
    x0, y0, x1, y1 = max(0, x - gx), max(0, y - gy), min(vw, x + w + gx), min(vh, y + h + gy)
    outside = np.flatnonzero(~mask[y0:y1, x0:x1])
    if outside.size == 0:
        return points, labels
    if rng is None:
        picks = outside[np.linspace(0, outside.size - 1, count).astype(np.int64)]
    else:
        picks = outside[rng.integers(outside.size, size=count)]
    width = x1 - x0
    points[:, 0] = x0 + picks % width + 0.5
    points[:, 1] = y0 + picks // width + 0.5
    labels[:] = LABEL_BACKGROUND
    return points, labels


def heatmap_target(
    anchors: np.ndarray, classes: np.ndarray, num_classes: int, grid: tuple[int, int], sigma: float = 1.0
) -> np.ndarray:
    """float32 C x gh x gw: per instance a Gaussian (``sigma`` in cells) peaking at 1.0 on its anchor's cell."""
    gh, gw = grid
    heatmap = np.zeros((num_classes, gh, gw), dtype=np.float32)
    if anchors.shape[0] == 0:
        return heatmap
    ys = np.arange(gh, dtype=np.float32)[:, None]
    xs = np.arange(gw, dtype=np.float32)[None, :]
    for (ax, ay), class_id in zip(anchors, classes, strict=True):
        cx = min(gw - 1, max(0, int(ax // EMBED_STRIDE)))
        cy = min(gh - 1, max(0, int(ay // EMBED_STRIDE)))
        peak = np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / np.float32(2.0 * sigma * sigma))
        np.maximum(heatmap[int(class_id)], peak, out=heatmap[int(class_id)])
    return heatmap


def prepare_example(
    sample: Sample,
    *,
    height: int,
    width: int,
    num_classes: int,
    rng: np.random.Generator | None = None,
    augment: bool | AugmentConfig = False,
    negatives: int = 0,
    heatmap_sigma: float = 1.0,
    spec: InputSpec | None = None,
) -> TrainExample:
    """Sample -> TrainExample at ``height`` x ``width`` (see the module docstring).

    ``rng`` None is evaluation mode: deterministic points, no augmentation. ``augment`` True uses
    the default AugmentConfig; it needs ``rng``. ``spec`` overrides the default normalisation
    (a bundle's manifest ``input``). Instances that vanish in a crop are dropped.
    """
    spec = spec or input_spec(height, width)
    if (spec.height, spec.width) != (height, width):
        raise ValueError(f"spec is {spec.height}x{spec.width} but the example size is {height}x{width}")
    if sample.classes.size and int(sample.classes.max()) >= num_classes:
        raise DatasetError(
            sample.source, f"class index {int(sample.classes.max())} but the model has {num_classes} classes"
        )
    config: AugmentConfig | None = None
    if augment:
        if rng is None:
            raise ValueError("augmentation needs an rng (rng=None is deterministic evaluation mode)")
        config = augment if isinstance(augment, AugmentConfig) else AugmentConfig()

    image, masks = sample.image, sample.masks
    if config is not None and rng is not None:
        crop = sample_crop(image.shape[0], image.shape[1], rng, config)
        if crop is not None:
            y0, y1, x0, x1 = crop
            image, masks = image[y0:y1, x0:x1], masks[:, y0:y1, x0:x1]
    box = Letterbox.fit(image.shape[1], image.shape[0], width, height)
    content = resize_image(image, box)
    content_masks = [resize_mask(m, box) for m in masks]
    if config is not None and rng is not None:
        content = photometric(content, rng, config)
        horizontal, vertical = sample_flips(rng, config)
        if horizontal or vertical:
            content = np.ascontiguousarray(flip(content, horizontal, vertical, channels_last=True))
            content_masks = [np.ascontiguousarray(flip(m, horizontal, vertical, channels_last=True))
                             for m in content_masks]

    keep = [i for i, m in enumerate(content_masks) if m.any()]
    classes = sample.classes[keep].astype(np.int64)
    ch, cw = box.content_height, box.content_width
    n = len(keep)
    out_masks = np.zeros((n, height, width), dtype=bool)
    anchors = np.zeros((n, 2), dtype=np.float32)
    points = np.zeros((n, 2), dtype=np.float32)
    neg_points = np.zeros((n, negatives, 2), dtype=np.float32)
    neg_labels = np.full((n, negatives), LABEL_PADDING, dtype=np.float32)
    for j, i in enumerate(keep):
        mask = content_masks[i]
        out_masks[j, :ch, :cw] = mask
        anchors[j] = interior_point(mask)
        points[j] = anchors[j] if rng is None else random_point(mask, rng)
        if negatives:
            neg_points[j], neg_labels[j] = negative_points(mask, (ch, cw), negatives, rng)

    tensor, _ = _preprocessor(spec)(content)  # normalise + pad; no resize: content is the letterbox size
    valid = np.zeros((height, width), dtype=bool)
    valid[:ch, :cw] = True
    grid = (height // EMBED_STRIDE, width // EMBED_STRIDE)
    return TrainExample(
        image=tensor[0],
        masks=out_masks,
        classes=classes,
        points=points,
        heatmap=heatmap_target(anchors, classes, num_classes, grid, heatmap_sigma),
        valid=valid,
        source=sample.source,
        anchors=anchors,
        neg_points=neg_points,
        neg_labels=neg_labels,
        letterbox=box,
    )


def collate(examples: Sequence[TrainExample]) -> dict[str, torch.Tensor]:
    """Stack examples into a batch, padding instances to the batch's most (B examples, N instances).

    image Bx3xHxW float32, masks BxNxHxW bool, classes BxN int64 (-1 padding), points and anchors
    BxNx2 float32, neg_points BxNxMx2, neg_labels BxNxM (-1 padding), instance_valid BxN bool,
    heatmap BxCxhxw float32, valid BxHxW bool. N may be 0.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    b = len(examples)
    n = max(e.classes.shape[0] for e in examples)
    m = max(e.neg_labels.shape[1] for e in examples)
    height, width = examples[0].valid.shape
    masks = torch.zeros((b, n, height, width), dtype=torch.bool)
    classes = torch.full((b, n), -1, dtype=torch.int64)
    points = torch.zeros((b, n, 2), dtype=torch.float32)
    anchors = torch.zeros((b, n, 2), dtype=torch.float32)
    neg_points = torch.zeros((b, n, m, 2), dtype=torch.float32)
    neg_labels = torch.full((b, n, m), float(LABEL_PADDING), dtype=torch.float32)
    instance_valid = torch.zeros((b, n), dtype=torch.bool)
    for i, e in enumerate(examples):
        k, mk = e.classes.shape[0], e.neg_labels.shape[1]
        masks[i, :k] = torch.from_numpy(e.masks)
        classes[i, :k] = torch.from_numpy(e.classes)
        points[i, :k] = torch.from_numpy(e.points)
        anchors[i, :k] = torch.from_numpy(e.anchors)
        neg_points[i, :k, :mk] = torch.from_numpy(e.neg_points)
        neg_labels[i, :k, :mk] = torch.from_numpy(e.neg_labels)
        instance_valid[i, :k] = True
    return {
        "image": torch.from_numpy(np.stack([e.image for e in examples])),
        "masks": masks,
        "classes": classes,
        "points": points,
        "anchors": anchors,
        "neg_points": neg_points,
        "neg_labels": neg_labels,
        "instance_valid": instance_valid,
        "heatmap": torch.from_numpy(np.stack([e.heatmap for e in examples])),
        "valid": torch.from_numpy(np.stack([e.valid for e in examples])),
    }


class PreparedDataset(torch.utils.data.Dataset[TrainExample]):
    """A SampleDataset seen as TrainExamples: for a torch DataLoader with ``collate_fn=collate``.

    With ``train``, example ``i`` of epoch ``e`` draws its prompt points (and, with ``augment``,
    its augmentation) from ``default_rng([seed, e, i])``: the same on every worker count and rank,
    different every epoch (call ``set_epoch``). ``train=False`` is evaluation mode: deterministic
    interior points, no augmentation.
    """

    def __init__(
        self,
        samples: SampleDataset,
        *,
        height: int,
        width: int,
        num_classes: int | None = None,
        train: bool = True,
        augment: bool | AugmentConfig = False,
        negatives: int = 0,
        heatmap_sigma: float = 1.0,
        seed: int = 0,
    ) -> None:
        self.samples = samples
        self.height = height
        self.width = width
        self.num_classes = len(samples.class_names) if num_classes is None else num_classes
        self.train = train
        self.augment = augment if train else False
        self.negatives = negatives
        self.heatmap_sigma = heatmap_sigma
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> TrainExample:
        rng = np.random.default_rng([self.seed, self.epoch, index]) if self.train else None
        return prepare_example(
            self.samples[index],
            height=self.height,
            width=self.width,
            num_classes=self.num_classes,
            rng=rng,
            augment=self.augment,
            negatives=self.negatives,
            heatmap_sigma=self.heatmap_sigma,
        )
