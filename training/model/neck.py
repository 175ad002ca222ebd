"""Necks: encoder feature -> the 256-channel stride-16 image embedding; the distillation adapter."""

from __future__ import annotations

import torch
from torch import nn

from training.model.common import ConvBNAct, LayerNorm2d


class SamNeck(nn.Sequential):
    """SAM's neck: 1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d. BxCinxhxw -> Bx256xhxw."""

    def __init__(self, in_channels: int, out_channels: int = 256) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            LayerNorm2d(out_channels),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            LayerNorm2d(out_channels),
        )


class ConvNeck(nn.Sequential):
    """Cheap neck, BatchNorm only: 1x1 conv, depthwise 3x3, 1x1 conv. BxCinxhxw -> Bx256xhxw."""

    def __init__(self, in_channels: int, out_channels: int = 256) -> None:
        super().__init__(
            ConvBNAct(in_channels, out_channels, 1, act=nn.ReLU),
            ConvBNAct(out_channels, out_channels, 3, groups=out_channels, act=nn.ReLU),
            ConvBNAct(out_channels, out_channels, 1, act=None),
        )


class EmbeddingAdapter(nn.Module):
    """1x1 conv from the student's embedding to the teacher's channels, for feature distillation.

    Used by the training loop only; it is not part of an exported graph.
    """

    def __init__(self, in_channels: int = 256, teacher_channels: int = 256) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, teacher_channels, 1)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """embedding: Bx256xhxw -> BxCtxhxw."""
        return self.proj(embedding)
