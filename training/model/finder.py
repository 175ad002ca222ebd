"""The candidate finder: the whole frame, reduced, -> where a defect may be, at stride 8 of its input.

Its input is the frame in grey at 1/r scale (engines/find.py: per r x r block the mean, the
minimum and the maximum, so a 1 px scratch keeps its full contrast in the min or max channel
after a 4x reduction). A small encoder to stride 16 and a two-level head give one logit per
stride-8 cell (32 x 32 frame pixels at r = 4): is any defect pixel in this cell. The runtime
(engines/windows.py) covers the likely cells with 1:1 windows for the segmenter.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from training.model.common import ConvBNAct, SeparableBlock
from training.model.mobile_cnn import MobileCNN, Stage

CELL_STRIDE = 8  # candidate cells per input pixel: one logit per 8 x 8 input pixels

FINDER_STAGES: tuple[Stage, ...] = (
    (1, 16, 1, 1),  # stride 2
    (4, 24, 2, 2),  # stride 4
    (4, 40, 3, 2),  # stride 8
    (4, 64, 2, 2),  # stride 16
    (4, 64, 1, 1),
)


class CandidateFinder(nn.Module):
    """find input Bx3xHxW (H, W multiples of 16) -> candidate logits Bx1xH/8xW/8."""

    def __init__(self, stages: Sequence[Stage] = FINDER_STAGES, stem_channels: int = 16, width: int = 32) -> None:
        super().__init__()
        self.encoder = MobileCNN(stages, stem_channels=stem_channels)
        _, _, c8, c16 = self.encoder.channels
        self.lateral8 = ConvBNAct(c8, width)
        self.lateral16 = ConvBNAct(c16, width)
        self.context = nn.Conv2d(c16, width, 1)
        self.fuse = SeparableBlock(width, width)
        self.head = nn.Conv2d(width, 1, 1)
        # Start every cell near probability 0.01: most cells are defect-free (focal-loss prior).
        if self.head.bias is not None:
            nn.init.constant_(self.head.bias, -4.6)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image: Bx3xHxW -> logits Bx1xH/8xW/8."""
        _, _, f8, f16 = self.encoder(image)
        deep = self.lateral16(f16) + self.context(f16.mean(dim=(2, 3), keepdim=True))
        x = self.lateral8(f8) + F.interpolate(deep, size=f8.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(self.fuse(x))
