"""SAM-style mask decoder: full SAM (x4 upscaling, 3+1 mask tokens) or slim (x2, one mask token).

Both come from ``MaskDecoder`` with other numbers. The slim form projects the 256-channel
embedding to a smaller transformer dimension first and may add the encoder's stride-8
feature to the upscaled embedding (thin scratches survive the stride-16 bottleneck).
"""

from __future__ import annotations

import torch
from torch import nn

from training.model.common import MLP, LayerNorm2d
from training.model.transformer import TwoWayTransformer


class MaskDecoder(nn.Module):
    """Predicts one mask and its IoU per prompt set from an image embedding and prompt tokens."""

    def __init__(
        self,
        *,
        transformer: TwoWayTransformer,
        embed_dim: int = 256,
        num_mask_tokens: int = 1,
        upscale_factor: int = 2,
        upscale_dim: int = 32,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        skip_channels: int = 0,
        activation: type[nn.Module] = nn.GELU,
    ) -> None:
        """num_mask_tokens: 1 (single mask) or 4 (SAM: one single-mask token + 3 multimask tokens,
        of which the one with the highest predicted IoU is returned).
        upscale_factor: 2 (masks at stride 8) or 4 (stride 4). skip_channels: channels of the
        encoder's stride-8 feature to fuse after upscaling, 0 for none (x2 upscaling only).
        """
        super().__init__()
        if upscale_factor not in (2, 4):
            raise ValueError(f"upscale_factor must be 2 or 4, got {upscale_factor}")
        if skip_channels and upscale_factor != 2:
            raise ValueError("a stride-8 skip feature needs upscale_factor 2")
        if num_mask_tokens not in (1, 4):
            raise ValueError(f"num_mask_tokens must be 1 or 4, got {num_mask_tokens}")
        dim = transformer.embedding_dim
        self.transformer = transformer
        self.transformer_dim = dim
        self.num_mask_tokens = num_mask_tokens
        self.upscale_factor = upscale_factor
        self.embed_proj: nn.Module = nn.Conv2d(embed_dim, dim, 1) if embed_dim != dim else nn.Identity()
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(num_mask_tokens, dim)
        if upscale_factor == 4:
            self.output_upscaling = nn.Sequential(
                nn.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2),
                LayerNorm2d(dim // 4),
                activation(),
                nn.ConvTranspose2d(dim // 4, upscale_dim, kernel_size=2, stride=2),
            )
        else:
            self.output_upscaling = nn.Sequential(
                nn.ConvTranspose2d(dim, upscale_dim, kernel_size=2, stride=2),
                LayerNorm2d(upscale_dim),
            )
        self.upscale_act = activation()
        self.skip_proj: nn.Module | None = nn.Conv2d(skip_channels, upscale_dim, 1) if skip_channels else None
        self.output_hypernetworks_mlps = nn.ModuleList(MLP(dim, dim, upscale_dim, 3) for _ in range(num_mask_tokens))
        self.iou_prediction_head = MLP(dim, iou_head_hidden_dim, num_mask_tokens, iou_head_depth)

    @property
    def mask_stride(self) -> int:
        return 16 // self.upscale_factor

    @property
    def uses_skip(self) -> bool:
        return self.skip_proj is not None

    def forward(
        self,
        image_embedding: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt: torch.Tensor,
        dense_prompt: torch.Tensor,
        skip: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image_embedding: Bix256xhxw (Bi = 1 is shared by every prompt set, or Bi = B),
        image_pe: 1xDxhxw, sparse_prompt: BxPxD, dense_prompt: 1xDx1x1 or BxDxhxw,
        skip: BixCsx2hx2w or None.

        Returns mask_logits BxH'xW' (H' = h * upscale_factor) and iou B.
        """
        b = sparse_prompt.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)  # (1+T)xD
        # (1+T)xD -> Bx(1+T)xD, then append the prompt tokens: Bx(1+T+P)xD
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(b, -1, -1), sparse_prompt], dim=1)

        # Project and add the dense prompt once per image. A batch-1 embedding is not repeated per
        # prompt set: the first block's projections of the image tokens run once and broadcast.
        src = self.embed_proj(image_embedding) + dense_prompt  # BixDxhxw
        h, w = src.shape[-2:]

        hs, src = self.transformer(src, image_pe, tokens)
        iou_token_out = hs[:, 0, :]  # BxD
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]  # BxTxD

        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )  # BxTxU
        if self.upscale_factor == 2:
            masks = self._masks_x2(src, hyper_in, h, w, skip)
        else:
            masks = self._masks_x4(src, hyper_in, h, w)
        iou = self.iou_prediction_head(iou_token_out)  # BxT

        if self.num_mask_tokens == 1:
            return masks[:, 0], iou[:, 0]
        # SAM's multimask outputs (tokens 1..3): keep the one with the highest predicted IoU.
        mh, mw = masks.shape[-2:]
        multi_iou = iou[:, 1:]
        best = multi_iou.argmax(dim=1, keepdim=True)  # Bx1
        best_iou = multi_iou.gather(1, best).squeeze(1)  # B
        index = best.view(b, 1, 1, 1).expand(b, 1, mh, mw)
        best_mask = masks[:, 1:].gather(1, index).squeeze(1)  # BxH'xW'
        return best_mask, best_iou

    def _masks_x2(
        self, src: torch.Tensor, hyper_in: torch.Tensor, h: int, w: int, skip: torch.Tensor | None
    ) -> torch.Tensor:
        """src: Bx(hw)xD image tokens, hyper_in: BxTxU, skip: BixCsx2hx2w or None -> BxTx2hx2w.

        The x2 upscaling computed per image token, without leaving the token layout. A 2x2
        stride-2 transposed conv is a linear map from each cell's D channels to its 4 sub-pixels
        x U channels; LayerNorm2d and the activation act per sub-pixel; the hypernetwork product
        is per sub-pixel too. So all of it runs as one Linear on the tokens and the masks are put
        back on the 2h x 2w grid at the end (T channels instead of U). The same parameters and
        values as the conv form; no transpose of the image tokens, a quantizable matmul instead
        of a float ConvTranspose, and a native LayerNormalization.
        """
        b, hw, _ = src.shape
        conv, norm = self.output_upscaling[0], self.output_upscaling[1]
        assert isinstance(conv, nn.ConvTranspose2d) and isinstance(norm, LayerNorm2d)
        assert conv.bias is not None
        u = conv.out_channels
        # ConvTranspose2d weight DxUx2x2 -> (2*a+b, U)xD rows; its bias once per sub-pixel.
        weight = conv.weight.permute(2, 3, 1, 0).reshape(4 * u, -1)
        up = nn.functional.linear(src, weight, conv.bias.repeat(4)).reshape(b, hw, 4, u)
        up = nn.functional.layer_norm(up, (u,), norm.weight, norm.bias, norm.eps)
        if self.skip_proj is not None and skip is not None:
            feature = self.skip_proj(skip)  # BixUx2hx2w -> Bix(hw)x4xU, sub-pixel (a, b) = 2*a+b
            bi = feature.shape[0]
            up = up + feature.reshape(bi, u, h, 2, w, 2).permute(0, 2, 4, 3, 5, 1).reshape(bi, hw, 4, u)
        up = self.upscale_act(up)
        t = hyper_in.shape[1]
        # Bx(4hw)xU @ BxUxT -> Bx(4hw)xT -> B x h x w x 2 x 2 x T -> B x T x h x 2 x w x 2 -> BxTx2hx2w
        masks = up.reshape(b, hw * 4, u) @ hyper_in.transpose(1, 2)
        return masks.reshape(b, h, w, 2, 2, t).permute(0, 5, 1, 3, 2, 4).reshape(b, t, 2 * h, 2 * w)

    def _masks_x4(self, src: torch.Tensor, hyper_in: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """src: Bx(hw)xD image tokens, hyper_in: BxTxU -> BxTx4hx4w: SAM's own upscaling path."""
        b, _, dim = src.shape
        src = src.transpose(1, 2).reshape(b, dim, h, w)  # BxhwxD -> BxDxhxw
        upscaled = self.upscale_act(self.output_upscaling(src))  # BxUxH'xW'
        _, u, mh, mw = upscaled.shape
        # BxTxU @ BxUx(H'W') -> BxTx(H'W') -> BxTxH'xW'
        return (hyper_in @ upscaled.reshape(b, u, mh * mw)).reshape(b, hyper_in.shape[1], mh, mw)
