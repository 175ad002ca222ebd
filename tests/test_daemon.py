"""The daemon end to end: real uvicorn on loopback, the synthetic camera, a tiny engine, the store on disk.

The subprocess test is the daemon as systemd runs it: a real unix datagram socket receives
READY=1, WATCHDOG=1 and STOPPING=1, and SIGTERM loses no record.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.config import DaemonConfig
from service.ops import SystemdNotifier
from service.pipeline.record import InspectionRecord
from service.store import DB_NAME, RecordStore

from .conftest import REPO
from .daemon_support import (
    AUTH_HEADER,
    base_url,
    config_data,
    free_port,
    get_json,
    http,
    make_config,
    ng_bundle,
    running_daemon,
    wait_for,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundle(tiny_bundle_master: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ng_bundle(tiny_bundle_master, tmp_path_factory.getbasetemp())


def test_notifier_speaks_sd_notify_over_a_unix_datagram_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        notifier = SystemdNotifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "3000000"})
        assert notifier.enabled and notifier.watchdog_interval == 1.5
        assert notifier.notify("READY=1", "STATUS=inspecting")
        assert server.recv(4096) == b"READY=1\nSTATUS=inspecting"
        notifier.close()
    name = f"defectsam-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)  # abstract namespace, as systemd may hand out
        notifier = SystemdNotifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.notify("STOPPING=1") and server.recv(100) == b"STOPPING=1"
        notifier.close()
    assert not SystemdNotifier({}).notify("READY=1")  # outside systemd: a no-op
    other_pid = SystemdNotifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"})
    assert other_pid.watchdog_interval is None  # the watchdog is meant for another process


def test_serve_under_systemd_notify_and_sigterm_loses_nothing(bundle: Path, tmp_path: Path) -> None:
    port = free_port()
    data = config_data(tmp_path, bundle, api={"port": port}, logging={"json": True, "level": "INFO"},
                       camera={"fps": 10.0})
    config_file = tmp_path / "defectsam.yaml"
    config_file.write_text(yaml.safe_dump(data))
    notify_path = str(tmp_path / "notify.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(notify_path)
    server.settimeout(30)
    env = {**os.environ, "PYTHONPATH": str(REPO), "NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": "600000"}
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--config", str(config_file)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    messages: list[str] = []
    try:
        while "READY=1" not in messages:
            messages.extend(server.recv(4096).decode().splitlines())
        assert any(m.startswith("STATUS=inspecting (free_run)") for m in messages), messages
        while messages.count("WATCHDOG=1") < 2:  # every 0.3 s while healthy
            messages.extend(server.recv(4096).decode().splitlines())
        url = f"http://127.0.0.1:{port}"
        assert get_json(f"{url}/readyz")[0] == 200
        wait_for(lambda: get_json(f"{url}/api/status")[1]["store"]["written"] >= 3, what="stored records")
        proc.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in messages:
            messages.extend(server.recv(4096).decode().splitlines())
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        server.close()
    assert proc.returncode == 0, err
    assert f"http://127.0.0.1:{port}/" in out
    logs = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert logs and all({"ts", "level", "logger", "msg"} <= set(entry) for entry in logs)
    final = [entry for entry in logs if entry.get("event") == "stopped"][-1]
    # every result published before the stop was kept (NG: all kept), none dropped
    rows = sqlite3.connect(tmp_path / "store" / DB_NAME).execute("SELECT COUNT(*) FROM records").fetchone()[0]
    assert final["store_dropped"] == 0
    assert rows == final["store_written"] == final["results"] > 0


def test_triggered_mode_inspects_only_triggered_frames(bundle: Path, tmp_path: Path) -> None:
    config = make_config(tmp_path, bundle, pipeline={"mode": "triggered", "trigger_timeout_s": 3.0})
    with running_daemon(config) as daemon:
        url = base_url(daemon)
        wait_for(lambda: daemon.camera.stats().frames_captured >= 3, what="camera frames")
        assert daemon.counters.snapshot().frames_processed == 0  # nothing inspected without a trigger
        results = []
        for part in ("P-1", "P-2", "P-3"):
            status, _, body = http("POST", f"{url}/api/trigger", {"part_id": part, "wait": True}, headers=AUTH_HEADER)
            assert status == 200, body
            results.append(json.loads(body)["result"])
        assert [r["part_id"] for r in results] == ["P-1", "P-2", "P-3"]
        assert len({r["acquisition_id"] for r in results}) == 3
        assert all(r["verdict"] == "NG" for r in results)
        snapshot = daemon.counters.snapshot()
        assert snapshot.frames_processed == 3 and snapshot.triggers["inspected"] == 3
        wait_for(lambda: daemon.store.stats().written == 3, what="three stored")
        status, page = get_json(f"{url}/api/results?part_id=P-2")
        assert status == 200 and [item["part_id"] for item in page["items"]] == ["P-2"]

        daemon.camera.stop()  # the camera goes away: a trigger fails safe with NO_FRAME
        status, _, body = http("POST", f"{url}/api/trigger", {"part_id": "P-4", "wait": True}, headers=AUTH_HEADER)
        result = json.loads(body)["result"]
        assert status == 200 and result["verdict"] == "NO_FRAME" and result["part_id"] == "P-4"
        assert "no frame within 3 s" in result["reason"]
        status, ready = get_json(f"{url}/readyz")
        assert status == 503 and any(reason.startswith("camera stopped") for reason in ready["reasons"])


def test_an_engine_that_fails_to_load_leaves_the_daemon_up_and_not_ready(tmp_path: Path) -> None:
    config = make_config(tmp_path, tmp_path / "no-such-bundle")
    with running_daemon(config) as daemon:
        url = base_url(daemon)
        assert daemon.wait_engine(10) == "failed"
        status, ready = get_json(f"{url}/readyz")
        assert status == 503 and ready["ready"] is False
        assert any("engine failed to load" in r and "no-such-bundle" in r for r in ready["reasons"])
        status, body = get_json(f"{url}/api/status")
        assert body["engine"]["state"] == "failed" and "bundle directory does not exist" in body["engine"]["error"]
        status, _, raw = http("POST", f"{url}/api/trigger", {"part_id": "X"}, headers=AUTH_HEADER)
        assert status == 503 and "engine is failed" in json.loads(raw)["detail"]
        status, latest = get_json(f"{url}/api/results/latest")
        assert status == 404 and "engine failed to load" in latest["detail"]
        assert get_json(f"{url}/healthz")[0] == 200 and daemon.healthy()


def test_frames_smaller_than_the_window_make_the_daemon_not_ready_until_they_fit(
        bundle: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A camera whose frames the bundle cannot inspect as configured (48x48 frames, 64 px windows, windows
    mode): the engine loads, but the daemon stays not ready with the reason in /readyz, /api/status and
    /metrics, inspects nothing, answers a trigger NO_FRAME and logs the cause once, not once per frame.
    Once the frames fit (the files camera lists its folder again at each pass) it is ready and inspecting."""
    import cv2
    import numpy as np

    from engines.synthetic import render_frame

    folder = tmp_path / "frames"
    folder.mkdir()
    small = folder / "a-small.png"
    cv2.imwrite(str(small), np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8))
    data = config_data(tmp_path, bundle, engine={"inspection": {"mode": "windows"}})
    data["camera"] = {"type": "files", "path": str(folder), "fps": 10.0}
    config = DaemonConfig.model_validate(data)
    caplog.set_level("ERROR", logger="service.pipeline.runner")
    with running_daemon(config) as daemon:
        url = base_url(daemon)
        assert daemon.wait_engine(10) == "ready"
        reason = ("frames cannot be inspected: inspection.window 64 is larger than the frame (48x48); use a smaller "
                  "window or inspection.mode: whole")
        wait_for(lambda: daemon.counters.snapshot().errors >= 3, what="three frames refused")
        status, ready = get_json(f"{url}/readyz")
        assert status == 503 and ready["reasons"] == [reason]
        status, body = get_json(f"{url}/api/status")
        assert body["ready"] is False and body["not_ready"] == [reason]
        assert body["engine"]["state"] == "ready" and body["engine"]["error"] is None  # the engine is not the cause
        assert body["camera"]["state"] == "connected" and body["pipeline"]["frames_processed"] == 0
        _, _, metrics = http("GET", f"{url}/metrics")
        assert b"\ndefectsam_ready 0.0\n" in metrics
        status, _, raw = http("POST", f"{url}/api/trigger", {"part_id": "S-1", "wait": True}, headers=AUTH_HEADER)
        result = json.loads(raw)["result"]
        assert status == 200 and result["verdict"] == "NO_FRAME" and result["part_id"] == "S-1"
        assert "FrameGeometryError" in result["reason"] and "larger than the frame (48x48)" in result["reason"]
        logged = [r for r in caplog.records if "frames cannot be inspected" in r.getMessage()]
        assert len(logged) == 1, [r.getMessage() for r in logged]

        cv2.imwrite(str(folder / "b-fits.png"), render_frame(0, 512, 288, with_masks=False).image)
        small.unlink()
        wait_for(lambda: get_json(f"{url}/readyz") == (200, {"ready": True, "reasons": []}), timeout=60,
                 what="the daemon to be ready once the frames fit")
        wait_for(lambda: daemon.counters.snapshot().frames_processed >= 2, what="results")
        status, latest = get_json(f"{url}/api/results/latest")
        assert status == 200 and latest["verdict"] == "NG" and latest["frame"] == {"width": 512, "height": 288}


