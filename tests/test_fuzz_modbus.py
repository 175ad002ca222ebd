"""Hostile Modbus TCP input: random frames on raw sockets against the PLC server the daemon runs.

Every case is a fresh TCP connection carrying one or more frames drawn from a seeded generator:
requests with any function code (0-255), any address and quantity (the map's edges, out of range,
0xFFFF), truncated or padded PDUs, byte counts that disagree with quantities, MBAP length fields that
lie, protocol ids other than 0, other unit ids, raw garbage, frames split across writes and several
frames in one write. The client then half-closes, so the server answers what it got and closes.

An independent oracle (below, written from the Modbus application protocol and docs/plc.md, not from
service/plc) says what each connection must get back, frame by frame: the right exception (01 illegal
function, 02 illegal data address, 03 illegal data value, 0B unknown unit) with the request's
transaction id, unit id and function code | 0x80, or a normal answer of the right size; and nothing
more after a header that cannot be Modbus TCP (the server closes such a connection). Afterwards the
server still runs and a pymodbus client reads the whole block.

Seeded and reproducible: DEFECTSAM_FUZZ_SEED (default below) picks the run; a failure names the seed,
the case index and the bytes sent (``case(seed, index)`` rebuilds one case).
"""

from __future__ import annotations

import os
import random
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pymodbus.client import ModbusTcpClient

from service.config.models import PlcSection
from service.plc.registers import INPUT_WORDS, MIRROR_BASE
from service.plc.service import Health, PlcService

from .daemon_support import free_port, make_config, ng_bundle, running_daemon, wait_for

SEED = int(os.environ.get("DEFECTSAM_FUZZ_SEED", "20261122"))
SCALE = int(os.environ.get("DEFECTSAM_FUZZ_SCALE", "1"))  # more examples for a deeper run than CI's
CASES = 4000 * SCALE  # connections against the PLC service (about 5 s on 2 cores)
DAEMON_CASES = 300 * SCALE  # against a whole daemon, which keeps inspecting meanwhile
UNIT = 1
CONTROL_WORDS = 16  # holding 0-15: the only writable registers (docs/plc.md)
MBAP = struct.Struct(">HHHB")

ILLEGAL_FUNCTION, ILLEGAL_ADDRESS, ILLEGAL_VALUE, UNKNOWN_UNIT = 0x01, 0x02, 0x03, 0x0B
CLOSED = "closed"  # the oracle's word for: no answer, the server closes the connection here


# ---------------------------------------------------------------- the oracle (from the spec, not the code)

def _span_ok(address: int, count: int, base: int, words: int) -> bool:
    return base <= address and address + count <= base + words


def _readable_holding(address: int, count: int) -> bool:
    return _span_ok(address, count, 0, CONTROL_WORDS) or _span_ok(address, count, MIRROR_BASE, INPUT_WORDS)


def expected_pdu(unit: int, pdu: bytes) -> tuple[str, int]:
    """("exception", code) or ("ok", length of the normal answer's PDU) for one well-framed request."""
    if unit != UNIT:
        return "exception", UNKNOWN_UNIT
    fc, body = pdu[0], pdu[1:]
    words = [int.from_bytes(body[i:i + 2], "big") for i in range(0, len(body) - 1, 2)]
    if fc == 3 or fc == 4:
        if len(body) != 4 or not 1 <= words[1] <= 125:
            return "exception", ILLEGAL_VALUE
        ok = _readable_holding(*words) if fc == 3 else _span_ok(words[0], words[1], 0, INPUT_WORDS)
        return ("ok", 2 + 2 * words[1]) if ok else ("exception", ILLEGAL_ADDRESS)
    if fc == 6:
        if len(body) != 4:
            return "exception", ILLEGAL_VALUE
        return ("ok", 5) if words[0] < CONTROL_WORDS else ("exception", ILLEGAL_ADDRESS)
    if fc == 16:
        if len(body) < 5 or not 1 <= words[1] <= 123 or body[4] != 2 * words[1] or len(body) != 5 + body[4]:
            return "exception", ILLEGAL_VALUE
        return ("ok", 5) if _span_ok(words[0], words[1], 0, CONTROL_WORDS) else ("exception", ILLEGAL_ADDRESS)
    if fc == 22:
        if len(body) != 6:
            return "exception", ILLEGAL_VALUE
        return ("ok", 7) if words[0] < CONTROL_WORDS else ("exception", ILLEGAL_ADDRESS)
    if fc == 23:
        if (len(body) < 9 or not 1 <= words[1] <= 125 or not 1 <= words[3] <= 121 or body[8] != 2 * words[3]
                or len(body) != 9 + body[8]):
            return "exception", ILLEGAL_VALUE
        ok = _readable_holding(words[0], words[1]) and _span_ok(words[2], words[3], 0, CONTROL_WORDS)
        return ("ok", 2 + 2 * words[1]) if ok else ("exception", ILLEGAL_ADDRESS)
    return "exception", ILLEGAL_FUNCTION  # coils, diagnostics, identification, anything else


