"""The PLC interface: register map and doc, handshake, fail safe, security, torn reads, real daemon, mbpoll."""

from __future__ import annotations

import contextlib
import multiprocessing
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pymodbus.client import ModbusTcpClient

from engines.results import Verdict
from service.config.models import PlcSection
from service.plc.registers import (
    BY_NAME,
    CTRL,
    INPUT_WORDS,
    MIRROR_BASE,
    REGISTERS,
    RESULT_BASE,
    STAT,
    decode_result,
    get,
    render_doc,
    result_checksum,
)
from service.plc.service import Health, PlcService

from .conftest import REPO
from .daemon_support import make_config, make_record, ng_bundle, running_daemon, wait_for

STATUS = BY_NAME["status"].address


class FakeTicket:
    def __init__(self, trigger_id: int) -> None:
        self.trigger_id = trigger_id


class FakeLine:
    """Stands in for the daemon: triggers become tickets; results are published by the test."""

    def __init__(self) -> None:
        self.triggers: list[str | None] = []
        self.health = Health(True, True)

    def trigger(self, part_id: str | None) -> FakeTicket:
        self.triggers.append(part_id)
        return FakeTicket(len(self.triggers))


@pytest.fixture()
def line() -> FakeLine:
    return FakeLine()


@pytest.fixture()
def plc(line: FakeLine) -> Iterator[PlcService]:
    service = PlcService(PlcSection(enabled=True, host="127.0.0.1", port=0, buffer_depth=2), trigger=line.trigger,
                         health=lambda: line.health)
    service.start()
    yield service
    service.stop()


def client(service: PlcService) -> ModbusTcpClient:
    c = ModbusTcpClient("127.0.0.1", port=service.port or 0, timeout=3, retries=0)
    assert c.connect()
    return c


def status(c: ModbusTcpClient) -> int:
    return int(c.read_input_registers(STATUS, count=1, device_id=1).registers[0])


def control(c: ModbusTcpClient, value: int) -> None:
    assert not c.write_registers(BY_NAME["control"].address, [value], device_id=1).isError()


def wait_status(c: ModbusTcpClient, predicate: Callable[[int], object], what: str) -> int:
    def check() -> int:
        s = status(c)
        return s if predicate(s) else 0

    return int(wait_for(check, 5.0, 0.01, what))


def test_register_map_is_consistent_and_the_doc_is_current() -> None:
    used: dict[tuple[str, int], str] = {}
    for reg in REGISTERS:
        for i in range(reg.repeat):
            for w in range(reg.words):
                key = (reg.space.value, reg.at(i) + w)
                assert key not in used, f"{reg.name} overlaps {used[key]}"
                used[key] = reg.name
    assert max(a for s, a in used if s == "input") == INPUT_WORDS - 1 <= 124  # one read gets it all
    doc = (REPO / "docs" / "plc.md").read_text()
    assert render_doc(doc) == doc, "docs/plc.md is stale: run python -m service.plc.registers"


def test_triggered_handshake(plc: PlcService, line: FakeLine) -> None:
    c = client(plc)
    try:
        assert not status(c) & STAT["trigger_ready"]  # trigger enable not set
        c.write_registers(BY_NAME["part_id"].address, [0, 4242], device_id=1)
        control(c, CTRL["trigger_enable"])
        s = wait_status(c, lambda s: s & STAT["trigger_ready"], "trigger ready")
        assert s & STAT["online"] and s & STAT["camera_ok"] and s & STAT["engine_loaded"]
        control(c, CTRL["trigger_enable"] | CTRL["trigger"])
        s = status(c)
        assert s & STAT["trigger_ack"] and s & STAT["busy"] and not s & STAT["trigger_ready"]
        assert line.triggers == ["4242"]
        control(c, CTRL["trigger_enable"])
        assert not status(c) & STAT["trigger_ack"]
        plc.offer(_with_trigger(make_record(7, part_id="4242"), 1))
        s = wait_status(c, lambda s: s & STAT["results_valid"], "results valid")
        assert s & STAT["inspection_completed"] and not s & STAT["busy"] and s & STAT["trigger_ready"]
        words = list(c.read_input_registers(0, count=INPUT_WORDS, device_id=1).registers)
        r = decode_result(words)
        assert (r["inspection_id"], r["part_id_echo"], r["verdict"], r["defect_count"]) == (7, 4242, 2, 2)
        assert r["largest_area"] == 84 and r["max_score"] == 900
        assert r["defects"][0] == {"class_id": 0, "score": 0.9, "bbox": [30, 40, 20, 10], "area": 84}
        assert any(r["mask_rows"])
        # the holding mirror serves the same words
        mirror = c.read_holding_registers(MIRROR_BASE, count=INPUT_WORDS, device_id=1).registers
        assert list(mirror) == words
        control(c, CTRL["trigger_enable"] | CTRL["results_ack"])
        assert not status(c) & STAT["results_valid"]
        control(c, CTRL["trigger_enable"])
        # a trigger while offline is missed
        control(c, CTRL["trigger_enable"] | CTRL["set_offline"])
        control(c, CTRL["trigger_enable"] | CTRL["set_offline"] | CTRL["trigger"])
        s = status(c)
        assert s & STAT["missed_trigger"] and not s & STAT["online"] and len(line.triggers) == 1
        control(c, CTRL["clear_error"])
        assert not status(c) & STAT["missed_trigger"]
    finally:
        c.close()


