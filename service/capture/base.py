"""Camera capture: what every source plugin provides, the latest-frame slot, and the camera worker.

A plugin is one module in service/capture/ with:

* ``KEY``: its name in config (``camera.type``),
* ``Config``: a pydantic model deriving from ``CameraConfigBase`` with ``type: Literal[KEY]``,
* ``open_source(config) -> FrameSource``, called in the camera's own thread (it may be slow:
  the synthetic camera pre-renders its frames there); it raises ``CameraDisconnected`` (or any
  OSError) when the camera is not there, and the worker retries with backoff,
* optionally ``check_available()``, raising ``CameraUnavailableError`` naming the plugin and the
  extra to install when its optional package is missing; ``create_worker`` calls it up front so
  that a daemon configured for a Basler camera without pypylon fails at start-up, not later.

A plugin module imports only the standard library, NumPy, OpenCV and pydantic at import time.

One ``CameraWorker`` (one thread) runs one source: it opens it, reads frames, stamps them and puts
them in a ``LatestFrameSlot``, which holds one frame: a frame nobody read before the next one
arrived is dropped and counted. Nothing queues. When the camera is lost the worker reconnects with
capped exponential backoff, forever, and says so in ``stats().state``.
"""

from __future__ import annotations

import collections
import enum
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from engines.errors import DefectsamError
from engines.frame import check_frame
from service.capture.backoff import Backoff

if TYPE_CHECKING:
    from service.capture import CameraConfig

log = logging.getLogger(__name__)

FPS_WINDOW_S = 5.0  # stats().fps counts the frames of the last few seconds


# --------------------------------------------------------------------------------------------
# Errors


class CameraError(DefectsamError):
    """A camera problem; ``str(error)`` is one line naming the camera and the cause."""


class CameraUnavailableError(CameraError):
    """The plugin cannot run here (its optional package is missing). Not retried: the worker stops."""


class CameraDisconnected(CameraError):  # noqa: N818 - the name the daemon's interface fixes
    """The camera is not there or stopped delivering. The worker closes it and reconnects with backoff."""


class EndOfStream(Exception):  # noqa: N818 - a signal, like StopIteration, not an error
    """A finite source (files in 'once' mode) has delivered its last frame. The worker stops cleanly."""


# --------------------------------------------------------------------------------------------
# Config


class ReconnectConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    initial_s: float = Field(
        default=0.5, gt=0, le=60, title="First retry delay", description="seconds before the first reconnection attempt"
    )
    max_s: float = Field(
        default=30.0, gt=0, le=3600, title="Longest retry delay",
        description="the delay doubles after each failed attempt up to this cap; attempts never stop",
    )
    factor: float = Field(default=2.0, ge=1, le=10, title="Backoff factor", description="delay growth per failure")

    @model_validator(mode="after")
    def _cap_above_first(self) -> ReconnectConfig:
        if self.max_s < self.initial_s:
            raise ValueError(f"max_s ({self.max_s}) must be >= initial_s ({self.initial_s})")
        return self


