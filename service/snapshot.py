"""Record store snapshots: the records of a time range, consistent, out of a running store, and back.

A snapshot is itself a record store directory (service/store.py): ``records.sqlite3`` holding the
rows of the range, ``files/YYYYMMDD/<id>.jpg`` and ``<id>.mask.png`` for them, ``ids.json`` with the
source's id mark, and beside them

* ``records.jsonl``: one record a line, as ``/api/results/{id}`` returns it (without ``stored`` and
  ``links``), with ``frame_file`` and ``mask_file``, the snapshot's paths of its files;
* ``records.csv``: one row a record (id, time, verdict, part, defects, files), for a spreadsheet;
* ``snapshot.json``: what was exported (source, range, counts, format version);
* ``SHA256SUMS``: every other file's SHA-256, as ``sha256sum -c`` reads it.

Consistency while the daemon writes: the rows of the range are read in one read transaction (SQLite
WAL: a reader sees the database as of its first read and never blocks the writer), held only while
the rows are read; the files are copied after it. A file is complete once its row exists (the store
renames it into place before the row commits), so the only change that can reach the copy is
retention deleting a record after the read: such a record is left out of the snapshot, and counted.

Written atomically: everything goes to a hidden ``.<name>.partial-<pid>`` beside ``out``, fsynced,
then renamed (a folder) or hard-linked (a tarball, so an ``out`` made meanwhile is never replaced)
into place; any error, Ctrl-C or SIGTERM removes the partial copy. ``out`` never holds half a snapshot.

Restoring: a folder snapshot copied to ``store.path`` is a store the daemon opens as it is;
``import_snapshot`` checks a snapshot (every checksum, the database's integrity, every row's files)
and puts it into a fresh store directory the same atomic way.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import sqlite3
import tarfile
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

from engines.errors import DefectsamError
from service.ids import IDS_NAME, IdError, read_mark, write_mark
from service.pipeline.record import iso_time
from service.store import DB_NAME, FILES_DIR, SCHEMA

FORMAT = "defectsam-store-snapshot"
VERSION = 1
INDEX_JSONL = "records.jsonl"
INDEX_CSV = "records.csv"
MANIFEST = "snapshot.json"
SUMS = "SHA256SUMS"
TAR_SUFFIXES = (".tar.gz", ".tgz")
CSV_COLUMNS = ("id", "captured_at", "wall_time", "verdict", "part_id", "acquisition_id", "trigger_id", "bundle",
               "defect_count", "defect_classes", "max_defect_score", "frame_file", "mask_file")
_COLUMNS = "id, wall_time, verdict, part_id, acquisition_id, defect_count, frame_file, mask_file, bytes, record"
_AGE = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

Progress = Callable[[int, int], None]  # (records done, records in the range)


class SnapshotError(DefectsamError):
    """A store that cannot be read, a snapshot that cannot be used, an output that cannot be written."""


@dataclass(frozen=True)
class ExportSummary:
    out: Path
    records: int
    vanished: int  # rows of the range retention deleted before their files were copied
    bytes: int  # the snapshot's size (a tarball's, or the folder's files)
    since: float | None
    until: float | None


@dataclass(frozen=True)
class ImportSummary:
    store: Path
    records: int
    files: int


# ---------------------------------------------------------------------------------------------- times
def parse_time(text: str, *, flag: str, now: float | None = None) -> float:
    """A point in time as Unix seconds: ISO 8601 (``2026-12-04T13:00:00Z``, ``2026-12-04``; without a zone it is
    this machine's local time, as ``date`` and ``journalctl`` read it), Unix seconds (``1796389200``), an age
    (``30m``, ``24h``, ``7d``: that long before now) or ``now``. ``flag`` names the option in the error."""
    value = text.strip()
    now = time.time() if now is None else now
    if value == "now":
        return now
    if re.fullmatch(r"\d+(?:\.\d+)?", value):
        return float(value)
    if age := _AGE.fullmatch(value):
        return now - float(age.group(1)) * _UNIT_S[age.group(2)]
    try:
        parsed = datetime.fromisoformat(value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value)
    except ValueError:
        raise SnapshotError(f"{flag} {text!r}: not a time; give ISO 8601 (2026-12-04T13:00:00Z, 2026-12-04; no zone: "
                            "local time), Unix seconds, or an age (30m, 24h, 7d)") from None
    return parsed.astimezone().timestamp() if parsed.tzinfo is None else parsed.timestamp()


# ---------------------------------------------------------------------------------------------- export
def export_snapshot(store: Path, out: Path, *, since: float | None = None, until: float | None = None,
                    progress: Progress | None = None) -> ExportSummary:
    """Write the records captured in [since, until) of the store at ``store`` (running or not) to ``out``: a
    ``.tar.gz``/``.tgz`` tarball, else a folder. ``out`` must not exist."""
    if since is not None and until is not None and since >= until:
        raise SnapshotError(f"--since {iso_time(since)} is not before --until {iso_time(until)}: the range is empty")
    tarball = out.name.endswith(TAR_SUFFIXES)
    if out.exists() or out.is_symlink():
        raise SnapshotError(f"{out}: already exists; name a new file or folder (a snapshot never overwrites)")
    if not out.parent.is_dir():
        raise SnapshotError(f"{out.parent}: no such directory to write {out.name} in")
    source = _open_source(store)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        staging.mkdir()
    except OSError as exc:
        source.close()
        raise SnapshotError(f"{out.parent}: cannot write there: {exc.strerror or exc}") from None
    try:
        root = staging / _snapshot_name(out) if tarball else staging / "snapshot"
        root.mkdir()
        db = _copy_rows(source, root / DB_NAME, since, until)  # closes source: the read transaction is over
        sink: _Sink = _TarSink(staging / "snapshot.tar.gz", root.name) if tarball else _DirSink(root)
        try:
            records, vanished, sums = _copy_files(store, db, sink, progress)
            _write_ids(store, db, root / IDS_NAME)
            manifest = _manifest(store, db, since, until, records, vanished)
            sums.update(_write_index(db, root, manifest))
            db.close()
            sums[DB_NAME] = _sha256_file(root / DB_NAME)
            sums[IDS_NAME] = _sha256_file(root / IDS_NAME)
            sink.finish(root, [DB_NAME, IDS_NAME, INDEX_JSONL, INDEX_CSV, MANIFEST], sums)
        finally:
            db.close()
            sink.close()
        size = sink.size()
        if out.exists() or out.is_symlink():
            raise SnapshotError(f"{out}: appeared while the snapshot was written; it is left as it was")
        if tarball:
            os.link(staging / "snapshot.tar.gz", out)  # fails rather than replace an out made meanwhile
        else:
            os.rename(root, out)
        _fsync_dir(out.parent)
    except OSError as exc:
        raise SnapshotError(f"{out}: cannot be written: {exc.strerror or exc}"
                            + (f" ({exc.filename})" if exc.filename else "")) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportSummary(out=out, records=records, vanished=vanished, bytes=size, since=since, until=until)


def _snapshot_name(out: Path) -> str:
    name = out.name
    for suffix in TAR_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)] or "snapshot"
    return name


def _open_source(store: Path) -> sqlite3.Connection:
    """The store's database, read only (nothing is created or changed), checked to be a record store."""
    db = store / DB_NAME
    if not store.is_dir():
        raise SnapshotError(f"--store {store}: no such directory")
    if not db.is_file():
        raise SnapshotError(f"--store {store}: not a record store (no {DB_NAME})")
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10.0, isolation_level=None)
        try:
            found = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'records'").fetchone()
        except sqlite3.Error:
            conn.close()
            raise
    except sqlite3.Error as exc:
        raise SnapshotError(f"--store {store}: {DB_NAME} cannot be read: {exc}") from None
    if found is None:
        conn.close()
        raise SnapshotError(f"--store {store}: {DB_NAME} is not a record store's database (no records table)")
    return conn


