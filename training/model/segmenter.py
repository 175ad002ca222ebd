"""The composite student: encoder, neck, saliency head, prompt encoder and mask decoder."""

from __future__ import annotations

import torch
from torch import nn

from training.model.mask_decoder import MaskDecoder
from training.model.prompt_encoder import PointPromptEncoder
from training.model.saliency import SaliencyHead, pick_peaks

EMBED_STRIDE = 16


class DefectSegmenter(nn.Module):
    """Image -> embedding -> heatmap -> top-K point prompts -> one mask per prompt.

    The image is the normalised RGB image (the runtime normalises; no normalisation here).
    """

    def __init__(
        self,
        encoder: nn.Module,
        neck: nn.Module,
        saliency_head: SaliencyHead,
        prompt_encoder: PointPromptEncoder,
        mask_decoder: MaskDecoder,
        input_size: tuple[int, int],
        k: int = 8,
    ) -> None:
        """input_size: (H, W) the model is exported for; k: peaks (prompts) per image."""
        super().__init__()
        self.encoder = encoder
        self.neck = neck
        self.saliency_head = saliency_head
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.input_size = input_size
        self.k = k

    @property
    def num_classes(self) -> int:
        return self.saliency_head.num_classes

    @property
    def mask_stride(self) -> int:
        return self.mask_decoder.mask_stride

    def embed(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image: Bx3xHxW -> (embedding Bx256xH/16xW/16, skip feature BxCsxH/8xW/8)."""
        features, skip = self.encoder(image)
        return self.neck(features), skip

    def heatmap(self, embedding: torch.Tensor) -> torch.Tensor:
        """embedding: Bx256xhxw -> heatmap logits BxCxhxw."""
        return self.saliency_head(embedding)

    def decode(
        self,
        embedding: torch.Tensor,
        skip: torch.Tensor | None,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """embedding: Bix256xhxw (Bi = 1 shared by all B prompt sets, or Bi = B),
        skip: BixCsx2hx2w or None, point_coords: BxPx2 pixels, point_labels: BxP.

        Returns mask_logits BxH/sxW/s (s = mask_stride) and iou B.
        """
        sparse, dense = self.prompt_encoder(point_coords, point_labels)
        return self.mask_decoder(embedding, self.prompt_encoder.get_dense_pe(), sparse, dense, skip)

    def forward_fused(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """image: 1x3xHxW -> the fused graph's outputs (engines.contract), in order:

        heatmap 1xCxhxw (probabilities), points Kx2, point_scores K, point_classes K (int64),
        mask_logits KxH/sxW/s, iou K, image_embedding 1x256xhxw.
        """
        embedding, skip = self.embed(image)
        heatmap = torch.sigmoid(self.heatmap(embedding))
        points, scores, classes = pick_peaks(heatmap, self.k, EMBED_STRIDE)  # 1xKx2, 1xK, 1xK
        # Each peak is one single-point foreground prompt: 1xKx2 -> Kx1x2.
        coords = points.reshape(self.k, 1, 2)
        labels = torch.ones(self.k, 1, dtype=coords.dtype, device=coords.device)
        masks, iou = self.decode(embedding, skip, coords, labels)
        return heatmap, points[0], scores[0], classes[0], masks, iou, embedding

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Same as ``forward_fused``."""
        return self.forward_fused(image)
