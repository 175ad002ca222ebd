"""The daemon: one ``Daemon`` owns the camera worker, the engine and pipeline, the record store, the
live view, the metrics registry and the HTTP server, and starts and stops them in order.

Start: store (open, sweep, retention; a store that cannot be used stops start-up) -> camera ->
live view -> HTTP server (the port is bound here: a taken port stops start-up) -> engine, loaded
in the background (a TensorRT build can take minutes) -> pipeline. While the backend builds its
engine the daemon is up and not ready, saying "engine building" in /readyz, /api/status, /metrics
and the systemd STATUS (and extending systemd's start timeout). An engine that fails to load leaves
the daemon up and not ready, with the reason in /readyz, /api/status and the live page.

Stop (SIGTERM, SIGINT): STOPPING=1 -> the pipeline stops taking frames and finishes the ones
inside -> the store writes everything queued -> camera -> live view -> HTTP server.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import uvicorn

from engines.backends import BackendConfig, StateCallback, open_engine
from engines.bundle import DEFAULT_BUNDLE_DIR, Bundle, load_bundle
from engines.engine import Engine, running_precision
from engines.errors import DefectsamError
from engines.inspector import Inspector
from service.api import VERSION, create_fastapi_app
from service.api.limits import KEEP_ALIVE_S, ConnectionGuard, fit_open_files, guarded_protocol
from service.api.overlays import OverlayRenderer
from service.capture import CameraState, CameraWorker, create_worker
from service.config.models import DaemonConfig
from service.live.view import EventHub, LiveView
from service.metrics import (
    BundleSnapshot,
    CameraSnapshot,
    EngineSnapshot,
    LiveSnapshot,
    OpcuaSnapshot,
    PlcSnapshot,
    StatsSnapshot,
    StoreSnapshot,
    create_registry,
)
from service.mqtt.payloads import bundle_digest, state_payload
from service.mqtt.publisher import MqttPublisher
from service.mqtt.stats import MqttSnapshot
from service.opcua import create_service as create_opcua_service
from service.opcua.station import LineState, Station, plc_command_writer, plc_words
from service.ops import SystemdNotifier, Watchdog
from service.pipeline.counters import PipelineCounters
from service.pipeline.record import InspectionRecord
from service.pipeline.runner import Pipeline, PipelineError, TriggerTicket
from service.plc.service import Health, PlcService
from service.recipes import RecipeBook
from service.reload import LoadTarget, LoadTicket, Reloader
from service.store import RecordStore, StoreError, disabled_stats

if TYPE_CHECKING:
    from service.opcua.service import OpcuaService

log = logging.getLogger(__name__)

# While an engine builds, systemd's start timeout is extended by this much (EXTEND_TIMEOUT_USEC) at
# each build step: a first TensorRT build on a Jetson Orin Nano takes minutes, a normal start seconds.
ENGINE_BUILD_BUDGET_S = 30 * 60


class EngineOpener(Protocol):
    """How the daemon opens its engine: engines.backends.open_engine (tests may wrap it)."""

    def __call__(self, bundle: Bundle, config: BackendConfig, *, on_state: StateCallback | None = None) -> Engine:
        ...


class Daemon:
    """Implements service.api.context.DaemonContext for the HTTP API."""

    def __init__(self, config: DaemonConfig, *, camera: CameraWorker | None = None,
                 notifier: SystemdNotifier | None = None, engine_opener: EngineOpener | None = None) -> None:
        self.config = config
        self.camera = camera if camera is not None else create_worker(config.camera)
        self.store: RecordStore | None = RecordStore(config.store) if config.store.enabled else None
        self.live = LiveView(config.live, raw_frame=self._raw_frame, idle_reason=lambda: "; ".join(self.not_ready()))
        self.events = EventHub(config.pipeline.subscriber_queue)
        self.overlays = OverlayRenderer()
        self.counters = PipelineCounters(config.pipeline.mode)
        self.registry = create_registry(self.snapshot)
        self.notifier = notifier if notifier is not None else SystemdNotifier()
        self.pipeline: Pipeline | None = None
        self._engine: Engine | None = None
        self._open_engine: EngineOpener = engine_opener if engine_opener is not None else open_engine
        self._engine_state = "loading"  # -> building (a plan compiles) -> ready | failed
        self._build_started: float | None = None
        self._engine_error: str | None = None
        self._started_at = time.monotonic()
        self._stop_requested = threading.Event()
        self._stopped = False
        self._server: uvicorn.Server | None = None
        self._server_thread: threading.Thread | None = None
        self._loader: threading.Thread | None = None
        self._watchdog = Watchdog(self.notifier, self.healthy)
        self.port: int | None = None
        # hot swap and recipes (issue 17): service/reload.py, service/recipes.py
        self.reloader = Reloader(config.engine, self._open_engine, pipeline=lambda: self.pipeline,
                                 latest_frame=self._warmup_frame, on_swap=self._swapped)
        self.recipes = RecipeBook(config.recipes, self.reloader)
        self.plc = PlcService(config.plc, trigger=self.trigger, health=self._plc_health,
                              select_recipe=self.recipes.select) if config.plc.enabled else None
        if self.plc is not None:
            self.reloader.subscribe("plc", self.plc.on_load_event)
        self.mqtt = self._mqtt_publisher() if config.mqtt.enabled else None
        self.opcua = self._create_opcua() if config.opcua.enabled else None
        self.app = create_fastapi_app(self)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start everything; raises DefectsamError (one line) when the store or the port cannot be used."""
        if self.store is not None:
            try:
                self.store.open()
            except StoreError as exc:
                raise DefectsamError(str(exc)) from None
            self.store.start()
        self.camera.start()
        self.live.start()
        self._start_server()
        if self.plc is not None:
            self.plc.start()
        if self.mqtt is not None:
            self.mqtt.start()
        if self.opcua is not None:
            self.opcua.start()
        self._loader = threading.Thread(target=self._load_engine, name="engine-loader", daemon=True)
        self._loader.start()
        self._watchdog.start()

    def _start_server(self) -> None:
        api = self.config.api
        family = socket.AF_INET6 if ":" in api.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((api.host, api.port))
        except OSError as exc:
            sock.close()
            raise DefectsamError(
                f"api.host/api.port {api.host}:{api.port}: cannot listen: {exc.strerror or exc}"
            ) from None
        sock.listen(128)
        sock.set_inheritable(True)
        self.port = sock.getsockname()[1]
        # No limit_concurrency: it counted idle connections too (256 idle sockets had every request
        # answered 503). service/api/limits.py bounds connections and requests in flight instead.
        guard = ConnectionGuard(fit_open_files(api.max_connections), api.read_timeout_s)
        server_config = uvicorn.Config(
            self.app, http=guarded_protocol(guard), log_config=None, access_log=api.access_log, lifespan="off",
            timeout_graceful_shutdown=3, timeout_keep_alive=KEEP_ALIVE_S, server_header=False,
        )
        self._server = uvicorn.Server(server_config)
        self._server_thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                               name="http", daemon=True)
        self._server_thread.start()
        deadline = time.monotonic() + 15.0
        while not self._server.started:
            if not self._server_thread.is_alive() or time.monotonic() > deadline:
                raise DefectsamError(f"the HTTP server on {api.host}:{self.port} did not start")
            time.sleep(0.02)
        host = "127.0.0.1" if api.host in ("0.0.0.0", "::") else api.host
        log.info("API and live page on http://%s:%d/ (docs at /docs, metrics at /metrics)", host, self.port)

    def _load_engine(self) -> None:
        engine_config = self.config.engine
        path = engine_config.bundle or DEFAULT_BUNDLE_DIR
        try:
            path = self.reloader.startup_path() or path
            bundle = load_bundle(path)
            log.info("engine: loading bundle %s (%s) on %s", bundle.manifest.name, path, engine_config.backend.type)
            engine = self._open_engine(bundle, engine_config.backend, on_state=self._on_engine_state)
            manifest = bundle.manifest
            inspector = Inspector(engine, engine_config.inspection, engine_config.postprocess)
            pipeline = Pipeline(inspector, self.camera.slot, self.config.pipeline, self.counters,
                                request_frame=self.camera.trigger,
                                next_id=self.store.ids if self.store is not None else None)
        except Exception as exc:
            self._engine_error = str(exc) if isinstance(exc, DefectsamError) else f"{type(exc).__name__}: {exc}"
            self._engine_state = "failed"
            log.error("engine: failed to load: %s (the daemon stays up, not ready)", self._engine_error)
            self.notifier.notify("READY=1", f"STATUS=not ready: engine failed to load: {self._engine_error}"[:400])
            return
        if manifest.provenance.weights == "untrained":
            log.warning("engine: bundle %r carries untrained stand-in weights; its defects are meaningless",
                        manifest.name)
        if bundle.manifest_check == "edited":
            log.warning("engine: bundle %r: %s/manifest.json was edited since it was written (its content no longer "
                        "matches manifest_sha256): thresholds or specs may not be what calibration and export wrote "
                        "(defectsam bundle inspect; defectsam bundle seal accepts it)", manifest.name, bundle.path)
        if self.store is not None:
            pipeline.subscribe("store", self.store.offer)
        pipeline.subscribe("live", self.live.offer)
        pipeline.subscribe("events", self.events.offer)
        if self.plc is not None:
            pipeline.subscribe("plc", self.plc.offer)
        if self.mqtt is not None:
            pipeline.subscribe("mqtt", self.mqtt.offer)
        if self.opcua is not None:
            pipeline.subscribe("opcua", self.opcua.offer)
        if self._stop_requested.is_set():
            engine.close()
            return
        self._engine = engine
        self.pipeline = pipeline
        pipeline.start()
        self.reloader.started(bundle)
        self._engine_state = "ready"
        log.info("engine: ready (%s, %s, %s, window %d px, at most %d windows)", manifest.name, engine.backend_name,
                 "find + segment" if manifest.find is not None else "segment only (tiles)", inspector.window,
                 inspector.max_windows)
        self.notifier.notify("READY=1", f"STATUS=inspecting ({self.config.pipeline.mode}) with {manifest.name}")

    def _on_engine_state(self, state: str) -> None:
        """The backend's state callback (engine-loader thread): a build shows in /readyz and in systemd."""
        if state != "building" or self._engine_state not in ("loading", "building"):
            return
        if self._build_started is None:
            self._build_started = time.monotonic()
            log.warning("engine: building the %s engine for this device; minutes on a Jetson, cached for the next "
                        "starts (build it before the line starts with 'defectsam engine build')",
                        self.config.engine.backend.type)
        self._engine_state = "building"
        self.notifier.notify(f"STATUS=building the {self.config.engine.backend.type} engine (minutes on a first start)",
                             f"EXTEND_TIMEOUT_USEC={ENGINE_BUILD_BUDGET_S * 1_000_000}")

    def wait_engine(self, timeout: float) -> str:
        """Wait until the engine is loaded or failed; returns the state (tests, the serve command)."""
        if self._loader is not None:
            self._loader.join(timeout)
        return self._engine_state

    def request_stop(self, why: str = "") -> None:
        if not self._stop_requested.is_set():
            log.info("stopping%s", f" ({why})" if why else "")
        self._stop_requested.set()

    def run_until_stopped(self) -> None:
        self._stop_requested.wait()
        self.stop()

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._stop_requested.set()
        self.notifier.notify("STOPPING=1")
        self._watchdog.stop()
        if self._server is not None:
            self._server.should_exit = True
        if self._loader is not None:
            self._loader.join(30.0)
        self.reloader.stop()
        if self.pipeline is not None:
            self.pipeline.stop()
        if self.plc is not None:
            self.plc.stop()
        if self.mqtt is not None:
            self.mqtt.stop()
        if self.opcua is not None:
            self.opcua.stop()
        if self.store is not None:
            self.store.stop()
        self.camera.stop()
        self.live.stop()
        if self._server_thread is not None:
            self._server_thread.join(10.0)
        self.overlays.close()
        if self._engine is not None:
            self._engine.close()
        self.notifier.close()
        published = self.counters.snapshot().verdicts
        store = self.store.stats() if self.store is not None else None
        log.info("stopped after %d result(s); store: %s", sum(published.values()),
                 f"{store.written} written, {sum(store.dropped.values())} dropped" if store else "disabled",
                 extra={"event": "stopped", "results": sum(published.values()), "verdicts": json.dumps(published),
                        "store_written": store.written if store else 0,
                        "store_dropped": sum(store.dropped.values()) if store else 0})

    # ------------------------------------------------------------------ state
    def healthy(self) -> bool:
        """For the systemd watchdog: the pipeline's stage threads are alive and looping (if it runs)."""
        server_ok = self._server_thread is not None and self._server_thread.is_alive()
        return server_ok and (self.pipeline is None or self.pipeline.healthy())

    def not_ready(self) -> list[str]:
        reasons = []
        stats = self.camera.stats()
        if stats.state is not CameraState.CONNECTED:
            detail = f" ({stats.last_error})" if stats.last_error else ""
            reasons.append(f"camera {stats.state.value}{detail}")
        if self._engine_state == "loading":
            reasons.append("engine loading")
        elif self._engine_state == "building":
            since = time.monotonic() - (self._build_started or time.monotonic())
            kind = self.config.engine.backend.type
            reasons.append(f"engine building (a {kind} engine for this device, {since:.0f} s so far; "
                           f"a first build takes minutes, later starts load it from the cache)")
        elif self._engine_state == "failed":
            reasons.append(f"engine failed to load: {self._engine_error}")
        if self.pipeline is not None and self.pipeline.frame_problem:
            reasons.append(f"frames cannot be inspected: {self.pipeline.frame_problem}")
        if self._stop_requested.is_set():
            reasons.append("stopping")
        return reasons

    def latest(self) -> InspectionRecord | None:
        return self.pipeline.latest if self.pipeline is not None else None

    def last_ng(self) -> InspectionRecord | None:
        return self.pipeline.last_ng if self.pipeline is not None else None

    def trigger(self, part_id: str | None) -> TriggerTicket:
        if self.pipeline is None:
            raise PipelineError(f"the engine is {self._engine_state}")
        return self.pipeline.trigger(part_id)

    # ------------------------------------------------------------------ hot swap (issue 17)
    def activate_bundle(self, ref: str) -> LoadTicket:
        """Load an installed bundle (name or hash in engine.bundle_store), check it, swap it in and point the
        store's 'active' at it. Raises service.reload.LoadBusyError while another load runs."""
        return self.reloader.request(LoadTarget(bundle=ref, source="api", set_pointer=True), queue=False)

    def _swapped(self, engine: Engine) -> None:
        self._engine = engine

    def _warmup_frame(self) -> np.ndarray | None:
        """A real frame to check a new engine on: the camera's newest (a triggered camera is asked for one)."""
        frame = self.camera.slot.peek()
        if frame is None:
            frame = self.camera.next_frame(2.0)
        return None if frame is None else frame.image

    def bundle_snapshot(self) -> BundleSnapshot:
        r = self.reloader
        active, loading, last = r.active, r.loading, r.last
        return BundleSnapshot(
            store=str(r.store.root) if r.store is not None else None,
            name=active.name if active else None, hash=active.digest if active else None,
            directory=active.directory if active else None, recipe=active.recipe if active else 0,
            since=active.since if active else None,
            loading=loading.bundle if loading else None, loading_recipe=loading.recipe if loading else 0,
            last_result=None if last is None else "ok" if last.phase == "active" else
            "superseded" if last.kind == "superseded" else "failed",
            last_bundle=last.target.bundle if last else None, last_source=last.target.source if last else None,
            last_reason=last.reason if last else None,
            last_seconds=round(last.seconds, 4) if last and last.seconds is not None else None,
            last_at=r.last_at, reloads=dict(r.results),
        )

    def _plc_health(self) -> Health:
        return Health(camera_ok=self.camera.stats().state is CameraState.CONNECTED,
                      engine_loaded=self._engine_state == "ready" and not self._stop_requested.is_set())

    # ------------------------------------------------------------------ OPC UA (service/opcua)
    def _create_opcua(self) -> OpcuaService:
        def line_state() -> LineState:
            engine = self._engine
            health = self._plc_health()
            echo, error = plc_words(self.plc) if self.plc is not None else (None, None)
            return LineState(camera_ok=health.camera_ok, engine_loaded=health.engine_loaded,
                             not_ready=tuple(self.not_ready()),
                             bundle=engine.bundle.manifest.name if engine is not None else "",
                             command_echo=echo, error_code=error)

        station = Station(mode=self.config.pipeline.mode, trigger_timeout_s=self.config.pipeline.trigger_timeout_s,
                          trigger=self.trigger, state=line_state,
                          write_command=plc_command_writer(self.plc) if self.plc is not None else None)
        return create_opcua_service(self.config.opcua, station)

    def _raw_frame(self) -> np.ndarray | None:
        frame = self.camera.slot.peek()
        return None if frame is None else frame.image

    def snapshot(self) -> StatsSnapshot:
        cam = self.camera.stats()
        now = time.monotonic()
        engine = self._engine
        manifest = engine.bundle.manifest if engine is not None else None
        store = self.store.stats() if self.store is not None else disabled_stats(self.config.store)
        reasons = self.not_ready()
        return StatsSnapshot(
            version=VERSION,
            uptime_s=round(now - self._started_at, 3),
            ready=not reasons,
            not_ready=reasons,
            camera=CameraSnapshot(
                name=cam.name, type=cam.type, state=cam.state.value, source=cam.source,
                frames_captured=cam.frames_captured, frames_dropped=cam.frames_dropped, reconnects=cam.reconnects,
                disconnects=cam.disconnects, fps=round(cam.fps, 3), last_error=cam.last_error,
                last_frame_age_s=None if cam.last_frame_at is None else round(now - cam.last_frame_at, 3),
            ),
            engine=EngineSnapshot(
                state=self._engine_state, error=self._engine_error,
                bundle=manifest.name if manifest else None,
                bundle_path=str(engine.bundle.path) if engine is not None else None,
                arch=manifest.segment.arch if manifest else None,
                precision=running_precision(engine) if engine is not None else None,
                backend=engine.backend_name if engine is not None else None,
                weights=manifest.provenance.weights if manifest else None,
                input=_input_text(manifest, self.pipeline.inspector if self.pipeline is not None else None)
                if manifest else None,
                classes=list(manifest.classes) if manifest else [],
            ),
            pipeline=self.counters.snapshot(),
            store=StoreSnapshot(**vars(store)),
            live=LiveSnapshot(viewers=self.live.viewers, frames_encoded=self.live.encoded,
                              frames_dropped=self.live.skipped, event_clients=self.events.clients,
                              events_dropped=self.events.dropped),
            overlay=self.overlays.stats(),
            plc=self.plc.stats() if self.plc is not None else PlcSnapshot(),
            mqtt=self.mqtt.stats() if self.mqtt is not None else MqttSnapshot(),
            opcua=self.opcua.snapshot() if self.opcua is not None else OpcuaSnapshot(),
            bundle=self.bundle_snapshot(),
        )

    # ------------------------------------------------------------------ MQTT (service/mqtt)
    def _mqtt_publisher(self) -> MqttPublisher:
        """The MQTT publisher; DefectsamError (one line) when paho-mqtt is missing or the TLS files are unusable."""
        digest: list[Any] = [None, None]  # [bundle, its digest]: computed once per loaded bundle

        def state() -> dict[str, Any]:
            engine = self._engine
            if engine is not None and digest[0] is not engine.bundle:
                digest[:] = [engine.bundle, bundle_digest(engine.bundle)]
            return state_payload(self.snapshot(), digest[1] if engine is not None else None, publisher.station,
                                 self.config.mqtt.line)

        publisher = MqttPublisher(self.config.mqtt, state=state)
        return publisher


