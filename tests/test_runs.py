"""What a training run leaves for the engineer who reads it: results.csv, results.png, val_overlays.png,
TensorBoard events, the epoch line with its time and the run's ETA; a resumed run continues them; every
file gets the mode of the umask (training.runlog, engines.atomic)."""

from __future__ import annotations

import csv
import json
import math
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import cv2
import pytest

torch = pytest.importorskip("torch")

from engines.atomic import staging_dir, write_bytes_atomic  # noqa: E402
from training.cli import main  # noqa: E402
from training.config import parse_config  # noqa: E402
from training.model.checkpoint import read_checkpoint  # noqa: E402
from training.runlog.clock import RunClock, format_duration  # noqa: E402
from training.runlog.history import RunHistory, read_results  # noqa: E402
from training.runlog.plots import LEGEND_PX, TILE_PX, results_panels, results_size  # noqa: E402
from training.trainer import train  # noqa: E402

from .test_trainer import tiny_config  # noqa: E402

UMASK = 0o027  # plant IT's: group may read, others nothing


@pytest.fixture
def umask() -> Iterator[int]:
    previous = os.umask(UMASK)
    try:
        yield UMASK
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def _png_size(path: Path) -> tuple[int, int]:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, f"{path} does not decode"
    return image.shape[1], image.shape[0]


def test_a_run_writes_results_plots_and_events_and_a_resume_continues_them(
    tmp_path: Path, umask: int, capsys
) -> None:
    lines: list[str] = []
    train(parse_config(tiny_config(tmp_path)), log=lines.append)
    # a supervised run says what it is: no teacher anywhere in its name
    assert "recipe supervised (ground truth only, no teacher)" in capsys.readouterr().err
    run = tmp_path / "run"

    header, rows = _csv(run / "results.csv")
    assert header[:3] == ["epoch", "step", "phase"] and header[-3:] == ["lr", "epoch_seconds", "elapsed_seconds"]
    assert {"train_loss", "train_ce", "train_dice", "val_miou_fg", "val_miou", "val_aacc", "val_iou_scratch"} <= set(
        header)
    assert [row["epoch"] for row in rows] == ["1", "2"] and [row["step"] for row in rows] == ["2", "4"]
    for row in rows:
        assert all(math.isfinite(float(row[name])) for name in header), row
        assert 0 < float(row["epoch_seconds"]) <= float(row["elapsed_seconds"])
    assert float(rows[1]["elapsed_seconds"]) > float(rows[0]["elapsed_seconds"])
    # the same records as metrics.jsonl and as last.pt's history
    jsonl = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in jsonl] == [float(row["train_loss"]) for row in rows]
    assert read_checkpoint(run / "last.pt")["history"] == jsonl

    # results.png: a panel per loss term, val metric (IoUs per class together) and the learning rate
    panels = results_panels(read_results(run / "results.csv"))
    assert [title for title, _ in panels] == [
        "loss (train)", "ce (train)", "dice (train)", "miou_fg (val)", "miou (val)", "aacc (val)",
        "IoU per class (val)", "learning rate",
    ]
    assert _png_size(run / "results.png") == results_size(len(panels)) == (1500, 500)
    # val_overlays.png: image, ground truth, prediction for each of the 2 val samples
    assert _png_size(run / "val_overlays.png") == (3 * TILE_PX, 2 * TILE_PX + LEGEND_PX)

    # the epoch line: losses and metrics, the epoch's time, the run's elapsed time and ETA
    epoch_lines = [line for line in lines if line.startswith("epoch ")]
    assert len(epoch_lines) == 2 and epoch_lines[0].startswith("epoch 1/2  step 2  train_loss ")
    assert "(elapsed " in epoch_lines[0] and "ETA " in epoch_lines[0] and epoch_lines[1].endswith("ETA 0 s)")
    assert any("results.csv, results.png, val_overlays.png written" in line for line in lines)

    # every file under the umask's mode, directories too (0640 / 0750), not mkstemp's 0600 or mkdtemp's 0700
    for name in ("results.csv", "metrics.jsonl", "config.yaml", "last.pt", "best.pt", "results.png",
                 "val_overlays.png"):
        assert _mode(run / name) == 0o666 & ~umask, name
    assert _mode(run) == 0o777 & ~umask

    # Resume to 3 epochs after a crash between last.pt of epoch 2 and the files: results.csv lost its last
    # row, metrics.jsonl was torn. Both are rewritten from last.pt's history: epochs 1-2 as they were, epoch 3
    # added once, none lost, none twice.
    (run / "results.csv").write_text("".join((run / "results.csv").read_text().splitlines(keepends=True)[:2]))
    (run / "metrics.jsonl").write_text('{"epoch": 1, "step"')
    train(parse_config(tiny_config(tmp_path, schedule__epochs=3)), log=lambda m: None)
    header3, rows3 = _csv(run / "results.csv")
    assert header3 == header and rows3[:2] == rows and [row["epoch"] for row in rows3] == ["1", "2", "3"]
    assert float(rows3[2]["elapsed_seconds"]) > float(rows[1]["elapsed_seconds"])  # over both invocations
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert not [p for p in run.iterdir() if ".tmp" in p.name]

    # TensorBoard, read back with its own reader: one point per epoch (the resume doubled none)
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator", reason="tensorboard not installed (the extra)")
    events = event_accumulator.EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/ce", "train/dice", "val/miou_fg", "val/iou_scratch", "lr", "epoch_seconds"} <= set(
        tags["scalars"])
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [round(e.value, 5) for e in loss] == [float(row["train_loss"]) for row in rows3]
    assert "val_overlays" in tags["images"] and events.Images("val_overlays")[-1].step == 3
    assert _mode(run / "tensorboard") == 0o777 & ~umask


