"""The PLC service: the Modbus server's thread and loop, the handshake, and the ONE register writer.

::

    pipeline publishing thread --offer()--> intake (bounded; drops counted) --wake--> writer coroutine
    PLC writes (control block) --on_write(), in the loop--> handshake: trigger -> ack, results ack, ...
    ticker (10 Hz, in the loop) -> vision heartbeat, camera/engine/PLC-heartbeat faults -> fail safe
    PLC writes a new recipe number (holding 4) -> select_recipe (service.recipes.RecipeBook.select, the one
        entry point every controller interface calls) -> the reloader's LoadEvents --on_load_event()-->
        recipe busy, then echo (input 4) or error 5/6 (docs/plc.md, "Recipes")

Everything that touches the registers runs in one asyncio loop and never awaits in the middle of a
change: a result's fields are all written, then the status word flips (inspection completed
toggles, results valid rises) in the same synchronous step. Reads are served by the same loop, so a
PLC reading the block at any moment gets the previous result or the new one, never a mix.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from engines.errors import DefectsamError
from engines.percentiles import LatencyLog, quantile_ms
from service.config.models import PlcSection, is_loopback
from service.metrics import PlcSnapshot
from service.pipeline.record import InspectionRecord
from service.plc.push import Pusher
from service.plc.registers import (
    BY_NAME,
    CTRL,
    ERROR_CAMERA,
    ERROR_ENGINE,
    ERROR_HEARTBEAT,
    ERROR_RECIPE_FAILED,
    ERROR_RECIPE_UNKNOWN,
    ERROR_TRIGGER,
    INPUT_WORDS,
    RESULT_BASE,
    STAT,
    encode_result,
    get,
    put,
)
from service.plc.server import RegisterStore, ServerStats, serve, stop
from service.reload import LoadEvent

log = logging.getLogger(__name__)

TICK_S = 0.1
VISION_BEAT_S = 0.5
LATENCY_KEEP = 4096


@dataclass(frozen=True)
class Health:
    camera_ok: bool
    engine_loaded: bool


Trigger = Callable[[str | None], object]  # returns a ticket with .trigger_id; raises when it cannot trigger
SelectRecipe = Callable[[int, str], object]  # (recipe number, source); returns at once (service.recipes)


class PlcService:
    """Serves the register map; ``offer`` is the pipeline subscriber (returns at once)."""

    def __init__(self, config: PlcSection, *, trigger: Trigger | None = None,
                 health: Callable[[], Health] | None = None, select_recipe: SelectRecipe | None = None) -> None:
        self.config = config
        self._trigger = trigger
        self._select_recipe = select_recipe
        self._health = health or (lambda: Health(True, True))
        self.store = RegisterStore(config.unit_id, self._on_write)
        self._intake: queue.Queue[InspectionRecord] = queue.Queue(config.intake_queue)
        self._buffer: collections.deque[InspectionRecord] = collections.deque()
        self.port: int | None = None
        self.intake_dropped = 0
        self.results_written = 0
        self.buffer_overruns = 0
        self.triggers_taken = 0
        self.triggers_missed = 0
        self.fail_safe_writes = 0
        self.latencies = LatencyLog(LATENCY_KEEP)  # capture -> result registers written
        self.publish_latencies = LatencyLog(LATENCY_KEEP)  # published by the pipeline -> registers written
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._server: object | None = None
        self._stats: ServerStats | None = None
        self._push: Pusher | None = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._stop_event: asyncio.Event | None = None
        # handshake state (loop thread only)
        self._control = 0
        self._status = STAT["online"]
        self._pending_trigger: int | None = None
        self._fault = 0  # current fault code (camera, engine, heartbeat), 0: none
        self._latched = 0  # heartbeat timeout / trigger refusal, until clear error
        self._recipe_error = 0  # unknown recipe / failed load, until clear error or a recipe loads
        # a failed PLC recipe request blocks triggers (the part in front needs that recipe); a failed load
        # asked for elsewhere (API, the store's pointer) is reported but the running bundle keeps inspecting
        self._recipe_error_blocks = False
        self._recipe_word = 0  # the last value of holding 4 seen: a new nonzero value is a request
        self.recipe_requests = 0
        self._plc_beat = 0
        self._plc_beat_at = time.monotonic()
        self._beat = 0
        self.heartbeat_state = "off" if config.heartbeat_timeout_s == 0 else "waiting"

    # ------------------------------------------------------------------ lifecycle (any thread)
    def start(self, timeout: float = 10.0) -> None:
        """Bind and serve in a thread of its own; raises DefectsamError when the port cannot be used."""
        self._thread = threading.Thread(target=self._run, name="plc-modbus", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise DefectsamError(f"plc: the Modbus server on {self.config.host}:{self.config.port} did not start")
        if self._start_error is not None:
            raise DefectsamError(f"plc.host/plc.port {self.config.host}:{self.config.port}: cannot listen: "
                                 f"{self._start_error}")
        log.info("plc: Modbus TCP on %s:%d, unit id %d, %s (register map: docs/plc.md)", self.config.host,
                 self.port, self.config.unit_id, _clients(self.config))
        if not self.config.allowlist and not is_loopback(self.config.host):
            log.warning("plc: Modbus TCP on %s accepts any client (plc.allow_any_client): anyone who reaches the "
                        "port can trigger, switch vision offline and ack results", self.config.host)

    def stop(self) -> None:
        loop, event = self._loop, self._stop_event
        if loop is not None and event is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(event.set)
        if self._thread is not None:
            self._thread.join(10.0)

    def offer(self, record: InspectionRecord) -> None:
        """The pipeline subscriber: enqueue and wake the writer; never blocks."""
        try:
            self._intake.put_nowait(record)
        except queue.Full:
            self.intake_dropped += 1
            return
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # loop closed while stopping
                loop.call_soon_threadsafe(wake.set)

    def on_load_event(self, event: LoadEvent) -> None:
        """The reloader's listener (any thread): recipe busy, echo and error code follow in the loop."""
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # loop closed while stopping
                loop.call_soon_threadsafe(self._apply_load_event, event)

    def call(self, fn: Callable[[], object], timeout: float = 5.0) -> object:
        """Run ``fn`` in the server's loop and return its result (tests, the benchmark)."""
        assert self._loop is not None
        async def wrapped() -> object:
            return fn()
        return asyncio.run_coroutine_threadsafe(wrapped(), self._loop).result(timeout)

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            if not self._started.is_set():
                self._start_error = exc
                self._started.set()
            else:
                log.exception("plc: the Modbus server stopped")

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._stop_event = asyncio.Event()
        try:
            server, self.port = await serve(self.store, self.config.host, self.config.port, self.config.allowlist,
                                            max_connections=self.config.max_connections,
                                            idle_timeout=self.config.idle_timeout_s)
        except OSError as exc:
            self._start_error = exc
            self._started.set()
            return
        self._server = server
        self._stats = server.stats
        if self.config.push.enabled:
            self._push = Pusher(self.config.push, self.config.word_order)
        self._tick()
        self._started.set()
        tasks = [asyncio.create_task(self._writer(), name="plc-writer"),
                 asyncio.create_task(self._ticker(), name="plc-ticker")]
        await self._stop_event.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._push is not None:
            await self._push.close()
        await stop(server)

    async def _writer(self) -> None:
        """The one writer: takes results from the intake and applies each in one synchronous step."""
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while True:
                try:
                    record = self._intake.get_nowait()
                except queue.Empty:
                    break
                self._take(record)

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            self._tick()

    # ------------------------------------------------------------------ handshake (loop thread only)
    def _take(self, record: InspectionRecord) -> None:
        if self._pending_trigger is not None and record.trigger_id == self._pending_trigger:
            self._pending_trigger = None
            self._status &= ~STAT["busy"]
        buffering = bool(self._control & CTRL["buffer_enable"])
        if buffering and (self._status & STAT["results_valid"] or self._buffer):
            if len(self._buffer) >= self.config.buffer_depth:
                self.buffer_overruns += 1
                self._status |= STAT["buffer_overrun"]
                self._publish_status()
                return
            self._buffer.append(record)
            self._publish_status()
            return
        self._apply(record)

    def _apply(self, record: InspectionRecord | None, *, part_id: int | None = None) -> None:
        """Write one result: every field first, then the status word (toggle, results valid) last."""
        block = encode_result(record, part_id=part_id, top_n=self.config.top_n, grid=self.config.mask_grid,
                              word_order=self.config.word_order)
        inputs = self.store.inputs
        inputs[RESULT_BASE:INPUT_WORDS] = block
        self._status ^= STAT["inspection_completed"]
        self._status |= STAT["results_valid"]
        self._publish_status()
        self.results_written += 1
        if record is not None and record.times.captured:
            now = time.monotonic()
            self.latencies.append(now - record.times.captured)
            if record.times.post_done:
                self.publish_latencies.append(now - record.times.post_done)
        self._offer_push()

    def _release_buffer(self) -> None:
        if self._buffer and not self._status & STAT["results_valid"] and not self._control & CTRL["results_ack"]:
            self._apply(self._buffer.popleft())

    def _error_code(self) -> int:
        return self._fault or self._latched or self._recipe_error

    def _ready(self) -> bool:
        c, s = self._control, self._status
        full = bool(c & CTRL["buffer_enable"]) and len(self._buffer) >= self.config.buffer_depth
        blocking = self._fault or self._latched or (self._recipe_error if self._recipe_error_blocks else 0)
        return (bool(c & CTRL["trigger_enable"]) and not c & CTRL["set_offline"] and bool(s & STAT["camera_ok"])
                and bool(s & STAT["engine_loaded"]) and not blocking and not s & STAT["busy"]
                and not s & STAT["recipe_busy"]
                and not full and self._trigger is not None)

    def _publish_status(self) -> None:
        s = self._status
        s = (s | STAT["online"]) if not self._control & CTRL["set_offline"] else (s & ~STAT["online"])
        s = (s | STAT["error"]) if self._error_code() else (s & ~STAT["error"])
        self._status = s
        s = (s | STAT["trigger_ready"]) if self._ready() else (s & ~STAT["trigger_ready"])
        self._status = s
        inputs = self.store.inputs
        put(inputs, BY_NAME["error_code"], self._error_code())
        put(inputs, BY_NAME["results_buffered"], len(self._buffer))
        put(inputs, BY_NAME["status"], s)  # last

    def _on_write(self, address: int, count: int) -> None:
        """A PLC wrote the control block (in the loop, inside the request): run the handshake."""
        holding = self.store.holding
        beat = get(holding, BY_NAME["plc_heartbeat"])
        if beat != self._plc_beat:
            self._plc_beat = beat
            self._plc_beat_at = time.monotonic()
        recipe = get(holding, BY_NAME["command"])
        if recipe != self._recipe_word:
            self._recipe_word = recipe
            if recipe:
                self._request_recipe(recipe)
        old, new = self._control, get(holding, BY_NAME["control"])
        self._control = new
        rose, fell = new & ~old, old & ~new
        if rose & CTRL["clear_error"]:
            self._latched = 0
            self._recipe_error = 0
            self._status &= ~(STAT["missed_trigger"] | STAT["buffer_overrun"])
            timeout = self.config.heartbeat_timeout_s
            if self._fault == ERROR_HEARTBEAT and time.monotonic() - self._plc_beat_at <= timeout:
                self._fault = 0
            if self.heartbeat_state == "timeout" and not self._fault:
                self.heartbeat_state = "ok"
        if rose & CTRL["results_ack"]:
            self._status &= ~STAT["results_valid"]
        if fell & CTRL["trigger"]:
            self._status &= ~STAT["trigger_ack"]
        if fell & CTRL["buffer_enable"]:
            while self._buffer:
                self._apply(self._buffer.popleft())
        if rose & CTRL["trigger"]:
            self._publish_status()  # trigger ready as of now
            if self._status & STAT["trigger_ready"]:
                self._take_trigger()
            else:
                self.triggers_missed += 1
                self._status |= STAT["missed_trigger"]
        self._release_buffer()
        self._publish_status()

    def _request_recipe(self, number: int) -> None:
        """A new recipe word: recipe busy now, then the reloader's events (_apply_load_event)."""
        self.recipe_requests += 1
        self._status |= STAT["recipe_busy"]
        self._recipe_error, self._recipe_error_blocks = 0, True
        if self._select_recipe is None:
            self._status &= ~STAT["recipe_busy"]
            self._recipe_error = ERROR_RECIPE_UNKNOWN
            log.warning("plc: recipe %d requested, but this daemon has no recipes (recipes, engine.bundle_store)",
                        number)
            return
        try:
            self._select_recipe(number, "modbus")
        except Exception:  # select returns at once; an error here is a bug, answered as a failed load
            log.exception("plc: recipe %d could not be requested", number)
            self._status &= ~STAT["recipe_busy"]
            self._recipe_error = ERROR_RECIPE_FAILED

    def _apply_load_event(self, event: LoadEvent) -> None:
        """(loop) A load started, finished or failed: recipe busy, echo (input 4) and error code, one step."""
        recipe = event.target.recipe
        if event.phase == "loading":
            if recipe:
                self._status |= STAT["recipe_busy"]
        elif event.phase == "active":
            self._status &= ~STAT["recipe_busy"]
            self._recipe_error = 0
            put(self.store.inputs, BY_NAME["command_echo"], recipe)
        elif event.kind != "superseded":
            self._status &= ~STAT["recipe_busy"]
            self._recipe_error = ERROR_RECIPE_UNKNOWN if event.kind == "unknown" else ERROR_RECIPE_FAILED
            self._recipe_error_blocks = bool(recipe)
        self._publish_status()

    def _take_trigger(self) -> None:
        part = get(self.store.holding, BY_NAME["part_id"], word_order=self.config.word_order)
        assert self._trigger is not None
        self._status |= STAT["trigger_ack"] | STAT["busy"]
        self._status &= ~STAT["missed_trigger"]
        self.triggers_taken += 1
        try:
            ticket = self._trigger(str(part) if part else None)
        except Exception as exc:  # the pipeline cannot take it: answer at once, fail safe
            log.warning("plc: trigger refused: %s; answering NO_FRAME", exc)
            self._latched = self._latched or ERROR_TRIGGER
            self._status &= ~STAT["busy"]
            self.fail_safe_writes += 1
            self._apply(None, part_id=part)
            return
        self._pending_trigger = int(getattr(ticket, "trigger_id", 0)) or None

    def _tick(self) -> None:
        now = time.monotonic()
        beats = int(now / VISION_BEAT_S)
        if beats != self._beat:
            self._beat = beats
            inputs = self.store.inputs
            put(inputs, BY_NAME["vision_heartbeat"], (get(inputs, BY_NAME["vision_heartbeat"]) + 1) & 0xFFFF)
        health = self._health()
        s = self._status
        s = (s | STAT["camera_ok"]) if health.camera_ok else (s & ~STAT["camera_ok"])
        s = (s | STAT["engine_loaded"]) if health.engine_loaded else (s & ~STAT["engine_loaded"])
        self._status = s
        timeout = self.config.heartbeat_timeout_s
        if timeout > 0 and now - self._plc_beat_at > timeout:
            if self.heartbeat_state != "timeout":
                log.warning("plc: PLC heartbeat (holding 1) unchanged for %.1f s: fail safe", timeout)
            self.heartbeat_state = "timeout"
            self._latched = ERROR_HEARTBEAT
        elif timeout > 0 and self.heartbeat_state == "waiting" and self._plc_beat:
            self.heartbeat_state = "ok"
        fault = ERROR_CAMERA if not health.camera_ok else ERROR_ENGINE if not health.engine_loaded else 0
        if self._latched == ERROR_HEARTBEAT and not fault:
            fault = ERROR_HEARTBEAT
        if fault and not self._fault:
            self._fail_safe(fault)
        self._fault = fault
        self._publish_status()

    def _fail_safe(self, code: int) -> None:
        """A fault began: the result block says NO_FRAME (a waiting trigger is answered with it)."""
        self.fail_safe_writes += 1
        waiting = self._pending_trigger is not None
        self._pending_trigger = None
        self._status &= ~STAT["busy"]
        part = get(self.store.holding, BY_NAME["part_id"], word_order=self.config.word_order)
        block = encode_result(None, part_id=part if waiting else 0, word_order=self.config.word_order)
        self.store.inputs[RESULT_BASE:INPUT_WORDS] = block
        if waiting:
            self._status ^= STAT["inspection_completed"]
            self._status |= STAT["results_valid"]
        else:
            self._status &= ~STAT["results_valid"]
        self._fault = code
        self._publish_status()
        self._offer_push()  # a PLC that only receives pushes must see the NO_FRAME and the error too

    def _offer_push(self) -> None:
        if self._push is not None:
            self._push.offer(list(self.store.inputs))

    # ------------------------------------------------------------------ stats (any thread)
    def stats(self) -> PlcSnapshot:
        server = self._stats
        lat = self.latencies.recent()
        return PlcSnapshot.model_validate({
            "enabled": True,
            "listen": f"{self.config.host}:{self.port}",
            "unit_id": self.config.unit_id,
            "connections": server.connections if server else 0,
            "connections_total": server.connections_total if server else 0,
            "connections_rejected": server.rejected if server else 0,
            "connections_closed": dict(server.closed) if server else {},
            "requests": {str(k): v for k, v in sorted(server.requests.items())} if server else {},
            "exceptions": {str(k): v for k, v in sorted(server.exceptions.items())} if server else {},
            "heartbeat": self.heartbeat_state,
            "error_code": self._error_code(),
            "results_written": self.results_written,
            "intake_dropped": self.intake_dropped,
            "buffered": len(self._buffer),
            "buffer_overruns": self.buffer_overruns,
            "triggers_taken": self.triggers_taken,
            "triggers_missed": self.triggers_missed,
            "fail_safe_writes": self.fail_safe_writes,
            "push_errors": self._push.errors if self._push is not None else 0,
            "capture_to_register_p50_ms": quantile_ms(lat, 0.5),
            "capture_to_register_p99_ms": quantile_ms(lat, 0.99),
        })


def _clients(config: PlcSection) -> str:
    """Who may connect, for the start-up line."""
    if config.allowlist:
        return "clients " + ", ".join(config.allowlist)
    if is_loopback(config.host):
        return "local clients only (a PLC on the network needs plc.host and plc.allowlist: docs/plc.md)"
    return "any client"