def test_a_configured_window_larger_than_the_frames_is_refused_not_replaced(bundle: Path, tmp_path: Path) -> None:
    """engine.inspection.window 320 on 512x288 frames in auto mode: not quietly the whole frame instead
    (only the bundle's own window falls back to it), but not ready, naming the key and the frame."""
    config = make_config(tmp_path, bundle, engine={"inspection": {"window": 320}})
    with running_daemon(config) as daemon:
        url = base_url(daemon)
        reason = ("frames cannot be inspected: inspection.window 320 is larger than the frame (512x288); use a "
                  "smaller window or inspection.mode: whole")
        wait_for(lambda: daemon.counters.snapshot().errors >= 2, what="two frames refused")
        assert get_json(f"{url}/readyz") == (503, {"ready": False, "reasons": [reason]})
        assert daemon.counters.snapshot().frames_processed == 0


@pytest.mark.parametrize(("inspection", "mode", "seen_as"), [
    ({"mode": "whole"}, "whole", "whole frame"),
    ({"mode": "tiles"}, "tiles", "tiles 64 px"),
])
def test_every_mode_inspects_and_the_status_says_how(bundle: Path, tmp_path: Path, inspection: dict[str, Any],
                                                     mode: str, seen_as: str) -> None:
    """engine.inspection reaches the pipeline: the daemon is ready and inspecting in the mode it chose, and
    /api/status says how the engine sees a frame."""
    config = make_config(tmp_path, bundle, engine={"inspection": inspection})
    with running_daemon(config) as daemon:
        url = base_url(daemon)
        # tiles: 120 windows a frame, seconds each on a loaded 2-core box
        wait_for(lambda: daemon.counters.snapshot().frames_processed >= 2, timeout=120, what="results")
        assert get_json(f"{url}/readyz") == (200, {"ready": True, "reasons": []})
        assert daemon.counters.snapshot().errors == 0 and daemon.pipeline.inspector.mode_for(512, 288) == mode
        status, body = get_json(f"{url}/api/status")
        assert status == 200 and body["engine"]["input"] == seen_as
        status, latest = get_json(f"{url}/api/results/latest")
        assert status == 200 and latest["verdict"] == "NG" and latest["defect_count"] >= 1


