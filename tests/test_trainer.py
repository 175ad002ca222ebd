"""The trainer end to end on tiny synthetic data: a segmenter and a finder, checkpoints, resume, a cached
family teacher, export of the trained checkpoints, config errors, the CLI, and two gloo processes under torchrun."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

torch = pytest.importorskip("torch")

from training.cli import main  # noqa: E402
from training.config import ConfigError, load_config, parse_config  # noqa: E402
from training.model.build import build_model  # noqa: E402
from training.model.checkpoint import read_checkpoint, save_checkpoint  # noqa: E402
from training.trainer import train  # noqa: E402

from .support import set_dotted  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SYNTH = {"name": "synthetic", "width": 128, "height": 96, "pixel_scale": 0.5}


def tiny_config(tmp_path: Path, **changes: object) -> dict:
    raw: dict = {
        "name": "tiny",
        "out": str(tmp_path / "run"),
        "model": {"arch": "student_seg", "window": 32},
        "data": {"train": [{**SYNTH, "n": 4, "seed": 0}], "val": [{**SYNTH, "n": 2, "seed": 50}]},
        "recipe": {"name": "supervised"},
        "schedule": {"epochs": 2, "batch_size": 2, "lr": 0.002},
    }
    return set_dotted(raw, changes)


def write(tmp_path: Path, raw: dict, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def test_train_writes_last_and_best_and_resumes(tmp_path: Path) -> None:
    config = parse_config(tiny_config(tmp_path))
    assert config.task == "segment"
    summary = train(config, log=lambda m: None)
    run = tmp_path / "run"
    assert summary["epoch"] == 2 and (run / "last.pt").is_file() and (run / "best.pt").is_file()
    payload = read_checkpoint(run / "last.pt")
    assert payload["arch"] == "student_seg" and payload["epoch"] == 2 and payload["step"] == 4
    assert payload["config"] == {"kind": "segmenter", "num_classes": 3}
    assert {"optimizer", "scheduler", "train_config", "classes", "recipe", "metrics"} <= set(payload)
    assert payload["classes"] == ["scratch", "dent", "pinhole"] and payload["recipe"] == "supervised"
    assert payload["adapter"] is None and payload["teacher"] == "none"
    assert not [p for p in run.iterdir() if ".tmp" in p.name], "no temporary files are left"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2] and [line["step"] for line in lines] == [2, 4]
    last = lines[-1]
    assert {"train_loss", "train_ce", "train_dice", "val_miou_fg", "val_miou", "val_aacc", "val_score"} <= set(last)
    assert "val_iou_background" in last and 0.0 <= last["val_aacc"] <= 1.0
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["window"] == 32

    # One more epoch resumes from last.pt: the counters go on, the first two epochs are not redone.
    longer = parse_config(tiny_config(tmp_path, schedule__epochs=3))
    train(longer, log=lambda m: None)
    assert read_checkpoint(run / "last.pt")["step"] == 6
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


FIND_DATA = {"name": "synthetic_find", "frames": 2, "per_frame": 2, "window": 64, "defect_free_prob": 0.0,
             "workers": 1}


@pytest.fixture(scope="module")
def finder_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finder trained one epoch on two 4 MP frames reduced 4x (rendered once into a temporary cache)."""
    root = tmp_path_factory.mktemp("finder")
    raw = {
        "name": "tiny-finder", "out": str(root / "run"),
        "model": {"arch": "finder", "window": 64},
        "data": {"train": [{**FIND_DATA, "seed": 0}], "val": [{**FIND_DATA, "seed": 1_000_000}]},
        "schedule": {"epochs": 1, "batch_size": 2, "lr": 0.002},
        "eval": {"metric": "ap"},
    }  # fmt: skip
    previous = os.environ.get("DEFECTSAM_CACHE")
    os.environ["DEFECTSAM_CACHE"] = str(root / "cache")
    try:
        config = parse_config(raw)
        assert config.task == "find"
        train(config, log=lambda m: None)
    finally:
        if previous is None:
            os.environ.pop("DEFECTSAM_CACHE")
        else:
            os.environ["DEFECTSAM_CACHE"] = previous
    assert len(list((root / "cache").iterdir())) == 2, "the training and the validation frame sets"
    return root / "run"


