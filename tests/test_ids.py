"""Inspection ids stay unique across restarts and crashes (issue 16, item 5): the mark on disk, a store
process killed while it hands ids out, and a real daemon killed with SIGKILL and restarted while a PLC and
an event client watch its ids."""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from pymodbus.client import ModbusTcpClient

from service.config import StoreSection
from service.ids import ID_BLOCK, IDS_NAME, IdAllocator, IdError, read_mark, write_mark
from service.plc.registers import BY_NAME, INPUT_WORDS, get
from service.soak import DaemonProcess
from service.store import RecordStore, StoreError

from .conftest import REPO
from .daemon_support import config_data, free_port, make_record
from .support import wait_for


def store_config(path: Path, **overrides: object) -> StoreSection:
    return StoreSection.model_validate({"path": str(path), "min_free_mb": 0, **overrides})


def test_ids_continue_after_the_reserved_mark_not_after_the_highest_row(tmp_path: Path) -> None:
    """Ids handed out but never stored (unsampled OK results) are not handed out again by the next start."""
    config = store_config(tmp_path / "store")
    store = RecordStore(config)
    store.open()
    assert store.ids is not None
    handed = [store.ids() for _ in range(5)]
    store.start()
    store.submit(make_record(handed[1]))  # one of them stored, the others were OK and not sampled
    store.stop()
    assert handed == [1, 2, 3, 4, 5] and read_mark(tmp_path / "store" / IDS_NAME) >= 5
    reopened = RecordStore(config)
    assert reopened.open() == 2  # the highest stored row: the old code started again at 3
    assert reopened.ids is not None and reopened.ids() > 5
    reopened.stop()


def test_a_store_written_before_the_mark_existed_starts_after_its_highest_row(tmp_path: Path) -> None:
    config = store_config(tmp_path / "store")
    store = RecordStore(config)
    store.open()
    store.start()
    store.submit(make_record(70))
    store.stop()
    (tmp_path / "store" / IDS_NAME).unlink()  # as a store from an older version has it
    reopened = RecordStore(config)
    reopened.open()
    assert reopened.ids is not None and reopened.ids() == 71
    reopened.stop()


def test_reservations_run_ahead_and_a_bad_mark_stops_start_up(tmp_path: Path) -> None:
    mark = tmp_path / IDS_NAME
    ids = IdAllocator(mark, block=10)
    try:
        assert read_mark(mark) == 10
        got = [ids() for _ in range(25)]  # three blocks' worth: the reserver keeps ahead
        assert got == list(range(1, 26))
        wait_for(lambda: read_mark(mark) >= 26 and ids.reserved_through >= 26, timeout=10, what="the next block")
    finally:
        ids.close()
    assert not list(tmp_path.glob(f".{IDS_NAME}.*"))  # no temporary files left
    mark.write_text("garbage")
    with pytest.raises(IdError, match="not an id mark"):
        IdAllocator(mark)
    with pytest.raises(StoreError, match=r"cannot be used.*not an id mark"):
        RecordStore(store_config(tmp_path)).open()
    write_mark(mark, 41)
    again = IdAllocator(mark, floor=7)
    try:
        assert again() == 42
    finally:
        again.close()
    memory = IdAllocator(None, floor=3)  # a daemon without a store: in memory, from floor + 1
    assert [memory(), memory()] == [4, 5]


_HANDER = """
import sys
sys.path.insert(0, {repo!r})
from service.config import StoreSection
from service.store import RecordStore
store = RecordStore(StoreSection(path={path!r}, min_free_mb=0))
store.open()
while True:
    print(store.ids(), flush=True)
"""


def test_ids_handed_out_before_a_sigkill_are_never_handed_out_again(tmp_path: Path) -> None:
    """A process hands ids out as fast as it can (each printed, so the parent knows it left) and is
    killed mid-block, several times; each restart's first id is above every id the killed one printed."""
    path = tmp_path / "store"
    seen: list[int] = []
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", _HANDER.format(repo=str(REPO), path=str(path))],
                                stdout=subprocess.PIPE, text=True, cwd=REPO)
        assert proc.stdout is not None
        run = [int(proc.stdout.readline())]
        while len(run) < 3 * ID_BLOCK // 2 + 7:  # past the first block: the reserver has run too
            run.append(int(proc.stdout.readline()))
        os.kill(proc.pid, signal.SIGKILL)
        run += [int(line) for line in proc.stdout.read().split()]  # what it printed before it died
        proc.wait(10)
        assert run == list(range(run[0], run[-1] + 1))
        assert not seen or run[0] > max(seen)
        seen += run
    assert len(seen) == len(set(seen))


