"""``defectsam store export`` / ``import``: snapshots of a real store, out of a daemon that keeps writing, and back."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from engines.results import Verdict
from service.cli import main
from service.config import StoreSection
from service.ids import read_mark
from service.snapshot import SnapshotError, export_snapshot, import_snapshot, parse_time
from service.store import RecordStore

from .conftest import REPO
from .daemon_support import AUTH_HEADER, base_url, get_json, http, make_config, make_record, ng_bundle, running_daemon
from .support import wait_for


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """The command as cron runs it: its own process, beside the daemon."""
    return subprocess.run([sys.executable, "-m", "service.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})


def _api_records(url: str, since: float, until: float) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    page: str | None = f"{url}/api/results?limit=200&since={since!r}&until={until!r}"
    while page:
        status, body = get_json(page if page.startswith("http") else url + page, headers=AUTH_HEADER)
        assert status == 200, body
        items += body["items"]
        page = body["next"]
    return sorted(items, key=lambda item: item["id"])


def _tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path, "r:gz") as tar:
        return {m.name.split("/", 1)[1]: tar.extractfile(m).read()  # type: ignore[union-attr]
                for m in tar.getmembers() if m.isfile()}


@pytest.mark.slow
def test_export_while_the_daemon_writes_matches_the_api_and_restores_into_a_store_a_new_daemon_serves(
    tiny_bundle_master: Path, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    bundle = ng_bundle(tiny_bundle_master, tmp_path_factory.getbasetemp())
    config = make_config(tmp_path / "station", bundle)
    store_path = config.store.path
    with running_daemon(config) as daemon:
        url = base_url(daemon)
        wait_for(lambda: daemon.store.stats().written >= 12, timeout=90, what="12 stored records")
        _, page = get_json(f"{url}/api/results?limit=200", headers=AUTH_HEADER)
        stored = sorted(page["items"], key=lambda item: item["id"])
        # the range ends at a stored record: every record captured before it is stored already (one FIFO
        # writer), so the daemon writing on cannot add to the range, and the export can be held to the API
        since, until = stored[2]["wall_time"], stored[-2]["wall_time"]
        tarball = tmp_path / "station-backup.tar.gz"
        result = _cli("store", "export", "--store", store_path, "--out", tarball, "--since", repr(since),
                      "--until", repr(until))
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("exported ") and str(tarball) in result.stdout
        full = tmp_path / "full"
        assert _cli("store", "export", "--store", store_path, "--out", full).returncode == 0
        api = _api_records(url, since, until)
        assert daemon.store.stats().written > len(stored)  # it kept writing meanwhile
    # every record the page showed within the range is in it (more may have come since the page was read)
    # strictly inside: the page's wall_time is rounded, so the record at `since` may fall either side of it
    shown = [item["id"] for item in stored if since < item["wall_time"] < until]
    assert len(shown) >= 5 and set(shown) <= {item["id"] for item in api}

    members = _tar_members(tarball)
    rows = [json.loads(line) for line in members["records.jsonl"].decode().splitlines()]
    assert [r["id"] for r in rows] == [a["id"] for a in api]
    for row, item in zip(rows, api, strict=True):
        assert {k: v for k, v in row.items() if k not in ("frame_file", "mask_file")} == \
            {k: v for k, v in item.items() if k not in ("stored", "links")}
        assert row["verdict"] == "NG" and members[row["frame_file"]][:2] == b"\xff\xd8" and row["mask_file"] in members
    table = list(csv.DictReader(io.StringIO(members["records.csv"].decode())))
    assert [int(r["id"]) for r in table] == [a["id"] for a in api] and table[0]["verdict"] == "NG"
    assert table[0]["defect_classes"].startswith("scratch:")
    lines = members["SHA256SUMS"].decode().splitlines()
    sums = {name: digest for digest, name in (line.split("  ", 1) for line in lines)}
    assert set(sums) == set(members) - {"SHA256SUMS"}
    assert all(hashlib.sha256(members[name]).hexdigest() == digest for name, digest in sums.items())
    manifest = json.loads(members["snapshot.json"])
    assert manifest["records"] == len(api) and manifest["vanished"] == 0 and manifest["since_unix"] == since
    # the full export, taken while records were committed, is whole: every row has its files, every sum holds
    assert subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=full).returncode == 0
    full_rows = [json.loads(line) for line in (full / "records.jsonl").read_text().splitlines()]
    assert len(full_rows) >= len(stored) and all((full / r["frame_file"]).is_file() for r in full_rows)

    # restore the range into a fresh store; a new daemon serves its records, frames and overlays
    restored = tmp_path / "restored-store"
    result = _cli("store", "import", tarball, "--store", restored)
    assert result.returncode == 0 and f"restored {len(api)} records" in result.stdout, result.stderr
    assert read_mark(restored / "ids.json") >= max(r["id"] for r in full_rows)
    config = make_config(tmp_path / "restored", bundle, store={"path": str(restored)})
    with running_daemon(config) as daemon:
        url = base_url(daemon)
        for row in rows:
            status, item = get_json(f"{url}/api/results/{row['id']}", headers=AUTH_HEADER)
            assert status == 200 and item["stored"] is True and item["defects"] == row["defects"]
            status, _, jpeg = http("GET", f"{url}/api/results/{row['id']}/frame.jpg", headers=AUTH_HEADER)
            assert status == 200 and jpeg == members[row["frame_file"]]
        status, _, overlay = http("GET", f"{url}/api/results/{rows[0]['id']}/overlay.jpg", headers=AUTH_HEADER)
        assert status == 200 and overlay[:2] == b"\xff\xd8"
        new = wait_for(lambda: daemon.store.stats().written >= 1, timeout=60, what="a new record")
        assert new
        _, latest = get_json(f"{url}/api/results?limit=1", headers=AUTH_HEADER)
        assert latest["items"][0]["id"] > max(r["id"] for r in full_rows)  # no id of the source station reissued


def _small_store(tmp_path: Path, n: int = 12) -> Path:
    config = StoreSection.model_validate({"path": str(tmp_path / "store"), "min_free_mb": 0, "ok_sample_share": 1.0})
    store = RecordStore(config)
    store.open()
    store.start()
    for i in range(1, n + 1):
        store.offer(make_record(i, Verdict.NG if i % 3 else Verdict.OK, wall_time=1_800_000_000.0 + i))
    store.stop()
    return config.path


def test_a_folder_snapshot_is_a_store_as_it_is(tmp_path: Path) -> None:
    """Restoring by copying: the folder opens as a store, with the records of the range and their frames."""
    source = _small_store(tmp_path)
    summary = export_snapshot(source, tmp_path / "snap", since=1_800_000_004.0, until=1_800_000_010.0)
    assert summary.records == 6 and summary.vanished == 0
    store = RecordStore(StoreSection.model_validate({"path": str(tmp_path / "snap"), "min_free_mb": 0}))
    assert store.open() == 9
    assert [r["id"] for r in store.list(limit=50)] == [9, 8, 7, 6, 5, 4]
    assert store.frame_jpeg(5) == (source / store._row(5)["frame_file"]).read_bytes()  # type: ignore[index]
    assert store.ids is not None and store.ids.next_free > 12  # after the source's mark
    store.stop()


def test_a_record_whose_files_went_is_left_out_and_counted(tmp_path: Path) -> None:
    source = _small_store(tmp_path)
    row = RecordStore(StoreSection.model_validate({"path": str(source)}))._row(4)
    (source / row["frame_file"]).unlink()  # type: ignore[index]  # as retention does after the rows were read
    summary = export_snapshot(source, tmp_path / "snap.tar.gz")
    assert summary.records == 11 and summary.vanished == 1
    ids = [json.loads(line)["id"] for line in _tar_members(tmp_path / "snap.tar.gz")["records.jsonl"].splitlines()]
    assert 4 not in ids and len(ids) == 11
    assert import_snapshot(tmp_path / "snap.tar.gz", tmp_path / "restored").records == 11


def test_ctrl_c_leaves_nothing_half_written(tmp_path: Path) -> None:
    source = _small_store(tmp_path)

    def interrupt(done: int, total: int) -> None:
        if done == 5:
            raise KeyboardInterrupt

    for out in (tmp_path / "snap.tar.gz", tmp_path / "snapdir"):
        with pytest.raises(KeyboardInterrupt):
            export_snapshot(source, out, progress=interrupt)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]  # no out, no partial copy


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = _small_store(tmp_path)
    (tmp_path / "exists.tar.gz").write_bytes(b"kept")
    (tmp_path / "not-a-store").mkdir()
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "records.sqlite3").write_bytes(b"this is no database" * 10)
    cases = {
        ("--store", tmp_path / "missing", "--out", tmp_path / "a"): "no such directory",
        ("--store", tmp_path / "not-a-store", "--out", tmp_path / "a"): "not a record store",
        ("--store", tmp_path / "corrupt", "--out", tmp_path / "a"): "cannot be read: file is not a database",
        ("--store", source, "--out", tmp_path / "a", "--since", "last tuesday"): "--since 'last tuesday': not a time",
        ("--store", source, "--out", tmp_path / "a", "--since", "2027-01-02", "--until", "2027-01-01"):
            "range is empty",
        ("--store", source, "--out", tmp_path / "exists.tar.gz"): "already exists",
        ("--store", source, "--out", tmp_path / "no" / "dir"): "no such directory",
    }
    for args, message in cases.items():
        assert main(["store", "export", *map(str, args)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (args, err)
    assert (tmp_path / "exists.tar.gz").read_bytes() == b"kept" and not (tmp_path / "a").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # import: a damaged snapshot, a store that is not fresh
    assert main(["store", "export", "--store", str(source), "--out", str(tmp_path / "snap")]) == 0
    jpeg = next((tmp_path / "snap" / "files").rglob("*.jpg"))
    jpeg.write_bytes(jpeg.read_bytes()[:-1] + b"\x00")
    for args, message in {("snap", "--store", "fresh"): "checksum mismatch",
                          ("exists.tar.gz", "--store", "fresh"): "not a readable .tar.gz snapshot",
                          ("exists.tar.gz", "--store", "store"): "exists and is not empty"}.items():
        assert main(["store", "import", *(str(tmp_path / a) if a != "--store" else a for a in args)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (args, err)
    assert not (tmp_path / "fresh").exists()


def test_time_forms() -> None:
    now = 1_800_000_000.0
    utc = datetime(2027, 1, 15, 8, tzinfo=timezone.utc).timestamp()
    assert parse_time("2027-01-15T08:00:00Z", flag="--since") == utc
    assert parse_time("2027-01-15T08:00", flag="--since") == datetime(2027, 1, 15, 8).timestamp()  # local time
    assert parse_time("2027-01-15T08:00:00+01:00", flag="--since") == parse_time("2027-01-15T07:00:00Z", flag="x")
    assert parse_time("1800000000", flag="--since") == now
    assert parse_time("24h", flag="--since", now=now) == now - 86400
    assert parse_time("30m", flag="--since", now=now) == now - 1800
    assert parse_time("now", flag="--until", now=now) == now
    with pytest.raises(SnapshotError, match="--until '7 weeks': not a time"):
        parse_time("7 weeks", flag="--until")
