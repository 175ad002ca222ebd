"""The daemon's configuration: one model per domain, nested under ``DaemonConfig``.

Every model forbids unknown keys and every field carries a title and a description: the example
YAML (``defectsam config example``) and docs/service.md are generated from them, so the docs and
the schema cannot drift apart. Validators here are pure: they never read files or open devices
(the bundle is verified when the engine loads, where a failure keeps the daemon up, not ready).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    TypeAdapter,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from engines.backends import BackendConfig
from engines.backends.onnxruntime import Config as OnnxRuntimeConfig
from engines.inspector import InspectionConfig
from engines.postprocess import PostprocessConfig
from service.allowlist import check_entries
from service.capture import CameraConfig


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


_CAMERA = TypeAdapter(CameraConfig)
KEY_ERROR = "key_conflict"


def _blank_is_none(value: Any) -> Any:
    return None if isinstance(value, str) and not value.strip() else value  # not Path(""), the current directory


#: Client allowlists (plc.allowlist, opcua.allowlist): IP addresses or networks.
NetworkList = Annotated[list[str], AfterValidator(check_entries)]

#: An optional file: empty (an unset environment variable's usual form) or null is none.
OptionalFile = Annotated[Path | None, BeforeValidator(_blank_is_none)]


def key_error(key: str, value: Any, message: str) -> PydanticCustomError:
    """A section validator's error about one of its keys: the loader reports it under that key
    ('plc.host'), not under the section. ``message`` must hold no braces (it is a format template)."""
    return PydanticCustomError(KEY_ERROR, message, {"key": key, "value": value})


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or 'localhost' (pure: no name is resolved, so any other name is not loopback)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _default_camera() -> CameraConfig:
    """The synthetic camera with its defaults: the daemon runs out of the box, with no hardware."""
    return _CAMERA.validate_python({"type": "synthetic"})


def _default_type(data: Any, key: str, default: str) -> Any:
    """A union section written without 'type' takes the default member's type (pure: no I/O)."""
    if isinstance(data, dict) and isinstance(data.get(key), dict) and "type" not in data[key]:
        return {**data, key: {"type": default, **data[key]}}
    return data


