"""The Modbus TCP side: a datastore served from two plain lists, and a small asyncio Modbus TCP server
of its own that enforces the allowlist and counts connections, requests and exceptions.

The server is this module's, not pymodbus's: the register map serves six function codes (read holding
and input registers, write single and multiple, mask write, read/write multiple) and needed its own
framing and vetting anyway (pymodbus dropped pipelined requests, answered malformed ones with function
code 0x80, waited forever on a bad header and buffered without bound), so the library's server class,
its request handler and its datastore were only being worked around through their internals. pymodbus
stays the project's Modbus *client* (the PLC simulator, the push to a PLC, the tests), which is public
API; the framing here follows the MODBUS Messaging on TCP/IP Implementation Guide v1.0b and the
function codes the MODBUS Application Protocol Specification v1.1b3.

``RegisterStore`` is built without I/O (the tests drive it directly); ``serve`` binds it. Every
access runs in the server's one asyncio loop and none of them awaits, so a read of any span sees
the registers between two writer steps, never in the middle of one (service.py holds the writer).

Each connection is bounded (docs/plc.md, "Limits"): at most ``INBOX_HIGH`` received bytes wait to be
answered and ``WRITE_HIGH`` bytes of answers wait for the client to take them; past either, the
connection stops being read (TCP flow control then holds the client back), and a client that leaves
its answers unread for ``UNREAD_CLOSE_S`` is disconnected. One worker task per connection answers in
order, ``ANSWERS_PER_TURN`` requests at a time, so a client that pipelines thousands of requests
cannot delay another's poll. The server caps connections and closes those silent for
``plc.idle_timeout_s``; its log lines about clients are rate-limited (``LogThrottle``).
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import math
import struct
import time
from collections.abc import Callable, Sequence

from service.allowlist import Allowlist
from service.plc.registers import CONTROL_WORDS, INPUT_WORDS, MIRROR_BASE

log = logging.getLogger(__name__)

class ExcCodes(enum.IntEnum):
    """Modbus exception codes (Application Protocol v1.1b3, 7) this server answers with."""

    ILLEGAL_FUNCTION = 0x01
    ILLEGAL_ADDRESS = 0x02
    ILLEGAL_VALUE = 0x03
    DEVICE_FAILURE = 0x04
    GATEWAY_NO_RESPONSE = 0x0B  # a unit id this server is not: what a gateway answers for a silent target


READ_HOLDING, READ_INPUT = 3, 4
WRITE_FUNCTIONS = (6, 16, 22, 23)  # single, multiple, mask write, read/write multiple
SERVED = (READ_HOLDING, READ_INPUT, *WRITE_FUNCTIONS)
MAX_READ = 125
MAX_WRITE = 123  # registers in one write multiple (121 in a read/write multiple)
MBAP = struct.Struct(">HHHB")  # transaction id, protocol id (0), length (unit id + PDU), unit id
MAX_MBAP_LENGTH = 254  # unit id + the longest PDU (253 bytes)
# Per-connection bounds (docs/plc.md, "Limits"). A request is 12 to 260 bytes, its answer 9 to 259.
INBOX_HIGH, INBOX_LOW = 16 * 1024, 4 * 1024  # received, not yet answered: reading pauses above, resumes below
WRITE_HIGH, WRITE_LOW = 64 * 1024, 16 * 1024  # answered, not yet taken by the kernel: answering pauses above
UNREAD_CLOSE_S = 10.0  # answering paused this long (the client reads none of its answers): disconnected
ANSWERS_PER_TURN = 8  # requests one connection gets answered before the loop serves the others
SWEEP_S = 0.5  # how often idle and unread connections are looked for
LOG_EVERY_S = 60.0  # at most one log line per kind of client trouble this often


def request_problem(pdu: bytes) -> ExcCodes | None:
    """The exception a request PDU gets before any register is looked at, as the Modbus application
    protocol's per-function state diagrams order them: 01 ILLEGAL FUNCTION for a function this server
    does not serve, 03 ILLEGAL DATA VALUE for a quantity out of range or a length or byte count that
    does not match it. None: well formed, the register map decides (02 ILLEGAL DATA ADDRESS or data).

    (pymodbus's server refused some of these while decoding, but answered them with function code 0x80
    and exception 01 whatever was asked, and served diagnostics the register map does not offer.)
    """
    code, body = pdu[0], pdu[1:]
    if code not in SERVED:
        return ExcCodes.ILLEGAL_FUNCTION

    def word(at: int) -> int:
        return int.from_bytes(body[at:at + 2], "big")

    if code in (READ_HOLDING, READ_INPUT):
        ok = len(body) == 4 and 1 <= word(2) <= MAX_READ
    elif code == 6:  # write single register: address, value
        ok = len(body) == 4
    elif code == 16:  # write multiple: address, quantity, byte count, values
        ok = len(body) >= 5 and 1 <= word(2) <= MAX_WRITE and body[4] == 2 * word(2) == len(body) - 5
    elif code == 22:  # mask write: address, and mask, or mask
        ok = len(body) == 6
    else:  # 23 read/write multiple: read address, read quantity, write address, write quantity, byte count, values
        ok = (len(body) >= 9 and 1 <= word(2) <= MAX_READ and 1 <= word(6) <= MAX_WRITE - 2
              and body[8] == 2 * word(6) == len(body) - 9)
    return None if ok else ExcCodes.ILLEGAL_VALUE


class RegisterStore:
    """Holding 0..15 (writable control block), input 0..115 and its read-only mirror at holding 1000+.

    ``on_write(address, count)`` runs after a write, synchronously, in the server's loop.
    """

    def __init__(self, unit_id: int, on_write: Callable[[int, int], None] | None = None) -> None:
        self.unit_id = unit_id
        self.holding = [0] * CONTROL_WORDS
        self.inputs = [0] * INPUT_WORDS
        self.on_write = on_write

    def read(self, func_code: int, address: int, count: int) -> list[int] | ExcCodes:
        if not 1 <= count <= MAX_READ:
            return ExcCodes.ILLEGAL_VALUE
        if func_code == READ_INPUT:
            if address >= 0 and address + count <= INPUT_WORDS:
                return self.inputs[address:address + count]
            return ExcCodes.ILLEGAL_ADDRESS
        if func_code == READ_HOLDING or func_code in WRITE_FUNCTIONS:
            if address >= 0 and address + count <= CONTROL_WORDS:
                return self.holding[address:address + count]
            start = address - MIRROR_BASE
            if start >= 0 and start + count <= INPUT_WORDS:
                return self.inputs[start:start + count]
            return ExcCodes.ILLEGAL_ADDRESS
        return ExcCodes.ILLEGAL_FUNCTION

    def write(self, func_code: int, address: int, values: Sequence[int] | Sequence[bool]) -> ExcCodes | None:
        if func_code not in WRITE_FUNCTIONS:
            return ExcCodes.ILLEGAL_FUNCTION
        if not values or not (address >= 0 and address + len(values) <= CONTROL_WORDS):
            return ExcCodes.ILLEGAL_ADDRESS
        if any(not 0 <= int(v) <= 0xFFFF for v in values):
            return ExcCodes.ILLEGAL_VALUE
        self.holding[address:address + len(values)] = [int(v) for v in values]
        if self.on_write is not None:
            self.on_write(address, len(values))
        return None


def _words(pdu: bytes, count: int) -> list[int]:
    """The first ``count`` 16-bit words after the function code."""
    return [int.from_bytes(pdu[1 + 2 * i:3 + 2 * i], "big") for i in range(count)]


class ServerStats:
    """Counters of the Modbus side; touched only from the server's loop, read from anywhere."""

    def __init__(self) -> None:
        self.connections = 0
        self.connections_total = 0
        self.rejected = 0
        self.requests: collections.Counter[int] = collections.Counter()
        self.exceptions: collections.Counter[int] = collections.Counter()
        # connections the server ended, by reason: limit (refused at plc.max_connections), idle
        # (plc.idle_timeout_s), unread (answers not read for UNREAD_CLOSE_S), framing (not Modbus TCP)
        self.closed: collections.Counter[str] = collections.Counter()


