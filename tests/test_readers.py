"""The label formats ML engineers have (MVTec AD, COCO, YOLO segmentation) and the convert command.

Each reader on small files written here in its format, good and bad; real data through each path:
NEU-Seg converted to the folder layout and read back, a few magnetic tile images written as MVTec
and as COCO (polygons traced with cv2.findContours, and RLE) and read back against the originals.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from training.commands import convert
from training.data.coco import CocoDataset
from training.data.errors import DatasetError
from training.data.folder_writer import final_names
from training.data.magnetic_tile import MagneticTileDataset
from training.data.mask_codecs import polygon_mask, rle_counts, rle_counts_from_string, rle_counts_to_string, rle_mask
from training.data.mvtec import MvtecDataset
from training.data.neu_seg import NeuSegDataset
from training.data.registry import build_dataset, datasets_root
from training.data.sample import Sample
from training.data.yolo_seg import YoloSegDataset

from .support import run_command_module

DATASETS = datasets_root()
MAGNETIC_TILE = DATASETS / "magnetic_tile"
NEU_SEG = DATASETS / "neu_seg"
needs_magnetic_tile = pytest.mark.skipif(
    not (MAGNETIC_TILE / "splits").is_dir(), reason=f"magnetic tile set not found at {MAGNETIC_TILE}"
)
needs_neu_seg = pytest.mark.skipif(not (NEU_SEG / "labels.txt").is_file(), reason=f"NEU-Seg not found at {NEU_SEG}")


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)


def _one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text
    return text


def _raises(call: object, *parts: str) -> str:
    """Call ``call``; it must raise a one-line DatasetError containing every part (file and cause)."""
    with pytest.raises(DatasetError) as caught:
        call()  # type: ignore[operator]
    message = _one_line(caught.value)
    for part in parts:
        assert part in message, (part, message)
    return message


def _instances(sample: Sample) -> list[tuple[int, bytes]]:
    """A sample's instances as comparable (class, packed mask) pairs, sorted."""
    return sorted((int(c), np.packbits(m).tobytes()) for m, c in zip(sample.masks, sample.classes, strict=True))


def _image(h: int = 12, w: int = 16, value: int = 90) -> np.ndarray:
    rng = np.random.default_rng(value)
    return rng.integers(0, 255, (h, w, 3), dtype=np.uint8)


# -- masks from polygons and RLE (golden vectors made by pycocotools 2.0.11) ------------------------

_H, _W = 12, 16
_DISC_RLE = "m0194M2O0O20N101N3La03^O00000"  # pycocotools.mask.encode of _disc()
_TRIANGLE = [1.3, 0.7, 14.6, 3.2, 5.1, 11.4]
_TRIANGLE_RLE = "i0393M2O1NO1O1O100O2N1O1Of0"  # pycocotools.mask.frPyObjects([_TRIANGLE], 12, 16)


def _disc() -> np.ndarray:
    yy, xx = np.mgrid[:_H, :_W]
    return (((xx - 6) ** 2 + (yy - 5) ** 2) <= 16) | ((xx >= 12) & (yy >= 8))


def test_rle_and_polygons_decode_as_pycocotools_does() -> None:
    disc = _disc()
    assert np.array_equal(rle_mask(_DISC_RLE, _H, _W), disc) and int(disc.sum()) == 65
    assert rle_counts_to_string(rle_counts(disc)) == _DISC_RLE
    assert np.array_equal(rle_mask(rle_counts(disc), _H, _W), disc)  # uncompressed counts
    assert rle_counts_from_string(rle_counts_to_string([0, 5, 300, 2, 7])) == [0, 5, 300, 2, 7]
    triangle = polygon_mask([_TRIANGLE], _H, _W)
    assert np.array_equal(triangle, rle_mask(_TRIANGLE_RLE, _H, _W)) and int(triangle.sum()) == 64
    square = polygon_mask([[2, 2, 8, 2, 8, 6, 2, 6]], _H, _W)  # pixel i covers [i, i+1)
    expected = np.zeros((_H, _W), bool)
    expected[2:6, 2:8] = True
    assert np.array_equal(square, expected)


