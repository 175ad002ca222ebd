"""The record store: kept records, their files and masks, sampling, drops, retention, durability."""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from engines.results import Verdict
from service.config import StoreSection
from service.store import DB_NAME, RecordStore, StoreError

from .conftest import REPO
from .daemon_support import make_record
from .support import wait_for


def store_config(tmp_path: Path, **overrides: object) -> StoreSection:
    return StoreSection.model_validate({"path": str(tmp_path / "store"), "min_free_mb": 0, **overrides})


def store_bytes(path: Path) -> int:
    """Everything under ``path`` as the disk holds it: each file and directory at its size or its allocated
    blocks, whichever is more (what ``du`` and ``du --apparent-size`` would each count at most)."""
    total = 0
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            st = os.lstat(os.path.join(root, name))
            total += max(st.st_size, st.st_blocks * 512)
    return total


def started(config: StoreSection) -> RecordStore:
    store = RecordStore(config)
    store.open()
    store.start()
    return store


def test_ng_record_round_trip_with_frame_masks_and_overlay(tmp_path: Path) -> None:
    store = started(store_config(tmp_path))
    record = make_record(7, part_id="P-7")
    store.offer(record)
    store.stop()
    got = store.get(7)
    assert got is not None and got["verdict"] == "NG" and got["part_id"] == "P-7" and got["stored"] is True
    assert [d["class"] for d in got["defects"]] == ["scratch", "pinhole"]
    assert got["defects"][0]["polygon"]  # polygons are kept in the store
    frame = cv2.imdecode(np.frombuffer(store.frame_jpeg(7) or b"", np.uint8), cv2.IMREAD_COLOR)
    assert frame.shape == record.frame.shape  # type: ignore[union-attr]
    # the label mask holds each defect's mask exactly
    row = sqlite3.connect(tmp_path / "store" / DB_NAME).execute("SELECT mask_file FROM records").fetchone()
    labels = cv2.imread(str(tmp_path / "store" / row[0]), cv2.IMREAD_UNCHANGED)
    for index, defect in enumerate(record.result.defects):
        x, y, w, h = defect.bbox
        assert np.array_equal(labels[y:y + h, x:x + w] == index + 1, defect.mask)
    overlay = cv2.imdecode(np.frombuffer(store.overlay_jpeg(7) or b"", np.uint8), cv2.IMREAD_COLOR)
    x, y, w, h = record.result.defects[0].bbox
    patch = overlay[y + 3:y + 7, x + 5:x + 15].astype(int)
    assert (patch[..., 2] - patch[..., 1]).mean() > 40  # tinted red (class 0) where the scratch is
    small = cv2.imdecode(np.frombuffer(store.overlay_jpeg(7, width=100) or b"", np.uint8), cv2.IMREAD_COLOR)
    assert small.shape[1] == 100
    assert store.stats().written == 1 and store.stats().records == 1


def test_ok_results_are_sampled_and_every_other_verdict_kept(tmp_path: Path) -> None:
    store = RecordStore(store_config(tmp_path, ok_sample_share=0.25))
    kept = [store.wants(make_record(i, Verdict.OK)) for i in range(1, 41)]
    assert sum(kept) == 10
    assert all(store.wants(make_record(100, v)) for v in (Verdict.NG, Verdict.UNCERTAIN, Verdict.NO_FRAME))
    assert not any(RecordStore(store_config(tmp_path, ok_sample_share=0.0)).wants(make_record(i, Verdict.OK))
                   for i in range(50))


def test_full_queue_drops_and_counts_and_stop_flushes_the_rest(tmp_path: Path) -> None:
    store = RecordStore(store_config(tmp_path, queue_size=5))
    store.open()
    for i in range(1, 9):  # the writer is not running yet: 5 fit, 3 are dropped
        store.submit(make_record(i))
    assert store.stats().dropped["queue_full"] == 3
    store.start()
    store.stop()  # SIGTERM path: everything queued is written before stop returns
    stats = store.stats()
    assert stats.written == 5 and stats.records == 5 and stats.queue_depth == 0
    assert [r["id"] for r in store.list()] == [5, 4, 3, 2, 1]