class EngineSection(Section):
    bundle: Path | None = Field(
        default=None, title="Engine bundle directory",
        description="a bundle directory (manifest.json + graphs); empty or null: the embedded default bundle",
    )
    bundle_store: Path | None = Field(
        default=None, title="Bundle store directory",
        description=(
            "a bundle store (defectsam bundle install/activate/rollback, docs/bundle.md): the daemon runs its "
            "active bundle and switches to another, without a restart, when the pointer moves; set either this "
            "or engine.bundle, not both. Empty or null: no store"
        ),
    )
    backend: BackendConfig = Field(
        default_factory=OnnxRuntimeConfig, title="Inference backend",
        description="which runtime runs the bundle: 'onnxruntime' (CPU, CUDA or TensorRT EP) or 'tensorrt'",
    )
    inspection: InspectionConfig = Field(
        default_factory=InspectionConfig, title="Where the segment pass looks",
        description="inspection mode (windows from the find pass, or tiles for a full scan), window size and count",
    )
    postprocess: PostprocessConfig = Field(
        default_factory=PostprocessConfig, title="Post-processing thresholds",
        description="how class probabilities become defects and a verdict",
    )

    @model_validator(mode="before")
    @classmethod
    def _backend_type(cls, data: Any) -> Any:
        return _default_type(data, "backend", "onnxruntime")

    @field_validator("bundle", "bundle_store", mode="before")
    @classmethod
    def _empty_is_default(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value  # not Path(""), the current directory

    @model_validator(mode="after")
    def _one_source(self) -> EngineSection:
        if self.bundle is not None and self.bundle_store is not None:
            raise key_error("bundle", str(self.bundle), "set either engine.bundle (one directory) or "
                            "engine.bundle_store (the store's active bundle), not both")
        return self


class PipelineSection(Section):
    mode: Literal["free_run", "triggered"] = Field(
        default="free_run", title="Inspection mode",
        description=(
            "free_run: inspect the newest frame whenever the engine is free (older frames are dropped and "
            "counted); triggered: inspect only the first frame captured after each trigger (API, later PLC)"
        ),
    )
    trigger_timeout_s: float = Field(
        default=2.0, gt=0.0, le=60.0, title="Trigger timeout (s)",
        description="a trigger that gets no frame within this time yields a NO_FRAME result (fail safe: reject)",
    )
    max_pending_triggers: int = Field(
        default=16, ge=1, le=1024, title="Pending trigger limit",
        description="triggers waiting for a frame or for the engine; one more is answered NO_FRAME at once",
    )
    subscriber_queue: int = Field(
        default=8, ge=1, le=1024, title="Fan-out queue length",
        description="results buffered per slow consumer (event stream client) before its oldest are dropped",
    )
    overlap_preprocess: Literal["auto", "on", "off"] = Field(
        default="auto", title="Preprocess on its own thread",
        description=(
            "on (auto): frame n+1 is resized on its own thread while frame n is inferred, started just in time "
            "for the engine (from running averages of both stages) so the frame is no older than inline; off: "
            "the inference thread resizes its frame itself, adding the preprocess to every frame's cycle"
        ),
    )
    preprocess_priority: Literal["auto", "idle", "normal"] = Field(
        default="auto", title="Preprocess thread priority",
        description=(
            "idle: the overlapped preprocess runs in Linux's SCHED_IDLE class with OpenCV on one thread, on CPU "
            "time inference leaves idle, so it never stretches an inference step (2-core benchmark: pipeline/"
            "engine 0.78 inline, 0.86-0.94 idle); normal: ordinary priority, OpenCV on all cores; auto: idle for "
            "CPU backends, normal where a GPU runs the engine and the cores are free"
        ),
    )


class ApiSection(Section):
    host: str = Field(
        default="0.0.0.0", min_length=1, title="Listen address",
        description="address the HTTP API, live page and /metrics listen on; 127.0.0.1 keeps it local",
    )
    port: int = Field(default=8080, ge=0, le=65535, title="Listen port", description="TCP port; 0 picks a free one")
    token: SecretStr | None = Field(
        default=None, title="API token",
        description=(
            "bearer token for mutating endpoints (POST /api/trigger), sent as 'Authorization: Bearer <token>'; "
            "null disables every mutating endpoint (403); set it with DEFECTSAM__API__TOKEN rather than in the file"
        ),
    )
    max_body_bytes: int = Field(
        default=16384, ge=256, le=16 * 1024 * 1024, title="Request body limit (bytes)",
        description="larger request bodies are refused with 413 before they are read",
    )
    access_log: bool = Field(default=False, title="Access log", description="log every HTTP request at INFO")
    max_connections: int = Field(
        default=1024, ge=16, le=65536, title="Open connection cap",
        description=(
            "at the cap a new connection evicts the least recently active one with no request in flight, so "
            "idle or slow clients never lock out /healthz, /metrics or the trigger; the open-file limit is "
            "raised to fit it (or the cap lowered, with a warning)"
        ),
    )
    read_timeout_s: float = Field(
        default=10.0, gt=0.0, le=300.0, title="Request read timeout (s)",
        description=(
            "a request (line, headers and body) must arrive whole within this long of connecting or of the "
            "previous response, or the connection is closed (slow-header clients); idle keep-alive connections "
            "close after 5 s"
        ),
    )

    @field_validator("token")
    @classmethod
    def _token_not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value().strip()) < 8:
            raise ValueError("token must be at least 8 characters (or null to disable mutating endpoints)")
        return value


class LiveSection(Section):
    width: int = Field(
        default=960, ge=64, le=4096, title="Live view width (px)",
        description="frames are downscaled to this width before the overlay is drawn and JPEG-encoded",
    )
    jpeg_quality: int = Field(default=70, ge=10, le=100, title="Live view JPEG quality", description="1-100")
    max_fps: float = Field(
        default=10.0, gt=0.0, le=60.0, title="Live view frame-rate cap",
        description="at most this many frames per second are encoded, and only while a viewer is connected",
    )


