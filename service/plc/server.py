"""The Modbus TCP side: a datastore served from two plain lists, and a pymodbus server that enforces
the allowlist and counts connections, requests and exceptions.

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
import ipaddress
import logging
import math
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any

from pymodbus.constants import ExcCodes
from pymodbus.datastore import ModbusServerContext
from pymodbus.exceptions import NoSuchIdException
from pymodbus.pdu import ExceptionResponse
from pymodbus.server import ModbusTcpServer
from pymodbus.server.requesthandler import ServerRequestHandler

from service.plc.registers import CONTROL_WORDS, INPUT_WORDS, MIRROR_BASE

log = logging.getLogger(__name__)

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

    pymodbus refuses some of these itself while decoding, but answers them with function code 0x80
    and exception 01 whatever was asked; and it serves diagnostics and identification functions the
    register map does not offer.
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


class RegisterStore(ModbusServerContext):
    """Holding 0..15 (writable control block), input 0..115 and its read-only mirror at holding 1000+.

    Subclasses pymodbus's server context only to be accepted by its server: both accessors are
    overridden, and neither awaits. ``on_write(address, count)`` runs after a write, synchronously.
    """

    def __init__(self, unit_id: int, on_write: Callable[[int, int], None] | None = None) -> None:
        # Deliberately no super().__init__(): the base builds pymodbus's simulator memory we do not use.
        self.old_simulator = True  # pymodbus's server then calls our async_getValues/async_setValues
        self.simdevices = []
        self.unit_id = unit_id
        self.holding = [0] * CONTROL_WORDS
        self.inputs = [0] * INPUT_WORDS
        self.on_write = on_write

    def device_ids(self) -> list[int]:
        return [self.unit_id]

    def _check(self, device_id: int) -> None:
        if device_id != self.unit_id:
            raise NoSuchIdException(f"unit id {device_id} (this server answers {self.unit_id})")

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

    async def async_getValues(  # noqa: N802 - pymodbus names it
            self, device_id: int, func_code: int, address: int,
                              count: int = 1) -> list[int] | ExcCodes:
        self._check(device_id)
        return self.read(func_code, address, count)

    async def async_setValues(  # noqa: N802 - pymodbus names it
            self, device_id: int, func_code: int, address: int,
                              values: Sequence[int] | Sequence[bool]) -> ExcCodes | None:
        self._check(device_id)
        return self.write(func_code, address, values)


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


class _Handler(ServerRequestHandler):
    """One client connection: refused outside the allowlist or past the connection cap; answers its
    requests in order from a bounded inbox, reading only while its answers are being taken.

    pymodbus's own path decodes one frame per read from the socket, keeps one request in flight and
    empties its receive buffer when it answers, so a second request sent before the first answer
    (Modbus TCP allows several) was dropped silently; it also waited forever on a frame whose header
    cannot be Modbus TCP. And it reads, answers and buffers answers without bound. Here ``data_received``
    only queues bytes; one worker task frames, vets (request_problem) and answers them.
    """

    server: _Server
    _allowed = False
    _counted = False

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
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
    def callback_connected(self) -> None:
        server, stats = self.server, self.server.stats
        peer = self.transport.get_extra_info("peername") if self.transport else None
        self.peer = str(peer[0]) if peer else "?"
        if not server.allowed(self.peer):
            stats.rejected += 1
            server.throttle.log(logging.WARNING, "allowlist", "plc: refused a Modbus connection from %s (not in "
                                "plc.allowlist)", self.peer)
            self.transport.close()
            return
        if len(server.handlers) >= server.max_connections:
            stats.closed["limit"] += 1
            server.throttle.log(logging.WARNING, "limit", "plc: refused a Modbus connection from %s: %d clients "
                                "connected already (plc.max_connections)", self.peer, len(server.handlers))
            self.transport.close()
            return
        self._allowed = self._counted = True
        server.handlers.add(self)
        stats.connections += 1
        stats.connections_total += 1
        self.transport.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_LOW)  # type: ignore[attr-defined]
        self._worker = asyncio.get_running_loop().create_task(self._work(), name=f"plc-connection-{self.peer}")
        super().callback_connected()

    def callback_disconnected(self, exc: Exception | None) -> None:
        self._closing = True
        self._inbox.clear()
        if self._worker is not None:
            self._worker.cancel()
        if self._counted:
            self._counted = False
            self.server.handlers.discard(self)
            self.server.stats.connections -= 1
        super().callback_disconnected(exc)

    def data_received(self, data: bytes) -> None:
        if not self._allowed or self._closing:
            return
        self._inbox += data
        self._flow()
        self._wake.set()

    def eof_received(self) -> bool:  # type: ignore[override] # asyncio: True keeps the transport open
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
        transport: Any = self.transport
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
            waiting = self.transport.get_write_buffer_size()  # type: ignore[attr-defined]
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
        if abort:  # its answers cannot be delivered: drop them now
            self.transport.abort()  # type: ignore[attr-defined]
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
                await self._answer(*frame)
                answered += 1
                if answered % ANSWERS_PER_TURN == 0:
                    self._flow()
                    await asyncio.sleep(0)  # let the other connections' requests in
            if self._closing:
                return
            self._flow()
            if self._eof:
                self._closing = True
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

    async def _answer(self, transaction: int, unit: int, pdu: bytes) -> None:
        stats, store = self.server.stats, self.server.store
        stats.requests[pdu[0]] += 1
        problem = ExcCodes.GATEWAY_NO_RESPONSE if unit != store.unit_id else request_problem(pdu)
        if problem is None and pdu[0] == 23 and isinstance(store.read(23, *_words(pdu, 2)), ExcCodes):
            problem = ExcCodes.ILLEGAL_ADDRESS  # refused before pymodbus writes (it writes, then reads)
        request: Any = self.framer.decoder.decode(pdu) if problem is None else None
        if request is None:
            response: Any = ExceptionResponse(pdu[0], problem or ExcCodes.ILLEGAL_VALUE)
        else:
            try:  # completes in one step: the store never awaits
                response = await request.datastore_update(self.server.context, unit)
            except Exception:
                log.exception("plc: Modbus request %s failed", request)
                response = ExceptionResponse(request.function_code, ExcCodes.DEVICE_FAILURE)
        response.transaction_id, response.dev_id = transaction, unit
        self.server_send(response, None)

    def send(self, data: bytes, addr: tuple[Any, ...] | None = None) -> None:
        transport: Any = self.transport
        if transport is not None and not transport.is_closing():  # never written after a close: asyncio logs
            transport.write(data)  # a warning for each such write, pymodbus an error

    def server_send(self, pdu: Any, addr: Any) -> None:
        if isinstance(pdu, ExceptionResponse):
            self.server.stats.exceptions[int(pdu.exception_code)] += 1
        super().server_send(pdu, addr)


class _Server(ModbusTcpServer):
    def __init__(self, store: RegisterStore, host: str, port: int, allowlist: Sequence[str], *,
                 max_connections: int, idle_timeout: float) -> None:
        super().__init__(store, address=(host, port))
        self.store = store
        self.stats = ServerStats()
        self.throttle = LogThrottle(log)
        self.handlers: set[_Handler] = set()
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.sweeper: asyncio.Task[None] | None = None
        self._networks = [ipaddress.ip_network(entry, strict=False) for entry in allowlist]

    async def sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_S)
            now = time.monotonic()
            for handler in list(self.handlers):
                handler.check(now, self.idle_timeout)

    def allowed(self, host: str) -> bool:
        if not self._networks:
            return True
        try:
            address = ipaddress.ip_address(host.split("%")[0])
        except ValueError:
            return False
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self._networks)

    def callback_new_connection(self) -> _Handler:
        return _Handler(self, self.trace_packet, self.trace_pdu, self.trace_connect)


async def serve(store: RegisterStore, host: str, port: int, allowlist: Sequence[str], *,
                max_connections: int = 16, idle_timeout: float = 0.0) -> tuple[_Server, int]:
    """Bind and serve ``store`` (in the running loop); returns the server and the bound port.
    ``idle_timeout`` 0: silent connections stay open."""
    server = _Server(store, host, port, allowlist, max_connections=max_connections, idle_timeout=idle_timeout)
    await server.serve_forever(background=True)
    listener: Any = server.transport
    if listener is None or not getattr(listener, "sockets", None):
        await server.shutdown()
        raise OSError(f"cannot listen on {host}:{port}")
    server.sweeper = asyncio.get_running_loop().create_task(server.sweep(), name="plc-sweep")
    return server, int(listener.sockets[0].getsockname()[1])


async def stop(server: _Server) -> None:
    if server.sweeper is not None:
        server.sweeper.cancel()
    await server.shutdown()
    await asyncio.sleep(0)