def test_history_filters_and_paging(tmp_path: Path) -> None:
    store = started(store_config(tmp_path))
    base = time.time() - 100
    for i in range(1, 13):
        store.submit(make_record(i, Verdict.NG if i % 3 else Verdict.OK, wall_time=base + i,
                                 part_id=f"P{i % 2}"))
    store.stop()
    page = store.list(limit=5)
    assert [r["id"] for r in page] == [12, 11, 10, 9, 8]
    assert [r["id"] for r in store.list(limit=5, before=8)] == [7, 6, 5, 4, 3]
    assert [r["id"] for r in store.list(verdict="OK")] == [12, 9, 6, 3]
    assert [r["id"] for r in store.list(part_id="P1", limit=3)] == [11, 9, 7]
    assert [r["id"] for r in store.list(since=base + 10, until=base + 12)] == [11, 10]


def test_retention_by_age_and_by_disk_budget(tmp_path: Path) -> None:
    config = store_config(tmp_path, retention_days=1)
    store = started(config)
    old = time.time() - 3 * 86400
    for i in range(1, 4):
        store.submit(make_record(i, wall_time=old + i))
    for i in range(4, 7):
        store.submit(make_record(i))
    store.stop()
    reopened = RecordStore(config)
    assert reopened.open() == 6
    assert [r["id"] for r in reopened.list()] == [6, 5, 4]
    assert reopened.stats().deleted["age"] == 3
    assert not list((tmp_path / "store" / "files").glob(f"{time.strftime('%Y%m%d', time.gmtime(old + 1))}/*"))

    # a budget that fits only a few records: the oldest go first, the newest stay
    budget_dir = tmp_path / "budget"
    store = started(store_config(budget_dir, disk_budget_mb=0.5, writer_idle_class=False, writer_nice=0))
    for i in range(1, 40):
        store.submit(make_record(i))
    store.stop()
    ids = [r["id"] for r in store.list(limit=200)]
    assert ids[0] == 39 and 1 <= len(ids) < 38
    assert store.stats().deleted["disk_budget"] >= 1
    assert store_bytes(budget_dir / "store") <= 0.5e6


def test_too_little_free_space_drops_new_records(tmp_path: Path) -> None:
    store = started(store_config(tmp_path, min_free_mb=10**9))  # a petabyte free: never
    store.submit(make_record(1))
    store.stop()
    assert store.stats().dropped["disk_full"] == 1 and store.stats().records == 0
    assert "disk full" in (store.stats().last_error or "")


def _settled(store: RecordStore, count: int) -> None:
    """Wait until ``count`` records have been written or dropped."""
    wait_for(lambda: store.stats().written + sum(store.stats().dropped.values()) >= count, timeout=60,
             interval=0.002, what=f"{count} records handled")


def test_the_disk_budget_counts_the_wal_and_holds_after_every_record(tmp_path: Path) -> None:
    """5 MB, 300 records of about 40 KB, one at a time: after each, everything the store has on disk (the
    database, its WAL and index, the id mark, the files, the directories) is within the budget, and each
    record took the place of as few old ones as it needed (the old code deleted them 20 at a time and left
    the WAL uncounted: 9.3 MB on disk for a 5 MB budget)."""
    path = tmp_path / "store"
    store = started(store_config(tmp_path, disk_budget_mb=5, writer_idle_class=False, writer_nice=0))
    worst = wal_worst = 0
    deletions = []
    try:
        for i in range(1, 301):
            before = store.stats().deleted["disk_budget"]
            store.submit(make_record(i, size=(240, 320)))
            _settled(store, i)
            worst = max(worst, store_bytes(path))
            wal_worst = max(wal_worst, (path / f"{DB_NAME}-wal").stat().st_size)
            deletions.append(store.stats().deleted["disk_budget"] - before)
        stats = store.stats()
        assert abs(stats.bytes - store_bytes(path)) <= 16384  # the stats say what the disk holds
    finally:
        store.stop()
    print(f"5 MB budget: at most {worst / 1e6:.2f} MB on disk (WAL at most {wal_worst / 1e6:.2f} MB), "
          f"{stats.records} records kept, {stats.deleted['disk_budget']} deleted, at most {max(deletions)} per record")
    assert worst <= 5e6 and store_bytes(path) <= 5e6
    assert stats.written == 300 and sum(stats.dropped.values()) == 0
    assert stats.deleted["disk_budget"] >= 100 and max(deletions) <= 2
    assert stats.records >= 60  # the room is used: the database and the WAL take a fraction, not half