def test_a_tile_overlap_as_large_as_the_bundles_window_fails_the_engine_with_the_key(
        bundle: Path, tmp_path: Path) -> None:
    """engine.inspection.tile_overlap is checked against the window when the engine loads (the window may
    be the bundle's, which the config does not know): the daemon stays up, not ready, naming the key."""
    config = make_config(tmp_path, bundle, engine={"inspection": {"mode": "tiles", "tile_overlap": 64}})
    with running_daemon(config) as daemon:
        assert daemon.wait_engine(10) == "failed"
        reason = "engine failed to load: inspection.tile_overlap (64) must be smaller than the window (64)"
        # the engine fails within milliseconds; the camera may still be starting then (a reason of its own)
        wait_for(lambda: get_json(f"{base_url(daemon)}/readyz")[1]["reasons"] == [reason], timeout=30,
                 what="the camera connected, the engine's failure the only reason")
        status, ready = get_json(f"{base_url(daemon)}/readyz")
        assert status == 503 and ready["reasons"] == [reason]


def _read_mjpeg_parts(url: str, count: int, timeout: float = 30.0) -> list[bytes]:
    parts = []
    with urllib.request.urlopen(url, timeout=timeout) as response:
        assert response.headers["Content-Type"] == "multipart/x-mixed-replace; boundary=frame"
        while len(parts) < count:
            line = response.readline()
            if not line:
                break  # the server closed the stream (looping on EOF here once burnt a core for the whole run)
            if line.startswith(b"Content-Length:"):
                length = int(line.split(b":")[1])
                response.readline()
                parts.append(response.read(length))
    return parts