def test_a_finder_trains_on_reduced_frames_and_is_validated_by_cell_precision(finder_run: Path) -> None:
    payload = read_checkpoint(finder_run / "best.pt")
    assert payload["arch"] == "finder" and payload["config"] == {"kind": "finder"}
    assert payload["classes"] == ["defect"] and payload["step"] == 1
    (record,) = [json.loads(line) for line in (finder_run / "metrics.jsonl").read_text().splitlines()]
    assert set(record) >= {"train_focal", "val_ap", "val_recall_0.3", "val_recall_0.5", "val_cells", "val_score"}
    assert 0.0 < record["val_ap"] <= 1.0 and record["val_cells"] == 2 * 48 * 84  # two frames of cells
    assert record["val_score"] == record["val_ap"]


def test_distill_blog_with_a_cached_family_teacher_then_export_both_checkpoints(
    tmp_path: Path, finder_run: Path
) -> None:
    torch.manual_seed(0)
    teacher = save_checkpoint(tmp_path / "teacher.pt", "teacher_seg", build_model("teacher_seg"))
    raw = tiny_config(
        tmp_path, recipe__name="blog", schedule__epochs=1, schedule__max_steps=1,
        teacher={"kind": "family", "checkpoint": str(teacher), "cache": str(tmp_path / "cache")},
    )  # fmt: skip
    cfg = write(tmp_path, raw)
    assert main(["cache-teacher", "--config", str(cfg)]) == 0
    caches = list((tmp_path / "cache").iterdir())
    assert len(caches) == 1 and caches[0].name.startswith("family-teacher_seg-")
    assert len(json.loads((caches[0] / "index.json").read_text())["entries"]) == 4
    assert main(["distill", "--config", str(cfg)]) == 0
    payload = read_checkpoint(tmp_path / "run" / "best.pt")
    assert payload["recipe"] == "blog" and payload["teacher"].startswith("family-teacher_seg-")
    assert payload["step"] == 1

    # export takes the arch and classes from the trainer's checkpoint, the finder from its own.
    out = tmp_path / "bundle"
    assert main(["export", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--finder",
                 str(finder_run / "best.pt"), "--out", str(out), "--window", "32"]) == 0
    from engines.bundle import load_bundle, sha256_file

    manifest = load_bundle(out).manifest
    assert manifest.segment.arch == "student_seg" and manifest.segment.window == 32
    assert manifest.find is not None and manifest.find.arch == "finder"
    assert manifest.classes == ("scratch", "dent", "pinhole") and manifest.name == "student_seg"
    provenance = manifest.provenance
    assert provenance.weights == "trained" and provenance.recipe == "blog"
    assert provenance.teacher is not None and provenance.teacher.startswith("family-teacher_seg-")
    assert provenance.checkpoint_sha256 == sha256_file(tmp_path / "run" / "best.pt")
    assert provenance.finder_checkpoint_sha256 == sha256_file(finder_run / "best.pt")
    training = manifest.metrics["training"]
    assert "miou_fg" in training["segmenter"] or "score" in training["segmenter"]
    assert "ap" in training["finder"]


