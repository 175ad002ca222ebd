"""The MQTT publisher in the stats snapshot (/api/status ``mqtt``) and in /metrics (``defectsam_mqtt_*``)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from pydantic import BaseModel, ConfigDict, Field

KINDS = ("available", "state", "result")
DROP_REASONS = ("queue_full", "shutdown", "error")


class MqttSnapshot(BaseModel):
    """The MQTT publisher (docs/mqtt.md); all zero when mqtt.enabled is false."""

    model_config = ConfigDict(frozen=True)

    enabled: bool = False
    broker: str | None = Field(default=None, description="host:port")
    topic_base: str | None = Field(default=None, description="<topic_prefix>/<station>")
    connected: bool = Field(default=False, description="connected to the broker now")
    published: dict[str, int] = Field(
        default_factory=lambda: dict.fromkeys(KINDS, 0),
        description="messages the broker acknowledged (QoS 1/2) or that were sent (QoS 0), per topic",
    )
    dropped: dict[str, int] = Field(
        default_factory=lambda: dict.fromkeys(DROP_REASONS, 0),
        description="results never handed to the broker: queue_full (the oldest, while the broker was away), "
                    "shutdown (unsent at stop), error (refused by the client library)",
    )
    reconnects: int = Field(default=0, description="connections made again after the first")
    disconnects: int = Field(default=0, description="connections lost")
    queue_depth: int = Field(default=0, description="results waiting to be handed to the broker")
    queue_size: int = 0
    in_flight: int = Field(default=0, description="messages handed over, not yet acknowledged")
    last_error: str | None = Field(default=None, description="the last connection problem")


def mqtt_metrics(mqtt: MqttSnapshot, namespace: str) -> Iterator[Metric]:
    n = f"{namespace}_mqtt"
    yield GaugeMetricFamily(f"{n}_enabled", "1 when results are published to an MQTT broker", value=int(mqtt.enabled))
    yield GaugeMetricFamily(f"{n}_connected", "1 while connected to the MQTT broker", value=int(mqtt.connected))
    published = CounterMetricFamily(f"{n}_messages_published", "MQTT messages the broker acknowledged, per topic",
                                    labels=["topic"])
    for kind in KINDS:
        published.add_metric([kind], mqtt.published.get(kind, 0))
    yield published
    dropped = CounterMetricFamily(f"{n}_messages_dropped", "MQTT result messages never handed to the broker",
                                  labels=["reason"])
    for reason in DROP_REASONS:
        dropped.add_metric([reason], mqtt.dropped.get(reason, 0))
    yield dropped
    yield CounterMetricFamily(f"{n}_reconnects", "MQTT connections made again after the first",
                              value=mqtt.reconnects)
    yield CounterMetricFamily(f"{n}_disconnects", "MQTT broker connections lost", value=mqtt.disconnects)
    yield GaugeMetricFamily(f"{n}_queue_depth", "MQTT results waiting for the broker", value=mqtt.queue_depth)
