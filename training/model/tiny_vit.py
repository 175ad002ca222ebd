"""TinyViT-5M image encoder as MobileSAM uses it, returning stride-16 and stride-8 features.

Stage 0 is MBConv blocks at stride 4; stages 1-3 are windowed-attention blocks (learned
relative attention biases, a local depthwise conv between attention and MLP). PatchMerging
halves the resolution between stages except into the last one, so the output is stride 16.
Windows are padded at the bottom/right when the grid is not a multiple of the window size
(576x1024 input: 36x64 at stride 16), as in MobileSAM.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from training.model.common import ConvBNAct


class PatchEmbed(nn.Sequential):
    """Two stride-2 3x3 convs: Bx3xHxW -> BxCxH/4xW/4."""

    def __init__(self, in_chans: int, embed_dim: int) -> None:
        super().__init__(
            ConvBNAct(in_chans, embed_dim // 2, 3, 2, act=nn.GELU),
            ConvBNAct(embed_dim // 2, embed_dim, 3, 2, act=None),
        )


class MBConv(nn.Module):
    """Inverted residual with GELU: BxCxHxW -> BxCxHxW."""

    def __init__(self, dim: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = ConvBNAct(dim, hidden, 1, act=nn.GELU)
        self.conv2 = ConvBNAct(hidden, hidden, 3, groups=hidden, act=nn.GELU)
        self.conv3 = ConvBNAct(hidden, dim, 1, act=None, bn_weight_init=0.0)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: BxCxHxW -> BxCxHxW."""
        return self.act(x + self.conv3(self.conv2(self.conv1(x))))


class PatchMerging(nn.Module):
    """1x1 conv, depthwise 3x3 conv with ``stride``, 1x1 conv: BxCxHxW -> BxC'xH/sxW/s."""

    def __init__(self, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.conv1 = ConvBNAct(dim, out_dim, 1, act=nn.GELU)
        self.conv2 = ConvBNAct(out_dim, out_dim, 3, stride, groups=out_dim, act=nn.GELU)
        self.conv3 = ConvBNAct(out_dim, out_dim, 1, act=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: BxCxHxW -> BxC'xH/sxW/s."""
        return self.conv3(self.conv2(self.conv1(x)))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside one window, with a learned bias per relative offset."""

    def __init__(self, dim: int, num_heads: int, window_size: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        points = list(itertools.product(range(window_size), range(window_size)))
        offsets: dict[tuple[int, int], int] = {}
        idxs = []
        for p1 in points:
            for p2 in points:
                offset = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
                idxs.append(offsets.setdefault(offset, len(offsets)))
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, len(offsets)))
        n = len(points)
        self.attention_bias_idxs: torch.Tensor  # NxN buffer: bias table index of each query-key pair
        self.register_buffer("attention_bias_idxs", torch.tensor(idxs).view(n, n), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: BxNxC (N = window_size**2 tokens of each window) -> BxNxC."""
        b, n, c = x.shape
        x = self.norm(x)
        # BxNx3C -> 3xBxheadsxNxd
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        bias = self.attention_biases[:, self.attention_bias_idxs]  # headsxNxN
        attn = (q @ k.transpose(-2, -1)) * self.scale + bias
        attn = attn.softmax(dim=-1)
        # BxheadsxNxd -> BxNxC
        x = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(x)


class TinyViTBlock(nn.Module):
    """Windowed attention, local depthwise conv, MLP, each residual: BxCxHxW -> BxCxHxW."""

    def __init__(self, dim: int, num_heads: int, window_size: int, mlp_ratio: float) -> None:
        super().__init__()
        self.window_size = window_size
        self.attn = WindowAttention(dim, num_heads, window_size)
        self.local_conv = ConvBNAct(dim, dim, 3, groups=dim, act=None)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def _windowed_attention(self, x: torch.Tensor) -> torch.Tensor:
        """x: BxHxWxC -> BxHxWxC, attention within non-overlapping windows (zero-padded)."""
        b, h, w, c = x.shape
        ws = self.window_size
        pad_b = (ws - h % ws) % ws
        pad_r = (ws - w % ws) % ws
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        ph, pw = h + pad_b, w + pad_r
        nh, nw = ph // ws, pw // ws
        # BxHxWxC -> (B*nh*nw)x(ws*ws)xC
        x = x.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
        x = self.attn(x)
        # (B*nh*nw)x(ws*ws)xC -> BxHpxWpxC
        x = x.view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, ph, pw, c)
        if pad_b or pad_r:
            x = x[:, :h, :w]
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: BxCxHxW -> BxCxHxW."""
        t = x.permute(0, 2, 3, 1)  # BxCxHxW -> BxHxWxC
        t = t + self._windowed_attention(t)
        x = self.local_conv(t.permute(0, 3, 1, 2))  # BxHxWxC -> BxCxHxW
        t = x.permute(0, 2, 3, 1)  # BxCxHxW -> BxHxWxC
        t = t + self.mlp(t)
        return t.permute(0, 3, 1, 2)  # BxHxWxC -> BxCxHxW


class TinyViT(nn.Module):
    """TinyViT encoder without its classifier: Bx3xHxW -> (BxC3xH/16xW/16, BxC1xH/8xW/8)."""

    def __init__(
        self,
        embed_dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (2, 4, 5, 10),
        window_sizes: Sequence[int] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])
        stages: list[nn.Module] = [
            nn.Sequential(*(MBConv(embed_dims[0], mbconv_expand_ratio) for _ in range(depths[0])))
        ]
        for i in range(1, len(depths)):
            stages.append(
                nn.Sequential(
                    *(
                        TinyViTBlock(embed_dims[i], num_heads[i], window_sizes[i], mlp_ratio)
                        for _ in range(depths[i])
                    )
                )
            )
        self.stages = nn.ModuleList(stages)
        # Stride 4 -> 8 -> 16 -> 16: the last merge keeps the resolution.
        self.merges = nn.ModuleList(
            PatchMerging(embed_dims[i], embed_dims[i + 1], stride=1 if i == len(depths) - 2 else 2)
            for i in range(len(depths) - 1)
        )
        self.out_channels = embed_dims[-1]
        self.skip_channels = embed_dims[1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: Bx3xHxW -> (Bx320xH/16xW/16, Bx128xH/8xW/8)."""
        x = self.patch_embed(x)
        skip = x
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i == 1:
                skip = x
            if i < len(self.merges):
                x = self.merges[i](x)
        return x, skip
