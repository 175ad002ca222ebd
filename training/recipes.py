"""Loss recipes: one ``nn.Module`` per recipe whose ``forward(batch)`` returns the loss and its parts.

The whole loss is computed inside ``forward``, so DistributedDataParallel wraps the recipe and
sees every parameter the loss touches. Batches are ``training.data.windows.collate_windows``
dicts (image Bx3xHxW, label BxHxW) plus, for teacher recipes, what the trainer adds:

    teacher_embedding   float32 BxCtxH/16xW/16   the teacher's image embedding (blog)
    teacher_foreground  float32 BxHxW            the teacher's foreground logits (blog, nofeature)
    teacher_neck        list of 4 float32 maps   the teacher's neck features n2..n16 (mobilesam, kdsam)

Recipes (weights from RecipeConfig):

    supervised  ce x CE(GT) + dice x class dice(GT)                  (no teacher; teachers train this way)
    blog        0.4 x (1 - cos(adapter(student emb), teacher emb)) + 0.3 x BCE(student fg, sigmoid(teacher fg / T))
                + 0.3 x dice(GT) [+ ce x CE(GT)]                     (the field report; ce 0 unless set)
    nofeature   blog without the cosine term                         (ablation)
    mobilesam   MSE of the student's neck features to the teacher's, every level; the teacher's decoder
                is copied into the student and frozen                (MobileSAM's decoupled recipe)
    kdsam       phase 1: MSE + perceptual on the neck, decoder frozen; phase 2 (after ``phase1_epochs``):
                encoder and neck frozen, decoder trained on CE + dice (KD SAM)
"""

from __future__ import annotations

import torch
from torch import nn

from training.config import RecipeConfig
from training.losses import (
    cosine_embedding_loss,
    cross_entropy,
    dice_loss,
    mse_embedding_loss,
    perceptual_loss,
    soft_mask_bce,
)
from training.model.segmenter import SegmenterOutput, WindowSegmenter, foreground_logit
from training.teachers.base import Teacher, TeacherError

DECODER_PARTS = ("decoder",)
ENCODER_PARTS = ("encoder", "neck")


class EmbeddingAdapter(nn.Module):
    """1x1 conv from the student's embedding to the teacher's channels, for feature distillation.

    Used by the training loop only; it is not part of an exported graph.
    """

    def __init__(self, in_channels: int, teacher_channels: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, teacher_channels, 1)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """embedding: BxDxhxw -> BxCtxhxw."""
        return self.proj(embedding)