def expected_answers(stream: bytes) -> list[tuple[int, int, int, tuple[str, int]] | str]:
    """Per complete frame in ``stream``: (transaction, unit, function code, expectation); CLOSED ends it."""
    out: list[tuple[int, int, int, tuple[str, int]] | str] = []
    at = 0
    while len(stream) - at >= MBAP.size:
        tid, protocol, length, unit = MBAP.unpack_from(stream, at)
        if protocol != 0 or not 2 <= length <= 254:  # no Modbus TCP frame starts like this
            out.append(CLOSED)
            break
        if len(stream) - at < 6 + length:
            break  # incomplete: the server waits for the rest, then sees the client close
        pdu = stream[at + MBAP.size:at + 6 + length]
        out.append((tid, unit, pdu[0], expected_pdu(unit, pdu)))
        at += 6 + length
    return out


# ---------------------------------------------------------------- the generator

_ADDRESSES = [0, 1, 4, 15, 16, 17, 100, 115, 116, 117, 999, 1000, 1001, 1115, 1116, 1117, 4000, 65534, 65535]
_COUNTS = [0, 1, 2, 15, 16, 17, 100, 115, 116, 117, 121, 122, 123, 124, 125, 126, 127, 255, 256, 0x7FFF, 0xFFFF]


def _u16(rng: random.Random, choices: list[int]) -> int:
    return rng.choice(choices) if rng.random() < 0.8 else rng.randrange(0x10000)


def _request(rng: random.Random) -> bytes:
    """One request PDU: mostly the functions served, with edge-case fields; sometimes anything at all."""
    roll = rng.random()
    if roll < 0.15:
        return bytes([rng.randrange(256)]) + rng.randbytes(rng.randrange(0, 12))
    fc = rng.choice([3, 4, 6, 16, 22, 23] * 3 + [1, 2, 5, 15, 7, 8, 17, 43])  # served, and some pymodbus knows
    address, count = _u16(rng, _ADDRESSES), _u16(rng, _COUNTS)
    if rng.random() < 0.4:  # inside the map: the registers really change (control word, handshake)
        base, words = rng.choice([(0, CONTROL_WORDS)] if fc not in (3, 4, 23) else
                                 [(0, CONTROL_WORDS), (MIRROR_BASE, INPUT_WORDS)] if fc != 4 else [(0, INPUT_WORDS)])
        address = base + rng.randrange(words)
        count = rng.randint(1, base + words - address)
    if fc in (3, 4, 1, 2):
        pdu = struct.pack(">BHH", fc, address, count)
    elif fc in (6, 5):
        pdu = struct.pack(">BHH", fc, address, rng.randrange(0x10000))
    elif fc in (16, 15):
        values = min(rng.randrange(0, 8) if rng.random() < 0.7 else count, 125)
        values = min(values, CONTROL_WORDS - address) if 0 <= address < CONTROL_WORDS and rng.random() < 0.5 else values
        byte_count = 2 * values if rng.random() < 0.8 else rng.randrange(256)
        pdu = struct.pack(">BHHB", fc, address, values if rng.random() < 0.8 else count, byte_count & 0xFF)
        pdu += rng.randbytes(2 * values)
    elif fc == 22:
        pdu = struct.pack(">BHHH", fc, address, rng.randrange(0x10000), rng.randrange(0x10000))
    elif fc == 23:
        writes = min(rng.randrange(0, 6) if rng.random() < 0.7 else count, 120)
        pdu = struct.pack(">BHHHHB", fc, address, count, _u16(rng, _ADDRESSES),
                          writes if rng.random() < 0.85 else _u16(rng, _COUNTS), (2 * writes) & 0xFF)
        pdu += rng.randbytes(2 * writes)
    else:
        pdu = bytes([fc]) + rng.randbytes(rng.randrange(0, 6))
    if rng.random() < 0.1:  # truncated or padded, with an honest MBAP length
        pdu = pdu[:rng.randrange(1, len(pdu) + 1)] if rng.random() < 0.6 else pdu + rng.randbytes(rng.randrange(1, 4))
    return pdu