class LogThrottle:
    """At most one log line per key every ``interval`` seconds; the next line sent says how many were held.

    A client reconnecting in a loop (refused, or closed for idling) would otherwise write a line per
    attempt. Keys are the kinds of trouble, not the peers: a few keys, however many clients.
    """

    def __init__(self, logger: logging.Logger, interval: float = LOG_EVERY_S) -> None:
        self.logger = logger
        self.interval = interval
        self._last: dict[str, tuple[float, int]] = {}  # key -> (when the last line went out, lines held since)

    def log(self, level: int, key: str, message: str, *args: object) -> bool:
        now = time.monotonic()
        at, held = self._last.get(key, (-math.inf, 0))
        if now - at < self.interval:
            self._last[key] = (at, held + 1)
            return False
        self._last[key] = (now, 0)
        if held:
            message += " (%d more like it in the last %.0f s)"
            args = (*args, held, now - at)
        self.logger.log(level, message, *args)
        return True


def exception_pdu(code: int, problem: ExcCodes) -> bytes:
    return bytes((code | 0x80, int(problem)))


def _pack(words: Sequence[int]) -> bytes:
    return b"".join(int(w).to_bytes(2, "big") for w in words)


def answer_pdu(store: RegisterStore, pdu: bytes) -> bytes:
    """The response PDU to a request PDU that ``request_problem`` passed: the register map's data or its
    exception. Runs in one synchronous step (the store never awaits), so no read sees half a write."""
    code = pdu[0]
    if code in (READ_HOLDING, READ_INPUT):
        address, count = _words(pdu, 2)
        values = store.read(code, address, count)
        if isinstance(values, ExcCodes):
            return exception_pdu(code, values)
        return bytes((code, 2 * count)) + _pack(values)
    if code == 6:  # write single register: the answer echoes the request
        address, value = _words(pdu, 2)
        problem = store.write(code, address, [value])
        return exception_pdu(code, problem) if problem is not None else pdu
    if code == 16:  # write multiple: the answer is the address and quantity
        address, count = _words(pdu, 2)
        problem = store.write(code, address, _words(pdu[5:], count))
        return exception_pdu(code, problem) if problem is not None else pdu[:5]
    if code == 22:  # mask write: (current AND and_mask) OR (or_mask AND NOT and_mask); the answer echoes
        address, and_mask, or_mask = _words(pdu, 3)
        current = store.read(code, address, 1)
        if isinstance(current, ExcCodes):
            return exception_pdu(code, current)
        problem = store.write(code, address, [(current[0] & and_mask) | (or_mask & ~and_mask & 0xFFFF)])
        return exception_pdu(code, problem) if problem is not None else pdu
    # 23 read/write multiple: the write happens before the read (Application Protocol 6.17); a read span
    # that is not in the map refuses the whole request before anything is written
    read_address, read_count, write_address, write_count = _words(pdu, 4)
    if isinstance(store.read(code, read_address, read_count), ExcCodes):
        return exception_pdu(code, ExcCodes.ILLEGAL_ADDRESS)
    problem = store.write(code, write_address, _words(pdu[9:], write_count))
    if problem is not None:
        return exception_pdu(code, problem)
    values = store.read(code, read_address, read_count)
    assert not isinstance(values, ExcCodes)  # checked above; the write cannot move the map
    return bytes((code, 2 * read_count)) + _pack(values)


