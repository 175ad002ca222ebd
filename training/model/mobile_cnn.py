"""A MobileNetV2-style CNN encoder at stride 16: inverted residuals, BatchNorm, ReLU6.

No LayerNorm and no attention, so TensorRT fuses every block and INT8 calibration is easy.
The default student's encoder: it returns the stride-16 feature for the neck and the
stride-8 feature for the mask decoder's optional skip fusion.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from training.model.common import ConvBNAct

# (expand ratio t, output channels c, repeats n, stride of the first block s), MobileNetV2's table
# cut at stride 16 and slimmed for 576x1024 inputs on a CPU.
DEFAULT_STAGES: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),  # stride 2
    (4, 24, 2, 2),  # stride 4
    (4, 40, 3, 2),  # stride 8: the skip feature
    (4, 80, 3, 2),  # stride 16
    (6, 112, 2, 1),
    (6, 160, 1, 1),
)

# The lite encoder's table: its stem patchifies straight to stride 4 (a 4x4 stride-4 conv), so no
# layer runs at stride 2, where the table above spends a third of its INT8 time on memory traffic.
LITE_STAGES: tuple[tuple[int, int, int, int], ...] = (
    (4, 24, 1, 1),  # stride 4
    (4, 40, 3, 2),  # stride 8: the skip feature
    (4, 80, 3, 2),  # stride 16
    (6, 112, 2, 1),
    (6, 160, 1, 1),
)


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


class PatchifyStem(nn.Sequential):
    """Non-overlapping PxP patches to channels: conv (kernel = stride = P), BatchNorm, ReLU6.

    Bx3xHxW -> BxCxH/PxW/P.
    """

    def __init__(self, in_channels: int, out_channels: int, patch: int) -> None:
        conv = nn.Conv2d(in_channels, out_channels, patch, patch, bias=False)
        nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")
        super().__init__(conv, nn.BatchNorm2d(out_channels), nn.ReLU6())


class MobileCNN(nn.Module):
    """Stem + inverted-residual stages: Bx3xHxW -> (BxC16xH/16xW/16, BxC8xH/8xW/8)."""

    def __init__(
        self,
        stages: Sequence[tuple[int, int, int, int]] = DEFAULT_STAGES,
        stem_channels: int = 16,
        in_chans: int = 3,
        stem_stride: int = 2,
    ) -> None:
        """stem_stride: 2 (MobileNetV2's 3x3 stride-2 conv) or 4 (a 4x4 stride-4 patchify conv)."""
        super().__init__()
        self.stem: nn.Sequential
        if stem_stride == 2:
            self.stem = ConvBNAct(in_chans, stem_channels, 3, 2, act=nn.ReLU6)
        elif stem_stride == 4:
            self.stem = PatchifyStem(in_chans, stem_channels, 4)
        else:
            raise ValueError(f"stem_stride must be 2 or 4, got {stem_stride}")
        blocks: list[nn.Module] = []
        channels = stem_channels
        stride = stem_stride
        self.skip_index = -1
        for t, c, n, s in stages:
            for i in range(n):
                block_stride = s if i == 0 else 1
                blocks.append(InvertedResidual(channels, c, block_stride, t))
                channels = c
                stride *= block_stride
            if stride == 8:
                self.skip_index = len(blocks) - 1
                self.skip_channels = channels
        if stride != 16 or self.skip_index < 0:
            raise ValueError(f"stages must reach stride 8 and end at stride 16, they end at stride {stride}")
        self.blocks = nn.ModuleList(blocks)
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: Bx3xHxW -> (BxC16xH/16xW/16, BxC8xH/8xW/8)."""
        x = self.stem(x)
        skip = x
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i == self.skip_index:
                skip = x
        return x, skip