def _frame(rng: random.Random) -> bytes:
    pdu = _request(rng)
    unit = UNIT if rng.random() < 0.9 else rng.randrange(256)
    length = len(pdu) + 1
    protocol = 0
    roll = rng.random()
    if roll < 0.05:
        protocol = rng.randrange(1, 0x10000)
    elif roll < 0.12:  # a length field that lies
        length = rng.choice([0, 1, 2, length - 1, length + 1, length + 5, 254, 255, 0xFFFF, rng.randrange(0x10000)])
    return MBAP.pack(rng.randrange(0x10000), protocol, length, unit) + pdu


def case(seed: int, index: int) -> list[bytes]:
    """Case ``index`` of run ``seed``: the writes to send on one connection, in order."""
    rng = random.Random(f"{seed}:{index}")
    roll = rng.random()
    if roll < 0.05:
        stream = rng.randbytes(rng.randrange(1, 300))  # garbage
    elif roll < 0.15:
        stream = b"".join(_frame(rng) for _ in range(rng.randrange(2, 5)))  # several frames in one write
    else:
        stream = _frame(rng)
    if rng.random() < 0.15 and len(stream) > 1:  # split across writes
        cut = sorted(rng.sample(range(1, len(stream)), min(2, len(stream) - 1)))
        return [stream[a:b] for a, b in zip([0, *cut], [*cut, len(stream)], strict=True)]
    return [stream]


# ---------------------------------------------------------------- the driver