def test_kdsam_runs_its_teacher_live_without_a_cache(tmp_path: Path) -> None:
    teacher = save_checkpoint(tmp_path / "teacher.pt", "teacher_seg", build_model("teacher_seg"))
    raw = tiny_config(tmp_path, recipe__name="kdsam", schedule__epochs=2, schedule__max_steps=3,
                      teacher={"kind": "family", "checkpoint": str(teacher)})
    summary = train(parse_config(raw), log=lambda m: None)
    assert summary["step"] == 3
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["phase"] for line in lines] == [0, 1]  # the encoder epoch, then the decoder epoch
    assert {"train_mse", "train_perceptual"} <= set(lines[0]) and {"train_ce", "train_dice"} <= set(lines[1])


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"schedule__lrr": 0.1}, "schedule.lrr"),
        ({"schedule__lr": -1}, "schedule.lr"),
        ({"recipe__name": "magic"}, "recipe.name"),
        ({"data__train": [{"name": "synthetic", "n": 0}]}, "data.train.0.n"),
        ({"data__train": [{"name": "synthetic_windows", "window": 100}]}, "data.train.0.window"),
        ({"model__arch": "huge"}, "model"),
        ({"model__window": 100}, "model.window"),
        ({"recipe__name": "blog"}, "needs a 'teacher'"),
        ({"model__arch": "finder", "eval": {"metric": "ap"}, "recipe__name": "blog",
          "teacher": {"kind": "family", "checkpoint": "t.pt"}}, "a finder (finder) trains with recipe supervised"),
        ({"model__arch": "finder"}, "eval.metric ap"),
        ({"recipe__name": "mobilesam", "teacher": {"kind": "family", "checkpoint": "t.pt", "cache": "c"}},
         "teacher.cache holds embeddings"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(tmp_path: Path, change: dict, key: str, capsys) -> None:
    cfg = write(tmp_path, tiny_config(tmp_path, **change))
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("(", r"\(").replace(")", r"\)")):
        load_config(cfg)
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and key in err and str(cfg) in err and "Traceback" not in err


def test_cli_usage_errors_are_one_line(tmp_path: Path, capsys) -> None:
    cfg = write(tmp_path, tiny_config(tmp_path))
    assert main(["distill", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "distill is for recipes with a teacher" in err and "defectsam-train train" in err
    assert main(["train", "--config", str(cfg), "--set", "schedule.epochs"]) == 2
    assert "--set: expected KEY=VALUE, got 'schedule.epochs'" in capsys.readouterr().err
    assert main(["train", "--config", str(cfg), "--set", "schedule.lr=-1"]) == 2
    assert "key 'schedule.lr'" in capsys.readouterr().err
    assert main(["cache-teacher", "--config", str(cfg)]) == 2
    assert "cache-teacher needs teacher.checkpoint and teacher.cache" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config cannot be read" in capsys.readouterr().err


def test_wrong_architecture_checkpoint_is_one_line_naming_the_file(tmp_path: Path, capsys) -> None:
    other = save_checkpoint(tmp_path / "teacher.pt", "teacher_seg", build_model("teacher_seg"))
    cfg = write(tmp_path, tiny_config(tmp_path, model__init=str(other)))
    assert main(["train", "--config", str(cfg), "--set", "schedule.max_steps=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(other) in err and "teacher_seg" in err and "student_seg" in err


def test_every_command_has_help_and_finetune_teacher_is_gone(capsys) -> None:
    for command in ("train", "distill", "cache-teacher", "export", "config", "models", "eval", "calibrate",
                    "quantize", "synth", "plots"):
        with pytest.raises(SystemExit) as info:
            main([command, "--help"])
        assert info.value.code == 0
        assert "usage" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["finetune-teacher", "--help"])
    assert info.value.code == 2 and "invalid choice: 'finetune-teacher'" in capsys.readouterr().err


def test_config_reference_lists_every_key(capsys) -> None:
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    for key in ("`model.window`", "`data.positive_fraction`", "`teacher.kind`", "`recipe.soft_mask_weight`",
                "`schedule.max_steps`", "`eval.metric`"):
        assert key in out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_torchrun_two_gloo_processes(tmp_path: Path) -> None:
    raw = tiny_config(tmp_path, schedule__epochs=1, data__val=[])
    raw["eval"] = {"metric": "loss"}
    cfg = write(tmp_path, raw)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        "-m", "training.cli", "train", "--config", str(cfg),
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "rank 0/2" in output and "rank 1/2" in output, output[-3000:]
    run = tmp_path / "run"
    payload = read_checkpoint(run / "last.pt")
    assert payload["world_size"] == 2 and payload["epoch"] == 1
    # 4 samples, 2 ranks, batch 2: one step per epoch on each rank; one writer.
    assert payload["step"] == 1
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    written = {"best.pt", "config.yaml", "last.pt", "metrics.jsonl", "results.csv", "results.png"}  # no val data
    assert written <= {p.name for p in run.iterdir()} <= {*written, "tensorboard"}


@pytest.mark.parametrize("path", sorted((REPO / "training" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path) -> None:
    load_config(path)
