"""Dataset readers, specs, the synth command, training windows and the 4 MP frame sets, on real data where it exists."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from engines.contract import CELL_STRIDE
from engines.find import find_geometry, reduce_grey, to_grey
from engines.preprocess import WindowCutter
from engines.synthetic import GENERATOR_VERSION, render_frame
from engines.windows import Window
from tests.conftest import DATASETS
from training.data.errors import DatasetError
from training.data.folder import FolderDataset
from training.data.magnetic_tile import MagneticTileDataset
from training.data.neu_seg import NeuSegDataset
from training.data.registry import MergedDataset, build_dataset, build_find_dataset, parse_spec
from training.data.sample import IGNORE_LABEL, Sample, interior_point, label_map
from training.data.synthetic import SyntheticDataset
from training.data.synthetic_frames import (
    CACHE_ENV,
    FrameSet,
    FrameSetParams,
    SyntheticWindowsDataset,
    build_frame_set,
    find_cells_shape,
)

from .support import run_command_module

torch = pytest.importorskip("torch", reason="training windows are torch datasets (the 'train' extra)")

from training.data.windows import WindowDataset, collate_windows, orient, segment_spec  # noqa: E402

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
def test_magnetic_tile_free_limit_keeps_every_defective_image_and_some_free_ones() -> None:
    lines = _split_lines("train")
    defective = [n for n in lines if not n.startswith("MT_Free/")]
    kept = build_dataset("magnetic_tile:train,free_limit=80")
    assert len(kept) == len(defective) + 80
    names = [kept[i].source for i in range(len(kept))]
    assert sum("MT_Free" in n for n in names) == 80
    assert len(build_dataset("magnetic_tile:train,free_limit=0")) == len(defective)
    assert len(build_dataset("magnetic_tile:train,free_limit=100000")) == len(lines)  # more than there are: all


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
            assert np.array_equal(union, mask >= 128)  # every foreground pixel, nothing else (min area 1)
            seen_defects += int(len(sample.masks) > 0)
    assert seen_defects and seen_free


@needs_neu_seg
def test_neu_seg_split_sizes_three_classes_and_every_labelled_pixel() -> None:
    sizes = {split: len(NeuSegDataset(NEU_SEG, split)) for split in ("train", "val", "test")}
    assert sizes == {"train": 3129, "val": 894, "test": 447}
    dataset = build_dataset("neu_seg:test")
    assert tuple(dataset.class_names) == ("Inclusions", "Patches", "Scratches")  # labels.txt's "others" dropped
    for index in (0, 100, 446):
        sample = dataset[index]
        name = Path(sample.source).with_suffix(".png").name
        label = cv2.imread(str(NEU_SEG / "ann_dir" / "test" / name), cv2.IMREAD_UNCHANGED)
        assert sample.image.shape == (200, 200, 3) and sample.masks.shape[1:] == (200, 200)
        assert len(sample.masks) > 0
        for mask, class_id in zip(sample.masks, sample.classes, strict=True):
            assert (label[mask] == class_id + 1).all()  # value v is class v-1
        np.testing.assert_array_equal(label_map(sample), label)  # instances cover every labelled pixel


@needs_neu_seg
def test_a_neu_seg_label_of_the_unused_class_is_an_error_naming_the_file(tmp_path: Path) -> None:
    root = tmp_path / "neu"
    name = sorted((NEU_SEG / "img_dir" / "test").iterdir())[0].name
    for sub in ("img_dir", "ann_dir"):
        (root / sub / "test").mkdir(parents=True)
    shutil.copy(NEU_SEG / "labels.txt", root / "labels.txt")
    shutil.copy(NEU_SEG / "img_dir" / "test" / name, root / "img_dir" / "test" / name)
    label = cv2.imread(str(NEU_SEG / "ann_dir" / "test" / Path(name).with_suffix(".png")), cv2.IMREAD_UNCHANGED)
    label[:3, :3] = 4  # "others"
    mask_path = root / "ann_dir" / "test" / Path(name).with_suffix(".png")
    cv2.imwrite(str(mask_path), label)
    with pytest.raises(DatasetError) as caught:
        NeuSegDataset(root, "test")[0]
    message = _one_line(caught.value)
    assert str(mask_path) in message and "label value 4 but the reader knows 3 classes" in message


@needs_magnetic_tile
@needs_neu_seg
def test_merged_datasets_share_one_class_list() -> None:
    merged = build_dataset("neu_seg:test,limit=3+synthetic,n=2,width=256,height=144+magnetic_tile:test,limit=3")
    assert isinstance(merged, MergedDataset)
    assert len(merged) == 8
    assert list(merged.class_names) == [
        "Inclusions", "Patches", "Scratches", "scratch", "dent", "pinhole",
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
        ("synthetic_windows,window=100", "key 'window'"),
        ("synthetic_windows,per_frame=0", "key 'per_frame'"),
        ("synthetic_find,frames=1", "is the finder's data"),
        (str(tmp_path / "missing.yaml"), "cannot be read"),
    ]:
        with pytest.raises(DatasetError, match=pattern) as caught:
            build_dataset(spec)
        _one_line(caught.value)
    assert parse_spec("folder,root=/data/x,split=7+synthetic:val,n=3") == [
        {"name": "folder", "root": "/data/x", "split": "7"},
        {"name": "synthetic", "split": "val", "n": 3},
    ]


# -- samples, the synthetic reader and the synth command -----------------------------------------


def test_label_map_and_interior_point() -> None:
    masks = np.zeros((2, 40, 60), bool)
    masks[0, 10:31, 5:56] = True  # a 21 x 51 rectangle: deepest on its middle row
    masks[1, 0:2, 0:2] = True
    sample = Sample(image=np.zeros((40, 60, 3), np.uint8), masks=masks, classes=np.array([2, 0]), source="s")
    labels = label_map(sample)
    assert labels.dtype == np.uint8 and int(labels[20, 30]) == 3 and int(labels[0, 0]) == 1
    assert int((labels == 3).sum()) == 21 * 51 and int((labels == 0).sum()) == 40 * 60 - 21 * 51 - 4
    x, y = interior_point(masks[0])
    assert y == pytest.approx(20.5) and 15 <= x <= 46
    with pytest.raises(ValueError, match="empty mask"):
        interior_point(np.zeros((4, 4), bool))
    with pytest.raises(ValueError, match="1 sizes for 2 instances"):
        Sample(image=sample.image, masks=masks, classes=sample.classes, source="s", sizes=np.array([1.0]))


def test_synthetic_reader_is_deterministic_by_index_and_seed_and_keeps_sizes() -> None:
    a, b = SyntheticDataset(4, seed=5, width=320, height=180), SyntheticDataset(4, seed=5, width=320, height=180)
    first, again = a[2], b[2]
    assert first.source == "synthetic:7"
    assert np.array_equal(first.image, again.image) and np.array_equal(first.masks, again.masks)
    assert not np.array_equal(a[1].image, first.image)
    assert first.image.shape == (180, 320, 3) and tuple(a.class_names) == ("scratch", "dent", "pinhole")
    frame = render_frame(7, 320, 180, pixel_scale=a.pixel_scale)
    assert first.sizes is not None and np.array_equal(first.sizes, frame.sizes)
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


# -- training windows ------------------------------------------------------------------------------


def _sample(height: int = 100, width: int = 132, seed: int = 0) -> Sample:
    rng = np.random.default_rng(seed)
    masks = np.zeros((2, height, width), bool)
    masks[0, 20:24, 30:90] = True  # a scratch
    masks[1, 60:70, 100:110] = True  # a pinhole
    return Sample(image=rng.integers(0, 256, (height, width, 3), dtype=np.uint8), masks=masks,
                  classes=np.array([0, 2]), source=f"test:{seed}")


class _Samples:
    class_names = ("scratch", "dent", "pinhole")

    def __init__(self, samples: list[Sample]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return self.samples[index]


def test_evaluation_windows_are_the_whole_sample_normalised_as_the_runtime_cuts_it() -> None:
    sample = _sample()
    (example,) = [WindowDataset(_Samples([sample]), window=64, train=False)[0]]
    assert example.image.shape == (3, 112, 144) and example.image.dtype == np.float32  # padded to multiples of 16
    assert example.label.shape == (112, 144) and example.label.dtype == np.int64
    padded = np.pad(sample.image, ((0, 12), (0, 12), (0, 0)), mode="edge")
    runtime = WindowCutter(segment_spec(64))(padded, [Window(0, 0, 144, 112)])[0]
    np.testing.assert_array_equal(example.image, runtime)  # bit for bit what engines.preprocess makes
    np.testing.assert_array_equal(example.label[:100, :132], label_map(sample))
    assert (example.label[100:] == IGNORE_LABEL).all() and (example.label[:, 132:] == IGNORE_LABEL).all()
    assert example.source == "test:0" and example.index == 0


def test_training_windows_are_crops_on_the_16_pixel_grid_drawn_per_epoch() -> None:
    samples = _Samples([_sample(160, 160, seed) for seed in range(6)])
    dataset = WindowDataset(samples, window=64, train=True, augment=False, positive_fraction=1.0, seed=3)
    for i in range(len(samples)):
        example = dataset[i]
        crop = example.crop
        assert example.image.shape == (3, 64, 64) and example.label.shape == (64, 64)
        assert crop.size == 64 and crop.x % 16 == 0 and crop.y % 16 == 0
        assert crop.x + 64 <= 160 and crop.y + 64 <= 160
        assert not crop.flip and crop.turns == 0
        source = samples[i]
        np.testing.assert_array_equal(example.label, label_map(source)[crop.y : crop.y + 64, crop.x : crop.x + 64])
        window = Window(crop.x, crop.y, 64, 64)
        np.testing.assert_array_equal(example.image, WindowCutter(segment_spec(64))(source.image, [window])[0])
        assert (example.label > 0).any(), "positive_fraction 1: every crop holds a defect"
    again = WindowDataset(samples, window=64, train=True, augment=False, positive_fraction=1.0, seed=3)
    assert [again[i].crop for i in range(6)] == [dataset[i].crop for i in range(6)]  # the same on any worker
    dataset.set_epoch(1)
    assert [dataset[i].crop for i in range(6)] != [again[i].crop for i in range(6)]  # another epoch, other crops


def test_augmented_windows_turn_image_and_labels_together_and_collate() -> None:
    samples = _Samples([_sample(160, 160, seed) for seed in range(8)])
    dataset = WindowDataset(samples, window=64, train=True, augment=True, positive_fraction=0.5, seed=0)
    examples = [dataset[i] for i in range(8)]
    assert any(e.crop.flip or e.crop.turns for e in examples)
    for example, source in zip(examples, samples.samples, strict=True):
        crop = example.crop
        labels = label_map(source)[crop.y : crop.y + 64, crop.x : crop.x + 64]
        np.testing.assert_array_equal(example.label, orient(labels, crop))
    batch = collate_windows(examples)
    assert batch["image"].shape == (8, 3, 64, 64) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (8, 64, 64) and batch["label"].dtype == torch.int64
    assert batch["index"].tolist() == list(range(8))
    with pytest.raises(ValueError, match="at least one example"):
        collate_windows([])


def test_a_sample_smaller_than_the_window_is_padded_with_ignored_labels() -> None:
    small = _Samples([_sample(40, 50)])
    small.samples[0].masks[:] = False
    small.samples[0].masks[0, 5:10, 5:10] = True
    example = WindowDataset(small, window=64, train=True, augment=False)[0]
    assert example.image.shape == (3, 64, 64) and (example.crop.x, example.crop.y) == (0, 0)
    assert (example.label[40:] == IGNORE_LABEL).all() and (example.label[:, 50:] == IGNORE_LABEL).all()
    assert (example.label[:40, :50] != IGNORE_LABEL).all()


def test_windows_refuse_a_bad_window_and_classes_beyond_the_model() -> None:
    with pytest.raises(ValueError, match="window must be a positive multiple of 16, got 100"):
        WindowDataset(_Samples([_sample()]), window=100)
    narrow = WindowDataset(_Samples([_sample()]), window=64, num_classes=2)
    with pytest.raises(DatasetError) as caught:
        narrow[0]
    assert "test:0: class index 2 but the model has 2 classes" in _one_line(caught.value)


# -- 4 MP frame sets: 1:1 windows and find inputs -------------------------------------------------


PARAMS = FrameSetParams(frames=2, seed=41, per_frame=4, window=64, defect_free_prob=0.0)


@pytest.fixture(scope="module")
def frame_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two 4 MP frames rendered into a frame set, in this process (workers=1)."""
    return build_frame_set(PARAMS, tmp_path_factory.mktemp("cache"), workers=1)


