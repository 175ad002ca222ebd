"""Eval reports of several bundles side by side (``defectsam-train compare``): their figures, one table.

``figures`` takes from one ``EvalReport`` (training.eval.evaluate) the numbers a comparison shows,
unrounded: semantic mIoU foreground and with background, IoU per class (background first), defect
precision and recall at IoU 0.5, the image-level false-reject, false-NG and miss rates, recall per
size bucket, the median time per frame and the inspections per second it makes (1000 / median ms).

``comparison_rows`` lays any number of them out as one table: a row per figure, a column per
bundle. Classes are aligned by name, size buckets by class, size kind and bucket: a cell is blank
where a bundle has no such class or bucket, "-" where the figure is undefined (no good frame for a
false-reject rate, a class in neither truth nor prediction). ``format_text`` and
``format_markdown`` print that table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from training.eval.evaluate import EvalReport
from training.eval.metrics import format_cell

SIZE_KINDS = ("width", "diameter")


@dataclass(frozen=True)
class Compared:
    """One column: the bundle as given, what it is, and its figures (``figures``)."""

    bundle: str  # the directory as given on the command line
    name: str
    manifest_sha256: str
    precision: str
    figures: dict[str, Any]
    thresholds: tuple[float, float] | None = None  # the manifest's calibrated (score, uncertain), which the eval used

    @property
    def hash(self) -> str:
        """The manifest's digest, short: it covers every file's checksum and every manifest value."""
        return self.manifest_sha256[:12]


def figures(report: EvalReport) -> dict[str, Any]:
    """The compared numbers of one report, as the report holds them (None where undefined)."""
    sem, auto = report["semantic"], report["automatic"]
    median_ms = report["timing"]["median_ms"]
    by_size: dict[str, dict[str, dict[str, Any]]] = {}
    for name, kinds in auto["by_size"].items():
        for kind, entry in kinds.items():
            by_size.setdefault(name, {})[kind] = {
                b["bucket"]: {"from_px": b["from_px"], "n": b["n"], "recall": b["recall"]} for b in entry["buckets"]
            }
    return {
        "dataset": report["dataset"],
        "n_images": report["n_images"],
        "good_images": auto["good_images"],
        "defective_images": auto["defective_images"],
        "mode": report["mode"],
        "window": report["window"],
        "miou_fg": sem["miou_fg"],
        "miou": sem["miou"],
        "iou": dict(sem["iou"]),
        "defect_precision": auto["precision"],
        "defect_recall": auto["recall"],
        "iou_threshold": auto["iou_threshold"],
        "false_reject_rate": auto["false_reject_rate"],
        "false_ng_rate": auto["false_ng_rate"],
        "miss_rate": auto["miss_rate"],
        "recall_by_size": by_size,
        "median_ms": median_ms,
        "fps": None if not median_ms else 1000.0 / median_ms,
    }


# A table cell: the text, or None where the bundle has no such class or bucket (printed blank).
Cell = str | None


def _ordered_union(lists: Sequence[Sequence[str]]) -> list[str]:
    return list(dict.fromkeys(item for names in lists for item in names))


def _size_keys(columns: Sequence[Compared]) -> list[tuple[str, str, str, float]]:
    """(class, kind, bucket label, from px) of every size bucket any bundle has, in class, kind, size order."""
    classes = _ordered_union([list(c.figures["recall_by_size"]) for c in columns])
    keys: list[tuple[str, str, str, float]] = []
    for name in classes:
        for kind in SIZE_KINDS:
            buckets: dict[str, float] = {}
            for c in columns:
                for label, b in c.figures["recall_by_size"].get(name, {}).get(kind, {}).items():
                    buckets.setdefault(label, b["from_px"])
            keys += [(name, kind, label, px) for label, px in sorted(buckets.items(), key=lambda item: item[1])]
    return keys


def _thresholds(column: Compared) -> str:
    if column.thresholds is None:
        return "not calibrated"
    return f"{column.thresholds[0]:g} / {column.thresholds[1]:g}"


def headers(columns: Sequence[Compared]) -> list[str]:
    """A column's title: the bundle's name and precision, numbered where two would read alike."""
    titles = [f"{c.name} ({c.precision})" for c in columns]
    return [f"{t} #{i + 1}" if titles.count(t) > 1 else t for i, t in enumerate(titles)]


def comparison_rows(columns: Sequence[Compared]) -> list[tuple[str, list[Cell]]]:
    """(figure, a cell per bundle) for every figure compared."""

    def row(label: str, get: Any) -> tuple[str, list[Cell]]:
        return label, [get(c.figures) for c in columns]

    def rate(key: str) -> Any:
        return lambda f: format_cell(f[key])

    rows: list[tuple[str, list[Cell]]] = [
        ("bundle", [c.bundle for c in columns]),
        ("hash (manifest sha256)", [c.hash for c in columns]),
        ("precision", [c.precision for c in columns]),
        ("score / uncertain threshold", [_thresholds(c) for c in columns]),
        row("images (good / defective)",
            lambda f: f"{f['n_images']} ({f['good_images']} / {f['defective_images']})"),
        row("mode, window", lambda f: f"{f['mode']}, {f['window']} px"),
        row("mIoU foreground", rate("miou_fg")),
        row("mIoU with background", rate("miou")),
    ]
    classes = _ordered_union([list(c.figures["iou"]) for c in columns])
    for name in classes:
        rows.append(row(f"IoU {name}", lambda f, n=name: format_cell(f["iou"][n]) if n in f["iou"] else None))
    threshold = f"{columns[0].figures['iou_threshold']:g}" if columns else "0.5"
    rows += [
        row(f"defect precision (IoU >= {threshold})", rate("defect_precision")),
        row(f"defect recall (IoU >= {threshold})", rate("defect_recall")),
        row("false reject: good judged NG or UNCERTAIN", rate("false_reject_rate")),
        row("false NG: good judged NG", rate("false_ng_rate")),
        row("miss: defective judged OK", rate("miss_rate")),
    ]
    for name, kind, label, _ in _size_keys(columns):
        n = next(c.figures["recall_by_size"][name][kind][label]["n"] for c in columns
                 if label in c.figures["recall_by_size"].get(name, {}).get(kind, {}))

        def bucket(f: dict[str, Any], name: str = name, kind: str = kind, label: str = label) -> Cell:
            entry = f["recall_by_size"].get(name, {}).get(kind, {}).get(label)
            return None if entry is None else format_cell(entry["recall"])

        rows.append(row(f"recall {name} {kind} {label} (n {n})", bucket))
    rows += [
        row("ms / frame (median)", lambda f: format_cell(f["median_ms"], 1)),
        row("FPS (1000 / median ms)", lambda f: format_cell(f["fps"], 1)),
    ]
    return rows


def format_text(columns: Sequence[Compared]) -> str:
    """The table aligned for a terminal: figures left, values right."""
    table = [["figure", *headers(columns)], *([label, *(c or "" for c in cells)]
                                               for label, cells in comparison_rows(columns))]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = []
    for r in table:
        lines.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(r, widths, strict=True))).rstrip())
    return "\n".join(lines)


def format_markdown(columns: Sequence[Compared]) -> str:
    """The table as GitHub markdown, values right-aligned; '|' in a cell escaped."""

    def cells(values: Sequence[str]) -> str:
        return "| " + " | ".join(v.replace("|", "\\|") for v in values) + " |"

    lines = [cells(["figure", *headers(columns)]), "| --- |" + " ---: |" * len(columns)]
    lines += [cells([label, *(c or "" for c in row)]) for label, row in comparison_rows(columns)]
    return "\n".join(lines)
