"""Inspection ids that stay unique across restarts and crashes.

An id is handed out only once a high-water mark at or above it is on disk: ``ids.json`` in the
store directory says ``{"reserved_through": N}``, written to a temporary name, fsynced, renamed and
its directory fsynced, so a crash or a power cut at any moment leaves a mark at or above every id
already handed out. The next start begins after the mark (and after the store's highest row, for a
store written before the mark existed). Ids therefore skip, never repeat: a restart skips what was
left of the reserved block (at most ``1.5 * block`` ids), a crash the same.

Reservations run on their own thread, half a block ahead of use, so the thread that publishes a
result never waits for an fsync; it waits only when ids run ahead of the disk (a stalled disk).
A mark that cannot be written (disk full, read-only) is logged as an error and ids go on in memory
(inspection must not stop); uniqueness is restored by the next reservation that succeeds.

Ids are positive integers below 2**32: the PLC's ``inspection_id`` register is a u32 (docs/plc.md);
1000 ids a block is one small write every 30 s at 34 results a second, and at that rate u32 lasts
four years.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

from engines.atomic import write_bytes_atomic

log = logging.getLogger(__name__)

IDS_NAME = "ids.json"
ID_BLOCK = 1000
MAX_ID = 2**32 - 1  # the PLC register's width


class IdError(Exception):
    """The id mark cannot be read or written at start (a corrupt file, a directory that refuses writes)."""


def read_mark(path: Path) -> int:
    """The reserved high-water mark in ``path``; 0 when there is none yet."""
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        return 0
    except (OSError, UnicodeDecodeError) as exc:
        raise IdError(f"{path}: cannot be read: {exc}") from None
    try:
        value = json.loads(text)["reserved_through"]
    except (ValueError, KeyError, TypeError):
        raise IdError(f"{path}: not an id mark ({text[:60]!r}); the next ids cannot be known to be new") from None
    if not isinstance(value, int) or value < 0:
        raise IdError(f"{path}: reserved_through must be a non-negative integer, got {value!r}")
    return value


def write_mark(path: Path, value: int) -> None:
    """Write the mark durably: temporary file, fsync, rename, fsync of the directory."""
    write_bytes_atomic(path, json.dumps({"reserved_through": value}).encode("ascii") + b"\n")
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)


class IdAllocator:
    """Hands out increasing ids, each covered by a mark on disk before it leaves (``path`` None: in memory
    only, ids start at ``floor + 1`` on every start: a daemon without a store)."""

    def __init__(self, path: Path | None, *, floor: int = 0, block: int = ID_BLOCK) -> None:
        """``floor``: the highest id known used elsewhere (the store's highest row)."""
        self.path = path
        self._block = block
        self._cond = threading.Condition()
        self._stop = False
        self._want = threading.Event()
        self._failing = False
        mark = 0
        if path is not None:
            for stale in path.parent.glob(f".{path.name}.*.tmp"):  # a crash between mkstemp and rename
                stale.unlink(missing_ok=True)
            mark = read_mark(path)
        self._next = max(mark, floor) + 1
        self._durable = self._next - 1  # the highest id covered by the mark on disk
        self._thread: threading.Thread | None = None
        if path is not None:
            try:
                self._reserve(self._next - 1 + block)
            except OSError as exc:
                raise IdError(f"{path}: cannot be written: {exc}") from None
            self._thread = threading.Thread(target=self._run, name="id-reserver", daemon=True)
            self._thread.start()
        else:
            self._durable = MAX_ID

    @property
    def next_free(self) -> int:
        """The id the next call returns."""
        with self._cond:
            return self._next

    @property
    def reserved_through(self) -> int:
        with self._cond:
            return self._durable

    def __call__(self) -> int:
        """The next id; waits (rarely: reservations run half a block ahead) until the disk covers it."""
        with self._cond:
            while self._next > self._durable and not self._stop and not self._failing:
                self._want.set()
                self._cond.wait(0.5)
            value = self._next
            self._next += 1
            if self._durable - value < self._block // 2:
                self._want.set()
            if value == MAX_ID + 1:
                log.error("inspection id %d does not fit the PLC's u32 register: the PLC sees it wrap", value)
            return value

    def close(self) -> None:
        """Stop the reserver thread (ids still work, in memory: ``stop()`` publishes late NO_FRAMEs)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._want.set()
        if self._thread is not None:
            self._thread.join(10.0)
            self._thread = None

    def _run(self) -> None:
        while True:
            self._want.wait()
            self._want.clear()
            with self._cond:
                if self._stop:
                    return
                target = max(self._next, self._durable + 1) - 1 + self._block
            try:
                self._reserve(target)
            except OSError as exc:
                with self._cond:
                    first = not self._failing
                    self._failing = True  # ids go on in memory rather than stop inspection
                    self._cond.notify_all()
                if first:
                    log.error("ids: cannot write the id mark %s (%s): ids go on, but a crash before the next "
                              "successful write may hand some out again", self.path, exc)
                self._stop_wait(5.0)  # try again in a while, not in a loop
                self._want.set()

    def _stop_wait(self, seconds: float) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._stop, seconds)

    def _reserve(self, target: int) -> None:
        assert self.path is not None
        write_mark(self.path, target)
        with self._cond:
            if self._failing:
                log.warning("ids: the id mark is written again (reserved through %d)", target)
            self._failing = False
            self._durable = max(self._durable, target)
            self._cond.notify_all()

