"""Shared fixtures: a small real bundle exported from the model family (random weights)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATASETS = REPO.parent / "shared" / "datasets"

TINY_WINDOW = 64  # the tiny bundle's window side
TINY_MAX_WINDOWS = 4
TINY_CLASSES = ("scratch", "dent", "pinhole")


@pytest.fixture(scope="session")
def tiny_bundle_master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """student_seg + finder, random weights, 64 px windows, at most 4 a frame; do not modify: copy it with
    ``tiny_bundle``."""
    pytest.importorskip("torch", reason="exporting a bundle needs the 'train' extra (torch)")
    import torch

    from training.export.onnx import export_bundle
    from training.model.build import build_finder, build_model

    torch.manual_seed(0)
    model = build_model("student_seg", num_classes=len(TINY_CLASSES))
    out = tmp_path_factory.mktemp("bundles") / "tiny"
    export_bundle(
        model, "student_seg", out, name="tiny-student", classes=TINY_CLASSES, finder=build_finder("finder"),
        finder_arch="finder", window=TINY_WINDOW, max_windows=TINY_MAX_WINDOWS,
        provenance={"weights": "untrained", "notes": "test fixture", "seed": 0},
    )
    return out


@pytest.fixture()
def tiny_bundle(tiny_bundle_master: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny bundle that a test may corrupt."""
    target = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_master, target)
    return target


@pytest.fixture(scope="session")
def dataset_images() -> list[Path]:
    """A few real defect images from ../shared/datasets (magnetic tile test split)."""
    split = DATASETS / "magnetic_tile" / "splits" / "test.txt"
    if not split.is_file():
        pytest.skip(f"real datasets not found at {DATASETS} (CI places ../shared beside the repo)")
    names = [line.strip() for line in split.read_text().splitlines() if line.strip()]
    return [DATASETS / "magnetic_tile" / name for name in names[:: max(1, len(names) // 4)][:4]]