class StoreSection(Section):
    enabled: bool = Field(default=True, title="Keep records", description="false keeps nothing on disk")
    path: Path = Field(
        default=Path("/var/lib/defectsam/store"), title="Store directory",
        description="SQLite database (WAL) and the frames/masks of kept results; created if missing",
    )
    ok_sample_share: float = Field(
        default=0.01, ge=0.0, le=1.0, title="Share of OK results kept",
        description="every NG, UNCERTAIN and NO_FRAME result is kept; of OK results this share (0.01: 1 in 100)",
    )
    retention_days: float = Field(
        default=30.0, gt=0.0, title="Retention (days)", description="records older than this are deleted",
    )
    disk_budget_mb: float = Field(
        default=2048.0, gt=0.0, title="Disk budget (MB)",
        description="the store's size limit; the oldest records are deleted to stay under it",
    )
    min_free_mb: float = Field(
        default=512.0, ge=0.0, title="Free space to keep (MB)",
        description="oldest records are deleted, then new ones dropped, rather than leave less free on the disk",
    )
    queue_size: int = Field(
        default=64, ge=1, le=10000, title="Writer queue length",
        description="results waiting for the disk writer; when full, new ones are dropped and counted",
    )
    jpeg_quality: int = Field(default=90, ge=10, le=100, title="Stored frame JPEG quality", description="1-100")
    writer_nice: int = Field(
        default=10, ge=0, le=19, title="Writer thread nice increment",
        description=(
            "the writer (JPEG encoding, SQLite) runs this much nicer than the pipeline, on CPU time inference "
            "leaves; when it falls behind, the queue fills and records are dropped and counted. 0: same priority"
        ),
    )
    writer_idle_class: bool = Field(
        default=True, title="Writer in the idle scheduling class",
        description=(
            "Linux: run the writer in SCHED_IDLE, only on CPU time nothing else wants, so it never delays an "
            "inference step (the 2-core benchmark's pipeline FPS rose by about a tenth); false: nice only"
        ),
    )

    @field_validator("path", mode="before")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            raise ValueError("must name a directory (empty would mean the current one; "
                             "store.enabled: false keeps nothing on disk)")
        return value


class LoggingSection(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", title="Log level", description="DEBUG, INFO, WARNING or ERROR",
    )
    json_format: bool = Field(
        default=False, alias="json", title="JSON logs",
        description="one JSON object per line (for journald/Loki) instead of plain text",
    )

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class PlcPushSection(Section):
    enabled: bool = Field(
        default=False, title="Push results to the PLC",
        description="also act as Modbus client: write the status word and result block into the PLC's holding "
                    "registers after every result (status word last)",
    )
    host: str = Field(default="127.0.0.1", min_length=1, title="PLC address", description="the PLC's IP or host")
    port: int = Field(default=502, ge=1, le=65535, title="PLC port", description="the PLC's Modbus TCP port")
    unit_id: int = Field(default=1, ge=0, le=255, title="PLC unit id", description="unit (slave) id sent to the PLC")
    base_address: int = Field(
        default=0, ge=0, le=65535 - 116, title="PLC base address",
        description="zero-based holding register where input register 0 (the status word) lands; input n goes "
                    "to base_address + n",
    )


