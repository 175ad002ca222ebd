"""The window segmenter: a 1:1 window of the frame -> per-pixel class logits, at the window's own scale.

encoder (training/model/mobile_cnn.py) -> neck -> decoder (training/model/decoder.py). Fully
convolutional: any window whose sides are multiples of 16 (the runtime's default is in the
bundle's manifest). The image is normalised RGB (the runtime normalises; the graph does not).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from training.model.decoder import Neck, UNetDecoder

STRIDE = 16  # window sides must be multiples of this


@dataclass(frozen=True)
class SegmenterOutput:
    """logits Bx(C+1)xHxW (class 0 background); neck [n2, n4, n8, n16]; embedding = n16, BxDxH/16xW/16."""

    logits: torch.Tensor
    neck: list[torch.Tensor]

    @property
    def embedding(self) -> torch.Tensor:
        return self.neck[3]


class WindowSegmenter(nn.Module):
    """image Bx3xHxW -> logits Bx(C+1)xHxW."""

    def __init__(self, encoder: nn.Module, neck: Neck, decoder: UNetDecoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.neck = neck
        self.decoder = decoder

    @property
    def num_classes(self) -> int:
        """Defect classes (the logits carry one more: background)."""
        return self.decoder.num_classes

    @property
    def embed_dim(self) -> int:
        return self.neck.embed_dim

    def embed(self, image: torch.Tensor) -> list[torch.Tensor]:
        """image: Bx3xHxW -> neck features [n2, n4, n8, n16]."""
        return self.neck(self.encoder(image))

    def run(self, image: torch.Tensor) -> SegmenterOutput:
        """image: Bx3xHxW -> logits and the neck features (for the distillation terms)."""
        neck = self.embed(image)
        return SegmenterOutput(logits=self.decoder(image, neck), neck=neck)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image: Bx3xHxW -> logits Bx(C+1)xHxW."""
        return self.decoder(image, self.embed(image))


def foreground_logit(logits: torch.Tensor) -> torch.Tensor:
    """Bx(C+1)xHxW class logits -> BxHxW logit of 'any defect' (log of P(defect) / P(background))."""
    return torch.logsumexp(logits[:, 1:], dim=1) - logits[:, 0]
