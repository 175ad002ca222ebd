"""Faults, each against a real daemon: the camera goes and comes back, the engine is missing or corrupt at
start, the store's disk fills up, SIGTERM arrives under load, PLC clients storm the Modbus port.

Every PLC observation is a real Modbus TCP read (pymodbus client, or raw sockets for malformed frames)
on loopback; viewers are real HTTP clients; the full disk is a real, small tmpfs (root only: CI runs
as root; skipped with the reason otherwise). Bounds and measured figures: docs/reliability.md. Faults
already proven elsewhere are referenced there, not repeated here.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import random
import shutil
import socket
import sqlite3
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from pymodbus.client import ModbusTcpClient

from engines.results import Verdict
from engines.synthetic import render_frame
from service.config import DaemonConfig
from service.plc.registers import BY_NAME, CTRL, INPUT_WORDS, RESULT_BASE, STAT, get, result_checksum
from service.soak import ClientLoad, DaemonProcess, proc_sample
from service.store import DB_NAME

from .conftest import REPO
from .daemon_support import (
    PROMETHEUS,
    base_url,
    config_data,
    get_json,
    http,
    ng_bundle,
    running_daemon,
    running_prometheus,
    wait_for,
)

pytestmark = pytest.mark.slow

PLC = {"enabled": True, "host": "127.0.0.1", "port": 0}

# Stated bounds (docs/reliability.md). The camera's loss is seen by the files camera at its next frame
# (0.1 s at 10 fps) and by the PLC service at its next tick (0.1 s); recovery waits out the reconnect
# backoff, capped at reconnect.max_s (1 s here), then one frame and one tick.
CAMERA_LOSS_BOUND_S = 1.0
CAMERA_RECOVERY_BOUND_S = 1.0 + 1.0  # reconnect.max_s + 1 s
SIGTERM_EXIT_BOUND_S = 15.0


@pytest.fixture(scope="module")
def bundle(tiny_bundle_master: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ng_bundle(tiny_bundle_master, tmp_path_factory.getbasetemp())


def modbus(port: int) -> ModbusTcpClient:
    client = ModbusTcpClient("127.0.0.1", port=port, timeout=5, retries=0)
    assert client.connect(), f"no Modbus server on port {port}"
    return client


def registers(client: ModbusTcpClient) -> list[int]:
    """Input 0-115 in one request, as a PLC reads them."""
    reply = client.read_input_registers(0, count=INPUT_WORDS, device_id=1)
    assert not reply.isError(), reply
    return list(reply.registers)


def consistent(words: list[int]) -> bool:
    return get(words, BY_NAME["checksum"]) == result_checksum(words[RESULT_BASE:])


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, _, body = http("GET", f"{url}/metrics")
    assert status == 200
    return metric_samples(body.decode())


# ------------------------------------------------------------------------------------------- camera


def test_camera_outage_reaches_the_plc_within_a_bound_and_recovers_by_itself(bundle: Path, tmp_path: Path) -> None:
    """A files camera whose folder (a share) goes away and comes back, through the whole daemon: the PLC's
    camera-OK bit falls and its error bit and code 1 rise within CAMERA_LOSS_BOUND_S, the result block
    says NO_FRAME, /readyz and /metrics say so; back, the daemon reconnects by itself within
    CAMERA_RECOVERY_BOUND_S and inspection resumes, seen in the PLC's inspection id."""
    folder = tmp_path / "share" / "line"
    folder.mkdir(parents=True)
    for seed in range(3):
        cv2.imwrite(str(folder / f"frame{seed}.png"), render_frame(seed, 512, 288).image)
    data = config_data(tmp_path, bundle, plc=PLC)
    data["camera"] = {"type": "files", "path": str(folder), "fps": 10.0,
                      "reconnect": {"initial_s": 0.2, "max_s": 1.0, "factor": 2.0}}
    with running_daemon(DaemonConfig.model_validate(data)) as daemon:
        url = base_url(daemon)
        client = modbus(daemon.plc.port)
        try:
            wait_for(lambda: get(registers(client), BY_NAME["inspection_id"]) >= 3, what="results in the registers")
            words = registers(client)
            assert words[0] & STAT["camera_ok"] and not words[0] & STAT["error"]
            before = get(words, BY_NAME["inspection_id"])
            fail_safes = scrape(url)[("defectsam_plc_fail_safe_writes_total", ())]  # one while the engine loaded

            moved = folder.with_name("unmounted")
            folder.rename(moved)  # the share goes away
            lost_at = time.monotonic()

            def plc_sees_loss() -> list[int] | None:
                w = registers(client)
                return w if not w[0] & STAT["camera_ok"] and w[0] & STAT["error"] else None

            words = wait_for(plc_sees_loss, timeout=10, interval=0.005, what="the PLC to see the camera loss")
            seen_loss_s = time.monotonic() - lost_at
            assert get(words, BY_NAME["error_code"]) == 1  # camera
            assert get(words, BY_NAME["verdict"]) == Verdict.NO_FRAME and not words[0] & STAT["trigger_ready"]
            status, ready = get_json(f"{url}/readyz")
            assert status == 503 and any(r.startswith("camera reconnecting") and "line" in r for r in ready["reasons"])
            samples = scrape(url)
            assert samples[("defectsam_camera_state", (("state", "reconnecting"),))] == 1
            assert samples[("defectsam_plc_error_code", ())] == 1
            time.sleep(2.5)  # long enough for the backoff to reach its 1 s cap
            processed = daemon.counters.snapshot().frames_processed
            time.sleep(0.5)
            assert daemon.counters.snapshot().frames_processed == processed  # nothing to inspect meanwhile

            moved.rename(folder)  # and comes back
            back_at = time.monotonic()

            def plc_sees_recovery() -> list[int] | None:
                w = registers(client)
                return w if w[0] & STAT["camera_ok"] and not w[0] & STAT["error"] else None

            words = wait_for(plc_sees_recovery, timeout=15, interval=0.005, what="the PLC to see the camera back")
            recovered_s = time.monotonic() - back_at
            assert get(words, BY_NAME["error_code"]) == 0
            wait_for(lambda: get(registers(client), BY_NAME["inspection_id"]) > before + 2, timeout=10,
                     what="new results in the registers after the camera came back")
            assert consistent(registers(client))
            assert get_json(f"{url}/readyz")[0] == 200
            samples = scrape(url)
            assert samples[("defectsam_camera_reconnects_total", ())] == 1
            assert samples[("defectsam_camera_disconnects_total", ())] >= 2  # the loss and failed reopens
            assert samples[("defectsam_plc_fail_safe_writes_total", ())] == fail_safes + 1
        finally:
            client.close()
    print(f"camera outage: PLC saw the loss after {seen_loss_s * 1000:.0f} ms, the recovery "
          f"{recovered_s * 1000:.0f} ms after the folder came back")
    assert seen_loss_s < CAMERA_LOSS_BOUND_S, seen_loss_s
    assert recovered_s < CAMERA_RECOVERY_BOUND_S, recovered_s


