"""A MobileNetV2-style CNN encoder: inverted residuals, BatchNorm, ReLU6, features at strides 2-16.

No LayerNorm and no attention, so TensorRT fuses every block and INT8 calibration is easy. The
encoder returns the last feature of every stride (2, 4, 8, 16) for the U-Net decoder's skips.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from training.model.common import ConvBNAct

Stage = tuple[int, int, int, int]  # expand ratio t, output channels c, repeats n, stride of the first block s

# MobileNetV2's table cut at stride 16 and slimmed for 1:1 windows on a CPU.
DEFAULT_STAGES: tuple[Stage, ...] = (
    (1, 16, 1, 1),  # stride 2
    (4, 24, 2, 2),  # stride 4
    (4, 40, 3, 2),  # stride 8
    (4, 80, 3, 2),  # stride 16
    (6, 112, 2, 1),
    (6, 160, 1, 1),
)

# Teacher-sized: the same table at twice the width, one more block per stage from stride 8 on.
WIDE_STAGES: tuple[Stage, ...] = (
    (1, 32, 1, 1),
    (4, 48, 2, 2),
    (4, 80, 4, 2),
    (4, 160, 4, 2),
    (6, 224, 3, 1),
    (6, 320, 1, 1),
)

STRIDES: tuple[int, ...] = (2, 4, 8, 16)


class InvertedResidual(nn.Module):
    """1x1 expand, 3x3 depthwise (stride s), 1x1 linear project; residual when shapes allow.

    BxCinxHxW -> BxCoutxH/sxW/s.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNAct(in_channels, hidden, 1, act=nn.ReLU6))
        self.use_residual = stride == 1 and in_channels == out_channels
        layers += [
            ConvBNAct(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
            # A residual block starts as the identity (its last BN scale is 0): depth does not blow up
            # the activations at initialisation.
            ConvBNAct(hidden, out_channels, 1, act=None, bn_weight_init=0.0 if self.use_residual else 1.0),
        ]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: BxCinxHxW -> BxCoutxH/sxW/s."""
        y = self.block(x)
        return x + y if self.use_residual else y


class MobileCNN(nn.Module):
    """3x3 stride-2 stem + inverted-residual stages: Bx3xHxW -> [f2, f4, f8, f16], f_s: BxC_sxH/sxW/s.

    ``channels`` gives C_s for each stride of ``STRIDES``. H and W must be multiples of 16.
    """

    def __init__(self, stages: Sequence[Stage] = DEFAULT_STAGES, stem_channels: int = 16, in_chans: int = 3) -> None:
        super().__init__()
        self.stem = ConvBNAct(in_chans, stem_channels, 3, 2, act=nn.ReLU6)
        blocks: list[nn.Module] = []
        channels, stride = stem_channels, 2
        tap_of: dict[int, int] = {2: -1}  # stride -> index of the block whose output is that stride's last
        tap_channels: dict[int, int] = {2: stem_channels}
        for t, c, n, s in stages:
            for i in range(n):
                block_stride = s if i == 0 else 1
                blocks.append(InvertedResidual(channels, c, block_stride, t))
                channels = c
                stride *= block_stride
                tap_of[stride] = len(blocks) - 1
                tap_channels[stride] = channels
        if stride != 16 or set(tap_of) != set(STRIDES):
            raise ValueError(f"stages must pass through strides {STRIDES} and end at 16, they end at stride {stride}")
        self.blocks = nn.ModuleList(blocks)
        self.taps = tuple(tap_of[s] for s in STRIDES)
        self.channels = tuple(tap_channels[s] for s in STRIDES)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: Bx3xHxW -> [f2, f4, f8, f16]."""
        x = self.stem(x)
        features = [x] if self.taps[0] == -1 else []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.taps:
                features.append(x)
        return features
