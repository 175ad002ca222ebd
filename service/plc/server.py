"""The Modbus TCP side: a datastore served from two plain lists, and a pymodbus server that enforces
the allowlist and counts connections, requests and exceptions.

``RegisterStore`` is built without I/O (the tests drive it directly); ``serve`` binds it. Every
access runs in the server's one asyncio loop and none of them awaits, so a read of any span sees
the registers between two writer steps, never in the middle of one (service.py holds the writer).
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import struct
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


class _Handler(ServerRequestHandler):
    """One client connection: refuses peers outside the allowlist, counts requests and exceptions."""

    server: _Server
    _allowed = True
    _counted = False
    _closing = False  # framing lost: the connection closes, input is ignored

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._tasks: set[asyncio.Task[None]] = set()
        # pymodbus drops everything received once its buffer passes one frame's size (264 bytes), so a
        # burst of requests was lost whole. callback_data consumes every complete frame at once and
        # leaves at most one partial frame (< 261 bytes), so the buffer stays small without that limit.
        self.max_buffer_size = 1 << 20

    def callback_connected(self) -> None:
        stats = self.server.stats
        peer = self.transport.get_extra_info("peername") if self.transport else None
        host = str(peer[0]) if peer else ""
        if not self.server.allowed(host):
            self._allowed = False
            stats.rejected += 1
            log.warning("plc: refused a Modbus connection from %s (not in plc.allowlist)", host)
            self.transport.close()
            return
        self._counted = True
        stats.connections += 1
        stats.connections_total += 1
        super().callback_connected()

    def callback_disconnected(self, exc: Exception | None) -> None:
        if self._counted:
            self._counted = False
            self.server.stats.connections -= 1
        super().callback_disconnected(exc)

    def callback_data(self, data: bytes, addr: tuple[Any, ...] | None = None) -> int:
        """Frame every complete request in ``data``, vet it (request_problem) and answer it, in order.

        pymodbus's own path decodes one frame per read from the socket, keeps one request in flight
        and empties its receive buffer when it answers, so a second request sent before the first
        answer (Modbus TCP allows several) was dropped silently; it also waited forever on a frame
        whose header cannot be Modbus TCP. Here such a header (protocol id not 0, a length no PDU
        has) closes the connection: the byte stream has lost its framing and the PLC reconnects.
        """
        if not self._allowed or self._closing:
            return len(data)
        used = 0
        while len(data) - used >= MBAP.size:
            transaction, protocol, length, unit = MBAP.unpack_from(data, used)
            if protocol != 0 or not 2 <= length <= MAX_MBAP_LENGTH:
                peer = self.transport.get_extra_info("peername") if self.transport else None
                log.warning("plc: closed the Modbus connection from %s: not a Modbus TCP frame (protocol id %d, "
                            "length %d)", peer[0] if peer else "?", protocol, length)
                self._closing = True
                if self.transport:  # after the answers already queued (call_soon runs in order)
                    asyncio.get_running_loop().call_soon(self.transport.close)
                return len(data)
            end = used + 6 + length
            if len(data) < end:
                break  # the rest of the frame is on its way
            self._answer(transaction, unit, data[used + MBAP.size:end], addr)
            used = end
        return used

    def _answer(self, transaction: int, unit: int, pdu: bytes, addr: Any) -> None:
        self.server.stats.requests[pdu[0]] += 1
        problem = ExcCodes.GATEWAY_NO_RESPONSE if unit != self.server.store.unit_id else request_problem(pdu)
        if problem is None and pdu[0] == 23 and isinstance(self.server.store.read(23, *_words(pdu, 2)), ExcCodes):
            problem = ExcCodes.ILLEGAL_ADDRESS  # refused before pymodbus writes (it writes, then reads)
        request = self.framer.decoder.decode(pdu) if problem is None else None
        if request is None:
            request = ExceptionResponse(pdu[0], problem or ExcCodes.ILLEGAL_VALUE)
        request.dev_id, request.transaction_id = unit, transaction
        # Answers go out in arrival order: tasks run in the order they are made, and each finishes in one
        # step (the store never awaits).
        task = asyncio.get_running_loop().create_task(self._serve(request, addr))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, request: Any, addr: Any) -> None:
        if isinstance(request, ExceptionResponse):
            response = request
        else:
            try:
                response = await request.datastore_update(self.server.context, request.dev_id)
            except Exception:
                log.exception("plc: Modbus request %s failed", request)
                response = ExceptionResponse(request.function_code, ExcCodes.DEVICE_FAILURE)
            response.transaction_id, response.dev_id = request.transaction_id, request.dev_id
        self.server_send(response, addr)

    def send(self, data: bytes, addr: tuple[Any, ...] | None = None) -> None:
        pending = self.recv_buffer  # pymodbus empties it on every send: a partly received next request
        super().send(data, addr)
        self.recv_buffer = pending

    def server_send(self, pdu: Any, addr: Any) -> None:
        if isinstance(pdu, ExceptionResponse):
            self.server.stats.exceptions[int(pdu.exception_code)] += 1
        super().server_send(pdu, addr)


class _Server(ModbusTcpServer):
    def __init__(self, store: RegisterStore, host: str, port: int, allowlist: Sequence[str]) -> None:
        super().__init__(store, address=(host, port))
        self.store = store
        self.stats = ServerStats()
        self._networks = [ipaddress.ip_network(entry, strict=False) for entry in allowlist]

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


async def serve(store: RegisterStore, host: str, port: int, allowlist: Sequence[str]) -> tuple[_Server, int]:
    """Bind and serve ``store`` (in the running loop); returns the server and the bound port."""
    server = _Server(store, host, port, allowlist)
    await server.serve_forever(background=True)
    listener: Any = server.transport
    if listener is None or not getattr(listener, "sockets", None):
        await server.shutdown()
        raise OSError(f"cannot listen on {host}:{port}")
    return server, int(listener.sockets[0].getsockname()[1])


async def stop(server: _Server) -> None:
    await server.shutdown()
    await asyncio.sleep(0)