def _with_trigger(record, trigger_id: int):
    import dataclasses

    return dataclasses.replace(record, trigger_id=trigger_id)


def test_buffering_queues_until_ack_and_flags_overrun(plc: PlcService) -> None:
    c = client(plc)
    try:
        control(c, CTRL["buffer_enable"])
        for n in (1, 2, 3, 4):  # one shown, two buffered (depth 2), one overrun
            plc.offer(make_record(n))
        wait_for(lambda: status(c) & STAT["buffer_overrun"], 5, 0.01, "overrun")
        seen = []
        for _ in range(3):
            wait_status(c, lambda s: s & STAT["results_valid"], "results valid")
            seen.append(get(c.read_input_registers(0, count=INPUT_WORDS, device_id=1).registers,
                            BY_NAME["inspection_id"]))
            control(c, CTRL["buffer_enable"] | CTRL["results_ack"])
            control(c, CTRL["buffer_enable"])
        assert seen == [1, 2, 3]
        assert plc.stats().buffer_overruns == 1
    finally:
        c.close()


def test_fail_safe_on_camera_loss_and_heartbeat_timeout(line: FakeLine) -> None:
    service = PlcService(PlcSection(enabled=True, host="127.0.0.1", port=0, heartbeat_timeout_s=0.5),
                         trigger=line.trigger, health=lambda: line.health)
    service.start()
    c = client(service)
    try:
        c.write_registers(BY_NAME["plc_heartbeat"].address, [1], device_id=1)
        control(c, CTRL["trigger_enable"])
        wait_status(c, lambda s: s & STAT["trigger_ready"], "trigger ready")
        control(c, CTRL["trigger_enable"] | CTRL["trigger"])  # waiting for its result when the camera goes
        line.health = Health(False, True)
        s = wait_status(c, lambda s: s & STAT["error"], "error")
        words = c.read_input_registers(0, count=INPUT_WORDS, device_id=1).registers
        assert not s & STAT["trigger_ready"] and s & STAT["results_valid"]
        assert get(words, BY_NAME["error_code"]) == 1 and get(words, BY_NAME["verdict"]) == Verdict.NO_FRAME
        line.health = Health(True, True)
        control(c, CTRL["trigger_enable"])
        # no heartbeat change for 0.5 s: error 3, latched until clear error after beats resume
        s = wait_status(c, lambda s: s & STAT["error"] and get(
            c.read_input_registers(0, count=3, device_id=1).registers, BY_NAME["error_code"]) == 3, "timeout")
        assert service.stats().heartbeat == "timeout"
        c.write_registers(BY_NAME["plc_heartbeat"].address, [2], device_id=1)
        control(c, CTRL["trigger_enable"] | CTRL["clear_error"])
        c.write_registers(BY_NAME["plc_heartbeat"].address, [3], device_id=1)
        assert not status(c) & STAT["error"]
    finally:
        c.close()
        service.stop()


