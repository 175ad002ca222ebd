"""Points-only prompt encoder, as SAM's: random Fourier features + learned point-type embeddings."""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import nn


class PositionEmbeddingRandom(nn.Module):
    """Positional encoding with random spatial frequencies (SAM's)."""

    positional_encoding_gaussian_matrix: torch.Tensor  # 2xF buffer

    def __init__(self, num_pos_feats: int = 64, scale: float | None = None) -> None:
        super().__init__()
        if scale is None or scale <= 0.0:
            scale = 1.0
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn((2, num_pos_feats)))

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        """coords: ...x2 normalised to [0, 1] -> ...x(2*F)."""
        coords = 2 * coords - 1
        coords = coords @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """Encoding of every cell centre of an h x w grid: -> (2*F)xhxw."""
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        y = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        x = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        grid = torch.stack(
            (x.view(1, w).expand(h, w), y.view(h, 1).expand(h, w)), dim=-1
        )  # hxwx2
        pe = self._pe_encoding(grid)
        return pe.permute(2, 0, 1)  # hxwxC -> Cxhxw

    def forward_with_coords(self, coords: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """coords: BxNx2 (x, y) in pixels of an image of size (H, W) -> BxNx(2*F)."""
        h, w = image_size
        scale = torch.tensor([1.0 / w, 1.0 / h], dtype=coords.dtype, device=coords.device)
        return self._pe_encoding(coords * scale)


class PointPromptEncoder(nn.Module):
    """Encodes point prompts into sparse tokens; the dense prompt is SAM's no-mask embedding.

    Coordinates are (x, y) in input pixels, normalised by ``input_size`` (H, W). Labels are
    1 foreground, 0 background, -1 padding (a not-a-point token with no position).
    """

    def __init__(self, embed_dim: int, input_size: tuple[int, int], embedding_size: tuple[int, int]) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.input_size = input_size
        self.embedding_size = embedding_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(2))  # bg, fg
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.no_mask_embed = nn.Embedding(1, embed_dim)
        # Click map: each point adds its label's vector to the dense embedding, spread over the grid by
        # a Gaussian one cell wide, so the image tokens at a click are marked directly (as interactive
        # segmenters encode clicks). Through positional encodings alone, a decoder trained from scratch
        # on a few hundred panels never learned to use the prompt: it drew the same mask for every point.
        self.click_embeddings = nn.Parameter(torch.randn(2, embed_dim) * 0.5)  # bg, fg: 2xD
        h, w = embedding_size
        cell_x, cell_y = input_size[1] / w, input_size[0] / h
        ys = (torch.arange(h, dtype=torch.float32) + 0.5) * cell_y
        xs = (torch.arange(w, dtype=torch.float32) + 0.5) * cell_x
        self.cell_centres: torch.Tensor  # (h*w)x2 buffer: (x, y) of each embedding cell in input pixels
        self.register_buffer(
            "cell_centres",
            torch.stack((xs.view(1, w).expand(h, w), ys.view(h, 1).expand(h, w)), dim=-1).reshape(h * w, 2),
            persistent=False,
        )
        self.click_sigma = (cell_x + cell_y) / 2.0

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image embedding grid: -> 1xDxhxw."""
        return self.pe_layer(self.embedding_size).unsqueeze(0)

    def forward(self, point_coords: torch.Tensor, point_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """point_coords: BxPx2 pixels, point_labels: BxP (float or int).

        Returns sparse embeddings BxPxD and the dense embedding BxDxhxw (no-mask embedding + click map).
        """
        pe = self.pe_layer.forward_with_coords(point_coords, self.input_size)  # BxPxD
        labels = point_labels.unsqueeze(-1)  # BxP -> BxPx1
        is_pad = (labels == -1).to(pe.dtype)
        is_bg = (labels == 0).to(pe.dtype)
        is_fg = (labels == 1).to(pe.dtype)
        bg_embed, fg_embed = (cast(nn.Embedding, embed) for embed in self.point_embeddings)
        sparse = (
            pe * (1.0 - is_pad)
            + is_pad * self.not_a_point_embed.weight
            + is_bg * bg_embed.weight
            + is_fg * fg_embed.weight
        )
        dense = self.no_mask_embed.weight.view(1, -1, 1, 1) + self.click_map(point_coords, is_bg, is_fg)
        return sparse, dense

    def click_map(self, point_coords: torch.Tensor, is_bg: torch.Tensor, is_fg: torch.Tensor) -> torch.Tensor:
        """point_coords BxPx2 pixels, is_bg/is_fg BxPx1 -> BxDxhxw: sum over points of label vector x Gaussian."""
        b = point_coords.shape[0]
        h, w = self.embedding_size
        # Bx1xPx2 - (hw)x1x2 -> Bx(hw)xPx2 -> squared distance in cells: Bx(hw)xP
        offset = (point_coords.unsqueeze(1) - self.cell_centres.view(1, h * w, 1, 2)) / self.click_sigma
        weight = torch.exp(-0.5 * (offset * offset).sum(-1))
        vectors = is_bg * self.click_embeddings[0] + is_fg * self.click_embeddings[1]  # BxPxD (0 for padding)
        spread = weight @ vectors  # Bx(hw)xP @ BxPxD -> Bx(hw)xD
        return spread.transpose(1, 2).reshape(b, -1, h, w)  # Bx(hw)xD -> BxDxhxw
