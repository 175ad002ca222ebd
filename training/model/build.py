"""The model registry: every variant is a few numbers passed to one private builder."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Literal

import torch
from torch import nn

from training.model.mask_decoder import MaskDecoder
from training.model.mobile_cnn import LITE_STAGES, MobileCNN
from training.model.neck import ConvNeck, SamNeck
from training.model.prompt_encoder import PointPromptEncoder
from training.model.saliency import SaliencyHead
from training.model.segmenter import EMBED_STRIDE, DefectSegmenter
from training.model.tiny_vit import TinyViT
from training.model.transformer import TwoWayTransformer

EMBED_DIM = 256
PARTS: tuple[str, ...] = ("encoder", "neck", "saliency_head", "prompt_encoder", "mask_decoder")


# Teacher-sized encoders: the MobileNetV2 table at twice the width, and TinyViT-21M's numbers.
WIDE_STAGES: tuple[tuple[int, int, int, int], ...] = (
    (1, 32, 1, 1),
    (4, 48, 2, 2),
    (4, 80, 3, 2),
    (4, 160, 4, 2),
    (6, 224, 3, 1),
    (6, 320, 1, 1),
)
_ENCODERS: dict[str, Callable[[], MobileCNN | TinyViT]] = {
    "cnn": MobileCNN,
    "cnn_wide": partial(MobileCNN, stages=WIDE_STAGES, stem_channels=32),
    "cnn_lite": partial(MobileCNN, stages=LITE_STAGES, stem_channels=24, stem_stride=4),
    "tiny_vit": TinyViT,
    "tiny_vit_21m": partial(TinyViT, embed_dims=(96, 192, 384, 576), num_heads=(3, 6, 12, 18)),
}


def _build(
    *,
    encoder: Literal["cnn", "cnn_wide", "cnn_lite", "tiny_vit", "tiny_vit_21m"],
    neck: Literal["conv", "sam"],
    decoder: Literal["slim", "sam"],
    skip: bool,
    height: int,
    cross_attention_downsample: int = 2,
    width: int,
    num_classes: int,
    k: int,
) -> DefectSegmenter:
    if height <= 0 or width <= 0 or height % EMBED_STRIDE or width % EMBED_STRIDE:
        raise ValueError(f"input size must be positive multiples of {EMBED_STRIDE}, got {height}x{width}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    grid = (height // EMBED_STRIDE, width // EMBED_STRIDE)
    if not 1 <= k <= grid[0] * grid[1]:
        raise ValueError(f"k must be between 1 and {grid[0] * grid[1]} (cells of the heatmap), got {k}")

    image_encoder = _ENCODERS[encoder]()
    neck_module = (ConvNeck if neck == "conv" else SamNeck)(image_encoder.out_channels, EMBED_DIM)
    if decoder == "sam":
        transformer = TwoWayTransformer(depth=2, embedding_dim=256, num_heads=8, mlp_dim=2048)
        mask_decoder = MaskDecoder(
            transformer=transformer,
            embed_dim=EMBED_DIM,
            num_mask_tokens=4,
            upscale_factor=4,
            upscale_dim=32,
            iou_head_hidden_dim=256,
        )
    else:
        transformer = TwoWayTransformer(
            depth=2,
            embedding_dim=128,
            num_heads=4,
            mlp_dim=512,
            attention_downsample_rate=cross_attention_downsample,
        )
        mask_decoder = MaskDecoder(
            transformer=transformer,
            embed_dim=EMBED_DIM,
            num_mask_tokens=1,
            upscale_factor=2,
            upscale_dim=32,
            iou_head_hidden_dim=128,
            skip_channels=image_encoder.skip_channels if skip else 0,
        )
    return DefectSegmenter(
        encoder=image_encoder,
        neck=neck_module,
        saliency_head=SaliencyHead(EMBED_DIM, num_classes),
        prompt_encoder=PointPromptEncoder(transformer.embedding_dim, (height, width), grid),
        mask_decoder=mask_decoder,
        input_size=(height, width),
        k=k,
    )


_REGISTRY: dict[str, Callable[..., DefectSegmenter]] = {
    # Default: mobile CNN + cheap BN neck + slim decoder (masks at stride 8). TensorRT/INT8 friendly.
    "student_cnn": partial(_build, encoder="cnn", neck="conv", decoder="slim", skip=False),
    # The default bundle's: student_cnn with the stride-4 patchify stem and cross-attention at a
    # quarter of the decoder's width (32 channels, 4 heads). 0.78x student_cnn's INT8 time on ORT
    # CPU (4.58 -> 3.49 GMAC); docs/model.md has the measurements.
    "student_cnn_lite": partial(
        _build, encoder="cnn_lite", neck="conv", decoder="slim", skip=False, cross_attention_downsample=4
    ),
    # The same, with the encoder's stride-8 feature fused into the upscaled embedding. Its bundle has
    # no decoder-only graph: the contract's decoder graph has no input for the stride-8 feature.
    "student_cnn_s8": partial(_build, encoder="cnn", neck="conv", decoder="slim", skip=True),
    # The field report's choice: TinyViT-5M encoder + cheap neck + slim decoder.
    "student_vit": partial(_build, encoder="tiny_vit", neck="conv", decoder="slim", skip=False),
    # MobileSAM (TinyViT-5M, SAM neck, full SAM mask decoder, masks at stride 4) + the saliency head.
    "mobilesam": partial(_build, encoder="tiny_vit", neck="sam", decoder="sam", skip=False),
    # Teachers of the project's own family, trained first and distilled into a student. Their slim
    # decoder has the students' shapes, so the mobilesam recipe can copy it into student_cnn/_vit.
    # A wide MobileNetV2 (fits a CPU schedule) and TinyViT-21M (for a GPU).
    "teacher_cnn": partial(_build, encoder="cnn_wide", neck="conv", decoder="slim", skip=False),
    "teacher_vit": partial(_build, encoder="tiny_vit_21m", neck="conv", decoder="slim", skip=False),
}


def list_models() -> list[str]:
    """Names accepted by ``build_model``."""
    return list(_REGISTRY)


def build_model(
    name: str, *, height: int = 576, width: int = 1024, num_classes: int = 3, k: int = 8
) -> DefectSegmenter:
    """Build a registered model, randomly initialised, in eval mode.

    Raises KeyError for an unknown name and ValueError for a bad size, class count or K.
    """
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(_REGISTRY)}")
    model = _REGISTRY[name](height=height, width=width, num_classes=num_classes, k=k)
    return model.eval()


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def parameter_counts(model: DefectSegmenter) -> dict[str, int]:
    """Trainable parameters per part (``PARTS``) and ``total``."""
    counts = {part: count_parameters(getattr(model, part)) for part in PARTS}
    counts["total"] = count_parameters(model)
    return counts


def count_macs(model: DefectSegmenter) -> int:
    """Multiply-accumulates of one fused forward pass at the model's input size (all matmuls and convs)."""
    from torch.utils.flop_counter import FlopCounterMode

    height, width = model.input_size
    image = torch.zeros(1, 3, height, width)
    counter = FlopCounterMode(display=False)
    with counter:  # not under no_grad: the module tracker needs autograd
        model.forward_fused(image)
    return counter.get_total_flops() // 2
