"""``defectsam infer --mode``: how the inspection modes meet images of every size, as a user runs it.

A real process on real image files with the tiny always-NG bundle (64 px windows; tests/daemon_support.py).
``whole`` inspects an image smaller than a window as one window (the crop datasets); ``windows`` and
``tiles`` cannot, and say so in one line naming the file, exit status 2, while the images that fit
are inspected. (The rest of ``defectsam infer`` is tests/test_cli.py's.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from .conftest import REPO, TINY_WINDOW
from .daemon_support import ng_bundle

pytestmark = pytest.mark.slow
SMALL = {"narrow.png": (40, 56), "square.png": (48, 48)}  # name -> (height, width), both under a window


def defectsam(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)


def error_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    assert "Traceback" not in proc.stderr, proc.stderr
    return [line for line in proc.stderr.splitlines() if line.startswith("defectsam: error:")]


@pytest.fixture(scope="module")
def bundle(tiny_bundle_master: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ng_bundle(tiny_bundle_master, tmp_path_factory.getbasetemp())


@pytest.fixture()
def small_images(tmp_path: Path) -> Path:
    folder = tmp_path / "small"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, (height, width) in SMALL.items():
        cv2.imwrite(str(folder / name), rng.integers(60, 200, (height, width, 3), dtype=np.uint8))
    return folder


@pytest.mark.parametrize("mode", ["whole", "auto"])
def test_whole_inspects_images_smaller_than_a_window(bundle: Path, small_images: Path, tmp_path: Path,
                                                     mode: str) -> None:
    """--mode whole, and auto for an image no window fits: each image is one window, no find pass."""
    out = tmp_path / "out"
    proc = defectsam("infer", small_images, "--bundle", bundle, "--mode", mode, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert error_lines(proc) == []
    for name, (height, width) in SMALL.items():
        stem = Path(name).stem
        record = json.loads((out / f"{stem}.json").read_text())
        assert record["frame"] == {"width": width, "height": height} and record["bundle"] == "tiny-student-ng"
        assert record["verdict"] == "NG" and record["defect_count"] == len(record["defects"]) >= 1
        for defect in record["defects"]:
            x, y, w, h = defect["bbox"]
            assert min(x, y) >= 0 and x + w <= width and y + h <= height  # the padding is not a defect
        assert "find" not in record["timings_ms"] and record["timings_ms"]["segment"] > 0
        overlay = cv2.imread(str(out / f"{stem}.overlay.png"))
        assert overlay is not None and overlay.shape == (height, width, 3)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] == 0 and summary["verdicts"] == {"NG": len(SMALL)}


@pytest.mark.parametrize("mode", ["windows", "tiles"])
def test_windows_on_an_image_smaller_than_the_window_fails_in_one_line(bundle: Path, small_images: Path,
                                                                       tmp_path: Path, mode: str) -> None:
    """The image that fits is inspected; the one that does not is one line naming it, and the exit is 2."""
    from engines.synthetic import render_frame

    folder = tmp_path / "mixed"
    folder.mkdir()
    small = folder / "a-small.png"
    small.write_bytes((small_images / "square.png").read_bytes())
    cv2.imwrite(str(folder / "b-fits.png"), render_frame(0, 512, 288, with_masks=False).image)
    out = tmp_path / "out"
    proc = defectsam("infer", folder, "--bundle", bundle, "--mode", mode, "--out", out)
    assert proc.returncode == 2, proc.stderr
    assert error_lines(proc) == [
        f"defectsam: error: {small}: inspection.window {TINY_WINDOW} is larger than the frame (48x48); use a "
        "smaller window or inspection.mode: whole"
    ]
    assert not (out / "a-small.json").exists() and not (out / "a-small.overlay.png").exists()
    record = json.loads((out / "b-fits.json").read_text())
    assert record["frame"] == {"width": 512, "height": 288} and record["verdict"] == "NG"
    assert ("find" in record["timings_ms"]) == (mode == "windows")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] == 1 and [Path(i["image"]).name for i in summary["images"]] == ["b-fits.png"]
    assert proc.stdout.strip().splitlines()[-1].startswith("1 image(s) inspected (NG 1), 1 failed")


def test_windows_on_an_image_too_small_for_the_find_pass_fails_and_a_bad_window_is_refused(
        bundle: Path, small_images: Path, tmp_path: Path) -> None:
    """A 32 px window fits a 48x48 image, but the find pass (1/4, 16-aligned) needs 64x64: one line, exit 2.
    Tiles of 32 px inspect it. A window that is not a multiple of 16 is refused before anything loads."""
    image = small_images / "square.png"
    proc = defectsam("infer", image, "--bundle", bundle, "--mode", "windows", "--window", "32", "--out", tmp_path)
    assert proc.returncode == 2 and error_lines(proc) == [
        f"defectsam: error: {image}: frame 48x48 is smaller than the find pass's input: at reduction 4 it needs at "
        "least 64x64 pixels (inspection.mode: tiles or whole inspects small frames)"]
    assert not (tmp_path / "square.json").exists()
    proc = defectsam("infer", image, "--bundle", bundle, "--mode", "tiles", "--window", "32", "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "square.json").read_text())
    assert record["frame"] == {"width": 48, "height": 48} and record["verdict"] == "NG"
    proc = defectsam("infer", image, "--bundle", bundle, "--window", "100", "--out", tmp_path)
    assert proc.returncode == 2 and error_lines(proc) == [
        "defectsam: error: --window must be a positive multiple of 16 pixels, got 100"]
