"""The OPC UA server: its own thread and asyncio loop, the node tree, the ONE writer, Trigger and Command.

::

    pipeline publishing thread --offer()--> handoff (bounded deque; oldest dropped, counted) --wake--> writer
    writer (in the loop): every LastResult value of a result, then ResultSeq, in one step; then Counters
    ticker (2 Hz, in the loop): State (ready, camera, engine, busy, heartbeat) written when it changes
    Trigger(PartId) method -> the daemon's trigger (the rules of docs/opcua.md); Command write -> the PLC's
    Modbus write path (holding 4), so the command word behaves as a PLC's write of it

Clients are checked twice: at the TCP connection (opcua.allowlist) and at session activation
(opcua.users, asyncua's user manager). Nothing here runs on a pipeline thread but ``offer``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import logging
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

from asyncua import Server, ua
from asyncua.common.node import Node
from asyncua.crypto import uacrypto
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.address_space import AttributeService
from asyncua.server.binary_server_asyncio import BinaryServer, OPCUAProtocol
from asyncua.server.user_managers import UserManager

from engines.errors import DefectsamError
from engines.results import Verdict
from service.allowlist import Allowlist
from service.config.models import OpcuaSection, is_loopback
from service.metrics import OpcuaSnapshot
from service.opcua.nodes import COMMAND, RESULT_SEQ, default, result_values, tree
from service.opcua.station import LineState, Station
from service.pipeline.record import InspectionRecord
from service.plc.server import LogThrottle

log = logging.getLogger(__name__)

TICK_S = 0.5
_ADMIN = User(role=UserRole.Admin)  # asyncua's default for server-side writes
PART_ID_MAX = 128  # as POST /api/trigger
BUSY_MARGIN_S = 5.0  # a taken trigger whose result never came here stops being busy after the trigger timeout + this


class Stats:
    """Counters of the OPC UA side; touched only from the server's loop (and offer), read from anywhere."""

    def __init__(self) -> None:
        self.connections_total = 0
        self.connections_refused = 0  # not in opcua.allowlist
        self.logins_refused = 0  # anonymous where users are set, unknown user, wrong password
        self.writes_refused = 0
        self.triggers_taken = 0
        self.triggers_refused = 0
        self.results_published = 0
        self.results_dropped = 0
        self.verdicts: collections.Counter[str] = collections.Counter()


class _Users(UserManager):
    """opcua.users: a user name and its password, compared in constant time; none set: anonymous only."""

    def __init__(self, users: dict[str, str], stats: Stats, throttle: LogThrottle) -> None:
        self._users = users
        self._stats = stats
        self._throttle = throttle

    def get_user(self, iserver: Any, username: str | None = None, password: str | None = None,
                 certificate: Any = None) -> User | None:
        if not self._users and username is None:
            return User(role=UserRole.User)
        expected = self._users.get(username or "")
        if expected is not None and password is not None and hmac.compare_digest(expected.encode(),
                                                                                 password.encode()):
            return User(role=UserRole.User, name=username)
        self._stats.logins_refused += 1
        why = "anonymous session (opcua.users is set)" if username is None else f"user {username!r}: " + (
            "no users are configured (opcua.users)" if not self._users else "unknown user or wrong password")
        self._throttle.log(logging.WARNING, "login", "opcua: refused a session: %s", why)
        return None


class _GuardedProtocol(OPCUAProtocol):
    """A connection: refused at once when its address is not in opcua.allowlist."""

    guard: _Guard

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        host = str(peer[0]) if peer else "?"
        if not self.guard.allowlist.allows(host):
            self.guard.stats.connections_refused += 1
            self.guard.throttle.log(logging.WARNING, "allowlist", "opcua: refused a connection from %s (not in "
                                    "opcua.allowlist)", host)
            transport.close()
            return
        self.guard.stats.connections_total += 1
        super().connection_made(transport)


class _Guard:
    def __init__(self, allowlist: list[str], stats: Stats, throttle: LogThrottle) -> None:
        self.allowlist = Allowlist(allowlist)
        self.stats = stats
        self.throttle = throttle



