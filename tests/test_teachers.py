"""Teachers behind one interface: SAM 2 (tiny random config, saved and loaded from disk), the project's own
family from a checkpoint, and the on-disk teacher cache the trainer crops with its windows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402

from training.config import TeacherConfig  # noqa: E402
from training.data.registry import MergedDataset  # noqa: E402
from training.data.synthetic import SyntheticDataset  # noqa: E402
from training.data.windows import WindowDataset, collate_windows, orient  # noqa: E402
from training.model.build import build_model  # noqa: E402
from training.model.checkpoint import CheckpointError, save_checkpoint  # noqa: E402
from training.model.segmenter import foreground_logit  # noqa: E402
from training.teachers import build_teacher  # noqa: E402
from training.teachers.base import TeacherError  # noqa: E402
from training.teachers.cache import CacheError, TeacherCache, build_cache, instance_points, open_cache  # noqa: E402
from training.teachers.family import FamilyTeacher  # noqa: E402

WINDOW = 64


def tiny_sam2_dir(path: Path, image_size: int = 128) -> Path:
    """A random-initialised SAM 2 with a tiny Hiera, written with save_pretrained."""
    transformers = pytest.importorskip("transformers")
    s = image_size
    config = transformers.Sam2Config(
        vision_config={
            "backbone_config": {
                "model_type": "sam2_hiera_det_model", "image_size": [s, s], "hidden_size": 16,
                "blocks_per_stage": [1, 1, 2, 1], "embed_dim_per_stage": [16, 32, 64, 128],
                "num_attention_heads_per_stage": [1, 1, 2, 2], "window_size_per_stage": [4, 4, 4, 4],
                "global_attention_blocks": [3], "window_positional_embedding_background_size": [2, 2],
            },
            "backbone_channel_list": [128, 64, 32, 16],
            "backbone_feature_sizes": [[s // 4, s // 4], [s // 8, s // 8], [s // 16, s // 16]],
            "fpn_hidden_size": 32,
        },
        prompt_encoder_config={"hidden_size": 32, "image_size": s, "patch_size": 16},
        mask_decoder_config={"hidden_size": 32, "mlp_dim": 64, "num_attention_heads": 2, "iou_head_hidden_dim": 32},
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.Sam2Model(config).save_pretrained(str(path))
    return path


def tiny_batch(n: int = 3, height: int = WINDOW, width: int = WINDOW) -> dict[str, torch.Tensor]:
    """Whole synthetic samples as evaluation windows, with one prompt per instance (its interior point)."""
    samples = SyntheticDataset(n, seed=3, width=width, height=height, pixel_scale=0.5, defect_free_prob=0.0)
    examples = [WindowDataset(samples, train=False)[i] for i in range(n)]
    batch = collate_windows(examples)
    points, index = [], []
    for j, example in enumerate(examples):
        mine = instance_points(example.label)
        points.extend(mine)
        index.extend([j] * len(mine))
    batch["prompts"] = torch.tensor(points, dtype=torch.float32).reshape(-1, 2)
    batch["image_index"] = torch.tensor(index, dtype=torch.int64)
    return batch


@pytest.fixture(scope="module")
def sam2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_sam2_dir(tmp_path_factory.mktemp("sam2") / "tiny-sam2")


def test_instance_points_are_one_interior_point_per_instance() -> None:
    label = np.zeros((40, 60), np.uint8)
    label[5:15, 5:25] = 1  # scratch
    label[30:34, 40:44] = 3  # pinhole
    label[30:34, 50:54] = 3  # another pinhole
    label[0, 59] = 255  # padding: no instance
    points = instance_points(label)
    assert len(points) == 3
    assert [int(label[int(y), int(x)]) for x, y in points] == [1, 3, 3]  # each inside its instance, class order
    assert all(x % 1 == 0.5 and y % 1 == 0.5 for x, y in points)  # pixel centres


def test_sam2_teacher_loads_locally_and_maps_to_the_students_grid(sam2_dir: Path, monkeypatch) -> None:
    from training.teachers.sam2 import NO_DEFECT_LOGIT, Sam2Teacher

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a download attempt would fail
    teacher = Sam2Teacher.from_directory(sam2_dir)
    assert teacher.channels == 32 and teacher.image_size == 128 and not teacher.has_neck
    assert teacher.teacher_id.startswith("sam2-") and len(teacher.teacher_id) == len("sam2-") + 12
    assert not any(p.requires_grad for p in teacher.parameters()), "teachers come frozen"
    assert Sam2Teacher.from_directory(sam2_dir).teacher_id == teacher.teacher_id  # keyed by the weights

    batch = tiny_batch(3, 64, 128)  # scale 1: the 64 x 128 window sits in the top rows of SAM 2's 128 x 128 input
    keep = batch["image_index"] != 2  # the third image gets no prompt
    with torch.no_grad():
        out = teacher.predict(batch["image"], batch["prompts"][keep], batch["image_index"][keep])
        full = teacher.model.get_image_embeddings(teacher._to_sam(batch["image"]))[-1]
    assert out.embedding.shape == (3, 32, 4, 8) and out.neck is None
    assert full.shape[-2:] == (8, 8)
    torch.testing.assert_close(out.embedding, full[:, :, :4, :8])  # the cells that hold the window
    assert out.foreground.shape == (3, 64, 128) and torch.isfinite(out.foreground).all()
    assert bool((out.foreground[2] == NO_DEFECT_LOGIT).all()), "an image without instances: no defect anywhere"
    assert not bool((out.foreground[0] == NO_DEFECT_LOGIT).all())


def test_sam2_teacher_scales_a_small_window_up_to_its_input(sam2_dir: Path) -> None:
    from training.teachers.sam2 import Sam2Teacher

    teacher = Sam2Teacher.from_directory(sam2_dir)
    image = torch.randn(1, 3, 32, 32)  # s = 4: SAM 2 sees it at 128 x 128
    with torch.no_grad():
        out = teacher.predict(image, torch.tensor([[10.5, 20.5]]), torch.tensor([0]))
        full = teacher.model.get_image_embeddings(teacher._to_sam(image))[-1]
    assert out.embedding.shape == (1, 32, 2, 2) and out.foreground.shape == (1, 32, 32)
    want = F.interpolate(full, size=(2, 2), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out.embedding, want)


def test_sam2_missing_directory_is_one_error_naming_it(tmp_path: Path) -> None:
    from training.teachers.sam2 import Sam2Teacher

    with pytest.raises(TeacherError) as caught:
        Sam2Teacher.from_directory(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(caught.value) and "no config.json" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_family_teacher_from_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("teacher_seg", num_classes=3)
    ckpt = save_checkpoint(tmp_path / "teacher.pt", "teacher_seg", model)
    teacher = build_teacher(TeacherConfig(kind="family", checkpoint=ckpt), num_classes=3)
    assert isinstance(teacher, FamilyTeacher) and teacher.channels == 96 and teacher.has_neck
    assert teacher.teacher_id.startswith("family-teacher_seg-")
    assert not any(p.requires_grad for p in teacher.parameters())
    batch = tiny_batch()
    with torch.no_grad():
        out = teacher.predict(batch["image"], batch["prompts"], batch["image_index"])
        reference = model.eval().run(batch["image"])
    torch.testing.assert_close(out.embedding, reference.embedding)
    torch.testing.assert_close(out.foreground, foreground_logit(reference.logits))
    assert out.neck is not None and [n.shape[1] for n in out.neck] == [32, 48, 64, 96]
    assert out.foreground.shape == (3, WINDOW, WINDOW)
    # A teacher trained for other classes still teaches where the defects are.
    five = save_checkpoint(tmp_path / "five.pt", "student_seg", build_model("student_seg", num_classes=5))
    other = FamilyTeacher.from_checkpoint(five, num_classes=3)
    assert other.model.num_classes == 5
    with torch.no_grad():
        assert other.predict(batch["image"], batch["prompts"], batch["image_index"]).foreground.shape == (3, 64, 64)


def test_family_teacher_rejects_a_foreign_checkpoint_and_a_teacher_needs_one(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    torch.save({"weights": 1}, bad)
    with pytest.raises(CheckpointError) as info:
        FamilyTeacher.from_checkpoint(bad, num_classes=3)
    assert str(bad) in str(info.value) and "\n" not in str(info.value)
    old = tmp_path / "old.pt"
    torch.save({"arch": "teacher_cnn", "config": {}, "model": {}}, old)
    with pytest.raises(CheckpointError, match=r"cannot build teacher 'teacher_cnn'") as info:
        FamilyTeacher.from_checkpoint(old, num_classes=3)
    assert str(old) in str(info.value)
    with pytest.raises(TeacherError, match=r"teacher\.checkpoint: a teacher needs its checkpoint"):
        build_teacher(TeacherConfig(kind="family"), num_classes=3)


@pytest.fixture(scope="module")
def samples() -> MergedDataset:
    """Five samples of two sizes (the cache stores flat arrays, batches by size)."""
    return MergedDataset([
        SyntheticDataset(3, seed=11, width=96, height=64, pixel_scale=0.5),
        SyntheticDataset(2, seed=50, width=128, height=80, pixel_scale=0.5),
    ])


def test_cache_is_written_once_reused_and_extended(tmp_path: Path, samples: MergedDataset) -> None:
    torch.manual_seed(0)
    teacher = FamilyTeacher(build_model("student_seg"), "student_seg", "0" * 64)
    whole = WindowDataset(samples, train=False)
    sources = [samples[i].source for i in range(5)]
    root = tmp_path / "cache"

    cache = build_cache(root, teacher, whole.__getitem__, sources[:4], batch_size=2)
    index = json.loads((cache.path / "index.json").read_text())
    assert index["teacher_id"] == teacher.teacher_id and sorted(index["entries"]) == sorted(sources[:4])
    assert index["entries"][sources[3]]["foreground"][1:] == [80, 128]  # the padded sample's size
    assert index["entries"][sources[0]]["embedding"][1:] == [96, 4, 6]
    total = 3 * 96 * 4 * 6 + 96 * 5 * 8
    assert np.load(cache.path / "embeddings.npy", mmap_mode="r").shape == (total,)
    assert np.load(cache.path / "foreground.npy", mmap_mode="r").dtype == np.float16
    assert [p.name for p in root.iterdir()] == [cache.path.name], "no temporary directory is left"

    # The cached outputs are the teacher's (float16 on disk).
    for i in (1, 3):
        example = whole[i]
        batch = collate_windows([example])
        with torch.no_grad():
            direct = teacher.predict(batch["image"], torch.zeros(0, 2), torch.zeros(0, dtype=torch.int64))
        cached = cache.get(sources[i])
        assert cached.embedding.dtype == torch.float32 and cached.foreground.shape == example.label.shape
        torch.testing.assert_close(cached.embedding, direct.embedding[0], atol=2e-2, rtol=1e-2)
        torch.testing.assert_close(cached.foreground, direct.foreground[0], atol=5e-2, rtol=1e-2)

    first = cache.get(sources[1]).embedding.clone()

    # Everything cached: nothing is recomputed, the directory is untouched.
    stamp = (cache.path / "embeddings.npy").stat().st_mtime_ns
    calls: list[int] = []
    again = build_cache(root, teacher, lambda i: calls.append(i) or whole[i], sources[:4])
    assert calls == [] and (again.path / "embeddings.npy").stat().st_mtime_ns == stamp

    # A new source: old rows are kept, only the new one is computed.
    extended = build_cache(root, teacher, lambda i: calls.append(i) or whole[i], sources)
    assert calls == [4]
    assert sorted(extended.entries) == sorted(sources)
    assert torch.equal(extended.get(sources[1]).embedding, first)
    assert open_cache(root, teacher.teacher_id) is not None and open_cache(root, "other-teacher") is None
    assert sources[4] in extended and extended.missing([*sources, "elsewhere"]) == ["elsewhere"]
    with pytest.raises(CacheError, match="no cached teacher outputs for 'elsewhere'"):
        extended.get("elsewhere")


def test_a_missing_or_broken_cache_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="no teacher cache here"):
        TeacherCache(tmp_path / "empty")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "index.json").write_text("{}")
    with pytest.raises(CacheError, match="unreadable cache index") as caught:
        TeacherCache(tmp_path / "broken")
    assert "\n" not in str(caught.value)


def test_training_windows_take_their_crop_of_the_cached_outputs(tmp_path: Path, samples: MergedDataset) -> None:
    from training.trainer import WithTeacherTargets, collate_with_targets

    torch.manual_seed(0)
    teacher = FamilyTeacher(build_model("student_seg"), "student_seg", "1" * 64)
    sources = [samples[i].source for i in range(5)]
    cache = build_cache(tmp_path / "cache", teacher, WindowDataset(samples, train=False).__getitem__, sources)
    windows = WindowDataset(samples, window=32, train=True, augment=True, seed=4)
    paired = WithTeacherTargets(windows, cache)
    for i in range(5):
        example, foreground, embedding = paired[i]
        crop = example.crop
        cached = cache.get(example.source)
        want_fg = orient(cached.foreground.numpy()[crop.y : crop.y + 32, crop.x : crop.x + 32], crop)
        want_emb = orient(cached.embedding.numpy()[:, crop.y // 16 : crop.y // 16 + 2, crop.x // 16 : crop.x // 16 + 2],
                          crop)
        np.testing.assert_array_equal(foreground.numpy(), want_fg)
        np.testing.assert_array_equal(embedding.numpy(), want_emb)
        assert foreground.shape == example.label.shape and embedding.shape == (96, 2, 2)
    batch = collate_with_targets([paired[i] for i in range(5)])
    assert batch["teacher_foreground"].shape == (5, 32, 32) and batch["teacher_embedding"].shape == (5, 96, 2, 2)