def _copy_rows(source: sqlite3.Connection, path: Path, since: float | None, until: float | None) -> sqlite3.Connection:
    """The rows of the range into a new database at ``path``, read in one read transaction of ``source``,
    which is closed after it."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=DELETE")  # one file, no WAL: the daemon switches a restored store to WAL
    db.executescript(SCHEMA)
    clauses, params = ["1"], []
    for clause, value in (("wall_time >= ?", since), ("wall_time < ?", until)):
        if value is not None:
            clauses.append(clause)
            params.append(value)
    try:
        source.execute("BEGIN")  # the snapshot: every read below sees the database as of the first
        cursor = source.execute(f"SELECT {_COLUMNS} FROM records WHERE {' AND '.join(clauses)} ORDER BY id", params)
        db.execute("BEGIN")
        while rows := cursor.fetchmany(500):
            db.executemany(f"INSERT INTO records ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        high = int(source.execute("SELECT COALESCE(MAX(id), 0) FROM records").fetchone()[0])
        db.execute("COMMIT")
        source.execute("COMMIT")
    except sqlite3.Error as exc:
        db.close()
        raise SnapshotError(f"reading the store's records failed: {exc}") from None
    finally:
        source.close()
    db.execute("CREATE TABLE snapshot_meta (key TEXT PRIMARY KEY, value INTEGER)")
    db.execute("INSERT INTO snapshot_meta VALUES ('source_max_id', ?)", (high,))
    return db


class _Sink:
    """Where the snapshot's files go: a folder or a tarball."""

    def add(self, name: str, data: bytes) -> None:
        raise NotImplementedError

    def finish(self, root: Path, names: list[str], sums: dict[str, str]) -> None:
        """Add the files written in ``root`` (``names``) and ``SHA256SUMS`` last; make it all durable."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def size(self) -> int:
        raise NotImplementedError


class _DirSink(_Sink):
    def __init__(self, root: Path) -> None:
        self.root = root
        self._bytes = 0

    def add(self, name: str, data: bytes) -> None:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        self._bytes += len(data)

    def finish(self, root: Path, names: list[str], sums: dict[str, str]) -> None:
        (root / SUMS).write_bytes(_sums_text(sums))
        for name in [*names, SUMS]:
            with open(root / name, "rb+") as handle:
                os.fsync(handle.fileno())
            self._bytes += (root / name).stat().st_size
        for directory in {p.parent for p in root.rglob("*") if p.is_file()} | {root}:
            _fsync_dir(directory)

    def size(self) -> int:
        return self._bytes


class _TarSink(_Sink):
    def __init__(self, path: Path, top: str) -> None:
        self.path = path
        self.top = top
        # JPEG and PNG do not compress: the fastest level, as the box is inspecting meanwhile
        self._tar = tarfile.open(path, "w:gz", compresslevel=1, format=tarfile.PAX_FORMAT)  # noqa: SIM115 (closed by close())
        self._dirs: set[str] = set()
        self._mtime = time.time()

    def _dir(self, name: str) -> None:
        parts = PurePosixPath(name).parts
        for depth in range(1, len(parts)):
            directory = "/".join(parts[:depth])
            if directory not in self._dirs:
                self._dirs.add(directory)
                info = tarfile.TarInfo(f"{self.top}/{directory}")
                info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, int(self._mtime)
                self._tar.addfile(info)

    def add(self, name: str, data: bytes) -> None:
        if not self._dirs:
            info = tarfile.TarInfo(self.top)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, int(self._mtime)
            self._tar.addfile(info)
            self._dirs.add("")
        self._dir(name)
        info = tarfile.TarInfo(f"{self.top}/{name}")
        info.size, info.mode, info.mtime = len(data), 0o644, int(self._mtime)
        self._tar.addfile(info, io.BytesIO(data))

    def finish(self, root: Path, names: list[str], sums: dict[str, str]) -> None:
        for name in names:
            self.add(name, (root / name).read_bytes())
        self.add(SUMS, _sums_text(sums))
        self._tar.close()
        with open(self.path, "rb+") as handle:
            os.fsync(handle.fileno())

    def close(self) -> None:
        self._tar.close()

    def size(self) -> int:
        return self.path.stat().st_size


def _copy_files(store: Path, db: sqlite3.Connection, sink: _Sink,
                progress: Progress | None) -> tuple[int, int, dict[str, str]]:
    """Each row's frame and mask into ``sink``; a row whose file retention removed since the read is deleted from
    the snapshot. Returns (records kept, records vanished, the files' SHA-256)."""
    total = int(db.execute("SELECT COUNT(*) FROM records").fetchone()[0])
    rows = db.execute("SELECT id, frame_file, mask_file FROM records ORDER BY id").fetchall()
    vanished = []
    sums: dict[str, str] = {}
    for done, (record_id, *names) in enumerate(rows, 1):
        data = _read_files(store, record_id, [name for name in names if name])
        if data is None:
            vanished.append(record_id)
        else:
            for name, body in data.items():
                sink.add(name, body)
                sums[name] = hashlib.sha256(body).hexdigest()
        if progress is not None:
            progress(done, total)
    if vanished:
        db.execute("BEGIN")
        db.executemany("DELETE FROM records WHERE id = ?", [(i,) for i in vanished])
        db.execute("COMMIT")
    return total - len(vanished), len(vanished), sums


def _read_files(store: Path, record_id: int, names: list[str]) -> dict[str, bytes] | None:
    """A record's files; None when one is gone (retention deleted the record after the rows were read)."""
    data = {}
    for name in names:
        _check_name(name, f"record {record_id}")
        try:
            data[name] = (store / name).read_bytes()
        except FileNotFoundError:
            return None
    return data


def _check_name(name: str, where: str) -> None:
    """A file name from a row: under files/, no way out of the store."""
    parts = PurePosixPath(name).parts
    if len(parts) < 2 or parts[0] != FILES_DIR or ".." in parts or name.startswith("/") or "\\" in name:
        raise SnapshotError(f"{where}: file name {name!r} is not under {FILES_DIR}/")


def _write_ids(store: Path, db: sqlite3.Connection, path: Path) -> None:
    """The id mark: the source's, so a store restored from the snapshot never hands out an id the source has."""
    try:
        mark = read_mark(store / IDS_NAME)
    except IdError as exc:
        raise SnapshotError(str(exc)) from None
    high = int(db.execute("SELECT value FROM snapshot_meta WHERE key = 'source_max_id'").fetchone()[0])
    write_mark(path, max(mark, high))
    db.execute("DROP TABLE snapshot_meta")


def _manifest(store: Path, db: sqlite3.Connection, since: float | None, until: float | None, records: int,
              vanished: int) -> dict[str, Any]:
    first, last = db.execute("SELECT MIN(id), MAX(id) FROM records").fetchone()
    verdicts = dict(db.execute("SELECT verdict, COUNT(*) FROM records GROUP BY verdict ORDER BY verdict").fetchall())
    return {
        "format": FORMAT, "version": VERSION, "created_at": iso_time(time.time()), "source": str(store.resolve()),
        "since": None if since is None else iso_time(since), "until": None if until is None else iso_time(until),
        "since_unix": since, "until_unix": until, "records": records, "first_id": first, "last_id": last,
        "verdicts": verdicts, "vanished": vanished,
    }


def _write_index(db: sqlite3.Connection, root: Path, manifest: dict[str, Any]) -> dict[str, str]:
    """records.jsonl, records.csv and snapshot.json in ``root``; returns their SHA-256 (and the files')."""
    sums: dict[str, str] = {}
    jsonl = hashlib.sha256()
    with open(root / INDEX_JSONL, "w", encoding="utf-8", newline="\n") as lines, \
            open(root / INDEX_CSV, "w", encoding="utf-8", newline="") as table:
        writer = csv.writer(table)
        writer.writerow(CSV_COLUMNS)
        for record in _records(db):
            line = json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n"
            lines.write(line)
            jsonl.update(line.encode("utf-8"))
            writer.writerow(_csv_row(record))
    sums[INDEX_JSONL] = jsonl.hexdigest()
    sums[INDEX_CSV] = _sha256_file(root / INDEX_CSV)
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    sums[MANIFEST] = _sha256_file(root / MANIFEST)
    return sums


def _records(db: sqlite3.Connection) -> Iterator[dict[str, Any]]:
    for frame_file, mask_file, body in db.execute("SELECT frame_file, mask_file, record FROM records ORDER BY id"):
        yield {**json.loads(body), "frame_file": frame_file, "mask_file": mask_file}


def _csv_row(record: dict[str, Any]) -> list[Any]:
    defects = record.get("defects", [])
    classes = Counter(d.get("class") for d in defects)
    return [record["id"], record.get("captured_at"), record.get("wall_time"), record.get("verdict"),
            record.get("part_id") or "", record.get("acquisition_id"), record.get("trigger_id") or "",
            record.get("bundle"), len(defects), ";".join(f"{name}:{n}" for name, n in sorted(classes.items())),
            max((d.get("score", 0.0) for d in defects), default=""), record.get("frame_file") or "",
            record.get("mask_file") or ""]


def _sums_text(sums: dict[str, str]) -> bytes:
    return "".join(f"{digest}  {name}\n" for name, digest in sorted(sums.items())).encode("utf-8")


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------- import
def import_snapshot(snapshot: Path, store: Path) -> ImportSummary:
    """Check the snapshot (a folder or a tarball ``export_snapshot`` wrote) and make it the store at ``store``,
    which must not exist or be an empty directory."""
    if not snapshot.exists():
        raise SnapshotError(f"{snapshot}: no such file or directory")
    if store.exists() and (not store.is_dir() or any(store.iterdir())):
        raise SnapshotError(f"--store {store}: exists and is not empty; restore into a fresh store directory")
    if not store.parent.is_dir():
        raise SnapshotError(f"--store {store}: no such directory {store.parent}")
    staging = store.parent / f".{store.name}.partial-{os.getpid()}"
    try:
        staging.mkdir()
        root = _unpack(snapshot, staging)
        records, files = _verify(snapshot, root)
        for name in (INDEX_JSONL, INDEX_CSV, MANIFEST, SUMS):
            (root / name).unlink()
        for path in sorted(root.rglob("*"), reverse=True):
            if path.is_file():
                with open(path, "rb+") as handle:
                    os.fsync(handle.fileno())
            _fsync_dir(path if path.is_dir() else path.parent)
        if store.exists() and any(store.iterdir()):
            raise SnapshotError(f"--store {store}: was filled while the snapshot was restored; it is left as it was")
        os.rename(root, store)  # replaces an empty directory, never a filled one
        _fsync_dir(store.parent)
    except OSError as exc:
        raise SnapshotError(f"--store {store}: cannot be written: {exc.strerror or exc}"
                            + (f" ({exc.filename})" if exc.filename else "")) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ImportSummary(store=store, records=records, files=files)


def _unpack(snapshot: Path, staging: Path) -> Path:
    """The snapshot's files in ``staging``; returns the snapshot's root there."""
    if snapshot.is_dir():
        root = staging / "snapshot"
        shutil.copytree(snapshot, root, symlinks=True)
        return root
    try:
        with tarfile.open(snapshot, "r:gz") as tar:
            members = tar.getmembers()
            tops = {PurePosixPath(m.name).parts[0] for m in members if PurePosixPath(m.name).parts}
            for member in members:
                if not (member.isfile() or member.isdir()):
                    raise SnapshotError(f"{snapshot}: {member.name!r} is not a file or directory; not a snapshot")
            if len(tops) != 1:
                raise SnapshotError(f"{snapshot}: not a snapshot (one top-level folder expected, found {len(tops)})")
            tar.extractall(staging, filter="data")  # refuses absolute names, '..', links out
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise SnapshotError(f"{snapshot}: not a readable .tar.gz snapshot: {exc}") from None
    return staging / tops.pop()


def _verify(snapshot: Path, root: Path) -> tuple[int, int]:
    """Every checksum, the manifest's format, the database's integrity, every row's files; (records, files)."""
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
        sums_text = (root / SUMS).read_text(encoding="utf-8")
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"{snapshot}: not a snapshot ({MANIFEST} or {SUMS} unreadable: {exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SnapshotError(f"{snapshot}: {MANIFEST} is not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise SnapshotError(f"{snapshot}: snapshot format version {manifest.get('version')!r}; this defectsam reads "
                            f"version {VERSION}")
    listed = {}
    for line in sums_text.splitlines():
        digest, _, name = line.partition("  ")
        listed[name] = digest
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {SUMS}
    if present != set(listed):
        extra, missing = sorted(present - set(listed)), sorted(set(listed) - present)
        raise SnapshotError(f"{snapshot}: files do not match {SUMS}: missing {missing[:3]}, not listed {extra[:3]}")
    for name, digest in sorted(listed.items()):
        if _sha256_file(root / name) != digest:
            raise SnapshotError(f"{snapshot}: {name}: checksum mismatch (damaged or edited since export)")
    try:
        db = sqlite3.connect(f"file:{root / DB_NAME}?mode=ro", uri=True)
        try:
            check = db.execute("PRAGMA integrity_check").fetchone()[0]
            rows = db.execute("SELECT id, frame_file, mask_file FROM records").fetchall()
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise SnapshotError(f"{snapshot}: {DB_NAME} cannot be read: {exc}") from None
    if check != "ok":
        raise SnapshotError(f"{snapshot}: {DB_NAME} fails SQLite's integrity check: {check}")
    files = 0
    for record_id, *names in rows:
        for name in names:
            if name:
                _check_name(name, f"{snapshot}: record {record_id}")
                if not (root / name).is_file():
                    raise SnapshotError(f"{snapshot}: record {record_id}: {name} is missing")
                files += 1
    if len(rows) != manifest.get("records"):
        raise SnapshotError(f"{snapshot}: {DB_NAME} has {len(rows)} records, {MANIFEST} says {manifest.get('records')}")
    try:
        read_mark(root / IDS_NAME)
    except IdError as exc:
        raise SnapshotError(f"{snapshot}: {exc}") from None
    return len(rows), files

