"""The daemon's config: YAML + environment, one-line errors naming the dotted key, the generated example."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from service.config import ConfigError, DaemonConfig, load_config
from service.config import models as config_models
from service.config.example import example_yaml

from .conftest import REPO


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "defectsam.yaml"
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), environ or {})
    message = str(info.value)
    assert "\n" not in message
    return message


def test_defaults_need_no_file() -> None:
    config = load_config(None, {})
    assert config == DaemonConfig()
    assert config.camera.type == "synthetic"
    assert config.api.port == 8080 and config.api.token is None
    assert config.engine.bundle is None and config.engine.backend.type == "onnxruntime"
    assert config.pipeline.mode == "free_run"


def test_yaml_file_and_environment_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "camera:\n  type: synthetic\n  fps: 3\napi:\n  port: 9000\n")
    config = load_config(path, {
        "DEFECTSAM__CAMERA__FPS": "10",
        "DEFECTSAM__API__TOKEN": "12345678",  # numeric-looking, stays a string
        "DEFECTSAM__ENGINE__BACKEND__PROVIDERS": "[cpu]",
        "DEFECTSAM__LOGGING__JSON": "true",
        "DEFECTSAM__PIPELINE__MODE": "triggered",
    })
    assert config.camera.fps == 10.0
    assert config.api.port == 9000
    assert config.api.token is not None and config.api.token.get_secret_value() == "12345678"
    assert config.engine.backend.providers == ["cpu"]  # type: ignore[union-attr]
    assert config.logging.json_format is True
    assert config.pipeline.mode == "triggered"


def test_inspection_section_from_the_file_and_the_environment(tmp_path: Path) -> None:
    assert DaemonConfig().engine.inspection.mode == "auto" and DaemonConfig().engine.inspection.window is None
    path = write(tmp_path, "engine:\n  inspection:\n    mode: tiles\n    window: 128\n    tile_overlap: 16\n"
                           "  postprocess:\n    mask_threshold: 0.4\n")
    config = load_config(path, {"DEFECTSAM__ENGINE__INSPECTION__MAX_WINDOWS": "12",
                                "DEFECTSAM__ENGINE__INSPECTION__CANDIDATE_THRESHOLD": "0.25"})
    inspection = config.engine.inspection
    assert (inspection.mode, inspection.window, inspection.tile_overlap) == ("tiles", 128, 16)
    assert inspection.max_windows == 12 and inspection.candidate_threshold == 0.25
    assert inspection.margin == 16 and inspection.batch == 16  # defaults kept
    assert config.engine.postprocess.mask_threshold == 0.4
    message = error_of(tmp_path, "", {"DEFECTSAM__ENGINE__INSPECTION__WINDOW": "100"})
    assert "key 'engine.inspection.window' = '100'" in message and "multiple of 16" in message
    assert "(from DEFECTSAM__ENGINE__INSPECTION__WINDOW)" in message


def test_config_path_from_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "api:\n  port: 9001\n")
    assert load_config(None, {"DEFECTSAM_CONFIG": str(path)}).api.port == 9001


@pytest.mark.parametrize(("text", "fragments"), [
    ("camera:\n  fsp: 10\n", ["key 'camera.fsp'", "unknown key"]),
    ("api:\n  prot: 1\n", ["key 'api.prot'", "unknown key"]),
    ("colour: red\n", ["key 'colour'", "unknown key"]),
    ("camera:\n  fps: -1\n", ["key 'camera.fps' = -1", "greater than 0"]),
    ("camera:\n  type: webcam\n", ["camera", "webcam", "synthetic"]),
    ("api:\n  port: 70000\n", ["key 'api.port' = 70000", "less than or equal to 65535"]),
    ("api:\n  token: short\n", ["key 'api.token' = '***'", "at least 8 characters"]),
    ("engine:\n  backend:\n    type: onnxruntime\n    providers: [gpu]\n", ["engine.backend.providers"]),
    ("engine:\n  postprocess:\n    score_threshold: 0.2\n", ["engine.postprocess", "must not exceed"]),
    ("engine:\n  postprocess:\n    mask_threshold: -1000000.0\n",  # the old logit threshold: now a probability
     ["key 'engine.postprocess.mask_threshold' = -1000000.0", "greater than 0"]),
    ("engine:\n  postprocess:\n    mask_threshold: 1\n", ["key 'engine.postprocess.mask_threshold' = 1", "less than"]),
    ("engine:\n  inspection:\n    window: 100\n", ["key 'engine.inspection.window' = 100", "multiple of 16"]),
    ("engine:\n  inspection:\n    window: 0\n", ["key 'engine.inspection.window' = 0", "greater than or equal to 16"]),
    ("engine:\n  inspection:\n    tile_overlap: -1\n",
     ["key 'engine.inspection.tile_overlap' = -1", "greater than or equal to 0"]),
    ("engine:\n  inspection:\n    mode: full\n", ["key 'engine.inspection.mode' = 'full'", "'windows', 'tiles'"]),
    ("engine:\n  inspection:\n    max_windows: 0\n", ["key 'engine.inspection.max_windows' = 0"]),
    ("engine:\n  inspection:\n    margin: 65\n", ["key 'engine.inspection.margin' = 65", "less than or equal to 64"]),
    ("engine:\n  inspection:\n    candidate_threshold: 1.5\n", ["key 'engine.inspection.candidate_threshold' = 1.5"]),
    ("engine:\n  inspection:\n    batch: 0\n", ["key 'engine.inspection.batch' = 0"]),
    ("engine:\n  inspection:\n    windw: 64\n", ["key 'engine.inspection.windw'", "unknown key"]),
    ("engine:\n  inspection: tiles\n", ["key 'engine.inspection' = 'tiles'", "valid dictionary"]),
    ("store:\n  ok_sample_share: 2\n", ["key 'store.ok_sample_share' = 2"]),
    ("pipeline:\n  mode: sometimes\n", ["key 'pipeline.mode' = 'sometimes'", "free_run"]),
    ("camera: [1, 2]\n", ["camera"]),
    ("- a list\n", ["must hold a mapping"]),
    ("camera:\n  fps: [unclosed\n", ["malformed YAML at line"]),
])
def test_bad_file_is_one_line_naming_the_key(tmp_path: Path, text: str, fragments: list[str]) -> None:
    message = error_of(tmp_path, text)
    assert message.startswith("config: ")
    for fragment in fragments:
        assert fragment in message, message


def test_bad_environment_value_names_the_variable(tmp_path: Path) -> None:
    message = error_of(tmp_path, "", {"DEFECTSAM__CAMERA__FPS": "fast"})
    assert "key 'camera.fps' = 'fast'" in message and "(from DEFECTSAM__CAMERA__FPS)" in message
    message = error_of(tmp_path, "", {"DEFECTSAM__API__PORTT": "1"})
    assert "key 'api.portt'" in message and "unknown key" in message
    message = error_of(tmp_path, "api:\n  port: 1\n", {"DEFECTSAM__API__PORT__X": "1"})
    assert "'api.port' is not a section" in message


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml", {})
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path, {})


def _models(model: type[BaseModel]) -> list[type[BaseModel]]:
    return [obj for obj in vars(config_models).values()
            if isinstance(obj, type) and issubclass(obj, config_models.Section) and obj is not config_models.Section]


def test_every_daemon_field_has_a_title_and_description() -> None:
    missing = [f"{model.__name__}.{name}" for model in _models(DaemonConfig)
               for name, info in model.model_fields.items() if not info.title or not info.description]
    assert not missing


def test_example_is_valid_yaml_giving_the_defaults(tmp_path: Path) -> None:
    text = example_yaml()
    assert yaml.safe_load(text)["api"]["port"] == 8080
    assert load_config(write(tmp_path, text), {}) == DaemonConfig()
    for key in ("camera:", "engine:", "pipeline:", "api:", "live:", "store:", "logging:",
                "# -- or type: tensorrt", "# -- or type: files", "token: null"):
        assert key in text


def test_docs_embed_the_current_example() -> None:
    docs = (REPO / "docs" / "service.md").read_text()
    found = re.search(r"<!-- config-example:start -->\n```yaml\n(.*?)```\n<!-- config-example:end -->", docs, re.S)
    assert found, "docs/service.md lost its config example markers"
    assert found.group(1) == example_yaml(), (
        "docs/service.md's config example is stale: regenerate it with "
        "'python -m tests.test_config' (or paste the output of 'defectsam config example')")


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, timeout=60)


def test_config_commands(tmp_path: Path) -> None:
    good = write(tmp_path, "api:\n  token: abcdefgh12\n")
    proc = cli("config", "check", str(good))
    assert proc.returncode == 0, proc.stderr
    assert "abcdefgh12" not in proc.stdout and "token: '**********'" in proc.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("camera:\n  fps: 0\napi:\n  prot: 1\n")
    proc = cli("config", "check", str(bad))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.splitlines()) == 2 and "camera.fps" in proc.stderr and "api.prot" in proc.stderr
    proc = cli("config", "example")
    assert proc.returncode == 0 and proc.stdout == example_yaml()


def test_serve_with_a_bad_config_stops_with_one_line(tmp_path: Path) -> None:
    bad = write(tmp_path, "camera:\n  fps: -2\n")
    proc = cli("serve", "--config", str(bad))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith("defectsam: error: config: ") and "camera.fps" in lines[0] and "-2" in lines[0]
    proc = cli("serve", env={"DEFECTSAM__STORE__RETENTION_DAYS": "-1"})
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "store.retention_days" in proc.stderr and "DEFECTSAM__STORE__RETENTION_DAYS" in proc.stderr
    proc = cli("serve", env={"DEFECTSAM__ENGINE__INSPECTION__TILE_OVERLAP": "-8"})
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert "key 'engine.inspection.tile_overlap' = '-8'" in proc.stderr
    assert "DEFECTSAM__ENGINE__INSPECTION__TILE_OVERLAP" in proc.stderr


def _update_docs() -> None:  # pragma: no cover - run by hand: python -m tests.test_config
    path = REPO / "docs" / "service.md"
    text = path.read_text()
    block = f"<!-- config-example:start -->\n```yaml\n{example_yaml()}```\n<!-- config-example:end -->"
    text = re.sub(r"<!-- config-example:start -->.*?<!-- config-example:end -->", lambda _: block, text, flags=re.S)
    path.write_text(text)


if __name__ == "__main__":  # pragma: no cover
    _update_docs()


def test_the_config_view_masks_a_camera_url_password() -> None:
    from service.config import DaemonConfig, redacted

    config = DaemonConfig.model_validate(
        {"camera": {"type": "opencv", "device": "rtsp://line4:s3cret@10.0.5.20:554/stream1"}}
    )
    shown = redacted(config)
    assert shown["camera"]["device"] == "rtsp://line4:***@10.0.5.20:554/stream1"
    assert "s3cret" not in repr(shown)


def test_a_plc_port_open_to_the_network_without_an_allowlist_is_refused(tmp_path: Path) -> None:
    """Issue 16, item 1: Modbus TCP has no authentication, so 0.0.0.0 with an empty allowlist does not start."""
    assert DaemonConfig().plc.host == "127.0.0.1" and DaemonConfig().plc.allowlist == []
    exposed = write(tmp_path, "plc:\n  host: 0.0.0.0\n")
    for args in (("config", "check", str(exposed)), ("serve", "--config", str(exposed))):
        proc = cli(*args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert lines[0].startswith(f"defectsam: error: config: {exposed}: key 'plc.host' = '0.0.0.0': ")
        assert "plc.allowlist is empty" in lines[0] and "plc.allow_any_client" in lines[0]
    proc = cli("serve", env={"DEFECTSAM__PLC__HOST": "192.0.2.7", "DEFECTSAM_CONFIG": ""})
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "key 'plc.host' = '192.0.2.7'" in proc.stderr and "(from DEFECTSAM__PLC__HOST)" in proc.stderr
    # Named clients, an explicit opt-in, loopback, or no PLC server at all: accepted.
    for text in ("plc:\n  host: 0.0.0.0\n  allowlist: [10.0.5.20]\n",
                 "plc:\n  host: '::'\n  allow_any_client: true\n",
                 "plc:\n  host: localhost\n", "plc:\n  host: '::1'\n",
                 "plc:\n  enabled: false\n  host: 0.0.0.0\n"):
        assert cli("config", "check", "--quiet", str(write(tmp_path, text))).returncode == 0, text
    assert "plc.host" in error_of(tmp_path, "plc:\n  host: plc-gw.example\n")  # a name is not resolved: not loopback


def _billion_laughs() -> str:
    """The classic alias bomb: 9 levels of 9 aliases, 387 million strings once expanded, in 342 bytes."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for previous, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [{','.join('*' + previous for _ in range(9))}]")
    return "\n".join(lines) + "\n"


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path: Path) -> None:
    """Issue 16, item 8: before, 'config check' on this file ran 81 s and took 3.1 GB (the error message's repr
    walked every expanded value); the loader now counts the aliases' expansion before building anything."""
    import time

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_billion_laughs())
    assert len(bomb.read_bytes()) < 430
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "service.cli", "config", "check", str(bomb)], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=30)
    elapsed = time.monotonic() - started
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"defectsam: error: config: {bomb}: its YAML aliases (*name) "
                                                   "expand to more than 10000 values"), proc.stderr
    assert elapsed < 10, f"config check took {elapsed:.1f} s"  # the interpreter's start-up, about 0.6 s here
    # The same bomb under a real key, and in an environment variable (read as a string, then refused by type).
    inside = _billion_laughs().replace("i: &i", "plc:\n  allowlist: &i")
    assert "expand to more than 10000 values" in error_of(tmp_path, inside)
    levels = ["&a [lol,lol,lol,lol,lol,lol,lol,lol,lol]"]
    levels += [f"&{name} [{','.join('*' + previous for _ in range(9))}]"
               for previous, name in zip("abcdefgh", "bcdefghi", strict=True)]
    started = time.monotonic()
    message = error_of(tmp_path, "", {"DEFECTSAM__PLC__ALLOWLIST": f"[{', '.join(levels)}]"})
    assert "key 'plc.allowlist'" in message and "valid list" in message and "DEFECTSAM__PLC__ALLOWLIST" in message
    assert time.monotonic() - started < 5
    # Aliases within the bound still work; a loop and a deep nest are refused in one line.
    config = load_config(write(tmp_path, "api:\n  host: &local 127.0.0.1\nplc:\n  host: *local\n"), {})
    assert config.plc.host == config.api.host == "127.0.0.1"
    assert "refers to the value that holds it" in error_of(tmp_path, "plc:\n  allowlist: &a [*a]\n")
    for depth in (40, 5000):
        assert "nests deeper than 32 levels" in error_of(tmp_path, "a: " + "[" * depth + "]" * depth + "\n")


def test_config_check_masks_camera_credentials(tmp_path: Path) -> None:
    """Issue 16, item 8: 'config check' prints the effective config, and a config error shows the value:
    neither holds a camera password, whether it has '/' or '@' in it or is a GStreamer property."""
    device = "rtspsrc location=rtsp://cam:pa/ss@w0rd@10.0.5.21/s user-pw=pa/ss@w0rd ! decodebin ! appsink"
    proc = cli("config", "check", str(write(tmp_path, f"camera:\n  type: opencv\n  device: '{device}'\n")))
    assert proc.returncode == 0, proc.stderr
    assert "rtsp://cam:***@10.0.5.21/s user-pw=*** ! decodebin" in proc.stdout and "w0rd" not in proc.stdout
    message = error_of(tmp_path, "camera:\n  type: opencv\n  device: 0\n  fourcc: 'rtsp://cam:pa/ss@w0rd@host/'\n")
    assert "key 'camera.fourcc' = 'rtsp://cam:***@host/'" in message and "w0rd" not in message
