"""Loss terms shared by the recipes. Every function returns a scalar (mean over what it is given).

Shapes: mask logits and targets NxHxW (one row per prompted instance), embeddings BxCxhxw,
heatmaps BxCxhxw.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resize_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """NxHxW logits -> NxH'xW' (bilinear; identity when the size already matches)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)


def upsample_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Mask logits Nxhxw (stride s) -> NxHxW, bilinear edge to edge: how the runtime's postprocess
    (engines.postprocess.upsample_cells) turns them into masks before thresholding at 0.

    Ground-truth losses are taken at input resolution on these, not at stride s on area-averaged
    targets: a 1-2 px scratch covers a fifth of a stride-8 cell, so a coverage target would teach
    the model a probability below 0.5 there, a mask that never survives the threshold.
    """
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)


def focal_mask_loss(
    logits: torch.Tensor, target: torch.Tensor, *, gamma: float = 2.0, alpha: float = 0.25
) -> torch.Tensor:
    """SAM's sigmoid focal loss on mask pixels, mean over pixels. logits, target: NxHxW.

    Plain BCE over a whole frame is >99.9% background and pushes those logits towards -inf without
    end: within a few hundred steps every logit sat near -30, where the sigmoid has no gradient
    left for dice to pull a defect up. The focal factor (1 - p_t)^gamma stops pushing a pixel once
    it is confidently right.
    """
    if logits.numel() == 0:
        return logits.sum()
    logits, target = logits.float(), target.float()
    prob = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    weight = alpha * target + (1 - alpha) * (1 - target)
    return (weight * ce * (1 - p_t) ** gamma).mean()


def dice_loss(
    logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0, *, full_weight_area: float = 0.0
) -> torch.Tensor:
    """Soft dice, 1 - 2|P∩T| / (|P| + |T|), per instance then averaged. logits, target: NxHxW.

    ``full_weight_area`` > 0 weights each instance by min(1, |T| / full_weight_area) in the average:
    an instance far below the mask grid's resolution cannot be overlapped, so all its dice gradient
    says is "predict less", and many of them outvote the few defects the model can draw.
    """
    if logits.numel() == 0:
        return logits.sum()
    prob = torch.sigmoid(logits.float()).flatten(1)
    target = target.float().flatten(1)
    inter = (prob * target).sum(1)
    area = target.sum(1)
    per_instance = 1 - (2 * inter + eps) / (prob.sum(1) + area + eps)
    if full_weight_area <= 0:
        return per_instance.mean()
    weight = (area / full_weight_area).clamp(max=1.0)
    return (weight * per_instance).sum() / weight.sum().clamp(min=1e-6)


def grow_targets(target: torch.Tensor, size: int) -> torch.Tensor:
    """Binary masks NxHxW grown by a ``size`` x ``size`` max filter (``size`` odd; 1 or less: unchanged).

    A 1 px scratch is a fifth of a stride-8 mask cell: no bilinear upsampling of stride-8 logits
    draws it, so a loss against it teaches the decoder nothing but to shrink. Grown to a few pixels,
    the same scratch is a band the mask grid can represent.
    """
    if size <= 1 or target.numel() == 0:
        return target
    return F.max_pool2d(target.float().unsqueeze(1), size, stride=1, padding=size // 2).squeeze(1)


def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with soft targets in [0, 1]. logits, target: NxHxW."""
    if logits.numel() == 0:
        return logits.sum()
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())


def soft_mask_bce(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """BCE of the student's mask logits against sigmoid(teacher logits / T). NxHxW each (teacher resized)."""
    teacher = resize_logits(teacher.float(), tuple(student.shape[-2:]))  # type: ignore[arg-type]
    return bce_loss(student, torch.sigmoid(teacher / temperature))


def cosine_embedding_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity of each image's embedding flattened over channels and space. BxCxhxw each."""
    return (1 - F.cosine_similarity(student.float().flatten(1), teacher.float().flatten(1), dim=1)).mean()


def mse_embedding_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error between embeddings (MobileSAM's encoder loss). BxCxhxw each."""
    return F.mse_loss(student.float(), teacher.float())


def perceptual_loss(student: torch.Tensor, teacher: torch.Tensor, levels: int = 3) -> torch.Tensor:
    """Feature-structure loss over a pyramid of the embeddings (KD SAM's perceptual term).

    At each level (full, 1/2, 1/4 resolution by average pooling) the per-location channel vectors
    are compared by cosine distance, so the loss rewards matching the teacher's local feature
    directions and their coarser context rather than raw magnitudes (which MSE covers).
    BxCxhxw each.
    """
    total = student.new_zeros(())
    s, t = student.float(), teacher.float()
    for level in range(levels):
        if level:
            if min(s.shape[-2:]) < 2:
                break
            s, t = F.avg_pool2d(s, 2, ceil_mode=True), F.avg_pool2d(t, 2, ceil_mode=True)
        total = total + (1 - F.cosine_similarity(s, t, dim=1)).mean()
    return total / levels


def focal_heatmap_loss(
    logits: torch.Tensor, target: torch.Tensor, *, alpha: float = 2.0, beta: float = 4.0, pos_threshold: float = 0.999
) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss on the stride-16 heatmap.

    logits: BxCxhxw (the saliency head's output), target: BxCxhxw Gaussian-splatted defect
    locations in [0, 1] with 1 at each defect's cell. Normalised by the number of peaks (at least 1,
    so a batch of defect-free images is pure negatives).
    """
    logits = logits.float()
    target = target.float()
    pos = target >= pos_threshold
    log_p = F.logsigmoid(logits)
    log_not_p = F.logsigmoid(-logits)
    prob = torch.sigmoid(logits)
    pos_loss = -((1 - prob) ** alpha) * log_p * pos
    neg_loss = -((1 - target) ** beta) * (prob**alpha) * log_not_p * (~pos)
    num_pos = pos.sum().clamp(min=1)
    return (pos_loss.sum() + neg_loss.sum()) / num_pos


def iou_prediction_loss(pred_iou: torch.Tensor, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE between the decoder's predicted IoU and the actual IoU of its mask with the target. N, NxHxW."""
    if logits.numel() == 0:
        return logits.sum()
    with torch.no_grad():
        pred = (logits > 0).flatten(1)
        gt = (target > 0.5).flatten(1)
        inter = (pred & gt).sum(1).float()
        union = (pred | gt).sum(1).float().clamp(min=1)
        actual = inter / union
    return F.mse_loss(pred_iou.float(), actual)
