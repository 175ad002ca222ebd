"""The export contract: names, shapes and dtypes of the two graphs a bundle carries.

Defined once, used by training/export (to write the graphs), by engines/ (to check a bundle
before it runs and to read its outputs) and by the tests. Both graphs are fully convolutional:
their spatial axes (and the segment graph's batch axis) are dynamic, named below; a bundle's
manifest gives the sizes it was trained and measured at.

Find graph (``find.onnx``), the whole frame reduced r-fold (engines/find.py makes its input)::

    image       float32  1 x 3 x h x w          grey mean, minimum, maximum of each r x r block,
                                                normalised (the manifest's find.mean / find.std);
                                                h, w multiples of 16
 -> candidates  float32  1 x 1 x h/8 x w/8      P(a defect pixel in this cell), sigmoid

Segment graph (``segment.onnx``), 1:1 windows of the frame (engines/windows.py cuts them)::

    windows     float32  B x 3 x H x W          normalised RGB (the manifest's segment.mean / std);
                                                H, W multiples of 16
 -> class_probs float32  B x (C+1) x H x W      per-pixel softmax; channel 0 background, c+1 class c
"""

from __future__ import annotations

from dataclasses import dataclass

# Every spatial side a graph takes is a multiple of this (both encoders reach stride 16).
SIDE_MULTIPLE = 16
# The find graph gives one candidate per CELL_STRIDE x CELL_STRIDE pixels of its input.
CELL_STRIDE = 8

# Normalisation of the segment graph's RGB windows (SAM's ImageNet statistics, RGB on 0..255).
PIXEL_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
PIXEL_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)
# Normalisation of the find graph's three grey channels (block mean, minimum, maximum, 0..255).
FIND_MEAN: tuple[float, float, float] = (128.0, 128.0, 128.0)
FIND_STD: tuple[float, float, float] = (64.0, 64.0, 64.0)

FIND_INPUT = "image"
FIND_OUTPUT = "candidates"
SEGMENT_INPUT = "windows"
SEGMENT_OUTPUT = "class_probs"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]  # a str names a dynamic axis
    dtype: str  # numpy dtype name


def find_input() -> TensorSpec:
    return TensorSpec(FIND_INPUT, (1, 3, "height", "width"), "float32")


def find_output() -> TensorSpec:
    return TensorSpec(FIND_OUTPUT, (1, 1, "cells_y", "cells_x"), "float32")


def segment_input() -> TensorSpec:
    return TensorSpec(SEGMENT_INPUT, ("batch", 3, "height", "width"), "float32")


def segment_output(num_classes: int) -> TensorSpec:
    """num_classes: defect classes C; the output has C + 1 channels (background first)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    return TensorSpec(SEGMENT_OUTPUT, ("batch", num_classes + 1, "height", "width"), "float32")


def check_side(name: str, value: int) -> None:
    """ValueError unless ``value`` is a positive multiple of SIDE_MULTIPLE."""
    if value <= 0 or value % SIDE_MULTIPLE:
        raise ValueError(f"{name} must be a positive multiple of {SIDE_MULTIPLE}, got {value}")