def test_a_record_larger_than_the_budget_is_too_large_and_deletes_nothing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A frame that cannot fit the budget even with the store empty: dropped as too_large, with its own
    message, every stored record kept; not disk_full, whose alert means the disk is full (the old code said
    'disk full: less than 0 MB free' on a disk with gigabytes free, after deleting every record)."""
    store = started(store_config(tmp_path, disk_budget_mb=1, writer_idle_class=False, writer_nice=0))
    try:
        for i in range(1, 6):
            store.submit(make_record(i))
        _settled(store, 5)
        for i in (6, 7):  # about 2.5 MB of JPEG each
            store.submit(make_record(i, size=(1500, 1500)))
        _settled(store, 7)
        stats = store.stats()
        assert stats.dropped["too_large"] == 2 and stats.dropped["disk_full"] == 0
        assert stats.records == 5 and sum(stats.deleted.values()) == 0
        assert "too large" in (stats.last_error or "") and "disk full" not in (stats.last_error or "")
        assert "store.disk_budget_mb 1 " in (stats.last_error or "")
        store.submit(make_record(8))  # an ordinary record is stored again
        _settled(store, 8)
    finally:
        store.stop()
    assert store.stats().records == 6 and store_bytes(tmp_path / "store") <= 1e6
    warnings = [r.getMessage() for r in caplog.records if r.name == "service.store" and r.levelno >= logging.WARNING]
    assert len([m for m in warnings if "too large" in m]) == 1 and not [m for m in warnings if "disk full" in m]


@pytest.mark.slow
def test_a_daemon_whose_frames_exceed_its_budget_says_too_large_not_disk_full(
        tiny_bundle_master: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The real daemon, 4 MP frames (every one NG, so every one kept) and a 0.3 MB budget: /metrics and
    /api/status count too_large, disk_full stays 0 (no false disk-full alert), and the store stays within
    its budget."""
    from prometheus_client.parser import text_string_to_metric_families

    from .daemon_support import base_url, get_json, http, make_config, ng_bundle, running_daemon

    bundle = ng_bundle(tiny_bundle_master, tmp_path_factory.getbasetemp())
    config = make_config(tmp_path, bundle, camera={"width": 2688, "height": 1520, "fps": 5.0},
                         store={"disk_budget_mb": 0.3})
    with running_daemon(config) as daemon:
        url = base_url(daemon)
        wait_for(lambda: daemon.store.stats().dropped["too_large"] >= 3, timeout=120, what="too_large drops")
        status = get_json(f"{url}/api/status")[1]["store"]
        body = http("GET", f"{url}/metrics")[2].decode()
    dropped = {s.labels["reason"]: s.value for f in text_string_to_metric_families(body) for s in f.samples
               if s.name == "defectsam_store_records_dropped_total"}
    assert dropped["too_large"] >= 3 and dropped["disk_full"] == 0
    assert status["dropped"]["disk_full"] == 0 and "too large" in status["last_error"]
    assert store_bytes(tmp_path / "store") <= 0.3e6


def test_unusable_store_path_is_one_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError, match=r"store.path .*file.*cannot be used"):
        RecordStore(store_config(tmp_path, path=str(blocker / "store"))).open()