# -- mvtec ------------------------------------------------------------------------------------------


def _mvtec(root: Path) -> Path:
    _png(root / "train" / "good" / "000.png", _image(value=1))
    _png(root / "test" / "good" / "000.png", _image(value=2))
    _png(root / "test" / "crack" / "000.png", _image(value=3))
    _png(root / "test" / "scratch" / "000.png", _image(value=4))
    crack = np.zeros((12, 16), np.uint8)
    crack[1:3, 1:4] = 255
    crack[8:10, 10:15] = 1  # any value > 0 is foreground
    _png(root / "ground_truth" / "crack" / "000_mask.png", crack)
    scratch = np.zeros((12, 16), np.uint8)
    scratch[5, 2:12] = 255
    _png(root / "ground_truth" / "scratch" / "000_mask.png", scratch)
    return root


def test_mvtec_reads_good_images_as_negatives_and_defect_types_as_classes(tmp_path: Path) -> None:
    root = _mvtec(tmp_path / "bottle")
    test = build_dataset(f"mvtec:test,root={root}")
    assert tuple(test.class_names) == ("crack", "scratch") and len(test) == 3
    by_folder = {Path(test[i].source).parent.name: test[i] for i in range(len(test))}
    assert len(by_folder["good"].masks) == 0
    crack = by_folder["crack"]
    assert crack.classes.tolist() == [0, 0] and sorted(int(m.sum()) for m in crack.masks) == [6, 10]
    assert by_folder["scratch"].classes.tolist() == [1]
    train = build_dataset({"name": "mvtec", "root": str(root), "split": "train"})
    assert len(train) == 1 and tuple(train.class_names) == ("crack", "scratch") and len(train[0].masks) == 0


def test_mvtec_bad_input_names_the_file_and_the_cause(tmp_path: Path) -> None:
    root = _mvtec(tmp_path / "bottle")
    (root / "ground_truth" / "scratch" / "000_mask.png").unlink()
    dataset = MvtecDataset(root, "test")
    index = next(i for i, (rel, _) in enumerate(dataset.items) if "scratch" in rel)
    _raises(lambda: dataset[index], str(root / "ground_truth" / "scratch" / "000_mask.png"), "mask of", "missing")
    _png(root / "ground_truth" / "scratch" / "000_mask.png", np.zeros((12, 15), np.uint8))
    _raises(lambda: dataset[index], "000_mask.png", "mask is 15x12 but its image 000.png is 16x12")
    (root / "test" / "crack" / "000.png").write_bytes(b"not a png")
    crack = next(i for i, (rel, _) in enumerate(dataset.items) if "crack" in rel)
    _raises(lambda: dataset[crack], str(root / "test" / "crack" / "000.png"), "not an image OpenCV can decode")
    (root / "train" / "good" / "000.png").unlink()
    _raises(lambda: MvtecDataset(root, "train"), str(root / "train"), "holds no images")
    _raises(lambda: MvtecDataset(root, "val"), str(root / "val"), "split 'val' is missing")
    _raises(lambda: MvtecDataset(tmp_path, "test"), str(tmp_path), "no defect types", "give one category as root")


# -- coco -------------------------------------------------------------------------------------------


def _coco(root: Path, annotations: list[dict] | None = None) -> Path:
    """A CVAT-like export: annotations/instances_default.json + images/."""
    _png(root / "images" / "a.png", _image(value=5))
    _png(root / "images" / "b.png", _image(value=6))
    _png(root / "images" / "c.png", _image(value=7))
    if annotations is None:
        annotations = [
            {"id": 1, "image_id": 1, "category_id": 1, "segmentation": [[2, 2, 8, 2, 8, 6, 2, 6]], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 2, "iscrowd": 1,
             "segmentation": {"size": [_H, _W], "counts": rle_counts(_disc())}},  # overlaps 1: kept apart
            {"id": 3, "image_id": 2, "category_id": 2, "segmentation": {"size": [_H, _W], "counts": _DISC_RLE}},
            {"id": 4, "image_id": 2, "category_id": 1, "segmentation": [_TRIANGLE, [12, 0, 15, 0, 15, 2]]},
        ]
    raw = {
        "images": [{"id": i, "file_name": n, "width": _W, "height": _H} for i, n in ((1, "a.png"), (2, "b.png"),
                                                                                   (3, "c.png"))],
        "categories": [{"id": 0, "name": "defects", "supercategory": "none"},  # Roboflow's project entry
                       {"id": 1, "name": "scratch", "supercategory": "defects"},
                       {"id": 2, "name": "dent", "supercategory": "defects"}],
        "annotations": annotations,
    }
    path = root / "annotations" / "instances_default.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(raw))
    return path