def test_a_frame_set_holds_1_to_1_windows_and_the_runtimes_find_input(frame_set: Path) -> None:
    index = json.loads((frame_set / "index.json").read_text())
    assert index["generator"] == GENERATOR_VERSION and index["params"]["frames"] == 2
    assert frame_set.name == PARAMS.key() and PARAMS.key().startswith("frames2-seed41-w64x4-r4-")
    frames = FrameSet(frame_set)
    windows, labels, origins = frames.array("windows"), frames.array("labels"), frames.array("origins")
    assert windows.shape == (8, 64, 64, 3) and labels.shape == (8, 64, 64) and origins.shape == (8, 2)
    geometry = find_geometry(2688, 1520, 4)
    assert frames.array("find").shape == (2, 3, 380, 672)
    assert frames.array("cells").shape == (2, *geometry.cells) == (2, *find_cells_shape(4))
    for f in range(2):
        rendered = render_frame(41 + f, defect_free_prob=0.0)
        truth = np.zeros((1520, 2688), np.uint8)
        for mask, class_id in zip(rendered.masks, rendered.classes, strict=True):
            truth[mask] = class_id + 1
        for j in range(4):
            x, y = (int(v) for v in origins[f * 4 + j])
            np.testing.assert_array_equal(windows[f * 4 + j], rendered.image[y : y + 64, x : x + 64])
            np.testing.assert_array_equal(labels[f * 4 + j], truth[y : y + 64, x : x + 64])
        # One window on each of up to per_frame - 2 defects: the frame's defects are seen.
        assert (labels[f * 4 : f * 4 + 4] > 0).any()
        np.testing.assert_array_equal(frames.array("find")[f], reduce_grey(to_grey(rendered.image), 4))
        cell = CELL_STRIDE * 4
        padded = np.zeros((48 * cell, 84 * cell), bool)
        padded[:1520, :2688] = truth > 0
        np.testing.assert_array_equal(frames.array("cells")[f], padded.reshape(48, cell, 84, cell).any(axis=(1, 3)))