def exchange(port: int, writes: list[bytes], timeout: float = 5.0) -> tuple[bytes, bool]:
    """Send the writes, half-close, read until the server closes: (what came back, closed cleanly)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            for chunk in writes:
                sock.sendall(chunk)
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # broken pipe, reset, not connected: the server closed first (a header it refused)
            pass  # what it sent before still counts
        received = b""
        while True:
            try:
                data = sock.recv(4096)
            except (ConnectionResetError, BrokenPipeError):
                return received, True
            except TimeoutError:
                return received, False
            if not data:
                return received, True
            received += data


def check_case(port: int, seed: int, index: int) -> None:
    writes = case(seed, index)
    stream = b"".join(writes)
    where = (f"seed {seed} case {index} (DEFECTSAM_FUZZ_SEED={seed}; tests.test_fuzz_modbus.case({seed}, {index})): "
             f"sent {' | '.join(w.hex() for w in writes)}")
    received, closed = exchange(port, writes)
    assert closed, f"{where}: the server neither answered in full nor closed within 5 s; got {received.hex()}"
    at = 0
    for want in expected_answers(stream):
        if want == CLOSED:
            assert at == len(received), f"{where}: answered after a header it must refuse: {received[at:].hex()}"
            return
        assert isinstance(want, tuple)
        tid, unit, fc, (kind, value) = want
        assert len(received) - at >= MBAP.size, f"{where}: missing answer to transaction {tid}; got {received.hex()}"
        r_tid, r_protocol, r_length, r_unit = MBAP.unpack_from(received, at)
        pdu = received[at + MBAP.size:at + 6 + r_length]
        at += 6 + r_length
        assert (r_tid, r_protocol, r_unit) == (tid, 0, unit), f"{where}: answer header {received.hex()}"
        if kind == "exception":
            assert pdu == bytes([fc | 0x80, value]), f"{where}: want exception {value:02X} to fc {fc}, got {pdu.hex()}"
        else:
            assert pdu[0] == fc and len(pdu) == value, f"{where}: want a normal answer ({value} bytes), got {pdu.hex()}"
    assert at == len(received), f"{where}: unexpected extra bytes {received[at:].hex()}"


def client_reads_the_block(port: int) -> None:
    client = ModbusTcpClient("127.0.0.1", port=port, timeout=3, retries=0)
    try:
        assert client.connect()
        reply = client.read_input_registers(0, count=INPUT_WORDS, device_id=UNIT)
        assert not reply.isError() and len(reply.registers) == INPUT_WORDS
        mirror = client.read_holding_registers(MIRROR_BASE, count=INPUT_WORDS, device_id=UNIT)
        assert not mirror.isError()
    finally:
        client.close()


class _Line:
    def __init__(self) -> None:
        self.triggers = 0

    def trigger(self, part_id: str | None) -> Any:
        self.triggers += 1
        return type("Ticket", (), {"trigger_id": self.triggers})()


@pytest.fixture()
def plc() -> Iterator[PlcService]:
    line = _Line()
    service = PlcService(PlcSection(enabled=True, host="127.0.0.1", port=0), trigger=line.trigger,
                         health=lambda: Health(True, True))
    service.start()
    yield service
    service.stop()


def test_the_oracle_agrees_with_the_register_map() -> None:
    """Spot checks of the oracle itself, so a wrong oracle cannot pass a wrong server."""
    assert expected_pdu(1, bytes.fromhex("0400000074")) == ("ok", 2 + 2 * INPUT_WORDS)
    assert expected_pdu(1, bytes.fromhex("0400000075")) == ("exception", ILLEGAL_ADDRESS)
    assert expected_pdu(1, bytes.fromhex("0400000000")) == ("exception", ILLEGAL_VALUE)
    assert expected_pdu(1, bytes.fromhex("030010 0001".replace(" ", ""))) == ("exception", ILLEGAL_ADDRESS)
    assert expected_pdu(1, bytes.fromhex("0303e80074")) == ("ok", 2 + 2 * INPUT_WORDS)
    assert expected_pdu(1, bytes.fromhex("0603e80001")) == ("exception", ILLEGAL_ADDRESS)
    assert expected_pdu(1, bytes.fromhex("100000000204" + "0000" * 2)) == ("ok", 5)
    assert expected_pdu(1, bytes.fromhex("100000000203" + "0000" * 2)) == ("exception", ILLEGAL_VALUE)
    assert expected_pdu(1, bytes.fromhex("0100000001")) == ("exception", ILLEGAL_FUNCTION)
    assert expected_pdu(9, bytes.fromhex("0400000001")) == ("exception", UNKNOWN_UNIT)
    assert expected_answers(bytes.fromhex("000100070006010400000001")) == [CLOSED]
    assert expected_answers(bytes.fromhex("0001000000060104000000")) == []  # incomplete


def test_random_frames_get_protocol_answers_and_never_break_the_server(plc: PlcService) -> None:
    assert plc.port
    for index in range(CASES):
        check_case(plc.port, SEED, index)
    client_reads_the_block(plc.port)
    stats = plc.stats()
    assert plc._thread is not None and plc._thread.is_alive()
    for code in ("1", "2", "3", "11"):  # every kind of exception was provoked
        assert stats.exceptions.get(code, 0) > 0, stats.exceptions
    print(f"\nModbus fuzz (seed {SEED}): {CASES} connections, requests per function code {stats.requests}, "
          f"exceptions {stats.exceptions}")


def test_pipelined_requests_are_all_answered_in_order(plc: PlcService) -> None:
    assert plc.port
    frames = [MBAP.pack(tid, 0, 6, UNIT) + struct.pack(">BHH", 4, tid, 1) for tid in range(1, 21)]
    received, closed = exchange(plc.port, [b"".join(frames)])
    assert closed
    tids = [MBAP.unpack_from(received, at)[0] for at in range(0, len(received), 11)]
    assert tids == list(range(1, 21)), received.hex()


@pytest.mark.slow
def test_a_daemon_under_modbus_fuzz_keeps_inspecting(tiny_bundle_master: Path,
                                                    tmp_path_factory: pytest.TempPathFactory) -> None:
    bundle = ng_bundle(tiny_bundle_master, tmp_path_factory.getbasetemp())
    config = make_config(tmp_path_factory.mktemp("fuzz-modbus"), bundle,
                         plc={"enabled": True, "host": "127.0.0.1", "port": free_port()})
    with running_daemon(config) as daemon:
        port = config.plc.port
        written = wait_for(lambda: daemon.plc.results_written, what="a result in the registers")
        for index in range(DAEMON_CASES):
            check_case(port, SEED + 1, index)
        client_reads_the_block(port)
        wait_for(lambda: daemon.plc.results_written > written + 2, what="results still written to the registers")
        assert daemon.pipeline.healthy() and daemon.counters.snapshot().errors == 0
