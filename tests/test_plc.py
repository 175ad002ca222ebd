"""The PLC interface: register map and doc, handshake, fail safe, security, torn reads, real daemon, mbpoll."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import multiprocessing
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from pymodbus.client import ModbusTcpClient
from pymodbus.constants import ExcCodes
from pymodbus.datastore import ModbusServerContext
from pymodbus.server import ModbusTcpServer

from engines.results import Verdict
from service.config.models import PlcPushSection, PlcSection
from service.pipeline.record import InspectionRecord
from service.plc.registers import (
    BY_NAME,
    CTRL,
    INPUT_WORDS,
    MIRROR_BASE,
    REGISTERS,
    RESULT_BASE,
    STAT,
    decode_result,
    encode_result,
    get,
    render_doc,
    result_checksum,
)
from service.plc.server import READ_HOLDING
from service.plc.service import Health, PlcService

from .conftest import REPO
from .daemon_support import free_port, make_config, make_record, ng_bundle, running_daemon, wait_for

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


def _read_until(port: int, stop: Any, *, mirror: bool) -> tuple[int, int, int]:
    """Read status + the whole result block in ONE request until ``stop`` is set, checking every result.

    ``mirror``: read holding 1000-1115 instead of input 0-115. Returns (reads, torn, distinct results seen).
    """
    c = ModbusTcpClient("127.0.0.1", port=port, timeout=5, retries=0)
    c.connect()
    reads = torn = 0
    seen: set[int] = set()
    while not stop.is_set():
        if mirror:
            words = list(c.read_holding_registers(MIRROR_BASE, count=INPUT_WORDS, device_id=1).registers)
        else:
            words = list(c.read_input_registers(0, count=INPUT_WORDS, device_id=1).registers)
        reads += 1
        iid = get(words, BY_NAME["inspection_id"])
        torn += bool(iid and not _consistent(words, iid))
        seen.add(iid)
    c.close()
    return reads, torn, len(seen)


def _reader(port: int, stop: Any, out: Any) -> None:
    """In another process: the input registers."""
    out.put(_read_until(port, stop, mirror=False))


def _consistent(words: list[int], iid: int) -> bool:
    """The block holds exactly the result ``_hammer_record(iid)`` encodes (not a mix of two)."""
    block = words[RESULT_BASE:INPUT_WORDS]
    expect_verdict = Verdict.NG if iid % 2 else Verdict.OK
    return (get(words, BY_NAME["acquisition_id"]) == iid and get(words, BY_NAME["part_id_echo"]) == iid * 3
            and get(words, BY_NAME["verdict"]) == expect_verdict
            and get(words, BY_NAME["defect_count"]) == (2 if iid % 2 else 0)
            and get(words, BY_NAME["checksum"]) == result_checksum(block))


def _hammer_record(iid: int) -> InspectionRecord:
    """Odd ids NG with two defects (and mask bits), even ids OK: consecutive results differ in every part."""
    return make_record(iid, Verdict.NG if iid % 2 else Verdict.OK, part_id=str(iid * 3), size=(60, 100))


def _hammer(service: PlcService, publish: Callable[[], None]) -> list[tuple[int, int, int]]:
    """Run ``publish`` while two readers hammer ``service``: a process reading input 0-115 and a thread
    reading the holding mirror, each in one request per read. Returns their (reads, torn, seen)."""
    ctx = multiprocessing.get_context("spawn")
    out, stop = ctx.Queue(), ctx.Event()
    process = ctx.Process(target=_reader, args=(service.port, stop, out))
    process.start()
    thread_done = threading.Event()
    thread_results: list[tuple[int, int, int]] = []
    t = threading.Thread(target=lambda: thread_results.append(
        _read_until(service.port or 0, thread_done, mirror=True)))
    t.start()
    try:
        wait_for(lambda: service.stats().connections >= 2, 30, 0.05, "both readers connected")
        publish()
        time.sleep(0.2)
    finally:
        thread_done.set()
        stop.set()
        t.join(10)
        process_result = out.get(timeout=20)
        process.join(10)
    return [process_result, thread_results[0]]


def test_no_torn_reads_over_1000_inspections(line: FakeLine) -> None:
    service = PlcService(PlcSection(enabled=True, host="127.0.0.1", port=0, intake_queue=4096),
                         trigger=line.trigger, health=lambda: line.health)
    service.start()
    try:
        records = [_hammer_record(i) for i in range(1, 1001)]

        def publish() -> None:
            for record in records:
                service.offer(record)
                time.sleep(0.001)
            wait_for(lambda: service.results_written == 1000, 30, 0.05, "1000 results written")

        results = _hammer(service, publish)
        stats = service.stats()
    finally:
        service.stop()
    print(f"hammer: 1000 results; process reader {results[0]}, thread reader {results[1]} "
          "(reads, torn, distinct results seen)")
    assert stats.results_written == 1000 and stats.intake_dropped == 0
    for reads, torn, seen in results:
        assert torn == 0 and reads > 100 and seen > 20, (reads, torn, seen)


def test_torn_read_checker_detects_a_torn_writer(line: FakeLine) -> None:
    """Negative control for the hammer: a test-only writer that yields to the loop between the two halves
    of each result (what a writer awaiting mid-update, or one writing with two requests, would do). The
    same readers and checker must report torn reads, so the real writer's 0 means something."""
    service = PlcService(PlcSection(enabled=True, host="127.0.0.1", port=0), trigger=line.trigger,
                         health=lambda: line.health)
    service.start()
    records = [_hammer_record(i) for i in range(1, 301)]
    middle = (RESULT_BASE + INPUT_WORDS) // 2

    async def torn_writer() -> None:  # runs in the server's loop, as the real writer does
        inputs = service.store.inputs
        for record in records:
            block = encode_result(record)
            inputs[RESULT_BASE:middle] = block[:middle - RESULT_BASE]
            await asyncio.sleep(0.002)  # the bug: requests are served between the halves
            inputs[middle:INPUT_WORDS] = block[middle - RESULT_BASE:]
            await asyncio.sleep(0)

    def publish() -> None:
        assert service._loop is not None
        asyncio.run_coroutine_threadsafe(torn_writer(), service._loop).result(30)

    try:
        results = _hammer(service, publish)
    finally:
        service.stop()
    print(f"torn writer: 300 results; process reader {results[0]}, thread reader {results[1]} "
          "(reads, torn, distinct results seen)")
    for reads, torn, _seen in results:
        assert reads > 0 and torn > 0, (reads, torn)


