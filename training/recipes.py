"""Loss recipes: one ``nn.Module`` per recipe whose ``forward(batch)`` returns the loss and its parts.

The whole loss is computed inside ``forward``, so DistributedDataParallel wraps the recipe and
sees every parameter the loss touches. Batches are ``training.data.prepare.collate`` dicts plus:

    prompts          float32 Mx2    one positive point per instance, flattened over the batch
    image_index      int64   M      the image of each prompt
    targets          float32 MxHxW  each prompt's ground-truth mask (float)
    teacher_embedding float32 BxCtxhxw  (teacher recipes)
    teacher_logits   float32 MxH/sxW/s  (blog, nofeature)

Every recipe trains the saliency head with CenterNet's focal loss against the Gaussian heatmap
of ground-truth defect locations. Recipes (weights from RecipeConfig):

    supervised  focal x focal(mask, GT) + dice x dice(mask, GT), dice 1 unless set; GT optionally grown
                (grow_targets_px) and dice weighted by area (dice_full_weight_area)  (no teacher; finetune-teacher)
    blog        0.4 x (1 - cos(adapter(student emb), teacher emb)) + 0.3 x BCE(mask, sigmoid(teacher / 2))
                + 0.3 x dice(mask, GT)                                   (the field report)
    nofeature   blog without the cosine term                             (ablation)
    mobilesam   MSE(adapter(student emb), teacher emb); the teacher's prompt encoder and mask
                decoder are copied into the student and frozen          (MobileSAM's decoupled recipe)
    kdsam       phase 1: MSE + perceptual on the embedding, decoder frozen; phase 2 (after
                ``phase1_epochs``): encoder and neck frozen, decoder trained with dice  (KD SAM)

plus, everywhere a mask is predicted, ``iou_weight`` x MSE of the predicted IoU.
"""

from __future__ import annotations

import torch
from torch import nn

from training.config import RecipeConfig
from training.losses import (
    cosine_embedding_loss,
    dice_loss,
    focal_heatmap_loss,
    focal_mask_loss,
    grow_targets,
    iou_prediction_loss,
    mse_embedding_loss,
    perceptual_loss,
    soft_mask_bce,
    upsample_logits,
)
from training.model.neck import EmbeddingAdapter
from training.model.segmenter import DefectSegmenter
from training.teachers.base import Teacher, TeacherError

DECODER_PARTS = ("prompt_encoder", "mask_decoder")
ENCODER_PARTS = ("encoder", "neck")


