"""The ``defectsam`` command end to end, as a user runs it: a real process, real files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from .conftest import REPO, TINY_MAX_WINDOWS, TINY_WINDOW


def defectsam(*args: str | Path, prefix: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [*(prefix or []), sys.executable, "-m", "service.cli", *map(str, args)],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=900,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("defectsam: error:")]
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_infer_writes_overlays_and_json_for_real_defect_images(
    tiny_bundle: Path, dataset_images: list[Path], tmp_path: Path
) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for image in dataset_images[:2]:
        shutil.copy(image, folder / image.name)
    out = tmp_path / "out"
    proc = defectsam("infer", folder, "--bundle", tiny_bundle, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "untrained stand-in weights" in proc.stderr
    for image in dataset_images[:2]:
        record = json.loads((out / f"{image.stem}.json").read_text())
        frame = cv2.imread(str(image))
        assert record["frame"] == {"width": frame.shape[1], "height": frame.shape[0]}
        assert record["verdict"] in {"OK", "NG", "UNCERTAIN"}
        assert record["defect_count"] == len(record["defects"])
        assert record["bundle"] == "tiny-student" and record["weights"] == "untrained"
        assert set(record["timings_ms"]) == {"preprocess", "find", "segment", "postprocess", "total"}  # windows mode
        overlay = cv2.imread(str(out / f"{image.stem}.overlay.png"))
        assert overlay.shape == frame.shape
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["images"]) == 2 and summary["failed"] == 0 and summary["bundle"] == "tiny-student"
    assert summary["backend"].startswith("onnxruntime:")


def test_infer_takes_the_inspection_mode_and_window(tiny_bundle: Path, dataset_images: list[Path],
                                                    tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = defectsam("infer", dataset_images[0], "--bundle", tiny_bundle, "--out", out, "--mode", "tiles",
                     "--window", "48", "--score-threshold", "0.9")
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / f"{dataset_images[0].stem}.json").read_text())
    assert "find" not in record["timings_ms"] and "segment" in record["timings_ms"]  # tiles: no find pass
    assert all(d["score"] >= 0.9 for d in record["defects"])
    assert_one_line_error(defectsam("infer", dataset_images[0], "--bundle", tiny_bundle, "--window", "100"),
                          "--window must be a positive multiple of 16 pixels")


def test_infer_reads_the_dataset_in_place_with_a_glob(tiny_bundle: Path, tmp_path: Path) -> None:
    from .conftest import DATASETS

    folder = DATASETS / "magnetic_tile" / "MT_Crack" / "Imgs"
    if not folder.is_dir():
        pytest.skip(f"{folder} not present")
    proc = defectsam("infer", folder, "--glob", "*.jpg", "--limit", "2", "--bundle", tiny_bundle,
                     "--out", tmp_path / "o")
    assert proc.returncode == 0, proc.stderr
    assert len(list((tmp_path / "o").glob("*.overlay.png"))) == 2
    assert len(list((tmp_path / "o").glob("*.json"))) == 3  # two images and the summary


def test_an_image_smaller_than_a_window_is_reported_and_the_rest_are_inspected(
    tiny_bundle: Path, dataset_images: list[Path], tmp_path: Path
) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(dataset_images[0], folder / "good.jpg")
    frame = cv2.imread(str(dataset_images[0]))
    cv2.imwrite(str(folder / "tiny.png"), frame[:40, :50])
    out = tmp_path / "out"
    proc = defectsam("infer", folder, "--bundle", tiny_bundle, "--out", out, "--mode", "windows")
    assert_one_line_error(proc, "tiny.png", f"inspection.window {TINY_WINDOW} is larger than the frame (50x40)")
    assert (out / "good.json").is_file() and not (out / "tiny.json").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] == 1 and len(summary["images"]) == 1
    # auto inspects the small image whole instead.
    assert defectsam("infer", folder / "tiny.png", "--bundle", tiny_bundle, "--out", out).returncode == 0
    assert json.loads((out / "tiny.json").read_text())["frame"] == {"width": 50, "height": 40}


def test_infer_on_a_file_that_is_not_an_image(tiny_bundle: Path, tmp_path: Path) -> None:
    fake = tmp_path / "notes.png"
    fake.write_text("this is text, not a PNG")
    out = tmp_path / "out"
    proc = defectsam("infer", fake, "--bundle", tiny_bundle, "--out", out)
    assert_one_line_error(proc, str(fake), "is not an image OpenCV can decode")
    assert not out.exists() or not any(out.rglob("*"))  # nothing half-written


def test_infer_on_a_missing_path_and_an_empty_directory(tiny_bundle: Path, tmp_path: Path) -> None:
    missing = defectsam("infer", tmp_path / "nope.jpg", "--bundle", tiny_bundle)
    assert_one_line_error(missing, "nope.jpg", "does not exist")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(defectsam("infer", tmp_path / "empty", "--bundle", tiny_bundle), "no images matching")


def test_infer_with_a_tampered_or_a_single_pass_bundle(
    tiny_bundle: Path, dataset_images: list[Path], tmp_path: Path
) -> None:
    with (tiny_bundle / "segment.onnx").open("ab") as handle:
        handle.write(b"tamper")
    proc = defectsam("infer", dataset_images[0], "--bundle", tiny_bundle, "--out", tmp_path / "out")
    assert_one_line_error(proc, "segment.onnx", "checksum mismatch")
    assert not (tmp_path / "out").exists()
    old = tmp_path / "old"
    old.mkdir()
    (old / "manifest.json").write_text(json.dumps({"schema_version": 2, "name": "letterboxed", "K": 8}))
    proc = defectsam("infer", dataset_images[0], "--bundle", old, "--out", tmp_path / "out")
    assert_one_line_error(proc, str(old / "manifest.json"), "schema_version 2 is a single-pass bundle",
                          "train and export the model again")


def test_infer_on_an_unreadable_directory(tiny_bundle: Path, dataset_images: list[Path], tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    shutil.copy(dataset_images[0], locked / "a.jpg")
    locked.chmod(0o000)
    prefix: list[str] = []
    if os.geteuid() == 0:
        # root reads anything: drop the capabilities that let it ignore file permissions.
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            locked.chmod(0o755)
            pytest.skip("running as root and util-linux's setpriv is missing: cannot make a directory unreadable")
        caps = "-dac_override,-dac_read_search"
        prefix = [setpriv, "--bounding-set", caps, "--inh-caps", caps]
    try:
        proc = defectsam("infer", locked, "--bundle", tiny_bundle, "--out", tmp_path / "out", prefix=prefix)
    finally:
        locked.chmod(0o755)
    assert_one_line_error(proc, "locked", "cannot be read (permission denied)")


def test_a_bad_image_among_good_ones_is_reported_and_the_rest_are_inspected(
    tiny_bundle: Path, dataset_images: list[Path], tmp_path: Path
) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(dataset_images[0], folder / "good.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "out"
    proc = defectsam("infer", folder, "--bundle", tiny_bundle, "--out", out)
    assert_one_line_error(proc, "broken.jpg", "is not an image")
    assert (out / "good.json").is_file() and not (out / "broken.json").exists()
    assert not list(out.rglob("*.tmp"))


def test_infer_gives_each_image_its_own_outputs_and_skips_the_masks_beside_them(
    tiny_bundle: Path, dataset_images: list[Path], tmp_path: Path
) -> None:
    """Issue 16, item 8: before, a folder holding X.jpg and X.png wrote both to X.json (the last one won), and a
    dataset's label mask X.png beside X.jpg was inspected as a frame (and its JSON replaced the image's)."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    photo = dataset_images[0]
    shutil.copy(photo, folder / "tile.jpg")
    shutil.copy(photo.with_suffix(".png"), folder / "tile.png")  # the dataset's own label mask of it
    shutil.copy(dataset_images[1], folder / "pair.jpg")
    cv2.imwrite(str(folder / "pair.png"), cv2.imread(str(dataset_images[1])))  # the same photo, a real image
    shutil.copy(dataset_images[2], folder / "summary.jpg")  # its JSON must not replace summary.json
    out = tmp_path / "out"
    proc = defectsam("infer", folder, "--bundle", tiny_bundle, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert f"{folder / 'tile.png'}: skipped: a label mask beside tile.jpg" in proc.stdout
    assert "4 image(s) inspected" in proc.stdout and "1 label mask(s) skipped" in proc.stdout
    written = {path.name for path in out.iterdir()}
    assert written == {"tile.json", "tile.overlay.png", "pair.jpg.json", "pair.jpg.overlay.png", "pair.png.json",
                       "pair.png.overlay.png", "summary.jpg.json", "summary.jpg.overlay.png", "summary.json"}
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(Path(item["image"]).name for item in summary["images"]) == [
        "pair.jpg", "pair.png", "summary.jpg", "tile.jpg"]
    assert summary["skipped_masks"] == [{"mask": str(folder / "tile.png"), "beside": str(folder / "tile.jpg")}]
    for item in summary["images"]:  # every image's record is its own file and names it
        assert json.loads(Path(item["json"]).read_text())["image"] == item["image"]
        assert Path(item["overlay"]).is_file()
    assert len({item["json"] for item in summary["images"]}) == 4
    # Asked to, it inspects the mask too, each under its own name.
    proc = defectsam("infer", folder, "--bundle", tiny_bundle, "--out", tmp_path / "all", "--inspect-masks")
    assert proc.returncode == 0 and "5 image(s) inspected" in proc.stdout, proc.stderr
    assert json.loads((tmp_path / "all" / "tile.png.json").read_text())["image"] == str(folder / "tile.png")
    assert json.loads((tmp_path / "all" / "tile.jpg.json").read_text())["image"] == str(folder / "tile.jpg")
    # Names that would still collide are refused before anything is inspected.
    shutil.copy(photo, folder / "pair.jpg.png")  # its stem 'pair.jpg' is pair.jpg's own
    proc = defectsam("infer", folder, "--bundle", tiny_bundle, "--out", tmp_path / "clash")
    assert_one_line_error(proc, "pair.jpg.png", "would both write")
    assert not (tmp_path / "clash").exists()


def test_bundle_inspect(tiny_bundle: Path) -> None:
    proc = defectsam("bundle", "inspect", tiny_bundle)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "tiny-student" in out and "(schema 3," in out and "sha256 verified" in out and "untrained" in out
    assert "segmenter student_seg" in out and "finder finder" in out
    assert f"{TINY_WINDOW} x {TINY_WINDOW} px at 1:1, at most {TINY_MAX_WINDOWS} per frame" in out
    assert "the frame in grey at 1/4" in out and "candidates per 32 x 32 frame pixels" in out
    assert "1:scratch, 2:dent, 3:pinhole (0: background)" in out
    assert "manifest   as written (manifest_sha256 " in out and "matches its content)" in out
    as_json = json.loads(defectsam("bundle", "inspect", tiny_bundle, "--json").stdout)
    assert as_json["segment"]["window"] == TINY_WINDOW and as_json["find"]["reduction"] == 4
    assert set(as_json["files"]) == {"segment.onnx", "find.onnx"}
    (tiny_bundle / "manifest.json").write_text("{")
    assert_one_line_error(defectsam("bundle", "inspect", tiny_bundle), "manifest.json", "malformed JSON")


def test_bundle_inspect_says_when_the_manifest_was_edited_and_seal_accepts_it(tiny_bundle: Path) -> None:
    """Issue 16, item 8: a threshold edited by hand in manifest.json went unnoticed (no checksum covers the
    manifest). inspect now says EDITED (and warns on stderr, --json too), still exit 0: the graphs verify;
    a manifest from before the digest says 'not recorded'; 'bundle seal' records the digest as it is now."""
    manifest = tiny_bundle / "manifest.json"
    raw = json.loads(manifest.read_text())
    raw["metrics"] = {**raw["metrics"], "hand_edit": 1}
    manifest.write_text(json.dumps(raw, indent=2))
    for args in ((), ("--json",)):
        proc = defectsam("bundle", "inspect", tiny_bundle, *args)
        assert proc.returncode == 0 and "was edited since it was written" in proc.stderr, proc.stderr
    assert "manifest   EDITED since it was written" in defectsam("bundle", "inspect", tiny_bundle).stdout
    as_json = json.loads(defectsam("bundle", "inspect", tiny_bundle, "--json").stdout)
    assert as_json["manifest_sha256"] == raw["manifest_sha256"]  # what the file says, not a fresh digest
    del raw["manifest_sha256"]
    manifest.write_text(json.dumps(raw, indent=2))
    proc = defectsam("bundle", "inspect", tiny_bundle)
    assert "manifest   not recorded" in proc.stdout and not proc.stderr, proc.stderr
    proc = defectsam("bundle", "seal", tiny_bundle)
    assert proc.returncode == 0 and "recorded (it was not recorded)" in proc.stdout, proc.stderr
    assert "manifest   as written" in defectsam("bundle", "inspect", tiny_bundle).stdout
    assert json.loads(manifest.read_text())["metrics"]["hand_edit"] == 1  # sealed as it was, graphs unchanged
    assert_one_line_error(defectsam("bundle", "seal", tiny_bundle / "nowhere"), "does not exist")


@pytest.mark.slow
def test_bench_engine_compares_bundles_and_window_sizes_in_one_run(tiny_bundle: Path, tmp_path: Path) -> None:
    report = tmp_path / "bench.json"
    proc = defectsam("bench", "engine", "--bundle", tiny_bundle, "--reference", tiny_bundle, "--modes", "windows",
                     "--windows", "64,128", "--iterations", "3", "--warmup", "1", "--json", report)
    assert proc.returncode == 0, proc.stderr
    assert "FPS (median)" in proc.stdout
    # every comparison names its rows' mode and window: the first row against each other one
    assert "tiny-student (fp32, windows 64 px) / tiny-student (fp32, windows 128 px)" in proc.stdout
    results = json.loads(report.read_text())["results"]
    assert len(results) == 4  # two bundles x two window sides
    assert [(r["mode"], r["window"]) for r in results] == [("windows", 64), ("windows", 128)] * 2
    assert all(r["input_hw"] == [1520, 2688] for r in results)  # 4 MP synthetic test frames
    assert all(r["fps_median"] > 0 and r["latency_ms_p99"] >= r["latency_ms_p50"] for r in results)
    missing = defectsam("bench", "engine", "--bundle", tiny_bundle, "--reference", tmp_path / "other")
    assert_one_line_error(missing, "reference bundle does not exist",
                          "defectsam-train export --arch student_seg --random-init --random-finder")
    assert_one_line_error(defectsam("bench", "engine", "--bundle", tiny_bundle, "--modes", "grid"), "--modes")
    assert_one_line_error(defectsam("bench", "engine", "--bundle", tiny_bundle, "--windows", "100"), "--windows")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs to run as root (CI does)")
def test_serve_as_root_says_so_at_start(tmp_path: Path) -> None:
    """Issue 16, item 8: the daemon ran as root without a word. `defectsam serve` started as root logs one
    warning saying to run it as a service user, as deploy/install.sh does."""
    import yaml

    from service.soak import DaemonProcess

    from .daemon_support import config_data

    config = tmp_path / "defectsam.yaml"
    config.write_text(yaml.safe_dump(config_data(tmp_path, tmp_path / "no-bundle")))
    daemon = DaemonProcess(config, tmp_path)
    try:
        daemon.wait_serving(60)
        assert daemon.terminate(30)[0] == 0
    finally:
        daemon.close()
    warned = [line for line in daemon.log_path.read_text().splitlines() if "running as root" in line]
    assert len(warned) == 1 and " WARNING " in warned[0] and "deploy/install.sh" in warned[0], warned


def test_the_root_warning_names_the_service_user_and_stays_quiet_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    from service import ops

    monkeypatch.setattr(ops.os, "geteuid", lambda: 1000)
    assert ops.root_warning() is None
    monkeypatch.setattr(ops.os, "geteuid", lambda: 0)
    warning = ops.root_warning()
    assert warning is not None and "user 'defectsam'" in warning and "CAP_NET_BIND_SERVICE" in warning


def test_usage_errors_exit_2_in_one_line() -> None:
    proc = defectsam("infer")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "the following arguments are required: input" in proc.stderr
    proc = defectsam("infer", "x.png", "--mode", "letterbox")
    assert proc.returncode == 2 and "argument --mode: invalid choice: 'letterbox'" in proc.stderr
