"""Records the store drops are seen (issue 16, item 7): a warning in the log at a bounded rate, with the
count since the last line, and the count shown prominently on the live page."""

from __future__ import annotations

import logging
import re
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from service.config import StoreSection
from service.store import DB_NAME, DROP_WARNING_S, DropWarning, RecordStore

from .daemon_support import base_url, make_config, make_record, ng_bundle, running_daemon
from .support import wait_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
_LATER = re.compile(r"store: (\d+) record\(s\) dropped in the last (\d+) s")


def drop_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "service.store" and r.levelno == logging.WARNING and "dropped" in r.getMessage()
            and "queue" in r.getMessage()]


def logged_count(lines: list[str]) -> int:
    """Drops the lines account for: the first line is one drop, each later one says its count."""
    return sum(1 if "a record was dropped" in line else int(_LATER.search(line).group(1))  # type: ignore[union-attr]
               for line in lines)


def test_queue_full_drops_are_logged_at_most_once_per_interval_with_the_count(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A real store whose writer is not running yet (queue of 1): 1000 drops spread over 100 s of the warning's
    clock make 11 lines (the first at once, then one per 10 s), which together count every drop; the
    writer's stop logs the rest."""
    store = RecordStore(StoreSection(path=str(tmp_path / "store"), min_free_mb=0, queue_size=1))
    store.open()
    now = [1000.0]
    store.drop_warning = DropWarning(store, clock=lambda: now[0])
    record = make_record(1)
    store.submit(record)  # fills the queue
    for _ in range(1000):
        assert not store.submit(record)
        now[0] += 0.1
    assert len(drop_lines(caplog)) == 100 / DROP_WARNING_S  # at 0 s, then at 10, 20, ... 90 s
    store.start()
    store.stop()
    lines = drop_lines(caplog)
    assert len(lines) == 100 / DROP_WARNING_S + 1  # and the rest when the writer stops
    assert "a record was dropped" in lines[0] and "store.queue_size 1" in lines[0]
    assert all(_LATER.search(line) for line in lines[1:])
    assert logged_count(lines) == store.stats().dropped["queue_full"] == 1000


@pytest.mark.slow
def test_a_daemon_whose_writer_is_held_up_warns_and_the_page_shows_the_drops(
        tiny_bundle_master: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory,
        caplog: pytest.LogCaptureFixture) -> None:
    """The real daemon, every result NG and kept, a writer queue of 1; another process holds the store's
    SQLite write lock for 4 s (a disk that stalls), so records are dropped as queue_full. The log warns at
    once and then at most once per 10 s, the lines counting every drop; /api/status counts them; headless
    Chromium's DOM shows the count in the page's alert box, not in the grey small print."""
    bundle = ng_bundle(tiny_bundle_master, tmp_path_factory.getbasetemp())
    config = make_config(tmp_path, bundle, store={"queue_size": 1}, camera={"fps": 10.0})
    started = time.monotonic()  # drops may begin at once: a writer in the idle class on a busy machine
    with running_daemon(config) as daemon:
        wait_for(lambda: daemon.store.stats().written >= 2, timeout=60, what="records stored")
        blocker = sqlite3.connect(tmp_path / "store" / DB_NAME, timeout=30)
        try:
            blocker.execute("BEGIN IMMEDIATE")  # the write lock: the writer waits on its next commit
            wait_for(lambda: daemon.store.stats().dropped["queue_full"] >= 5, timeout=60, what="queue_full drops")
            time.sleep(4.0)
        finally:
            blocker.rollback()
            blocker.close()
        written = daemon.store.stats().written
        wait_for(lambda: daemon.store.stats().written > written, timeout=60, what="the writer to resume")
        assert drop_lines(caplog), "no warning in the log"
        page = _page_dom(base_url(daemon), tmp_path) if CHROMIUM else None
    elapsed = time.monotonic() - started
    lines = drop_lines(caplog)
    dropped = daemon.store.stats().dropped["queue_full"]
    print(f"{dropped} records dropped (queue_full) over {elapsed:.0f} s: {len(lines)} warning line(s)")
    assert dropped >= 5 and daemon.store.stats().dropped["error"] == 0
    assert len(lines) <= 2 + elapsed / DROP_WARNING_S  # the first, one per 10 s, the rest at stop
    assert logged_count(lines) == dropped
    if page is None:
        pytest.skip("chromium not found (apt-get install chromium): the page was not checked")
    box = re.search(r'<p id="store-drops" class="alert"( hidden(="")?)?>([^<]*)</p>', page)
    assert box is not None, page[-3000:]
    assert box.group(1) is None, "the drop box is hidden"
    assert re.search(r"Store dropped \d+ of \d+ records \(\d+%\): \d+ queue full", box.group(3)), box.group(3)


def _page_dom(url: str, tmp_path: Path) -> str:
    """The live page's DOM once its status event has arrived (a longer budget on a loaded machine)."""
    assert CHROMIUM is not None
    dom = ""
    for budget_ms in (5000, 10000, 20000):
        proc = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
             f"--user-data-dir={tmp_path / 'profile'}", f"--timeout={budget_ms}", "--dump-dom", f"{url}/"],
            capture_output=True, text=True, timeout=90)
        dom = proc.stdout
        if "Store dropped" in dom:
            break
    return dom