class CameraConfigBase(BaseModel):
    """Options every camera type has; each plugin's ``Config`` adds ``type: Literal[KEY]`` and its own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    reconnect: ReconnectConfig = Field(
        default_factory=ReconnectConfig,
        title="Reconnection",
        description="capped exponential backoff used while the camera is lost",
    )


# --------------------------------------------------------------------------------------------
# Frames and the slot


@dataclass(frozen=True)
class Frame:
    """One captured frame. ``image`` is shared, never copied: it is read-only (writeable=False)."""

    image: np.ndarray  # uint8 HxW (mono) or HxWx3 (BGR)
    acquisition_id: int  # monotonic per camera worker, starting at 1
    captured_at: float  # time.monotonic() when the frame arrived
    wall_time: float  # time.time() at the same moment
    source: str  # where it came from: "synthetic:seed=7", a file path, "basler:<serial>"


class FrameSource(Protocol):
    """An open camera, used by one thread only (the worker's), except ``trigger`` (see below).

    * ``read()`` blocks until a frame arrives and returns it (uint8 HxW or HxWx3 BGR); it may
      return None after a short wait (about 0.1 s at most) when there is legitimately nothing to
      deliver (a triggered camera that was not triggered), so that the worker can notice a stop;
      it raises ``CameraDisconnected`` or any OSError when the camera is lost, ``EndOfStream`` when
      a finite source is done.
    * ``description`` names the origin of the frame that ``read()`` last returned.
    * ``pace_fps``: the rate the worker paces ``read()`` at (sources that could deliver faster than
      wanted: synthetic, files); None when the device sets the pace and ``read()`` waits for it.
    * ``close()`` releases the device; called once, from the worker's thread.
    * optional ``trigger()``: request one frame (software trigger). Called from any thread; it must
      only signal the worker's thread (e.g. set an Event), never touch the device itself. A source
      whose trigger depends on its mode says so in an optional ``triggerable`` attribute.
    """

    description: str
    pace_fps: float | None

    def read(self) -> np.ndarray | None: ...

    def close(self) -> None: ...


class LatestFrameSlot:
    """A thread-safe single slot holding the latest frame.

    ``put`` replaces the frame; if no ``get`` had returned the one it replaces, that one counts as
    dropped. ``get`` waits for a frame newer than ``newer_than`` (an acquisition id) and, if given,
    captured after ``captured_after`` (a monotonic time: "the next frame after now"). Consumers that
    only look (a live view) use ``peek``, which neither waits nor marks the frame as read.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._frame: Frame | None = None
        self._unread = False
        self._dropped = 0
        self._closed = False

    def put(self, frame: Frame) -> None:
        with self._cond:
            if self._unread:
                self._dropped += 1
            self._frame = frame
            self._unread = True
            self._cond.notify_all()

    def get(
        self, timeout: float | None = None, *, newer_than: int = 0, captured_after: float | None = None
    ) -> Frame | None:
        """The latest frame once it has ``acquisition_id > newer_than`` (and ``captured_at > captured_after``).

        Returns None when ``timeout`` seconds pass first, or at once when the slot is closed (the
        camera stopped for good) and holds no such frame. ``timeout=None`` waits without limit.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                frame = self._frame
                if (
                    frame is not None
                    and frame.acquisition_id > newer_than
                    and (captured_after is None or frame.captured_at > captured_after)
                ):
                    self._unread = False
                    return frame
                if self._closed:
                    return None
                if deadline is None:
                    self._cond.wait()
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return None
                    self._cond.wait(remaining)

    def peek(self) -> Frame | None:
        """The latest frame, if any, without waiting and without marking it as read."""
        with self._cond:
            return self._frame

    @property
    def dropped(self) -> int:
        """Frames replaced before anybody read them."""
        with self._cond:
            return self._dropped

    @property
    def closed(self) -> bool:
        with self._cond:
            return self._closed

    def close(self) -> None:
        """No more frames will come: wake every waiter (``get`` returns None instead of waiting)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def reopen(self) -> None:
        with self._cond:
            self._closed = False


# --------------------------------------------------------------------------------------------
# The worker


class CameraState(str, enum.Enum):
    STARTING = "starting"  # opening the camera for the first time
    CONNECTED = "connected"  # open; frames flow (or, triggered, wait for triggers)
    RECONNECTING = "reconnecting"  # lost or not found; retrying with backoff (see retry_in_s, last_error)
    STOPPED = "stopped"  # stopped on request, at the end of a 'once' source, or unusable (last_error)


@dataclass(frozen=True)
class CameraStats:
    """A snapshot of one camera worker, for the stats API, /metrics and the PLC alike."""

    name: str
    type: str
    state: CameraState
    source: str  # origin of the last frame (or the configured device before the first)
    frames_captured: int
    frames_dropped: int  # replaced in the slot before anybody read them
    source_skipped: int  # frames the source itself reports skipping (camera-side gaps)
    reconnects: int  # successful opens that followed a failure
    disconnects: int  # failures: lost while streaming, or an open that failed
    fps: float  # frames per second over the last few seconds (0 when none came)
    last_error: str | None  # the most recent failure, kept after recovery
    last_frame_at: float | None  # time.monotonic() of the last frame
    last_frame_wall: float | None  # time.time() of the last frame
    retry_in_s: float | None  # while RECONNECTING: the backoff delay being waited
    end_of_stream: bool  # a 'once' source delivered everything (state STOPPED, no error)
    triggerable: bool  # the open source takes software triggers


class CameraWorker:
    """One camera, one thread: open the source, read, stamp, fill the slot; reconnect when lost."""

    def __init__(self, config: CameraConfig, slot: LatestFrameSlot | None = None, *, name: str = "camera0") -> None:
        self.config = config
        self.slot = slot if slot is not None else LatestFrameSlot()
        self.name = name
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._source: FrameSource | None = None
        self._state = CameraState.STOPPED
        self._description = f"{config.type}"
        self._next_id = 1
        self._frames = 0
        self._source_skipped = 0
        self._reconnects = 0
        self._disconnects = 0
        self._last_error: str | None = None
        self._last_frame_at: float | None = None
        self._last_frame_wall: float | None = None
        self._retry_in: float | None = None
        self._end_of_stream = False
        self._recent: collections.deque[float] = collections.deque(maxlen=4096)

    # -- control ------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError(f"camera {self.name!r} is already running")
        self._stop.clear()
        self.slot.reopen()
        with self._lock:
            self._state = CameraState.STARTING
            self._end_of_stream = False
        self._thread = threading.Thread(target=self._run, name=f"camera:{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.warning("camera %s: capture thread still blocked in the device after %.1f s", self.name, timeout)

    def trigger(self) -> float:
        """Ask for a frame now; returns the monotonic time of the request.

        A source with a software trigger (basler in 'software' mode) is triggered; a free-running
        one is not touched. Either way the answer is the first frame captured after the returned
        time: ``slot.get(timeout, captured_after=t)`` (or ``next_frame``). While the camera is
        reconnecting a trigger has no camera to go to, and the wait times out.
        """
        requested = time.monotonic()
        with self._lock:
            source = self._source
        trigger = getattr(source, "trigger", None)
        if trigger is not None:
            trigger()
        return requested

    def next_frame(self, timeout: float | None = None) -> Frame | None:
        """Trigger and wait for the first frame captured after the trigger; None on timeout or stop."""
        return self.slot.get(timeout, captured_after=self.trigger())

    @property
    def state(self) -> CameraState:
        with self._lock:
            return self._state

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> CameraStats:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0] < now - FPS_WINDOW_S:
                self._recent.popleft()
            fps = 0.0
            if len(self._recent) >= 2:
                fps = (len(self._recent) - 1) / max(now - self._recent[0], 1e-6)
            source = self._source
            skipped = self._source_skipped + (int(getattr(source, "skipped", 0)) if source is not None else 0)
            return CameraStats(
                name=self.name,
                type=self.config.type,
                state=self._state,
                source=self._description,
                frames_captured=self._frames,
                frames_dropped=self.slot.dropped,
                source_skipped=skipped,
                reconnects=self._reconnects,
                disconnects=self._disconnects,
                fps=fps,
                last_error=self._last_error,
                last_frame_at=self._last_frame_at,
                last_frame_wall=self._last_frame_wall,
                retry_in_s=self._retry_in if self._state is CameraState.RECONNECTING else None,
                end_of_stream=self._end_of_stream,
                triggerable=bool(getattr(source, "triggerable", hasattr(source, "trigger"))),
            )

    # -- the thread ---------------------------------------------------------------------------

    def _set_state(self, state: CameraState) -> None:
        with self._lock:
            if state is not self._state:
                log.info("camera %s: %s -> %s", self.name, self._state.value, state.value)
            self._state = state

    def _run(self) -> None:
        from service.capture import open_source  # the registry imports this module

        reconnect = self.config.reconnect
        backoff = Backoff(reconnect.initial_s, reconnect.max_s, reconnect.factor)
        failed_before = False
        try:
            while not self._stop.is_set():
                try:
                    source = open_source(self.config)
                except CameraUnavailableError as exc:
                    self._fail_for_good(exc)
                    return
                except Exception as exc:
                    self._lost(exc, backoff, opening=True)
                    failed_before = True
                    continue
                with self._lock:
                    self._source = source
                    self._state = CameraState.CONNECTED
                    self._retry_in = None
                    if failed_before:
                        self._reconnects += 1
                log.info("camera %s: connected (%s)", self.name, source.description)
                try:
                    self._stream(source, backoff)
                except EndOfStream:
                    log.info("camera %s: end of stream", self.name)
                    with self._lock:
                        self._end_of_stream = True
                    return
                except CameraUnavailableError as exc:
                    self._fail_for_good(exc)
                    return
                except Exception as exc:
                    self._close(source)
                    self._lost(exc, backoff, opening=False)
                    failed_before = True
                finally:
                    self._close(source)
        except BaseException as exc:  # a bug in this module: say so instead of dying silently
            log.exception("camera %s: capture thread crashed", self.name)
            with self._lock:
                self._last_error = f"capture thread crashed: {exc.__class__.__name__}: {exc}"
            raise
        finally:
            self._set_state(CameraState.STOPPED)
            self.slot.close()

    def _stream(self, source: FrameSource, backoff: Backoff) -> None:
        """Read until stopped; raises whatever the source raises."""
        next_at = time.monotonic()
        while not self._stop.is_set():
            pace = source.pace_fps
            if pace:
                delay = next_at - time.monotonic()
                if delay > 0 and self._stop.wait(delay):
                    return
            image = source.read()
            if image is None:
                continue
            captured_at = time.monotonic()
            wall_time = time.time()
            check_frame(image)
            image.flags.writeable = False  # shared with every consumer: nobody may draw on it
            frame = Frame(image, self._next_id, captured_at, wall_time, source.description)
            self._next_id += 1
            self.slot.put(frame)
            with self._lock:
                self._frames += 1
                self._last_frame_at = captured_at
                self._last_frame_wall = wall_time
                self._description = frame.source
                self._recent.append(captured_at)
            backoff.reset()
            if pace:
                # the next tick; after a stall, carry on from now instead of bursting to catch up
                next_at = max(next_at + 1.0 / pace, captured_at)

    def _lost(self, exc: BaseException, backoff: Backoff, *, opening: bool) -> None:
        delay = backoff.next()
        message = f"{exc.__class__.__name__}: {exc}" if not isinstance(exc, CameraError) else str(exc)
        what = "cannot open" if opening else "lost"
        log.warning("camera %s: %s: %s; retrying in %.1f s", self.name, what, message, delay)
        with self._lock:
            self._disconnects += 1
            self._last_error = message
            self._retry_in = delay
            self._state = CameraState.RECONNECTING
        self._stop.wait(delay)

    def _fail_for_good(self, exc: CameraUnavailableError) -> None:
        log.error("camera %s: %s", self.name, exc)
        with self._lock:
            self._last_error = str(exc)

    def _close(self, source: FrameSource) -> None:
        with self._lock:
            if self._source is not source:
                return  # already closed
            self._source = None
            self._source_skipped += int(getattr(source, "skipped", 0))
        try:
            source.close()
        except Exception as exc:
            log.warning("camera %s: error while closing: %s", self.name, exc)
