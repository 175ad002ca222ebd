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
MAX_READ = 125


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


class ServerStats:
    """Counters of the Modbus side; touched only from the server's loop, read from anywhere."""

    def __init__(self) -> None:
        self.connections = 0
        self.connections_total = 0
        self.rejected = 0
        self.requests: collections.Counter[int] = collections.Counter()
        self.exceptions: collections.Counter[int] = collections.Counter()
        self.peers: collections.Counter[str] = collections.Counter()


class _Handler(ServerRequestHandler):
    """One client connection: refuses peers outside the allowlist, counts requests and exceptions."""

    server: _Server
    _allowed = True
    _counted = False

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
        stats.peers[host] += 1
        super().callback_connected()

    def callback_disconnected(self, exc: Exception | None) -> None:
        if self._counted:
            self._counted = False
            self.server.stats.connections -= 1
            host = next((h for h, n in self.server.stats.peers.items() if n > 0), None)
            if host is not None:
                self.server.stats.peers[host] -= 1
                if self.server.stats.peers[host] <= 0:
                    del self.server.stats.peers[host]
        super().callback_disconnected(exc)

    def callback_data(self, data: bytes, addr: tuple[Any, ...] | None = None) -> int:
        if not self._allowed:
            return len(data)
        return super().callback_data(data, addr)

    async def handle_request(self) -> None:
        if self.last_pdu is not None:
            self.server.stats.requests[int(self.last_pdu.function_code)] += 1
        await super().handle_request()

    def server_send(self, pdu: Any, addr: Any) -> None:
        if isinstance(pdu, ExceptionResponse):
            self.server.stats.exceptions[int(pdu.exception_code)] += 1
        super().server_send(pdu, addr)


class _Server(ModbusTcpServer):
    def __init__(self, store: RegisterStore, host: str, port: int, allowlist: Sequence[str]) -> None:
        super().__init__(store, address=(host, port))
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