def test_live_view_encodes_only_while_watched_and_events_stream(bundle: Path, tmp_path: Path) -> None:
    config = make_config(tmp_path, bundle, live={"max_fps": 20})
    with running_daemon(config) as daemon:
        url = base_url(daemon)
        wait_for(lambda: daemon.counters.snapshot().frames_processed >= 4, what="results")
        assert daemon.live.viewers == 0 and daemon.live.encoded == 0  # results flowed, nothing was encoded

        parts = _read_mjpeg_parts(f"{url}/api/live.mjpeg", 3)
        assert all(p[:2] == b"\xff\xd8" for p in parts)  # JPEG
        assert daemon.live.encoded >= 3
        wait_for(lambda: daemon.live.viewers == 0, what="the viewer to be counted out")
        time.sleep(0.5)
        encoded = daemon.live.encoded
        time.sleep(1.0)
        assert daemon.live.encoded == encoded  # stopped with the last viewer

        events: list[tuple[str, Any]] = []
        with urllib.request.urlopen(f"{url}/api/events", timeout=30) as response:
            kind = None
            while len([e for e in events if e[0] == "result"]) < 2:
                raw = response.readline()
                assert raw, "the event stream ended early"
                line = raw.decode().strip()
                if line.startswith("event:"):
                    kind = line.split(":", 1)[1].strip()
                elif line.startswith("data:"):
                    events.append((kind or "", json.loads(line[5:])))
        kinds = [k for k, _ in events]
        assert kinds[0] == "status" and events[0][1]["ready"] is True
        result = next(payload for k, payload in events if k == "result")
        assert result["verdict"] == "NG" and "polygon" not in result["defects"][0]
        wait_for(lambda: daemon.events.clients == 0, what="the event client to be counted out")


class SlowStore(RecordStore):
    """A store on a disk that takes half a second per record."""

    def _encode(self, record: InspectionRecord) -> Any:
        time.sleep(0.5)
        return super()._encode(record)


