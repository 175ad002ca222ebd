"""Engine states end to end without a GPU: the backends' ``on_state`` callback, the daemon's "engine
building" readiness (HTTP, metrics, sd_notify over a real socket), and ``defectsam engine build``
where TensorRT is missing.

The daemon test opens the real ONNX Runtime engine through an opener that first reports
``building`` and holds, as the TensorRT backend does while it compiles a plan: what is under test
is the daemon's plumbing of that state, not the build.
"""

from __future__ import annotations

import importlib.util
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from engines.backends import BackendConfig, StateCallback, open_engine
from engines.backends import onnxruntime as ort_backend
from engines.backends import tensorrt as trt_backend
from engines.bundle import Bundle, load_bundle
from engines.engine import Engine
from engines.errors import BundleError
from service.cli import main
from service.commands.engine import graph_profiles, trtexec_command
from service.ops import SystemdNotifier

from .daemon_support import base_url, get_json, http, make_config, running_daemon, wait_for

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None and importlib.util.find_spec("pycuda") is not None


# --- the backends' state callback ----------------------------------------------------------------


def test_onnxruntime_engine_reports_ready_and_closed_through_the_registry(tiny_bundle: Path) -> None:
    states: list[str] = []
    engine = open_engine(tiny_bundle, ort_backend.Config(providers=["cpu"]), on_state=states.append)
    assert states == ["ready"] and engine.state == "ready"  # type: ignore[attr-defined]
    engine.close()
    engine.close()
    assert states == ["ready", "closed"]


