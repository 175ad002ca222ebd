"""What the judge loop keeps in the run directory, under ``OUT/judge/``::

    log.jsonl           one line per judged case: epoch, case id, source, instance, class,
                        disagreement, judge, verdict, confidence, reason, and (with ground truth)
                        the IoU of each mask with it and which one the truth favours
    cases-eNNN.npz      the cases of the pass after epoch NNN: crops, both masks, ground truth
                        (for re-judging, the review page and the audit)
    weights.json        the per-instance loss weights the next epochs train with
    review-eNNN.html    (kind human) the review page of that pass
    human.jsonl         (kind human) the decisions imported so far
    vlm-cache.jsonl     (kind vlm) the verdict cache, unless vlm.cache says otherwise

Every file but the append-only logs is written to a temporary name and renamed.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from engines.atomic import write_bytes_atomic, write_text_atomic
from training.judge.base import BETTER, JudgeCase, JudgeError, Verdict

JUDGE_DIR = "judge"
LOG = "log.jsonl"
WEIGHTS = "weights.json"
HUMAN = "human.jsonl"
_CASES = re.compile(r"cases-e(\d+)\.npz$")


def judge_dir(run: Path | str) -> Path:
    return Path(run) / JUDGE_DIR


def cases_path(run: Path | str, epoch: int) -> Path:
    return judge_dir(run) / f"cases-e{epoch:03d}.npz"


def stored_epochs(run: Path | str) -> list[int]:
    """Epochs whose cases are stored, ascending."""
    folder = judge_dir(run)
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _CASES.match(p.name)))


# -- cases ------------------------------------------------------------------------------------------
def save_cases(path: Path | str, cases: Sequence[JudgeCase]) -> Path:
    """All arrays of ``cases`` in one compressed .npz (no pickles), written atomically."""
    meta = []
    arrays: dict[str, np.ndarray] = {}
    for n, case in enumerate(cases):
        fields = {k: v for k, v in asdict(case).items() if k not in ("crop", "student", "teacher", "truth")}
        fields["box"] = list(case.box)
        fields["has_truth"] = case.truth is not None
        meta.append(fields)
        arrays[f"crop_{n}"] = case.crop
        arrays[f"student_{n}"] = case.student
        arrays[f"teacher_{n}"] = case.teacher
        if case.truth is not None:
            arrays[f"truth_{n}"] = case.truth
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]
    write_bytes_atomic(path, buffer.getvalue())
    return Path(path)


def load_cases(path: Path | str) -> list[JudgeCase]:
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(bytes(data["meta"]).decode("utf-8"))
            cases = []
            for n, fields in enumerate(meta):
                has_truth = fields.pop("has_truth", False)
                cases.append(
                    JudgeCase(
                        **{**fields, "box": tuple(fields["box"])},
                        crop=data[f"crop_{n}"], student=data[f"student_{n}"], teacher=data[f"teacher_{n}"],
                        truth=data[f"truth_{n}"] if has_truth else None,
                    )
                )
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise JudgeError(f"{path}: unreadable judge cases ({exc})") from None
    return cases


# -- logs -------------------------------------------------------------------------------------------
def append_jsonl(path: Path | str, records: Iterable[Mapping[str, Any]]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def read_jsonl(path: Path | str) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (a torn last line is skipped); [] when there is no file."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def read_human(run: Path | str) -> dict[str, Verdict]:
    """The decisions imported into a run so far (a later import of a case replaces an earlier one)."""
    decided: dict[str, Verdict] = {}
    for r in read_jsonl(judge_dir(run) / HUMAN):
        if r.get("better") in BETTER and isinstance(r.get("case_id"), str):
            decided[r["case_id"]] = Verdict(r["case_id"], r["better"], 1.0, "human", str(r.get("reason", "")))
    return decided


# -- weights ----------------------------------------------------------------------------------------
class JudgeWeights:
    """Per-instance loss weights by (sample source, instance index); 1.0 where nothing is stored.

    A weight w > 1 means the judge favoured the student's mask over the teacher's for that instance:
    its dice to ground truth counts w times, its soft-mask term to the teacher 1/w times.
    """

    def __init__(self, entries: Mapping[str, Mapping[int, float]] | None = None) -> None:
        self.entries: dict[str, dict[int, float]] = {s: dict(v) for s, v in (entries or {}).items()}

    def __len__(self) -> int:
        return sum(len(v) for v in self.entries.values())

    def set(self, source: str, instance: int, weight: float) -> None:
        if weight == 1.0:
            per = self.entries.get(source)
            if per is not None:
                per.pop(instance, None)
                if not per:
                    del self.entries[source]
            return
        self.entries.setdefault(source, {})[instance] = float(weight)

    def get(self, source: str, count: int) -> np.ndarray:
        """float32 ``count``: the weight of each instance of ``source``."""
        out = np.ones(count, dtype=np.float32)
        for instance, weight in self.entries.get(source, {}).items():
            if 0 <= instance < count:
                out[instance] = weight
        return out

    def apply(self, verdicts: Iterable[Verdict], cases: Mapping[str, JudgeCase], weight: float) -> None:
        """Student favoured -> ``weight``; teacher favoured or tie -> back to 1; abstentions change nothing."""
        for verdict in verdicts:
            if verdict.abstain:
                continue
            case = cases[verdict.case_id]
            self.set(case.source, case.instance, weight if verdict.better == "student" else 1.0)

    def save(self, path: Path | str) -> None:
        payload = {s: {str(i): w for i, w in sorted(v.items())} for s, v in sorted(self.entries.items())}
        write_text_atomic(path, json.dumps({"instances": payload}, indent=1) + "\n")

    @classmethod
    def load(cls, path: Path | str) -> JudgeWeights:
        path = Path(path)
        if not path.is_file():
            return cls()
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))["instances"]
            return cls({s: {int(i): float(w) for i, w in v.items()} for s, v in raw.items()})
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise JudgeError(f"{path}: unreadable judge weights ({exc})") from None