class _Connection(asyncio.Protocol):
    """One client connection: refused outside the allowlist or past the connection cap; answers its
    requests in order from a bounded inbox, reading only while its answers are being taken.

    ``data_received`` only queues bytes; one worker task frames, vets (request_problem) and answers
    them, so requests pipelined before the first answer (Modbus TCP allows several) are all answered.
    """

    def __init__(self, server: _Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self._allowed = False
        self._counted = False
        self._inbox = bytearray()  # received, not yet answered (whole frames and at most one partial)
        self._wake = asyncio.Event()  # bytes arrived, EOF, or the connection must end
        self._writable = asyncio.Event()  # the transport takes answers (cleared by pause_writing)
        self._writable.set()
        self._eof = False  # the client half-closed: answer what came, then close
        self._closing = False  # ending: nothing more is read or answered
        self._worker: asyncio.Task[None] | None = None
        self._last_request = time.monotonic()
        self._unread_since: float | None = None  # answering paused since (the client does not read)
        self.peer = "?"

    # ---------------------------------------------------------------- connection (asyncio callbacks)
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        server, stats = self.server, self.server.stats
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if peer else "?"
        if not server.allowlist.allows(self.peer):
            stats.rejected += 1
            server.throttle.log(logging.WARNING, "allowlist", "plc: refused a Modbus connection from %s (not in "
                                "plc.allowlist)", self.peer)
            transport.close()
            return
        if len(server.connections) >= server.max_connections:
            stats.closed["limit"] += 1
            server.throttle.log(logging.WARNING, "limit", "plc: refused a Modbus connection from %s: %d clients "
                                "connected already (plc.max_connections)", self.peer, len(server.connections))
            transport.close()
            return
        self._allowed = self._counted = True
        server.connections.add(self)
        stats.connections += 1
        stats.connections_total += 1
        transport.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_LOW)
        self._worker = asyncio.get_running_loop().create_task(self._work(), name=f"plc-connection-{self.peer}")

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._inbox.clear()
        if self._worker is not None:
            self._worker.cancel()
        if self._counted:
            self._counted = False
            self.server.connections.discard(self)
            self.server.stats.connections -= 1

    def data_received(self, data: bytes) -> None:
        if not self._allowed or self._closing:
            return
        self._inbox += data
        self._flow()
        self._wake.set()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake.set()
        return True  # keep the transport open to send the answers owed; the worker closes it

    def pause_writing(self) -> None:
        self._writable.clear()
        self._unread_since = time.monotonic()
        self._flow()

    def resume_writing(self) -> None:
        self._writable.set()
        self._unread_since = None
        self._flow()

    def _flow(self) -> None:
        """Read while the inbox is short and answers are being taken; else let TCP hold the client back."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if len(self._inbox) >= INBOX_HIGH or not self._writable.is_set():
            transport.pause_reading()
        elif len(self._inbox) <= INBOX_LOW:
            transport.resume_reading()

    def check(self, now: float, idle_timeout: float) -> None:
        """The server's sweep: end a connection whose answers go unread, or that is silent too long."""
        if self._closing or self.transport is None:
            return
        if self._unread_since is not None and now - self._unread_since >= UNREAD_CLOSE_S:
            waiting = self.transport.get_write_buffer_size()
            self._end("unread", logging.WARNING, "plc: closed the Modbus connection from %s: it read none of its "
                      "answers for %.0f s (%d bytes waiting; requests were no longer read)", self.peer,
                      UNREAD_CLOSE_S, waiting, abort=True)
        elif idle_timeout and now - self._last_request >= idle_timeout:
            self._end("idle", logging.INFO, "plc: closed the Modbus connection from %s: no request for %.0f s "
                      "(plc.idle_timeout_s)", self.peer, idle_timeout)

    def _end(self, reason: str, level: int, message: str, *args: object, abort: bool = False) -> None:
        self._closing = True
        self.server.stats.closed[reason] += 1
        self.server.throttle.log(level, reason, message, *args)
        if self.transport is None:
            return
        if abort:  # its answers cannot be delivered: drop them now
            self.transport.abort()
        else:  # after the answers already queued
            self.transport.close()

    # ---------------------------------------------------------------- answering (the worker task)
    async def _work(self) -> None:
        while not self._closing:
            await self._wake.wait()
            self._wake.clear()
            answered = 0
            while not self._closing:
                if not self._writable.is_set():
                    await self._writable.wait()
                    continue
                frame = self._next_frame()
                if frame is None:
                    break
                self._answer(*frame)
                answered += 1
                if answered % ANSWERS_PER_TURN == 0:
                    self._flow()
                    await asyncio.sleep(0)  # let the other connections' requests in
            if self._closing:
                return
            self._flow()
            if self._eof:
                self._closing = True
                if self.transport is not None:
                    self.transport.close()  # after the answers queued
                return

    def _next_frame(self) -> tuple[int, int, bytes] | None:
        """The next whole request in the inbox (transaction id, unit id, PDU), taken out of it; None when
        none is whole yet. A header that cannot be Modbus TCP (protocol id not 0, a length no PDU has)
        ends the connection after the answers already queued: the stream has lost its framing and the
        PLC reconnects."""
        inbox = self._inbox
        if len(inbox) < MBAP.size:
            return None
        transaction, protocol, length, unit = MBAP.unpack_from(inbox, 0)
        if protocol != 0 or not 2 <= length <= MAX_MBAP_LENGTH:
            inbox.clear()
            self._end("framing", logging.WARNING, "plc: closed the Modbus connection from %s: not a Modbus TCP "
                      "frame (protocol id %d, length %d)", self.peer, protocol, length)
            return None
        end = 6 + length
        if len(inbox) < end:
            return None  # the rest of the frame is on its way
        pdu = bytes(inbox[MBAP.size:end])
        del inbox[:end]  # bytearray: O(1) from the front
        self._last_request = time.monotonic()
        return transaction, unit, pdu

    def _answer(self, transaction: int, unit: int, pdu: bytes) -> None:
        stats, store = self.server.stats, self.server.store
        stats.requests[pdu[0]] += 1
        problem = ExcCodes.GATEWAY_NO_RESPONSE if unit != store.unit_id else request_problem(pdu)
        if problem is not None:
            response = exception_pdu(pdu[0], problem)
        else:
            try:
                response = answer_pdu(store, pdu)
            except Exception:
                log.exception("plc: Modbus request (function %d) failed", pdu[0])
                response = exception_pdu(pdu[0], ExcCodes.DEVICE_FAILURE)
        if response[0] & 0x80:
            stats.exceptions[response[1]] += 1
        transport = self.transport
        if transport is not None and not transport.is_closing():  # never written after a close (asyncio warns)
            transport.write(MBAP.pack(transaction, 0, len(response) + 1, unit) + response)


