"""The record store: kept results in SQLite (WAL), each with its frame (JPEG) and masks (PNG).

Every NG, UNCERTAIN and NO_FRAME result is kept, and a configured share of OK ones. A writer
thread drains a bounded queue and encodes (JPEG, label PNG, JSON); a second one writes what is
encoded, in one transaction per batch of what is ready, so the encoder's CPU work overlaps the
disk's fsyncs. When the queue is full a record is dropped and counted, so a slow disk never stalls
inference. Drops are not silent: the log says how many at most once per
``DROP_WARNING_S`` (the first at once, then the count since the last line), and the live page
shows the count.

Durability: the frame and mask files are written to a temporary name, fsynced and renamed
before the row that names them is committed (``synchronous=FULL``), and a record is counted as
stored only after its commit. ``stop()`` drains the queue, so SIGTERM loses nothing; a crash
loses at most what was still queued, never a half record. Files left by a crash between the
rename and the commit are swept at the next start.

Retention: rows older than ``retention_days`` are deleted, then the oldest rows, as many as it takes
(no more), while the store would exceed ``disk_budget_mb`` or leave the disk less than ``min_free_mb``
free; if the disk is still too full, new records are dropped (counted as ``disk_full``) rather than
fill it. The budget counts everything the store puts on disk: the frame and mask files (each its
allocated size), the database, its WAL and shared-memory index, the id mark and the directories. The
WAL is held small beside the budget (auto-checkpoint and ``journal_size_limit`` at 1/32 of it, at
most 4 MB; a TRUNCATE checkpoint when it outgrows that) and counted at no less than three times that
size, the most it can reach before the next checkpoint settles, so the bound holds between
checkpoints too. A record that could not fit even with every other record deleted is dropped as
``too_large`` and nothing is deleted for it.

Inspection ids are reserved here too, in ``ids.json`` (service/ids.py): ``open()`` starts the
allocator the pipeline takes its ids from, after the reserved mark and after the highest row.

Masks are one label image per frame: pixel value ``i + 1`` marks defect ``i`` (uint8, or uint16
beyond 255 defects), so the overlay can be rebuilt from the stored row.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import queue
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from engines.atomic import write_bytes_atomic
from engines.overlay import overlay_scale, render_overlay
from engines.results import Defect, InspectionResult, Verdict
from service.config.models import StoreSection
from service.ids import IDS_NAME, IdAllocator, IdError
from service.ops import lower_thread_priority
from service.pipeline.record import InspectionRecord

log = logging.getLogger(__name__)

DB_NAME = "records.sqlite3"
FILES_DIR = "files"
_DB_FILES = (DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm", IDS_NAME)
_MB = 1_000_000
_WAL_MIN, _WAL_MAX = 64 * 1024, 4 * 1024 * 1024  # the WAL's size between checkpoints: budget / 32, within these
_SHM_RESERVE = 32 * 1024  # the WAL index (-shm): 32 KB per 4096 WAL frames, so one step here
SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY,
    wall_time REAL NOT NULL,
    verdict TEXT NOT NULL,
    part_id TEXT,
    acquisition_id INTEGER NOT NULL,
    defect_count INTEGER NOT NULL,
    frame_file TEXT,
    mask_file TEXT,
    bytes INTEGER NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS records_wall_time ON records (wall_time);
CREATE INDEX IF NOT EXISTS records_verdict ON records (verdict, id);
CREATE INDEX IF NOT EXISTS records_part_id ON records (part_id, id);
"""
_STOP = object()
_BATCH_MAX = 16  # records per transaction at most
_ENCODED_AHEAD = 4  # encoded records waiting for the disk (a 4 MP record is about 0.6 MB)
DROP_WARNING_S = 10.0  # at most one "records dropped" line per this many seconds


@dataclass(frozen=True)
class StoreStats:
    enabled: bool
    path: str
    records: int
    bytes: int  # on disk: files, database, WAL, index, id mark, directories
    written: int
    dropped: dict[str, int]  # reason -> count: queue_full, disk_full, too_large, error
    deleted: dict[str, int]  # reason -> count: age, disk_budget, free_space
    queue_depth: int
    queue_size: int
    last_error: str | None


