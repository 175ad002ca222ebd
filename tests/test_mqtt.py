"""MQTT for MES/SCADA (docs/mqtt.md) against Debian's Mosquitto: a real daemon's results (checked against
/api/results) and retained state, the broker going away and coming back, the Last Will, bad config keys,
a missing paho-mqtt."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.config import ConfigError, load_config

from .daemon_support import (
    MOSQUITTO,
    base_url,
    config_data,
    get_json,
    http,
    make_config,
    ng_bundle,
    running_daemon,
    running_mosquitto,
)
from .support import wait_for

REPO = Path(__file__).resolve().parent.parent
MOSQUITTO_SUB = shutil.which("mosquitto_sub")
needs_broker = pytest.mark.skipif(
    MOSQUITTO is None or MOSQUITTO_SUB is None,
    reason="mosquitto / mosquitto_sub not installed (apt-get install mosquitto mosquitto-clients; Makefile PEERS)")
USER, PASSWORD = "line3-vision", "s3cret-broker-pw"


class Subscriber:
    """A paho-mqtt client subscribed to ``topic``: every message it gets, with its retain flag."""

    def __init__(self, port: int, topic: str) -> None:
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2)
        self.client.username_pw_set(USER, PASSWORD)
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        assert self._subscribed.wait(20), "the test subscriber did not subscribe"

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        with self._lock:
            self.messages.append((message.topic, message.payload, bool(message.retain)))

    def on(self, topic: str) -> list[tuple[bytes, bool]]:
        with self._lock:
            return [(payload, retain) for t, payload, retain in self.messages if t == topic]

    def results(self, topic: str) -> list[dict[str, Any]]:
        return [json.loads(payload) for payload, _ in self.on(topic)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _retained(port: int, topic: str) -> dict[str, bytes]:
    """What mosquitto_sub (docs/mqtt.md) gets as retained messages under ``topic``: {topic: payload}."""
    assert MOSQUITTO_SUB is not None
    proc = subprocess.run([MOSQUITTO_SUB, "-h", "127.0.0.1", "-p", str(port), "-u", USER, "-P", PASSWORD,
                           "-t", topic, "--retained-only", "-W", "3", "-F", "%t %p"],
                          capture_output=True, timeout=30)
    lines = proc.stdout.decode().splitlines()
    return {line.split(" ", 1)[0]: line.split(" ", 1)[1].encode() for line in lines if " " in line}


def _same_as_api(message: dict[str, Any], api: dict[str, Any]) -> None:
    """The MQTT result carries what GET /api/results/{id} does (less polygons, links, stored) plus station."""
    for key in ("id", "acquisition_id", "part_id", "trigger_id", "source", "bundle", "captured_at", "wall_time",
                "verdict", "frame", "defect_count", "max_peak_score", "reason", "latency_ms"):
        assert message[key] == api[key], key
    assert message["defects"] == [{k: v for k, v in d.items() if k != "polygon"} for d in api["defects"]]
    assert all({"class", "score", "bbox", "area_px"} <= set(d) for d in message["defects"])


@needs_broker
def test_results_state_and_a_broker_outage(tmp_path: Path, tiny_bundle_master: Path) -> None:
    bundle = ng_bundle(tiny_bundle_master, tmp_path.parent)
    with running_mosquitto(tmp_path, users={USER: PASSWORD}) as broker:
        base = "acme/plant1/st-7"
        config = make_config(tmp_path, bundle, mqtt={
            "enabled": True, "port": broker.port, "topic_prefix": "acme/plant1", "station": "st-7", "line": "line3",
            "username": USER, "password": PASSWORD, "queue_size": 4, "reconnect_max_s": 1, "keepalive_s": 5,
        })
        with running_daemon(config) as daemon:
            url = base_url(daemon)
            wait_for(lambda: daemon.snapshot().mqtt.published["state"] >= 1, what="the first state message")
            sub = Subscriber(broker.port, f"{base}/#")
            # Retained, so a subscriber that comes later gets them at once, flagged retained.
            assert wait_for(lambda: sub.on(f"{base}/available"), what="availability")[0] == (b"online", True)
            assert wait_for(lambda: sub.on(f"{base}/state"), what="state")[0][1] is True  # retained
            # the state is republished as soon as readiness changes (the camera connects, the engine loads)
            state = wait_for(lambda: next((s for s in map(json.loads, (p for p, _ in sub.on(f"{base}/state")))
                                           if s["ready"]), None), what="a ready state")
            assert state["station"] == "st-7" and state["line"] == "line3"
            assert state["ready"] is True and state["not_ready"] == [] and state["camera"]["up"] is True
            assert state["engine"]["bundle"] == "tiny-student-ng"
            assert re.fullmatch("[0-9a-f]{64}", state["engine"]["bundle_sha256"])
            assert state["pipeline"]["mode"] == "free_run" and "NG" in state["pipeline"]["verdicts"]

            results = wait_for(lambda: len(sub.results(f"{base}/result")) >= 3 and sub.results(f"{base}/result"),
                               what="three results")
            assert all(not retain for _, retain in sub.on(f"{base}/result"))
            for message in results[:3]:
                assert message["station"] == "st-7" and message["verdict"] == "NG" and message["defects"]
                status, api = wait_for(lambda m=message: (got := get_json(f"{url}/api/results/{m['id']}"))[0] == 200
                                       and got, what=f"result {message['id']} in the store")
                _same_as_api(message, api)
            assert get_json(f"{url}/api/config")[1]["mqtt"]["password"] == "**********"

            # The broker goes away: inspection goes on, ready for the PLC; results queue, the oldest dropped.
            broker.kill()
            wait_for(lambda: not daemon.snapshot().mqtt.connected, what="the daemon to notice the broker gone")
            seen = max(m["id"] for m in sub.results(f"{base}/result"))
            processed = daemon.snapshot().pipeline.frames_processed
            wait_for(lambda: daemon.snapshot().pipeline.frames_processed >= processed + 10, what="inspection")
            snap = wait_for(lambda: (s := daemon.snapshot()).mqtt.dropped["queue_full"] >= 1 and s,
                            what="drops counted")
            assert snap.ready and http("GET", f"{url}/readyz")[0] == 200
            assert snap.mqtt.queue_depth == 4 and snap.mqtt.last_error
            status = get_json(f"{url}/api/status")[1]["mqtt"]
            assert status["connected"] is False and status["dropped"]["queue_full"] >= 1
            metrics = http("GET", f"{url}/metrics")[2].decode()
            assert "defectsam_mqtt_connected 0.0" in metrics
            assert re.search(r'defectsam_mqtt_messages_dropped_total\{reason="queue_full"\} [1-9]', metrics)
            sub.close()

            # It comes back on the same port (with nothing retained): online again, state and results resume.
            broker.start()
            sub = Subscriber(broker.port, f"{base}/#")
            wait_for(lambda: (b"online", False) in sub.on(f"{base}/available")
                     or (b"online", True) in sub.on(f"{base}/available"), what="online again")
            wait_for(lambda: any(m["id"] > seen + 10 for m in sub.results(f"{base}/result")),
                     what="results after the outage")
            snap = daemon.snapshot()
            assert snap.mqtt.connected and snap.mqtt.reconnects >= 1 and snap.mqtt.published["result"] >= 4
            retained_now = _retained(broker.port, f"{base}/+")
            assert retained_now[f"{base}/available"] == b"online" and f"{base}/result" not in retained_now
            assert json.loads(retained_now[f"{base}/state"])["mqtt"]["reconnects"] >= 1
        # A clean stop: the final state (not ready: stopping), then offline, both retained.
        wait_for(lambda: sub.on(f"{base}/available")[-1][0] == b"offline", what="offline at stop")
        final = json.loads(sub.on(f"{base}/state")[-1][0])
        assert final["ready"] is False and "stopping" in final["not_ready"]
        sub.close()


def _write_config(tmp_path: Path, bundle: Path | None, **sections: dict[str, Any]) -> Path:
    data = config_data(tmp_path, bundle, logging={"level": "ERROR"}, **sections)
    path = tmp_path / "daemon.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@needs_broker
def test_the_broker_says_offline_when_the_daemon_vanishes(tmp_path: Path, tiny_bundle_master: Path) -> None:
    """The Last Will: a daemon killed with SIGKILL never says goodbye; the broker sets 'offline' for it."""
    bundle = ng_bundle(tiny_bundle_master, tmp_path.parent)
    with running_mosquitto(tmp_path, users={USER: PASSWORD}) as broker:
        path = _write_config(tmp_path, bundle, mqtt={"enabled": True, "port": broker.port, "station": "st-9",
                                                     "username": USER})
        env = {**os.environ, "PYTHONPATH": str(REPO), "DEFECTSAM__MQTT__PASSWORD": PASSWORD}
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--config", str(path)], cwd=REPO,
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        sub = Subscriber(broker.port, "defectsam/st-9/#")
        try:
            wait_for(lambda: sub.on("defectsam/st-9/result"), timeout=90, what="the daemon's first result")
            assert sub.on("defectsam/st-9/available")[-1][0] == b"online"
            proc.send_signal(signal.SIGKILL)
            proc.wait(20)
            wait_for(lambda: sub.on("defectsam/st-9/available")[-1][0] == b"offline", what="the Last Will")
            assert _retained(broker.port, "defectsam/st-9/available") == {"defectsam/st-9/available": b"offline"}
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(20)
            sub.close()


@pytest.mark.parametrize(("changes", "key", "why"), [
    ({"port": 0}, "mqtt.port", "greater than or equal to 1"),
    ({"port": 70000}, "mqtt.port", "less than or equal to 65535"),
    ({"host": ""}, "mqtt.host", "at least 1 character"),
    ({"host": "mqtt://broker"}, "mqtt.host", "bare host name"),
    ({"topic_prefix": "plant/#"}, "mqtt.topic_prefix", "wildcards"),
    ({"topic_prefix": "plant//line"}, "mqtt.topic_prefix", "no empty level"),
    ({"station": "st/1"}, "mqtt.station", "should match pattern"),
    ({"qos": 3}, "mqtt.qos", "less than or equal to 2"),
    ({"password": "pw-without-user"}, "mqtt.password", "a password needs a username"),
    ({"tls": {"enabled": True, "cert_file": "/etc/client.pem"}}, "mqtt.tls.cert_file", "set mqtt.tls.key_file"),
])
def test_a_bad_mqtt_key_is_named(tmp_path: Path, changes: dict[str, Any], key: str, why: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"mqtt": {"enabled": True, **changes}}))
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    message = str(caught.value)
    assert len(message.splitlines()) == 1 and f"key '{key}'" in message and why in message, message
    assert "pw-without-user" not in message


def test_enabled_without_paho_is_one_line(tmp_path: Path) -> None:
    path = _write_config(tmp_path, None, mqtt={"enabled": True})
    code = ("import sys; sys.modules['paho'] = None  # as if paho-mqtt were not installed\n"
            "from service.cli import main; sys.exit(main(['serve', '--config', sys.argv[1]]))")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "defectsam: error: mqtt.enabled is true but paho-mqtt is not installed: pip install 'defectsam[mqtt]' "
        "(or set mqtt.enabled: false)"]