def test_coco_reads_polygons_and_both_rles_as_separate_instances(tmp_path: Path) -> None:
    _coco(tmp_path / "export")
    dataset = build_dataset(f"coco,root={tmp_path / 'export'}")  # the folder: annotations/instances_default.json
    assert tuple(dataset.class_names) == ("scratch", "dent") and len(dataset) == 3
    a, b, c = dataset[0], dataset[1], dataset[2]
    assert a.classes.tolist() == [0, 1] and (a.masks[0] & a.masks[1]).any()  # overlapping, not merged
    assert np.array_equal(a.masks[1], _disc()) and int(a.masks[0].sum()) == 24
    assert np.array_equal(b.masks[0], _disc())  # compressed RLE: exact
    triangle_and_corner = rle_mask(_TRIANGLE_RLE, _H, _W) | polygon_mask([[12, 0, 15, 0, 15, 2]], _H, _W)
    assert b.classes.tolist() == [1, 0] and np.array_equal(b.masks[1], triangle_and_corner)
    assert len(c.masks) == 0 and Path(c.source) == tmp_path / "export" / "images" / "c.png"
    # a split in a folder root: annotations/instances_SPLIT.json
    (tmp_path / "export" / "annotations" / "instances_default.json").rename(
        tmp_path / "export" / "annotations" / "instances_val.json")
    assert len(build_dataset(f"coco:val,root={tmp_path / 'export'}")) == 3


def test_coco_bad_input_names_the_file_and_the_cause(tmp_path: Path) -> None:
    def bad(annotation: dict, *parts: str) -> None:
        path = _coco(tmp_path / "x", [{"id": 9, "image_id": 1, "category_id": 1, **annotation}])
        _raises(lambda: CocoDataset(path)[0], str(path), *parts)

    bad({"category_id": 7}, "annotations[0] (id 9)", "unknown category id 7", "the categories are 1, 2")
    bad({"segmentation": [[1, 1, 5, 1, 5]]}, "odd number of coordinates (5)")
    bad({"segmentation": [[1, 1, 5, 1]]}, "2 point(s)")
    bad({"segmentation": {"size": [_H, _W + 1], "counts": "00"}}, "a.png", "RLE size [12, 17]")
    bad({"segmentation": {"size": [_H, _W], "counts": [5, 6]}}, "RLE runs cover 11 pixels")
    bad({"bbox": [1, 1, 3, 3]}, "has no segmentation")
    bad({"image_id": 42}, "image_id 42 is not among the images")
    path = _coco(tmp_path / "y")
    (tmp_path / "y" / "images" / "b.png").unlink()
    _raises(lambda: CocoDataset(path), str(path), "image 'b.png' not found", "images=DIR")
    (tmp_path / "y" / "images" / "b.png").write_bytes(b"\x89PNG garbage")
    _raises(lambda: CocoDataset(path)[1], str(tmp_path / "y" / "images" / "b.png"), "not an image OpenCV can decode")
    path.write_text('{"images": [}')
    _raises(lambda: CocoDataset(path), str(path), "is not valid JSON (line 1")
    _raises(lambda: CocoDataset(tmp_path / "nothing"), str(tmp_path / "nothing"), "does not exist")
    (tmp_path / "z").mkdir()
    _raises(lambda: CocoDataset(tmp_path / "z", "train"), "no COCO file found", "annotations/instances_train.json")


# -- yolo-seg ---------------------------------------------------------------------------------------


