"""Layers shared by several model parts: conv-BN-activation and the depthwise-separable block."""

from __future__ import annotations

from torch import nn


class ConvBNAct(nn.Sequential):
    """Conv2d (no bias) + BatchNorm2d + optional activation: BxCinxHxW -> BxCoutxH/sxW/s."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        act: type[nn.Module] | None = nn.ReLU,
        bn_weight_init: float = 1.0,
    ) -> None:
        conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False
        )
        # Variance-preserving init (fan_in counts a depthwise kernel's 9 inputs, not 9 x channels), so
        # activations stay O(1) through the network even before BatchNorm statistics are learned.
        nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu" if act is not None else "linear")
        bn = nn.BatchNorm2d(out_channels)
        nn.init.constant_(bn.weight, bn_weight_init)
        nn.init.zeros_(bn.bias)
        layers: list[nn.Module] = [conv, bn]
        if act is not None:
            layers.append(act())
        super().__init__(*layers)


class SeparableBlock(nn.Sequential):
    """Depthwise 3x3 then pointwise 1x1, each with BatchNorm and ReLU: BxCinxHxW -> BxCoutxHxW."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            ConvBNAct(in_channels, in_channels, 3, groups=in_channels, act=nn.ReLU),
            ConvBNAct(in_channels, out_channels, 1, act=nn.ReLU),
        )