class _PlcHoldingStore(ModbusServerContext):
    """The "PLC" of the push test: plain holding registers 0..size-1 in a list (any unit id), every
    write request logged as (unit id, address, count) in arrival order."""

    def __init__(self, size: int) -> None:  # no super().__init__(): as RegisterStore, no simulator memory
        self.old_simulator = True
        self.simdevices = []
        self.holding = [0] * size
        self.writes: list[tuple[int, int, int]] = []

    def device_ids(self) -> list[int]:
        return [0]

    async def async_getValues(  # noqa: N802 - pymodbus names it
            self, device_id: int, func_code: int, address: int, count: int = 1) -> list[int] | ExcCodes:
        if func_code != READ_HOLDING or address < 0 or address + count > len(self.holding):
            return ExcCodes.ILLEGAL_ADDRESS
        return self.holding[address:address + count]

    async def async_setValues(  # noqa: N802 - pymodbus names it
            self, device_id: int, func_code: int, address: int,
            values: Sequence[int] | Sequence[bool]) -> ExcCodes | None:
        if address < 0 or address + len(values) > len(self.holding):
            return ExcCodes.ILLEGAL_ADDRESS
        self.holding[address:address + len(values)] = [int(v) for v in values]
        self.writes.append((device_id, address, len(values)))
        return None


class _FakePlc:
    """A plain pymodbus Modbus TCP server on 127.0.0.1:port, in a thread and loop of its own; start and
    stop it as often as needed (same port, same registers)."""

    def __init__(self, port: int, size: int) -> None:
        self.port = port
        self.store = _PlcHoldingStore(size)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: ModbusTcpServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        ready = threading.Event()

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._server = ModbusTcpServer(self.store, address=("127.0.0.1", self.port))
            await self._server.serve_forever(background=True)
            ready.set()
            await self._server.serving

        self._thread = threading.Thread(target=asyncio.run, args=(main(),), name="fake-plc", daemon=True)
        self._thread.start()
        assert ready.wait(10), "the fake PLC did not start"

    def stop(self) -> None:
        if self._loop is None or self._server is None or self._thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._server.shutdown(), self._loop).result(10)
        self._thread.join(10)
        self._loop = self._server = self._thread = None

    def words(self, base: int) -> list[int]:
        return list(self.store.holding[base:base + INPUT_WORDS])

    def snapshot(self, base: int) -> tuple[list[int], tuple[int, int, int] | None]:
        """The block and the last write request, taken in the server's loop (between two requests)."""
        def take() -> tuple[list[int], tuple[int, int, int] | None]:
            return self.words(base), (self.store.writes[-1] if self.store.writes else None)

        if self._loop is None:
            return take()

        async def in_loop() -> tuple[list[int], tuple[int, int, int] | None]:
            return take()

        return asyncio.run_coroutine_threadsafe(in_loop(), self._loop).result(5)


