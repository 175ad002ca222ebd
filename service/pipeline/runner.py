"""The inspection pipeline: frame selection + preprocess, inference, postprocess + fan-out, one thread each.

::

    camera thread -> LatestFrameSlot -> [select + preprocess] -> Handoff -> [infer] -> Handoff
        -> [postprocess + publish] -> subscribers (store queue, live-view slot, event queues)

The three stages are engines.inspector.Inspector's three steps: ``prepare`` (the frame's find
input), ``run`` (the find graph, the 1:1 windows cut from the frame, the segment graph) and
``finish`` (the windows merged into frame coordinates, defects, verdict). Stages overlap: while
frame n is inferred, frame n+1 is preprocessed and frame n-1 postprocessed. ONNX Runtime, OpenCV
and NumPy release the GIL in their kernels, so threads
overlap for real (docs/service.md has the measurements). Each ``Handoff`` holds one item and
blocks its producer, so the only place frames are dropped is the camera's latest-frame slot,
and the preprocess thread takes a frame only when inference is about to need it (the freshest
frame, not one that waited). Subscribers must not block: each one buffers into its own bounded
queue or latest-value slot and counts what it drops, so a viewer, an event client or the disk
never stalls inference.

Modes: ``free_run`` inspects the newest frame whenever the engine is free; a trigger there tags
the first frame captured after it with the part id. ``triggered`` inspects only the first frame
captured after each trigger. A trigger that gets no frame within ``trigger_timeout_s`` (camera
down) or that finds ``max_pending_triggers`` already waiting is answered with NO_FRAME: the fail-
safe verdict a PLC rejects the part on.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import cv2

from engines.errors import FrameGeometryError
from engines.inspector import Inspector, PassOutputs, Prepared
from engines.results import Verdict
from service.capture.base import Frame, LatestFrameSlot
from service.config.models import PipelineSection
from service.ops import lower_thread_priority
from service.pipeline.counters import PipelineCounters
from service.pipeline.record import InspectionRecord, StageTimes, no_frame_result

log = logging.getLogger(__name__)

Subscriber = Callable[[InspectionRecord], None]
_POLL_S = 0.25  # how often idle stage threads look at the stop flag and beat their heart


_JIT_MARGIN_S = 0.002  # how much earlier than predicted the overlapped preprocess takes its frame


class _RunningMean:
    """An exponentially weighted mean of a stage's duration in seconds (the last ~20 frames)."""

    def __init__(self, weight: float = 0.1, warmup: int = 3) -> None:
        self.value = 0.0
        self._weight = weight
        self._warmup = warmup
        self._count = 0

    @property
    def ready(self) -> bool:
        return self._count >= self._warmup

    def add(self, seconds: float) -> None:
        self._count += 1
        self.value = seconds if self._count == 1 else self.value + self._weight * (seconds - self.value)


class PipelineError(Exception):
    """A request the pipeline cannot serve now (not running, stopped)."""


class TriggerTicket:
    """One trigger: its id, part id and request time; ``wait()`` returns its record once published."""

    def __init__(self, trigger_id: int, part_id: str | None, requested_at: float, requested_wall: float) -> None:
        self.trigger_id = trigger_id
        self.part_id = part_id
        self.requested_at = requested_at
        self.requested_wall = requested_wall
        self._done = threading.Event()
        self._record: InspectionRecord | None = None

    def resolve(self, record: InspectionRecord) -> None:
        self._record = record
        self._done.set()

    def wait(self, timeout: float | None = None) -> InspectionRecord | None:
        self._done.wait(timeout)
        return self._record


@dataclass
class _Job:
    frame: Frame | None
    ticket: TriggerTicket | None
    inspector: Inspector | None = None  # the one that prepared it runs and finishes it (swap() between frames)
    reason: str | None = None  # for a NO_FRAME job
    prepared: Prepared | None = None
    outputs: PassOutputs | None = None
    times: dict[str, float] = field(default_factory=dict)