@dataclass(frozen=True)
class _Encoded:
    """A record ready for the disk: its files' bytes, its row's JSON, what its files will take on disk."""

    record: InspectionRecord
    frame_jpeg: bytes | None
    mask_png: bytes | None
    body: str
    incoming: int


class DropWarning:
    """Records dropped because the writer's queue was full, in the log at most once per ``every_s``: the
    first drop at once, later ones as the count since the last line (the rest at ``flush``)."""

    def __init__(self, store: RecordStore, every_s: float = DROP_WARNING_S, clock: Any = time.monotonic) -> None:
        self._store = store
        self._every = every_s
        self._clock = clock
        self._lock = threading.Lock()
        self._pending = 0  # dropped since the last line
        self._last: float | None = None  # when the last line was logged
        self._written_then = 0

    def add(self) -> None:
        with self._lock:
            self._pending += 1
        self.flush()

    def flush(self, *, force: bool = False) -> None:
        """Log the drops not yet logged, if it is time (``force``: now, at stop)."""
        now = self._clock()
        with self._lock:
            if not self._pending or (not force and self._last is not None and now - self._last < self._every):
                return
            count, self._pending = self._pending, 0
            since = None if self._last is None else now - self._last
            self._last = now
            stats = self._store.stats()
            written, self._written_then = stats.written - self._written_then, stats.written
        extra = {"event": "store_dropped", "reason": "queue_full", "dropped": count,
                 "dropped_total": stats.dropped["queue_full"]}
        if since is None:
            log.warning("store: a record was dropped: the writer's queue is full (store.queue_size %d), the writer is "
                        "behind. Every result still reaches the PLC and the live page; the store keeps what its "
                        "writer manages (docs/service.md, Record store). Drops are logged at most every %.0f s",
                        stats.queue_size, self._every, extra=extra)
        else:
            log.warning("store: %d record(s) dropped in the last %.0f s, the writer's queue full "
                        "(store.queue_size %d): %d written meanwhile, %d dropped since start", count, since,
                        stats.queue_size, written, stats.dropped["queue_full"], extra=extra)


class StoreError(Exception):
    """The store directory cannot be used (permissions, not a directory, a corrupt database)."""


