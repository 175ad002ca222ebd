"""Loss terms of the recipes (training/recipes.py), each a plain function of tensors.

Shapes: class logits Bx(C+1)xHxW (class 0 background), labels BxHxW int64 (IGNORE_LABEL where no
loss is taken: padding), foreground logits BxHxW (training.model.segmenter.foreground_logit).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.data.sample import IGNORE_LABEL


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-pixel cross-entropy over the C+1 classes, mean over pixels that are not IGNORE_LABEL."""
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_LABEL)


def dice_loss(logits: torch.Tensor, labels: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft dice of every defect class over the batch, 1 - 2|P∩T| / (|P| + |T|), averaged over the
    classes present in the labels or predicted (a class absent from both counts for nothing).

    Over the batch, not per image: a window without a defect of some class adds its false
    positives to that class's denominator instead of a 0/0 term.
    """
    valid = labels != IGNORE_LABEL
    probs = torch.softmax(logits.float(), dim=1)[:, 1:]  # BxCxHxW
    target = F.one_hot(labels.clamp(max=logits.shape[1] - 1) * valid, logits.shape[1])[..., 1:]
    target = target.permute(0, 3, 1, 2).float()  # BxHxWxC -> BxCxHxW
    mask = valid.unsqueeze(1).float()
    probs, target = probs * mask, target * mask
    inter = (probs * target).sum(dim=(0, 2, 3))
    total = probs.sum(dim=(0, 2, 3)) + target.sum(dim=(0, 2, 3))
    present = target.sum(dim=(0, 2, 3)) > 0
    per_class = 1 - (2 * inter + eps) / (total + eps)
    if not bool(present.any()):
        return per_class.mean() * 0.0 + probs.mean()  # no defect anywhere: push every defect probability down
    return per_class[present].mean()


def soft_mask_bce(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float = 2.0
) -> torch.Tensor:
    """BCE of the student's foreground logits against sigmoid(teacher foreground logits / T), BxHxW each,
    mean over pixels that are not IGNORE_LABEL (the field report's soft-mask term)."""
    valid = (labels != IGNORE_LABEL).float()
    target = torch.sigmoid(teacher.float() / temperature)
    per_pixel = F.binary_cross_entropy_with_logits(student.float(), target, reduction="none")
    return (per_pixel * valid).sum() / valid.sum().clamp(min=1.0)


def focal_cell_loss(
    logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, alpha: float = 0.75
) -> torch.Tensor:
    """Sigmoid focal loss of the finder's cells (RetinaNet's), normalised by the number of positive cells.

    logits, target: Bx1xhxw (target 0/1). ``alpha`` weighs the positives: a missed cell is a defect the
    segment pass never sees, a false one only costs a window.
    """
    target = target.float()
    p = torch.sigmoid(logits.float())
    ce = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    weight = alpha * target + (1 - alpha) * (1 - target)
    return (weight * (1 - p_t) ** gamma * ce).sum() / target.sum().clamp(min=1.0)


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
