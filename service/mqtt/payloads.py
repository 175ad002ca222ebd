"""The JSON of the result and state topics (docs/mqtt.md has examples).

A result message holds the same fields as ``GET /api/results/{id}`` (the record's ``to_dict``) except
the defects' polygons, the links and ``stored`` (decided later, by the store's writer), plus the
station and line. The state message is the station at one instant: readiness and why not, the
camera, the engine (bundle name and digest), the frame rate and the counters of ``/api/status``.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from engines.bundle import Bundle, manifest_digest
from service.metrics import StatsSnapshot
from service.pipeline.record import InspectionRecord, iso_time


def encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def result_payload(record: InspectionRecord, station: str, line: str | None) -> dict[str, Any]:
    return {"station": station, "line": line, **record.to_dict(with_polygons=False)}


def bundle_digest(bundle: Bundle) -> str:
    """SHA-256 of the running bundle's manifest as loaded (manifest_digest): it covers every graph's sha256,
    so it names the bundle's content; equal to manifest_sha256 when the manifest was not edited by hand."""
    return manifest_digest(json.loads(bundle.manifest.to_json(seal=False)))


def state_payload(snapshot: StatsSnapshot, bundle_sha256: str | None, station: str,
                  line: str | None) -> dict[str, Any]:
    camera, engine, pipeline = snapshot.camera, snapshot.engine, snapshot.pipeline
    return {
        "station": station,
        "line": line,
        "time": iso_time(time.time()),
        "version": snapshot.version,
        "uptime_s": round(snapshot.uptime_s, 1),
        "ready": snapshot.ready,
        "not_ready": list(snapshot.not_ready),
        "camera": {"up": camera.state == "connected", "state": camera.state, "type": camera.type,
                   "fps": camera.fps, "last_error": camera.last_error},
        "engine": {"state": engine.state, "error": engine.error, "bundle": engine.bundle,
                   "bundle_sha256": bundle_sha256, "precision": engine.precision, "backend": engine.backend},
        "pipeline": {"mode": pipeline.mode, "fps": pipeline.fps, "frames_processed": pipeline.frames_processed,
                     "errors": pipeline.errors, "verdicts": dict(pipeline.verdicts),
                     "defects": dict(pipeline.defects), "triggers": dict(pipeline.triggers),
                     "last_inspection_id": pipeline.last_inspection_id},
        "mqtt": {"dropped": sum(snapshot.mqtt.dropped.values()), "reconnects": snapshot.mqtt.reconnects},
    }


def state_signature(state: dict[str, Any]) -> tuple[Any, ...]:
    """What makes a state message due at once when it changes: readiness and its reasons (their running
    numbers left out: 'engine building, 12 s so far' is one reason), the camera's and the engine's state."""
    reasons = tuple(re.sub(r"\d+(\.\d+)?", "#", reason) for reason in state["not_ready"])
    engine = state["engine"]
    return (state["ready"], reasons, state["camera"]["state"], engine["state"], engine["bundle"],
            engine["bundle_sha256"])
