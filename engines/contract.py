"""The export contract: names, shapes and dtypes of every graph a bundle carries.

Defined once, used by training/export (to write the graphs), by engines/ (to check a bundle
before it runs and to read its outputs) and by the tests. Shapes are static: a bundle is
exported for one input size, one K and one class count.

Fused graph (``model.onnx``), batch of one::

    image            float32  1 x 3 x H x W        normalised RGB (see the manifest's mean/std)
 -> heatmap          float32  1 x C x H/16 x W/16  per-class defect probability (sigmoid)
    points           float32  K x 2                (x, y) of the top-K heatmap peaks, in input pixels
    point_scores     float32  K                    heatmap probability at each peak
    point_classes    int64    K                    class index of each peak (argmax over C)
    mask_logits      float32  K x H/s x W/s        one mask per peak, s = mask_stride (8 student, 4 SAM)
    iou              float32  K                    the decoder's predicted IoU of each mask
    image_embedding  float32  1 x 256 x H/16 x W/16  input of the decoder-only graph

Decoder-only graph (``decoder.onnx``), for interactive point prompts::

    image_embedding  float32  1 x 256 x H/16 x W/16
    point_coords     float32  1 x P x 2            (x, y) in input pixels; P is dynamic
    point_labels     float32  1 x P                1 foreground, 0 background, -1 padding
 -> mask_logits      float32  1 x H/s x W/s
    iou              float32  1
"""

from __future__ import annotations

from dataclasses import dataclass

EMBED_DIM = 256
EMBED_STRIDE = 16

# Normalisation every model of the family is trained and exported with (SAM's ImageNet statistics,
# RGB on the 0..255 scale). A bundle's manifest carries its own; these are what training writes there.
PIXEL_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
PIXEL_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)

INPUT_NAME = "image"
FUSED_OUTPUT_NAMES: tuple[str, ...] = (
    "heatmap",
    "points",
    "point_scores",
    "point_classes",
    "mask_logits",
    "iou",
    "image_embedding",
)
DECODER_INPUT_NAMES: tuple[str, ...] = ("image_embedding", "point_coords", "point_labels")
DECODER_OUTPUT_NAMES: tuple[str, ...] = ("mask_logits", "iou")

# Point labels understood by the prompt encoder (SAM's convention).
LABEL_PADDING = -1
LABEL_BACKGROUND = 0
LABEL_FOREGROUND = 1


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]  # a str marks a dynamic axis (decoder prompts only)
    dtype: str  # numpy dtype name: "float32" or "int64"


@dataclass(frozen=True)
class GraphShape:
    """The few numbers a bundle is exported with; every tensor shape follows from them."""

    height: int
    width: int
    k: int
    num_classes: int
    mask_stride: int

    def __post_init__(self) -> None:
        for name in ("height", "width"):
            value = getattr(self, name)
            if value <= 0 or value % EMBED_STRIDE:
                raise ValueError(f"{name} must be a positive multiple of {EMBED_STRIDE}, got {value}")
        if self.k < 1:
            raise ValueError(f"k must be at least 1, got {self.k}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {self.num_classes}")
        if self.mask_stride not in (4, 8):
            raise ValueError(f"mask_stride must be 4 or 8, got {self.mask_stride}")

    @property
    def embed_hw(self) -> tuple[int, int]:
        return self.height // EMBED_STRIDE, self.width // EMBED_STRIDE

    @property
    def mask_hw(self) -> tuple[int, int]:
        return self.height // self.mask_stride, self.width // self.mask_stride

    def input_spec(self) -> TensorSpec:
        return TensorSpec(INPUT_NAME, (1, 3, self.height, self.width), "float32")

    def fused_outputs(self) -> tuple[TensorSpec, ...]:
        eh, ew = self.embed_hw
        mh, mw = self.mask_hw
        k = self.k
        return (
            TensorSpec("heatmap", (1, self.num_classes, eh, ew), "float32"),
            TensorSpec("points", (k, 2), "float32"),
            TensorSpec("point_scores", (k,), "float32"),
            TensorSpec("point_classes", (k,), "int64"),
            TensorSpec("mask_logits", (k, mh, mw), "float32"),
            TensorSpec("iou", (k,), "float32"),
            TensorSpec("image_embedding", (1, EMBED_DIM, eh, ew), "float32"),
        )

    def decoder_inputs(self) -> tuple[TensorSpec, ...]:
        eh, ew = self.embed_hw
        return (
            TensorSpec("image_embedding", (1, EMBED_DIM, eh, ew), "float32"),
            TensorSpec("point_coords", (1, "num_points", 2), "float32"),
            TensorSpec("point_labels", (1, "num_points"), "float32"),
        )

    def decoder_outputs(self) -> tuple[TensorSpec, ...]:
        mh, mw = self.mask_hw
        return (
            TensorSpec("mask_logits", (1, mh, mw), "float32"),
            TensorSpec("iou", (1,), "float32"),
        )
