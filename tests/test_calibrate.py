"""Calibrated thresholds: the candidate threshold of the find pass and the score threshold, chosen on held-out
frames through engines/, stored in the manifest, honoured by every runtime entry point unless its own
configuration names a threshold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engines.backends import open_engine
from engines.backends.onnxruntime import Config as OrtConfig
from engines.bundle import (
    MANIFEST_NAME,
    Thresholds,
    load_bundle,
    read_manifest,
    sha256_file,
    update_thresholds,
    write_bundle,
)
from engines.inspector import InspectionConfig, Inspector
from engines.postprocess import PostprocessConfig, with_calibrated
from service.config import load_config
from tests.support import run_command_module

pytest.importorskip("torch", reason="calibration reads datasets through the 'train' extra")

from training.commands import calibrate

DATA = "synthetic,n=3,seed=1000000,width=256,height=192,pixel_scale=0.5,defect_free_prob=0.0"


def _best(rows: list[dict], objective: str, max_false_ng: float) -> dict:
    """The documented choice: the best ``objective`` among rows within the false-NG bound, ties to the other
    figure, then to the higher threshold."""
    other = "f1" if objective == "image_accuracy" else "image_accuracy"
    within = [r for r in rows if (r["false_ng_rate"] or 0.0) <= max_false_ng] or rows
    return max(within, key=lambda r: (r[objective] or 0.0, r[other] or 0.0, r["score_threshold"]))


def test_calibrate_chooses_both_thresholds_stores_them_and_leaves_the_graphs(tiny_bundle: Path, capsys) -> None:
    graphs = {name: sha256_file(tiny_bundle / name) for name in read_manifest(tiny_bundle).files}
    code, out, err = run_command_module(
        calibrate, ["calibrate", str(tiny_bundle), "--data", DATA, "--thresholds", "0.2,0.5,0.9"], capsys
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("candidate threshold ") and "held-out defects proposed" in lines[0]
    assert lines[1].startswith("score_threshold") and len(lines) == 5 and out.count("<- chosen") == 1
    manifest = load_bundle(tiny_bundle).manifest  # checksums verified
    assert manifest.schema_version == 3 and manifest.thresholds is not None
    chosen = manifest.thresholds
    calibration = chosen.calibration
    sweep = calibration["sweep"]
    assert [row["score_threshold"] for row in sweep] == [0.2, 0.5, 0.9]
    assert chosen.score_threshold == _best(sweep, "f1", 0.01)["score_threshold"]
    assert chosen.uncertain_threshold == pytest.approx(max(0.0, chosen.score_threshold - 0.1))
    # The candidate threshold: the highest that still proposes 99% of the held-out defects (the lowest if none).
    candidates = calibration["candidates"]
    rows = candidates["sweep"]
    assert [r["candidate_threshold"] for r in rows] == [round(0.02 * i, 2) for i in range(1, 46)]
    recalls = [r["defect_recall"] for r in rows]
    assert recalls == sorted(recalls, reverse=True) and candidates["defects"] > 0
    keep = [r["candidate_threshold"] for r in rows if r["defect_recall"] >= 0.99]
    assert chosen.candidate_threshold == (max(keep) if keep else 0.02)
    assert candidates["chosen"]["candidate_threshold"] == chosen.candidate_threshold
    assert f"candidate threshold {chosen.candidate_threshold:.2f}" in lines[0]
    assert calibration["data"] == DATA and calibration["objective"] == "f1" and calibration["n_images"] == 3
    assert calibration["max_false_ng"] == 0.01 and "--objective f1" in calibration["command"]
    assert {name: sha256_file(tiny_bundle / name) for name in manifest.files} == graphs
    assert "written to" in err


def test_the_objective_and_the_false_ng_bound_choose(tiny_bundle: Path, capsys) -> None:
    code, out, _ = run_command_module(
        calibrate, ["calibrate", str(tiny_bundle), "--data", DATA, "--thresholds", "0.3,0.6,0.95", "--objective",
                    "image_accuracy", "--max-false-ng", "1", "--uncertain-gap", "0.25", "--limit", "2"], capsys,
    )
    assert code == 0
    chosen = load_bundle(tiny_bundle).manifest.thresholds
    assert chosen is not None and chosen.calibration["n_images"] == 2
    assert chosen.score_threshold == _best(chosen.calibration["sweep"], "image_accuracy", 1.0)["score_threshold"]
    assert chosen.uncertain_threshold == pytest.approx(max(0.0, chosen.score_threshold - 0.25))
    chosen_line = next(line for line in out.splitlines() if "<- chosen" in line)
    assert chosen_line.split()[0] == f"{chosen.score_threshold:.2f}"


def test_dry_run_writes_nothing(tiny_bundle: Path, capsys) -> None:
    before = (tiny_bundle / MANIFEST_NAME).read_bytes()
    code, out, err = run_command_module(
        calibrate, ["calibrate", str(tiny_bundle), "--data", DATA, "--thresholds", "0.3", "--dry-run", "--limit", "1"],
        capsys,
    )
    assert code == 0 and "dry run" in err and "<- chosen" in out
    assert (tiny_bundle / MANIFEST_NAME).read_bytes() == before


def test_a_bundle_without_a_find_graph_gets_no_candidate_threshold(tiny_bundle: Path, tmp_path: Path, capsys) -> None:
    fields = json.loads((tiny_bundle / MANIFEST_NAME).read_text())
    for key in ("files", "find"):
        fields.pop(key)
    fields["graphs"] = {"segment": "segment.onnx", "find": None}
    plain = write_bundle(tmp_path / "plain", fields, {"segment.onnx": tiny_bundle / "segment.onnx"}).path
    code, out, err = run_command_module(
        calibrate, ["calibrate", str(plain), "--data", DATA, "--thresholds", "0.5", "--limit", "1"], capsys
    )
    assert code == 0, err
    assert not out.startswith("candidate threshold")
    chosen = load_bundle(plain).manifest.thresholds
    assert chosen is not None and chosen.candidate_threshold is None and chosen.calibration["candidates"] is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--thresholds", "a,b"], "--thresholds must be comma-separated numbers"),
        (["--thresholds", "0,0.5"], "--thresholds must name values within (0, 1]"),
        (["--uncertain-gap", "-1"], "--uncertain-gap must be >= 0"),
        (["--limit", "0"], "--limit must be at least 1"),
        (["--max-false-ng", "2"], "--max-false-ng must be within 0..1"),
        (["--candidate-recall", "0"], "--candidate-recall must be within (0, 1]"),
    ],
)
def test_bad_arguments_are_one_line(tiny_bundle: Path, capsys, argv: list[str], message: str) -> None:
    before = (tiny_bundle / MANIFEST_NAME).read_bytes()
    code, _, err = run_command_module(calibrate, ["calibrate", str(tiny_bundle), "--data", DATA, *argv], capsys)
    assert code == 2 and message in err and err.count("\n") == 1
    assert (tiny_bundle / MANIFEST_NAME).read_bytes() == before


def test_held_out_data_without_defects_cannot_calibrate_the_find_pass(tiny_bundle: Path, capsys) -> None:
    clean = "synthetic,n=2,seed=5,width=128,height=96,defect_free_prob=1.0"
    code, _, err = run_command_module(calibrate, ["calibrate", str(tiny_bundle), "--data", clean], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "the held-out set has no defects to calibrate the candidate threshold on" in err
    code, _, err = run_command_module(calibrate, ["calibrate", str(tiny_bundle / "nope"), "--data", clean], capsys)
    assert code == 2 and "bundle directory does not exist" in err


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
    update_thresholds(tiny_bundle, Thresholds(score_threshold=0.35, uncertain_threshold=0.2, candidate_threshold=0.05))
    engine = open_engine(load_bundle(tiny_bundle), OrtConfig(providers=["cpu"]))
    try:
        inspector = Inspector(engine)
        assert inspector.postprocess.config.score_threshold == 0.35 and inspector.candidate_threshold == 0.05
        # The daemon's YAML leaves postprocess and inspection unset: the bundle's values apply; a YAML value wins.
        config = tmp_path / "daemon.yaml"
        config.write_text(f"engine:\n  bundle: {tiny_bundle}\n")
        section = load_config(config).engine
        assert with_calibrated(section.postprocess, engine.bundle.manifest.thresholds).score_threshold == 0.35
        assert Inspector(engine, section.inspection, section.postprocess).candidate_threshold == 0.05
        config.write_text(f"engine:\n  bundle: {tiny_bundle}\n  postprocess:\n    score_threshold: 0.7\n"
                          "  inspection:\n    candidate_threshold: 0.5\n")
        section = load_config(config).engine
        assert with_calibrated(section.postprocess, engine.bundle.manifest.thresholds).score_threshold == 0.7
        assert Inspector(engine, section.inspection, section.postprocess).candidate_threshold == 0.5
        assert Inspector(engine, InspectionConfig(candidate_threshold=1.0)).candidate_threshold == 1.0
    finally:
        engine.close()
