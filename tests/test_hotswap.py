"""Hot swap and recipes on a real daemon: a synthetic camera at full rate, a bundle store with real bundles, a
real Modbus client (pymodbus) reading the whole result block while the engine is replaced.

Measured, not asserted: the switch window (the gap between the last result of the old bundle and the first
of the new one) is printed (pytest -s)."""

from __future__ import annotations

import itertools
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from pymodbus.client import ModbusTcpClient

from engines.bundle import load_bundle, write_bundle
from service.bundle_store import BundleStore
from service.pipeline.record import InspectionRecord
from service.plc.registers import (
    BY_NAME,
    CTRL,
    ERROR_RECIPE_FAILED,
    ERROR_RECIPE_UNKNOWN,
    INPUT_WORDS,
    MIRROR_BASE,
    RESULT_BASE,
    STAT,
    get,
    result_checksum,
)

from .daemon_support import AUTH_HEADER, base_url, free_port, http, make_config, ng_bundle, running_daemon
from .support import wait_for

OK_NAME, NG_NAME = "tiny-student", "tiny-student-ng"


@pytest.fixture()
def store(tiny_bundle_master: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> BundleStore:
    """A store with the tiny bundle (always OK) active and the always-NG one installed."""
    store = BundleStore(tmp_path / "bundles")
    store.install(tiny_bundle_master)
    store.install(ng_bundle(tiny_bundle_master, tmp_path_factory.getbasetemp()))
    store.activate(OK_NAME)
    return store


def _corrupt_onnx_bundle(master: Path, tmp_path: Path) -> Path:
    """A bundle whose checksums verify but whose segment graph is not ONNX (what a bad export could write)."""
    bundle = load_bundle(master)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not an onnx graph" * 100)
    files = {n: master / n for n in bundle.manifest.files}
    files[bundle.manifest.graphs.segment] = junk
    fields = bundle.manifest.model_dump(mode="json", exclude={"files"})
    fields["name"] = "tiny-corrupt"
    return write_bundle(tmp_path / "corrupt", fields, files).path


def _daemon_config(tmp_path: Path, store: BundleStore, **sections: dict[str, Any]) -> Any:
    return make_config(tmp_path, None, engine={"bundle": None, "bundle_store": str(store.root)},
                       camera={"fps": 1000.0},  # full rate: the engine, not the camera, sets the pace
                       plc={"enabled": True, "host": "127.0.0.1", "port": free_port()}, **sections)


class BlockReader:
    """A PLC polling status + the whole result block in one request, checking each block against its checksum
    and its inspection id against the verdict the pipeline published under that id."""

    def __init__(self, port: int) -> None:
        self.client = ModbusTcpClient("127.0.0.1", port=port, timeout=5, retries=0)
        assert self.client.connect()
        self.blocks: list[list[int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.blocks.append(list(self.client.read_input_registers(0, count=INPUT_WORDS, device_id=1).registers))

    def __enter__(self) -> BlockReader:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self.client.close()


@pytest.fixture()
def records() -> list[InspectionRecord]:
    return []


def _collect(daemon: Any, into: list[InspectionRecord]) -> None:
    daemon.pipeline.subscribe("test", lambda record: into.append(record.without_frame()))


def test_hot_swap_under_load_loses_no_result_and_never_tears_the_plc_block(
        tmp_path: Path, store: BundleStore, records: list[InspectionRecord]) -> None:
    with running_daemon(_daemon_config(tmp_path, store)) as daemon:
        assert daemon.snapshot().bundle.name == OK_NAME
        _collect(daemon, records)
        camera_before = daemon.camera.stats()
        with BlockReader(daemon.plc.port) as reader:
            wait_for(lambda: len(records) >= 5, what="results from the first bundle")
            status, _, body = http("POST", f"{base_url(daemon)}/api/bundle/activate", {"bundle": NG_NAME},
                                   headers=AUTH_HEADER, timeout=120)
            assert status == 200, body
            wait_for(lambda: sum(r.bundle == NG_NAME for r in records) >= 5, what="results from the new bundle")
        snap = daemon.snapshot()
        camera_after = daemon.camera.stats()
        plc_connections = snap.plc.connections_total
        text = generate_latest(daemon.registry).decode()
    got = list(records)
    ids = [r.inspection_id for r in got]
    assert ids == list(range(ids[0], ids[0] + len(ids))), "an inspection id is missing: a result was lost"
    names = [r.bundle for r in got]
    switch = names.index(NG_NAME)
    assert set(names[:switch]) == {OK_NAME} and set(names[switch:]) == {NG_NAME}, "bundles interleaved"
    assert {r.verdict.name for r in got[switch:]} == {"NG"}
    # the camera and the PLC session were not touched
    assert camera_after.reconnects == camera_before.reconnects and camera_after.disconnects == 0
    assert plc_connections == 1
    # every block the PLC read is one whole result: checksum, and the verdict the pipeline published with its id
    verdicts = {r.inspection_id: int(r.verdict) for r in got}
    seen = set()
    for words in reader.blocks:
        iid = get(words, BY_NAME["inspection_id"])
        if not iid:
            continue
        assert get(words, BY_NAME["checksum"]) == result_checksum(words[RESULT_BASE:INPUT_WORDS])
        if iid in verdicts:
            assert get(words, BY_NAME["verdict"]) == verdicts[iid], f"result {iid} torn"
            seen.add(verdicts[iid])
    assert seen == {1, 2}, "the PLC saw results of both bundles"
    assert snap.bundle.name == NG_NAME and snap.bundle.reloads["ok"] == 1
    assert store.active_target() == snap.bundle.directory  # the API moved the store's pointer
    assert 'defectsam_bundle_reload_total{result="ok"} 1.0' in text
    assert f'name="{NG_NAME}"' in text
    # measured: the switch window against the ordinary interval between results
    done = [r.times.post_done for r in got]
    gaps = [b - a for a, b in itertools.pairwise(done)]
    ordinary = sorted(gaps[:switch - 1] + gaps[switch:])
    print(f"hot swap: {len(got)} results, ids contiguous; switch window {gaps[switch - 1] * 1000:.1f} ms between "
          f"the last {OK_NAME} and the first {NG_NAME} result (ordinary gap p50 "
          f"{ordinary[len(ordinary) // 2] * 1000:.1f} ms, max {ordinary[-1] * 1000:.1f} ms); load + check + swap "
          f"{snap.bundle.last_seconds:.2f} s while the old bundle kept inspecting; {len(reader.blocks)} PLC reads")


@pytest.mark.parametrize("fault", ["corrupt onnx", "checksum mismatch", "not installed"])
def test_a_bad_bundle_leaves_the_old_one_running_and_says_why(
        tmp_path: Path, store: BundleStore, tiny_bundle_master: Path, records: list[InspectionRecord],
        fault: str) -> None:
    if fault == "corrupt onnx":
        ref = store.install(_corrupt_onnx_bundle(tiny_bundle_master, tmp_path)).version.directory
        expect = "segment"
    elif fault == "checksum mismatch":  # the copy in the store changed on disk after it was installed
        version = store.resolve(NG_NAME)
        graph = version.path / "segment.onnx"
        version.path.chmod(0o755)
        graph.chmod(0o644)
        data = bytearray(graph.read_bytes())
        data[len(data) // 2] ^= 0xFF
        graph.write_bytes(bytes(data))
        ref, expect = NG_NAME, "checksum mismatch"
    else:
        ref, expect = "no-such-bundle", "not installed"
    with running_daemon(_daemon_config(tmp_path, store)) as daemon:
        _collect(daemon, records)
        client = ModbusTcpClient("127.0.0.1", port=daemon.plc.port, timeout=5, retries=0)
        assert client.connect()
        try:
            client.write_register(0, CTRL["trigger_enable"], device_id=1)
            status, _, body = http("POST", f"{base_url(daemon)}/api/bundle/activate", {"bundle": ref},
                                   headers=AUTH_HEADER, timeout=120)
            assert status == (404 if fault == "not installed" else 409), body
            assert expect in body.decode() and "the running one stays" in body.decode()
            words = wait_for(lambda: (w := list(client.read_input_registers(0, count=5, device_id=1).registers))
                             [2] in (ERROR_RECIPE_UNKNOWN, ERROR_RECIPE_FAILED) and w, what="the PLC error code")
            before = len(records)
            wait_for(lambda: len(records) >= before + 3, what="results after the failed load")
        finally:
            client.close()
        snap = daemon.snapshot()
        text = generate_latest(daemon.registry).decode()
    expected_code = ERROR_RECIPE_FAILED if fault != "not installed" else ERROR_RECIPE_UNKNOWN
    assert words[2] == expected_code and words[0] & STAT["error"]
    # reported, but a load the PLC did not ask for does not stop its line: triggers are still taken
    assert words[0] & STAT["trigger_ready"]
    assert {r.bundle for r in records} == {OK_NAME}  # the old bundle kept inspecting
    assert snap.bundle.name == OK_NAME and snap.bundle.last_result == "failed" and expect in snap.bundle.last_reason
    assert 'defectsam_bundle_reload_total{result="failed"} 1.0' in text
    assert store.resolve(OK_NAME).directory == store.active_target()  # the pointer did not move


def test_recipe_switch_through_modbus(tmp_path: Path, store: BundleStore, tiny_bundle_master: Path,
                                      records: list[InspectionRecord]) -> None:
    corrupt = store.install(_corrupt_onnx_bundle(tiny_bundle_master, tmp_path)).version.directory
    recipes = {1: {"bundle": OK_NAME}, 2: {"bundle": NG_NAME, "score_threshold": 0.6},
               3: {"bundle": corrupt}}
    config = _daemon_config(tmp_path, store, recipes=recipes)
    with running_daemon(config) as daemon:
        _collect(daemon, records)
        c = ModbusTcpClient("127.0.0.1", port=daemon.plc.port, timeout=5, retries=0)
        assert c.connect()

        def inputs() -> list[int]:
            return list(c.read_input_registers(0, count=5, device_id=1).registers)

        def write_recipe(number: int) -> list[int]:
            """Write holding 4 and read status .. echo (the holding mirror) in ONE request (function 23):
            the answer is the state right after the write, before the load could finish."""
            return list(c.readwrite_registers(read_address=MIRROR_BASE, read_count=5, write_address=4,
                                              values=[number], device_id=1).registers)

        try:
            c.write_register(0, CTRL["trigger_enable"], device_id=1)
            assert wait_for(lambda: inputs()[0] & STAT["trigger_ready"], what="trigger ready")
            # recipe 2: busy while loading (trigger ready 0), then echoed; the new bundle inspects
            after_write = write_recipe(2)
            assert after_write[0] & STAT["recipe_busy"] and not after_write[0] & STAT["trigger_ready"]
            assert after_write[4] == 0
            done = wait_for(lambda: (w := inputs())[4] == 2 and w, what="recipe 2 echoed")
            assert not done[0] & STAT["recipe_busy"] and done[2] == 0 and done[0] & STAT["trigger_ready"]
            wait_for(lambda: records and records[-1].bundle == NG_NAME, what="results of recipe 2")
            assert daemon.pipeline.inspector.postprocess.config.score_threshold == 0.6
            # unknown recipe 9: error 5, recipe 2 keeps running
            assert write_recipe(9)[0] & STAT["recipe_busy"]
            failed = wait_for(lambda: (w := inputs())[2] and w, what="error code")
            assert failed[2] == ERROR_RECIPE_UNKNOWN and failed[4] == 2 and failed[0] & STAT["error"]
            assert not failed[0] & (STAT["recipe_busy"] | STAT["trigger_ready"])
            # clear error (rising edge), then recipe 3 (a bundle that cannot load): error 6, recipe 2 still runs
            c.write_register(0, CTRL["trigger_enable"] | CTRL["clear_error"], device_id=1)
            c.write_register(0, CTRL["trigger_enable"], device_id=1)
            assert inputs()[2] == 0
            write_recipe(3)
            failed = wait_for(lambda: (w := inputs())[2] and w, what="error code")
            assert failed[2] == ERROR_RECIPE_FAILED and failed[4] == 2
            before = len(records)
            wait_for(lambda: len(records) >= before + 2, what="results after the failed recipe")
            assert records[-1].bundle == NG_NAME
            # back to recipe 1 (writing the same word again does nothing: a new value is a request)
            write_recipe(1)
            done = wait_for(lambda: (w := inputs())[4] == 1 and w, what="recipe 1 echoed")
            assert done[2] == 0
            wait_for(lambda: records[-1].bundle == OK_NAME, what="results of recipe 1")
        finally:
            c.close()
        snap = daemon.snapshot()
    assert snap.bundle.recipe == 1 and snap.bundle.reloads == {"ok": 2, "failed": 2, "superseded": 0}


def test_the_daemon_follows_the_store_pointer(tmp_path: Path, store: BundleStore,
                                              records: list[InspectionRecord]) -> None:
    with running_daemon(_daemon_config(tmp_path, store)) as daemon:
        _collect(daemon, records)
        store.activate(NG_NAME)  # what 'defectsam bundle activate' does on the box
        wait_for(lambda: daemon.snapshot().bundle.name == NG_NAME, what="the switch to the new pointer")
        wait_for(lambda: records and records[-1].bundle == NG_NAME, what="results of the new bundle")
        store.rollback()
        wait_for(lambda: daemon.snapshot().bundle.name == OK_NAME, what="the rollback")
        snap = daemon.snapshot()
    assert snap.bundle.last_source == "pointer" and snap.bundle.reloads["ok"] == 2


@pytest.fixture(autouse=True)
def _writable_cleanup(tmp_path: Path) -> Iterator[None]:
    """Read-only versions in tmp_path: made writable again so pytest can remove them."""
    yield
    for path in tmp_path.rglob("*"):
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o755)
    shutil.rmtree(tmp_path, ignore_errors=True)