def test_security_exceptions_and_allowlist(plc: PlcService) -> None:
    c = client(plc)
    try:
        assert c.read_input_registers(INPUT_WORDS - 1, count=2, device_id=1).exception_code == 2
        assert c.read_holding_registers(16, count=1, device_id=1).exception_code == 2  # gap
        assert c.write_registers(MIRROR_BASE, [1], device_id=1).exception_code == 2  # mirror is read-only
        assert c.write_registers(RESULT_BASE, [1], device_id=1).exception_code == 2
        assert c.read_coils(0, count=1, device_id=1).isError()
        assert c.read_input_registers(0, count=1, device_id=9).exception_code == 0x0B  # wrong unit id
        with socket.create_connection(("127.0.0.1", plc.port)) as raw:  # garbage: answered or dropped, no crash
            raw.sendall(b"\x00\x01\x00\x00\x00\x02\x01\x63" + b"\xff" * 40)
            raw.settimeout(1.0)
            with contextlib.suppress(TimeoutError, OSError):
                raw.recv(64)
        assert not c.read_input_registers(0, count=INPUT_WORDS, device_id=1).isError()
        stats = plc.stats()
        assert stats.requests["4"] >= 3 and stats.exceptions["2"] >= 4 and stats.connections >= 1
    finally:
        c.close()
    blocked = PlcService(PlcSection(enabled=True, host="127.0.0.1", port=0, allowlist=["10.9.8.0/24"]))
    blocked.start()
    try:
        c = ModbusTcpClient("127.0.0.1", port=blocked.port or 0, timeout=1, retries=0)
        c.connect()
        with pytest.raises(Exception):  # noqa: B017 - pymodbus raises ConnectionException/ModbusIOException
            reply = c.read_input_registers(0, count=1, device_id=1)
            assert reply.isError()
            raise RuntimeError("refused")
        c.close()
        assert wait_for(lambda: blocked.stats().connections_rejected >= 1, 5, 0.05)
    finally:
        blocked.stop()


def _reader(port: int, stop: Any, out: Any) -> None:
    """In another process: read status + the whole result block in ONE request, check every result."""
    c = ModbusTcpClient("127.0.0.1", port=port, timeout=5, retries=0)
    c.connect()
    reads = torn = 0
    seen: set[int] = set()
    while not stop.is_set():
        words = list(c.read_input_registers(0, count=INPUT_WORDS, device_id=1).registers)
        reads += 1
        iid = get(words, BY_NAME["inspection_id"])
        if iid and not _consistent(words, iid):
            torn += 1
        seen.add(iid)
    c.close()
    out.put((reads, torn, len(seen)))


def _consistent(words: list[int], iid: int) -> bool:
    block = words[RESULT_BASE:INPUT_WORDS]
    expect_verdict = Verdict.NG if iid % 2 else Verdict.OK
    return (get(words, BY_NAME["acquisition_id"]) == iid and get(words, BY_NAME["part_id_echo"]) == iid * 3
            and get(words, BY_NAME["verdict"]) == expect_verdict
            and get(words, BY_NAME["defect_count"]) == (2 if iid % 2 else 0)
            and get(words, BY_NAME["checksum"]) == result_checksum(block))


def test_no_torn_reads_over_1000_inspections(line: FakeLine) -> None:
    service = PlcService(PlcSection(enabled=True, host="127.0.0.1", port=0, intake_queue=4096),
                         trigger=line.trigger, health=lambda: line.health)
    service.start()
    try:
        records = [make_record(i, Verdict.NG if i % 2 else Verdict.OK, part_id=str(i * 3), size=(60, 100))
                   for i in range(1, 1001)]
        ctx = multiprocessing.get_context("spawn")
        out, stop = ctx.Queue(), ctx.Event()
        process = ctx.Process(target=_reader, args=(service.port, stop, out))
        process.start()
        threads_done = threading.Event()
        thread_results: list[tuple[int, int, int]] = []

        def thread_reader() -> None:  # the holding mirror, from a thread of this process
            c = ModbusTcpClient("127.0.0.1", port=service.port or 0, timeout=5, retries=0)
            c.connect()
            reads = torn = 0
            seen: set[int] = set()
            while not threads_done.is_set():
                words = list(c.read_holding_registers(MIRROR_BASE, count=INPUT_WORDS, device_id=1).registers)
                reads += 1
                iid = get(words, BY_NAME["inspection_id"])
                torn += bool(iid and not _consistent(words, iid))
                seen.add(iid)
            c.close()
            thread_results.append((reads, torn, len(seen)))

        t = threading.Thread(target=thread_reader)
        t.start()
        wait_for(lambda: service.stats().connections >= 2, 30, 0.05, "both readers connected")
        for record in records:
            service.offer(record)
            time.sleep(0.001)
        wait_for(lambda: service.results_written == 1000, 30, 0.05, "1000 results written")
        time.sleep(0.2)
        threads_done.set()
        stop.set()
        t.join(10)
        process_result = out.get(timeout=20)
        process.join(10)
        stats = service.stats()
    finally:
        service.stop()
    print(f"hammer: 1000 results; process reader {process_result}, thread reader {thread_results} "
          "(reads, torn, distinct results seen)")
    assert stats.results_written == 1000 and stats.intake_dropped == 0
    for reads, torn, seen in (process_result, thread_results[0]):
        assert torn == 0 and reads > 100 and seen > 20, (reads, torn, seen)