def describe_url(daemon: Daemon) -> str:
    host = daemon.config.api.host
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{host}:{daemon.port}/"


def run(config: DaemonConfig, **kwargs: Any) -> int:
    """Run the daemon in the foreground until SIGTERM/SIGINT; returns the exit status."""
    from service.ops import install_signal_handlers, root_warning, tune_allocator

    if (warning := root_warning()) is not None:
        log.warning("%s", warning)
    if not tune_allocator():
        log.info("allocator left as it is (not glibc)")
    daemon = Daemon(config, **kwargs)
    install_signal_handlers(daemon.request_stop)
    try:
        daemon.start()
    except BaseException:
        with contextlib.suppress(Exception):
            daemon.stop()
        raise
    print(f"defectsam: serving the live page at {describe_url(daemon)} (API docs at /docs); Ctrl-C stops",
          flush=True)
    daemon.run_until_stopped()
    return 0


def _input_text(manifest: Any, inspector: Inspector | None) -> str:
    """'find 1/4, windows 128 px', 'tiles 128 px' or 'whole frame' (mode whole: each frame one window, whatever
    the window side): how the engine sees a frame (EngineSnapshot.input)."""
    if inspector is not None and inspector.config.mode == "whole":
        return "whole frame"
    window = inspector.window if inspector is not None else manifest.segment.window
    if manifest.find is not None and (inspector is None or inspector.config.mode in ("auto", "windows")):
        return f"find 1/{manifest.find.reduction}, windows {window} px"
    return f"tiles {window} px"
