"""The record store: kept records, their files and masks, sampling, drops, retention, durability."""

from __future__ import annotations

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


def store_config(tmp_path: Path, **overrides: object) -> StoreSection:
    return StoreSection.model_validate({"path": str(tmp_path / "store"), "min_free_mb": 0, **overrides})


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
    probe = started(store_config(budget_dir))
    probe.submit(make_record(1))
    probe.stop()
    per_record = probe.stats().bytes
    db_bytes = (budget_dir / "store" / DB_NAME).stat().st_size
    budget_mb = (db_bytes + 100_000 + 3.5 * per_record) / 1e6
    store = started(store_config(budget_dir, disk_budget_mb=budget_mb))
    for i in range(2, 30):
        store.submit(make_record(i))
    store.stop()
    ids = [r["id"] for r in store.list(limit=200)]
    assert ids[0] == 29 and 1 <= len(ids) < 28
    assert store.stats().deleted["disk_budget"] >= 1
    assert store.stats().bytes <= budget_mb * 1e6


def test_too_little_free_space_drops_new_records(tmp_path: Path) -> None:
    store = started(store_config(tmp_path, min_free_mb=10**9))  # a petabyte free: never
    store.submit(make_record(1))
    store.stop()
    assert store.stats().dropped["disk_full"] == 1 and store.stats().records == 0
    assert "disk full" in (store.stats().last_error or "")


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
store = RecordStore(StoreSection(path={path!r}, min_free_mb=0, queue_size=10000))
store.open(); store.start()
for i in range(1, 100000):
    store.submit(make_record(i, size=(480, 640)))
    if i == 5:
        print("writing", flush=True)
    time.sleep(0.002)
"""


def test_a_crash_never_leaves_a_row_without_its_files(tmp_path: Path) -> None:
    path = tmp_path / "store"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER.format(repo=str(REPO), path=str(path))],
                            stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    time.sleep(1.0)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    store = RecordStore(store_config(tmp_path))
    store.open()  # sweeps files whose row never committed
    rows = sqlite3.connect(path / DB_NAME).execute("SELECT frame_file, mask_file FROM records").fetchall()
    assert rows, "the writer committed nothing in a second"
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
