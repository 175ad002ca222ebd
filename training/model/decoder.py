"""Neck and decoder of the window segmenter: encoder features -> per-pixel class logits at stride 1.

The neck maps the encoder's features at strides 2, 4, 8 and 16 to the decoder's widths (1x1
laterals; the stride-16 one adds a global context vector, as a pyramid-pooling head does). Its
stride-16 output is the image embedding the feature-distillation terms align with a teacher's.

The decoder is a U-Net's expanding path in FPN form: from stride 16 up, each step projects the
coarser map to the next width (1x1, at the coarse resolution, where it is cheap), doubles its
resolution (nearest), adds the neck's feature of that stride and fuses them with a depthwise-
separable block. The last step reaches stride 1 and adds a 3x3 convolution of the image itself,
so a 1-2 px scratch's edges are drawn from its own pixels; a 1x1 then gives the logits of
background (class 0) and every defect class. Sums, not concatenations, and nearest, not bilinear,
upsampling: on ONNX Runtime's CPU kernels (FP32 and INT8) a full-resolution Concat and a bilinear
Resize cost as much as the convolutions around them (docs/model.md).

Teacher and student of one family share the neck's output widths, so the decoder of one fits the
other: the transplant (MobileSAM-style) recipe copies it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from training.model.common import ConvBNAct, SeparableBlock

# Decoder widths at strides 16, 8, 4, 2, 1.
DEFAULT_WIDTHS: tuple[int, int, int, int, int] = (96, 64, 48, 32, 16)


class Neck(nn.Module):
    """[f2, f4, f8, f16] (encoder channels) -> [n2, n4, n8, n16] (decoder widths)."""

    def __init__(self, encoder_channels: Sequence[int], widths: Sequence[int] = DEFAULT_WIDTHS) -> None:
        super().__init__()
        c2, c4, c8, c16 = encoder_channels
        d16, d8, d4, d2, _ = widths
        self.laterals = nn.ModuleList(
            ConvBNAct(c, d, act=None) for c, d in ((c2, d2), (c4, d4), (c8, d8), (c16, d16))
        )
        self.context = nn.Conv2d(c16, d16, 1)  # global average -> a vector added everywhere at stride 16
        self.embed_dim = d16

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """[f2, f4, f8, f16] -> [n2, n4, n8, n16]; n16 (BxDxH/16xW/16) is the image embedding."""
        out = [lateral(f) for lateral, f in zip(self.laterals, features, strict=True)]
        out[3] = out[3] + self.context(features[3].mean(dim=(2, 3), keepdim=True))
        return out


class UNetDecoder(nn.Module):
    """(image Bx3xHxW, [n2, n4, n8, n16]) -> logits Bx(C+1)xHxW, class 0 background."""

    def __init__(self, num_classes: int, widths: Sequence[int] = DEFAULT_WIDTHS) -> None:
        super().__init__()
        d16, d8, d4, d2, d1 = widths
        self.top = SeparableBlock(d16, d16)
        pairs = ((d16, d8), (d8, d4), (d4, d2), (d2, d1))
        self.project = nn.ModuleList(ConvBNAct(deep, fine, act=None) for deep, fine in pairs)
        self.fuse = nn.ModuleList(SeparableBlock(fine, fine) for _, fine in pairs)
        self.pixels = ConvBNAct(3, d1, 3, act=None)  # the image at full resolution
        self.head = nn.Conv2d(d1, num_classes + 1, 1)
        self.num_classes = num_classes

    def forward(self, image: torch.Tensor, neck: Sequence[torch.Tensor]) -> torch.Tensor:
        """image: Bx3xHxW; neck: [n2, n4, n8, n16] -> logits Bx(C+1)xHxW."""
        n2, n4, n8, n16 = neck
        x = self.top(torch.relu(n16))
        for project, fuse, skip in zip(self.project, self.fuse, (n8, n4, n2, None), strict=True):
            fine = self.pixels(image) if skip is None else skip
            # Bxdeepxhxw -> Bxfinexhxw -> Bxfinex2hx2w, plus the finer feature
            x = fuse(torch.relu(F.interpolate(project(x), scale_factor=2.0, mode="nearest") + fine))
        return self.head(x)