def test_push_mode_writes_the_block_into_a_plc_and_survives_it_going_away() -> None:
    base, port = 400, free_port()
    fake = _FakePlc(port, base + INPUT_WORDS + 100)  # room on both sides of the block, to see stray writes
    fake.start()
    config = PlcSection(enabled=True, host="127.0.0.1", port=0, word_order="little",
                        push=PlcPushSection(enabled=True, host="127.0.0.1", port=port, unit_id=3,
                                            base_address=base))
    service = PlcService(config)
    service.start()
    c = client(service)
    big = 0x12345  # ids above 65535: the 32-bit word order shows in the pushed words

    def vision_inputs() -> list[int]:
        return list(c.read_input_registers(0, count=INPUT_WORDS, device_id=1).registers)

    def pushed_matches(iid: int) -> list[int] | None:
        """The PLC's block, once it holds result ``iid`` with the status that went with it."""
        words, last_write = fake.snapshot(base)
        vision = vision_inputs()
        if last_write is None or last_write[1] != base:  # mid-push: result block written, status not yet
            return None
        if get(words, BY_NAME["inspection_id"], word_order="little") != iid:
            return None
        # the status words are pushed with each result: all equal the server's now except the vision
        # heartbeat, a snapshot at push time (the server's keeps counting at 2 Hz)
        assert words[RESULT_BASE:] == vision[RESULT_BASE:], "result block differs"
        assert words[:RESULT_BASE][2:] == vision[2:RESULT_BASE] and words[STATUS] == vision[STATUS]
        # pushed heartbeat: the live one or an earlier value, never a later one (how much earlier depends
        # on how long this poll took on a loaded machine: a bound of 2 beats failed once under a full test run)
        assert (vision[1] - words[1]) & 0xFFFF < 0x8000
        return words

    try:
        # 1. pushing: the PLC's holding base + n == input n
        for n in range(3):
            service.offer(_hammer_record(big + n))
            words = wait_for(functools.partial(pushed_matches, big + n), 5, 0.02, f"result {n} pushed")
        assert words[16:18] == [0x2347, 0x0001]  # inspection id 0x12347: low word first
        assert words[RESULT_BASE:] == encode_result(_hammer_record(big + 2), word_order="little")
        assert words[STATUS] & STAT["results_valid"]
        holding = fake.store.holding
        assert not any(holding[:base]) and not any(holding[base + INPUT_WORDS:])  # nothing outside the block
        writes = list(fake.store.writes)
        assert writes and len(writes) % 2 == 0
        # every push, to unit id 3: the result block first, then the status block
        assert set(zip(writes[::2], writes[1::2], strict=True)) == {
            ((3, base + RESULT_BASE, INPUT_WORDS - RESULT_BASE), (3, base, RESULT_BASE))}
        assert service.stats().push_errors == 0

        # 2. the PLC goes away: pushes fail and are counted; the server goes on
        fake.stop()
        service.offer(_hammer_record(big + 3))
        wait_for(lambda: service.stats().push_errors >= 1, 5, 0.02, "a push error counted")
        service.offer(_hammer_record(big + 4))  # while the pusher backs off: replaced by the next (latest wins)
        service.offer(_hammer_record(big + 5))
        wait_for(lambda: service.stats().push_errors >= 2, 5, 0.02, "the push of the latest result failed too")
        assert service.results_written == 6
        assert get(vision_inputs(), BY_NAME["inspection_id"], word_order="little") == big + 5
        assert get(fake.words(base), BY_NAME["inspection_id"], word_order="little") == big + 2
        errors = service.stats().push_errors

        # 3. the PLC is back on the same port: the latest result, published while it was away, is
        # delivered without a new one, and later results go on being pushed
        fake.start()
        wait_for(lambda: pushed_matches(big + 5), 5, 0.02, "the result missed during the outage pushed")
        for n in range(6, 8):
            service.offer(_hammer_record(big + n))
            wait_for(functools.partial(pushed_matches, big + n), 5, 0.02, f"result {n} pushed after the restart")
        stats = service.stats()
        assert stats.results_written == 8 and stats.push_errors >= errors
        assert not status(c) & STAT["error"]
    finally:
        c.close()
        service.stop()
        fake.stop()


