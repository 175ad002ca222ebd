"""Dataset readers, specs, the synth command and training-example preparation, on real data where it exists."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from engines.preprocess import Letterbox, Preprocessor
from tests.conftest import DATASETS
from training.data.errors import DatasetError
from training.data.folder import FolderDataset
from training.data.magnetic_tile import MagneticTileDataset
from training.data.neu_seg import NeuSegDataset
from training.data.prepare import (
    collate,
    input_spec,
    interior_point,
    prepare_example,
    resize_mask,
)
from training.data.registry import MergedDataset, build_dataset, parse_spec
from training.data.sample import Sample
from training.data.synthetic import SyntheticDataset

from .support import run_command_module

MAGNETIC_TILE = DATASETS / "magnetic_tile"
NEU_SEG = DATASETS / "neu_seg"
needs_magnetic_tile = pytest.mark.skipif(
    not (MAGNETIC_TILE / "splits").is_dir(), reason=f"magnetic tile set not found at {MAGNETIC_TILE}"
)
needs_neu_seg = pytest.mark.skipif(not (NEU_SEG / "labels.txt").is_file(), reason=f"NEU-Seg not found at {NEU_SEG}")


def _split_lines(split: str) -> list[str]:
    text = (MAGNETIC_TILE / "splits" / f"{split}.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def _one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text
    return text


# -- real datasets -------------------------------------------------------------------------------


@needs_magnetic_tile
@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_magnetic_tile_split_sizes_follow_the_split_files(split: str) -> None:
    dataset = build_dataset(f"magnetic_tile:{split}")
    assert len(dataset) == len(_split_lines(split))
    assert tuple(dataset.class_names) == ("Blowhole", "Break", "Crack", "Fray", "Uneven")


@needs_magnetic_tile
def test_magnetic_tile_samples_align_and_carry_their_folder_class() -> None:
    dataset = MagneticTileDataset(MAGNETIC_TILE, "test")
    lines = _split_lines("test")
    assert len(dataset) == len(lines) == 208
    seen_defects = seen_free = 0
    for index in range(0, len(dataset), 13):
        sample = dataset[index]
        folder = lines[index].split("/")[0].removeprefix("MT_")
        raw = cv2.imread(str(MAGNETIC_TILE / lines[index]), cv2.IMREAD_GRAYSCALE)
        mask = cv2.imread(str((MAGNETIC_TILE / lines[index]).with_suffix(".png")), cv2.IMREAD_GRAYSCALE)
        assert sample.image.shape == (*raw.shape, 3) and sample.masks.shape[1:] == raw.shape
        assert np.array_equal(sample.image[:, :, 0], raw)  # grey replicated to BGR
        if folder == "Free":
            assert sample.masks.shape[0] == 0
            seen_free += 1
        else:
            assert set(sample.classes.tolist()) <= {dataset.class_names.index(folder)}
            union = sample.masks.any(axis=0) if len(sample.masks) else np.zeros_like(mask, dtype=bool)
            assert not (union & (mask < 128)).any()  # every instance pixel is foreground
            seen_defects += int(len(sample.masks) > 0)
    assert seen_defects and seen_free


@needs_neu_seg
def test_neu_seg_split_sizes_class_names_and_instances() -> None:
    sizes = {split: len(NeuSegDataset(NEU_SEG, split)) for split in ("train", "val", "test")}
    assert sizes == {"train": 3129, "val": 894, "test": 447}
    dataset = build_dataset("neu_seg:test")
    assert tuple(dataset.class_names) == ("Inclusions", "Patches", "Scratches", "others")
    for index in (0, 100, 446):
        sample = dataset[index]
        name = Path(sample.source).with_suffix(".png").name
        label = cv2.imread(str(NEU_SEG / "ann_dir" / "test" / name), cv2.IMREAD_UNCHANGED)
        assert sample.image.shape == (200, 200, 3) and sample.masks.shape[1:] == (200, 200)
        assert len(sample.masks) > 0
        for mask, class_id in zip(sample.masks, sample.classes, strict=True):
            assert (label[mask] == class_id + 1).all()  # value v is class v-1
        # Instances cover every labelled pixel but specks under min_instance_area (4 px).
        uncovered = (label > 0) & ~sample.masks.any(axis=0)
        assert uncovered.sum() < 4 * 8


@needs_magnetic_tile
@needs_neu_seg
def test_merged_datasets_share_one_class_list() -> None:
    merged = build_dataset("neu_seg:test,limit=3+synthetic,n=2,width=256,height=144+magnetic_tile:test,limit=3")
    assert isinstance(merged, MergedDataset)
    assert len(merged) == 8
    assert list(merged.class_names) == [
        "Inclusions", "Patches", "Scratches", "others", "scratch", "dent", "pinhole",
        "Blowhole", "Break", "Crack", "Fray", "Uneven",
    ]
    synthetic = SyntheticDataset(2, seed=0, width=256, height=144)
    for j in range(2):
        own = synthetic[j]
        names = [merged.class_names[c] for c in merged[3 + j].classes]
        assert names == [synthetic.class_names[c] for c in own.classes]
    renamed = build_dataset("magnetic_tile:test,class_map.Crack=scratch,class_map.Blowhole=pinhole,limit=20")
    assert list(renamed.class_names) == ["pinhole", "Break", "scratch", "Fray", "Uneven"]
    assert len(renamed) == 20


# -- bad input -----------------------------------------------------------------------------------


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)


def test_mask_of_the_wrong_size_is_one_line_naming_the_mask(tmp_path: Path) -> None:
    _write_png(tmp_path / "images" / "a.png", np.zeros((20, 30, 3), np.uint8))
    _write_png(tmp_path / "masks" / "a.png", np.zeros((20, 31), np.uint8))
    dataset = FolderDataset(tmp_path)
    with pytest.raises(DatasetError) as caught:
        dataset[0]
    message = _one_line(caught.value)
    assert str(tmp_path / "masks" / "a.png") in message and "31x20" in message and "30x20" in message


@needs_magnetic_tile
def test_corrupt_magnetic_tile_mask_size_names_the_file(tmp_path: Path) -> None:
    """A copy of one real sample whose mask lost a column."""
    name = _split_lines("test")[0]
    image = cv2.imread(str(MAGNETIC_TILE / name), cv2.IMREAD_UNCHANGED)
    mask = cv2.imread(str((MAGNETIC_TILE / name).with_suffix(".png")), cv2.IMREAD_UNCHANGED)
    _write_png(tmp_path / name, image)
    _write_png((tmp_path / name).with_suffix(".png"), mask[:, :-1])
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "test.txt").write_text(name + "\n")
    dataset = MagneticTileDataset(tmp_path, "test")
    with pytest.raises(DatasetError, match=r"mask is \d+x\d+ but its image") as caught:
        dataset[0]
    assert str((tmp_path / name).with_suffix(".png")) in _one_line(caught.value)


def test_missing_split_file_and_empty_dataset_are_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetError, match="no images") as empty:
        FolderDataset(tmp_path)
    assert str(tmp_path / "images") in _one_line(empty.value)
    with pytest.raises(DatasetError, match="split file is missing") as missing:
        FolderDataset(tmp_path, "val")
    assert str(tmp_path / "splits" / "val.txt") in _one_line(missing.value)
    with pytest.raises(DatasetError, match="split file is missing") as missing_mt:
        build_dataset({"name": "magnetic_tile", "root": str(tmp_path), "split": "val"})
    assert str(tmp_path / "splits" / "val.txt") in _one_line(missing_mt.value)
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "val.txt").write_text("\n")
    with pytest.raises(DatasetError, match="lists no images"):
        FolderDataset(tmp_path, "val")


def test_label_values_beyond_the_class_list_and_bad_specs(tmp_path: Path) -> None:
    _write_png(tmp_path / "images" / "a.png", np.zeros((8, 8, 3), np.uint8))
    label = np.zeros((8, 8), np.uint8)
    label[2:4, 2:4] = 3
    _write_png(tmp_path / "masks" / "a.png", label)
    (tmp_path / "classes.txt").write_text("scratch\ndent\n")
    with pytest.raises(DatasetError, match="label value 3 but the dataset names only 2 classes"):
        FolderDataset(tmp_path)[0]
    for spec, pattern in [
        ("magnetic_tile:tset", "key 'split'"),
        ("nothing", "unknown dataset 'nothing'"),
        ("synthetic,n=0", "key 'n'"),
        ("synthetic,colour", "expected KEY=VALUE"),
        (str(tmp_path / "missing.yaml"), "cannot be read"),
    ]:
        with pytest.raises(DatasetError, match=pattern) as caught:
            build_dataset(spec)
        _one_line(caught.value)
    assert parse_spec("folder,root=/data/x,split=7+synthetic:val,n=3") == [
        {"name": "folder", "root": "/data/x", "split": "7"},
        {"name": "synthetic", "split": "val", "n": 3},
    ]


# -- synthetic reader and the synth command ------------------------------------------------------


def test_synthetic_reader_is_deterministic_by_index_and_seed() -> None:
    a, b = SyntheticDataset(4, seed=5, width=320, height=180), SyntheticDataset(4, seed=5, width=320, height=180)
    first, again = a[2], b[2]
    assert first.source == "synthetic:7"
    assert np.array_equal(first.image, again.image) and np.array_equal(first.masks, again.masks)
    assert not np.array_equal(a[1].image, first.image)
    assert first.image.shape == (180, 320, 3) and tuple(a.class_names) == ("scratch", "dent", "pinhole")
    with pytest.raises(IndexError):
        a[4]


@pytest.mark.parametrize("instances", [False, True])
def test_synth_command_writes_what_the_folder_reader_reads_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], instances: bool
) -> None:
    from training.commands import synth

    out = tmp_path / "synth"
    argv = ["synth", "--out", str(out), "--n", "3", "--seed", "40", "--width", "384", "--height", "216"]
    code, stdout, _ = run_command_module(synth, argv + (["--instances"] if instances else []), capsys)
    assert code == 0 and "wrote 3 frame(s)" in stdout
    assert (out / "classes.txt").read_text().split() == ["scratch", "dent", "pinhole"]
    folder = build_dataset(f"folder,root={out}")
    original = SyntheticDataset(3, seed=40, width=384, height=216)
    assert len(folder) == 3 and tuple(folder.class_names) == tuple(original.class_names)
    for index in range(3):
        read, truth = folder[index], original[index]
        assert Path(read.source).name == f"{40 + index:06d}.png"
        assert np.array_equal(read.image, truth.image)  # PNG is lossless
        if instances:
            assert np.array_equal(read.masks, truth.masks) and np.array_equal(read.classes, truth.classes)
        else:
            # A label image keeps every defect pixel; touching instances of one class merge.
            union = truth.masks.any(axis=0) if len(truth.masks) else np.zeros((216, 384), bool)
            got = read.masks.any(axis=0) if len(read.masks) else np.zeros((216, 384), bool)
            assert np.array_equal(got, union)
            assert set(read.classes.tolist()) == set(truth.classes.tolist())
    code, _, err = run_command_module(synth, ["synth", "--out", str(out), "--n", "0"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--n must be at least 1" in err


# -- preparation ----------------------------------------------------------------------------------


def test_prepare_example_matches_the_runtime_preprocessor_bit_for_bit() -> None:
    height, width = 128, 256
    runtime = Preprocessor(input_spec(height, width))
    synthetic = SyntheticDataset(2, seed=11, width=800, height=450)  # shrunk, INTER_AREA
    tall = Sample(  # grown, INTER_LINEAR, padded on the right
        image=np.random.default_rng(0).integers(0, 256, (90, 70, 3), dtype=np.uint8),
        masks=np.zeros((0, 90, 70), bool), classes=np.zeros(0, np.int64), source="random",
    )
    for sample in [synthetic[0], synthetic[1], tall]:
        example = prepare_example(sample, height=height, width=width, num_classes=3)
        expected, box = runtime(sample.image)
        assert example.image.dtype == np.float32 and example.image.shape == (3, height, width)
        assert np.array_equal(example.image, expected[0])
        assert example.letterbox == box
        assert example.valid.sum() == box.content_width * box.content_height
        assert example.valid[: box.content_height, : box.content_width].all()
        assert not example.masks[:, ~example.valid].any()


def test_points_fall_inside_their_masks_and_the_heatmap_peaks_at_the_anchor_cell() -> None:
    sample = SyntheticDataset(1, seed=3, width=1024, height=576, defect_free_prob=0.0, max_defects=6)[0]
    assert len(sample.masks) >= 2
    evaluation = prepare_example(sample, height=288, width=512, num_classes=3)
    training = prepare_example(sample, height=288, width=512, num_classes=3, rng=np.random.default_rng(0), negatives=3)
    for example in (evaluation, training):
        assert example.masks.shape[0] == len(example.classes) == len(example.points)
        for mask, point, anchor, class_id in zip(
            example.masks, example.points, example.anchors, example.classes, strict=True
        ):
            x, y = int(point[0]), int(point[1])
            assert mask[y, x], "a positive prompt lies inside its instance"
            assert mask[int(anchor[1]), int(anchor[0])]
            cell = (int(anchor[1] // 16), int(anchor[0] // 16))
            assert example.heatmap[class_id][cell] == pytest.approx(1.0)
        assert example.heatmap.shape == (3, 18, 32) and example.heatmap.max() <= 1.0
    # Evaluation prompts at the interior point; training at random pixels of the instance.
    assert np.array_equal(evaluation.points, evaluation.anchors)
    assert not np.array_equal(training.points, training.anchors)
    for mask, negatives, labels in zip(training.masks, training.neg_points, training.neg_labels, strict=True):
        for (x, y), label in zip(negatives, labels, strict=True):
            assert label == 0 and not mask[int(y), int(x)]
    # Classes with no instance have an all-zero target.
    absent = set(range(3)) - set(evaluation.classes.tolist())
    assert all(evaluation.heatmap[c].max() == 0.0 for c in absent)


def test_interior_point_is_the_deepest_pixel() -> None:
    mask = np.zeros((40, 60), bool)
    mask[10:31, 5:56] = True  # a 21 x 51 rectangle: deepest on its middle row
    x, y = interior_point(mask)
    assert y == pytest.approx(20.5) and 15 <= x <= 46


def test_hairline_masks_survive_the_shrink() -> None:
    mask = np.zeros((1520, 2688), bool)
    mask[700, 100:2500] = True  # one pixel wide at 4 MP, 0.38 px at 1024 wide
    box = Letterbox.fit(2688, 1520, 1024, 576)
    small = resize_mask(mask, box)
    assert small.shape == (box.content_height, box.content_width)
    assert small.any(axis=0)[50:940].all()  # continuous along its length
    assert small.any(axis=1).sum() <= 2


def test_augmented_examples_keep_points_in_masks_and_collate_pads_instances() -> None:
    dataset = SyntheticDataset(3, seed=21, width=640, height=360, defect_free_prob=0.0)
    examples = [
        prepare_example(dataset[i], height=128, width=256, num_classes=3,
                        rng=np.random.default_rng(i), augment=True, negatives=2)
        for i in range(3)
    ]
    for example in examples:
        assert example.image.shape == (3, 128, 256)
        for mask, point in zip(example.masks, example.points, strict=True):
            assert mask[int(point[1]), int(point[0])]
    plain = prepare_example(dataset[0], height=128, width=256, num_classes=3)
    assert not np.array_equal(examples[0].image, plain.image)
    batch = collate([*examples, plain])
    n = max(len(e.classes) for e in [*examples, plain])
    assert batch["image"].shape == (4, 3, 128, 256)
    assert batch["masks"].shape == (4, n, 128, 256) and batch["points"].shape == (4, n, 2)
    assert batch["neg_points"].shape == (4, n, 2, 2) and batch["heatmap"].shape == (4, 3, 8, 16)
    for i, example in enumerate([*examples, plain]):
        k = len(example.classes)
        assert batch["instance_valid"][i].sum() == k
        assert (batch["classes"][i, k:] == -1).all()
        assert (batch["neg_labels"][i, k:] == -1).all()
    mask = np.zeros((1, 20, 20), bool)
    mask[0, 5:9, 5:9] = True
    odd = Sample(image=np.zeros((20, 20, 3), np.uint8), masks=mask, classes=np.array([2]), source="odd")
    with pytest.raises(DatasetError, match="odd: class index 2 but the model has 2 classes"):
        prepare_example(odd, height=128, width=256, num_classes=2)