# ------------------------------------------------------------------------------------------- engine


def _break_bundle(bundle: Path, target: Path, how: str) -> Path:
    if how == "missing":
        return target / "no-such-bundle"
    shutil.copytree(bundle, target / "bundle")
    graph = target / "bundle" / "segment.onnx"
    if how == "tampered":  # one byte changed: the manifest's checksum no longer matches
        raw = bytearray(graph.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        graph.write_bytes(bytes(raw))
    elif how == "unloadable":  # garbage, with a manifest that vouches for it: ONNX Runtime refuses it
        graph.write_bytes(os.urandom(4096))
        from engines.bundle import sha256_file

        manifest = json.loads((target / "bundle" / "manifest.json").read_text())
        manifest["files"]["segment.onnx"] = sha256_file(graph)
        (target / "bundle" / "manifest.json").write_text(json.dumps(manifest))
    return target / "bundle"


@pytest.mark.parametrize(("how", "cause"), [
    ("missing", "bundle directory does not exist"),
    ("tampered", "checksum mismatch"),
    ("unloadable", "segment.onnx"),
])
def test_a_missing_or_corrupt_engine_leaves_the_daemon_up_and_the_plc_error_bit_set(
        bundle: Path, tmp_path: Path, how: str, cause: str) -> None:
    """`defectsam serve` with a bundle that is missing, tampered with, or not a graph at all: the process
    stays up and not ready, the PLC reads engine-loaded 0, error 1, code 2 and NO_FRAME, a PLC trigger is
    refused (missed trigger), /metrics says failed, and the log says why in one line, without a traceback."""
    broken = _break_bundle(bundle, tmp_path, how)
    data = config_data(tmp_path, broken, plc=PLC)
    config_file = tmp_path / "defectsam.yaml"
    config_file.write_text(yaml.safe_dump(data))
    daemon = DaemonProcess(config_file, tmp_path)
    try:
        daemon.wait_serving(60)
        status = wait_for(lambda: (s := daemon.get_json("/api/status")[1])["engine"]["state"] == "failed" and s,
                          timeout=60, interval=0.1, what="the engine to fail")
        assert cause in status["engine"]["error"]
        client = modbus(int(status["plc"]["listen"].rsplit(":", 1)[1]))
        try:
            # the camera is fine (once its first frames are rendered): the error is the engine's alone
            words = wait_for(lambda: (w := registers(client))[0] & STAT["error"] and w[0] & STAT["camera_ok"] and w,
                             what="the PLC error bit, with the camera connected")
            assert not words[0] & STAT["engine_loaded"]
            assert get(words, BY_NAME["error_code"]) == 2 and get(words, BY_NAME["verdict"]) == Verdict.NO_FRAME
            assert not client.write_registers(BY_NAME["control"].address, [CTRL["trigger_enable"]],
                                              device_id=1).isError()
            assert not registers(client)[0] & STAT["trigger_ready"]
            client.write_registers(BY_NAME["control"].address, [CTRL["trigger_enable"] | CTRL["trigger"]], device_id=1)
            assert registers(client)[0] & STAT["missed_trigger"]  # refused: the part is not passed
        finally:
            client.close()
        code, ready = daemon.get_json("/readyz")
        assert code == 503 and any("engine failed to load" in r and cause in r for r in ready["reasons"])
        assert daemon.get_json("/healthz")[0] == 200 and daemon.proc.poll() is None
        samples = scrape(f"http://127.0.0.1:{daemon.port}")
        assert samples[("defectsam_engine_state", (("state", "failed"),))] == 1
        assert samples[("defectsam_plc_error_code", ())] == 2 and samples[("defectsam_ready", ())] == 0
        exit_code, _ = daemon.terminate(30)
    finally:
        daemon.close()
    assert exit_code == 0
    log = daemon.log_path.read_text()
    lines = [line for line in log.splitlines() if "engine: failed to load" in line]
    print(lines[0] if lines else log[-2000:])
    assert len(lines) == 1 and cause in lines[0] and "the daemon stays up, not ready" in lines[0]
    assert "ERROR" in lines[0] and "Traceback" not in log


# ------------------------------------------------------------------------------------------- disk full



@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 16 MB filesystem (tmpfs) for the store; mounting needs root (CI runs as root)."""
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("a small filesystem for the disk-full faults is a tmpfs mount, which needs root on Linux")
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for the disk-full faults: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill_disk(path: Path) -> int:
    """Write zeros to ``path`` until the filesystem refuses (ENOSPC), as a runaway log would; returns bytes."""
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        chunk = b"\0" * (256 * 1024)
        while True:
            try:
                written += os.write(fd, chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                return written
    finally:
        os.close(fd)


def stored_rows_are_whole(store: Path) -> int:
    """Every row's files exist and decode, no file is left without its row, no temporary file remains, and
    SQLite's integrity check passes; returns the rows."""
    conn = sqlite3.connect(store / DB_NAME)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = conn.execute("SELECT id, verdict, frame_file, mask_file FROM records").fetchall()
    finally:
        conn.close()
    referenced = set()
    for _, verdict, frame_file, mask_file in rows:
        frame = cv2.imread(str(store / frame_file), cv2.IMREAD_COLOR)
        assert frame is not None and frame.shape[2] == 3, frame_file
        referenced.add(frame_file)
        if verdict == "NG":
            mask = cv2.imread(str(store / mask_file), cv2.IMREAD_UNCHANGED)
            assert mask is not None and mask.shape == frame.shape[:2], mask_file
            referenced.add(mask_file)
    on_disk = {p.relative_to(store).as_posix() for p in (store / "files").rglob("*") if p.is_file()}
    assert on_disk == referenced, sorted(on_disk ^ referenced)[:5]
    return len(rows)


def test_a_full_disk_drops_and_counts_records_while_inspection_goes_on(
        bundle: Path, tmp_path: Path, small_disk: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The store on a 16 MB filesystem that another writer fills up: retention gives up the store's own
    records first (free_space), then new records are dropped and counted (disk_full) in /api/status and
    /metrics, while the pipeline and the PLC go on at full rate. Space freed, records are stored again,
    and nothing on disk is torn."""
    data = config_data(tmp_path, bundle, plc=PLC, camera={"fps": 10.0},
                      store={"path": str(small_disk / "store"), "min_free_mb": 4})
    with running_daemon(DaemonConfig.model_validate(data)) as daemon:
        url = base_url(daemon)
        wait_for(lambda: daemon.store.stats().written >= 5, what="records stored")
        t0, done0 = time.monotonic(), daemon.counters.snapshot().frames_processed
        time.sleep(3)
        fps_before = (daemon.counters.snapshot().frames_processed - done0) / (time.monotonic() - t0)

        filler = small_disk / "runaway.log"
        filled = fill_disk(filler)  # the disk is full now
        wait_for(lambda: daemon.store.stats().dropped["disk_full"] >= 10, timeout=30, what="disk_full drops")
        client = modbus(daemon.plc.port)
        try:
            iid = get(registers(client), BY_NAME["inspection_id"])
            t0, done0 = time.monotonic(), daemon.counters.snapshot().frames_processed
            time.sleep(3)
            fps_full = (daemon.counters.snapshot().frames_processed - done0) / (time.monotonic() - t0)
            words = registers(client)
            assert get(words, BY_NAME["inspection_id"]) > iid + 10 and consistent(words)  # the PLC still gets results
        finally:
            client.close()
        stats = daemon.store.stats()
        assert "disk full" in (stats.last_error or "") and stats.dropped["error"] == 0
        samples = scrape(url)
        dropped = samples[("defectsam_store_records_dropped_total", (("reason", "disk_full"),))]
        assert dropped >= 10 and samples[("defectsam_store_records_dropped_total", (("reason", "error"),))] == 0
        deleted = samples[("defectsam_store_records_deleted_total", (("reason", "free_space"),))]
        body = get_json(f"{url}/api/status")[1]
        assert body["store"]["dropped"]["disk_full"] >= dropped and body["ready"] is True
        assert daemon.pipeline.healthy() and get_json(f"{url}/readyz")[0] == 200

        filler.unlink()  # space is back: records are stored again
        written = daemon.store.stats().written
        wait_for(lambda: daemon.store.stats().written >= written + 5, timeout=30, what="records stored again")
        drops = daemon.store.stats().dropped["disk_full"]
        time.sleep(1.0)
        assert daemon.store.stats().dropped["disk_full"] == drops
    rows = stored_rows_are_whole(small_disk / "store")
    store_logs = [r for r in caplog.records if r.name == "service.store"]
    assert len([r for r in store_logs if "disk full at" in r.getMessage()]) == 1  # once, not once per record
    assert any("writing records again" in r.getMessage() for r in store_logs)
    assert not any(r.levelno >= logging.ERROR for r in store_logs)
    print(f"disk full ({filled / 1e6:.1f} MB filler): {fps_before:.1f} FPS before, {fps_full:.1f} FPS while full, "
          f"{dropped:.0f}+ records dropped (disk_full), {deleted:.0f} deleted to make room, {rows} whole records "
          "afterwards")
    assert rows >= 5
    assert fps_full >= 0.8 * fps_before, (fps_before, fps_full)


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (apt-get install prometheus)")
def test_a_full_disk_fires_the_store_alert_in_prometheus(bundle: Path, tmp_path: Path, small_disk: Path) -> None:
    """Debian's Prometheus, loaded with deploy/prometheus/defectsam.rules.yml, scrapes a daemon whose store
    disk is full: DefectsamStoreDroppingRecords fires with reason disk_full."""
    assert PROMETHEUS is not None
    data = config_data(tmp_path, bundle, camera={"fps": 10.0},
                       store={"path": str(small_disk / "store"), "min_free_mb": 4})
    with running_daemon(DaemonConfig.model_validate(data)) as daemon:
        wait_for(lambda: daemon.store.stats().written >= 3, what="records stored")
        with running_prometheus(tmp_path, daemon.port, REPO / "deploy" / "prometheus" / "defectsam.rules.yml") as prom:

            def store_alerts(state: str) -> list[dict[str, Any]]:
                try:
                    status, body = get_json(f"{prom.api}/alerts", timeout=5)
                except OSError:
                    return []
                return [a for a in body["data"]["alerts"] if status == 200 and a["state"] == state
                        and a["labels"]["alertname"] == "DefectsamStoreDroppingRecords"]

            wait_for(lambda: prom.query("defectsam_up"), timeout=60, interval=0.5,
                     what="Prometheus to scrape the daemon")
            time.sleep(3)
            assert not store_alerts("firing")  # nothing dropped yet
            filler = small_disk / "runaway.log"
            fill_disk(filler)
            started = time.monotonic()
            firing = wait_for(lambda: store_alerts("firing"), timeout=60, interval=0.5,
                              what="DefectsamStoreDroppingRecords to fire")
            fired_s = time.monotonic() - started
            filler.unlink()
    labels = firing[0]["labels"]
    print(f"alert {labels['alertname']} (reason {labels['reason']}, severity {labels['severity']}) firing "
          f"{fired_s:.1f} s after the disk filled")
    assert labels["reason"] == "disk_full" and labels["severity"] == "critical"


# ------------------------------------------------------------------------------------------- SIGTERM


def test_sigterm_under_load_loses_no_record_and_tears_none(bundle: Path, tmp_path: Path) -> None:
    """`defectsam serve` on one core at full rate on 4 MP frames, 4 MJPEG viewers and 2 event clients
    watching, a PLC polling every 20 ms and a scraper, the store writer behind: SIGTERM. The daemon exits 0
    within SIGTERM_EXIT_BOUND_S, every published result is stored (written == results, none dropped), the
    last result the PLC saw is among them, and every stored record is whole (test_daemon's systemd test
    covers the idle case and sd_notify)."""
    # 4 MP frames at 25 FPS, every one kept, and the daemon confined to one core (as on a busy box): the
    # pipeline takes that core and the store writer, in the idle class, falls behind, so there is a backlog
    # in the store's queue (large enough to drop nothing) when the signal comes
    data = config_data(tmp_path, bundle, plc=PLC, camera={"width": 2688, "height": 1520, "fps": 25.0},
                       store={"queue_size": 2000, "jpeg_quality": 95}, logging={"json": True})
    config_file = tmp_path / "defectsam.yaml"
    config_file.write_text(yaml.safe_dump(data))
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})  # inherited by the child, not by this process's later threads
    try:
        daemon = DaemonProcess(config_file, tmp_path)
    finally:
        os.sched_setaffinity(0, cpus)
    load = None
    try:
        daemon.wait_serving(60)
        status = daemon.wait_ready(60)
        plc_port = int(status["plc"]["listen"].rsplit(":", 1)[1])
        load = ClientLoad("127.0.0.1", daemon.port, plc_port, viewers=4, event_clients=2, viewer_hold_s=60,
                          plc_period_s=0.02, plc_reconnect_s=60, scrape_s=0.5)
        load.start()
        wait_for(lambda: (s := daemon.get_json("/api/status")[1])["live"]["viewers"] == 4
                 and s["live"]["event_clients"] == 2 and s["plc"]["connections"] >= 1, what="the clients connected")
        time.sleep(4.0)
        client = modbus(plc_port)
        try:
            last_seen = get(registers(client), BY_NAME["inspection_id"])
        finally:
            client.close()
        before = daemon.get_json("/api/status")[1]
        exit_code, stop_s = daemon.terminate(60)
    finally:
        if load is not None:
            load.join()
        daemon.close()
    assert load is not None and load.counters.mjpeg_frames > 0 and load.counters.plc_reads > 50
    logs = [json.loads(line) for line in daemon.log_path.read_text().splitlines() if line.startswith("{")]
    final = [entry for entry in logs if entry.get("event") == "stopped"][-1]
    rows = stored_rows_are_whole(tmp_path / "store")
    print(f"SIGTERM under load: {before['pipeline']['fps']:.1f} FPS, store queue {before['store']['queue_depth']} "
          f"deep at the signal; exit {exit_code} after {stop_s:.2f} s; {final['results']} results, "
          f"{final['store_written']} stored, {final['store_dropped']} dropped, {rows} whole rows")
    assert exit_code == 0 and stop_s is not None and stop_s < SIGTERM_EXIT_BOUND_S
    assert before["store"]["queue_depth"] >= 1  # the drain had work to do
    assert final["store_dropped"] == 0
    assert rows == final["store_written"] == final["results"] > 0
    assert final["results"] >= before["pipeline"]["frames_processed"]
    conn = sqlite3.connect(tmp_path / "store" / DB_NAME)
    try:
        assert conn.execute("SELECT COUNT(*) FROM records WHERE id = ?", (last_seen,)).fetchone()[0] == 1
    finally:
        conn.close()


# ------------------------------------------------------------------------------------------- PLC storms

READ_ALL = struct.pack(">BHH", 4, 0, INPUT_WORDS)  # read input 0-115
STORM_S = 10.0


def mbap(transaction: int, pdu: bytes, *, unit: int = 1, protocol: int = 0, length: int | None = None) -> bytes:
    return struct.pack(">HHHB", transaction, protocol, len(pdu) + 1 if length is None else length, unit) + pdu


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()


async def _read_reply(reader: asyncio.StreamReader, timeout: float) -> tuple[int, int, bytes] | str:
    """(transaction id, function code, rest of the PDU), or 'closed' / 'silent' (nothing within ``timeout``)."""
    try:
        head = await asyncio.wait_for(reader.readexactly(8), timeout)
        transaction, _, length, _, function = struct.unpack(">HHHBB", head)
        rest = await asyncio.wait_for(reader.readexactly(length - 2), timeout)
        return transaction, function, rest
    except asyncio.IncompleteReadError:
        return "closed"
    except ConnectionError:
        return "closed"
    except TimeoutError:
        return "silent"


async def _concurrent_reads(port: int, count: int, while_open: Any) -> list[bool]:
    """``count`` connections at once, each reading input 0-115 and checking the answer; all stay open until
    every one is answered, then ``while_open()`` runs (in a thread) and they close, half with a TCP reset."""
    answered = 0
    everyone = asyncio.Event()
    release = asyncio.Event()

    async def one(transaction: int) -> bool:
        nonlocal answered
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 60)
        try:
            writer.write(mbap(transaction, READ_ALL))
            await writer.drain()
            reply = await _read_reply(reader, 60)
            ok = False
            if isinstance(reply, tuple):
                got, function, rest = reply
                words = [int.from_bytes(rest[1 + 2 * i:3 + 2 * i], "big") for i in range(INPUT_WORDS)]
                ok = got == transaction and function == 4 and rest[0] == 2 * INPUT_WORDS and (
                    not get(words, BY_NAME["inspection_id"]) or consistent(words))
            answered += 1
            if answered == count:
                everyone.set()
            await release.wait()
            return ok
        finally:
            if transaction % 2:
                _reset(writer)
            else:
                writer.close()

    tasks = [asyncio.create_task(one(n)) for n in range(1, count + 1)]
    await asyncio.wait_for(everyone.wait(), 120)
    await asyncio.to_thread(while_open)
    release.set()
    return list(await asyncio.gather(*tasks))


MALFORMED: dict[str, tuple[bytes, set[str]]] = {
    # name: (bytes sent, acceptable outcomes). "exception N": a Modbus exception response with that code and
    # the request's transaction id; "closed": the server dropped the connection; "silent": no answer in 2 s.
    "random bytes": (b"\x12\x34\x56\x78" + bytes(random.Random(1).randrange(256) for _ in range(60)),
                     {"closed", "silent"}),
    "protocol id 7": (mbap(2, READ_ALL, protocol=7), {"closed", "silent"}),
    "length 0": (mbap(3, READ_ALL, length=0), {"closed", "silent"}),
    "length 65535": (mbap(4, READ_ALL, length=0xFFFF) + b"\0" * 300, {"closed", "silent"}),
    "unknown function 0x63": (mbap(5, b"\x63\xff\xff\xff\xff"), {"exception 1"}),
    "read of 0 registers": (mbap(6, struct.pack(">BHH", 4, 0, 0)), {"exception 3", "exception 1"}),
    "read of 200 registers": (mbap(7, struct.pack(">BHH", 4, 0, 200)), {"exception 3", "exception 1"}),
    "write with a wrong byte count": (mbap(8, struct.pack(">BHHB", 16, 0, 2, 10) + b"\0\1\0\2"), {"exception 3"}),
    "PDU cut short": (mbap(9, b"\x04\x00"), {"exception 3", "exception 1"}),
    "unknown unit id 9": (mbap(10, READ_ALL, unit=9), {"exception 11"}),
    "1 MB of random bytes": (b"\xff\xff" + os.urandom(1 << 20), {"closed", "silent"}),
}


async def _malformed(port: int) -> dict[str, str]:
    async def probe(name: str, payload: bytes) -> tuple[str, str]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(payload)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            reply = await _read_reply(reader, 2.0)
            if isinstance(reply, tuple):
                transaction, function, rest = reply
                sent_transaction = struct.unpack(">H", payload[:2])[0]
                if function & 0x80 and transaction == sent_transaction:
                    return name, f"exception {rest[0]}"
                return name, f"unexpected reply {function:#x}"
            return name, reply
        finally:
            _reset(writer)

    return dict(await asyncio.gather(*(probe(name, payload) for name, (payload, _) in MALFORMED.items())))


async def _slow_and_split(port: int, idle: int, check: Any) -> tuple[bool, float]:
    """``idle`` connections that send half a header and wait; while they wait, one request arrives byte by
    byte (it must be answered) and ``check()`` runs in a thread; returns (split answered, check seconds)."""
    writers = []
    for n in range(idle):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(mbap(n, READ_ALL)[:3])
        writers.append(writer)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for byte in mbap(4242, READ_ALL):
        writer.write(bytes([byte]))
        await writer.drain()
        await asyncio.sleep(0.005)
    reply = await _read_reply(reader, 5.0)
    writer.close()
    split_ok = isinstance(reply, tuple) and reply[0] == 4242 and reply[1] == 4
    started = time.monotonic()
    await asyncio.to_thread(check)
    took = time.monotonic() - started
    for writer in writers:
        _reset(writer)
    return split_ok, took


def test_plc_client_storms_and_malformed_frames_leave_the_daemon_inspecting(bundle: Path, tmp_path: Path) -> None:
    """300 concurrent Modbus TCP clients, malformed MBAP frames and PDUs (1 MB of garbage among them), 100
    half-open connections: every well-formed request is answered, every malformed one gets an exception or
    its connection closed, a normal PLC read keeps working, the daemon keeps inspecting, and afterwards its
    connections, file descriptors, memory and log are back where they were. plc.max_connections is raised
    to let the 300 in (the default, 16, refuses the rest: tests/test_plc_limits.py)."""
    data = config_data(tmp_path, bundle, plc={**PLC, "max_connections": 512}, camera={"fps": 10.0})
    config_file = tmp_path / "defectsam.yaml"
    config_file.write_text(yaml.safe_dump(data))
    daemon = DaemonProcess(config_file, tmp_path)
    try:
        daemon.wait_serving(60)
        status = daemon.wait_ready(60)
        port = int(status["plc"]["listen"].rsplit(":", 1)[1])
        client = modbus(port)
        try:
            wait_for(lambda: get(registers(client), BY_NAME["inspection_id"]) >= 3, what="results")
        finally:
            client.close()
        wait_for(lambda: daemon.get_json("/api/status")[1]["plc"]["connections"] == 0, what="no PLC connection")
        rss0, _, _, fds0, _ = proc_sample(daemon.pid)
        log0 = daemon.log_path.stat().st_size
        before = daemon.get_json("/api/status")[1]
        started = time.monotonic()

        peak: list[int] = []
        reads: list[bool] = []
        outcomes: dict[str, set[str]] = {name: set() for name in MALFORMED}
        rounds = 0
        while time.monotonic() - started < STORM_S:  # storm after storm, while the daemon inspects
            rounds += 1
            reads += asyncio.run(_concurrent_reads(
                port, 300, lambda: peak.append(daemon.get_json("/api/status")[1]["plc"]["connections"])))
            for name, outcome in asyncio.run(_malformed(port)).items():
                outcomes[name].add(outcome)
        storm_s = time.monotonic() - started

        def normal_read() -> None:
            c = modbus(port)
            try:
                assert consistent(registers(c))
            finally:
                c.close()

        split_ok, read_s = asyncio.run(_slow_and_split(port, 100, normal_read))
        elapsed = time.monotonic() - started

        after = wait_for(lambda: (s := daemon.get_json("/api/status")[1])["plc"]["connections"] == 0 and s,
                         timeout=10, what="every storm connection closed")
        client = modbus(port)
        try:
            first = get(registers(client), BY_NAME["inspection_id"])
            wait_for(lambda: get(registers(client), BY_NAME["inspection_id"]) > first + 5, what="new results")
            assert consistent(registers(client))
        finally:
            client.close()
        time.sleep(1.0)
        rss1, _, _, fds1, _ = proc_sample(daemon.pid)
        log_growth = daemon.log_path.stat().st_size - log0
        assert daemon.get_json("/healthz")[0] == 200 and daemon.get_json("/readyz")[0] == 200
        exit_code, _ = daemon.terminate(30)
    finally:
        daemon.close()
    inspected = after["pipeline"]["frames_processed"] - before["pipeline"]["frames_processed"]
    print(f"PLC storm: {rounds} rounds of 300 concurrent reads and {len(MALFORMED)} malformed frames in "
          f"{storm_s:.1f} s (peak {max(peak)} connections); malformed: {outcomes}; "
          f"a normal read beside 100 half-open connections took {read_s * 1000:.0f} ms; {inspected} frames "
          f"inspected in the {elapsed:.1f} s of storm; RSS {rss0:.0f} -> {rss1:.0f} MB, fds {fds0} -> {fds1}, "
          f"log +{log_growth} bytes")
    assert len(reads) == 300 * rounds and all(reads) and min(peak) >= 300
    for name, (_, acceptable) in MALFORMED.items():
        assert outcomes[name] <= acceptable, (name, outcomes[name])
    assert split_ok and read_s < 2.0
    assert inspected >= 0.5 * 10.0 * elapsed  # the camera runs at 10 fps; inspection went on
    accepted = after["plc"]["connections_total"] - before["plc"]["connections_total"]
    assert accepted >= rounds * (300 + len(MALFORMED)) + 101
    assert fds1 <= fds0 + 2 and rss1 - rss0 < 30
    # one warning line per refused connection at most: the megabyte of garbage in each round is not echoed
    assert log_growth < 16 * 1024 + rounds * 2 * 1024, "the daemon's log grew with the garbage it received"
    assert exit_code == 0