def test_push_mode_delivers_the_fail_safe(line: FakeLine) -> None:
    """A PLC that only receives pushes still sees a camera loss: NO_FRAME and the error bit arrive."""
    base, port = 200, free_port()
    fake = _FakePlc(port, base + INPUT_WORDS)
    fake.start()
    config = PlcSection(enabled=True, host="127.0.0.1", port=0,
                        push=PlcPushSection(enabled=True, host="127.0.0.1", port=port, base_address=base))
    service = PlcService(config, trigger=line.trigger, health=lambda: line.health)
    service.start()
    try:
        service.offer(_hammer_record(7))
        wait_for(lambda: get(fake.words(base), BY_NAME["inspection_id"]) == 7, 5, 0.02, "a result pushed")
        line.health = Health(False, True)  # the camera goes

        def pushed_fault() -> bool:
            words = fake.words(base)
            return bool(words[STATUS] & STAT["error"]) and get(words, BY_NAME["verdict"]) == Verdict.NO_FRAME

        wait_for(pushed_fault, 5, 0.02, "the fail-safe NO_FRAME pushed")
        assert get(fake.words(base), BY_NAME["error_code"]) == 1
    finally:
        service.stop()
        fake.stop()


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


def _own_address() -> str | None:
    """This machine's IPv4 address on a network interface (not loopback), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # UDP: nothing is sent, the route's source address is read
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def _listening(port: int) -> set[str]:
    """The IPv4 addresses a TCP socket of this machine listens on at ``port`` (the kernel's /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        address, hex_port = fields[1].split(":")
        if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


def _modbus_reads(host: str, port: int) -> bool:
    """A real Modbus client reads the status word from ``host``:``port``: True, or False when the
    connection is refused (nothing listens there) or closed at once (not in the allowlist)."""
    c = ModbusTcpClient(host, port=port, timeout=2, retries=0)
    try:
        if not c.connect():
            return False
        try:
            return not c.read_input_registers(STATUS, count=1, device_id=1).isError()
        except Exception:  # pymodbus raises ConnectionException/ModbusIOException on a close
            return False
    finally:
        c.close()


@pytest.mark.skipif(not Path("/proc/net/tcp").is_file(), reason="reads the listening sockets from Linux's /proc")
def test_the_daemon_listens_for_the_plc_on_loopback_unless_told_whom_to_accept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 16, item 1: the default binds 127.0.0.1 only; 0.0.0.0 with an allowlist binds every interface
    and serves the listed client only; allow_any_client is said in the log."""
    caplog.set_level(logging.INFO, logger="service.plc.service")
    own = _own_address()  # reaching the daemon on it comes from it too (Linux routes it over lo)
    no_engine = tmp_path / "no-bundle"  # the PLC serves its registers while the engine is down
    with running_daemon(make_config(tmp_path / "default", no_engine, plc={"enabled": True, "port": 0})) as daemon:
        assert daemon.plc is not None and daemon.config.plc.host == "127.0.0.1"
        port = daemon.plc.port or 0
        assert _listening(port) == {"127.0.0.1"}
        assert _modbus_reads("127.0.0.1", port)
        if own is not None:
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((own, port), timeout=2).close()
            assert not _modbus_reads(own, port)
    assert "local clients only" in caplog.text

    allowed = own or "127.0.0.1"
    plc = {"enabled": True, "port": 0, "host": "0.0.0.0", "allowlist": [allowed]}
    with running_daemon(make_config(tmp_path / "allowlist", no_engine, plc=plc)) as daemon:
        assert daemon.plc is not None
        port = daemon.plc.port or 0
        assert _listening(port) == {"0.0.0.0"}
        assert _modbus_reads(allowed, port)
        if own is not None:  # loopback is not the PLC: connected, then closed at once and counted
            assert not _modbus_reads("127.0.0.1", port)
            assert wait_for(lambda: daemon.plc.stats().connections_rejected >= 1, 5, 0.05)
    assert f"clients {allowed}" in caplog.text

    caplog.clear()
    plc = {"enabled": True, "port": 0, "host": "0.0.0.0", "allow_any_client": True}
    with running_daemon(make_config(tmp_path / "any", no_engine, plc=plc)) as daemon:
        assert daemon.plc is not None
        assert _modbus_reads("127.0.0.1", daemon.plc.port or 0)
    warned = [r for r in caplog.records if r.levelname == "WARNING" and "accepts any client" in r.getMessage()]
    assert len(warned) == 1 and "plc.allow_any_client" in warned[0].getMessage()


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