def _yolo(root: Path) -> Path:
    """Ultralytics layout: data.yaml, images/{train,val}, labels/{train,val}."""
    _png(root / "images" / "train" / "a.png", _image(10, 20, value=8))
    _png(root / "images" / "train" / "b.png", _image(10, 20, value=9))  # no label file: background
    _png(root / "images" / "val" / "c.png", _image(10, 20, value=10))
    (root / "labels" / "train").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    (root / "labels" / "train" / "a.txt").write_text(
        "1 0.1 0.2 0.5 0.2 0.5 0.8 0.1 0.8\n\n0 0.0 0.0 1.0 0.0 1.0 0.1\n"
    )
    (root / "labels" / "val" / "c.txt").write_text("")
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames:\n  0: crack\n  1: dent\n")
    return root / "data.yaml"


def test_yolo_seg_reads_normalised_polygons_per_split(tmp_path: Path) -> None:
    _yolo(tmp_path / "ds")
    train = build_dataset(f"yolo-seg:train,root={tmp_path / 'ds'}")
    assert tuple(train.class_names) == ("crack", "dent") and len(train) == 2
    a, b = train[0], train[1]
    expected = np.zeros((10, 20), bool)
    expected[2:8, 2:10] = True  # (0.1..0.5) x 20 px, (0.2..0.8) x 10 px
    assert a.classes.tolist() == [1, 0] and np.array_equal(a.masks[0], expected)
    assert a.masks[1][0].any() and not a.masks[1][5:].any()
    assert len(b.masks) == 0
    assert len(build_dataset(f"yolo-seg,root={tmp_path / 'ds' / 'data.yaml'}")) == 3  # no split: every split
    # Roboflow's export: train/images + train/labels, a names list, paths written ../train/images
    rf = tmp_path / "rf"
    _png(rf / "train" / "images" / "a.jpg", _image(10, 20, value=11))
    (rf / "train" / "labels").mkdir(parents=True)
    (rf / "train" / "labels" / "a.txt").write_text("0 0.1 0.2 0.5 0.2 0.5 0.8 0.1 0.8\n")
    (rf / "data.yaml").write_text("train: ../train/images\nval: ../valid/images\nnc: 1\nnames: ['crack']\n")
    roboflow = build_dataset(f"yolo-seg:train,root={rf}")
    assert tuple(roboflow.class_names) == ("crack",) and np.array_equal(roboflow[0].masks[0], expected)


def test_yolo_seg_bad_input_names_the_file_and_the_cause(tmp_path: Path) -> None:
    data = _yolo(tmp_path / "ds")
    labels = tmp_path / "ds" / "labels" / "train" / "a.txt"
    for text, parts in [
        ("0 0.1 0.2 0.5 0.2 0.5\n", ("line 1", "odd number of coordinates (5)")),
        ("\n1 0.1 0.2 1.2 0.2 0.5 0.8\n", ("line 2", "coordinate 1.2 is outside [0, 1]")),
        ("2 0.1 0.2 0.5 0.2 0.5 0.8\n", ("line 1", "class 2 but the dataset YAML names 2")),
        ("0 0.5 0.5 0.2 0.2\n", ("line 1", "detection box, not a polygon")),
        ("x 0.1 0.2 0.5 0.2 0.5 0.8\n", ("line 1", "class 'x' is not an integer")),
    ]:
        labels.write_text(text)
        _raises(lambda: YoloSegDataset(data, "train")[0], str(labels), *parts)
    _raises(lambda: YoloSegDataset(data, "test"), str(data), "names no split 'test'", "train, val")
    (tmp_path / "ds" / "images" / "train" / "a.png").write_bytes(b"")
    _raises(lambda: YoloSegDataset(data, "train")[0], "a.png", "image file is empty")
    for path in (tmp_path / "ds" / "images" / "val").iterdir():
        path.unlink()
    _raises(lambda: YoloSegDataset(data, "val"), str(tmp_path / "ds" / "images" / "val"), "holds no images")
    shutil.rmtree(tmp_path / "ds" / "labels" / "val")
    _raises(lambda: YoloSegDataset(data, "val"), str(tmp_path / "ds" / "labels" / "val"), "labels folder")
    data.write_text("train: images/train\n")
    _raises(lambda: YoloSegDataset(data, "train"), str(data), "names: missing")
    data.write_text("train: images/train\nnames: {0: a, 2: b}\n")
    _raises(lambda: YoloSegDataset(data, "train"), str(data), "the keys must be the class indices 0..1")


