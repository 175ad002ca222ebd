"""Loss terms and recipes: each recipe's loss on a real tiny batch of windows, what it trains and what it freezes."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402

from training.config import RecipeConfig  # noqa: E402
from training.data.sample import IGNORE_LABEL  # noqa: E402
from training.losses import (  # noqa: E402
    cosine_embedding_loss,
    cross_entropy,
    dice_loss,
    focal_cell_loss,
    mse_embedding_loss,
    perceptual_loss,
    soft_mask_bce,
)
from training.model.build import build_model  # noqa: E402
from training.recipes import DECODER_PARTS, ENCODER_PARTS, build_recipe  # noqa: E402
from training.teachers.base import Teacher, TeacherError, TeacherOutput  # noqa: E402
from training.teachers.cache import instance_points  # noqa: E402
from training.teachers.family import FamilyTeacher  # noqa: E402

WINDOW = 64


def _batch() -> dict[str, torch.Tensor]:
    """Two 64 px training windows of synthetic panels, each holding a defect."""
    from training.data.synthetic import SyntheticDataset
    from training.data.windows import WindowDataset, collate_windows

    samples = SyntheticDataset(2, seed=5, width=160, height=128, pixel_scale=0.5, defect_free_prob=0.0)
    windows = WindowDataset(samples, window=WINDOW, train=True, positive_fraction=1.0, seed=0)
    batch = collate_windows([windows[i] for i in range(2)])
    assert (batch["label"] > 0).any()
    return batch


@pytest.fixture(scope="module")
def teacher() -> FamilyTeacher:
    torch.manual_seed(1)
    return FamilyTeacher(build_model("teacher_seg"), "teacher_seg", "f" * 64)


def _with_teacher(batch: dict[str, torch.Tensor], teacher: Teacher) -> dict[str, torch.Tensor]:
    points, index = [], []
    for j, label in enumerate(batch["label"].numpy()):
        mine = instance_points(label)
        points.extend(mine)
        index.extend([j] * len(mine))
    with torch.no_grad():
        out = teacher.predict(batch["image"], torch.tensor(points).reshape(-1, 2), torch.tensor(index))
    extra = {"teacher_embedding": out.embedding, "teacher_foreground": out.foreground}
    if out.neck is not None:
        extra["teacher_neck"] = out.neck  # type: ignore[assignment]
    return {**batch, **extra}


def _grads(recipe: torch.nn.Module, part: str) -> bool:
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in getattr(recipe.student, part).parameters())


class Foreign(Teacher):
    """A teacher of another family: 32 channels, no neck features (as SAM 2)."""

    teacher_id, channels = "sam2-test", 32

    def predict(self, images: torch.Tensor, points: torch.Tensor, image_index: torch.Tensor) -> TeacherOutput:
        b, _, h, w = images.shape
        return TeacherOutput(embedding=torch.zeros(b, 32, h // 16, w // 16), foreground=torch.zeros(b, h, w))


# -- loss terms ------------------------------------------------------------------------------------


def test_cross_entropy_and_dice_reward_the_right_classes_and_skip_ignored_pixels() -> None:
    labels = torch.zeros(2, 8, 8, dtype=torch.int64)
    labels[:, 2:6, 2:6] = 1
    labels[1, 0, :] = 3
    right = F.one_hot(labels, 4).permute(0, 3, 1, 2).float() * 40 - 20
    wrong = -right
    assert cross_entropy(right, labels) < 1e-6 < 10 < cross_entropy(wrong, labels)
    assert dice_loss(right, labels) < 0.01 and dice_loss(wrong, labels) > 0.95
    torch.testing.assert_close(cross_entropy(wrong, labels), F.cross_entropy(wrong, labels))
    # Pixels labelled IGNORE_LABEL count in neither: whatever the logits say there.
    ignored = labels.clone()
    ignored[:, 6:] = IGNORE_LABEL
    scrambled = right.clone()
    scrambled[:, :, 6:] = torch.randn(2, 4, 2, 8) * 10
    torch.testing.assert_close(cross_entropy(scrambled, ignored), cross_entropy(right, ignored))
    torch.testing.assert_close(dice_loss(scrambled, ignored), dice_loss(right, ignored))
    # No defect anywhere: dice pushes every defect probability down (and is ~0 when they are).
    clean = torch.zeros(1, 8, 8, dtype=torch.int64)
    confident = F.one_hot(clean, 4).permute(0, 3, 1, 2).float() * 40 - 20
    assert dice_loss(confident, clean) < 1e-6 and dice_loss(-confident, clean) > 0.3  # the mean defect probability


def test_soft_mask_bce_is_minimal_at_the_softened_teacher_and_skips_ignored_pixels() -> None:
    teacher = torch.randn(3, 16, 16) * 4
    labels = torch.zeros(3, 16, 16, dtype=torch.int64)
    softened = teacher / 2.0
    assert soft_mask_bce(softened, teacher, labels) < soft_mask_bce(teacher, teacher, labels)
    assert soft_mask_bce(softened, teacher, labels, temperature=1.0) > soft_mask_bce(teacher, teacher, labels, 1.0)
    labels[:, 8:] = IGNORE_LABEL
    off = softened.clone()
    off[:, 8:] += 50
    torch.testing.assert_close(soft_mask_bce(off, teacher, labels), soft_mask_bce(softened, teacher, labels))


def test_embedding_terms_and_the_finders_focal_loss() -> None:
    emb = torch.randn(2, 16, 4, 8)
    assert cosine_embedding_loss(emb, emb * 3) < 1e-5 and cosine_embedding_loss(emb, -emb) > 1.99
    assert perceptual_loss(emb, emb * 2) < 1e-5 < perceptual_loss(emb, torch.randn_like(emb))
    assert mse_embedding_loss(emb, emb) == 0 and mse_embedding_loss(emb, emb + 1) == pytest.approx(1.0)
    cells = torch.zeros(1, 1, 4, 8)
    cells[0, 0, 2, 3] = 1.0
    good, bad = cells * 12 - 6, cells * -12 + 6
    assert focal_cell_loss(good, cells) < 0.05 < focal_cell_loss(bad, cells)
    assert math.isfinite(float(focal_cell_loss(torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 4, 8))))
    # A missed defect cell costs more than a false one (alpha 0.75 on the positives).
    one_false = torch.full((1, 1, 4, 8), -6.0)
    one_false[0, 0, 0, 0] = 6.0
    one_false[0, 0, 2, 3] = 6.0
    one_missed = torch.full((1, 1, 4, 8), -6.0)
    assert focal_cell_loss(one_missed, cells) > focal_cell_loss(one_false, cells)


# -- recipes -----------------------------------------------------------------------------------


def test_supervised_needs_no_teacher_and_trains_every_part() -> None:
    torch.manual_seed(0)
    recipe = build_recipe("supervised", build_model("student_seg"), RecipeConfig())
    recipe.apply_phase(0)
    recipe.train()
    loss, parts = recipe(_batch())
    assert set(parts) == {"ce", "dice"} and loss.isfinite()
    torch.testing.assert_close(loss, parts["ce"] + parts["dice"])
    loss.backward()
    for part in (*ENCODER_PARTS, *DECODER_PARTS):
        assert _grads(recipe, part), part
    with pytest.raises(TeacherError, match="recipe 'blog' needs a teacher"):
        build_recipe("blog", build_model("student_seg"), RecipeConfig())
    with pytest.raises(KeyError, match="unknown recipe"):
        build_recipe("magic", build_model("student_seg"), RecipeConfig())


def test_blog_is_the_weighted_sum_and_trains_every_part(teacher: FamilyTeacher) -> None:
    torch.manual_seed(0)
    batch = _with_teacher(_batch(), teacher)
    recipe = build_recipe("blog", build_model("student_seg"), RecipeConfig(name="blog"), teacher)
    assert recipe.adapter is None, "same channels (96): no adapter"
    recipe.apply_phase(0)
    recipe.train()
    loss, parts = recipe(batch)
    assert set(parts) == {"feature", "soft_mask", "ce", "dice"}
    torch.testing.assert_close(loss, 0.4 * parts["feature"] + 0.3 * parts["soft_mask"] + 0.3 * parts["dice"])
    loss.backward()
    for part in (*ENCODER_PARTS, *DECODER_PARTS):
        assert _grads(recipe, part), part
    with_ce = build_recipe("blog", build_model("student_seg"), RecipeConfig(name="blog", ce_weight=0.5), teacher)
    loss, parts = with_ce(batch)
    torch.testing.assert_close(
        loss, 0.4 * parts["feature"] + 0.3 * parts["soft_mask"] + 0.3 * parts["dice"] + 0.5 * parts["ce"])


def test_a_teacher_of_other_channels_gets_the_student_an_adapter() -> None:
    student = build_model("student_seg")
    recipe = build_recipe("blog", student, RecipeConfig(name="blog"), Foreign())
    assert recipe.adapter is not None and recipe.adapter.proj.out_channels == 32
    assert recipe.adapter.proj.in_channels == student.embed_dim
    batch = _with_teacher(_batch(), Foreign())
    loss, parts = recipe(batch)
    assert loss.isfinite() and "feature" in parts


def test_nofeature_drops_the_cosine_term(teacher: FamilyTeacher) -> None:
    batch = _with_teacher(_batch(), teacher)
    recipe = build_recipe("nofeature", build_model("student_seg"), RecipeConfig(name="nofeature"), teacher)
    no_embedding = {k: v for k, v in batch.items() if k != "teacher_embedding"}
    _, parts = recipe(no_embedding)  # it needs no teacher embedding
    assert set(parts) == {"soft_mask", "ce", "dice"}


def test_mobilesam_copies_and_freezes_the_teachers_decoder(teacher: FamilyTeacher) -> None:
    batch = _with_teacher(_batch(), teacher)
    student = build_model("student_seg")
    recipe = build_recipe("mobilesam", student, RecipeConfig(name="mobilesam"), teacher)
    mine, theirs = student.decoder.state_dict(), teacher.model.decoder.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    recipe.apply_phase(0)
    recipe.train()
    assert not student.decoder.training and student.encoder.training, "frozen parts stay in eval mode"
    loss, parts = recipe(batch)
    assert set(parts) == {"mse"}
    expected = torch.stack([F.mse_loss(s, t) for s, t in zip(student.embed(batch["image"]),
                                                              batch["teacher_neck"], strict=True)]).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert _grads(recipe, "encoder") and _grads(recipe, "neck")
    assert not _grads(recipe, "decoder")


def test_neck_recipes_need_a_family_teacher() -> None:
    for name in ("mobilesam", "kdsam"):
        with pytest.raises(TeacherError, match="needs a family teacher") as caught:
            build_recipe(name, build_model("student_seg"), RecipeConfig(name=name), Foreign())  # type: ignore[arg-type]
        assert "sam2-test" in str(caught.value)


def test_kdsam_phases(teacher: FamilyTeacher) -> None:
    batch = _with_teacher(_batch(), teacher)
    recipe = build_recipe("kdsam", build_model("student_seg"), RecipeConfig(name="kdsam"), teacher)
    assert [recipe.phase(e, 4) for e in range(4)] == [0, 0, 1, 1]
    early = build_recipe("kdsam", build_model("student_seg"), RecipeConfig(name="kdsam", phase1_epochs=1), teacher)
    assert [early.phase(e, 4) for e in range(4)] == [0, 1, 1, 1]
    recipe.apply_phase(0)
    recipe.train()
    loss, parts = recipe(batch)
    assert set(parts) == {"mse", "perceptual"}
    torch.testing.assert_close(loss, parts["mse"] + 0.5 * parts["perceptual"])
    loss.backward()
    assert _grads(recipe, "encoder") and not _grads(recipe, "decoder")
    recipe.zero_grad(set_to_none=True)
    recipe.apply_phase(1)
    recipe.train()
    assert not recipe.student.encoder.training and not recipe.student.neck.training
    assert not recipe.needs_teacher_now  # phase 2 trains on ground truth alone
    no_teacher = {k: v for k, v in batch.items() if not k.startswith("teacher_")}
    loss, parts = recipe(no_teacher)
    assert set(parts) == {"ce", "dice"}
    loss.backward()
    assert _grads(recipe, "decoder")
    assert not any(_grads(recipe, part) for part in ENCODER_PARTS)
