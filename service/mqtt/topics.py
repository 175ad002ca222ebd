"""The topic layout, as Frigate has it: one availability topic with a Last Will, retained state, results
as events (not retained). docs/mqtt.md has the table; ``TOPICS`` is that table.

::

    <prefix>/<station>/available   online | offline    retained  QoS 1         Last Will: offline
    <prefix>/<station>/state       JSON station state  retained  QoS 1         connect, change, state_interval_s
    <prefix>/<station>/result      JSON one result     no        mqtt.qos (1)  every published result
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass

from service.config.models import MqttSection


@dataclass(frozen=True)
class TopicSpec:
    """One topic: its last level, whether the broker retains it, its QoS (None: mqtt.qos) and when it is sent."""

    name: str
    retain: bool
    qos: int | None
    payload: str
    when: str


AVAILABLE = TopicSpec("available", True, 1, "`online` / `offline`",
                      "`online` on every connect; `offline` on a clean stop, or by the broker (Last Will) when the "
                      "daemon vanishes")
STATE = TopicSpec("state", True, 1, "JSON: readiness, camera, engine, FPS, counters",
                  "on every connect, at once when readiness, the camera or the engine changes, else every "
                  "`mqtt.state_interval_s`")
RESULT = TopicSpec("result", False, None, "JSON: one inspection result", "every result the pipeline publishes")
TOPICS = (AVAILABLE, STATE, RESULT)


def station_name(config: MqttSection) -> str:
    """``mqtt.station``, or this host's name made one topic level (letters, digits, _ . -)."""
    if config.station is not None:
        return config.station
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", socket.gethostname()).strip("-") or "station"


@dataclass(frozen=True)
class Topics:
    """The full topic names for one station."""

    base: str  # <topic_prefix>/<station>

    @classmethod
    def of(cls, config: MqttSection) -> Topics:
        return cls(f"{config.topic_prefix}/{station_name(config)}")

    def __call__(self, spec: TopicSpec) -> str:
        return f"{self.base}/{spec.name}"