def test_real_daemon_end_to_end(tmp_path: Path, tiny_bundle_master: Path) -> None:
    from service.commands.plc_sim import PlcSimulator

    bundle = ng_bundle(tiny_bundle_master, tmp_path.parent)
    config = make_config(tmp_path, bundle, pipeline={"mode": "triggered"},
                         plc={"enabled": True, "host": "127.0.0.1", "port": 0, "top_n": 3, "mask_grid": 8})
    with running_daemon(config) as daemon:
        assert daemon.plc is not None
        sim = PlcSimulator("127.0.0.1", daemon.plc.port or 0, timeout=20)
        try:
            results = [sim.inspect(500 + n) for n in range(3)]
        finally:
            sim.close()
        assert [r["part_id_echo"] for r in results] == [500, 501, 502]
        assert all(r["verdict"] == Verdict.NG and r["defect_count"] >= 1 for r in results)
        assert all(0 < len(r["defects"]) <= 3 and r["frame_width"] == 512 for r in results)
        assert all(not any(row >> 8 for row in r["mask_rows"]) for r in results)  # 8x8 grid
        ids = [r["inspection_id"] for r in results]
        assert ids == sorted(ids) and len(set(ids)) == 3
        snap = daemon.snapshot()
        assert snap.plc.enabled and snap.plc.triggers_taken == 3 and snap.plc.requests["16"] > 0
        from prometheus_client import generate_latest

        text = generate_latest(daemon.registry).decode()
        assert 'defectsam_plc_requests_total{function="4"}' in text


MBPOLL = shutil.which("mbpoll")


@pytest.mark.skipif(MBPOLL is None, reason="mbpoll not installed (apt-get install mbpoll; Makefile PEERS)")
def test_mbpoll_triggered_inspection(plc: PlcService) -> None:
    assert MBPOLL is not None
    base = [MBPOLL, "-m", "tcp", "-p", str(plc.port), "-a", "1", "-0", "-1", "-q"]

    def mb(*args: str) -> str:
        done = subprocess.run([*base, *args], capture_output=True, text=True, timeout=20)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def values(text: str) -> dict[int, int]:
        out = {}
        for line in text.splitlines():
            if line.startswith("["):
                addr, _, val = line.partition(":")
                out[int(addr.strip("[]"))] = int(val.strip(), 0)
        return out

    mb("-t", "4", "-r", "0", "127.0.0.1", "1")  # trigger enable
    assert values(mb("-t", "3:hex", "-r", "0", "-c", "2", "127.0.0.1"))[0] & STAT["trigger_ready"]
    mb("-t", "4", "-r", "2", "127.0.0.1", "0", "4242")  # part id
    mb("-t", "4", "-r", "0", "127.0.0.1", "3")  # trigger
    assert values(mb("-t", "3:hex", "-r", "0", "-c", "1", "127.0.0.1"))[0] & STAT["trigger_ack"]
    mb("-t", "4", "-r", "0", "127.0.0.1", "1")
    plc.offer(_with_trigger(make_record(77, part_id="4242"), 1))
    wait_for(lambda: values(mb("-t", "3:hex", "-r", "0", "-c", "1", "127.0.0.1"))[0] & STAT["results_valid"], 5)
    got = values(mb("-t", "3", "-r", "16", "-c", "20", "127.0.0.1"))
    assert (got[17], got[21], got[22], got[23]) == (77, 4242, 2, 2)
    heartbeat = values(mb("-t", "3", "-r", "1", "-c", "1", "127.0.0.1"))[1]
    time.sleep(0.6)
    assert values(mb("-t", "3", "-r", "1", "-c", "1", "127.0.0.1"))[1] != heartbeat