class Handoff:
    """A one-item hand-over between two stage threads: ``put`` waits for room, ``get`` for an item."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: Any = None
        self._closed = False

    def put(self, item: Any) -> bool:
        with self._cond:
            while self._item is not None and not self._closed:
                self._cond.wait(_POLL_S)
            if self._closed:
                return False
            self._item = item
            self._cond.notify_all()
            return True

    def get(self, timeout: float) -> Any:
        with self._cond:
            if self._item is None and not self._closed:
                self._cond.wait(timeout)
            item, self._item = self._item, None
            self._cond.notify_all()
            return item

    def wait_empty(self, timeout: float) -> bool:
        with self._cond:
            if self._item is not None and not self._closed:
                self._cond.wait(timeout)
            return self._item is None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class Pipeline:
    def __init__(
        self,
        inspector: Inspector,
        slot: LatestFrameSlot,
        config: PipelineSection,
        counters: PipelineCounters,
        *,
        request_frame: Callable[[], float] = time.monotonic,
        next_id: Callable[[], int] | None = None,
    ) -> None:
        """``request_frame`` is the camera's ``trigger()``: it returns the monotonic request time.
        ``next_id`` hands out inspection ids (the daemon's: service.ids.IdAllocator, unique across
        restarts); without it ids count from 1."""
        self.inspector = inspector
        self.engine = inspector.engine
        self.config = config
        self.counters = counters
        self._slot = slot
        self._request_frame = request_frame
        self._bundle_name = self.engine.bundle.manifest.name
        self._uses: collections.Counter[int] = collections.Counter()  # jobs in flight per inspector (id)
        self._uses_lock = threading.Lock()
        self.frame_problem: str | None = None  # why the camera's frames cannot be inspected, while they cannot
        self._next_id: Callable[[], int] = next_id if next_id is not None else itertools.count(1).__next__
        self._trigger_ids = itertools.count(1)
        self._subscribers: list[tuple[str, Subscriber]] = []
        self._pending: collections.deque[TriggerTicket] = collections.deque()
        self._pending_lock = threading.Lock()
        self._to_infer = Handoff()
        self._to_post = Handoff()
        self._stop = threading.Event()
        self._trigger_added = threading.Event()
        self._threads: list[threading.Thread] = []
        self._heartbeat: dict[str, float] = {}
        self._latest: InspectionRecord | None = None
        self._last_ng: InspectionRecord | None = None  # kept with its frame: the live page's "Last NG"
        self._latest_lock = threading.Lock()
        self._last_acquisition = 0
        self._subscriber_errors = 0
        self._inline = False
        self._may_run = threading.Event()  # cleared by hold(): the infer stage takes no new frame
        self._may_run.set()
        self._parked = threading.Event()  # set by the infer stage once it has stopped for a hold
        self._pre_parked = threading.Event()  # and by the overlapped preprocess stage
        self._handed_to_post = 0  # jobs the infer stage handed on, and those the postprocess stage finished
        self._post_finished = 0
        self._idle_preprocess = False
        self._opencv_threads: int | None = None  # OpenCV's thread count before an idle-class start
        # Just-in-time preprocessing: when the running inference started (0: none running) and running
        # averages of both stages' durations, from which the preprocess thread knows when to take a frame.
        self._infer_started = 0.0
        self._infer_s = _RunningMean()
        self._preprocess_s = _RunningMean()

    # ------------------------------------------------------------------ control
    def subscribe(self, name: str, subscriber: Subscriber) -> None:
        """Add a fan-out consumer. It runs on the publishing thread: it must return at once."""
        self._subscribers.append((name, subscriber))

    @property
    def overlapped(self) -> bool:
        """Whether preprocessing runs on its own thread (``pipeline.overlap_preprocess``; auto: yes)."""
        return self.config.overlap_preprocess != "off"

    @property
    def idle_preprocess(self) -> bool:
        """Whether the overlapped preprocess runs in the idle scheduling class (auto: on CPU backends)."""
        setting = self.config.preprocess_priority
        if setting == "auto":
            return self.engine.backend_name.endswith("CPUExecutionProvider")
        return setting == "idle"

    def start(self) -> None:
        self._stop.clear()
        self._inline = not self.overlapped
        self._idle_preprocess = self.overlapped and self.idle_preprocess
        if self._idle_preprocess:
            # OpenCV's worker threads keep normal priority: a parallel resize would run beside inference
            # after all, so the idle-class preprocess runs OpenCV on its own thread (restored on stop).
            self._opencv_threads = cv2.getNumThreads()
            cv2.setNumThreads(1)
        self._heartbeat.clear()
        stages: list[tuple[str, Callable[[], None]]] = [("infer", self._run_infer), ("postprocess", self._run_post)]
        if not self._inline:
            stages.insert(0, ("select+preprocess", self._run_preprocess))
        for name, target in stages:
            thread = threading.Thread(target=self._guard, args=(name, target), name=f"pipeline:{name}", daemon=True)
            self._heartbeat[name] = time.monotonic()
            self._threads.append(thread)
            thread.start()
        self.counters.running = True
        priority = "idle class" if self._idle_preprocess else "normal priority"
        preprocess = "inline" if self._inline else f"overlapped, {priority}"
        log.info("pipeline started (%s, engine %s on %s, preprocess %s)", self.config.mode, self._bundle_name,
                 self.engine.backend_name, preprocess)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop taking frames; frames already inside finish and are published."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._to_infer.close()
        self._to_post.close()
        with self._pending_lock:
            pending = list(self._pending)
            self._pending.clear()
        for ticket in pending:
            self._publish_no_frame(ticket, "daemon stopping")
        self.counters.running = False
        self._threads.clear()
        if self._opencv_threads is not None:
            cv2.setNumThreads(self._opencv_threads)
            self._opencv_threads = None

    @contextlib.contextmanager
    def hold(self, timeout: float = 30.0) -> Iterator[None]:
        """Inspect nothing inside the block, the engine idle: the frame in inference finishes and is
        published first. The camera keeps capturing into its slot. For ``defectsam bench pipeline``,
        which times the engine alone on the daemon's own engine between pipeline windows."""
        if not self._threads:
            raise PipelineError("the pipeline is not running")
        self._parked.clear()
        self._pre_parked.clear()
        self._may_run.clear()
        try:
            deadline = time.monotonic() + timeout
            rested = self._parked.wait(timeout) and (self._inline or self._pre_parked.wait(timeout))
            while rested and self._post_finished < self._handed_to_post:  # the last result is published
                rested = time.monotonic() < deadline
                time.sleep(0.002)
            if not rested:
                raise PipelineError(f"the pipeline did not come to rest within {timeout:g} s")
            stale = self._to_infer.get(0)  # a frame preprocessed before the hold would be old after it
            if stale is not None and stale.ticket is not None:
                self._to_infer.put(stale)  # a trigger's frame is still its answer
            elif stale is not None:
                self._release(stale)
            yield
        finally:
            self._may_run.set()

    def swap(self, inspector: Inspector) -> Inspector:
        """Inspect with ``inspector`` from the next frame taken on; returns the one it replaces. Frames
        already taken finish with the inspector that prepared them, so results are published in order,
        every old-bundle result before the first new one (service/reload.py). ``released`` says when the
        old one is no longer used."""
        with self._uses_lock:
            old, self.inspector = self.inspector, inspector
            self.engine = inspector.engine
            self._bundle_name = inspector.engine.bundle.manifest.name
        return old

    def released(self, inspector: Inspector) -> bool:
        """Whether no frame in flight uses ``inspector`` any more (after swap(), before closing its engine)."""
        with self._uses_lock:
            return self._uses[id(inspector)] == 0

    def _take_inspector(self) -> Inspector:
        with self._uses_lock:
            self._uses[id(self.inspector)] += 1
            return self.inspector

    def _release(self, job: _Job) -> None:
        if job.inspector is None:
            return
        with self._uses_lock:
            key = id(job.inspector)
            self._uses[key] -= 1
            if self._uses[key] <= 0:
                del self._uses[key]
        job.inspector = None

    def healthy(self, stall_s: float = 10.0) -> bool:
        """Every stage thread alive and looping (none stuck in a hung engine call for ``stall_s``)."""
        now = time.monotonic()
        return bool(self._threads) and all(t.is_alive() for t in self._threads) and all(
            now - beat < stall_s for beat in self._heartbeat.values()
        )

    @property
    def latest(self) -> InspectionRecord | None:
        with self._latest_lock:
            return self._latest

    @property
    def last_ng(self) -> InspectionRecord | None:
        """The newest NG result with its frame, whether the store kept it or not."""
        with self._latest_lock:
            return self._last_ng

    # ------------------------------------------------------------------ triggers
    def trigger(self, part_id: str | None = None) -> TriggerTicket:
        """Inspect the next frame (triggered mode) or tag it (free run) with ``part_id``."""
        if self._stop.is_set() or not self._threads:
            raise PipelineError("the pipeline is not running")
        requested = self._request_frame()
        ticket = TriggerTicket(next(self._trigger_ids), part_id, requested, time.time())
        with self._pending_lock:
            overflow = len(self._pending) >= self.config.max_pending_triggers
            if not overflow:
                self._pending.append(ticket)
        self._trigger_added.set()
        if overflow:
            self.counters.overflow()
            self._publish_no_frame(ticket, f"{self.config.max_pending_triggers} triggers already pending")
        return ticket

    def _expire_triggers(self, now: float) -> None:
        expired = []
        with self._pending_lock:
            while self._pending and now - self._pending[0].requested_at > self.config.trigger_timeout_s:
                expired.append(self._pending.popleft())
        for ticket in expired:
            self._publish_no_frame(ticket, f"no frame within {self.config.trigger_timeout_s:g} s of the trigger")

    def _publish_no_frame(self, ticket: TriggerTicket, reason: str) -> None:
        """NO_FRAME results skip the stages; published from the caller's thread, in the record order."""
        log.warning("trigger %d (part %s): NO_FRAME: %s", ticket.trigger_id, ticket.part_id, reason)
        record = InspectionRecord(
            inspection_id=self._next_id(), acquisition_id=0, source="", result=no_frame_result(),
            wall_time=ticket.requested_wall, times=StageTimes(triggered=ticket.requested_at),
            bundle=self._bundle_name, part_id=ticket.part_id, trigger_id=ticket.trigger_id, reason=reason,
        )
        self._publish(record, ticket)

    # ------------------------------------------------------------------ stage threads
    def _guard(self, name: str, target: Callable[[], None]) -> None:
        try:
            target()
        except BaseException:
            log.exception("pipeline: %s thread crashed", name)
            raise

    def _beat(self, name: str) -> None:
        self._heartbeat[name] = time.monotonic()

    def _next_job(self) -> _Job | None:
        """The next frame to inspect, with its trigger ticket if it answers one."""
        now = time.monotonic()
        self._expire_triggers(now)
        if self.config.mode == "triggered":
            with self._pending_lock:
                ticket = self._pending[0] if self._pending else None
            if ticket is None:
                self._trigger_added.wait(_POLL_S)
                self._trigger_added.clear()
                return None
            frame = self._slot.get(_POLL_S, newer_than=self._last_acquisition, captured_after=ticket.requested_at)
            if frame is None:
                return None  # expired on a later pass
            with self._pending_lock:
                if not self._pending or self._pending[0] is not ticket:
                    return None  # expired meanwhile
                self._pending.popleft()
            return _Job(frame, ticket)
        frame = self._slot.get(_POLL_S, newer_than=self._last_acquisition)
        if frame is None:
            return None
        ticket = None
        with self._pending_lock:
            if self._pending and self._pending[0].requested_at < frame.captured_at:
                ticket = self._pending.popleft()
        return _Job(frame, ticket)

    def _prepare(self) -> _Job | None:
        """Select the next frame and preprocess it; None when there is none (or it failed, and was reported)."""
        job = self._next_job()
        if job is None or job.frame is None:
            return None
        self._last_acquisition = job.frame.acquisition_id
        job.times["preprocess_start"] = time.monotonic()
        job.inspector = inspector = self._take_inspector()
        try:
            job.prepared = inspector.prepare(job.frame.image)
        except Exception as exc:
            self._failed(job, "preprocess", exc)
            return None
        self.frame_problem = None
        job.times["preprocess_done"] = time.monotonic()
        return job

    def _run_preprocess(self) -> None:
        if self._idle_preprocess and not lower_thread_priority(0, idle_class=True):
            log.warning("pipeline: the preprocess thread could not enter the idle scheduling class")
        while not self._stop.is_set():
            self._beat("select+preprocess")
            if self._parked_for_hold(self._pre_parked):
                continue
            if not self._to_infer.wait_empty(_POLL_S):
                continue  # inference has not taken the frame before: take a fresh one later
            if self._wait_until_due():
                continue
            job = self._prepare()
            if job is not None:
                self._preprocess_s.add(job.times["preprocess_done"] - job.times["preprocess_start"])
                self._to_infer.put(job)

    def _parked_for_hold(self, parked: threading.Event) -> bool:
        """During a hold(): say so through ``parked``, wait (one poll) and return True to loop again."""
        if self._may_run.is_set():
            return False
        parked.set()
        self._may_run.wait(_POLL_S)
        return True

    def _wait_until_due(self) -> bool:
        """Sleep (at most one poll) until the running inference is about to end, less the expected
        preprocess time and a margin, so that the frame taken is the freshest that will be ready in
        time. True when it slept and the caller should look again; False when it is time to take a
        frame. A trigger meanwhile loses nothing: the engine is busy until then either way, and the
        frame taken at the due time was captured after the trigger."""
        started = self._infer_started
        if not started or not self._infer_s.ready:
            return False
        lead = self._infer_s.value - 1.5 * self._preprocess_s.value - _JIT_MARGIN_S
        remaining = started + lead - time.monotonic()
        if remaining <= 0:
            return False
        self._stop.wait(min(remaining, _POLL_S))
        return True

    def _run_infer(self) -> None:
        while not (self._stop.is_set() and (self._inline or self._to_infer.wait_empty(0))):
            self._beat("infer")
            if self._parked_for_hold(self._parked):
                continue
            job: _Job | None = self._prepare() if self._inline else self._to_infer.get(_POLL_S)
            if job is None or job.prepared is None:
                continue
            started = time.monotonic()
            self._infer_started = started
            assert job.inspector is not None  # _prepare gives every job its inspector
            try:
                job.outputs = job.inspector.run(job.prepared)
            except Exception as exc:
                self._infer_started = 0.0
                self._failed(job, "infer", exc)
                continue
            self._infer_started = 0.0
            self._infer_s.add(time.monotonic() - started)
            job.prepared = None
            job.times["infer_done"] = time.monotonic()
            self._handed_to_post += 1
            self._to_post.put(job)

    def _run_post(self) -> None:
        while True:
            self._beat("postprocess")
            job = self._to_post.get(_POLL_S)
            if job is None:
                if self._stop.is_set() and not any(t.is_alive() for t in self._threads[:-1]):
                    return
                continue
            inspector = job.inspector
            try:
                assert job.outputs is not None and inspector is not None  # the infer stage hands on only jobs it ran
                result = inspector.finish(job.outputs)
            except Exception as exc:
                self._failed(job, "postprocess", exc)
                self._post_finished += 1
                continue
            frame = job.frame
            assert frame is not None  # jobs reaching this stage always carry a frame
            t = job.times
            times = StageTimes(
                captured=frame.captured_at, preprocess_start=t["preprocess_start"],
                preprocess_done=t["preprocess_done"], infer_done=t["infer_done"], post_done=time.monotonic(),
                triggered=job.ticket.requested_at if job.ticket else 0.0,
            )
            record = InspectionRecord(
                inspection_id=self._next_id(), acquisition_id=frame.acquisition_id, source=frame.source,
                result=result, wall_time=frame.wall_time, times=times, bundle=inspector.engine.bundle.manifest.name,
                part_id=job.ticket.part_id if job.ticket else None,
                trigger_id=job.ticket.trigger_id if job.ticket else None, frame=frame.image,
            )
            self._release(job)
            self._publish(record, job.ticket)
            self._post_finished += 1

    def _failed(self, job: _Job, stage: str, exc: BaseException) -> None:
        """A frame whose inspection raised: log it, count it, answer its trigger with NO_FRAME.

        A frame the bundle cannot inspect as configured (FrameGeometryError: the camera's frames are
        smaller than a window or the find pass's input) makes ``frame_problem`` say why, which keeps the
        daemon not ready, and is logged once per cause instead of once per frame.
        """
        if isinstance(exc, FrameGeometryError):
            if str(exc) != self.frame_problem:
                log.error("pipeline: frames cannot be inspected (daemon not ready): %s", exc)
            self.frame_problem = str(exc)
        else:
            log.error("pipeline: %s failed on frame %s: %s: %s", stage,
                      job.frame.acquisition_id if job.frame else "-", type(exc).__name__, exc)
        self._release(job)
        self.counters.error()
        if job.ticket is not None:
            self._publish_no_frame(job.ticket, f"{stage} failed: {type(exc).__name__}: {exc}")

    def _publish(self, record: InspectionRecord, ticket: TriggerTicket | None) -> None:
        self.counters.record(record)
        with self._latest_lock:
            self._latest = record
            if record.verdict is Verdict.NG:
                self._last_ng = record
        if ticket is not None:
            ticket.resolve(record)
        for name, subscriber in self._subscribers:
            try:
                subscriber(record)
            except Exception:
                self._subscriber_errors += 1
                if self._subscriber_errors <= 10 or self._subscriber_errors % 1000 == 0:
                    log.exception("pipeline: subscriber %s raised (%d so far)", name, self._subscriber_errors)
