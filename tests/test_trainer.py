"""The trainer end to end on tiny synthetic data: checkpoints, resume, config errors, the CLI, and
two gloo processes under torchrun."""

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
SYNTH = {"name": "synthetic", "width": 128, "height": 72, "pixel_scale": 0.5}


def tiny_config(tmp_path: Path, **changes: object) -> dict:
    raw: dict = {
        "name": "tiny",
        "out": str(tmp_path / "run"),
        "model": {"arch": "student_cnn", "height": 64, "width": 128, "k": 2},
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
    summary = train(config, log=lambda m: None)
    run = tmp_path / "run"
    assert summary["epoch"] == 2 and (run / "last.pt").is_file() and (run / "best.pt").is_file()
    payload = read_checkpoint(run / "last.pt")
    assert payload["arch"] == "student_cnn" and payload["epoch"] == 2 and payload["step"] == 4
    assert {"optimizer", "scheduler", "train_config", "classes", "recipe"} <= set(payload)
    assert payload["classes"] == ["scratch", "dent", "pinhole"]
    assert not [p for p in run.iterdir() if ".tmp" in p.name], "no temporary files are left"
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert "val_miou" in json.loads(lines[-1])

    # Two more epochs resume from last.pt: the counters go on, the first two epochs are not redone.
    longer = parse_config(tiny_config(tmp_path, schedule__epochs=3))
    summary = train(longer, log=lambda m: None)
    assert read_checkpoint(run / "last.pt")["step"] == 6
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_distill_blog_with_a_cached_family_teacher_and_export(tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = save_checkpoint(tmp_path / "teacher.pt", "teacher_cnn", build_model("teacher_cnn", height=64, width=128))
    raw = tiny_config(
        tmp_path, recipe__name="blog", schedule__epochs=1, schedule__max_steps=1,
        teacher={"kind": "family", "checkpoint": str(teacher), "cache": str(tmp_path / "cache")},
    )  # fmt: skip
    cfg = write(tmp_path, raw)
    assert main(["cache-teacher", "--config", str(cfg)]) == 0
    caches = list((tmp_path / "cache").iterdir())
    assert len(caches) == 1 and len(json.loads((caches[0] / "index.json").read_text())["entries"]) == 4
    assert main(["distill", "--config", str(cfg)]) == 0
    payload = read_checkpoint(tmp_path / "run" / "best.pt")
    assert payload["recipe"] == "blog" and payload["teacher"].startswith("family-teacher_cnn-")

    # export takes the arch, size, K and classes from the trainer's checkpoint.
    out = tmp_path / "bundle"
    assert main(["export", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["arch"] == "student_cnn" and manifest["input"]["height"] == 64 and manifest["K"] == 2
    assert manifest["provenance"]["weights"] == "trained" and manifest["provenance"]["recipe"] == "blog"


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"schedule__lrr": 0.1}, "schedule.lrr"),
        ({"schedule__lr": -1}, "schedule.lr"),
        ({"recipe__name": "magic"}, "recipe.name"),
        ({"data__train": [{"name": "synthetic", "n": 0}]}, "data.train.0.n"),
        ({"model__arch": "huge"}, "model"),
        ({"recipe__name": "blog"}, "needs a 'teacher'"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(tmp_path: Path, change: dict, key: str, capsys) -> None:
    cfg = write(tmp_path, tiny_config(tmp_path, **change))
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(cfg)
    assert main(["distill", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and key in err and str(cfg) in err and "Traceback" not in err


def test_wrong_architecture_checkpoint_is_one_line_naming_the_file(tmp_path: Path, capsys) -> None:
    vit = save_checkpoint(tmp_path / "vit.pt", "student_vit", build_model("student_vit", height=64, width=128, k=2))
    cfg = write(tmp_path, tiny_config(tmp_path, model__init=str(vit)))
    assert main(["distill", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(vit) in err and "student_vit" in err


def test_every_command_has_help(capsys) -> None:
    for command in ("distill", "finetune-teacher", "cache-teacher", "export", "config"):
        with pytest.raises(SystemExit) as info:
            main([command, "--help"])
        assert info.value.code == 0
        assert "usage" in capsys.readouterr().out


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
        "-m", "training.cli", "distill", "--config", str(cfg),
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "rank 0/2" in output and "rank 1/2" in output, output[-3000:]
    run = tmp_path / "run"
    payload = read_checkpoint(run / "last.pt")
    assert payload["world_size"] == 2 and payload["epoch"] == 1
    # 4 samples, 2 ranks, batch 2: one step per epoch on each rank; one writer.
    assert payload["step"] == 1
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "config.yaml", "last.pt", "metrics.jsonl"]


@pytest.mark.parametrize("path", sorted((REPO / "training" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path) -> None:
    load_config(path)