class PlcSection(Section):
    enabled: bool = Field(
        default=True, title="Modbus TCP server",
        description="serve the PLC register map (docs/plc.md); false runs the daemon without a PLC",
    )
    host: str = Field(
        default="127.0.0.1", min_length=1, title="Listen address",
        description=(
            "address the Modbus TCP server listens on; 127.0.0.1 (the default) keeps it local. Any other address "
            "(0.0.0.0: every interface) needs the PLC's address in plc.allowlist, or plc.allow_any_client: true, "
            "else the daemon refuses to start"
        ),
    )
    port: int = Field(default=502, ge=0, le=65535, title="Listen port",
                      description="Modbus TCP port (502 needs root or CAP_NET_BIND_SERVICE; the demo uses 5020)")
    unit_id: int = Field(
        default=1, ge=0, le=255, title="Unit id",
        description="the unit (slave) id requests must carry; others are answered with exception 0x0B",
    )
    word_order: Literal["big", "little"] = Field(
        default="big", title="32-bit word order",
        description="big: high word first (Modbus convention, Cognex, Keyence); little: low word first",
    )
    heartbeat_timeout_s: float = Field(
        default=0.0, ge=0.0, le=3600.0, title="PLC heartbeat timeout (s)",
        description="the PLC must change holding 1 this often, else error 3 and fail safe; 0 turns the check off",
    )
    allowlist: NetworkList = Field(
        default_factory=list, title="Client allowlist",
        description=(
            "IP addresses or networks (CIDR) allowed to connect, e.g. [10.0.5.20] (the PLC); others are "
            "disconnected at once and counted. Empty: any client, accepted only on a loopback host (or with "
            "allow_any_client)"
        ),
    )
    allow_any_client: bool = Field(
        default=False, title="Accept any client on the network",
        description=(
            "true: with an empty allowlist, accept Modbus clients from anywhere on a non-loopback host. Anyone "
            "who reaches the port can then trigger, switch vision offline and ack results (Modbus has no "
            "authentication): only on an isolated cell network. false: such a config is refused"
        ),
    )
    max_connections: int = Field(
        default=16, ge=1, le=1024, title="Connection cap",
        description="Modbus clients connected at once; one more is disconnected at once, logged and counted",
    )
    idle_timeout_s: float = Field(
        default=120.0, ge=0.0, le=86400.0, title="Idle timeout (s)",
        description=(
            "a connection that sends no request for this long is closed (a PLC that stopped, a half-open "
            "connection left by a PLC restart); 0 keeps silent connections open"
        ),
    )
    top_n: int = Field(default=8, ge=0, le=8, title="Defect records",
                       description="per-defect records written, highest score first (0-8)")
    mask_grid: int = Field(default=16, ge=1, le=16, title="Mask grid size",
                           description="N: the frame is cut into N x N cells, one bit each, one word per row")
    buffer_depth: int = Field(
        default=8, ge=1, le=256, title="Result buffer depth",
        description="with buffer enable set, results wait (up to this many) until acked; more sets buffer overrun",
    )
    intake_queue: int = Field(
        default=64, ge=1, le=4096, title="Intake queue length",
        description="results waiting for the register writer; when full, new ones are dropped and counted",
    )
    push: PlcPushSection = Field(default_factory=PlcPushSection, title="Push mode",
                                 description="write results to a PLC's registers (Modbus client)")

    @model_validator(mode="after")
    def _not_open_to_the_network(self) -> PlcSection:
        """The Modbus port is the line's control plane with no authentication: on a non-loopback address it
        needs an allowlist, or the explicit allow_any_client."""
        if self.enabled and not self.allowlist and not self.allow_any_client and not is_loopback(self.host):
            raise key_error(
                "host", self.host,
                "not a loopback address while plc.allowlist is empty: any host on the network could trigger "
                "inspections, switch vision offline and ack results. Put the PLC's address in plc.allowlist "
                "(e.g. [10.0.5.20]), listen on 127.0.0.1, or set plc.allow_any_client: true to accept any client",
            )
        return self


# ---------------------------------------------------------------------------------------------------- mqtt
# MQTT for MES/SCADA (service/mqtt, docs/mqtt.md). Topic layout, QoS and retain as Frigate has them.
_TOPIC_LEVEL = r"^[A-Za-z0-9_.-]+$"


class MqttTlsSection(Section):
    enabled: bool = Field(
        default=False, title="TLS",
        description="connect to the broker over TLS (its port is then usually 8883); the broker's certificate is "
                    "verified against ca_file, or the system's CAs when ca_file is null",
    )
    ca_file: OptionalFile = Field(
        default=None, title="CA certificates (PEM)",
        description="CA bundle the broker's certificate must chain to; null: the system's trusted CAs",
    )
    cert_file: OptionalFile = Field(
        default=None, title="Client certificate (PEM)",
        description="for brokers that authenticate clients by certificate; needs key_file",
    )
    key_file: OptionalFile = Field(default=None, title="Client key (PEM)", description="the client certificate's key")
    insecure: bool = Field(
        default=False, title="Skip the host name check",
        description="true: accept a broker certificate issued for another name (still signed by the CA); "
                    "only for a test bench",
    )

    @model_validator(mode="after")
    def _cert_and_key(self) -> MqttTlsSection:
        if (self.cert_file is None) != (self.key_file is None):
            given, missing = ("cert_file", "key_file") if self.key_file is None else ("key_file", "cert_file")
            raise key_error(given, str(getattr(self, given)),
                            f"a client certificate needs both cert_file and key_file: set mqtt.tls.{missing} too")
        return self