def test_a_frame_set_is_rendered_once_and_a_changed_one_anew(frame_set: Path) -> None:
    stamp = (frame_set / "windows.npy").stat().st_mtime_ns
    assert build_frame_set(PARAMS, frame_set.parent, workers=1) == frame_set
    assert (frame_set / "windows.npy").stat().st_mtime_ns == stamp
    other = FrameSetParams(frames=2, seed=42, per_frame=4, window=64, defect_free_prob=0.0)
    assert other.key() != PARAMS.key()
    assert FrameSetParams(**PARAMS.__dict__).key() == PARAMS.key()
    assert not [p for p in frame_set.parent.iterdir() if ".tmp" in p.name], "no staging left behind"


def test_synthetic_windows_spec_reads_the_cached_windows_as_samples(
    frame_set: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CACHE_ENV, str(frame_set.parent))
    dataset = build_dataset({"name": "synthetic_windows", "frames": 2, "seed": 41, "per_frame": 4, "window": 64,
                             "defect_free_prob": 0.0, "workers": 1})
    assert isinstance(dataset, SyntheticWindowsDataset) and len(dataset) == 8
    assert tuple(dataset.class_names) == ("scratch", "dent", "pinhole")
    frames = FrameSet(frame_set)
    for i in (0, 5):
        sample = dataset[i]
        assert sample.source == f"synthetic:{41 + i // 4}:w{i % 4}"
        np.testing.assert_array_equal(sample.image, frames.array("windows")[i])
        np.testing.assert_array_equal(label_map(sample), frames.array("labels")[i])
    with pytest.raises(IndexError):
        dataset[8]


