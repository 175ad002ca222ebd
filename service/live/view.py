"""The live view: the newest result drawn over its frame, downscaled, JPEG-encoded, for MJPEG viewers.

Nothing is drawn or encoded while nobody watches: ``offer`` returns at once when the viewer count
is zero (the Orin Nano has no hardware video encoder, so every JPEG costs CPU the engine could
use). While watched, a thread of its own encodes at most ``max_fps`` frames per second, always
the newest result (results arriving meanwhile replace each other and are counted as skipped).
When no result comes (engine loading or failed), it shows the camera's raw frame with the reason,
so an operator can tell a camera problem from an engine problem.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import cv2
import numpy as np

from engines.overlay import render_overlay
from service.config.models import LiveSection
from service.live.fanout import AsyncFanout
from service.pipeline.record import InspectionRecord

log = logging.getLogger(__name__)

MAX_VIEWERS = 16  # MJPEG streams at once
MAX_EVENT_CLIENTS = 32  # /api/events streams at once (each live page holds one; dashboards may add more)
_IDLE_S = 1.0  # with no result for this long, show the raw camera frame


class LiveView:
    def __init__(
        self,
        config: LiveSection,
        *,
        raw_frame: Callable[[], np.ndarray | None] = lambda: None,
        idle_reason: Callable[[], str] = lambda: "",
    ) -> None:
        self.config = config
        self.frames = AsyncFanout(maxsize=1)  # viewers want the newest JPEG only
        self._raw_frame = raw_frame
        self._idle_reason = idle_reason
        self._cond = threading.Condition()
        self._pending: InspectionRecord | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._encoded = 0
        self._skipped = 0

    @property
    def viewers(self) -> int:
        return self.frames.count

    @property
    def encoded(self) -> int:
        return self._encoded

    @property
    def skipped(self) -> int:
        return self._skipped

    def offer(self, record: InspectionRecord) -> None:
        """The pipeline's fan-out hook: keep the newest record, only while somebody watches."""
        if record.frame is None or self.frames.count == 0:
            return
        with self._cond:
            if self._pending is not None:
                self._skipped += 1
            self._pending = record
            self._cond.notify()

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="live-view", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(5.0)

    def _run(self) -> None:
        period = 1.0 / self.config.max_fps
        next_at = 0.0
        last_result = 0.0
        while not self._stop.is_set():
            delay = next_at - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                return
            with self._cond:
                if self._pending is None:
                    self._cond.wait(period if self.frames.count else 0.5)
                record, self._pending = self._pending, None
            now = time.monotonic()
            if self.frames.count == 0:
                # A viewer who just connected gets the first result (a frame period away), not a
                # "waiting for results" card: the raw-frame fallback starts _IDLE_S after watching began.
                last_result = now
                continue
            try:
                if record is not None:
                    last_result = now
                    jpeg = self.encode(record)
                elif now - last_result >= _IDLE_S:
                    jpeg = self.encode_raw()
                else:
                    continue
            except Exception:
                log.exception("live view: rendering failed")
                continue
            if jpeg is None:
                continue
            self._encoded += 1
            self.frames.publish(jpeg)
            next_at = now + period

    def _scale(self, frame: np.ndarray) -> float:
        return min(1.0, self.config.width / frame.shape[1])

    def encode(self, record: InspectionRecord) -> bytes | None:
        assert record.frame is not None
        canvas = render_overlay(record.frame, record.result, scale=self._scale(record.frame))
        return self._jpeg(canvas)

    def encode_raw(self) -> bytes | None:
        frame = self._raw_frame()
        if frame is None:
            return None
        scale = self._scale(frame)
        size = (max(1, round(frame.shape[1] * scale)), max(1, round(frame.shape[0] * scale)))
        canvas = cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
        if canvas.ndim == 2:
            canvas = cv2.cvtColor(canvas, cv2.COLOR_GRAY2BGR)
        text = f"not inspecting: {self._idle_reason() or 'waiting for results'}"
        cv2.rectangle(canvas, (0, 0), (canvas.shape[1], 28), (60, 60, 60), -1)
        cv2.putText(canvas, text[:90], (8, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (255, 255, 255), 1, cv2.LINE_AA)
        return self._jpeg(canvas)

    def _jpeg(self, canvas: np.ndarray) -> bytes | None:
        ok, buf = cv2.imencode(".jpg", canvas, [cv2.IMWRITE_JPEG_QUALITY, self.config.jpeg_quality])
        return buf.tobytes() if ok else None


class EventHub:
    """Result events for /api/events: serialised once per record, only while a client listens."""

    def __init__(self, queue_size: int) -> None:
        self.fanout = AsyncFanout(maxsize=queue_size)

    @property
    def clients(self) -> int:
        return self.fanout.count

    @property
    def dropped(self) -> int:
        return self.fanout.dropped

    def offer(self, record: InspectionRecord) -> None:
        if self.fanout.count == 0:
            return
        self.fanout.publish(record.to_dict(with_polygons=False))