# -- convert ----------------------------------------------------------------------------------------


def test_convert_writes_the_folder_layout_that_reads_back_the_same_samples(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _coco(tmp_path / "export")
    out = tmp_path / "out"
    spec = f"coco,root={tmp_path / 'export'}"
    code, stdout, _ = run_command_module(convert, ["convert", "--data", spec, "--out", str(out)], capsys)
    assert code == 0 and "wrote 3 image(s)" in stdout and "2 with per-instance masks" in stdout
    assert (out / "classes.txt").read_text().split() == ["scratch", "dent"]
    assert (out / "masks" / "a").is_dir() and (out / "masks" / "c.png").is_file()  # overlap -> per-instance
    source, copy = build_dataset(spec), build_dataset(f"folder,root={out}")
    assert len(copy) == 3 and tuple(copy.class_names) == ("scratch", "dent")
    for index in range(3):
        assert np.array_equal(copy[index].image, source[index].image)
        assert _instances(copy[index]) == _instances(source[index])
    # a non-empty --out is refused, kept as it was; --force replaces it
    (out / "keep.txt").write_text("mine")
    code, _, err = run_command_module(convert, ["convert", "--data", spec, "--out", str(out)], capsys)
    assert code == 2 and err.count("\n") == 1 and "is not empty; give --force" in err
    assert (out / "keep.txt").exists()
    code, _, _ = run_command_module(convert, ["convert", "--data", spec, "--out", str(out), "--force"], capsys)
    assert code == 0 and not (out / "keep.txt").exists()
    # a sample that cannot be read: one line, nothing written, no temporary folder left
    (tmp_path / "export" / "images" / "c.png").write_bytes(b"broken")
    code, _, err = run_command_module(convert, ["convert", "--data", spec, "--out", str(tmp_path / "new")], capsys)
    assert code == 2 and "c.png" in err and "not an image" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "out"]
    # the folder being converted is not replaced
    code, _, err = run_command_module(
        convert, ["convert", "--data", f"folder,root={out}", "--out", str(out), "--force"], capsys
    )
    assert code == 2 and "which is being converted" in err and (out / "classes.txt").exists()


