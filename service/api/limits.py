"""Bounds on HTTP clients, so that /healthz, /readyz, /metrics and the trigger stay answerable
whatever the other clients do (idle sockets, slow headers, slow readers, floods of requests).

uvicorn alone counted every open connection against one limit (``limit_concurrency``, 256) and
gave a connection that sends nothing, or its head a byte at a time, no timeout: 300 idle sockets
had every request answered 503. Instead:

* **Connections** (``ConnectionGuard``, ``guarded_protocol``): at most ``api.max_connections`` are
  open. One more evicts the least recently active connection with no request in flight (an idle
  socket, a half-sent head, a keep-alive between requests) instead of being refused, so a new
  health check always gets in. A request must arrive whole (line, headers and body) within
  ``api.read_timeout_s`` of connecting or of the previous response, however it trickles in;
  between requests uvicorn's keep-alive timeout (KEEP_ALIVE_S) closes sooner. A response the
  client reads nothing of for STALL_S is cut.
* **Requests in flight** (``RequestLimit``): IN_FLIGHT requests of each pool at once: the probes
  and /metrics, the trigger (a ``wait`` holds its slot until the result), the results' images
  (frame.jpg, overlay.jpg: an overlay can wait seconds for a render, service/api/overlays.py) and
  everything else each have their own, so a flood of one never starves the others; one more waits up to QUEUE_S for a
  slot (a coroutine, no thread), then gets 503 with Retry-After. A request counts once its body is
  in (service.api.errors.BodyLimit reads it first), so a slow body holds no slot. The pools
  together fit anyio's 40 worker threads, which run the sync routes: a probe never waits for a
  thread. The streams (STREAM_PATHS) have their own caps (service.live.view.MAX_VIEWERS,
  MAX_EVENT_CLIENTS) and hold no thread.

Everything here runs on the server's event loop thread. Closed connections and refused requests
are logged as one warning at most every WARN_EVERY_S, with their counts.
"""

from __future__ import annotations

import asyncio
import logging
import math
import resource
from collections import OrderedDict
from typing import Any, ClassVar

import h11
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.api.errors import problem

log = logging.getLogger(__name__)

KEEP_ALIVE_S = 5  # uvicorn's timeout_keep_alive: an idle keep-alive connection is closed after this
STALL_S = 30.0  # a response whose client reads nothing for this long is cut
POOLS = {"/healthz": "probe", "/readyz": "probe", "/metrics": "probe", "/api/trigger": "trigger"}
# requests in flight per pool ("other": every other path); the sum stays within anyio's 40 worker threads,
# "trigger" matches pipeline.max_pending_triggers' default
IN_FLIGHT = {"probe": 8, "trigger": 16, "other": 8, "image": 8}
IMAGE_PATHS = ("/frame.jpg", "/overlay.jpg")  # under /api/results/{id}: the "image" pool
QUEUE_S = 2.0  # a request finding its pool full waits this long for a slot, then gets 503
_POOL_NAMES = {"probe": "probes and /metrics requests", "trigger": "triggers", "other": "requests",
               "image": "result image requests"}
STREAM_PATHS = frozenset({"/api/live.mjpeg", "/api/events"})
FD_HEADROOM = 256  # open files kept for everything but HTTP connections (store, camera, PLC, libraries)
WARN_EVERY_S = 10.0


