"""Calibrated thresholds: chosen on held-out frames through engines/, stored in the manifest, honoured
by every runtime entry point unless its own configuration names a threshold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engines.backends import open_engine
from engines.backends.onnxruntime import Config as OrtConfig
from engines.bundle import Thresholds, load_bundle, read_manifest, sha256_file, update_thresholds
from engines.errors import BundleError
from engines.inspector import Inspector
from engines.postprocess import PostprocessConfig, with_calibrated
from service.config import load_config
from tests.conftest import TINY_HW
from tests.support import run_command_module
from training.commands import calibrate

DATA = f"synthetic,n=4,seed=1000000,width={TINY_HW[1]},height={TINY_HW[0]}"


def test_calibrate_sweeps_stores_the_best_threshold_and_leaves_the_graphs(tiny_bundle: Path, capsys) -> None:
    graphs = {name: sha256_file(tiny_bundle / name) for name in read_manifest(tiny_bundle).files}
    code, out, err = run_command_module(
        calibrate, ["calibrate", str(tiny_bundle), "--data", DATA, "--thresholds", "0.2,0.5,0.9"], capsys
    )
    assert code == 0, err
    assert out.count("\n") == 4 and "<- chosen" in out  # header + one row per threshold
    manifest = load_bundle(tiny_bundle).manifest  # checksums verified
    assert manifest.schema_version == 2 and manifest.thresholds is not None
    chosen = manifest.thresholds
    sweep = chosen.calibration["sweep"]
    assert [row["score_threshold"] for row in sweep] == [0.2, 0.5, 0.9]
    best = max(sweep, key=lambda r: (r["image_accuracy"] or 0, r["f1"] or 0, r["score_threshold"]))
    assert chosen.score_threshold == best["score_threshold"]
    assert chosen.uncertain_threshold == pytest.approx(max(0.0, best["score_threshold"] - 0.1))
    assert chosen.calibration["data"] == DATA and chosen.calibration["objective"] == "image_accuracy"
    assert {name: sha256_file(tiny_bundle / name) for name in manifest.files} == graphs


def test_dry_run_writes_nothing(tiny_bundle: Path, capsys) -> None:
    before = (tiny_bundle / "manifest.json").read_bytes()
    code, out, err = run_command_module(
        calibrate, ["calibrate", str(tiny_bundle), "--data", DATA, "--thresholds", "0.3", "--dry-run"], capsys
    )
    assert code == 0 and "dry run" in err and "<- chosen" in out
    assert (tiny_bundle / "manifest.json").read_bytes() == before


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--thresholds", "a,b"], "--thresholds must be comma-separated numbers"),
        (["--thresholds", "0,0.5"], "--thresholds must name values within (0, 1]"),
        (["--uncertain-gap", "-1"], "--uncertain-gap must be >= 0"),
        (["--limit", "0"], "--limit must be at least 1"),
    ],
)
def test_bad_arguments_are_one_line(tiny_bundle: Path, capsys, argv: list[str], message: str) -> None:
    code, _, err = run_command_module(calibrate, ["calibrate", str(tiny_bundle), "--data", DATA, *argv], capsys)
    assert code == 2 and message in err and err.count("\n") == 1


def test_a_config_that_names_a_threshold_wins_over_the_bundle() -> None:
    calibrated = Thresholds(score_threshold=0.25, uncertain_threshold=0.15)
    assert with_calibrated(None, calibrated).score_threshold == 0.25
    assert with_calibrated(PostprocessConfig(), calibrated).uncertain_threshold == 0.15
    explicit = with_calibrated(PostprocessConfig(score_threshold=0.6), calibrated)
    assert (explicit.score_threshold, explicit.uncertain_threshold) == (0.6, 0.15)
    # An unset uncertain threshold never exceeds the score threshold it sits under.
    high = Thresholds(score_threshold=0.6, uncertain_threshold=0.5)
    low = with_calibrated(PostprocessConfig(score_threshold=0.4), high)
    assert (low.score_threshold, low.uncertain_threshold) == (0.4, 0.4)
    assert with_calibrated(PostprocessConfig(), None) == PostprocessConfig()


def test_the_daemon_config_and_the_inspector_take_the_bundle_thresholds(tiny_bundle: Path, tmp_path: Path) -> None:
    update_thresholds(tiny_bundle, Thresholds(score_threshold=0.35, uncertain_threshold=0.2))
    engine = open_engine(load_bundle(tiny_bundle), OrtConfig())
    try:
        assert Inspector(engine).postprocess.config.score_threshold == 0.35
    finally:
        engine.close()
    # The daemon's YAML leaves postprocess unset: the bundle's values apply; a YAML value wins.
    config = tmp_path / "daemon.yaml"
    config.write_text(f"engine:\n  bundle: {tiny_bundle}\n")
    section = load_config(config).engine.postprocess
    assert with_calibrated(section, load_bundle(tiny_bundle).manifest.thresholds).score_threshold == 0.35
    config.write_text(f"engine:\n  bundle: {tiny_bundle}\n  postprocess:\n    score_threshold: 0.7\n")
    section = load_config(config).engine.postprocess
    assert with_calibrated(section, load_bundle(tiny_bundle).manifest.thresholds).score_threshold == 0.7


def test_thresholds_need_schema_version_2(tiny_bundle: Path) -> None:
    update_thresholds(tiny_bundle, Thresholds(score_threshold=0.3, uncertain_threshold=0.2))
    raw = json.loads((tiny_bundle / "manifest.json").read_text())
    raw["schema_version"] = 1
    (tiny_bundle / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="'thresholds' needs schema_version 2"):
        read_manifest(tiny_bundle)
    with pytest.raises(ValueError, match="uncertain_threshold must not exceed score_threshold"):
        Thresholds(score_threshold=0.2, uncertain_threshold=0.3)