def test_an_unreadable_frame_cache_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "index.json").write_text("{")
    with pytest.raises(DatasetError) as caught:
        FrameSet(tmp_path / "broken")
    message = _one_line(caught.value)
    assert str(tmp_path / "broken") in message and "delete it to render again" in message


def test_the_finder_reads_the_frames_reduced_with_their_cell_targets(
    frame_set: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engines.bundle import FindSpec
    from engines.contract import FIND_MEAN, FIND_STD
    from engines.find import FindPreprocessor

    monkeypatch.setenv(CACHE_ENV, str(frame_set.parent))
    spec = {"name": "synthetic_find", "frames": 2, "seed": 41, "per_frame": 4, "window": 64, "defect_free_prob": 0.0,
            "workers": 1}
    whole = build_find_dataset([spec], crop=None, train=False)
    assert len(whole) == 2
    example = whole[1]
    frames = FrameSet(frame_set)
    pre = FindPreprocessor(FindSpec(arch="x", reduction=4, mean=FIND_MEAN, std=FIND_STD, parameters=0))
    geometry = find_geometry(2688, 1520, 4)
    np.testing.assert_array_equal(example.image, pre.normalise(np.asarray(frames.array("find")[1]), geometry)[0])
    assert example.image.shape == (3, 384, 672) and example.cells.shape == (1, 48, 84)
    np.testing.assert_array_equal(example.cells[0], frames.array("cells")[1])
    crops = build_find_dataset([spec], crop=64, train=True, seed=1)
    first, again = crops[0], crops[0]
    assert first.image.shape == (3, 64, 64) and first.cells.shape == (1, 8, 8)
    np.testing.assert_array_equal(first.image, again.image)
    with pytest.raises(DatasetError, match="a finder trains on synthetic_find frame sets"):
        build_find_dataset([{"name": "synthetic", "n": 1}], crop=None, train=False)
