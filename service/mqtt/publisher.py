"""The MQTT publisher: results and station state to a broker with paho-mqtt, never in the pipeline's way.

::

    pipeline publishing thread --offer()--> bounded queue (full: the oldest dropped, counted)
        --> sender thread ("mqtt-sender") --publish()--> paho client --> broker
    paho's network thread ("paho-mqtt-client-..."): connect, keepalive, reconnect with backoff
        (1 s doubling up to mqtt.reconnect_max_s), resend of unacknowledged QoS 1/2 messages
    sender thread, once a second: the station state, published (retained) when it changed, else every
        mqtt.state_interval_s

``offer`` takes a lock for an append and returns: no I/O, no encoding, no wait on the broker; the record
is queued without its frame. Only the sender thread calls ``publish``, and only while connected; paho
holds at most ``_PAHO_QUEUE`` unacknowledged messages, the rest wait in the bounded queue. The broker
going away changes nothing for the pipeline, the PLC or readiness: results queue (the oldest dropped
and counted once the queue is full) until paho reconnects, then ``available`` goes back to ``online``,
the state is republished and the queue drains.

Availability (Frigate's pattern): the Last Will, registered with every connect, has the broker set
``available`` to ``offline`` (retained) when the daemon vanishes; a clean stop publishes the final
state and ``offline`` itself, then disconnects.
"""

from __future__ import annotations

import collections
import logging
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

from engines.errors import DefectsamError
from service.config.models import MqttSection
from service.mqtt.payloads import encode, result_payload, state_signature
from service.mqtt.stats import DROP_REASONS, KINDS, MqttSnapshot
from service.mqtt.topics import AVAILABLE, RESULT, STATE, Topics, TopicSpec, station_name
from service.pipeline.record import InspectionRecord

log = logging.getLogger(__name__)

_TICK_S = 1.0  # how often the sender looks at the station state
_PAHO_QUEUE = 64  # messages paho may hold unacknowledged (its in-flight window is 20)
_FLUSH_S = 2.0  # at stop: how long queued results may take to go out
_CONNECT_TIMEOUT_S = 5.0

StateSource = Callable[[], dict[str, Any]]


def _paho() -> Any:
    """paho.mqtt.client, or one line saying what to install."""
    try:
        import paho.mqtt.client as mqtt
    except ImportError:
        raise DefectsamError(
            "mqtt.enabled is true but paho-mqtt is not installed: pip install 'defectsam[mqtt]' "
            "(or set mqtt.enabled: false)"
        ) from None
    return mqtt