class _Server:
    """The listening socket and its connections, in one asyncio loop."""

    def __init__(self, store: RegisterStore, allowlist: Sequence[str], *, max_connections: int,
                 idle_timeout: float) -> None:
        self.store = store
        self.stats = ServerStats()
        self.throttle = LogThrottle(log)
        self.connections: set[_Connection] = set()
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.listener: asyncio.Server | None = None
        self.sweeper: asyncio.Task[None] | None = None
        self.allowlist = Allowlist(allowlist)

    async def sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_S)
            now = time.monotonic()
            for connection in list(self.connections):
                connection.check(now, self.idle_timeout)



async def serve(store: RegisterStore, host: str, port: int, allowlist: Sequence[str], *,
                max_connections: int = 16, idle_timeout: float = 0.0) -> tuple[_Server, int]:
    """Bind and serve ``store`` (in the running loop); returns the server and the bound port.
    ``idle_timeout`` 0: silent connections stay open. OSError when the address cannot be bound."""
    server = _Server(store, allowlist, max_connections=max_connections, idle_timeout=idle_timeout)
    loop = asyncio.get_running_loop()
    server.listener = await loop.create_server(lambda: _Connection(server), host, port, reuse_address=True)
    server.sweeper = loop.create_task(server.sweep(), name="plc-sweep")
    return server, int(server.listener.sockets[0].getsockname()[1])


async def stop(server: _Server) -> None:
    """Stop listening and close every connection."""
    if server.sweeper is not None:
        server.sweeper.cancel()
    if server.listener is not None:
        server.listener.close()
    for connection in list(server.connections):
        if connection.transport is not None:
            connection.transport.abort()
    if server.listener is not None:
        await server.listener.wait_closed()
    await asyncio.sleep(0)