def test_onnxruntime_engine_that_cannot_load_reports_failed(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    (tiny_bundle / bundle.manifest.graphs.segment).write_bytes(b"not onnx")  # after the checksum check
    states: list[str] = []
    with pytest.raises(BundleError, match="ONNX Runtime cannot load"):
        ort_backend.open_engine(bundle, ort_backend.Config(providers=["cpu"]), on_state=states.append)
    assert states == ["failed"]


# --- the daemon while its engine builds -------------------------------------------------------------


class HeldBuild:
    """Opens the real engine, but first reports ``building`` and waits until released."""

    def __init__(self) -> None:
        self.building = threading.Event()
        self.release = threading.Event()

    def __call__(self, bundle: Bundle, config: BackendConfig, *, on_state: StateCallback | None = None) -> Engine:
        assert on_state is not None, "the daemon must pass its state callback"
        on_state("building")
        self.building.set()
        self.release.wait(60)
        return open_engine(bundle, config, on_state=on_state)


def _engine_state_gauges(url: str) -> dict[str, float]:
    _, _, body = http("GET", f"{url}/metrics")
    family = next(f for f in text_string_to_metric_families(body.decode()) if f.name == "defectsam_engine_state")
    return {s.labels["state"]: s.value for s in family.samples}


@pytest.mark.slow
def test_daemon_reports_an_engine_build_in_readyz_metrics_and_systemd(tiny_bundle: Path, tmp_path: Path) -> None:
    notify_path = str(tmp_path / "notify.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(notify_path)
    server.settimeout(30)
    held = HeldBuild()
    config = make_config(tmp_path, tiny_bundle)
    notifier = SystemdNotifier({"NOTIFY_SOCKET": notify_path})
    messages: list[str] = []
    try:
        from service.app import ENGINE_BUILD_BUDGET_S, Daemon

        daemon = Daemon(config, notifier=notifier, engine_opener=held)
        daemon.start()
        try:
            assert held.building.wait(30)
            url = base_url(daemon)
            wait_for(lambda: daemon.camera.stats().state.value == "connected", what="the camera")
            status, ready = get_json(f"{url}/readyz")
            assert status == 503 and ready["ready"] is False
            assert len(ready["reasons"]) == 1 and ready["reasons"][0].startswith("engine building (a onnxruntime")
            assert get_json(f"{url}/healthz")[0] == 200 and daemon.healthy()
            assert get_json(f"{url}/api/status")[1]["engine"]["state"] == "building"
            assert _engine_state_gauges(url) == {"loading": 0, "building": 1, "ready": 0, "failed": 0}
            while not any(m.startswith("EXTEND_TIMEOUT_USEC=") for m in messages):
                messages.extend(server.recv(4096).decode().splitlines())
            assert f"EXTEND_TIMEOUT_USEC={ENGINE_BUILD_BUDGET_S * 1_000_000}" in messages
            assert any(m.startswith("STATUS=building the onnxruntime engine") for m in messages)
            assert "READY=1" not in messages  # systemd keeps waiting (its start timeout extended)

            held.release.set()
            assert daemon.wait_engine(60) == "ready"
            while "READY=1" not in messages:
                messages.extend(server.recv(4096).decode().splitlines())
            assert any(m.startswith("STATUS=inspecting") for m in messages)
            wait_for(lambda: get_json(f"{url}/readyz")[0] == 200, what="readiness")
            assert _engine_state_gauges(url)["ready"] == 1
        finally:
            held.release.set()
            daemon.stop()
    finally:
        server.close()


@pytest.mark.slow
def test_a_plain_onnxruntime_start_never_reports_building(tiny_bundle: Path, tmp_path: Path) -> None:
    with running_daemon(make_config(tmp_path, tiny_bundle)) as daemon:
        assert daemon.wait_engine(60) == "ready"
        assert daemon._build_started is None
        assert not any("building" in reason for reason in daemon.not_ready())


# --- defectsam engine build -----------------------------------------------------------------------------


@pytest.mark.skipif(HAVE_TRT, reason="tensorrt and pycuda are installed here")
@pytest.mark.parametrize("extra", [[], ["--trtexec"], ["--precision", "fp32", "--force"]])
def test_engine_build_without_tensorrt_fails_in_one_line(
    tiny_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str]
) -> None:
    code = main(["engine", "build", "--bundle", str(tiny_bundle), "--plan-dir", str(tmp_path / "plans"), *extra])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.count("\n") == 1, err
    assert err.startswith("defectsam: error: backend 'tensorrt' needs the tensorrt and pycuda packages")
    assert "pip install 'defectsam[tensorrt]'" in err
    assert not (tmp_path / "plans").exists() and not list(tiny_bundle.glob("*.plan"))


def test_engine_build_int8_without_a_qdq_graph_fails_before_tensorrt(
    tiny_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["engine", "build", "--bundle", str(tiny_bundle), "--precision", "int8"])
    _, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and str(tiny_bundle) in err
    assert "backend.precision 'int8' needs the bundle's INT8 QDQ graphs" in err and "--target tensorrt" in err


def test_engine_build_takes_bundle_and_backend_settings_from_the_config(
    tiny_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "station.yaml"
    config.write_text(f"engine:\n  bundle: {tiny_bundle}\n  backend:\n    type: tensorrt\n    precision: int8\n")
    monkeypatch.setenv("DEFECTSAM_CONFIG", str(config))
    code = main(["engine", "build"])  # the config's int8 is refused for this bundle: the config was read
    assert code == 2 and "needs the bundle's INT8 QDQ graphs" in capsys.readouterr().err
    monkeypatch.setenv("DEFECTSAM__ENGINE__BACKEND__WORKSPACE_MIB", "1")
    code = main(["engine", "build"])
    assert code == 2 and "engine.backend.workspace_mib" in capsys.readouterr().err


# --- the trtexec equivalent ----------------------------------------------------------------------------


def test_trtexec_command_matches_the_builder_settings(tiny_bundle: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnx", reason="reading the graphs' profiles needs onnx")
    bundle = load_bundle(tiny_bundle)
    config = trt_backend.Config(max_batch=8, workspace_mib=512, device=1, plan_dir=tmp_path)
    segment = trt_backend.plan_path(bundle, config, "10.3.0.30", "Orin", (8, 7))
    assert trtexec_command(bundle.segment_graph, segment, config, graph_profiles(bundle, "segment", config)) == [
        "/usr/src/tensorrt/bin/trtexec", f"--onnx={bundle.segment_graph}", f"--saveEngine={segment}",
        "--memPoolSize=workspace:512", "--device=1", "--skipInference", "--fp16",
        "--minShapes=windows:1x3x16x16", "--optShapes=windows:8x3x64x64", "--maxShapes=windows:8x3x64x64",
    ]
    assert bundle.find_graph is not None
    find = trt_backend.plan_path(bundle, config, "10.3.0.30", "Orin", (8, 7), graph="find")
    command = trtexec_command(bundle.find_graph, find, config, graph_profiles(bundle, "find", config))
    assert command[1:3] == [f"--onnx={bundle.find_graph}", f"--saveEngine={find}"] and find != segment
    assert command[-3:] == [
        "--minShapes=image:1x3x16x16", "--optShapes=image:1x3x384x672", "--maxShapes=image:1x3x384x672",
    ]
    int8 = trt_backend.Config(precision="int8")
    assert trtexec_command(Path("m.int8.onnx"), Path("p.plan"), int8, {})[-2:] == ["--fp16", "--int8"]
    fp32 = trtexec_command(Path("m.onnx"), Path("p.plan"), trt_backend.Config(precision="fp32"), {})
    assert "--fp16" not in fp32 and "--int8" not in fp32


def test_cli_lists_the_engine_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["engine", "build", "--help"])
    assert caught.value.code == 0
    out: Any = capsys.readouterr().out
    for flag in ("--bundle", "--precision", "--plan-dir", "--force", "--trtexec"):
        assert flag in out