class MqttSection(Section):
    enabled: bool = Field(
        default=False, title="Publish to an MQTT broker",
        description="results and station state to a broker for MES/SCADA (docs/mqtt.md); needs the mqtt extra "
                    "(pip install 'defectsam[mqtt]')",
    )
    host: str = Field(default="127.0.0.1", min_length=1, title="Broker address",
                      description="the broker's IP address or host name (no scheme: 10.0.5.2, not mqtt://...)")
    port: int = Field(default=1883, ge=1, le=65535, title="Broker port",
                      description="1883 for plain MQTT, 8883 is the usual TLS port")
    client_id: str | None = Field(
        default=None, min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$", title="Client id",
        description="unique per broker (a second client with the same id disconnects the first); null: "
                    "defectsam-<station>",
    )
    topic_prefix: str = Field(
        default="defectsam", min_length=1, max_length=200, title="Topic prefix",
        description="topics are <topic_prefix>/<station>/available, .../state and .../result; may hold "
                    "levels (acme/plant1/line3)",
    )
    station: str | None = Field(
        default=None, min_length=1, max_length=64, pattern=_TOPIC_LEVEL, title="Station name",
        description="one topic level naming this daemon (letters, digits, _ . -); null: the host name",
    )
    line: str | None = Field(
        default=None, min_length=1, max_length=128, title="Line name",
        description="carried in every payload for the MES (not part of the topic); null leaves it out",
    )
    username: str | None = Field(default=None, min_length=1, max_length=256, title="Broker user name",
                                 description="null: connect without credentials")
    password: SecretStr | None = Field(
        default=None, title="Broker password",
        description="set it with DEFECTSAM__MQTT__PASSWORD rather than in the file; shown as '**********'",
    )
    tls: MqttTlsSection = Field(default_factory=MqttTlsSection, title="TLS", description="encryption to the broker")
    qos: int = Field(
        default=1, ge=0, le=2, title="Result QoS",
        description="QoS of result messages: 1 (at least once; a result may arrive twice after a reconnect), "
                    "0 (at most once) or 2 (exactly once); availability and state are always QoS 1",
    )
    keepalive_s: int = Field(
        default=30, ge=5, le=3600, title="Keepalive (s)",
        description="the broker publishes the Last Will ('offline') when it hears nothing for 1.5 times this",
    )
    reconnect_max_s: float = Field(
        default=30.0, ge=1.0, le=600.0, title="Reconnect backoff cap (s)",
        description="after losing the broker, retries start at 1 s and double up to this",
    )
    queue_size: int = Field(
        default=1000, ge=1, le=100000, title="Outgoing queue length",
        description="results waiting for the broker (while it is away); when full the oldest is dropped and "
                    "counted (the record store and GET /api/results keep them)",
    )
    state_interval_s: float = Field(
        default=10.0, ge=1.0, le=3600.0, title="State interval (s)",
        description="the retained state is republished this often (FPS, counters), and at once when readiness, "
                    "the camera or the engine changes",
    )

    @field_validator("host")
    @classmethod
    def _plain_host(cls, value: str) -> str:
        if not value.strip() or any(ch.isspace() for ch in value):
            raise ValueError("must be an IP address or host name, without spaces")
        if "://" in value or "/" in value:
            raise ValueError("must be a bare host name or IP address (the scheme and port are separate keys)")
        return value

    @field_validator("topic_prefix")
    @classmethod
    def _topic_levels(cls, value: str) -> str:
        if any(ch in value for ch in "+#\0") or value.startswith("$"):
            raise ValueError("must not hold the wildcards + or # or NUL, nor start with $ (broker topics)")
        if any(not level or level != level.strip() for level in value.split("/")):
            raise ValueError("levels are separated by single slashes, with no empty level, "
                             "no leading or trailing slash and no blanks around a level")
        return value

    @model_validator(mode="after")
    def _user_with_password(self) -> MqttSection:
        if self.password is not None and self.username is None:
            raise key_error("password", "**********", "a password needs a username: set mqtt.username too")
        return self


# ---------------------------------------------------------------- OPC UA (service/opcua, docs/opcua.md)
OpcuaPolicy = Literal["None", "Basic256Sha256_Sign", "Basic256Sha256_SignAndEncrypt"]