# ------------------------------------------------------------------------------------------- the daemon


class _Watcher:
    """What a PLC and an event client see of one daemon: every inspection id in /api/events and every
    value of the PLC's inspection_id register (polled every 20 ms over Modbus TCP)."""

    def __init__(self, api_port: int, plc_port: int) -> None:
        self.events: list[int] = []
        self.plc: list[int] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._events, args=(api_port,), daemon=True),
                         threading.Thread(target=self._poll, args=(plc_port,), daemon=True)]
        for thread in self._threads:
            thread.start()

    def _events(self, port: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        with contextlib.suppress(OSError, http.client.HTTPException):
            conn.request("GET", "/api/events")
            response = conn.getresponse()
            while not self._stop.is_set():
                line = response.readline()
                if not line:
                    return
                if line.startswith(b"data: {") and b'"acquisition_id"' in line:
                    self.events.append(int(json.loads(line[6:])["id"]))

    def _poll(self, port: int) -> None:
        client = ModbusTcpClient("127.0.0.1", port=port, timeout=5, retries=0)
        client.connect()
        try:
            while not self._stop.is_set():
                with contextlib.suppress(Exception):
                    reply = client.read_input_registers(0, count=INPUT_WORDS, device_id=1)
                    if not reply.isError():
                        value = get(list(reply.registers), BY_NAME["inspection_id"])
                        if value and (not self.plc or self.plc[-1] != value):
                            self.plc.append(value)
                self._stop.wait(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)


@pytest.mark.slow
def test_ids_stay_unique_over_sigkill_and_restart_of_the_daemon(tiny_bundle_master: Path, tmp_path: Path) -> None:
    """`defectsam serve` on the tiny bundle (every result OK), 1 in 20 of them stored, a PLC
    polling the inspection_id register and an event client reading every result: SIGKILL, restart, SIGKILL,
    restart, SIGTERM. No id is seen twice, by the PLC or by the event client, though most ids were never
    stored (the old code started each run after the highest stored row and handed those out again: with
    none stored, 14 of 30 ids the event client saw and 11 of 29 the PLC saw came twice in two runs)."""
    plc_port = free_port()
    data = config_data(tmp_path, tiny_bundle_master, plc={"enabled": True, "host": "127.0.0.1", "port": plc_port},
                       store={"ok_sample_share": 0.05})
    config_file = tmp_path / "defectsam.yaml"
    config_file.write_text(yaml.safe_dump(data))
    runs: list[_Watcher] = []
    for index, how in enumerate(("kill", "kill", "term")):
        workdir = tmp_path / f"run{index}"
        workdir.mkdir()
        daemon = DaemonProcess(config_file, workdir)
        watcher = None
        try:
            daemon.wait_serving(60)
            daemon.wait_ready(60)
            watcher = _Watcher(daemon.port, plc_port)
            wait_for(lambda w=watcher: len(w.events) >= 30 and len(w.plc) >= 5, timeout=120,  # type: ignore[misc]
                     what="results seen by the event client and the PLC")
            if how == "kill":
                daemon.proc.send_signal(signal.SIGKILL)
                daemon.proc.wait(30)
            else:
                assert daemon.terminate(60)[0] == 0
        finally:
            if watcher is not None:
                watcher.stop()
                runs.append(watcher)
            daemon.close()
    stored = RecordStore(store_config(tmp_path / "store"))
    stored.open()
    rows = {r["id"] for r in stored.list(limit=100000)}
    stored.stop()
    events = [i for run in runs for i in run.events]
    plc = [i for run in runs for i in run.plc]
    print(f"3 runs (2 SIGKILLs): {len(events)} ids seen by the event client, {len(plc)} by the PLC, "
          f"{len(rows)} stored; each run's first id: {[run.events[0] for run in runs]}")
    for run in runs:
        assert run.events == sorted(set(run.events)) and run.plc == sorted(set(run.plc))
    assert len(events) == len(set(events)), "an id was handed out twice"
    assert len(plc) == len(set(plc)), "the PLC saw an id twice"
    assert set(events) - rows, "every id was stored: the test did not exercise unstored ids"
    for earlier, later in itertools.pairwise(runs):
        assert min(later.events) > max(earlier.events + earlier.plc)