_WRITER = """
import sys, time
sys.path.insert(0, {repo!r})
from service.config import StoreSection
from service.store import RecordStore
from tests.daemon_support import make_record
store = RecordStore(StoreSection(path={path!r}, min_free_mb=0, queue_size=10000, writer_idle_class=False,
                                 writer_nice=0))
store.open(); store.start()
told = False
for i in range(1, 100000):
    store.submit(make_record(i, size=(480, 640)))
    if not told and store.stats().written >= 5:  # committed some, more in flight: kill me now
        print("writing", flush=True)
        told = True
    time.sleep(0.002)
"""


def test_a_crash_never_leaves_a_row_without_its_files(tmp_path: Path) -> None:
    path = tmp_path / "store"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER.format(repo=str(REPO), path=str(path))],
                            stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    time.sleep(0.5)  # into the middle of later batches (any moment will do: the invariant holds at all)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    store = RecordStore(store_config(tmp_path))
    store.open()  # sweeps files whose row never committed
    rows = sqlite3.connect(path / DB_NAME).execute("SELECT frame_file, mask_file FROM records").fetchall()
    assert len(rows) >= 5
    referenced = {name for row in rows for name in row if name}
    assert all((path / name).is_file() for name in referenced)
    on_disk = {p.relative_to(path).as_posix() for p in (path / "files").rglob("*") if p.is_file()}
    assert on_disk == referenced  # no orphans, no temporary files


def test_background_threads_can_run_nicer_than_the_pipeline() -> None:
    """The store writer lowers its own thread's priority (Linux keeps one per thread), not the process's."""
    import os
    import sys
    import threading

    from service.ops import lower_thread_priority

    if sys.platform != "linux":
        pytest.skip("per-thread nice values are Linux's")
    seen: dict[str, int] = {}

    def worker() -> None:
        tid = threading.get_native_id()
        before = os.getpriority(os.PRIO_PROCESS, tid)
        assert lower_thread_priority(5)
        seen["delta"] = os.getpriority(os.PRIO_PROCESS, tid) - before

    thread = threading.Thread(target=worker)
    process_before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    thread.start()
    thread.join()
    assert seen["delta"] == min(5, 19 - process_before)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == process_before
    assert not lower_thread_priority(0)


def test_the_writer_can_run_in_the_idle_scheduling_class() -> None:
    """SCHED_IDLE is per thread too: the writer's thread gets it, the pipeline's threads keep theirs."""
    import os
    import sys
    import threading

    from service.ops import lower_thread_priority

    if sys.platform != "linux":
        pytest.skip("SCHED_IDLE is Linux's")
    seen: dict[str, int] = {}

    def worker() -> None:
        assert lower_thread_priority(0, idle_class=True)
        seen["policy"] = os.sched_getscheduler(0)

    before = os.sched_getscheduler(0)
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen["policy"] == os.SCHED_IDLE
    assert os.sched_getscheduler(0) == before


def test_the_store_writer_runs_in_the_idle_class_by_default(tmp_path: Path) -> None:
    import threading

    if sys.platform != "linux":
        pytest.skip("SCHED_IDLE is Linux's")
    store = started(store_config(tmp_path))
    try:
        store.offer(make_record(1))  # the writer has set its class before it takes a record
        deadline = time.monotonic() + 10
        while store.stats().written < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        writer = next(t for t in threading.enumerate() if t.name == "store-writer")
        assert os.sched_getscheduler(writer.native_id) == os.SCHED_IDLE
    finally:
        store.stop()
    nice_only = started(store_config(tmp_path / "b", writer_idle_class=False))
    try:
        writer = next(t for t in threading.enumerate() if t.name == "store-writer")
        deadline = time.monotonic() + 10
        while os.getpriority(os.PRIO_PROCESS, writer.native_id) == os.getpriority(os.PRIO_PROCESS, 0):
            assert time.monotonic() < deadline, "the writer never lowered its priority"
            time.sleep(0.02)
        assert os.sched_getscheduler(writer.native_id) == os.SCHED_OTHER
    finally:
        nice_only.stop()