class Tally:
    """Events of one kind, counted by reason and logged as one warning at most every WARN_EVERY_S
    (the first at once). Event-loop thread only."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.totals: dict[str, int] = {}
        self._pending: dict[str, int] = {}
        self._last = -math.inf
        self._flush: asyncio.TimerHandle | None = None

    def note(self, reason: str) -> None:
        self.totals[reason] = self.totals.get(reason, 0) + 1
        self._pending[reason] = self._pending.get(reason, 0) + 1
        if self._flush is None:
            loop = asyncio.get_running_loop()
            self._flush = loop.call_at(max(loop.time(), self._last + WARN_EVERY_S), self._log, loop)

    def _log(self, loop: asyncio.AbstractEventLoop) -> None:
        self._flush = None
        self._last = loop.time()
        pending, self._pending = self._pending, {}
        log.warning("HTTP: %s: %s", self.what, "; ".join(f"{count} {reason}" for reason, count in pending.items()))


class ConnectionGuard:
    """The open HTTP connections, least recently active first: admits every new one, evicting the
    least recently active idle one at the cap. Event-loop thread only."""

    def __init__(self, max_connections: int, read_timeout_s: float) -> None:
        self.max_connections = max_connections
        self.read_timeout_s = read_timeout_s
        self.closed = Tally("closed connections")
        self._open: OrderedDict[GuardedH11Protocol, None] = OrderedDict()

    @property
    def count(self) -> int:
        return len(self._open)

    def admit(self, conn: GuardedH11Protocol) -> bool:
        """Count ``conn`` in; False (close it) only when every open connection has a request in flight."""
        while len(self._open) >= self.max_connections:
            victim = next((other for other in self._open if other.idle), None)
            if victim is None:
                self.closed.note(f"refused: all {len(self._open)} open connections have a request in flight")
                return False
            del self._open[victim]
            victim.drop()
            self.closed.note(f"evicted (the least recently active idle ones, at api.max_connections = "
                             f"{self.max_connections})")
        self._open[conn] = None
        return True

    def touch(self, conn: GuardedH11Protocol) -> None:
        """``conn`` answered a request: it is the most recently active."""
        if conn in self._open:
            self._open.move_to_end(conn)

    def release(self, conn: GuardedH11Protocol) -> None:
        self._open.pop(conn, None)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol under a ConnectionGuard, with a timeout on reading each request and
    on a stalled reader. Built per server by ``guarded_protocol``."""

    guard: ClassVar[ConnectionGuard]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_deadline: float | None = None
        self._read_timer: asyncio.TimerHandle | None = None
        self._stall_timer: asyncio.TimerHandle | None = None

    @property
    def idle(self) -> bool:
        """No request in flight: none yet, a head still arriving, or the last one answered."""
        return self.cycle is None or self.cycle.response_complete

    def drop(self) -> None:
        """Close now: a FIN when nothing waits to be written, else a reset (a stalled reader's
        unsent bytes would keep the socket open)."""
        if self.transport.get_write_buffer_size():
            self.transport.abort()
        else:
            self.transport.close()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if not self.guard.admit(self):
            self.drop()
            return
        self._expect_request()

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.release(self)
        for timer in (self._read_timer, self._stall_timer):
            if timer is not None:
                timer.cancel()
        self._read_timer = self._stall_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_read()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start a pipelined request already received
        if not self.transport.is_closing():
            self.guard.touch(self)
            self._expect_request()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stall_timer is None:
            self._stall_timer = self.loop.call_later(STALL_S, self._stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    # the request read timeout
    def _expect_request(self) -> None:
        """The next request must arrive whole within read_timeout_s from now."""
        self._read_deadline = self.loop.time() + self.guard.read_timeout_s
        self._watch_read()

    def _watch_read(self) -> None:
        """Run the read timer while a request is still arriving (none, a partial head, or a body);
        stop it once one is in. Partial bytes never move the deadline."""
        arriving = self.conn.their_state in (h11.IDLE, h11.SEND_BODY)
        if arriving and self._read_deadline is not None:
            if self._read_timer is None:
                self._read_timer = self.loop.call_at(self._read_deadline, self._read_timed_out)
            return
        self._read_deadline = None
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if self.transport.is_closing():
            return
        self.guard.closed.note(f"timed out (no complete request within api.read_timeout_s = "
                               f"{self.guard.read_timeout_s:g} s)")
        self.drop()

    def _stalled(self) -> None:
        self._stall_timer = None
        if self.transport.is_closing():
            return
        self.guard.closed.note(f"cut (the client read nothing of its response for {STALL_S:.0f} s)")
        self.transport.abort()


def guarded_protocol(guard: ConnectionGuard) -> type[GuardedH11Protocol]:
    """The protocol class to pass as ``uvicorn.Config(http=...)``: its connections are under ``guard``."""
    class Protocol(GuardedH11Protocol):
        pass

    Protocol.guard = guard
    return Protocol


def fit_open_files(max_connections: int) -> int:
    """The connection cap the process's open-file limit allows: the soft limit is raised (up to the
    hard one) to max_connections + FD_HEADROOM if it is lower; if that is not allowed, the cap is
    lowered, with a warning. Past the limit, accept() fails and asyncio stops accepting for a second,
    new health checks included, so the cap must stay below it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + FD_HEADROOM
    if soft != resource.RLIM_INFINITY and soft < wanted:
        raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return max_connections
    fitted = max(16, soft - FD_HEADROOM)
    log.warning("api.max_connections %d lowered to %d: the open-file limit is %d (raise LimitNOFILE in the "
                "service unit, or ulimit -n)", max_connections, fitted, soft)
    return fitted


def pool_of(path: str) -> str:
    """The pool a request path counts in (IN_FLIGHT)."""
    if path in POOLS:
        return POOLS[path]
    if path.startswith("/api/results/") and path.endswith(IMAGE_PATHS):
        return "image"
    return "other"


class RequestLimit:
    """ASGI middleware: at most IN_FLIGHT[pool] requests of each pool (POOLS) in flight; one more waits
    up to QUEUE_S for a slot, in order, then gets 503 with Retry-After. The streams pass (capped where
    they are served). Event-loop thread only."""

    def __init__(self, app: ASGIApp, limits: dict[str, int] | None = None) -> None:
        self.app = app
        self.limits = dict(limits or IN_FLIGHT)
        self._slots = {pool: asyncio.Semaphore(limit) for pool, limit in self.limits.items()}
        self.refused = Tally("refused requests")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in STREAM_PATHS:
            await self.app(scope, receive, send)
            return
        pool = pool_of(path)
        slots = self._slots.get(pool) or self._slots["other"]
        if not slots.locked():
            await slots.acquire()  # at once
        else:
            try:
                await asyncio.wait_for(slots.acquire(), QUEUE_S)
            except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                await self._refuse(scope, receive, send, pool)
                return
        try:
            await self.app(scope, receive, send)
        finally:
            slots.release()

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, pool: str) -> None:
        limit, what = self.limits[pool], _POOL_NAMES[pool]
        self.refused.note(f"503 ({limit} {what} in flight for {QUEUE_S:g} s)")
        detail = f"busy: {limit} {what} are in flight; retry in a second"
        await problem(503, detail, {"Retry-After": "1"})(scope, receive, send)
