"""What the API needs from the daemon. ``service.app.Daemon`` provides it; tests may pass a stand-in."""

from __future__ import annotations

from typing import Protocol

from prometheus_client import CollectorRegistry

from service.api.overlays import OverlayRenderer
from service.config.models import DaemonConfig
from service.live.view import EventHub, LiveView
from service.metrics import StatsSnapshot
from service.pipeline.record import InspectionRecord
from service.pipeline.runner import TriggerTicket
from service.store import RecordStore


class DaemonContext(Protocol):
    config: DaemonConfig
    store: RecordStore | None
    live: LiveView
    events: EventHub
    overlays: OverlayRenderer
    registry: CollectorRegistry

    def snapshot(self) -> StatsSnapshot:
        """The one stats snapshot (status API and /metrics)."""
        ...

    def not_ready(self) -> list[str]:
        """Why the daemon is not ready; empty when the camera is connected and the engine loaded."""
        ...

    def latest(self) -> InspectionRecord | None:
        ...

    def last_ng(self) -> InspectionRecord | None:
        """The newest NG result, kept in memory with its frame (stored or not)."""
        ...

    def trigger(self, part_id: str | None) -> TriggerTicket:
        """Raises service.pipeline.PipelineError when nothing can be inspected now."""
        ...