def test_plots_redraws_a_run_and_a_bad_run_dir_is_one_line(tmp_path: Path, capsys) -> None:
    train(parse_config(tiny_config(tmp_path, schedule__epochs=1)), log=lambda m: None)
    run = tmp_path / "run"
    sizes = {name: _png_size(run / name) for name in ("results.png", "val_overlays.png")}
    for name in sizes:
        (run / name).unlink()
    assert main(["plots", str(run), "--samples", "1"]) == 0
    assert "val_overlays.png" in capsys.readouterr().out
    assert _png_size(run / "results.png") == sizes["results.png"]
    assert _png_size(run / "val_overlays.png") == (3 * TILE_PX, TILE_PX + LEGEND_PX)

    # a run from before results.csv: drawn from metrics.jsonl, and results.csv written from it
    (run / "results.csv").unlink()
    assert main(["plots", str(run), "--samples", "0"]) == 0
    assert "results.csv written from metrics.jsonl" in capsys.readouterr().out
    assert [r["epoch"] for r in read_results(run / "results.csv")] == [1.0]

    for bad, message in ((tmp_path / "none", "not a directory"), (tmp_path, "not a training run directory")):
        assert main(["plots", str(bad)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and str(bad) in err
    (run / "results.csv").write_text("epoch,train_loss\n1,abc\n")
    assert main(["plots", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "line 2, column 'train_loss': 'abc' is not a number" in err


def test_columns_follow_the_loss_terms_of_each_phase(tmp_path: Path) -> None:
    """kdsam's phases have other loss terms; epochs without validation leave the val cells empty."""
    history = RunHistory(tmp_path, [
        {"epoch": 1, "step": 2, "phase": 0, "train_loss": 1.0, "train_mse": 0.8, "train_perceptual": 0.4,
         "lr": 0.01, "epoch_seconds": 2.0, "elapsed_seconds": 2.0},
        {"epoch": 2, "step": 4, "phase": 1, "train_loss": 0.5, "train_ce": 0.3, "train_dice": 0.2,
         "val_miou_fg": 0.4, "lr": 0.005, "epoch_seconds": 2.0, "elapsed_seconds": 4.0},
    ])  # fmt: skip
    history.write()
    header, rows = _csv(tmp_path / "results.csv")
    assert header == ["epoch", "step", "phase", "train_loss", "train_mse", "train_perceptual", "train_ce",
                      "train_dice", "val_miou_fg", "lr", "epoch_seconds", "elapsed_seconds"]
    assert rows[0]["train_ce"] == "" and rows[0]["val_miou_fg"] == "" and rows[1]["train_mse"] == ""
    parsed = read_results(tmp_path / "results.csv")
    assert parsed[0]["val_miou_fg"] is None and parsed[1]["val_miou_fg"] == 0.4

    # A checkpoint from before the history: resumed with its metrics.jsonl's epochs up to its own (last wins).
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"epoch": 1, "train_loss": 9.0}, {"epoch": 1, "train_loss": 1.0}, {"epoch": 2, "train_loss": 0.5},
        {"epoch": 3, "train_loss": 0.4}]))  # fmt: skip
    resumed = RunHistory.resume(tmp_path, {"epoch": 2})
    assert [(r["epoch"], r["train_loss"]) for r in resumed.records] == [(1, 1.0), (2, 0.5)]
    assert RunHistory.resume(tmp_path, None).records == []


def test_eta_is_epochs_left_at_the_mean_epoch_time_plus_the_current_epochs_rest() -> None:
    # Resumed at epoch 2 of 5 (10 steps each) after epochs of 10 s and 20 s; no step of this epoch done yet.
    clock = RunClock(5, 10, 50, elapsed_before=30.0, epoch_seconds=[10.0, 20.0])
    clock.start_epoch(2, 20)
    assert clock.eta(20) == 15.0 * 2  # this epoch's rest is unknown (0 steps timed) + 2 epochs after it
    assert clock.eta_after_epoch() == 30.0
    assert clock.elapsed >= 30.0
    # max_steps 35 stops the run in epoch 4 (0-based 3): one epoch after this one
    capped = RunClock(5, 10, 35, epoch_seconds=[10.0])
    capped.start_epoch(2, 20)
    assert capped.eta_after_epoch() == 10.0
    assert [format_duration(s) for s in (4.2, 65, 3 * 3600 + 12 * 60 + 5)] == ["4 s", "1 min 05 s", "3 h 12 min"]


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_atomic_files_and_staging_directories_take_the_umasks_mode(tmp_path: Path, mask: int) -> None:
    previous = os.umask(mask)
    try:
        write_bytes_atomic(tmp_path / "a" / "file.bin", b"x")
        staging = staging_dir(tmp_path / "bundle")
    finally:
        os.umask(previous)
    assert _mode(tmp_path / "a" / "file.bin") == 0o666 & ~mask
    assert _mode(staging) == 0o777 & ~mask and staging.parent == tmp_path and staging.name.startswith(".bundle.tmp-")


def test_synth_writes_files_with_the_umasks_mode(tmp_path: Path, umask: int) -> None:
    out = tmp_path / "synth"
    assert main(["synth", "--out", str(out), "--n", "1", "--width", "128", "--height", "96", "--instances"]) == 0
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files and {_mode(p) for p in files} == {0o666 & ~umask}
    assert {_mode(p) for p in [out, *(p for p in out.rglob("*") if p.is_dir())]} == {0o777 & ~umask}