class RecordStore:
    def __init__(self, config: StoreSection, *, wall_clock: Any = time.time) -> None:
        self.config = config
        self.path = Path(config.path)
        self._clock = wall_clock
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=config.queue_size)
        self._lock = threading.Lock()
        self._encoded: queue.Queue[Any] = queue.Queue(maxsize=_ENCODED_AHEAD)
        self._thread: threading.Thread | None = None
        self._io_thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        self._ok_credit = 0.0
        self._records = 0
        self._bytes = 0
        self._written = 0
        self._dropped = {"queue_full": 0, "disk_full": 0, "too_large": 0, "error": 0}
        self._deleted = {"age": 0, "disk_budget": 0, "free_space": 0}
        self._last_error: str | None = None
        self._last_retention = 0.0
        self._full_drops = 0  # records dropped for lack of space since the last one stored
        self._large_drops = 0  # records dropped as too large since the last one stored
        self._budget = int(config.disk_budget_mb * _MB)
        self._wal_cap = min(_WAL_MAX, max(_WAL_MIN, self._budget // 32))
        self._wal_reserve = 3 * self._wal_cap
        # rows per transaction: a batch's WAL pages stay well under half the WAL's size (see _overhead)
        self._batch_max = max(1, min(_BATCH_MAX, self._wal_cap // (8 * 4096)))
        self._block = 4096  # the filesystem's allocation unit (open())
        self.ids: IdAllocator | None = None  # inspection ids, reserved durably in store.path (open())
        self.drop_warning = DropWarning(self)

    # ------------------------------------------------------------------ lifecycle
    def open(self) -> int:
        """Create or open the store, sweep crash leftovers, apply retention, reserve the first block of
        inspection ids (``self.ids``); returns the highest stored id."""
        try:
            (self.path / FILES_DIR).mkdir(parents=True, exist_ok=True)
            conn = self._connect()
            conn.executescript(SCHEMA)
            conn.commit()
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"store.path {self.path}: cannot be used: {exc}") from None
        self._conn = conn
        with contextlib.suppress(OSError):
            self._block = os.statvfs(self.path).f_frsize or self._block
        row = conn.execute("SELECT COUNT(*), COALESCE(MAX(id), 0) FROM records").fetchone()
        self._records, max_id = int(row[0]), int(row[1])
        try:
            self.ids = IdAllocator(self.path / IDS_NAME, floor=max_id)
        except IdError as exc:
            raise StoreError(f"store.path {self.path}: cannot be used: {exc}") from None
        self._sweep_orphans()  # and counts the bytes of the files the rows name
        room = self._budget - self._overhead()
        if room < self._budget // 4:
            log.warning("store: store.disk_budget_mb %g leaves %.2f MB for records beside the database and its WAL "
                        "(%.2f MB); records larger than that are dropped as too_large",
                        self.config.disk_budget_mb, max(0, room) / _MB, (self._budget - room) / _MB)
        self._enforce_retention()
        return max_id

    def start(self) -> None:
        if self._conn is None:
            raise RuntimeError("open() the store first")
        self._conn.close()  # the writer thread opens its own connection
        self._conn = None
        self._io_thread = threading.Thread(target=self._run_io, name="store-io", daemon=True)
        self._io_thread.start()
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Write everything still queued, then stop the writer (and the id reservations)."""
        if self.ids is not None:
            self.ids.close()
        if self._thread is None:
            return
        deadline = time.monotonic() + timeout
        self._queue.put(_STOP)  # blocks while the queue is full: the writer is draining it
        for thread in (self._thread, self._io_thread):
            if thread is not None:
                thread.join(max(0.0, deadline - time.monotonic()))
        if any(t is not None and t.is_alive() for t in (self._thread, self._io_thread)):
            log.error("store writer did not finish within %.0f s; %d record(s) not written",
                      timeout, self._queue.qsize() + self._encoded.qsize())
        self._thread = self._io_thread = None

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path / DB_NAME, timeout=10.0, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        page = int(conn.execute("PRAGMA page_size").fetchone()[0])
        conn.execute(f"PRAGMA wal_autocheckpoint={max(8, self._wal_cap // page)}")
        conn.execute(f"PRAGMA journal_size_limit={self._wal_cap}")  # the WAL shrinks back after a checkpoint
        return conn

    @contextlib.contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(f"file:{self.path / DB_NAME}?mode=ro", uri=True, timeout=10.0)
        conn.row_factory = sqlite3.Row
        try:
            yield conn
        finally:
            conn.close()

    # ------------------------------------------------------------------ the hot side
    def wants(self, record: InspectionRecord) -> bool:
        """Whether this record is to be kept: every non-OK one, and the configured share of OK ones."""
        if record.verdict != Verdict.OK:
            return True
        with self._lock:
            self._ok_credit += self.config.ok_sample_share
            if self._ok_credit >= 1.0 - 1e-9:
                self._ok_credit -= 1.0
                return True
        return False

    def submit(self, record: InspectionRecord) -> bool:
        """Queue a record for writing without blocking; False (and counted) when the queue is full."""
        try:
            self._queue.put_nowait(record)
            return True
        except queue.Full:
            with self._lock:
                self._dropped["queue_full"] += 1
            self.drop_warning.add()
            return False

    def offer(self, record: InspectionRecord) -> None:
        """The pipeline's fan-out hook: keep the record if it is wanted."""
        if self.wants(record):
            self.submit(record)

    # ------------------------------------------------------------------ the writer threads
    def _run(self) -> None:
        """The encoder ("store-writer"): JPEG, label PNG and JSON of each queued record, the CPU part."""
        lower_thread_priority(self.config.writer_nice, idle_class=self.config.writer_idle_class)
        try:
            while True:
                try:
                    item = self._queue.get(timeout=1.0)
                except queue.Empty:
                    self.drop_warning.flush()
                    continue
                if item is _STOP:
                    break
                try:
                    self._encoded.put(self._encode(item))  # waits while the disk is behind: the queue fills
                except Exception as exc:  # one bad record must not stop the writer
                    self._failed([item], exc)
                self.drop_warning.flush()
        finally:
            self._encoded.put(_STOP)
            self.drop_warning.flush(force=True)

    def _run_io(self) -> None:
        """The disk side ("store-io"): retention, files and rows, one transaction per batch of what is ready."""
        lower_thread_priority(self.config.writer_nice, idle_class=self.config.writer_idle_class)
        conn = self._connect()
        self._conn = conn
        try:
            stop = False
            while not stop:
                try:
                    batch = [self._encoded.get(timeout=1.0)]
                except queue.Empty:
                    self._maybe_retention()
                    continue
                while batch[-1] is not _STOP and len(batch) < self._batch_max:
                    try:
                        batch.append(self._encoded.get_nowait())
                    except queue.Empty:
                        break
                stop = batch[-1] is _STOP
                items = [item for item in batch if item is not _STOP]
                if items:
                    try:
                        self._store_batch(conn, items)
                    except Exception as exc:
                        self._failed([item.record for item in items], exc)
                self._maybe_retention()
        finally:
            conn.close()
            self._conn = None

    def _failed(self, records: list[InspectionRecord], exc: BaseException) -> None:
        log.error("store: writing record(s) %s failed: %s: %s", ", ".join(str(r.inspection_id) for r in records),
                  type(exc).__name__, exc, exc_info=exc)
        with self._lock:
            self._dropped["error"] += len(records)
            self._last_error = f"{type(exc).__name__}: {exc}"

    def _maybe_retention(self) -> None:
        now = time.monotonic()
        if now - self._last_retention >= 30.0:
            self._enforce_retention()

    def _encode(self, record: InspectionRecord) -> _Encoded:
        frame_jpeg = mask_png = None
        if record.frame is not None:
            ok, buf = cv2.imencode(".jpg", record.frame, [cv2.IMWRITE_JPEG_QUALITY, self.config.jpeg_quality])
            if not ok:
                raise ValueError("frame could not be JPEG-encoded")
            frame_jpeg = buf.tobytes()
            if record.result.defects:
                mask_png = encode_label_mask(record.result)
        body = json.dumps(record.to_dict(with_polygons=True), separators=(",", ":"))
        # what the files will take: each rounded up to the allocation unit, plus a block for a new day directory
        incoming = sum(self._allocated(len(data)) for data in (frame_jpeg, mask_png) if data is not None) + self._block
        return _Encoded(record, frame_jpeg, mask_png, body, incoming)

    def _store_batch(self, conn: sqlite3.Connection, items: list[_Encoded]) -> None:
        """Room for the whole batch (one delete transaction), its files, its rows in one transaction. A batch
        that does not fit as a whole, or fails, is stored one record at a time (each with its own verdict)."""
        if len(items) > 1 and self._room(conn, sum(item.incoming for item in items)) is None:
            try:
                self._commit(conn, items)
                return
            except (OSError, sqlite3.Error) as exc:
                if not is_disk_full(exc):
                    log.warning("store: a batch of %d records failed (%s: %s); writing them one at a time", len(items),
                                type(exc).__name__, exc)
        for item in items:
            try:
                self._store_one(conn, item)
            except Exception as exc:
                self._failed([item.record], exc)

    def _store_one(self, conn: sqlite3.Connection, item: _Encoded) -> None:
        refused = self._room(conn, item.incoming)
        if refused == "too_large":
            self._drop_too_large(item.record, item.incoming)
        elif refused is not None:
            self._drop_disk_full(item.record)
        else:
            try:
                self._commit(conn, [item])
            except (OSError, sqlite3.Error) as exc:
                if not is_disk_full(exc):
                    raise
                self._drop_disk_full(item.record)

    def _room(self, conn: sqlite3.Connection, incoming: int) -> str | None:
        """_make_room, a disk too full for SQLite to delete counted as disk_full."""
        try:
            return self._make_room(incoming)
        except (OSError, sqlite3.Error) as exc:
            if not is_disk_full(exc):
                raise
            conn.rollback()  # deletes SQLite had no space to commit: none happened
            return "disk_full"

    def _commit(self, conn: sqlite3.Connection, items: list[_Encoded]) -> None:
        """Write the items' files (each fsynced and renamed), then their rows in one transaction. On failure
        the transaction is rolled back and the files removed: no file stays without its row."""
        names: list[str] = []
        rows = []
        try:
            for item in items:
                record = item.record
                day = time.strftime("%Y%m%d", time.gmtime(record.wall_time))
                frame_file = f"{FILES_DIR}/{day}/{record.inspection_id}.jpg" if item.frame_jpeg is not None else None
                mask_file = f"{FILES_DIR}/{day}/{record.inspection_id}.mask.png" if item.mask_png is not None else None
                for name, data in ((frame_file, item.frame_jpeg), (mask_file, item.mask_png)):
                    if name is not None and data is not None:
                        names.append(name)
                        write_bytes_atomic(self.path / name, data)
                size = sum(on_disk(self.path / name) for name in (frame_file, mask_file) if name)
                rows.append((record.inspection_id, record.wall_time, record.verdict.name, record.part_id,
                             record.acquisition_id, len(record.result.defects), frame_file, mask_file, size, item.body))
            conn.executemany(
                "INSERT OR REPLACE INTO records (id, wall_time, verdict, part_id, acquisition_id, defect_count,"
                " frame_file, mask_file, bytes, record) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            conn.commit()
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.rollback()  # the rows are not stored, so their files must not stay either
            for name in names:
                (self.path / name).unlink(missing_ok=True)
            raise
        with self._lock:  # counted only once committed
            self._written += len(rows)
            self._records += len(rows)
            self._bytes += sum(row[8] for row in rows)
            if self._full_drops:
                log.warning("store: writing records again, after %d dropped for lack of disk space", self._full_drops)
                self._full_drops = 0
            self._large_drops = 0

    def _drop_disk_full(self, record: InspectionRecord) -> None:
        """Count a record dropped for lack of space; the log says so once per episode, not per record."""
        free = self._free_mb()
        with self._lock:
            self._dropped["disk_full"] += 1
            self._last_error = (f"disk full: {free:.0f} MB free at {self.path}, less than store.min_free_mb "
                                f"{self.config.min_free_mb:g} with this record")
            self._full_drops += 1
            first = self._full_drops == 1
        if first:
            log.warning("store: disk full at %s (%.0f MB free, store.min_free_mb %g, even after retention): record %d "
                        "and the next ones are dropped until there is room", self.path, free, self.config.min_free_mb,
                        record.inspection_id)

    def _drop_too_large(self, record: InspectionRecord, incoming: int) -> None:
        """Count a record that cannot fit the budget even with no other record stored (nothing was deleted for
        it): a budget too small for the frames, not a full disk. Logged once until a record is stored again."""
        room = max(0, self._budget - self._overhead())
        with self._lock:
            self._dropped["too_large"] += 1
            self._last_error = (f"record too large for the store: {incoming / _MB:.2f} MB, and store.disk_budget_mb "
                                f"{self.config.disk_budget_mb:g} leaves {room / _MB:.2f} MB for records beside the "
                                "database and its WAL")
            self._large_drops += 1
            first = self._large_drops == 1
        if first:
            log.warning("store: record %d is too large for the store (%.2f MB; store.disk_budget_mb %g leaves %.2f MB "
                        "for records): it and the next ones that large are dropped (too_large); raise "
                        "store.disk_budget_mb", record.inspection_id, incoming / _MB, self.config.disk_budget_mb,
                        room / _MB)

    # ------------------------------------------------------------------ retention
    def _free_mb(self) -> float:
        return shutil.disk_usage(self.path).free / _MB

    def _make_room(self, incoming: int) -> str | None:
        """Delete the oldest records, as few as it takes, until ``incoming`` more bytes fit the budget and the
        free-space floor. None when they fit; else why not: ``too_large`` (more than the budget leaves for
        records even with none stored; nothing is deleted) or ``disk_full`` (the floor, with none stored)."""
        self._bound_wal()
        if incoming + self._overhead() > self._budget:
            return "too_large"
        while (excess := self._bytes + self._overhead() + incoming - self._budget) > 0:
            if not self._delete_oldest("disk_budget", excess):
                return "too_large"  # nothing left to delete: the database itself has outgrown the budget
        floor = int(self.config.min_free_mb * _MB)
        while (short := floor + incoming - shutil.disk_usage(self.path).free) > 0:
            if not self._delete_oldest("free_space", short):
                return "disk_full"
        return None

    def usage(self) -> int:
        """Bytes the store has on disk now: the records' files, the database, its WAL and index, the id mark
        and the directories (``StoreStats.bytes``)."""
        return self._bytes + self._overhead(reserve=False)

    def _overhead(self, *, reserve: bool = True) -> int:
        """Bytes on disk besides the records' files. ``reserve``: the WAL and its index counted at no less than
        the most they reach before the next checkpoint (the budget must hold between checkpoints too)."""
        wal, shm = on_disk(self.path / _DB_FILES[1]), on_disk(self.path / _DB_FILES[2])
        if reserve:
            wal, shm = max(wal, self._wal_reserve), max(shm, _SHM_RESERVE)
        total = on_disk(self.path / DB_NAME) + wal + shm + on_disk(self.path / IDS_NAME)
        files = self.path / FILES_DIR
        total += on_disk(self.path, self._block) + on_disk(files, self._block)
        with contextlib.suppress(OSError), os.scandir(files) as entries:
            total += sum(on_disk(Path(entry.path), self._block) for entry in entries if entry.is_dir())
        return total

    def _bound_wal(self) -> None:
        """A WAL grown past its size (a reader held off the auto-checkpoint) is checkpointed and truncated."""
        if self._conn is not None and on_disk(self.path / _DB_FILES[1]) > 2 * self._wal_cap:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _allocated(self, size: int) -> int:
        return -(-size // self._block) * self._block

    def _enforce_retention(self) -> None:
        self._last_retention = time.monotonic()
        cutoff = self._clock() - self.config.retention_days * 86400.0
        try:
            while self._delete_where("wall_time < ?", (cutoff,), "age", batch=500):
                pass
            self._make_room(0)
        except (OSError, sqlite3.Error) as exc:
            if self._conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.rollback()
            if is_disk_full(exc):
                return  # no room even to delete: the writer drops (and counts) records until there is
            log.error("store: retention failed: %s", exc)
            self._last_error = f"retention: {exc}"

    def _delete_oldest(self, reason: str, need: int) -> int:
        """Delete the oldest records whose files free at least ``need`` bytes: as many as that takes, at least one."""
        conn = self._conn
        if conn is None:
            return 0
        rows = []
        freed = 0
        cursor = conn.execute("SELECT id, frame_file, mask_file, bytes FROM records ORDER BY id")
        try:
            for row in cursor:
                rows.append(row)
                freed += max(int(row[3]), 1)
                if freed >= need:
                    break
        finally:
            cursor.close()
        return self._delete_rows(rows, reason)

    def _delete_where(self, where: str, params: tuple[Any, ...], reason: str, batch: int) -> int:
        conn = self._conn
        if conn is None:
            return 0
        rows = conn.execute(
            f"SELECT id, frame_file, mask_file, bytes FROM records WHERE {where} ORDER BY id LIMIT ?",
            (*params, batch),
        ).fetchall()
        return self._delete_rows(rows, reason)

    def _delete_rows(self, rows: list[Any], reason: str) -> int:
        conn = self._conn
        if conn is None or not rows:
            return 0
        conn.executemany("DELETE FROM records WHERE id = ?", [(r[0],) for r in rows])
        conn.commit()  # the rows go first: a crash now leaves orphan files, swept at start, never dangling rows
        freed = 0
        for _, frame_file, mask_file, _ in rows:
            for name in (frame_file, mask_file):
                if name:
                    freed += on_disk(self.path / name)
                    (self.path / name).unlink(missing_ok=True)
        with self._lock:
            self._records -= len(rows)
            self._bytes -= freed
            self._deleted[reason] += len(rows)
        self._remove_empty_days()
        return len(rows)

    def _remove_empty_days(self) -> None:
        for day in (self.path / FILES_DIR).iterdir():
            with contextlib.suppress(OSError):
                day.rmdir()  # only succeeds when empty

    def _sweep_orphans(self) -> None:
        conn = self._conn
        if conn is None:
            return
        known = {name for row in conn.execute("SELECT frame_file, mask_file FROM records") for name in row if name}
        removed = 0
        kept = 0
        for path in (self.path / FILES_DIR).rglob("*"):
            if path.is_file():
                if path.relative_to(self.path).as_posix() not in known:
                    path.unlink(missing_ok=True)
                    removed += 1
                else:
                    kept += on_disk(path)
        self._bytes = kept
        if removed:
            log.info("store: removed %d file(s) left by an interrupted write", removed)

    # ------------------------------------------------------------------ queries
    def stats(self) -> StoreStats:
        with self._lock:
            return StoreStats(
                enabled=True, path=str(self.path), records=self._records, bytes=self.usage(), written=self._written,
                dropped=dict(self._dropped), deleted=dict(self._deleted),
                queue_depth=self._queue.qsize() + self._encoded.qsize(),
                queue_size=self.config.queue_size, last_error=self._last_error,
            )

    def list(
        self, *, limit: int = 50, before: int | None = None, verdict: str | None = None,
        part_id: str | None = None, since: float | None = None, until: float | None = None,
    ) -> list[dict[str, Any]]:
        """Newest first; page with ``before`` = the last id of the previous page."""
        clauses: list[str] = ["1"]
        params: list[Any] = []
        for clause, value in (("id < ?", before), ("verdict = ?", verdict), ("part_id = ?", part_id),
                              ("wall_time >= ?", since), ("wall_time < ?", until)):
            if value is not None:
                clauses.append(clause)
                params.append(value)
        with self._reader() as conn:
            rows = conn.execute(
                f"SELECT record FROM records WHERE {' AND '.join(clauses)} ORDER BY id DESC LIMIT ?",
                (*params, limit),
            ).fetchall()
        return [_public(json.loads(row["record"])) for row in rows]

    def get(self, record_id: int) -> dict[str, Any] | None:
        row = self._row(record_id)
        return None if row is None else _public(json.loads(row["record"]))

    def _row(self, record_id: int) -> sqlite3.Row | None:
        with self._reader() as conn:
            row: sqlite3.Row | None = conn.execute("SELECT * FROM records WHERE id = ?", (record_id,)).fetchone()
        return row

    def frame_jpeg(self, record_id: int) -> bytes | None:
        row = self._row(record_id)
        if row is None or not row["frame_file"]:
            return None
        try:
            return (self.path / row["frame_file"]).read_bytes()
        except FileNotFoundError:
            return None

    def overlay_jpeg(self, record_id: int, width: int | None = None, quality: int = 85,
                     max_side: int | None = None) -> bytes | None:
        """The stored frame with its stored masks drawn on it, rebuilt from the row: at most ``width`` wide and
        ``max_side`` on its longer side (never enlarged). The JPEG is decoded at 1/2, 1/4 or 1/8 where that
        still holds the output (libjpeg scales as it decodes: a 4 MP frame drawn 640 wide decodes 672x380,
        not 12 MB of pixels)."""
        row = self._row(record_id)
        if row is None or not row["frame_file"]:
            return None
        labels = cv2.imread(str(self.path / row["mask_file"]), cv2.IMREAD_UNCHANGED) if row["mask_file"] else None
        result = result_from_dict(json.loads(row["record"]), labels)
        del labels  # the defects hold their own masks
        full_w, full_h = result.frame_width, result.frame_height
        scale = overlay_scale(full_w, full_h, width, max_side)
        reduction = next((f for f in (8, 4, 2) if full_w > 0 and f * scale <= 1.0), 1)
        frame = cv2.imread(str(self.path / row["frame_file"]), _DECODE_REDUCED[reduction])
        if frame is None:
            return None
        if full_w <= 0 or full_h <= 0:  # a row without the frame's size: scale what was decoded
            full_h, full_w = frame.shape[:2]
            scale = overlay_scale(full_w, full_h, width, max_side)
        size = (max(1, round(full_w * scale)), max(1, round(full_h * scale)))
        canvas = render_overlay(frame, result, scale=scale, size=size)
        del frame
        ok, buf = cv2.imencode(".jpg", canvas, [cv2.IMWRITE_JPEG_QUALITY, quality])
        return buf.tobytes() if ok else None


def on_disk(path: Path, minimum: int = 0) -> int:
    """What a file or directory takes on disk: its size or its allocated blocks, whichever is more, at least
    ``minimum`` (a directory's block where the filesystem reports none); 0 when it is not there."""
    try:
        st = path.stat()
    except OSError:
        return 0
    return max(st.st_size, st.st_blocks * 512, minimum)


def is_disk_full(exc: BaseException) -> bool:
    """A write refused for lack of space: ENOSPC or EDQUOT from the OS, SQLITE_FULL from SQLite."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(exc, sqlite3.Error) and (
        getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(exc))


# cv2.imread flags decoding a JPEG at 1/1, 1/2, 1/4 or 1/8 of its size (RecordStore.overlay_jpeg)
_DECODE_REDUCED = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
                   8: cv2.IMREAD_REDUCED_COLOR_8}


def _public(record: dict[str, Any]) -> dict[str, Any]:
    record["stored"] = True
    return record


# A label image is flat runs of a few values: no PNG row filter and run-length deflate encode a 4 MP one in
# 4 ms to about 5 KB, where OpenCV's default (adaptive filters) took 22 ms for 19 KB, more than the frame's JPEG.
_LABEL_PNG = [cv2.IMWRITE_PNG_COMPRESSION, 3, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]
if hasattr(cv2, "IMWRITE_PNG_FILTER"):  # not in every OpenCV build
    _LABEL_PNG += [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE]


def encode_label_mask(result: InspectionResult) -> bytes:
    dtype = np.uint8 if len(result.defects) < 256 else np.uint16
    labels = np.zeros((result.frame_height, result.frame_width), dtype=dtype)
    for index, defect in enumerate(result.defects):
        x, y, w, h = defect.bbox
        region = labels[y : y + h, x : x + w]
        region[defect.mask[: region.shape[0], : region.shape[1]]] = index + 1
    ok, buf = cv2.imencode(".png", labels, _LABEL_PNG)
    if not ok:  # pragma: no cover - encoding a valid array does not fail
        raise ValueError("mask could not be PNG-encoded")
    return bytes(buf.tobytes())


def result_from_dict(record: dict[str, Any], labels: np.ndarray | None) -> InspectionResult:
    """Rebuild an InspectionResult (masks included, from the label image) from a stored record."""
    defects = []
    for index, d in enumerate(record.get("defects", [])):
        x, y, w, h = d["bbox"]
        mask = (labels[y : y + h, x : x + w] == index + 1) if labels is not None else np.ones((h, w), dtype=bool)
        defects.append(Defect(
            class_id=d["class_id"], class_name=d["class"], score=d["score"], predicted_iou=d["predicted_iou"],
            area_px=d["area_px"], bbox=(x, y, w, h), centroid=tuple(d["centroid"]), point=tuple(d["point"]),
            mask=mask,
        ))
    frame = record.get("frame", {})
    return InspectionResult(
        frame_width=frame.get("width", 0), frame_height=frame.get("height", 0), verdict=Verdict[record["verdict"]],
        defects=tuple(defects), max_peak_score=record.get("max_peak_score", 0.0),
    )


def disabled_stats(config: StoreSection) -> StoreStats:
    return StoreStats(enabled=False, path=str(config.path), records=0, bytes=0, written=0,
                      dropped={"queue_full": 0, "disk_full": 0, "too_large": 0, "error": 0},
                      deleted={"age": 0, "disk_budget": 0, "free_space": 0}, queue_depth=0, queue_size=0,
                      last_error=None)