class _GuardedBinaryServer(BinaryServer):
    guard: _Guard

    def _make_protocol(self) -> OPCUAProtocol:
        protocol = _GuardedProtocol(iserver=self.iserver, policies=self._policies, clients=self.clients,
                                    closing_tasks=self.closing_tasks, limits=self.limits)
        protocol.guard = self.guard
        return protocol


class _Server(Server):
    """asyncua's Server whose listener checks the allowlist before a connection gets a protocol.

    ``start`` is Server.start (asyncua 1.1-2.x) with the guarded binary server in place of BinaryServer.
    """

    guard: _Guard

    async def start(self) -> None:
        if self.iserver.certificate is not None:
            uacrypto.check_certificate(self.iserver.certificate, self._application_uri, socket.gethostname())
        await self._setup_server_nodes()
        await self.iserver.start()
        try:
            host, port = self._get_bind_socket_info()
            self.bserver = _GuardedBinaryServer(self.iserver, host, port, self.limits)  # type: ignore[arg-type]
            self.bserver.guard = self.guard
            self.bserver.set_policies(self._policies)
            await self.bserver.start()
        except BaseException:
            await self.iserver.stop()
            raise


class _GatedAttributes(AttributeService):
    """Writes: the Command node's value goes through ``on_command`` (its status code is the write's);
    every refused write (bad type, read-only node, not allowed) is counted."""

    def __init__(self, aspace: Any, command: ua.NodeId, on_command: Callable[[ua.DataValue], Awaitable[ua.StatusCode]],
                 stats: Stats) -> None:
        super().__init__(aspace)
        self._command = command
        self._on_command = on_command
        self._stats = stats

    async def write(self, params: ua.WriteParameters, user: User = _ADMIN) -> list[ua.StatusCode]:
        results: list[ua.StatusCode] = []
        for item in params.NodesToWrite:
            if item.NodeId == self._command and item.AttributeId == ua.AttributeIds.Value:
                code = await self._on_command(item.Value)
            else:
                one = ua.WriteParameters()
                one.NodesToWrite = [item]
                code = (await super().write(one, user))[0]
            if not code.is_good():
                self._stats.writes_refused += 1
            results.append(code)
        return results


# asyncua types its constructors with NewType aliases (UInt32, Int16, String...): plain ints and strs
# are what it takes at run time; these helpers keep the casts in one place.
def _status(code: int) -> ua.StatusCode:
    return ua.StatusCode(code)  # type: ignore[arg-type]


def _node_id(identifier: str | int, namespace: int = 0) -> ua.NodeId:
    return ua.NodeId(identifier, namespace)  # type: ignore[arg-type]


def _value(variant: ua.Variant, when: datetime) -> ua.DataValue:
    return ua.DataValue(variant, SourceTimestamp=when,  # type: ignore[arg-type]
                        ServerTimestamp=datetime.now(timezone.utc))  # type: ignore[arg-type]


