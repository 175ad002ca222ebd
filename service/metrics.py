"""One stats snapshot, two views: the JSON of ``/api/status`` and the Prometheus text of ``/metrics``.

``PipelineCounters`` (service/pipeline/counters.py) accumulates what the pipeline publishes (verdicts,
defects per class, per-stage latency histograms, frame rate). ``StatsSnapshot`` is the whole daemon at one instant
(camera, engine, pipeline, store, live view), built by the daemon. ``SnapshotCollector`` renders a
snapshot as Prometheus metric families on every scrape, in a ``CollectorRegistry`` of its own: no
global registry, no second set of counters that could disagree with the JSON.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict, Field

from service.mqtt.stats import MqttSnapshot, mqtt_metrics
from service.pipeline.counters import PipelineStats

NAMESPACE = "defectsam"
CAMERA_STATES = ("starting", "connected", "reconnecting", "stopped")
ENGINE_STATES = ("loading", "building", "ready", "failed")
PIPELINE_MODES = ("free_run", "triggered")


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True)


class CameraSnapshot(_Model):
    name: str
    type: str
    state: str
    source: str
    frames_captured: int
    frames_dropped: int = Field(description="captured but replaced before the pipeline took them")
    reconnects: int
    disconnects: int
    fps: float
    last_error: str | None
    last_frame_age_s: float | None


class EngineSnapshot(_Model):
    state: str = Field(description="loading, building (a TensorRT plan compiles: minutes), ready or failed")
    error: str | None = Field(description="why the engine failed to load")
    bundle: str | None
    bundle_path: str | None
    arch: str | None
    precision: str | None
    backend: str | None
    weights: str | None = Field(description="trained or untrained (the embedded stand-in)")
    input: str | None = Field(
        description="how the engine sees a frame: the find pass's reduction and the 1:1 window side, e.g. "
        "'find 1/4, windows 128 px' (or 'tiles 128 px' without a find pass)"
    )
    classes: list[str]


class StoreSnapshot(_Model):
    enabled: bool
    path: str
    records: int
    bytes: int
    written: int
    dropped: dict[str, int]
    deleted: dict[str, int]
    queue_depth: int
    queue_size: int
    last_error: str | None


class LiveSnapshot(_Model):
    viewers: int = Field(description="MJPEG clients connected now")
    frames_encoded: int = Field(description="live-view JPEGs encoded since start (only while watched)")
    frames_dropped: int = Field(description="results the live view skipped (frame-rate cap or busy)")
    event_clients: int = Field(description="/api/events clients connected now")
    events_dropped: int = Field(description="events a slow client missed")


class OverlaySnapshot(_Model):
    """The overlay endpoint (service/api/overlays.py): renders, its cache, requests refused."""

    renders: int = Field(default=0, description="overlays drawn since start")
    render_errors: int = Field(default=0, description="overlay renders that raised")
    cache_hits: int = Field(default=0, description="overlay requests answered from the cache")
    refused: int = Field(default=0, description="overlay requests answered 503 (no render slot within the wait)")
    rendering: int = Field(default=0, description="overlays being drawn now")
    waiting: int = Field(default=0, description="overlay requests waiting for a render now")
    cache_entries: int = Field(default=0, description="rendered overlays in the cache")
    cache_bytes: int = Field(default=0, description="bytes of rendered overlays in the cache")
    cache_budget_bytes: int = Field(default=0, description="the cache's byte budget")


class PlcSnapshot(_Model):
    """The Modbus TCP interface (docs/plc.md); all zero when plc.enabled is false."""

    enabled: bool = False
    listen: str | None = None
    unit_id: int | None = None
    connections: int = Field(default=0, description="Modbus clients connected now")
    connections_total: int = Field(default=0, description="Modbus connections accepted since start")
    connections_rejected: int = Field(default=0, description="connections refused by plc.allowlist")
    connections_closed: dict[str, int] = Field(
        default_factory=dict,
        description="connections the server ended, by reason: limit (plc.max_connections reached), idle "
                    "(plc.idle_timeout_s), unread (answers left unread), framing (not Modbus TCP)",
    )
    requests: dict[str, int] = Field(default_factory=dict, description="requests per Modbus function code")
    exceptions: dict[str, int] = Field(default_factory=dict, description="exception responses per exception code")
    heartbeat: str = Field(default="off", description="PLC heartbeat: off, waiting, ok or timeout")
    error_code: int = Field(default=0, description="the error code register (0: none)")
    results_written: int = Field(default=0, description="results written to the register map")
    intake_dropped: int = Field(default=0, description="results dropped before the register writer (queue full)")
    buffered: int = Field(default=0, description="results waiting for the PLC's ack (buffer enable)")
    buffer_overruns: int = Field(default=0, description="results dropped because the buffer was full")
    triggers_taken: int = 0
    triggers_missed: int = 0
    fail_safe_writes: int = Field(default=0, description="NO_FRAME written on a fault or a refused trigger")
    push_errors: int = 0
    capture_to_register_p50_ms: float | None = Field(default=None, description="capture to registers, recent p50")
    capture_to_register_p99_ms: float | None = Field(default=None, description="capture to registers, recent p99")


class OpcuaSnapshot(_Model):
    """The OPC UA server (docs/opcua.md); all zero when opcua.enabled is false."""

    enabled: bool = False
    endpoint: str | None = None
    clients: int = Field(default=0, description="OPC UA connections open now")
    connections_total: int = Field(default=0, description="OPC UA connections accepted since start")
    connections_refused: int = Field(default=0, description="connections refused by opcua.allowlist")
    logins_refused: int = Field(default=0, description="sessions refused: anonymous, unknown user, wrong password")
    writes_refused: int = Field(default=0, description="writes refused with a bad status code")
    triggers_taken: int = Field(default=0, description="Trigger method calls taken")
    triggers_refused: int = Field(default=0, description="Trigger method calls refused (not ready, busy, bad part id)")
    results_published: int = Field(default=0, description="results written to the LastResult nodes")
    results_dropped: int = Field(default=0, description="results dropped before the OPC UA writer (handoff full)")


class BundleSnapshot(_Model):
    """The running bundle and its hot swaps (service/reload.py, docs/bundle.md)."""

    store: str | None = Field(default=None, description="engine.bundle_store (null: none)")
    name: str | None = Field(default=None, description="the running bundle's manifest name")
    hash: str | None = Field(default=None, description="its manifest digest (sha256)")
    directory: str | None = Field(default=None, description="its version directory in the store")
    recipe: int = Field(default=0, description="the recipe running (0: none)")
    since: str | None = Field(default=None, description="when it became the running one (UTC)")
    loading: str | None = Field(default=None, description="the bundle being loaded now, if any")
    loading_recipe: int = Field(default=0, description="the recipe being loaded now (0: none)")
    last_result: str | None = Field(default=None, description="the last load's outcome: ok, failed or superseded")
    last_bundle: str | None = Field(default=None, description="what the last load was asked to run")
    last_source: str | None = Field(default=None, description="who asked: api, pointer, modbus, opcua, ...")
    last_reason: str | None = Field(default=None, description="why the last load failed")
    last_seconds: float | None = Field(default=None, description="request to swapped (or failed), seconds")
    last_at: str | None = Field(default=None, description="when the last load ended (UTC)")
    reloads: dict[str, int] = Field(default_factory=dict, description="loads per outcome since start")


class StatsSnapshot(_Model):
    """The daemon at one instant: what /api/status returns and what /metrics renders."""

    version: str
    uptime_s: float
    ready: bool
    not_ready: list[str] = Field(description="why the daemon is not ready (empty when ready)")
    camera: CameraSnapshot
    engine: EngineSnapshot
    pipeline: PipelineStats
    store: StoreSnapshot
    live: LiveSnapshot
    overlay: OverlaySnapshot = Field(default_factory=OverlaySnapshot)
    plc: PlcSnapshot = Field(default_factory=PlcSnapshot)
    mqtt: MqttSnapshot = Field(default_factory=MqttSnapshot)
    opcua: OpcuaSnapshot = Field(default_factory=OpcuaSnapshot)
    bundle: BundleSnapshot = Field(default_factory=BundleSnapshot)


class SnapshotCollector(Collector):
    """Renders one StatsSnapshot per scrape as Prometheus metric families."""

    def __init__(self, snapshot: Callable[[], StatsSnapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self._snapshot()
        n = NAMESPACE
        yield _gauge(f"{n}_up", "1 while the daemon runs; see defectsam_ready", 1)
        yield _gauge(f"{n}_ready", "1 when the camera is connected and the engine loaded (as /readyz)", int(s.ready))
        yield _counter(f"{n}_frames_captured", "frames the camera delivered", s.camera.frames_captured)
        yield _counter(f"{n}_frames_processed", "frames inspected", s.pipeline.frames_processed)
        yield _counter(f"{n}_frames_dropped", "frames captured but never inspected (a newer frame replaced them)",
                       s.camera.frames_dropped)
        yield _counter(f"{n}_inspection_errors", "frames whose inspection raised", s.pipeline.errors)
        yield _gauge(f"{n}_pipeline_fps", "frames inspected per second over the last 5 s", s.pipeline.fps)
        yield _gauge(f"{n}_camera_fps", "frames captured per second over the last 5 s", s.camera.fps)
        mode = GaugeMetricFamily(f"{n}_pipeline_mode", "1 for the inspection mode (pipeline.mode)", labels=["mode"])
        for name in PIPELINE_MODES:
            mode.add_metric([name], int(s.pipeline.mode == name))
        yield mode

        hist = HistogramMetricFamily(f"{n}_latency_seconds",
                                     "time per pipeline stage; end_to_end is capture to published result",
                                     labels=["stage"])
        for stage, lat in s.pipeline.latency.items():
            buckets = [("+Inf" if bound is None else _fmt(bound), count) for bound, count in lat.buckets]
            hist.add_metric([stage], buckets, lat.sum_s)
        yield hist

        verdicts = CounterMetricFamily(f"{n}_verdicts", "results per verdict", labels=["verdict"])
        for verdict, count in s.pipeline.verdicts.items():
            verdicts.add_metric([verdict], count)
        yield verdicts
        defects = CounterMetricFamily(f"{n}_defects", "defects found per class", labels=["class"])
        for name in s.engine.classes or sorted(s.pipeline.defects):
            defects.add_metric([name], s.pipeline.defects.get(name, 0))
        yield defects
        triggers = CounterMetricFamily(f"{n}_triggers", "triggers per outcome", labels=["outcome"])
        for outcome, count in s.pipeline.triggers.items():
            triggers.add_metric([outcome], count)
        yield triggers

        yield _counter(f"{n}_camera_reconnects", "successful camera reconnections", s.camera.reconnects)
        yield _counter(f"{n}_camera_disconnects", "camera losses and failed opens", s.camera.disconnects)
        state = GaugeMetricFamily(f"{n}_camera_state", "1 for the camera's current state", labels=["state"])
        for name in CAMERA_STATES:
            state.add_metric([name], int(s.camera.state == name))
        yield state

        engine_state = GaugeMetricFamily(f"{n}_engine_state", "1 for the engine's current state", labels=["state"])
        for name in ENGINE_STATES:
            engine_state.add_metric([name], int(s.engine.state == name))
        yield engine_state
        info = InfoMetricFamily(f"{n}_engine", "the loaded engine bundle")
        e = s.engine
        info.add_metric([], {"bundle": e.bundle or "", "arch": e.arch or "", "precision": e.precision or "",
                             "backend": e.backend or "", "weights": e.weights or "", "input": e.input or ""})
        yield info

        st = s.store
        yield _counter(f"{n}_store_records_written", "records committed to the store", st.written)
        dropped = CounterMetricFamily(f"{n}_store_records_dropped", "records not stored, per reason",
                                      labels=["reason"])
        for reason, count in st.dropped.items():
            dropped.add_metric([reason], count)
        yield dropped
        deleted = CounterMetricFamily(f"{n}_store_records_deleted", "records removed by retention, per reason",
                                      labels=["reason"])
        for reason, count in st.deleted.items():
            deleted.add_metric([reason], count)
        yield deleted
        yield _gauge(f"{n}_store_records", "records in the store", st.records)
        yield _gauge(f"{n}_store_bytes", "bytes the store has on disk (files, database, WAL)", st.bytes)
        yield _gauge(f"{n}_store_queue_depth", "records waiting for the writer", st.queue_depth)

        yield _gauge(f"{n}_live_viewers", "live-view (MJPEG) clients connected", s.live.viewers)
        yield _counter(f"{n}_live_frames_encoded", "live-view JPEGs encoded", s.live.frames_encoded)
        yield _gauge(f"{n}_event_clients", "/api/events clients connected", s.live.event_clients)
        yield _counter(f"{n}_events_dropped", "events slow clients missed", s.live.events_dropped)
        o = s.overlay
        yield _counter(f"{n}_overlay_renders", "overlays drawn (/api/results/{id}/overlay.jpg)", o.renders)
        yield _counter(f"{n}_overlay_render_errors", "overlay renders that raised", o.render_errors)
        yield _counter(f"{n}_overlay_cache_hits", "overlay requests answered from the cache", o.cache_hits)
        yield _counter(f"{n}_overlay_refused", "overlay requests answered 503 (render slots busy)", o.refused)
        yield _gauge(f"{n}_overlay_renders_in_flight", "overlays being drawn now", o.rendering)
        yield _gauge(f"{n}_overlay_waiting", "overlay requests waiting for a render now", o.waiting)
        yield _gauge(f"{n}_overlay_cache_bytes", "bytes of rendered overlays in the cache", o.cache_bytes)
        yield _gauge(f"{n}_uptime_seconds", "seconds since the daemon started", s.uptime_s)
        yield from _plc_metrics(s.plc)
        yield from mqtt_metrics(s.mqtt, NAMESPACE)
        yield from _opcua_metrics(s.opcua)
        yield from _bundle_metrics(s.bundle)


def _bundle_metrics(b: BundleSnapshot) -> Iterator[Metric]:
    n = f"{NAMESPACE}_bundle"
    info = InfoMetricFamily(n, "the running bundle: manifest name, hash, store directory, recipe")
    info.add_metric([], {"name": b.name or "", "hash": (b.hash or "")[:12], "directory": b.directory or "",
                         "recipe": str(b.recipe)})
    yield info
    reloads = CounterMetricFamily(f"{n}_reload", "bundle loads after start (hot swaps), per result",
                                  labels=["result"])
    for result in ("ok", "failed", "superseded"):
        reloads.add_metric([result], b.reloads.get(result, 0))
    yield reloads
    yield _gauge(f"{n}_loading", "1 while a bundle loads to replace the running one", int(b.loading is not None))
    yield _gauge(f"{n}_reload_last_seconds", "the last load: request to swapped (or failed)", b.last_seconds or 0.0)
    yield _gauge(f"{NAMESPACE}_recipe_active", "the recipe running (0: none)", b.recipe)


def _plc_metrics(plc: PlcSnapshot) -> Iterator[Metric]:
    n = f"{NAMESPACE}_plc"
    yield _gauge(f"{n}_enabled", "1 when the Modbus TCP server runs", int(plc.enabled))
    yield _gauge(f"{n}_connections", "Modbus clients connected", plc.connections)
    yield _counter(f"{n}_connections_accepted", "Modbus connections accepted", plc.connections_total)
    yield _counter(f"{n}_connections_rejected", "Modbus connections refused by the allowlist",
                   plc.connections_rejected)
    closed = CounterMetricFamily(f"{n}_connections_closed", "Modbus connections the server ended, by reason",
                                 labels=["reason"])
    for reason in ("limit", "idle", "unread", "framing"):
        closed.add_metric([reason], plc.connections_closed.get(reason, 0))
    yield closed
    requests = CounterMetricFamily(f"{n}_requests", "Modbus requests per function code", labels=["function"])
    for code, count in plc.requests.items():
        requests.add_metric([code], count)
    yield requests
    exceptions = CounterMetricFamily(f"{n}_exceptions", "Modbus exception responses per code", labels=["code"])
    for code, count in plc.exceptions.items():
        exceptions.add_metric([code], count)
    yield exceptions
    heartbeat = GaugeMetricFamily(f"{n}_heartbeat_state", "1 for the PLC heartbeat's state", labels=["state"])
    for name in ("off", "waiting", "ok", "timeout"):
        heartbeat.add_metric([name], int(plc.heartbeat == name))
    yield heartbeat
    yield _gauge(f"{n}_error_code", "the PLC error code register (0: none)", plc.error_code)
    yield _counter(f"{n}_results_written", "results written to the register map", plc.results_written)
    yield _counter(f"{n}_results_dropped", "results dropped before the register writer", plc.intake_dropped)
    yield _counter(f"{n}_buffer_overruns", "results dropped because the PLC buffer was full", plc.buffer_overruns)
    yield _counter(f"{n}_triggers_missed", "PLC triggers that came while not ready", plc.triggers_missed)
    yield _counter(f"{n}_fail_safe_writes", "fail-safe NO_FRAME results written", plc.fail_safe_writes)


def _opcua_metrics(opcua: OpcuaSnapshot) -> Iterator[Metric]:
    n = f"{NAMESPACE}_opcua"
    yield _gauge(f"{n}_enabled", "1 when the OPC UA server runs", int(opcua.enabled))
    yield _gauge(f"{n}_clients", "OPC UA connections open", opcua.clients)
    yield _counter(f"{n}_connections_accepted", "OPC UA connections accepted", opcua.connections_total)
    yield _counter(f"{n}_connections_refused", "OPC UA connections refused by the allowlist",
                   opcua.connections_refused)
    yield _counter(f"{n}_logins_refused", "OPC UA sessions refused (anonymous, unknown user, wrong password)",
                   opcua.logins_refused)
    yield _counter(f"{n}_writes_refused", "OPC UA writes refused with a bad status code", opcua.writes_refused)
    yield _counter(f"{n}_triggers_taken", "OPC UA Trigger calls taken", opcua.triggers_taken)
    yield _counter(f"{n}_triggers_refused", "OPC UA Trigger calls refused", opcua.triggers_refused)
    yield _counter(f"{n}_results_published", "results written to the OPC UA nodes", opcua.results_published)
    yield _counter(f"{n}_results_dropped", "results dropped before the OPC UA writer", opcua.results_dropped)


def _fmt(bound: float) -> str:
    return repr(float(bound))


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def create_registry(snapshot: Callable[[], StatsSnapshot]) -> CollectorRegistry:
    """A registry of this daemon's metrics (and its process metrics: RSS, CPU, open files)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot))
    ProcessCollector(namespace=NAMESPACE, registry=registry)
    return registry
