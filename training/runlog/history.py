"""The epoch records of a run, written as ``results.csv`` and ``metrics.jsonl``.

One record per epoch (the trainer builds it): ``epoch``, ``step``, ``phase``, every loss term of the
recipe as ``train_<term>`` (``train_loss`` is the weighted total), the validation metrics as
``val_<metric>`` (empty in the epochs that do not validate), ``lr``, ``epoch_seconds`` and
``elapsed_seconds`` (the run's training time over all its invocations). The list is kept in
``last.pt`` (key ``history``) and both files are rewritten from it, atomically, after every
checkpoint: a run resumed from ``last.pt`` goes on with exactly its epochs, whatever happened to the
files (a crash between the checkpoint and the files, a file edited or deleted). A checkpoint written
before the history existed is resumed with the records of its ``metrics.jsonl``.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from engines.atomic import write_text_atomic

RESULTS = "results.csv"
METRICS = "metrics.jsonl"
#: first columns, then train_*, val_*, anything else, then the tail
HEAD = ("epoch", "step", "phase")
TAIL = ("lr", "epoch_seconds", "elapsed_seconds")


def columns(records: Iterable[dict[str, Any]]) -> list[str]:
    """Every key of ``records`` (first appearance), grouped: HEAD, train_*, val_*, others, TAIL."""
    seen = list(dict.fromkeys(key for record in records for key in record))

    def group(key: str) -> int:
        if key in HEAD:
            return HEAD.index(key)
        if key in TAIL:
            return 10 + TAIL.index(key)
        return 3 if key.startswith("train_") else 4 if key.startswith("val_") else 5

    return sorted(seen, key=group)  # stable: first appearance within a group


def _cell(value: Any) -> str:
    return "" if value is None else str(value)


def results_csv(records: list[dict[str, Any]]) -> str:
    """The CSV text: a header of ``columns(records)``, one row per record, empty cells where a record has no value."""
    buffer = io.StringIO()
    names = columns(records)
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(names)
    for record in records:
        writer.writerow([_cell(record.get(name)) for name in names])
    return buffer.getvalue()


def read_results(path: Path) -> list[dict[str, float | None]]:
    """The rows of a results.csv as numbers (an empty cell is None). Raises OSError, ValueError."""
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    out = []
    for number, row in enumerate(rows, start=2):
        parsed: dict[str, float | None] = {}
        for key, text in row.items():
            if key is None or text is None:
                raise ValueError(f"{path}: line {number} has {len(row)} cells, the header fewer")
            try:
                parsed[key] = float(text) if text != "" else None
            except ValueError:
                raise ValueError(f"{path}: line {number}, column {key!r}: {text!r} is not a number") from None
        out.append(parsed)
    return out


def read_metrics_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; unreadable lines (a torn last line of an old run) are skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("epoch"), int):
            records.append(record)
    return records


class RunHistory:
    """The epoch records of the run in ``out``; ``write`` puts them in results.csv and metrics.jsonl."""

    def __init__(self, out: Path, records: list[dict[str, Any]] | None = None) -> None:
        self.out = out
        self.records: list[dict[str, Any]] = list(records or [])

    @classmethod
    def resume(cls, out: Path, payload: dict[str, Any] | None) -> RunHistory:
        """The history of ``last.pt``'s ``payload`` (None: a fresh run) up to its epoch, one record per epoch."""
        if payload is None:
            return cls(out)
        epoch = int(payload.get("epoch", 0))
        stored = payload.get("history")
        records = stored if isinstance(stored, list) else read_metrics_jsonl(out / METRICS)
        by_epoch = {int(r["epoch"]): dict(r) for r in records if isinstance(r, dict) and int(r["epoch"]) <= epoch}
        return cls(out, [by_epoch[e] for e in sorted(by_epoch)])

    @property
    def elapsed_before(self) -> float:
        """Training seconds of the epochs already recorded (0 for a fresh run)."""
        if not self.records:
            return 0.0
        return float(self.records[-1].get("elapsed_seconds") or 0.0)

    def epoch_seconds(self) -> list[float]:
        return [float(r["epoch_seconds"]) for r in self.records if isinstance(r.get("epoch_seconds"), int | float)]

    def add(self, record: dict[str, Any]) -> None:
        self.records = [r for r in self.records if r["epoch"] != record["epoch"]] + [dict(record)]

    def write(self) -> None:
        """Rewrite both files from the records (each atomically); no records: remove them."""
        if not self.records:
            for name in (RESULTS, METRICS):
                (self.out / name).unlink(missing_ok=True)
            return
        write_text_atomic(self.out / RESULTS, results_csv(self.records))
        write_text_atomic(self.out / METRICS, "".join(json.dumps(r) + "\n" for r in self.records))