class Recipe(nn.Module):
    """Base: the student, an optional adapter to the teacher's channels, and the shared loss pieces."""

    name = "recipe"
    #: what the trainer must put in the batch: teacher embedding and/or teacher mask logits
    needs_teacher_embedding = False
    needs_teacher_logits = False

    def __init__(self, student: DefectSegmenter, config: RecipeConfig, teacher_channels: int | None = None) -> None:
        super().__init__()
        self.student = student
        self.config = config
        needs_adapter = teacher_channels is not None and teacher_channels != 256 and self.needs_teacher_embedding
        self.adapter: EmbeddingAdapter | None = (
            EmbeddingAdapter(256, teacher_channels) if needs_adapter and teacher_channels else None
        )

    # -- phases -------------------------------------------------------------------------------
    def phase(self, epoch: int, epochs: int) -> int:
        """Training phase of an epoch (recipes with one phase: always 0)."""
        return 0

    def frozen_parts(self, phase: int) -> tuple[str, ...]:
        """Student parts that do not train in ``phase`` (kept in eval mode, no gradients)."""
        return ()

    def apply_phase(self, phase: int) -> None:
        """Set requires_grad for ``phase``; call ``train_mode`` after ``train()``."""
        frozen = set(self.frozen_parts(phase))
        for part in ("encoder", "neck", "saliency_head", *DECODER_PARTS):
            getattr(self.student, part).requires_grad_(part not in frozen)
        self._frozen = frozen

    def train(self, mode: bool = True) -> Recipe:
        super().train(mode)
        for part in getattr(self, "_frozen", ()):
            getattr(self.student, part).eval()  # frozen BatchNorm keeps its statistics
        return self

    # -- pieces ------------------------------------------------------------------------------
    def saliency(self, embedding: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return focal_heatmap_loss(self.student.heatmap(embedding), batch["heatmap"])

    def masks(
        self, embedding: torch.Tensor, skip: torch.Tensor, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask logits MxH/sxW/s and predicted IoU M for the batch's prompts."""
        prompts, index = batch["prompts"], batch["image_index"]
        height, width = self.student.input_size
        s = self.student.mask_stride
        if prompts.shape[0] == 0:
            return embedding.new_zeros((0, height // s, width // s)), embedding.new_zeros((0,))
        coords = prompts.reshape(-1, 1, 2)  # Mx2 -> Mx1x2
        labels = torch.ones(coords.shape[0], 1, dtype=coords.dtype, device=coords.device)
        per_skip = skip.index_select(0, index) if self.student.mask_decoder.uses_skip else None
        logits, iou = self.student.decode(embedding.index_select(0, index), per_skip, coords, labels)
        return logits, iou

    def at_input_resolution(
        self, logits: torch.Tensor, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask logits upsampled to the input as the runtime does, binary targets), both MxHxW."""
        targets = batch["targets"].float()
        return upsample_logits(logits, (targets.shape[-2], targets.shape[-1])), targets

    def adapted(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.adapter(embedding) if self.adapter is not None else embedding

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    @staticmethod
    def total(parts: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
        loss = sum((weights[k] * v for k, v in parts.items() if weights.get(k, 0.0)), torch.zeros(()))
        return loss.to(next(iter(parts.values())).device) if parts else loss


class Supervised(Recipe):
    """Dice + focal against ground truth, saliency focal: no teacher (and the teacher's own fine-tuning)."""

    name = "supervised"

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c = self.config
        embedding, skip = self.student.embed(batch["image"])
        logits, iou = self.masks(embedding, skip, batch)
        full, gt = self.at_input_resolution(logits, batch)
        grown = grow_targets(gt, c.grow_targets_px)
        parts = {
            "focal": focal_mask_loss(full, grown),
            "dice": dice_loss(full, grown, full_weight_area=c.dice_full_weight_area),
            "iou": iou_prediction_loss(iou, full, gt),
            "saliency": self.saliency(embedding, batch),
        }
        # dice_weight's default (0.3) is the blog's share; alone with focal, dice weighs 1 unless set.
        dice = c.dice_weight if "dice_weight" in c.model_fields_set else 1.0
        weights = {"focal": c.focal_weight, "dice": dice, "iou": c.iou_weight, "saliency": c.saliency_weight}
        return self.total(parts, weights), parts


class Blog(Recipe):
    """The field report's recipe: cosine feature alignment + soft-mask BCE to the teacher + dice to GT."""

    name = "blog"
    needs_teacher_embedding = True
    needs_teacher_logits = True
    use_feature = True

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c = self.config
        embedding, skip = self.student.embed(batch["image"])
        logits, iou = self.masks(embedding, skip, batch)
        full, gt = self.at_input_resolution(logits, batch)
        parts: dict[str, torch.Tensor] = {}
        if self.use_feature:
            parts["feature"] = cosine_embedding_loss(self.adapted(embedding), batch["teacher_embedding"])
        parts["soft_mask"] = soft_mask_bce(logits, batch["teacher_logits"], c.temperature)
        parts["dice"] = dice_loss(full, gt)
        parts["iou"] = iou_prediction_loss(iou, full, gt)
        parts["saliency"] = self.saliency(embedding, batch)
        weights = {
            "feature": c.feature_weight, "soft_mask": c.soft_mask_weight, "dice": c.dice_weight,
            "iou": c.iou_weight, "saliency": c.saliency_weight,
        }  # fmt: skip
        return self.total(parts, weights), parts


class NoFeature(Blog):
    """Ablation: the blog recipe without the feature (cosine) term."""

    name = "nofeature"
    needs_teacher_embedding = False
    use_feature = False


class MobileSam(Recipe):
    """Decoupled distillation: encoder + neck regress the teacher's embedding; the decoder is the teacher's."""

    name = "mobilesam"
    needs_teacher_embedding = True

    def frozen_parts(self, phase: int) -> tuple[str, ...]:
        return DECODER_PARTS

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c = self.config
        embedding, _ = self.student.embed(batch["image"])
        parts = {
            "mse": mse_embedding_loss(self.adapted(embedding), batch["teacher_embedding"]),
            # The head learns on the distilled embedding without pulling the encoder off the teacher.
            "saliency": self.saliency(embedding.detach(), batch),
        }
        return self.total(parts, {"mse": c.mse_weight, "saliency": c.saliency_weight}), parts


class KdSam(Recipe):
    """KD SAM: phase 1 encoder MSE + perceptual (decoder frozen), phase 2 decoder dice (encoder frozen)."""

    name = "kdsam"
    needs_teacher_embedding = True

    def __init__(self, student: DefectSegmenter, config: RecipeConfig, teacher_channels: int | None = None) -> None:
        super().__init__(student, config, teacher_channels)
        self.current_phase = 0

    def phase(self, epoch: int, epochs: int) -> int:
        split = self.config.phase1_epochs if self.config.phase1_epochs is not None else max(1, epochs // 2)
        return 0 if epoch < split else 1

    def frozen_parts(self, phase: int) -> tuple[str, ...]:
        return DECODER_PARTS if phase == 0 else ENCODER_PARTS

    def apply_phase(self, phase: int) -> None:
        super().apply_phase(phase)
        self.current_phase = phase

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c = self.config
        if self.current_phase == 0:
            embedding, _ = self.student.embed(batch["image"])
            adapted = self.adapted(embedding)
            parts = {
                "mse": mse_embedding_loss(adapted, batch["teacher_embedding"]),
                "perceptual": perceptual_loss(adapted, batch["teacher_embedding"]),
                "saliency": self.saliency(embedding.detach(), batch),
            }
            weights = {"mse": c.mse_weight, "perceptual": c.perceptual_weight, "saliency": c.saliency_weight}
            return self.total(parts, weights), parts
        with torch.no_grad():
            embedding, skip = self.student.embed(batch["image"])
        logits, iou = self.masks(embedding, skip, batch)
        full, gt = self.at_input_resolution(logits, batch)
        parts = {
            "dice": dice_loss(full, gt),
            "iou": iou_prediction_loss(iou, full, gt),
            "saliency": self.saliency(embedding, batch),
        }
        return self.total(parts, {"dice": 1.0, "iou": c.iou_weight, "saliency": c.saliency_weight}), parts


RECIPE_CLASSES: dict[str, type[Recipe]] = {
    cls.name: cls for cls in (Supervised, Blog, NoFeature, MobileSam, KdSam)
}


def build_recipe(
    name: str, student: DefectSegmenter, config: RecipeConfig, teacher: Teacher | None = None
) -> Recipe:
    """The recipe module around ``student``; copies the teacher's decoder where the recipe does."""
    if name not in RECIPE_CLASSES:
        raise KeyError(f"unknown recipe {name!r}; known: {', '.join(RECIPE_CLASSES)}")
    cls = RECIPE_CLASSES[name]
    if (cls.needs_teacher_embedding or cls.needs_teacher_logits) and teacher is None:
        raise TeacherError(f"recipe {name!r} needs a teacher")
    recipe = cls(student, config, teacher.channels if teacher is not None else None)
    if name == "mobilesam" or (name == "kdsam" and config.copy_decoder):
        copy_decoder(teacher, student, required=name == "mobilesam" and config.copy_decoder)
    return recipe


def copy_decoder(teacher: Teacher | None, student: DefectSegmenter, *, required: bool) -> bool:
    """Load the teacher's prompt encoder and mask decoder into the student when their shapes match.

    Raises TeacherError when ``required`` and they do not (a SAM 2 teacher, or another decoder).
    """
    source = getattr(teacher, "model", None)
    if not isinstance(source, DefectSegmenter):
        if required:
            raise TeacherError(
                "recipe mobilesam copies the teacher's decoder: it needs a family teacher "
                f"(teacher.kind: family), not {getattr(teacher, 'teacher_id', 'none')}"
            )
        return False
    try:
        for part in DECODER_PARTS:
            getattr(student, part).load_state_dict(getattr(source, part).state_dict())
    except RuntimeError as exc:
        if required:
            first = str(exc).strip().splitlines()[0]
            raise TeacherError(f"the teacher's decoder does not fit the student's: {first}") from None
        return False
    return True