class MqttPublisher:
    """``offer`` is the pipeline subscriber (returns at once); ``state`` gives the station state as JSON-able
    data (service.mqtt.payloads.state_payload), called on the sender thread."""

    def __init__(self, config: MqttSection, *, state: StateSource) -> None:
        self._mqtt = _paho()
        self.config = config
        self.station = station_name(config)
        self.topics = Topics.of(config)
        self.client_id = config.client_id or f"defectsam-{self.station}"
        self._state_source = state
        self._cond = threading.Condition()
        self._queue: collections.deque[InspectionRecord] = collections.deque()
        self._connected = False
        self._announce = False  # set by each connect: available + state first
        self._stopping = False
        self._ever_connected = False
        self._outage_logged = False
        self._published = dict.fromkeys(KINDS, 0)
        self._dropped = dict.fromkeys(DROP_REASONS, 0)
        self._reconnects = 0
        self._disconnects = 0
        self._last_error: str | None = None
        self._pending: list[tuple[Any, str]] = []  # (paho MQTTMessageInfo, kind), sender thread only
        self._thread: threading.Thread | None = None
        self._client = self._make_client()

    # ------------------------------------------------------------------ set-up
    def _make_client(self) -> Any:
        mqtt, config = self._mqtt, self.config
        client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=mqtt.MQTTv311, clean_session=True)
        client.will_set(self.topics(AVAILABLE), b"offline", qos=1, retain=True)
        client.reconnect_delay_set(min_delay=1, max_delay=max(1, round(config.reconnect_max_s)))
        client.max_queued_messages_set(_PAHO_QUEUE)
        client.connect_timeout = _CONNECT_TIMEOUT_S
        if config.username is not None:
            password = config.password.get_secret_value() if config.password is not None else None
            client.username_pw_set(config.username, password)
        if config.tls.enabled:
            self._set_tls(client)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        return client

    def _set_tls(self, client: Any) -> None:
        tls = self.config.tls
        for key, path in (("ca_file", tls.ca_file), ("cert_file", tls.cert_file), ("key_file", tls.key_file)):
            if path is not None and not path.is_file():
                raise DefectsamError(f"mqtt.tls.{key} {path}: no such file")
        try:
            client.tls_set(ca_certs=str(tls.ca_file) if tls.ca_file else None,
                           certfile=str(tls.cert_file) if tls.cert_file else None,
                           keyfile=str(tls.key_file) if tls.key_file else None,
                           cert_reqs=ssl.CERT_REQUIRED)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise DefectsamError(f"mqtt.tls: the certificate files cannot be used: {exc}") from None
        client.tls_insecure_set(tls.insecure)

    # ------------------------------------------------------------------ lifecycle (daemon thread)
    def start(self) -> None:
        """Connect in the background: a broker that is down or unreachable now is retried with backoff,
        and start-up goes on."""
        config = self.config
        self._client.connect_async(config.host, config.port, keepalive=config.keepalive_s)
        self._client.loop_start()
        self._thread = threading.Thread(target=self._run, name="mqtt-sender", daemon=True)
        self._thread.start()
        log.info("mqtt: publishing to %s:%d%s as %s under %s/ (available, state, result; docs/mqtt.md)",
                 config.host, config.port, " (TLS)" if config.tls.enabled else "", self.client_id, self.topics.base)

    def stop(self) -> None:
        """Send what is queued (for up to 2 s while connected), the final state and ``offline``; disconnect."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(_FLUSH_S + 5.0)
        self._client.disconnect()
        self._client.loop_stop()

    # ------------------------------------------------------------------ the pipeline side
    def offer(self, record: InspectionRecord) -> None:
        """Queue a result (without its frame); when the queue is full its oldest result is dropped."""
        item = record.without_frame()
        with self._cond:
            if len(self._queue) >= self.config.queue_size:
                self._queue.popleft()
                self._dropped["queue_full"] += 1
                first = self._dropped["queue_full"] == 1
            else:
                first = False
            self._queue.append(item)
            self._cond.notify_all()
        if first:
            log.warning("mqtt: the outgoing queue is full (%d results; the broker is away or slow): the oldest "
                        "results are dropped and counted (defectsam_mqtt_messages_dropped_total)",
                        self.config.queue_size)

    # ------------------------------------------------------------------ paho callbacks (its network thread)
    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            self._last_error = f"the broker refused the connection: {reason}"
            log.error("mqtt: %s:%d refused the connection: %s%s", self.config.host, self.config.port, reason,
                      " (check mqtt.username / mqtt.password)" if "auth" in str(reason).lower()
                      or "password" in str(reason).lower() else "")
            return
        with self._cond:
            if self._ever_connected:
                self._reconnects += 1
            self._ever_connected = True
            self._connected = True
            self._announce = True
            self._outage_logged = False
            self._cond.notify_all()
        log.info("mqtt: connected to %s:%d", self.config.host, self.config.port)

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        with self._cond:
            was_connected, self._connected = self._connected, False
            if was_connected:
                self._disconnects += 1
        if was_connected and not self._stopping:
            self._last_error = f"connection lost: {reason}"
            log.warning("mqtt: lost the broker %s:%d (%s); results wait in the queue (up to %d) while it "
                        "reconnects (backoff up to %g s)", self.config.host, self.config.port, reason,
                        self.config.queue_size, self.config.reconnect_max_s)

    def _on_connect_fail(self, client: Any, userdata: Any) -> None:
        self._last_error = f"cannot connect to {self.config.host}:{self.config.port}"
        if not self._outage_logged:
            self._outage_logged = True
            log.warning("mqtt: cannot connect to %s:%d; retrying with backoff up to %g s (inspection goes on)",
                        self.config.host, self.config.port, self.config.reconnect_max_s)

    # ------------------------------------------------------------------ the sender thread
    def _run(self) -> None:
        last_state_at = float("-inf")
        last_signature: tuple[Any, ...] | None = None
        next_tick = time.monotonic()
        while True:
            with self._cond:
                self._cond.wait_for(
                    lambda: self._stopping or (self._connected and (self._announce or bool(self._queue))),
                    timeout=max(0.0, next_tick - time.monotonic()))
                if self._stopping:
                    break
                connected, announce = self._connected, self._announce
                self._announce = False
            self._settle()
            if not connected:
                next_tick = time.monotonic() + _TICK_S
                continue
            if announce:
                self._send(AVAILABLE, b"online")
                last_signature = None  # the state goes out too
            now = time.monotonic()
            if announce or now >= next_tick:
                next_tick = now + _TICK_S
                state = self._state()
                signature = state_signature(state)
                due = signature != last_signature or now - last_state_at >= self.config.state_interval_s
                if due and self._send(STATE, encode(state)):
                    last_state_at, last_signature = now, signature
            self._send_results(limit=100)
        self._finish()

    def _state(self) -> dict[str, Any]:
        return self._state_source()

    def _send_results(self, limit: int) -> None:
        for _ in range(limit):
            with self._cond:
                if not self._queue or not self._connected:
                    return
                record = self._queue.popleft()
            payload = encode(result_payload(record, self.station, self.config.line))
            if not self._send(RESULT, payload):
                with self._cond:  # paho holds enough: back to the front, to go once it has room
                    if len(self._queue) < self.config.queue_size:
                        self._queue.appendleft(record)
                    else:
                        self._dropped["queue_full"] += 1
                    self._cond.wait(0.05)
                return

    def _send(self, spec: TopicSpec, payload: bytes) -> bool:
        """Hand one message to paho. False when paho did not take it (its queue is full, or not connected
        for QoS 0): the caller keeps it. QoS 1/2 messages paho took are sent again after a reconnect."""
        mqtt = self._mqtt
        qos = self.config.qos if spec.qos is None else spec.qos
        try:
            info = self._client.publish(self.topics(spec), payload, qos=qos, retain=spec.retain)
        except (ValueError, RuntimeError) as exc:
            log.error("mqtt: cannot publish to %s: %s", self.topics(spec), exc)
            if spec is RESULT:
                with self._cond:
                    self._dropped["error"] += 1
            return True
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE or (info.rc == mqtt.MQTT_ERR_NO_CONN and qos == 0):
            return False
        if qos == 0:
            with self._cond:
                self._published[spec.name] += 1
        else:
            self._pending.append((info, spec.name))
        return True

    def _settle(self) -> None:
        """Count the messages the broker acknowledged since the last look."""
        if not self._pending:
            return
        done = [kind for info, kind in self._pending if info.is_published()]
        if done:
            self._pending = [(info, kind) for info, kind in self._pending if not info.is_published()]
            with self._cond:
                for kind in done:
                    self._published[kind] += 1

    def _finish(self) -> None:
        """At stop (the pipeline has stopped): the queued results for up to _FLUSH_S, the final state, offline."""
        deadline = time.monotonic() + _FLUSH_S
        while self._connected and self._queue and time.monotonic() < deadline:
            self._send_results(limit=100)
            self._settle()
        if self._connected:
            self._send(STATE, encode(self._state()))
            self._send(AVAILABLE, b"offline")
            while self._pending and self._connected and time.monotonic() < deadline + 1.0:
                self._settle()
                time.sleep(0.01)
        self._settle()
        with self._cond:
            left = len(self._queue) + sum(1 for _, kind in self._pending if kind == RESULT.name)
            self._queue.clear()
            self._dropped["shutdown"] += left
        if left:
            log.warning("mqtt: %d result(s) not delivered at stop (broker away or slow)", left)

    # ------------------------------------------------------------------ stats (any thread)
    def stats(self) -> MqttSnapshot:
        with self._cond:
            return MqttSnapshot(
                enabled=True, broker=f"{self.config.host}:{self.config.port}", topic_base=self.topics.base,
                connected=self._connected, published=dict(self._published), dropped=dict(self._dropped),
                reconnects=self._reconnects, disconnects=self._disconnects, queue_depth=len(self._queue),
                queue_size=self.config.queue_size, in_flight=len(self._pending), last_error=self._last_error,
            )
