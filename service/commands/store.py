"""``defectsam store export`` and ``defectsam store import``: snapshots of the record store (service/snapshot.py).

``export`` copies the records of a time range out of a store, running or not, into a ``.tar.gz`` or a
folder (with ``records.jsonl``, ``records.csv`` and ``SHA256SUMS``), atomically; ``import`` checks a
snapshot and makes it a fresh store that ``defectsam serve`` opens as it is.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

from service.pipeline.record import iso_time
from service.snapshot import export_snapshot, import_snapshot, parse_time

TIME_HELP = ("ISO 8601 (2026-12-04T13:00:00Z, 2026-12-04; no zone: local time), Unix seconds, an age "
             "(30m, 24h, 7d: that long ago) or 'now'")


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("store", help="export the record store's records, restore them into a new store",
                                 description=__doc__.splitlines()[0])
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=type(parser))
    export = actions.add_parser("export", help="a consistent snapshot of a time range (works while the daemon writes)")
    export.add_argument("--store", type=Path, required=True, help="the store directory (store.path)")
    export.add_argument("--out", type=Path, required=True,
                        help="a new .tar.gz (or .tgz) file, else a new folder; never overwritten")
    export.add_argument("--since", help=f"records captured at or after this time; {TIME_HELP}")
    export.add_argument("--until", help=f"records captured before this time (default: all so far); {TIME_HELP}")
    export.set_defaults(run=run_export)
    restore = actions.add_parser("import", help="check a snapshot and make it a fresh store (restore)")
    restore.add_argument("snapshot", type=Path, help="a snapshot folder or .tar.gz written by 'store export'")
    restore.add_argument("--store", type=Path, required=True,
                         help="the new store directory: must not exist or be empty (stop the daemon first)")
    restore.set_defaults(run=run_import)


def _interrupt_on_sigterm() -> None:
    """SIGTERM (systemd stopping a backup job) ends the command as Ctrl-C does: the partial copy is removed."""
    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def run_export(args: argparse.Namespace) -> int:
    since = None if args.since is None else parse_time(args.since, flag="--since")
    until = None if args.until is None else parse_time(args.until, flag="--until")
    _interrupt_on_sigterm()
    summary = export_snapshot(args.store, args.out, since=since, until=until)
    span = f"{'start' if since is None else iso_time(since)} .. {'now' if until is None else iso_time(until)}"
    print(f"exported {summary.records} records ({span}), {summary.bytes / 1e6:.1f} MB, to {summary.out}")
    if summary.vanished:
        print(f"defectsam: note: {summary.vanished} record(s) of the range were deleted by retention (or lost their "
              "files) while exporting; they are not in the snapshot", file=sys.stderr)
    return 0


def run_import(args: argparse.Namespace) -> int:
    _interrupt_on_sigterm()
    summary = import_snapshot(args.snapshot, args.store)
    print(f"restored {summary.records} records ({summary.files} files) into {summary.store}; "
          f"start the daemon with store.path: {summary.store}")
    return 0
