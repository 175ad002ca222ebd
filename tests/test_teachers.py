"""Teachers behind one interface: SAM 2 (tiny random config, saved and loaded from disk), the
project's own family from a checkpoint, and the on-disk teacher cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from training.data.prepare import PreparedDataset, collate  # noqa: E402
from training.data.synthetic import SyntheticDataset  # noqa: E402
from training.model.build import build_model  # noqa: E402
from training.model.checkpoint import CheckpointError, save_checkpoint  # noqa: E402
from training.teachers.base import TeacherError  # noqa: E402
from training.teachers.cache import TeacherCache, build_cache, open_cache  # noqa: E402
from training.teachers.family import FamilyTeacher  # noqa: E402

H, W = 64, 128


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


def tiny_batch(n: int = 3) -> dict[str, torch.Tensor]:
    samples = SyntheticDataset(n, seed=3, width=128, height=72, pixel_scale=0.5, defect_free_prob=0.0)
    prepared = PreparedDataset(samples, height=H, width=W, train=False)
    batch = collate([prepared[i] for i in range(n)])
    valid = batch["instance_valid"]
    batch["image_index"] = valid.nonzero()[:, 0]
    batch["prompts"] = batch["anchors"][valid]
    return batch


@pytest.fixture(scope="module")
def sam2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_sam2_dir(tmp_path_factory.mktemp("sam2") / "tiny-sam2")


def test_sam2_teacher_loads_locally_and_maps_to_the_student_grid(sam2_dir: Path, monkeypatch) -> None:
    from training.teachers.sam2 import Sam2Teacher

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a download attempt would fail
    teacher = Sam2Teacher.from_directory(sam2_dir, height=H, width=W)
    assert teacher.channels == 32 and teacher.mask_stride == 4
    assert teacher.scale == 1.0  # 64x128 sits in the top 64 rows of SAM 2's 128x128 input
    assert teacher.teacher_id.startswith("sam2-") and teacher.teacher_id.endswith("-64x128")
    assert not any(p.requires_grad for p in teacher.parameters()), "teachers come frozen"

    batch = tiny_batch()
    m = batch["prompts"].shape[0]
    with torch.no_grad():
        embedding = teacher.embed(batch["image"])
        out = teacher.predict(batch["image"], batch["prompts"], batch["image_index"])
    assert embedding.shape == (3, 32, H // 16, W // 16)
    assert torch.allclose(out.embedding, embedding)
    assert out.mask_logits.shape == (m, H // 4, W // 4)
    assert torch.isfinite(out.mask_logits).all()

    # The embedding is the crop of SAM 2's own 8x8 grid to the rows that hold the image.
    with torch.no_grad():
        full = teacher.model.get_image_embeddings(teacher._to_sam(batch["image"]))[-1]
    assert full.shape[-2:] == (8, 8)
    assert torch.allclose(embedding, full[:, :, : H // 16, : W // 16])


def test_sam2_teacher_resizes_when_the_input_is_larger(sam2_dir: Path) -> None:
    from training.teachers.sam2 import Sam2Teacher

    teacher = Sam2Teacher.from_directory(sam2_dir, height=128, width=256)  # s = 0.5
    image = torch.randn(1, 3, 128, 256)
    with torch.no_grad():
        out = teacher.predict(image, torch.tensor([[100.0, 60.0]]), torch.tensor([0]))
    assert out.embedding.shape == (1, 32, 8, 16) and out.mask_logits.shape == (1, 32, 64)


def test_sam2_missing_directory_is_one_error_naming_it(tmp_path: Path) -> None:
    from training.teachers.sam2 import Sam2Teacher

    with pytest.raises(TeacherError, match=r"no config\.json"):
        Sam2Teacher.from_directory(tmp_path / "nowhere", height=H, width=W)


def test_family_teacher_from_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("teacher_cnn", height=H, width=W, k=2)
    ckpt = save_checkpoint(tmp_path / "teacher.pt", "teacher_cnn", model)
    teacher = FamilyTeacher.from_checkpoint(ckpt, height=H, width=W, num_classes=3)
    assert teacher.channels == 256 and teacher.mask_stride == 8
    batch = tiny_batch()
    with torch.no_grad():
        out = teacher.predict(batch["image"], batch["prompts"], batch["image_index"])
        embedding, _ = model.eval().embed(batch["image"])
    assert torch.allclose(out.embedding, embedding, atol=1e-5)
    assert out.mask_logits.shape == (batch["prompts"].shape[0], H // 8, W // 8)

    with pytest.raises(TeacherError, match="64x128"):
        teacher.embed(torch.zeros(1, 3, 128, 128))


def test_family_teacher_rejects_a_foreign_checkpoint(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    torch.save({"weights": 1}, bad)
    with pytest.raises(CheckpointError) as info:
        FamilyTeacher.from_checkpoint(bad, height=H, width=W, num_classes=3)
    assert str(bad) in str(info.value) and "\n" not in str(info.value)


def test_cache_is_written_once_reused_and_extended(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("student_cnn", height=H, width=W, k=2)
    teacher = FamilyTeacher(model, "student_cnn", "0" * 64)
    samples = SyntheticDataset(5, seed=11, width=128, height=72, pixel_scale=0.5)
    prepared = PreparedDataset(samples, height=H, width=W, train=False)
    sources = [samples[i].source for i in range(5)]
    root = tmp_path / "cache"

    cache = build_cache(root, teacher, prepared.__getitem__, sources[:3], batch_size=2)
    index = json.loads((cache.path / "index.json").read_text())
    assert index["teacher_id"] == teacher.teacher_id and sorted(index["entries"]) == sorted(sources[:3])
    assert np.load(cache.path / "embeddings.npy", mmap_mode="r").shape == (3, 256, 4, 8)
    assert [p.name for p in root.iterdir()] == [cache.path.name], "no temporary directory is left"

    # The cached outputs are the teacher's (float16 on disk).
    example = prepared[1]
    batch = collate([example])
    with torch.no_grad():
        direct = teacher.predict(batch["image"], torch.from_numpy(example.anchors), torch.zeros(
            example.anchors.shape[0], dtype=torch.int64))
    cached = cache.get(sources[1])
    assert torch.allclose(cached.embedding, direct.embedding[0], atol=2e-2, rtol=1e-2)
    assert cached.mask_logits.shape == direct.mask_logits.shape
    assert torch.allclose(cached.mask_logits, direct.mask_logits, atol=5e-2, rtol=1e-2)
    assert np.allclose(cached.points.numpy(), example.anchors)

    # Everything cached: nothing is recomputed, the directory is untouched.
    stamp = (cache.path / "embeddings.npy").stat().st_mtime_ns
    calls = []
    again = build_cache(root, teacher, lambda i: calls.append(i) or prepared[i], sources[:3])
    assert calls == [] and (again.path / "embeddings.npy").stat().st_mtime_ns == stamp

    # New sources: old rows are kept, only the new ones are computed.
    extended = build_cache(root, teacher, lambda i: calls.append(i) or prepared[i], sources)
    assert sorted(calls) == [3, 4]
    assert sorted(extended.entries) == sorted(sources)
    assert torch.equal(extended.get(sources[1]).embedding, cached.embedding)
    assert open_cache(root, teacher.teacher_id) is not None
    assert open_cache(root, "other-teacher") is None
    with pytest.raises(Exception, match="no teacher cache"):
        TeacherCache(tmp_path / "empty")


def test_finetune_sam2_trains_the_decoder_and_saves_a_loadable_teacher(sam2_dir: Path, tmp_path: Path) -> None:
    from training.config import parse_config
    from training.teachers.finetune import finetune_sam2
    from training.teachers.sam2 import Sam2Teacher

    config = parse_config({
        "out": str(tmp_path / "ft"),
        "model": {"height": H, "width": W, "k": 2},
        "data": {"train": [{"name": "synthetic", "n": 2, "width": 128, "height": 72, "pixel_scale": 0.5,
                            "defect_free_prob": 0.0}]},
        "teacher": {"kind": "sam2", "checkpoint": str(sam2_dir)},
        "recipe": {"name": "supervised"},
        "schedule": {"epochs": 1, "batch_size": 2, "lr": 0.01},
    })  # fmt: skip
    before = Sam2Teacher.from_directory(sam2_dir, height=H, width=W)
    target = finetune_sam2(config, log=lambda m: None)
    after = Sam2Teacher.from_directory(target, height=H, width=W)
    old, new = before.model.mask_decoder.state_dict(), after.model.mask_decoder.state_dict()
    decoder_changed = any(not torch.equal(old[k], new[k]) for k in old)
    encoder_same = all(
        torch.equal(a, b)
        for a, b in zip(before.model.vision_encoder.state_dict().values(),
                        after.model.vision_encoder.state_dict().values(), strict=True)
    )  # fmt: skip
    assert decoder_changed and encoder_same
    assert after.teacher_id != before.teacher_id, "new weights, new cache key"