class Recipe(nn.Module):
    """Base: the student, an optional adapter to the teacher's channels, and the shared loss pieces."""

    name = "recipe"
    #: what the trainer must put in the batch
    needs_teacher_embedding = False
    needs_teacher_foreground = False
    needs_teacher_neck = False

    def __init__(self, student: WindowSegmenter, config: RecipeConfig, teacher_channels: int | None = None) -> None:
        super().__init__()
        self.student = student
        self.config = config
        needs_adapter = (
            self.needs_teacher_embedding and teacher_channels is not None and teacher_channels != student.embed_dim
        )
        self.adapter: EmbeddingAdapter | None = (
            EmbeddingAdapter(student.embed_dim, teacher_channels) if needs_adapter and teacher_channels else None
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
        for part in (*ENCODER_PARTS, *DECODER_PARTS):
            getattr(self.student, part).requires_grad_(part not in frozen)
        self._frozen = frozen

    def train(self, mode: bool = True) -> Recipe:
        super().train(mode)
        for part in getattr(self, "_frozen", ()):
            getattr(self.student, part).eval()  # frozen BatchNorm keeps its statistics
        return self

    # -- pieces ------------------------------------------------------------------------------
    def ground_truth(self, out: SegmenterOutput, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"ce": cross_entropy(out.logits, batch["label"]), "dice": dice_loss(out.logits, batch["label"])}

    def adapted(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.adapter(embedding) if self.adapter is not None else embedding

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    @staticmethod
    def total(parts: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
        terms = [weights[k] * v for k, v in parts.items() if weights.get(k, 0.0)]
        if not terms:
            return next(iter(parts.values())) * 0.0
        return torch.stack(terms).sum()


class Supervised(Recipe):
    """Cross-entropy + class dice against ground truth: no teacher (and how teachers are trained)."""

    name = "supervised"

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c = self.config
        parts = self.ground_truth(self.student.run(batch["image"]), batch)
        return self.total(parts, {"ce": c.ce_weight, "dice": c.dice_weight}), parts


class Blog(Recipe):
    """The field report's recipe: cosine feature alignment + soft-mask BCE to the teacher + dice to GT."""

    name = "blog"
    needs_teacher_embedding = True
    needs_teacher_foreground = True
    use_feature = True

    def weights(self) -> dict[str, float]:
        c = self.config
        # The field report's shares (0.4 / 0.3 / 0.3) unless a config sets them; CE only when set.
        dice = c.dice_weight if "dice_weight" in c.model_fields_set else 0.3
        ce = c.ce_weight if "ce_weight" in c.model_fields_set else 0.0
        return {"feature": c.feature_weight, "soft_mask": c.soft_mask_weight, "dice": dice, "ce": ce}

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c = self.config
        out = self.student.run(batch["image"])
        parts: dict[str, torch.Tensor] = {}
        if self.use_feature:
            parts["feature"] = cosine_embedding_loss(self.adapted(out.embedding), batch["teacher_embedding"])
        parts["soft_mask"] = soft_mask_bce(
            foreground_logit(out.logits), batch["teacher_foreground"], batch["label"], c.temperature
        )
        parts.update(self.ground_truth(out, batch))
        return self.total(parts, self.weights()), parts


class NoFeature(Blog):
    """Ablation: the blog recipe without the feature (cosine) term."""

    name = "nofeature"
    needs_teacher_embedding = False
    use_feature = False


class MobileSam(Recipe):
    """Decoupled distillation: encoder + neck regress the teacher's neck features; the decoder is the teacher's."""

    name = "mobilesam"
    needs_teacher_neck = True

    def frozen_parts(self, phase: int) -> tuple[str, ...]:
        return DECODER_PARTS

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        neck = self.student.embed(batch["image"])
        teacher = batch["teacher_neck"]
        mse = torch.stack([mse_embedding_loss(s, t) for s, t in zip(neck, teacher, strict=True)]).mean()
        parts = {"mse": mse}
        return self.total(parts, {"mse": self.config.mse_weight}), parts


class KdSam(Recipe):
    """KD SAM: phase 1 neck MSE + perceptual (decoder frozen), phase 2 decoder CE + dice (encoder, neck frozen)."""

    name = "kdsam"
    needs_teacher_neck = True

    def __init__(self, student: WindowSegmenter, config: RecipeConfig, teacher_channels: int | None = None) -> None:
        super().__init__(student, config, teacher_channels)
        self.current_phase = 0

    @property
    def needs_teacher_now(self) -> bool:
        return self.current_phase == 0

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
            neck = self.student.embed(batch["image"])
            teacher = batch["teacher_neck"]
            parts = {
                "mse": torch.stack([mse_embedding_loss(s, t) for s, t in zip(neck, teacher, strict=True)]).mean(),
                "perceptual": perceptual_loss(neck[3], teacher[3]),
            }
            return self.total(parts, {"mse": c.mse_weight, "perceptual": c.perceptual_weight}), parts
        with torch.no_grad():
            neck = self.student.embed(batch["image"])
        out = SegmenterOutput(logits=self.student.decoder(batch["image"], neck), neck=neck)
        parts = self.ground_truth(out, batch)
        return self.total(parts, {"ce": c.ce_weight, "dice": c.dice_weight}), parts


RECIPE_CLASSES: dict[str, type[Recipe]] = {
    cls.name: cls for cls in (Supervised, Blog, NoFeature, MobileSam, KdSam)
}


def build_recipe(
    name: str, student: WindowSegmenter, config: RecipeConfig, teacher: Teacher | None = None
) -> Recipe:
    """The recipe module around ``student``; copies the teacher's decoder where the recipe does."""
    if name not in RECIPE_CLASSES:
        raise KeyError(f"unknown recipe {name!r}; known: {', '.join(RECIPE_CLASSES)}")
    cls = RECIPE_CLASSES[name]
    needs = cls.needs_teacher_embedding or cls.needs_teacher_foreground or cls.needs_teacher_neck
    if needs and teacher is None:
        raise TeacherError(f"recipe {name!r} needs a teacher")
    if cls.needs_teacher_neck and teacher is not None and not teacher.has_neck:
        raise TeacherError(
            f"recipe {name!r} regresses the teacher's neck features: it needs a family teacher (teacher.kind: family), "
            f"not {teacher.teacher_id}"
        )
    recipe = cls(student, config, teacher.channels if teacher is not None else None)
    if name == "mobilesam" or (name == "kdsam" and config.copy_decoder):
        copy_decoder(teacher, student, required=name == "mobilesam" and config.copy_decoder)
    return recipe


def copy_decoder(teacher: Teacher | None, student: WindowSegmenter, *, required: bool) -> bool:
    """Load the teacher's decoder into the student when their shapes match.

    Raises TeacherError when ``required`` and they do not (a SAM 2 teacher, or other decoder widths).
    """
    source = getattr(teacher, "model", None)
    if not isinstance(source, WindowSegmenter):
        if required:
            raise TeacherError(
                "recipe mobilesam copies the teacher's decoder: it needs a family teacher "
                f"(teacher.kind: family), not {getattr(teacher, 'teacher_id', 'none')}"
            )
        return False
    try:
        student.decoder.load_state_dict(source.decoder.state_dict())
    except RuntimeError as exc:
        if required:
            first = str(exc).strip().splitlines()[0]
            raise TeacherError(f"the teacher's decoder does not fit the student's: {first}") from None
        return False
    return True
