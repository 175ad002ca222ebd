"""Helpers for the daemon's tests: a small real daemon (tiny bundle, small synthetic frames) and HTTP."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from engines.results import Defect, InspectionResult, Verdict
from service.config import DaemonConfig
from service.ops import SystemdNotifier
from service.pipeline.record import InspectionRecord, StageTimes

from .support import wait_for

TOKEN = "test-token-123"
AUTH_HEADER = {"Authorization": f"Bearer {TOKEN}"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ng_bundle(master: Path, base: Path) -> Path:
    """The tiny test bundle made to find defects: two head biases raised (ONNX edited, no torch).

    Untrained weights put every candidate cell near probability 0.01 and every pixel's class near
    uniform, so nothing is ever a defect. Raising the finder's head bias makes every cell a
    candidate (the windows go to the first cells, at most 4), and raising the segmenter's
    first-class ("scratch") logit makes every pixel of every window a confident defect, so every
    frame is NG with large masks: the store, the overlay colours and the defect counters all have
    something to show. Cached under ``base`` (pytest's basetemp), so the test modules share one copy.
    """
    import onnx
    from onnx import numpy_helper

    from engines.bundle import load_bundle, write_bundle

    out = base / "ng-bundle"
    if (out / "manifest.json").is_file():
        return out
    source = load_bundle(master)
    # name -> (channel or None for all, amount)
    raise_by = {"model.head.bias": (None, 8.0), "model.decoder.head.bias": (1, 8.0)}
    files = {}
    staging = base / "ng-bundle-src"
    staging.mkdir(exist_ok=True)
    for name in source.manifest.files:
        graph = onnx.load(str(master / name))
        for init in graph.graph.initializer:
            if init.name in raise_by:
                channel, delta = raise_by[init.name]
                value = numpy_helper.to_array(init).copy()
                if channel is None:
                    value += np.float32(delta)
                else:
                    value[channel] += np.float32(delta)
                init.CopyFrom(numpy_helper.from_array(value, init.name))
        onnx.save(graph, str(staging / name))
        files[name] = staging / name
    fields = source.manifest.model_dump(mode="json", exclude={"files"})
    fields["name"] = "tiny-student-ng"
    write_bundle(out, fields, files)
    return out


def config_data(tmp_path: Path, bundle: Path | None, **sections: dict[str, Any]) -> dict[str, Any]:
    """A config for tests: small synthetic frames, a tiny bundle (see ng_bundle) on one CPU thread."""
    data: dict[str, Any] = {
        "camera": {"type": "synthetic", "width": 512, "height": 288, "pool_size": 2, "fps": 8.0},
        "engine": {
            "bundle": str(bundle) if bundle else None,
            "backend": {"type": "onnxruntime", "providers": ["cpu"], "intra_op_threads": 1},
        },
        "api": {"host": "127.0.0.1", "port": 0, "token": TOKEN},
        "store": {"path": str(tmp_path / "store"), "ok_sample_share": 1.0, "min_free_mb": 0},
        "live": {"width": 480, "max_fps": 10},
        "plc": {"enabled": False},  # tests that want the PLC turn it on with a free port
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return data


def make_config(tmp_path: Path, bundle: Path | None, **sections: dict[str, Any]) -> DaemonConfig:
    return DaemonConfig.model_validate(config_data(tmp_path, bundle, **sections))


@contextlib.contextmanager
def running_daemon(config: DaemonConfig, **kwargs: Any) -> Iterator[Any]:
    from service.app import Daemon

    daemon = Daemon(config, notifier=kwargs.pop("notifier", SystemdNotifier({})), **kwargs)
    daemon.start()
    try:
        daemon.wait_engine(60.0)
        yield daemon
    finally:
        daemon.stop()


@contextlib.contextmanager
def ng_daemon(master: Path, tmp_path_factory: Any, name: str) -> Iterator[Any]:
    """A daemon on the always-NG tiny bundle, yielded once it has published two results."""
    tmp = tmp_path_factory.mktemp(name)
    config = make_config(tmp, ng_bundle(master, tmp_path_factory.getbasetemp()))
    with running_daemon(config) as running:
        wait_for(lambda: running.counters.snapshot().frames_processed >= 2, what="results")
        yield running


def base_url(daemon: Any) -> str:
    return f"http://127.0.0.1:{daemon.port}"


def http(method: str, url: str, body: bytes | dict[str, Any] | None = None,
         headers: dict[str, str] | None = None, timeout: float = 20.0) -> tuple[int, dict[str, str], bytes]:
    headers = dict(headers or {})
    data = body
    if isinstance(body, dict):
        data = json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json")
    request = urllib.request.Request(url, data=data, method=method, headers=headers)  # type: ignore[arg-type]
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def get_json(url: str, **kwargs: Any) -> tuple[int, Any]:
    status, _, body = http("GET", url, **kwargs)
    return status, json.loads(body)


PROMETHEUS = shutil.which("prometheus")


class Prometheus:
    """A running Prometheus's HTTP API."""

    def __init__(self, api: str) -> None:
        self.api = api  # http://127.0.0.1:PORT/api/v1

    def query(self, expr: str) -> list[dict[str, Any]] | None:
        """An instant query's result vector; None while Prometheus does not answer or refuses it."""
        try:
            status, body = get_json(f"{self.api}/query?query={urllib.parse.quote(expr)}", timeout=5)
        except OSError:
            return None
        if status != 200 or body.get("status") != "success":
            return None
        return body["data"]["result"]


@contextlib.contextmanager
def running_prometheus(directory: Path, daemon_port: int, rules: Path | None = None,
                       job: dict[str, Any] | None = None) -> Iterator[Prometheus]:
    """Debian's Prometheus on a loopback port, scraping and evaluating every second the daemon at
    ``daemon_port`` (job ``defectsam``), with a copy of the ``rules`` file if given; stopped on exit.
    ``job``: keys of the scrape job that replace the plain one's (static_configs with target labels,
    relabel_configs). Its config and TSDB live in ``directory``."""
    assert PROMETHEUS is not None, "prometheus not found (make peers: Debian's prometheus)"
    scrape = {"job_name": "defectsam", "static_configs": [{"targets": [f"127.0.0.1:{daemon_port}"]}], **(job or {})}
    config: dict[str, Any] = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [scrape],
    }
    if rules is not None:
        shutil.copy(rules, directory / rules.name)
        config["rule_files"] = [rules.name]
    (directory / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    port = free_port()
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={directory / 'prometheus.yml'}", f"--storage.tsdb.path={directory / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        yield Prometheus(f"http://127.0.0.1:{port}/api/v1")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").is_file() else None)
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd")


class Mosquitto:
    """Debian's Mosquitto on a loopback port with its own config file (no persistence); ``kill`` and
    ``start`` again on the same port stand for a broker that goes away and comes back."""

    def __init__(self, directory: Path, users: dict[str, str] | None = None) -> None:
        assert MOSQUITTO is not None, "mosquitto not found (make peers: Debian's mosquitto)"
        self.directory = directory
        self.port = free_port()
        lines = [f"listener {self.port} 127.0.0.1", "persistence false", "log_dest stderr",
                 "log_type error", "log_type warning"]
        if os.geteuid() == 0:  # mosquitto started as root switches to its own user, who cannot read pytest's tmp
            lines.append("user root")
        if users:
            assert MOSQUITTO_PASSWD is not None, "mosquitto_passwd not found (Debian's mosquitto)"
            passwords = directory / "passwords"
            for i, (user, password) in enumerate(users.items()):
                subprocess.run([MOSQUITTO_PASSWD, "-b", *(["-c"] if i == 0 else []), str(passwords), user, password],
                               check=True, capture_output=True, timeout=30)
            lines += ["allow_anonymous false", f"password_file {passwords}"]
        else:
            lines.append("allow_anonymous true")
        self.config = directory / "mosquitto.conf"
        self.config.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (self.directory / "mosquitto.log").open("ab")
        self.proc = subprocess.Popen([str(MOSQUITTO), "-c", str(self.config)], stdout=log, stderr=log)
        log.close()

        def listening() -> bool:
            assert self.proc is not None and self.proc.poll() is None, (
                f"mosquitto exited: {(self.directory / 'mosquitto.log').read_text()[-2000:]}")
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", self.port)) == 0

        wait_for(listening, timeout=20, what=f"mosquitto on port {self.port}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


@contextlib.contextmanager
def running_mosquitto(directory: Path, users: dict[str, str] | None = None) -> Iterator[Mosquitto]:
    broker = Mosquitto(directory, users)
    broker.start()
    try:
        yield broker
    finally:
        broker.kill()


def make_record(inspection_id: int, verdict: Verdict = Verdict.NG, *, wall_time: float | None = None,
                size: tuple[int, int] = (120, 200), part_id: str | None = None) -> InspectionRecord:
    """A record with a real frame and, for NG, two defects with masks."""
    h, w = size
    rng = np.random.default_rng(inspection_id)
    frame = rng.integers(60, 120, size=(h, w, 3), dtype=np.uint8)
    defects: tuple[Defect, ...] = ()
    if verdict == Verdict.NG:
        first = np.zeros((10, 20), dtype=bool)
        first[2:8, 3:17] = True
        second = np.ones((5, 5), dtype=bool)
        defects = (
            Defect(0, "scratch", 0.9, 0.8, int(first.sum()), (30, 40, 20, 10), (40.0, 45.0), (40.0, 45.0), first),
            Defect(2, "pinhole", 0.7, 0.6, 25, (100, 60, 5, 5), (102.0, 62.0), (102.0, 62.0), second),
        )
    result = InspectionResult(w, h, verdict, defects, 0.9 if defects else 0.1)
    now = time.monotonic()
    times = StageTimes(captured=now - 0.05, preprocess_start=now - 0.04, preprocess_done=now - 0.03,
                       infer_done=now - 0.01, post_done=now)
    return InspectionRecord(
        inspection_id=inspection_id, acquisition_id=inspection_id, source="test", result=result,
        wall_time=time.time() if wall_time is None else wall_time, times=times, bundle="tiny",
        part_id=part_id, frame=frame,
    )
