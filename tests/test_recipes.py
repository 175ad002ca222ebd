"""Loss terms and recipes: each recipe's loss on a real tiny batch, what it trains and what it freezes."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from training.config import RecipeConfig  # noqa: E402
from training.losses import (  # noqa: E402
    cosine_embedding_loss,
    dice_loss,
    focal_heatmap_loss,
    perceptual_loss,
    soft_mask_bce,
)
from training.model.build import build_model  # noqa: E402
from training.recipes import DECODER_PARTS, ENCODER_PARTS, build_recipe  # noqa: E402
from training.teachers.base import TeacherError  # noqa: E402
from training.teachers.family import FamilyTeacher  # noqa: E402
from training.trainer import flatten_prompts  # noqa: E402

H, W = 64, 128


def _batch() -> dict[str, torch.Tensor]:
    from training.data.prepare import PreparedDataset, collate
    from training.data.synthetic import SyntheticDataset

    samples = SyntheticDataset(2, seed=5, width=128, height=72, pixel_scale=0.5, defect_free_prob=0.0)
    prepared = PreparedDataset(samples, height=H, width=W, train=True, seed=0)
    batch = collate([prepared[i] for i in range(2)])
    flatten_prompts(batch)
    return batch


@pytest.fixture(scope="module")
def teacher() -> FamilyTeacher:
    torch.manual_seed(1)
    return FamilyTeacher(build_model("teacher_cnn", height=H, width=W, k=2), "teacher_cnn", "f" * 64)


def _with_teacher(batch: dict[str, torch.Tensor], teacher: FamilyTeacher) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = teacher.predict(batch["image"], batch["prompts"], batch["image_index"])
    return {**batch, "teacher_embedding": out.embedding, "teacher_logits": out.mask_logits}


def _grads(recipe: torch.nn.Module, part: str) -> bool:
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in getattr(recipe.student, part).parameters())


def test_loss_terms_behave() -> None:
    target = torch.zeros(2, 8, 8)
    target[:, 2:6, 2:6] = 1
    assert dice_loss(target * 40 - 20, target) < 0.01 < dice_loss(-target * 40 + 20, target)
    emb = torch.randn(2, 16, 4, 8)
    assert cosine_embedding_loss(emb, emb * 3) < 1e-5 and cosine_embedding_loss(emb, -emb) > 1.99
    assert perceptual_loss(emb, emb * 2) < 1e-5 < perceptual_loss(emb, torch.randn_like(emb))
    # Soft-mask BCE is minimal when the student matches sigmoid(teacher / T), at any resolution.
    teacher = torch.randn(3, 16, 16) * 4
    student = teacher / 2.0
    assert soft_mask_bce(student, teacher) < soft_mask_bce(teacher, teacher)
    assert soft_mask_bce(torch.zeros(3, 8, 8), teacher).isfinite()
    heat = torch.zeros(1, 3, 4, 8)
    heat[0, 1, 2, 3] = 1.0
    good, bad = (heat * 12 - 6), (heat * -12 + 6)
    assert focal_heatmap_loss(good, heat) < 0.05 < focal_heatmap_loss(bad, heat)
    assert math.isfinite(float(focal_heatmap_loss(torch.zeros(1, 3, 4, 8), torch.zeros(1, 3, 4, 8))))


def test_blog_is_the_weighted_sum_and_trains_every_part(teacher: FamilyTeacher) -> None:
    torch.manual_seed(0)
    batch = _with_teacher(_batch(), teacher)
    recipe = build_recipe("blog", build_model("student_cnn", height=H, width=W, k=2), RecipeConfig(), teacher)
    recipe.apply_phase(0)
    recipe.train()
    loss, parts = recipe(batch)
    assert set(parts) == {"feature", "soft_mask", "dice", "iou", "saliency"}
    expected = 0.4 * parts["feature"] + 0.3 * parts["soft_mask"] + 0.3 * parts["dice"]
    expected = expected + 0.1 * parts["iou"] + 1.0 * parts["saliency"]
    assert torch.allclose(loss, expected)
    assert recipe.adapter is None, "same channels: no adapter"
    loss.backward()
    for part in ("encoder", "neck", "saliency_head", "mask_decoder"):
        assert _grads(recipe, part), part


def test_nofeature_drops_the_cosine_term(teacher: FamilyTeacher) -> None:
    batch = _with_teacher(_batch(), teacher)
    recipe = build_recipe("nofeature", build_model("student_cnn", height=H, width=W, k=2), RecipeConfig(), teacher)
    _, parts = recipe(batch)
    assert "feature" not in parts and {"soft_mask", "dice", "saliency"} <= set(parts)
    no_logits = {k: v for k, v in batch.items() if k != "teacher_embedding"}
    recipe(no_logits)  # it needs no teacher embedding


def test_mobilesam_copies_and_freezes_the_teachers_decoder(teacher: FamilyTeacher) -> None:
    batch = _with_teacher(_batch(), teacher)
    student = build_model("student_cnn", height=H, width=W, k=2)
    recipe = build_recipe("mobilesam", student, RecipeConfig(name="mobilesam"), teacher)
    for part in DECODER_PARTS:
        mine, theirs = getattr(student, part).state_dict(), getattr(teacher.model, part).state_dict()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    recipe.apply_phase(0)
    recipe.train()
    assert not student.mask_decoder.training, "frozen parts stay in eval mode"
    loss, parts = recipe(batch)
    assert set(parts) == {"mse", "saliency"}
    loss.backward()
    assert _grads(recipe, "encoder") and _grads(recipe, "saliency_head")
    assert not _grads(recipe, "mask_decoder")


def test_mobilesam_needs_a_family_teacher() -> None:
    from training.teachers.base import Teacher

    class Foreign(Teacher):
        teacher_id, channels, mask_stride, input_size = "sam2-x", 32, 4, (H, W)

        def embed(self, images):  # pragma: no cover - never called
            raise NotImplementedError

        def predict(self, images, points, image_index):  # pragma: no cover
            raise NotImplementedError

    student = build_model("student_cnn", height=H, width=W, k=2)
    with pytest.raises(TeacherError, match="family teacher"):
        build_recipe("mobilesam", student, RecipeConfig(name="mobilesam"), Foreign())
    # A teacher with other channels gets the student an adapter (kdsam may train its own decoder).
    recipe = build_recipe("kdsam", student, RecipeConfig(name="kdsam"), Foreign())
    assert recipe.adapter is not None and recipe.adapter.proj.out_channels == 32


def test_kdsam_phases(teacher: FamilyTeacher) -> None:
    batch = _with_teacher(_batch(), teacher)
    recipe = build_recipe("kdsam", build_model("student_cnn", height=H, width=W, k=2), RecipeConfig(), teacher)
    assert [recipe.phase(e, 4) for e in range(4)] == [0, 0, 1, 1]
    recipe.apply_phase(0)
    recipe.train()
    loss, parts = recipe(batch)
    assert set(parts) == {"mse", "perceptual", "saliency"}
    loss.backward()
    assert _grads(recipe, "encoder") and not _grads(recipe, "mask_decoder")
    recipe.zero_grad(set_to_none=True)
    recipe.apply_phase(1)
    recipe.train()
    assert not recipe.student.encoder.training
    loss, parts = recipe(batch)
    assert set(parts) == {"dice", "iou", "saliency"}
    loss.backward()
    assert _grads(recipe, "mask_decoder")
    assert not any(_grads(recipe, part) for part in ENCODER_PARTS)


def test_supervised_needs_no_teacher() -> None:
    recipe = build_recipe("supervised", build_model("student_cnn", height=H, width=W, k=2), RecipeConfig())
    loss, parts = recipe(_batch())
    assert set(parts) == {"focal", "dice", "iou", "saliency"} and loss.isfinite()
    with pytest.raises(TeacherError, match="needs a teacher"):
        build_recipe("blog", build_model("student_cnn", height=H, width=W, k=2), RecipeConfig())


def test_focal_mask_loss_stops_pushing_confident_background() -> None:
    """Why GT masks use focal, not BCE: a background pixel already at p=0.007 (logit -5) is left alone,
    so logits do not saturate near -30 where dice has no gradient left (what BCE did)."""
    from training.losses import bce_loss, focal_mask_loss

    confident = torch.full((1, 8, 8), -5.0, requires_grad=True)
    target = torch.zeros(1, 8, 8)
    focal_grad = torch.autograd.grad(focal_mask_loss(confident, target), confident)[0].abs().max()
    bce_grad = torch.autograd.grad(bce_loss(confident, target), confident)[0].abs().max()
    assert focal_grad < 1e-3 * bce_grad
    wrong = torch.full((1, 8, 8), -5.0)
    assert focal_mask_loss(wrong, torch.ones(1, 8, 8)) > 100 * focal_mask_loss(confident.detach(), target)


def test_grown_targets_make_a_hairline_drawable() -> None:
    """A 1 px line grown by 5 is a 5 px band; size 1 leaves it as drawn; an even size is refused."""
    from pydantic import ValidationError

    from training.losses import grow_targets

    line = torch.zeros(1, 16, 16)
    line[0, 8, 2:14] = 1.0
    assert torch.equal(grow_targets(line, 1), line)
    grown = grow_targets(line, 5)
    assert grown[0, :, 8].nonzero().flatten().tolist() == [6, 7, 8, 9, 10]
    assert grown.sum() == 5 * 16  # 12 px long + 2 px each end, 5 rows
    with pytest.raises(ValidationError, match="must be odd"):
        RecipeConfig(grow_targets_px=4)


def test_area_weighted_dice_stops_tiny_misses_outvoting_a_large_hit() -> None:
    """Three missed 2 px pinholes and one dent drawn right: equal weights call that mostly wrong,
    area weights (full weight at 256 px) call it mostly right."""
    logits = torch.full((4, 32, 32), -10.0)
    targets = torch.zeros(4, 32, 32)
    for i in range(3):
        targets[i, 5, 5 + i : 7 + i] = 1.0  # 2 px each, predicted nowhere
    targets[3, 8:24, 8:24] = 1.0  # 256 px, predicted exactly
    logits[3, 8:24, 8:24] = 10.0
    equal = float(dice_loss(logits, targets))
    weighted = float(dice_loss(logits, targets, full_weight_area=256))
    assert equal > 0.5
    assert weighted < 0.05