def _no_security() -> list[OpcuaPolicy]:
    return ["None"]


class OpcuaSection(Section):
    enabled: bool = Field(
        default=False, title="OPC UA server",
        description="serve results and state as typed OPC UA nodes for SCADA/MES (docs/opcua.md); needs the "
                    "'opcua' extra (pip install 'defectsam[opcua]')",
    )
    host: str = Field(
        default="127.0.0.1", min_length=1, title="Listen address",
        description=(
            "address the OPC UA server listens on; 127.0.0.1 (the default) keeps it local. Any other address "
            "needs opcua.allowlist or opcua.users (or opcua.allow_any_client: true), else the daemon refuses "
            "to start"
        ),
    )
    port: int = Field(default=4840, ge=1, le=65535, title="Listen port",
                      description="OPC UA TCP port (4840 is the IANA port for opc.tcp)")
    station: str = Field(
        default="station", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$", title="Station name",
        description="the station's folder: Objects/Defectsam/<station> (letters, digits, '_', '.', '-')",
    )
    namespace_uri: str = Field(
        default="urn:defectsam:vision", min_length=1, title="Namespace URI",
        description="the namespace of the station's nodes (its index is looked up by clients from this URI)",
    )
    allowlist: NetworkList = Field(
        default_factory=list, title="Client allowlist",
        description=(
            "IP addresses or networks (CIDR) allowed to connect, e.g. [10.0.5.30] (the SCADA server); others "
            "are disconnected at once and counted. Empty: any client that gets past opcua.users"
        ),
    )
    users: dict[str, SecretStr] = Field(
        default_factory=dict, title="Users",
        description=(
            "user name -> password; when set, a session must log in with one of them (anonymous sessions are "
            "refused); empty: anonymous sessions only. Set it from the environment, e.g. "
            "DEFECTSAM__OPCUA__USERS='{scada: secret}', rather than in the file"
        ),
    )
    allow_any_client: bool = Field(
        default=False, title="Accept any client on the network",
        description=(
            "true: a non-loopback host with neither allowlist nor users accepts anyone who reaches the port "
            "(they can trigger and write the command word): only on an isolated cell network"
        ),
    )
    security_policies: list[OpcuaPolicy] = Field(
        default_factory=_no_security, min_length=1, title="Security policies",
        description=(
            "endpoints offered: None (no signing or encryption: loopback or an isolated cell network), "
            "Basic256Sha256_Sign, Basic256Sha256_SignAndEncrypt (both need opcua.certificate and "
            "opcua.private_key)"
        ),
    )
    certificate: OptionalFile = Field(
        default=None, title="Server certificate",
        description="the server's X.509 certificate (DER or PEM) for the Basic256Sha256 policies",
    )
    private_key: OptionalFile = Field(
        default=None, title="Server private key",
        description="the certificate's private key (PEM), readable by the daemon's user only",
    )
    top_n: int = Field(default=8, ge=0, le=32, title="Defect nodes",
                       description="defects published under LastResult/Defects (highest score first)")
    queue: int = Field(
        default=16, ge=1, le=1024, title="Handoff length",
        description="results waiting for the OPC UA writer; when full the oldest is dropped and counted",
    )

    @field_validator("users")
    @classmethod
    def _passwords(cls, value: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for name, password in value.items():
            if not name.strip():
                raise ValueError("a user name is empty")
            if len(password.get_secret_value()) < 8:
                raise ValueError(f"the password of {name!r} must be at least 8 characters")
        return value

    @model_validator(mode="after")
    def _secure_enough(self) -> OpcuaSection:
        signed = [p for p in self.security_policies if p != "None"]
        if signed and self.certificate is None:
            raise key_error("certificate", None, f"{signed[0]} needs a server certificate (opcua.certificate and "
                                                 "opcua.private_key), or use security_policies: [None]")
        if signed and self.private_key is None:
            raise key_error("private_key", None, f"{signed[0]} needs the certificate's private key")
        if (self.enabled and not self.allowlist and not self.users and not self.allow_any_client
                and not is_loopback(self.host)):
            raise key_error(
                "host", self.host,
                "not a loopback address while opcua.allowlist and opcua.users are empty: any host on the network "
                "could trigger inspections and write the command word. Put the SCADA server's address in "
                "opcua.allowlist, set opcua.users, listen on 127.0.0.1, or set opcua.allow_any_client: true",
            )
        return self


# ---------------------------------------------------------------- recipes (issue 17; service/recipes.py)
class RecipeEntry(Section):
    """One recipe: the bundle it runs and the thresholds it runs it with."""

    bundle: str = Field(
        min_length=1, title="Bundle",
        description="an installed bundle in engine.bundle_store: its name, its hash (4+ hex digits) or name-hash "
                    "as 'defectsam bundle list' shows it",
    )
    score_threshold: float | None = Field(
        default=None, ge=0.0, le=1.0, title="Defect score threshold",
        description="overrides engine.postprocess.score_threshold for this recipe (unset: that one, else the "
                    "bundle's calibrated value)",
    )
    uncertain_threshold: float | None = Field(
        default=None, ge=0.0, le=1.0, title="Uncertain score threshold",
        description="overrides engine.postprocess.uncertain_threshold for this recipe",
    )
    candidate_threshold: float | None = Field(
        default=None, ge=0.0, le=1.0, title="Find-pass candidate threshold",
        description="overrides engine.inspection.candidate_threshold for this recipe",
    )

    @model_validator(mode="after")
    def _ordered(self) -> RecipeEntry:
        if (self.score_threshold is not None and self.uncertain_threshold is not None
                and self.uncertain_threshold > self.score_threshold):
            raise key_error("uncertain_threshold", self.uncertain_threshold,
                            "must not exceed this recipe's score_threshold")
        return self


class DaemonConfig(Section):
    """Everything ``defectsam serve`` reads at start-up."""

    camera: CameraConfig = Field(
        default_factory=_default_camera, title="Camera",
        description="the frame source, chosen by 'type'; the default is the synthetic panel generator",
    )
    engine: EngineSection = Field(default_factory=EngineSection, title="Engine", description="bundle and backend")
    pipeline: PipelineSection = Field(
        default_factory=PipelineSection, title="Pipeline", description="how frames are chosen for inspection",
    )
    api: ApiSection = Field(default_factory=ApiSection, title="HTTP API", description="API, live page, /metrics")
    live: LiveSection = Field(
        default_factory=LiveSection, title="Live view", description="the MJPEG stream of the live page",
    )
    store: StoreSection = Field(default_factory=StoreSection, title="Record store", description="kept results")
    logging: LoggingSection = Field(default_factory=LoggingSection, title="Logging", description="log level, format")
    plc: PlcSection = Field(default_factory=PlcSection, title="PLC interface",
                            description="Modbus TCP server with the vision register map (docs/plc.md)")
    mqtt: MqttSection = Field(default_factory=MqttSection, title="MQTT",
                              description="results and station state to an MQTT broker for MES/SCADA (docs/mqtt.md)")
    opcua: OpcuaSection = Field(default_factory=OpcuaSection, title="OPC UA server",
                                description="typed nodes for SCADA/MES, off by default (docs/opcua.md)")
    recipes: dict[int, RecipeEntry] = Field(
        default_factory=dict, title="Recipes",
        description=(
            "recipe number (1-65535, the PLC's recipe word, holding 4) -> the bundle in engine.bundle_store and "
            "thresholds it selects (docs/plc.md, Recipes); empty: recipe words are refused with error 5"
        ),
    )

    @field_validator("recipes")
    @classmethod
    def _recipe_numbers(cls, value: dict[int, RecipeEntry]) -> dict[int, RecipeEntry]:
        for number in value:
            if not 1 <= number <= 0xFFFF:
                raise ValueError(f"recipe number {number} is outside 1-65535 (0 means no recipe)")
        return value

    @model_validator(mode="after")
    def _recipes_need_a_store(self) -> DaemonConfig:
        if self.recipes and self.engine.bundle_store is None:
            raise key_error("recipes", sorted(self.recipes), "recipes name bundles in a store: set "
                            "engine.bundle_store (docs/bundle.md)")
        return self

    @model_validator(mode="before")
    @classmethod
    def _camera_type(cls, data: Any) -> Any:
        return _default_type(data, "camera", "synthetic")
