"""The OPC UA server (docs/opcua.md): asyncua's client against a real daemon on a free loopback port.

One daemon for the module (triggered mode, the always-NG tiny bundle, the PLC on a free port so the
command word has its Modbus path, a user with a password): browse the tree, read typed values that
match /api for the same result, trigger through OPC UA, refused sessions and writes, the allowlist,
config errors naming the key, and the missing-extra line.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from engines.errors import DefectsamError
from service.config.loader import ConfigError, load_config
from service.config.models import OpcuaSection

from .conftest import REPO
from .daemon_support import base_url, free_port, get_json, http, make_config, ng_bundle, running_daemon, wait_for

pytest.importorskip("asyncua", reason="the OPC UA tests need the 'opcua' extra (asyncua)")
from asyncua import Client, ua

pytestmark = pytest.mark.slow

USER, PASSWORD = "scada", "line4-secret"
URI = "urn:defectsam:vision"


@pytest.fixture(scope="module")
def daemon(tiny_bundle_master: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    bundle = ng_bundle(tiny_bundle_master, tmp_path_factory.getbasetemp())
    config = make_config(
        tmp_path_factory.mktemp("opcua"), bundle,
        pipeline={"mode": "triggered"},
        plc={"enabled": True, "host": "127.0.0.1", "port": free_port()},
        opcua={"enabled": True, "port": free_port(), "station": "line4", "top_n": 2, "allowlist": ["127.0.0.0/8"],
               "users": {USER: PASSWORD}},
    )
    with running_daemon(config) as running:
        wait_for(lambda: not running.not_ready(), what="a ready daemon")
        yield running


def endpoint(daemon: Any) -> str:
    return f"opc.tcp://127.0.0.1:{daemon.opcua.port}/defectsam/"


def client(daemon: Any, user: str | None = USER, password: str | None = PASSWORD) -> Client:
    c = Client(endpoint(daemon), timeout=10)
    if user is not None:
        c.set_user(user)
    if password is not None:
        c.set_password(password)
    return c


def node(c: Client, idx: int, path: str) -> Any:
    return c.get_node(f"ns={idx};s=line4.{path.replace('/', '.')}")


async def wait_value(c: Client, idx: int, path: str, want: Any, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while (value := await node(c, idx, path).read_value()) != want:
        assert asyncio.get_running_loop().time() < deadline, f"{path} stayed {value!r}, expected {want!r}"
        await asyncio.sleep(0.05)


async def trigger_and_wait(c: Client, idx: int, part: str) -> int:
    """Trigger through OPC UA; returns the trigger id once LastResult answers it."""
    await wait_value(c, idx, "State/TriggerReady", True)
    station = c.get_node(f"ns={idx};s=line4")
    trigger_id = await station.call_method(f"{idx}:Trigger", ua.Variant(part, ua.VariantType.String))
    await wait_value(c, idx, "LastResult/TriggerId", trigger_id)
    return int(trigger_id)


def test_browse_trigger_and_read_a_result_that_matches_the_api(daemon: Any) -> None:
    async def scenario() -> tuple[dict[str, Any], list[ua.DataValue], int]:
        async with client(daemon) as c:
            idx = await c.get_namespace_index(URI)
            assert idx == 2  # as docs/opcua.md's uals/uaread examples have it
            station = await c.nodes.objects.get_child([f"{idx}:Defectsam", f"{idx}:line4"])
            names = {(await n.read_browse_name()).Name for n in await station.get_children()}
            assert {"State", "LastResult", "Counters", "Command", "Trigger"} <= names
            result = await station.get_child(f"{idx}:LastResult")
            fields = {(await n.read_browse_name()).Name for n in await result.get_children()}
            assert {"ResultSeq", "Verdict", "PartId", "DefectCount", "Defects", "Timings", "Json"} <= fields
            types = {path: await node(c, idx, path).read_data_type_as_variant_type()
                     for path in ("State/Ready", "State/ErrorCode", "LastResult/ResultSeq", "LastResult/InspectionId",
                                  "LastResult/CapturedAt", "LastResult/Verdict", "LastResult/MaxPeakScore",
                                  "LastResult/Defects/Defect0/Score", "LastResult/Defects/Defect0/AreaPx")}
            assert types == {
                "State/Ready": ua.VariantType.Boolean, "State/ErrorCode": ua.VariantType.UInt16,
                "LastResult/ResultSeq": ua.VariantType.UInt32, "LastResult/InspectionId": ua.VariantType.UInt64,
                "LastResult/CapturedAt": ua.VariantType.DateTime, "LastResult/Verdict": ua.VariantType.String,
                "LastResult/MaxPeakScore": ua.VariantType.Double,
                "LastResult/Defects/Defect0/Score": ua.VariantType.Double,
                "LastResult/Defects/Defect0/AreaPx": ua.VariantType.UInt32,
            }
            seq_before = await node(c, idx, "LastResult/ResultSeq").read_value()
            trigger_id = await trigger_and_wait(c, idx, "PART-42")
            paths = ["LastResult/InspectionId", "LastResult/PartId", "LastResult/Verdict", "LastResult/VerdictCode",
                     "LastResult/DefectCount", "LastResult/MaxPeakScore", "LastResult/FrameWidth",
                     "LastResult/Defects/Defect0/Score", "LastResult/Defects/Defect0/BboxX",
                     "LastResult/Defects/Defect0/AreaPx", "LastResult/Defects/Defect0/Class",
                     "LastResult/Timings/EndToEndMs", "LastResult/CapturedAt", "LastResult/Json",
                     "LastResult/ResultSeq"]
            values = await c.read_attributes([node(c, idx, p) for p in paths], ua.AttributeIds.Value)
            assert values[-1].Value.Value > seq_before
            return dict(zip(paths, [v.Value.Value for v in values], strict=True)), values, trigger_id

    got, values, trigger_id = asyncio.run(scenario())
    status, api = get_json(f"{base_url(daemon)}/api/results/{got['LastResult/InspectionId']}")
    assert status == 200 and api["trigger_id"] == trigger_id and api["part_id"] == "PART-42"
    defect = api["defects"][0]
    assert got == {**got, "LastResult/PartId": "PART-42", "LastResult/Verdict": api["verdict"],
                   "LastResult/VerdictCode": 2, "LastResult/DefectCount": api["defect_count"],
                   "LastResult/MaxPeakScore": api["max_peak_score"], "LastResult/FrameWidth": api["frame"]["width"],
                   "LastResult/Defects/Defect0/Score": defect["score"],
                   "LastResult/Defects/Defect0/BboxX": defect["bbox"][0],
                   "LastResult/Defects/Defect0/AreaPx": defect["area_px"],
                   "LastResult/Defects/Defect0/Class": defect["class"],
                   "LastResult/Timings/EndToEndMs": api["latency_ms"]["end_to_end"]}
    assert api["verdict"] == "NG" and api["defect_count"] >= 1
    captured = datetime.fromtimestamp(api["wall_time"], timezone.utc)
    assert abs((got["LastResult/CapturedAt"].replace(tzinfo=timezone.utc) - captured).total_seconds()) < 1e-3
    structured = json.loads(got["LastResult/Json"])
    assert {k: structured[k] for k in ("id", "verdict", "defects", "latency_ms")} == {
        "id": api["id"], "verdict": api["verdict"], "latency_ms": api["latency_ms"],
        "defects": [{k: v for k, v in d.items() if k != "polygon"} for d in api["defects"]]}
    # One result, one source timestamp: every value of LastResult carries the capture time.
    stamps = {v.SourceTimestamp for v in values}
    assert len(stamps) == 1 and abs((stamps.pop().replace(tzinfo=timezone.utc) - captured).total_seconds()) < 1e-3


def test_refused_sessions_bad_writes_and_the_command_word(daemon: Any) -> None:
    async def refused(user: str | None, password: str | None) -> ua.UaStatusCodeError:
        with pytest.raises(ua.UaStatusCodeError) as caught:
            async with client(daemon, user, password):
                pass
        return caught.value

    async def scenario() -> dict[str, Any]:
        wrong = await refused(USER, "not-the-password")
        anonymous = await refused(None, None)
        async with client(daemon) as c:
            idx = await c.get_namespace_index(URI)
            command = node(c, idx, "Command")
            with pytest.raises(ua.UaStatusCodeError) as bad_type:
                await command.write_value(ua.DataValue(ua.Variant(70000, ua.VariantType.Int32)))
            with pytest.raises(ua.UaStatusCodeError) as read_only:
                await node(c, idx, "LastResult/Verdict").write_value(ua.DataValue(ua.Variant("OK")))
            station = c.get_node(f"ns={idx};s=line4")
            with pytest.raises(ua.UaStatusCodeError) as bad_part:
                await station.call_method(f"{idx}:Trigger", ua.Variant("bad\npart", ua.VariantType.String))
            # no recipes are configured: recipe 7 is unknown, as a PLC's write of it would be (error 5)
            await command.write_value(ua.DataValue(ua.Variant(7, ua.VariantType.UInt16)))
            await wait_value(c, idx, "State/ErrorCode", 5)
            echo = await node(c, idx, "State/CommandEcho").read_value()
            after = await trigger_and_wait(c, idx, "PART-43")  # still inspecting
            verdict = await node(c, idx, "LastResult/Verdict").read_value()
            refused_count = await node(c, idx, "Counters/WritesRefused").read_value()
        return {"wrong": wrong.code, "anonymous": anonymous.code, "bad_type": bad_type.value.code,
                "read_only": read_only.value.code, "bad_part": bad_part.value.code, "after": after,
                "verdict": verdict, "writes_refused": refused_count, "echo": echo}

    got = asyncio.run(scenario())
    assert got["wrong"] == ua.StatusCodes.BadUserAccessDenied  # the user manager said no
    assert got["anonymous"] == ua.StatusCodes.BadIdentityTokenRejected  # not offered once users are set
    assert got["bad_type"] == ua.StatusCodes.BadTypeMismatch
    assert got["read_only"] == ua.StatusCodes.BadUserAccessDenied
    assert got["bad_part"] == ua.StatusCodes.BadOutOfRange
    assert got["after"] > 0 and got["verdict"] == "NG" and got["writes_refused"] >= 2
    assert got["echo"] == 0  # no recipe is running
    # The command word went through the Modbus write path: the PLC's error code (input 2) says 5,
    # unknown recipe, and its command echo (input 4) still 0.
    from pymodbus.client import ModbusTcpClient

    plc = ModbusTcpClient("127.0.0.1", port=daemon.plc.port, timeout=3, retries=0)
    assert plc.connect()
    try:
        words = plc.read_input_registers(2, count=3, device_id=1).registers
        assert (words[0], words[2]) == (5, 0)  # inputs 2 (error code) and 4 (command echo)
    finally:
        plc.close()
    _, _, metrics = http("GET", f"{base_url(daemon)}/metrics")
    text = metrics.decode()
    for line in ("defectsam_opcua_enabled 1.0", "defectsam_opcua_logins_refused_total 1.0"):
        assert line in text, line
    _, body = get_json(f"{base_url(daemon)}/api/status")
    assert body["opcua"]["writes_refused"] >= 2 and body["opcua"]["triggers_taken"] >= 1
    assert body["opcua"]["triggers_refused"] >= 1


def test_a_client_outside_the_allowlist_is_disconnected() -> None:
    from service.opcua.service import OpcuaService
    from service.opcua.station import LineState, Station

    station = Station(mode="triggered", trigger_timeout_s=1.0, trigger=lambda part: None,
                      state=lambda: LineState(True, True, (), "none"), write_command=None)
    service = OpcuaService(OpcuaSection(enabled=True, port=free_port(), allowlist=["192.0.2.10"]), station)
    service.start()
    try:
        async def connect() -> None:
            async with Client(f"opc.tcp://127.0.0.1:{service.port}/defectsam/", timeout=5):
                pass

        with pytest.raises((OSError, asyncio.TimeoutError, ua.UaError, ConnectionError)):
            asyncio.run(connect())
        assert service.stats.connections_refused >= 1 and service.stats.connections_total == 0
    finally:
        service.stop()


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    cases = {
        "opcua:\n  port: 70000\n": "key 'opcua.port' = 70000",
        "opcua:\n  allowlist: [10.0.5.30, scada-host]\n": "'scada-host' is not an IP address or network",
        "opcua:\n  enabled: true\n  host: 0.0.0.0\n": "key 'opcua.host' = '0.0.0.0'",
        "opcua:\n  security_policies: [Basic256Sha256_SignAndEncrypt]\n": "key 'opcua.certificate'",
        "opcua:\n  users: {scada: short}\n": "key 'opcua.users'",
    }
    for text, expected in cases.items():
        path = tmp_path / "config.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError) as caught:
            load_config(path, environ={})
        message = str(caught.value)
        assert expected in message and len(message.splitlines()) == 1, (text, message)
    ok = tmp_path / "ok.yaml"
    ok.write_text("opcua:\n  allowlist: [10.0.5.30]\n")
    assert load_config(ok, environ={}).opcua.allowlist == ["10.0.5.30"]
    default = OpcuaSection()  # off, loopback, no security: the safe default
    assert not default.enabled and default.host == "127.0.0.1" and default.security_policies == ["None"]


def test_without_asyncua_one_line_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.opcua import create_service
    from service.opcua.station import LineState, Station

    monkeypatch.setitem(sys.modules, "asyncua", None)  # as if the extra were not installed
    station = Station(mode="free_run", trigger_timeout_s=1.0, trigger=lambda part: None,
                      state=lambda: LineState(True, True, (), ""), write_command=None)
    with pytest.raises(DefectsamError) as caught:
        create_service(OpcuaSection(enabled=True), station)
    assert str(caught.value).count("\n") == 0 and "pip install 'defectsam[opcua]'" in str(caught.value)


def test_the_node_table_in_the_doc_is_current() -> None:
    from service.opcua.nodes import render_doc

    doc = (REPO / "docs" / "opcua.md").read_text()
    assert render_doc(doc) == doc, "docs/opcua.md is stale: run python -m service.opcua.nodes"
