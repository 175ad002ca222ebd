"""Saliency head (embedding -> per-class heatmap logits) and top-K peak picking.

Peak picking runs inside the fused graph: max over classes, 3x3 max-pool NMS, TopK over the
flattened map, the class is the argmax over classes at the peak, and the point is the
centre of the peak's stride-16 cell in input pixels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from training.model.common import ConvBNAct


class SaliencyHead(nn.Module):
    """Depthwise 3x3, 1x1 to ``hidden``, 1x1 to classes: Bx256xhxw -> BxCxhxw logits."""

    def __init__(self, embed_dim: int, num_classes: int, hidden: int = 128, prior: float = 0.01) -> None:
        super().__init__()
        self.body = nn.Sequential(
            ConvBNAct(embed_dim, embed_dim, 3, groups=embed_dim, act=nn.ReLU),
            ConvBNAct(embed_dim, hidden, 1, act=nn.ReLU),
        )
        self.out = nn.Conv2d(hidden, num_classes, 1)
        # Start every class near probability `prior`, so early training is not swamped by negatives.
        if self.out.bias is not None:
            nn.init.constant_(self.out.bias, -math.log((1 - prior) / prior))
        self.num_classes = num_classes

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """embedding: Bx256xhxw -> BxCxhxw heatmap logits."""
        return self.out(self.body(embedding))


def pick_peaks(
    probs: torch.Tensor, k: int, stride: int = 16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-K local maxima of a per-class probability map.

    probs: BxCxhxw in [0, 1] (sigmoid of the head's logits); k <= h*w.
    Returns points BxKx2 float32 ((x, y) in input pixels, the centre of the peak's cell),
    scores BxK float32 (the probability at the peak), classes BxK int64 (argmax over C there).
    """
    b, _, h, w = probs.shape
    best, classes = probs.max(dim=1)  # BxCxhxw -> Bxhxw, Bxhxw
    pooled = F.max_pool2d(best.unsqueeze(1), kernel_size=3, stride=1, padding=1).squeeze(1)
    suppressed = best * (best == pooled).to(best.dtype)  # zero everything that is not a local max
    scores, index = suppressed.view(b, h * w).topk(k, dim=1)  # Bxhxw -> Bx(h*w) -> BxK
    peak_classes = classes.view(b, h * w).gather(1, index)
    iy = torch.div(index, w, rounding_mode="floor")
    ix = index - iy * w
    # BxK, BxK -> BxKx2
    points = (torch.stack((ix, iy), dim=-1).to(probs.dtype) + 0.5) * stride
    return points, scores, peak_classes
