"""How verdicts reach the loss: per-instance weights in the batch, and recipes that use them.

``WeightedExamples`` pairs every training item with its instances' weights (``JudgeWeights``, 1.0
where the judge said nothing); ``WeightedCollate`` puts them in the batch as ``judge_weight``
(float32 BxN, padding 1). ``JudgedBlog`` and ``JudgedNoFeature`` are the blog and nofeature
recipes with two terms taken per instance: for an instance of weight w the ground-truth dice
counts w times and the teacher soft-mask BCE 1/w times (mean over the batch's M instances, so a
batch of weight 1 gives exactly the plain recipe's loss). The loss parts they report stay the
unweighted ones, so runs with and without the judge compare term by term; ``judge_reweighted``
is the share of the batch's instances that carried a weight other than 1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from training.judge.store import JudgeWeights
from training.losses import resize_logits
from training.recipes import Blog, NoFeature, Recipe


def weighted_soft_mask_bce(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, scale: torch.Tensor
) -> torch.Tensor:
    """``training.losses.soft_mask_bce`` per instance, times ``scale`` (M), mean over M. student MxHxW."""
    target = torch.sigmoid(resize_logits(teacher.float(), (student.shape[-2], student.shape[-1])) / temperature)
    per = F.binary_cross_entropy_with_logits(student.float(), target, reduction="none").flatten(1).mean(1)
    return (per * scale).mean()


def weighted_dice(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """``training.losses.dice_loss`` per instance, times ``weight`` (M), mean over M. logits, target MxHxW."""
    prob = torch.sigmoid(logits.float()).flatten(1)
    truth = target.float().flatten(1)
    per = 1 - (2 * (prob * truth).sum(1) + eps) / (prob.sum(1) + truth.sum(1) + eps)
    return (per * weight).mean()


class _Weighted(Recipe):
    """Keeps the mask logits of the wrapped recipe's forward and re-weights two of its terms."""

    _judged_logits: torch.Tensor | None = None

    def masks(
        self, embedding: torch.Tensor, skip: torch.Tensor, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits, iou = super().masks(embedding, skip, batch)
        self._judged_logits = logits
        return logits, iou

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self._judged_logits = None
        loss, parts = super().forward(batch)
        logits, self._judged_logits = self._judged_logits, None
        if "judge_weight" not in batch or logits is None:
            return loss, parts
        weight = batch["judge_weight"][batch["instance_valid"]].to(logits.device, torch.float32)  # BxN -> M
        changed = weight != 1
        parts = {**parts, "judge_reweighted": changed.float().mean() if weight.numel() else loss.new_zeros(())}
        if not bool(changed.any()):
            return loss, parts
        c = self.config
        full, gt = self.at_input_resolution(logits, batch)
        soft = weighted_soft_mask_bce(logits, batch["teacher_logits"], c.temperature, 1.0 / weight)
        dice = weighted_dice(full, gt, weight)
        loss = loss + c.soft_mask_weight * (soft - parts["soft_mask"]) + c.dice_weight * (dice - parts["dice"])
        return loss, parts


class JudgedBlog(_Weighted, Blog):
    """The blog recipe with judge weights (module docstring)."""


class JudgedNoFeature(_Weighted, NoFeature):
    """The nofeature recipe with judge weights (module docstring)."""


JUDGED: dict[type[Recipe], type[Recipe]] = {Blog: JudgedBlog, NoFeature: JudgedNoFeature}


def judged_recipe(recipe: Recipe) -> Recipe:
    """The same recipe (student, config, adapter) with judge weights; call before the optimizer is made."""
    cls = JUDGED.get(type(recipe))
    if cls is None:
        raise TypeError(f"recipe {recipe.name!r} has no per-instance teacher mask term to re-weight")
    judged = cls(recipe.student, recipe.config)
    judged.adapter = recipe.adapter
    return judged


class WeightedExamples(Dataset[tuple[Any, np.ndarray]]):
    """Items of ``dataset`` (TrainExample, or (TrainExample, cached targets)) with their instance weights."""

    def __init__(self, dataset: Any, weights: JudgeWeights) -> None:
        self.dataset = dataset
        self.weights = weights

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, np.ndarray]:
        item = self.dataset[index]
        example = item[0] if isinstance(item, tuple) else item
        return item, self.weights.get(example.source, int(example.classes.shape[0]))


class WeightedCollate:
    """The inner collate's batch plus ``judge_weight`` float32 BxN (padding 1)."""

    def __init__(self, inner: Callable[[list[Any]], dict[str, torch.Tensor]]) -> None:
        self.inner = inner

    def __call__(self, items: list[tuple[Any, np.ndarray]]) -> dict[str, torch.Tensor]:
        batch = self.inner([item for item, _ in items])
        weight = torch.ones(batch["instance_valid"].shape, dtype=torch.float32)
        for row, (_, values) in enumerate(items):
            weight[row, : len(values)] = torch.from_numpy(values)
        batch["judge_weight"] = weight
        return batch
