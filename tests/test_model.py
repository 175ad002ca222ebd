"""The model family: window segmenters and the candidate finder, their shapes, sizes and checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="the models need the 'train' extra (torch)")

from training.model.build import (  # noqa: E402
    CELL_STRIDE,
    PARTS,
    build_finder,
    build_model,
    class_head_names,
    count_macs,
    count_parameters,
    list_finders,
    list_models,
    parameter_counts,
)
from training.model.checkpoint import (  # noqa: E402
    CheckpointError,
    load_weights,
    model_config,
    read_checkpoint,
    save_checkpoint,
)
from training.model.segmenter import SegmenterOutput, foreground_logit  # noqa: E402

NECK_WIDTHS = (32, 48, 64, 96)  # n2, n4, n8, n16: shared by every segmenter of the family


def test_the_registry_names_the_segmenters_and_the_finder() -> None:
    assert list_models() == ["student_seg", "teacher_seg"]
    assert list_finders() == ["finder"]
    assert PARTS == ("encoder", "neck", "decoder")


@pytest.mark.parametrize("name", ["student_seg", "teacher_seg"])
@pytest.mark.parametrize(("batch", "height", "width"), [(2, 64, 64), (1, 48, 80), (3, 16, 32)])
def test_a_segmenter_gives_class_logits_at_the_windows_own_resolution(
    name: str, batch: int, height: int, width: int
) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=3)
    assert not model.training and model.num_classes == 3 and model.embed_dim == 96
    image = torch.randn(batch, 3, height, width)
    with torch.no_grad():
        out = model.run(image)
        logits = model(image)
    assert isinstance(out, SegmenterOutput)
    assert out.logits.shape == (batch, 4, height, width)  # background + 3 classes, stride 1
    torch.testing.assert_close(logits, out.logits)
    assert [tuple(n.shape) for n in out.neck] == [
        (batch, c, height // s, width // s) for c, s in zip(NECK_WIDTHS, (2, 4, 8, 16), strict=True)
    ]
    assert out.embedding is out.neck[3]
    with torch.no_grad():
        assert [tuple(n.shape) for n in model.embed(image)] == [tuple(n.shape) for n in out.neck]


def test_the_class_count_sets_the_logit_channels() -> None:
    model = build_model("student_seg", num_classes=1)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 2, 32, 32)
    assert build_model("student_seg", num_classes=5).decoder.head.out_channels == 6


def test_a_pixel_of_the_window_reaches_its_own_logits() -> None:
    """The decoder ends at stride 1 with a path from the image itself: one changed pixel moves its own logits
    more than those of its neighbours 8 px away."""
    torch.manual_seed(0)
    model = build_model("student_seg")
    image = torch.randn(1, 3, 64, 64)
    changed = image.clone()
    changed[0, :, 30, 30] += 5.0
    with torch.no_grad():
        delta = (model(changed) - model(image)).abs().sum(dim=1)[0]
    assert delta[30, 30] > 3 * delta[30, 38] and delta[30, 30] > 3 * delta[38, 30]


def test_the_foreground_logit_is_the_log_odds_of_any_defect() -> None:
    logits = torch.randn(2, 4, 5, 7) * 3
    fg = foreground_logit(logits)
    assert fg.shape == (2, 5, 7)
    probs = torch.softmax(logits, dim=1)
    torch.testing.assert_close(torch.sigmoid(fg), 1 - probs[:, 0], atol=1e-6, rtol=1e-5)


def test_the_finder_gives_one_logit_per_cell_of_8_input_pixels() -> None:
    torch.manual_seed(0)
    finder = build_finder("finder")
    assert not finder.training and CELL_STRIDE == 8
    with torch.no_grad():
        logits = finder(torch.randn(2, 3, 48, 80))
        full = finder(torch.zeros(1, 3, 384, 672))  # a 4 MP frame reduced 4x
    assert logits.shape == (2, 1, 6, 10) and full.shape == (1, 1, 48, 84)
    # Untrained, every cell starts near the prior of a rare defect (the head's bias, -4.6: p 0.01).
    assert float(finder.head.bias.detach()) == pytest.approx(-4.6)
    assert float(torch.sigmoid(logits).mean()) < 0.1


def test_parameter_budgets() -> None:
    student = parameter_counts(build_model("student_seg"))
    teacher = parameter_counts(build_model("teacher_seg"))
    assert 600_000 <= student["total"] <= 800_000  # 0.7 M
    assert 3_000_000 <= teacher["total"] <= 3_800_000  # 3.4 M
    assert 100_000 <= count_parameters(build_finder()) <= 200_000  # 0.15 M
    for counts in (student, teacher):
        assert sum(counts[part] for part in PARTS) == counts["total"]
    assert student["decoder"] == teacher["decoder"], "one family, one decoder"


def test_teacher_and_student_decoders_are_interchangeable() -> None:
    torch.manual_seed(1)
    teacher, student = build_model("teacher_seg"), build_model("student_seg")
    student.decoder.load_state_dict(teacher.decoder.state_dict())
    for key, value in teacher.decoder.state_dict().items():
        torch.testing.assert_close(student.decoder.state_dict()[key], value)


def test_the_cost_grows_with_the_window_area() -> None:
    model = build_model("student_seg")
    small, large = count_macs(model, 64, 64), count_macs(model, 128, 128)
    assert small > 0 and 3.9 < large / small < 4.1  # fully convolutional
    assert count_macs(model, 64, 64, batch=2) == 2 * small


def test_build_rejects_bad_names_and_class_counts() -> None:
    with pytest.raises(KeyError, match="unknown model 'resnet'; known: student_seg, teacher_seg"):
        build_model("resnet")
    with pytest.raises(KeyError, match="unknown finder"):
        build_finder("detr")
    with pytest.raises(ValueError, match="num_classes must be at least 1, got 0"):
        build_model("student_seg", num_classes=0)


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("student_seg", num_classes=2)
    path = save_checkpoint(tmp_path / "ckpt.pt", "student_seg", model, epoch=3)
    assert not [p for p in tmp_path.iterdir() if p.name != "ckpt.pt"], "no temporary file is left"
    other = build_model("student_seg", num_classes=2)
    payload = load_weights(other, path, "student_seg")
    assert payload["config"] == {"kind": "segmenter", "num_classes": 2} and payload["epoch"] == 3
    for key, value in model.state_dict().items():
        torch.testing.assert_close(other.state_dict()[key], value)
    finder = build_finder()
    saved = read_checkpoint(save_checkpoint(tmp_path / "finder.pt", "finder", finder))
    assert saved["arch"] == "finder" and saved["config"] == {"kind": "finder"}
    with pytest.raises(TypeError, match="not a model of the family"):
        model_config(torch.nn.Linear(2, 2))


def test_a_checkpoint_of_other_classes_transfers_all_but_its_class_head(tmp_path: Path) -> None:
    torch.manual_seed(0)
    three = build_model("student_seg", num_classes=3)
    path = save_checkpoint(tmp_path / "neu.pt", "student_seg", three)
    five = build_model("student_seg", num_classes=5)
    fresh_head = {k: v.clone() for k, v in five.state_dict().items()}
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_weights(five, path, "student_seg")
    head = class_head_names("student_seg")
    assert head and all("head" in name for name in head)
    load_weights(five, path, "student_seg", skip=head)
    for key, value in five.state_dict().items():
        expected = fresh_head[key] if key in head else three.state_dict()[key]
        torch.testing.assert_close(value, expected)


def test_wrong_checkpoint_arch_is_one_line_naming_the_file(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "student.pt", "student_seg", build_model("student_seg"))
    with pytest.raises(CheckpointError) as info:
        load_weights(build_model("teacher_seg"), path, "teacher_seg")
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert "checkpoint is for architecture 'student_seg', not 'teacher_seg'" in message


def test_mislabelled_or_broken_checkpoints_are_one_line(tmp_path: Path) -> None:
    student = build_model("student_seg")
    liar = tmp_path / "liar.pt"
    torch.save({"arch": "teacher_seg", "config": {}, "model": student.state_dict()}, liar)
    with pytest.raises(CheckpointError, match=r"weights do not fit 'teacher_seg'.*wrong shape") as info:
        load_weights(build_model("teacher_seg"), liar, "teacher_seg")
    assert "\n" not in str(info.value)
    fewer = tmp_path / "fewer.pt"
    torch.save({"arch": "student_seg", "config": {}, "model": student.encoder.state_dict()}, fewer)
    with pytest.raises(CheckpointError, match="missing"):
        load_weights(student, fewer, "student_seg")
    cases = [
        (tmp_path / "garbage.pt", b"not a checkpoint", "not a readable torch checkpoint"),
        (tmp_path / "nowhere.pt", None, "checkpoint does not exist"),
    ]
    for path, content, message in cases:
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(CheckpointError, match=message) as info:
            load_weights(student, path, "student_seg")
        assert "\n" not in str(info.value) and str(path) in str(info.value)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": 1}, foreign)
    with pytest.raises(CheckpointError, match="not a defectsam checkpoint"):
        read_checkpoint(foreign)
