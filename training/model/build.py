"""The model registry: every variant is a few numbers passed to one private builder.

Two kinds, one registry each: window segmenters (the look-closer pass; students and teachers of
one family share the decoder widths) and candidate finders (the find pass).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import nn

from training.model.decoder import DEFAULT_WIDTHS, Neck, UNetDecoder
from training.model.finder import CELL_STRIDE, CandidateFinder
from training.model.mobile_cnn import DEFAULT_STAGES, WIDE_STAGES, MobileCNN, Stage
from training.model.segmenter import STRIDE, WindowSegmenter

PARTS: tuple[str, ...] = ("encoder", "neck", "decoder")


def _segmenter(
    *, stages: Sequence[Stage], stem_channels: int, widths: Sequence[int], num_classes: int
) -> WindowSegmenter:
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    encoder = MobileCNN(stages, stem_channels=stem_channels)
    return WindowSegmenter(encoder, Neck(encoder.channels, widths), UNetDecoder(num_classes, widths))


_SEGMENTERS: dict[str, Callable[..., WindowSegmenter]] = {
    # The default student: MobileNetV2-style encoder (0.6 M), U-Net decoder to stride 1.
    "student_seg": partial(_segmenter, stages=DEFAULT_STAGES, stem_channels=16, widths=DEFAULT_WIDTHS),
    # The teacher of the same family: twice the encoder width, the student's decoder widths (transplantable).
    "teacher_seg": partial(_segmenter, stages=WIDE_STAGES, stem_channels=32, widths=DEFAULT_WIDTHS),
}

_FINDERS: dict[str, Callable[[], CandidateFinder]] = {
    "finder": CandidateFinder,
}


def list_models() -> list[str]:
    """Names accepted by ``build_model`` (window segmenters)."""
    return list(_SEGMENTERS)


def list_finders() -> list[str]:
    """Names accepted by ``build_finder``."""
    return list(_FINDERS)


def build_model(name: str, *, num_classes: int = 3) -> WindowSegmenter:
    """Build a registered window segmenter, randomly initialised, in eval mode.

    Raises KeyError for an unknown name and ValueError for a bad class count.
    """
    if name not in _SEGMENTERS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(_SEGMENTERS)}")
    return _SEGMENTERS[name](num_classes=num_classes).eval()


def build_finder(name: str = "finder") -> CandidateFinder:
    """Build a registered candidate finder, randomly initialised, in eval mode. KeyError for an unknown name."""
    if name not in _FINDERS:
        raise KeyError(f"unknown finder {name!r}; known: {', '.join(_FINDERS)}")
    return _FINDERS[name]().eval()


def class_head_names(name: str) -> list[str]:
    """The tensors of segmenter ``name`` whose shape follows the class count (its class head)."""
    one, two = build_model(name, num_classes=1).state_dict(), build_model(name, num_classes=2).state_dict()
    return [key for key, value in one.items() if value.shape != two[key].shape]


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def parameter_counts(model: WindowSegmenter) -> dict[str, int]:
    """Trainable parameters per part (``PARTS``) and ``total``."""
    counts = {part: count_parameters(getattr(model, part)) for part in PARTS}
    counts["total"] = count_parameters(model)
    return counts


def count_macs(model: nn.Module, height: int, width: int, batch: int = 1) -> int:
    """Multiply-accumulates of one forward pass on a batch of ``batch`` HxW inputs (all matmuls and convs)."""
    from torch.utils.flop_counter import FlopCounterMode

    image = torch.zeros(batch, 3, height, width)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(image)
    return counter.get_total_flops() // 2


__all__ = ["CELL_STRIDE", "PARTS", "STRIDE", "build_finder", "build_model", "count_macs", "list_finders",
           "list_models", "parameter_counts"]