def test_a_slow_disk_and_a_stalled_viewer_never_stall_inference(bundle: Path, tmp_path: Path) -> None:
    config = make_config(tmp_path, bundle, store={"queue_size": 2}, camera={"fps": 20.0})
    with running_daemon(config) as daemon:
        slow = SlowStore(config.store)
        slow.open()
        slow.start()
        daemon.pipeline.subscribe("slow-store", slow.offer)
        # a viewer that connects and never reads
        stalled = socket.create_connection(("127.0.0.1", daemon.port))
        stalled.sendall(b"GET /api/live.mjpeg HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_for(lambda: daemon.live.viewers == 1, what="the stalled viewer")
        start = daemon.counters.snapshot().frames_processed
        time.sleep(3.0)
        processed = daemon.counters.snapshot().frames_processed - start
        stalled.close()
        slow.stop()
        assert processed >= 6, f"only {processed} frames in 3 s"  # the tiny engine keeps its pace
        assert slow.stats().dropped["queue_full"] > 0 and slow.stats().written < processed
        assert daemon.pipeline.healthy()


def test_in_process_shutdown_is_prompt_with_clients_connected(bundle: Path, tmp_path: Path) -> None:
    config = make_config(tmp_path, bundle)
    with running_daemon(config) as daemon:
        url = base_url(daemon)
        wait_for(lambda: daemon.counters.snapshot().frames_processed >= 1, what="a result")
        reader = threading.Thread(target=lambda: _read_mjpeg_parts(f"{url}/api/live.mjpeg", 10**6, 60),
                                  daemon=True)
        reader.start()
        wait_for(lambda: daemon.live.viewers == 1, what="a viewer")
        started = time.monotonic()
    assert time.monotonic() - started < 15
    assert not daemon.pipeline.healthy()


def test_a_held_pipeline_inspects_nothing_and_then_resumes(bundle: Path, tmp_path: Path) -> None:
    """Pipeline.hold() (the pipeline benchmark's engine-only slices): the engine is idle inside, the
    camera keeps capturing, the stage threads stay healthy, and inspection resumes afterwards."""
    config = make_config(tmp_path, bundle, camera={"fps": 20.0})
    with running_daemon(config) as daemon:
        wait_for(lambda: daemon.counters.snapshot().frames_processed >= 2, what="results")
        with daemon.pipeline.hold():
            held_at = daemon.counters.snapshot().frames_processed
            captured = daemon.camera.stats().frames_captured
            time.sleep(1.0)
            assert daemon.counters.snapshot().frames_processed == held_at
            assert daemon.camera.stats().frames_captured > captured
            assert daemon.pipeline.healthy()
        wait_for(lambda: daemon.counters.snapshot().frames_processed >= held_at + 2, what="results after the hold")


def test_bench_pipeline_alternates_daemon_windows_and_engine_slices(bundle: Path, tmp_path: Path) -> None:
    """`defectsam bench pipeline` as a user runs it, on the tiny bundle: every figure present and consistent."""
    data = config_data(tmp_path, bundle, camera={"fps": 20.0})
    config_file = tmp_path / "defectsam.yaml"
    config_file.write_text(yaml.safe_dump(data))
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "bench", "pipeline", "--config", str(config_file), "--duration", "3",
         "--warmup", "0.5", "--rounds", "3", "--engine-iterations", "4", "--camera-fps", "20", "--json", str(out)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| pipeline / engine (median of the 3 pairs) |" in done.stdout
    result = json.loads(out.read_text())
    assert len(result["rounds"]) == 3 and result["inspected"] > 0 and result["engine_fps_median"] > 0
    ratios = sorted(round(fps / engine, 3) for fps, engine, _ in result["rounds"])
    assert result["ratio"] == pytest.approx(ratios[1], abs=2e-3)  # the median pair
    # The engine slices inspect the camera's own 512x288 frames: the overlapped pipeline cannot beat them by
    # much (slices on 4 MP renders instead, as before the fix in service/pipeline_bench.py, read about 5x).
    assert result["ratio"] < 2.0, result["rounds"]
    assert 0 < result["latency_ms_p50"] <= result["latency_ms_p99"]
    assert set(result["stage_ms_p50"]) >= {"preprocess", "infer", "postprocess"}
    assert result["store_written"] > 0 and result["store_dropped"] == 0
    assert result["window_s"] == pytest.approx(3.0, abs=1.0)


@pytest.mark.parametrize(("priority", "policy"), [("auto", os.SCHED_IDLE), ("normal", os.SCHED_OTHER)])
def test_overlapped_preprocess_priority_on_a_cpu_engine(bundle: Path, tmp_path: Path, priority: str,
                                                        policy: int) -> None:
    """auto on a CPU engine: the preprocess thread is in SCHED_IDLE and OpenCV on one thread while the
    pipeline runs, restored when it stops; normal: ordinary priority, OpenCV untouched."""
    import cv2

    if sys.platform != "linux":
        pytest.skip("SCHED_IDLE is Linux's")
    threads_before = cv2.getNumThreads()
    config = make_config(tmp_path, bundle, pipeline={"preprocess_priority": priority})
    with running_daemon(config) as daemon:
        wait_for(lambda: daemon.counters.snapshot().frames_processed >= 3, what="results")
        preprocess = next(t for t in threading.enumerate() if t.name == "pipeline:select+preprocess")
        assert os.sched_getscheduler(preprocess.native_id) == policy
        infer = next(t for t in threading.enumerate() if t.name == "pipeline:infer")
        assert os.sched_getscheduler(infer.native_id) == os.SCHED_OTHER
        assert cv2.getNumThreads() == (1 if policy == os.SCHED_IDLE else threads_before)
    assert cv2.getNumThreads() == threads_before


def test_inline_preprocess_has_no_thread_of_its_own(bundle: Path, tmp_path: Path) -> None:
    config = make_config(tmp_path, bundle, pipeline={"overlap_preprocess": "off"})
    with running_daemon(config) as daemon:
        wait_for(lambda: daemon.counters.snapshot().frames_processed >= 3, what="results")
        names = {t.name for t in threading.enumerate()}
        assert "pipeline:infer" in names and "pipeline:select+preprocess" not in names
        with daemon.pipeline.hold():  # a hold works inline too
            held_at = daemon.counters.snapshot().frames_processed
            time.sleep(0.5)
            assert daemon.counters.snapshot().frames_processed == held_at


def test_overlapped_preprocess_takes_its_frame_just_in_time(bundle: Path, tmp_path: Path) -> None:
    """The preprocess thread waits until the running inference is about to end (less the expected
    preprocess time), so it takes the freshest frame; with no inference running it does not wait."""
    config = make_config(tmp_path, bundle)
    with running_daemon(config) as daemon:
        wait_for(lambda: daemon.counters.snapshot().frames_processed >= 5, what="results")
        with daemon.pipeline.hold():
            pipeline = daemon.pipeline
            assert pipeline._infer_s.ready and pipeline._preprocess_s.ready  # running means of real frames
            pipeline._infer_s.value, pipeline._preprocess_s.value = 0.5, 0.01
            pipeline._infer_started = time.monotonic()  # an inference of ~0.5 s just started
            start = time.monotonic()
            while pipeline._wait_until_due():
                pass
            waited = time.monotonic() - start
            assert 0.45 < waited < 1.5, waited  # due 0.5 - 1.5 x 0.01 - 0.002 s after the start
            pipeline._infer_started = time.monotonic() - 1.0  # overdue: take a frame now
            assert not pipeline._wait_until_due()
            pipeline._infer_started = 0.0  # the engine is idle: take a frame now
            assert not pipeline._wait_until_due()