class OpcuaService:
    """Serves the node tree; ``offer`` is the pipeline subscriber (returns at once, never blocks)."""

    def __init__(self, config: OpcuaSection, station: Station) -> None:
        self.config = config
        self.station = station
        self.stats = Stats()
        self.throttle = LogThrottle(log)
        self.port: int | None = None
        self._handoff: collections.deque[InspectionRecord] = collections.deque()
        self._handoff_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._stop_event: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._server: _Server | None = None
        self._nodes: dict[str, Node] = {}
        self._types: dict[str, ua.VariantType] = {}
        self._shown: dict[str, Any] = {}  # State values as last written
        self._seq = 0
        self._beat = 0
        self._busy: tuple[int, float] | None = None  # (trigger id, monotonic deadline) of the taken trigger
        self._command_echo = 0

    # ------------------------------------------------------------------ lifecycle (any thread)
    def start(self, timeout: float = 30.0) -> None:
        """Bind and serve in a thread of its own; raises DefectsamError when it cannot."""
        self._thread = threading.Thread(target=self._run, name="opcua", daemon=True)
        self._thread.start()
        where = f"{self.config.host}:{self.config.port}"
        if not self._started.wait(timeout):
            raise DefectsamError(f"opcua: the OPC UA server on {where} did not start within {timeout:.0f} s")
        if self._start_error is not None:
            exc = self._start_error
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
            raise DefectsamError(f"opcua.host/opcua.port {where}: cannot serve OPC UA: {detail}")
        log.info("opcua: OPC UA on %s, nodes under Objects/Defectsam/%s (namespace %s), %s, security %s "
                 "(docs/opcua.md)", self.endpoint, self.config.station, self.config.namespace_uri,
                 "users " + ", ".join(sorted(self.config.users)) if self.config.users else "anonymous sessions",
                 ", ".join(self.config.security_policies))
        if "None" in self.config.security_policies and not is_loopback(self.config.host):
            log.warning("opcua: security policy None on %s: traffic%s is neither signed nor encrypted",
                        self.config.host, " (passwords included)" if self.config.users else "")

    @property
    def endpoint(self) -> str:
        return f"opc.tcp://{self.config.host}:{self.port or self.config.port}/defectsam/"

    def stop(self) -> None:
        loop, event = self._loop, self._stop_event
        if loop is not None and event is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(event.set)
        if self._thread is not None:
            self._thread.join(15.0)

    def offer(self, record: InspectionRecord) -> None:
        """The pipeline subscriber: hand the record over and wake the writer; never blocks."""
        with self._handoff_lock:
            if len(self._handoff) >= self.config.queue:
                self._handoff.popleft()
                self.stats.results_dropped += 1
            self._handoff.append(record)
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # loop closed while stopping
                loop.call_soon_threadsafe(wake.set)

    def snapshot(self) -> OpcuaSnapshot:
        s = self.stats
        server = self._server
        clients = len(server.bserver.clients) if server is not None and server.bserver is not None else 0
        return OpcuaSnapshot(
            enabled=True, endpoint=self.endpoint, clients=clients, connections_total=s.connections_total,
            connections_refused=s.connections_refused, logins_refused=s.logins_refused,
            writes_refused=s.writes_refused, triggers_taken=s.triggers_taken, triggers_refused=s.triggers_refused,
            results_published=s.results_published, results_dropped=s.results_dropped,
        )

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            if not self._started.is_set():
                self._start_error = exc
                self._started.set()
            else:
                log.exception("opcua: the OPC UA server stopped")

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._stop_event = asyncio.Event()
        server = await self._build()
        try:
            await server.start()
        except OSError as exc:
            self._start_error = exc
            self._started.set()
            return
        self._server = server
        bound: Any = server.bserver._server if server.bserver is not None else None  # the asyncio listener
        self.port = int(bound.sockets[0].getsockname()[1]) if bound is not None and bound.sockets else None
        await self._tick()
        self._started.set()
        tasks = [asyncio.create_task(self._writer(), name="opcua-writer"),
                 asyncio.create_task(self._ticker(), name="opcua-ticker")]
        await self._stop_event.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.stop()

    async def _build(self) -> _Server:
        config = self.config
        users = {name: secret.get_secret_value() for name, secret in config.users.items()}
        server = _Server(user_manager=_Users(users, self.stats, self.throttle))
        server.guard = _Guard(config.allowlist, self.stats, self.throttle)
        await server.init()
        server.set_endpoint(f"opc.tcp://{config.host}:{config.port}/defectsam/")
        server.set_server_name(f"defectsam {config.station}")
        await server.set_application_uri(f"urn:defectsam:{config.station}")
        server.set_security_policy([getattr(ua.SecurityPolicyType, "NoSecurity" if p == "None" else p)
                                    for p in config.security_policies])
        server.set_identity_tokens([ua.UserNameIdentityToken] if users else [ua.AnonymousIdentityToken])
        if config.certificate is not None and config.private_key is not None:
            try:
                await server.load_certificate(str(config.certificate))
                await server.load_private_key(str(config.private_key))
            except (OSError, ValueError) as exc:
                raise DefectsamError(f"opcua.certificate/opcua.private_key: cannot load "
                                     f"{config.certificate} / {config.private_key}: {exc}") from None
        idx = await server.register_namespace(config.namespace_uri)
        root = await server.nodes.objects.add_folder(_node_id("Defectsam", idx), ua.QualifiedName("Defectsam", idx))
        station = await root.add_object(_node_id(config.station, idx), ua.QualifiedName(config.station, idx))
        folders: dict[str, Node] = {"": station}

        async def folder(path: str) -> Node:
            if path not in folders:
                parent, _, name = path.rpartition("/")
                folders[path] = await (await folder(parent)).add_folder(
                    _node_id(f"{config.station}.{path.replace('/', '.')}", idx), ua.QualifiedName(name, idx))
            return folders[path]

        for spec in tree(config.top_n):
            parent, _, name = spec.path.rpartition("/")
            kind = getattr(ua.VariantType, spec.type)
            node = await (await folder(parent)).add_variable(
                _node_id(f"{config.station}.{spec.path.replace('/', '.')}", idx), ua.QualifiedName(name, idx),
                ua.Variant(default(spec.type), kind), datatype=_node_id(kind.value))
            await node.write_attribute(ua.AttributeIds.Description,
                                       ua.DataValue(ua.Variant(ua.LocalizedText(spec.meaning))))
            if spec.writable:
                await node.set_writable()
            self._nodes[spec.path] = node
            self._types[spec.path] = kind
        part = ua.Argument()
        part.Name, part.DataType, part.ValueRank = "PartId", _node_id(ua.ObjectIds.String), -1
        part.Description = ua.LocalizedText("part id (printable ASCII, up to 128; '' for none)")
        taken = ua.Argument()
        taken.Name, taken.DataType, taken.ValueRank = "TriggerId", _node_id(ua.ObjectIds.UInt32), -1
        taken.Description = ua.LocalizedText("LastResult/TriggerId of the result that answers it")
        await station.add_method(_node_id(f"{config.station}.Trigger", idx), ua.QualifiedName("Trigger", idx),
                                 self._trigger_method, [part], [taken])
        server.iserver.attribute_service = _GatedAttributes(
            server.iserver.aspace, self._nodes[COMMAND.path].nodeid, self._command_write, self.stats)
        return server

    async def _set(self, path: str, value: Any, when: datetime) -> None:
        """One node's value with its source timestamp (the result's capture time, or now for State)."""
        assert self._server is not None
        variant = ua.Variant(value, self._types[path])  # straight into the address space, not the gated write
        await self._server.write_attribute_value(self._nodes[path].nodeid, _value(variant, when))

    async def _writer(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while True:
                with self._handoff_lock:
                    record = self._handoff.popleft() if self._handoff else None
                if record is None:
                    break
                await self._publish(record)

    async def _publish(self, record: InspectionRecord) -> None:
        """Every LastResult value, then ResultSeq (last), then Counters; all with the result's capture time as
        source timestamp. Nothing here waits on I/O, so the loop serves no request in between."""
        when = datetime.fromtimestamp(record.wall_time, timezone.utc)
        for path, value in result_values(record, self.config.top_n).items():
            await self._set(path, value, when)
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        await self._set(RESULT_SEQ.path, self._seq, when)
        s = self.stats
        s.results_published += 1
        s.verdicts[record.verdict.name] += 1
        if self._busy is not None and record.trigger_id == self._busy[0]:
            self._busy = None
        now = datetime.now(timezone.utc)
        counts = {"Counters/Results": s.results_published, "Counters/Ok": s.verdicts[Verdict.OK.name],
                  "Counters/Ng": s.verdicts[Verdict.NG.name], "Counters/Uncertain": s.verdicts[Verdict.UNCERTAIN.name],
                  "Counters/NoFrame": s.verdicts[Verdict.NO_FRAME.name], "Counters/ResultsDropped": s.results_dropped}
        for path, value in counts.items():
            await self._set(path, value, now)
        await self._tick(beat=False)

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            await self._tick()

    def _trigger_problem(self, line: LineState) -> str | None:
        if not line.camera_ok:
            return "camera not connected"
        if not line.engine_loaded:
            return "engine not loaded"
        if self._busy is not None:
            if time.monotonic() < self._busy[1]:
                return f"trigger {self._busy[0]} still waits for its result (State/Busy)"
            self._busy = None
        return None

    async def _tick(self, beat: bool = True) -> None:
        line = await asyncio.to_thread(self.station.state)
        if beat:
            self._beat = (self._beat + 1) & 0xFFFFFFFF
        problem = self._trigger_problem(line)
        values = {
            "State/Ready": not line.not_ready, "State/NotReady": "; ".join(line.not_ready),
            "State/CameraOk": line.camera_ok, "State/EngineLoaded": line.engine_loaded,
            "State/TriggerReady": problem is None, "State/Busy": self._busy is not None,
            "State/ErrorCode": line.error_code if line.error_code is not None
            else 1 if not line.camera_ok else 2 if not line.engine_loaded else 0,
            "State/Mode": self.station.mode, "State/Bundle": line.bundle, "State/Heartbeat": self._beat,
            "State/CommandEcho": line.command_echo if line.command_echo is not None else self._command_echo,
            "Counters/TriggersTaken": self.stats.triggers_taken,
            "Counters/TriggersRefused": self.stats.triggers_refused,
            "Counters/WritesRefused": self.stats.writes_refused,
        }
        now = datetime.now(timezone.utc)
        for path, value in values.items():
            if self._shown.get(path) != value:
                self._shown[path] = value
                await self._set(path, value, now)

    # ------------------------------------------------------------------ Trigger and Command (in the loop)
    async def _trigger_method(self, parent: ua.NodeId, *args: ua.Variant) -> list[ua.Variant] | ua.StatusCode:
        code = await self._trigger(args)
        await self._tick(beat=False)
        return code

    async def _trigger(self, args: tuple[ua.Variant, ...]) -> list[ua.Variant] | ua.StatusCode:
        if len(args) != 1:
            return self._refuse(ua.StatusCodes.BadArgumentsMissing if not args else ua.StatusCodes.BadTooManyArguments,
                                f"Trigger takes one argument (PartId), got {len(args)}")
        arg = args[0]
        if arg.VariantType not in (ua.VariantType.String, ua.VariantType.Null):
            return self._refuse(ua.StatusCodes.BadTypeMismatch, f"PartId must be a String, not {arg.VariantType.name}")
        part = arg.Value or ""
        if len(part) > PART_ID_MAX or (part and not (part.isascii() and part.isprintable() and part[0] != " ")):
            return self._refuse(ua.StatusCodes.BadOutOfRange,
                                f"PartId must be printable ASCII of at most {PART_ID_MAX} characters")
        problem = self._trigger_problem(await asyncio.to_thread(self.station.state))
        if problem is not None:
            return self._refuse(ua.StatusCodes.BadInvalidState, f"not ready: {problem}")
        try:
            ticket = await asyncio.to_thread(self.station.trigger, part or None)
        except Exception as exc:
            return self._refuse(ua.StatusCodes.BadResourceUnavailable, f"the pipeline refused it: {exc}")
        trigger_id = int(getattr(ticket, "trigger_id", 0))
        self.stats.triggers_taken += 1
        self._busy = (trigger_id, time.monotonic() + self.station.trigger_timeout_s + BUSY_MARGIN_S)
        return [ua.Variant(trigger_id, ua.VariantType.UInt32)]

    def _refuse(self, code: int, why: str) -> ua.StatusCode:
        self.stats.triggers_refused += 1
        self.throttle.log(logging.WARNING, f"trigger-{code}", "opcua: Trigger refused (%s): %s",
                          _status(code).name, why)
        return _status(code)

    async def _command_write(self, value: ua.DataValue) -> ua.StatusCode:
        variant = value.Value
        if variant is None or variant.VariantType is not ua.VariantType.UInt16:
            got = variant.VariantType.name if variant is not None else "nothing"
            self.throttle.log(logging.WARNING, "command-type", "opcua: refused a write of Command: UInt16 "
                              "expected, got %s", got)
            return _status(ua.StatusCodes.BadTypeMismatch)
        if self.station.write_command is None:
            self.throttle.log(logging.WARNING, "command-plc", "opcua: refused a write of Command: the command word "
                              "is the PLC's (holding 4) and plc.enabled is false")
            return _status(ua.StatusCodes.BadNotSupported)
        try:
            echo = await asyncio.to_thread(self.station.write_command, int(variant.Value))
        except Exception as exc:
            self.throttle.log(logging.WARNING, "command-refused", "opcua: refused a write of Command: %s", exc)
            return _status(ua.StatusCodes.BadInvalidState)
        self._command_echo = echo
        now = datetime.now(timezone.utc)
        await self._set(COMMAND.path, int(variant.Value), now)
        await self._tick(beat=False)
        return _status(ua.StatusCodes.Good)

