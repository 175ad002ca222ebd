"""Hot swap: a new bundle (or the same one with other thresholds) replaces the running one between two frames.

::

    request(LoadTarget) --> loader thread: resolve (store name/hash, or a path) -> load_bundle (schema, every
        checksum) -> open the engine -> Inspector -> warm-up: one whole inspection of a real camera frame
        -> Pipeline.swap() (the next frame taken uses it; frames in flight finish with the old one)
        -> the old engine closed once no frame uses it -> LoadEvent "active"
    any failure on the way --> the old keeps running; LoadEvent "failed" with the reason

The camera, the PLC session and the HTTP server are never touched. One load runs at a time: a request
that comes during one waits behind it (``queue=True``: the newest such request wins, as a PLC's last
recipe word does) or is refused (``queue=False``, the HTTP API). Every outcome goes to the listeners
(the PLC status word, OPC UA, the log) and into the counters behind /api/status and /metrics.

With ``engine.bundle_store`` the daemon also follows the store's ``active`` pointer: ``defectsam bundle
activate`` or ``rollback`` on the box switches the running daemon (polled every ``POINTER_POLL_S``).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from engines.bundle import Bundle, load_bundle, utc_now
from engines.engine import Engine
from engines.errors import DefectsamError
from engines.inspector import InspectionConfig, Inspector
from engines.postprocess import PostprocessConfig
from service.bundle_store import BundleStore, content_digest
from service.config.models import EngineSection
from service.pipeline.runner import Pipeline

log = logging.getLogger(__name__)

POINTER_POLL_S = 1.0
WARMUP_FRAME_WAIT_S = 5.0  # a load waits this long for a camera frame to check the new engine on
RELEASE_WAIT_S = 30.0  # frames in flight on the old engine finish within this before it is closed

Phase = Literal["loading", "active", "failed"]
# Why a load failed, for the PLC error code: unknown (no such recipe or bundle), failed (checks, engine, warm-up)
# superseded: a queued request replaced by a newer one before it started (not an error)
FailureKind = Literal["unknown", "failed", "superseded"]


@dataclass(frozen=True)
class LoadTarget:
    """What to run: a bundle (a store name/hash/name-hash with a store, else a directory) and thresholds."""

    bundle: str
    source: str  # who asked: api, pointer, modbus, opcua, ...
    recipe: int = 0  # the recipe number it realises (0: none)
    score_threshold: float | None = None
    uncertain_threshold: float | None = None
    candidate_threshold: float | None = None
    set_pointer: bool = False  # on success, also point the store's 'active' at it (the API's activate)


@dataclass(frozen=True)
class LoadEvent:
    phase: Phase
    target: LoadTarget
    reason: str | None = None
    kind: FailureKind | None = None
    seconds: float | None = None  # request -> swapped (or failed)


@dataclass(frozen=True)
class ActiveBundle:
    name: str
    digest: str
    path: str
    directory: str | None  # the version's directory in the store, if it runs from one
    recipe: int
    since: str  # UTC


@dataclass
class LoadTicket:
    target: LoadTarget
    done: threading.Event = field(default_factory=threading.Event)
    event: LoadEvent | None = None

    def wait(self, timeout: float | None = None) -> LoadEvent | None:
        self.done.wait(timeout)
        return self.event


class LoadBusyError(Exception):
    """A load is running and the request asked not to queue."""


Listener = Callable[[LoadEvent], None]


class Reloader:
    def __init__(self, engine_config: EngineSection, opener: Callable[..., Engine], *,
                 pipeline: Callable[[], Pipeline | None], latest_frame: Callable[[], np.ndarray | None],
                 on_swap: Callable[[Engine], None]) -> None:
        self.config = engine_config
        self.store = BundleStore(engine_config.bundle_store) if engine_config.bundle_store is not None else None
        self._open = opener
        self._pipeline = pipeline
        self._latest_frame = latest_frame
        self._on_swap = on_swap
        self._listeners: list[tuple[str, Listener]] = []
        self._lock = threading.Lock()
        self._running: LoadTicket | None = None
        self._queued: LoadTicket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._pointer_seen: str | None = None
        self.active: ActiveBundle | None = None
        self.last: LoadEvent | None = None
        self.last_at: str | None = None
        self.results: collections.Counter[str] = collections.Counter({"ok": 0, "failed": 0, "superseded": 0})

    # ------------------------------------------------------------------ wiring
    def subscribe(self, name: str, listener: Listener) -> None:
        """Called with every LoadEvent, on the loader's thread: must return at once."""
        self._listeners.append((name, listener))

    def startup_path(self) -> Path | None:
        """The bundle the daemon starts with when it runs a store: the active version (None: not a store).
        Raises DefectsamError when the store has nothing active."""
        if self.store is None:
            return None
        target = self.store.active_target()
        if target is None:
            raise DefectsamError(f"engine.bundle_store {self.store.root}: no active bundle ('defectsam bundle install "
                                 f"DIR --activate --store {self.store.root}')")
        self._pointer_seen = target
        return self.store.root / target

    def started(self, bundle: Bundle) -> None:
        """The daemon's first engine is running ``bundle``; follow the store's pointer from now on."""
        self.active = self._describe(bundle, recipe=0)
        if self.store is not None and self._watcher is None:
            self._watcher = threading.Thread(target=self._watch_pointer, name="bundle-pointer", daemon=True)
            self._watcher.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in (self._watcher, self._thread):
            if thread is not None:
                thread.join(RELEASE_WAIT_S + 5.0)

    @property
    def loading(self) -> LoadTarget | None:
        running = self._running
        return running.target if running is not None else None

    # ------------------------------------------------------------------ requests (any thread)
    def request(self, target: LoadTarget, *, queue: bool = True) -> LoadTicket:
        """Start loading ``target`` (returns at once). While a load runs: ``queue`` waits behind it (a queued
        request not yet started is replaced, and answered failed 'superseded'); else LoadBusyError."""
        ticket = LoadTicket(target)
        superseded = None
        with self._lock:
            if self._running is not None:
                if not queue:
                    raise LoadBusyError(f"a bundle load is running ({self._running.target.bundle}, "
                                   f"from {self._running.target.source})")
                superseded, self._queued = self._queued, ticket
            else:
                self._running = ticket
                self._thread = threading.Thread(target=self._work, name="bundle-loader", daemon=True)
                self._thread.start()
        if superseded is not None:
            self._finish(superseded, LoadEvent("failed", superseded.target, "superseded by a newer request",
                                                 "superseded", 0.0))
        return ticket

    def refuse(self, target: LoadTarget, reason: str, kind: FailureKind = "unknown") -> LoadEvent:
        """Answer a request that cannot start (an unknown recipe) as a failed load: listeners, counters, log."""
        event = LoadEvent("failed", target, reason, kind, 0.0)
        self._finish(LoadTicket(target), event)
        return event

    # ------------------------------------------------------------------ the loader thread
    def _work(self) -> None:
        ticket: LoadTicket | None = self._running
        while ticket is not None:
            self._emit(LoadEvent("loading", ticket.target))
            self._finish(ticket, self._load(ticket.target))
            with self._lock:
                ticket, self._queued = self._queued, None
                self._running = ticket

    def _load(self, target: LoadTarget) -> LoadEvent:
        started = time.monotonic()
        pipeline = self._pipeline()
        if pipeline is None:
            return LoadEvent("failed", target, "no engine is running yet to replace", "failed", 0.0)
        engine: Engine | None = None
        old = pipeline.inspector
        try:
            path, directory = self._resolve(target)
            bundle = load_bundle(path)
            reuse = bundle.path == old.engine.bundle.path
            engine = old.engine if reuse else self._open(bundle, self.config.backend)
            inspector = Inspector(engine, self._inspection(target), self._postprocess(target))
            self._warm_up(inspector)
        except Exception as exc:
            if engine is not None and engine is not old.engine:
                engine.close()
            reason = str(exc) if isinstance(exc, DefectsamError) else f"{type(exc).__name__}: {exc}"
            kind: FailureKind = "unknown" if isinstance(exc, _UnknownBundleError) else "failed"
            return LoadEvent("failed", target, reason, kind, time.monotonic() - started)
        replaced = pipeline.swap(inspector)
        self._on_swap(engine)
        seconds = time.monotonic() - started
        if not reuse:
            deadline = time.monotonic() + RELEASE_WAIT_S
            while not pipeline.released(replaced) and time.monotonic() < deadline:
                time.sleep(0.005)
            replaced.engine.close()
        self.active = self._describe(bundle, recipe=target.recipe, directory=directory)
        if target.set_pointer and self.store is not None and directory is not None:
            self._pointer_seen = directory  # our own move: not a change to follow
            self.store.activate(directory)
        return LoadEvent("active", target, None, None, seconds)

    def _resolve(self, target: LoadTarget) -> tuple[Path, str | None]:
        if self.store is not None:
            try:
                version = self.store.resolve(target.bundle)
            except DefectsamError as exc:
                raise _UnknownBundleError(str(exc)) from None
            return version.path, version.directory
        path = Path(target.bundle)
        if not path.is_dir():
            raise _UnknownBundleError(
                f"bundle {target.bundle!r}: no such directory (and no engine.bundle_store to look in)")
        return path, None

    def _inspection(self, target: LoadTarget) -> InspectionConfig:
        base = self.config.inspection
        if target.candidate_threshold is None:
            return base
        return base.model_copy(update={"candidate_threshold": target.candidate_threshold})

    def _postprocess(self, target: LoadTarget) -> PostprocessConfig:
        base = self.config.postprocess
        update = {k: v for k, v in (("score_threshold", target.score_threshold),
                                    ("uncertain_threshold", target.uncertain_threshold)) if v is not None}
        if not update:
            return base
        fields = {**base.model_dump(exclude_unset=True), **update}
        return PostprocessConfig.model_validate(fields)  # validated; set, so they win over calibrated ones

    def _warm_up(self, inspector: Inspector) -> None:
        """One whole inspection of the camera's newest frame: the engine runs, on this camera's frames."""
        deadline = time.monotonic() + WARMUP_FRAME_WAIT_S
        frame = self._latest_frame()
        while frame is None and time.monotonic() < deadline and not self._stop.is_set():
            time.sleep(0.05)
            frame = self._latest_frame()
        if frame is None:
            raise DefectsamError(f"no camera frame within {WARMUP_FRAME_WAIT_S:g} s to check the new engine on")
        try:
            inspector.finish(inspector.run(inspector.prepare(frame)))
        except Exception as exc:
            raise DefectsamError(f"warm-up inspection of a camera frame failed: {type(exc).__name__}: {exc}") from None

    def _describe(self, bundle: Bundle, *, recipe: int, directory: str | None = None) -> ActiveBundle:
        digest = content_digest(bundle.path)
        if directory is None and self.store is not None and bundle.path.parent == self.store.root.resolve():
            directory = bundle.path.name
        return ActiveBundle(bundle.manifest.name, digest, str(bundle.path), directory, recipe, utc_now())

    def _finish(self, ticket: LoadTicket, event: LoadEvent) -> None:
        self.results["ok" if event.phase == "active" else "superseded" if event.kind == "superseded" else "failed"] += 1
        self.last, self.last_at = event, utc_now()
        t = event.target
        what = f"bundle {t.bundle!r}" + (f" (recipe {t.recipe})" if t.recipe else "") + f", from {t.source}"
        if event.phase == "active":
            log.info("engine: switched to %s in %.2f s", what, event.seconds or 0.0,
                     extra={"event": "bundle_switched", "bundle": t.bundle, "recipe": t.recipe})
        else:
            log.error("engine: %s not loaded, the running one stays: %s", what, event.reason,
                      extra={"event": "bundle_refused", "bundle": t.bundle, "recipe": t.recipe})
        ticket.event = event
        ticket.done.set()
        self._emit(event)

    def _emit(self, event: LoadEvent) -> None:
        for name, listener in self._listeners:
            try:
                listener(event)
            except Exception:
                log.exception("engine: bundle load listener %s raised", name)

    # ------------------------------------------------------------------ the store's pointer
    def _watch_pointer(self) -> None:
        assert self.store is not None
        while not self._stop.wait(POINTER_POLL_S):
            try:
                target = self.store.active_target()
            except DefectsamError as exc:
                log.warning("engine: %s", exc)
                continue
            if target is None or target == self._pointer_seen:
                continue
            self._pointer_seen = target
            log.info("engine: %s/active now points at %s: switching", self.store.root, target)
            self.request(LoadTarget(bundle=target, source="pointer"))


class _UnknownBundleError(DefectsamError):
    """The target names no installed bundle."""