def test_convert_is_a_defectsam_train_command_and_names_are_unique(tmp_path: Path) -> None:
    from training.cli import main

    assert main(["convert", "--data", "mvtec", "--out", str(tmp_path / "o")]) == 2  # root missing: exit 2
    for name in ("d/a.jpg", "d/a.png", "d/a/b.png", "d/e/c.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    sources = [str(tmp_path / n) for n in ("d/a.jpg", "d/a.png", "d/a/b.png", "d/e/c.png")] + ["synthetic:7"] * 2
    # a.jpg and a.png would share masks/a.png, and masks/a/ is the folder of a/b.png: each gets its own name
    assert final_names(sources, [".jpg", ".png", ".png", ".png", ".png", ".png"]) == [
        "a_2.jpg", "a_3.png", "a/b.png", "e/c.png", "synthetic_7.png", "synthetic_7_2.png"
    ]


@needs_neu_seg
def test_neu_seg_converted_reads_back_through_folder_with_its_label_images(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "neu"
    code, stdout, _ = run_command_module(convert, ["convert", "--data", "neu_seg:test,limit=30", "--out", str(out)],
                                         capsys)
    assert code == 0 and "splits/test.txt 30" in stdout
    original = build_dataset("neu_seg:test,limit=30")
    folder = build_dataset(f"folder,root={out},split=test")
    assert len(folder) == 30 and tuple(folder.class_names) == ("Inclusions", "Patches", "Scratches")
    for index in range(30):
        read, truth = folder[index], original[index]
        assert Path(read.source).name == Path(truth.source).name  # the .jpg bytes are copied
        assert np.array_equal(read.image, truth.image) and _instances(read) == _instances(truth)
    for index in (0, 17, 29):  # against NEU-Seg's own label PNGs
        name = Path(folder[index].source).with_suffix(".png").name
        label = cv2.imread(str(NEU_SEG / "ann_dir" / "test" / name), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(cv2.imread(str(out / "masks" / name), cv2.IMREAD_UNCHANGED), label)
    assert len(NeuSegDataset(NEU_SEG, "test")) == 447  # read in place, untouched


def _magnetic_tile_subset() -> list[tuple[int, Sample]]:
    """A handful of magnetic tile test images: two of each defect class and three defect-free ones."""
    dataset = MagneticTileDataset(MAGNETIC_TILE, "test")
    picked: dict[str, list[int]] = {}
    for index, name in enumerate(dataset.names):
        folder = name.split("/")[0].removeprefix("MT_")
        if len(picked.setdefault(folder, [])) < (3 if folder == "Free" else 2):
            picked[folder].append(index)
    return [(i, dataset[i]) for indices in picked.values() for i in indices]


@needs_magnetic_tile
def test_magnetic_tile_as_mvtec_and_as_coco_reads_back_the_original_masks(tmp_path: Path) -> None:
    subset = _magnetic_tile_subset()
    classes = MagneticTileDataset.class_names
    mvtec = tmp_path / "tile"
    coco: dict[str, list] = {"images": [], "annotations": [], "categories": [
        {"id": k + 1, "name": name} for k, name in enumerate(classes)]}
    free = 0
    for number, (_, sample) in enumerate(subset):
        h, w = sample.image.shape[:2]
        if len(sample.masks) == 0:
            _png(mvtec / ("train" if free < 2 else "test") / "good" / f"{number:03d}.png", sample.image)
            free += 1
        else:
            folder = classes[int(sample.classes[0])]
            _png(mvtec / "test" / folder / f"{number:03d}.png", sample.image)
            _png(mvtec / "ground_truth" / folder / f"{number:03d}_mask.png",
                 sample.masks.any(axis=0).astype(np.uint8) * 255)
        _png(tmp_path / "coco" / "images" / f"{number:03d}.png", sample.image)
        coco["images"].append({"id": number, "file_name": f"{number:03d}.png", "width": w, "height": h})
        for k, (mask, class_id) in enumerate(zip(sample.masks, sample.classes, strict=True)):
            if number % 2:  # polygons: the mask's outline traced at 2x, on the pixels' edges
                up = cv2.resize(mask.astype(np.uint8), None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
                contours, _ = cv2.findContours(up, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
                segmentation: object = [((c.reshape(-1, 2) + 0.5) / 2).reshape(-1).tolist() for c in contours
                                        if len(c) >= 3]
            elif k % 2:
                segmentation = {"size": [h, w], "counts": rle_counts(mask)}
            else:
                segmentation = {"size": [h, w], "counts": rle_counts_to_string(rle_counts(mask))}
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": number,
                                        "category_id": int(class_id) + 1, "segmentation": segmentation})
    (tmp_path / "coco" / "result.json").write_text(json.dumps(coco))  # Label Studio's name

    test = build_dataset(f"mvtec:test,root={mvtec}")
    assert tuple(test.class_names) == tuple(classes) and len(test) == len(subset) - 2
    by_number = {int(Path(s.source).stem): s for s in (test[i] for i in range(len(test)))}
    for number, (_, original) in enumerate(subset):
        if number in by_number:
            assert _instances(by_number[number]) == _instances(original)  # exact: components of the mask
            assert np.array_equal(by_number[number].image, original.image)
    assert len(build_dataset(f"mvtec:train,root={mvtec}")) == 2

    read = build_dataset(f"coco,root={tmp_path / 'coco'}")
    assert tuple(read.class_names) == tuple(classes) and len(read) == len(subset)
    ious = []
    for number, (_, original) in enumerate(subset):
        sample = read[number]
        assert np.array_equal(sample.image, original.image) and sample.classes.tolist() == original.classes.tolist()
        for got, truth in zip(sample.masks, original.masks, strict=True):
            if number % 2:
                ious.append(float((got & truth).sum() / (got | truth).sum()))
            else:
                assert np.array_equal(got, truth)  # RLE: exact
    assert ious and min(ious) >= 0.95, ious
