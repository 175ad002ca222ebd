"""How often is the judge right? A stratified sample of its verdicts against a reference.

The reference is either the ground truth (the better mask is the one with the higher IoU with the
ground-truth mask; closer than ``tie_margin`` is a tie) or a reviewer's decisions (imported from the
review page). Verdicts are grouped into strata by class and by disagreement bucket (1 - IoU of the
two masks: 0.15-0.3, 0.3-0.5, 0.5-1), and up to ``per_stratum`` are drawn from each stratum (seeded),
so rare classes and the mild disagreements are audited as much as the common, gross ones. The
report gives per stratum the population, the sample, the agreements and the rate; overall the
sample's agreement rate and the population-weighted estimate (each stratum's rate weighted by its
share of all verdicts), plus the confusion counts (judge x reference).
"""

from __future__ import annotations

import itertools
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from training.judge.base import BETTER, Better, mask_iou

BUCKET_EDGES = (0.15, 0.3, 0.5)


def truth_label(student: np.ndarray, teacher: np.ndarray, truth: np.ndarray, tie_margin: float = 0.02) -> Better:
    """Which mask the ground truth favours: the higher IoU with ``truth``; within ``tie_margin`` a tie."""
    s, t = mask_iou(student, truth), mask_iou(teacher, truth)
    if abs(s - t) <= tie_margin:
        return "tie"
    return "student" if s > t else "teacher"


def bucket(disagreement: float, edges: Sequence[float] = BUCKET_EDGES) -> str:
    """'0.15-0.30', '0.30-0.50', '0.50-1.00' (or '<0.15')."""
    bounds = [*edges, 1.0]
    if disagreement <= bounds[0]:
        return f"<{bounds[0]:.2f}"
    for lo, hi in itertools.pairwise(bounds):
        if disagreement <= hi:
            return f"{lo:.2f}-{hi:.2f}"
    return f"{bounds[-2]:.2f}-{bounds[-1]:.2f}"


@dataclass(frozen=True)
class AuditItem:
    """One judged case and its reference answer."""

    case_id: str
    class_name: str
    disagreement: float
    verdict: Better
    reference: Better

    @property
    def stratum(self) -> tuple[str, str]:
        return (self.class_name or "-", bucket(self.disagreement))


@dataclass
class AuditReport:
    reference: str
    strata: dict[tuple[str, str], dict[str, int]] = field(default_factory=dict)
    confusion: dict[str, dict[str, int]] = field(default_factory=dict)
    sampled: int = 0
    agreed: int = 0
    population: int = 0

    @property
    def agreement(self) -> float | None:
        return self.agreed / self.sampled if self.sampled else None

    @property
    def weighted_agreement(self) -> float | None:
        """Each stratum's rate weighted by its share of the whole population of verdicts."""
        total = sum(s["population"] for s in self.strata.values() if s["sampled"])
        if not total:
            return None
        return sum(s["population"] * s["agreed"] / s["sampled"] for s in self.strata.values() if s["sampled"]) / total

    def as_dict(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "population": self.population,
            "sampled": self.sampled,
            "agreed": self.agreed,
            "agreement": self.agreement,
            "weighted_agreement": self.weighted_agreement,
            "strata": [
                {"class": c, "bucket": b, **counts} for (c, b), counts in sorted(self.strata.items())
            ],
            "confusion": self.confusion,
        }

    def format(self) -> str:
        """A plain-text table: one line per stratum, then the totals and the confusion counts."""
        lines = [f"audit against {self.reference}: {self.sampled} of {self.population} verdicts sampled"]
        row = "  {:<12} {:<12} {:>10} {:>7} {:>6} {:>6}"
        lines.append(row.format("class", "disagreement", "population", "sampled", "agreed", "rate"))
        for (name, band), counts in sorted(self.strata.items()):
            rate = f"{counts['agreed'] / counts['sampled']:.2f}" if counts["sampled"] else "-"
            lines.append(row.format(name, band, counts["population"], counts["sampled"], counts["agreed"], rate))
        overall = "-" if self.agreement is None else f"{self.agreement:.1%}"
        weighted = "-" if self.weighted_agreement is None else f"{self.weighted_agreement:.1%}"
        lines.append(f"  agreement {overall} ({self.agreed}/{self.sampled}); population-weighted {weighted}")
        header = "  judge \\ reference " + " ".join(f"{b:>8}" for b in BETTER)
        lines.append(header)
        for judged in BETTER:
            counts_of = self.confusion.get(judged, {})
            lines.append(f"  {judged:<18} " + " ".join(f"{counts_of.get(b, 0):>8}" for b in BETTER))
        return "\n".join(lines)


def stratified_sample(items: Sequence[AuditItem], per_stratum: int | None, seed: int = 0) -> list[AuditItem]:
    """Up to ``per_stratum`` items of every stratum (all with None), drawn with ``seed``; in input order."""
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        groups[item.stratum].append(index)
    rng = random.Random(seed)
    chosen: list[int] = []
    for key in sorted(groups):
        members = groups[key]
        take_all = per_stratum is None or len(members) <= per_stratum
        chosen.extend(members if take_all else rng.sample(members, per_stratum or 0))
    return [items[i] for i in sorted(chosen)]


def audit(items: Sequence[AuditItem], *, reference: str, per_stratum: int | None = 20, seed: int = 0) -> AuditReport:
    """Sample ``items`` by stratum and count the judge's agreements with the reference."""
    report = AuditReport(reference=reference, population=len(items))
    population = Counter(item.stratum for item in items)
    for key, count in population.items():
        report.strata[key] = {"population": count, "sampled": 0, "agreed": 0}
    for item in stratified_sample(items, per_stratum, seed):
        counts = report.strata[item.stratum]
        agreed = int(item.verdict == item.reference)
        counts["sampled"] += 1
        counts["agreed"] += agreed
        report.sampled += 1
        report.agreed += agreed
        row = report.confusion.setdefault(item.verdict, {})
        row[item.reference] = row.get(item.reference, 0) + 1
    return report


def items_against_truth(records: Iterable[Mapping[str, Any]]) -> list[AuditItem]:
    """Judge-log records (with ``truth_better``, written when the case had ground truth) -> audit items."""
    return [
        AuditItem(r["case_id"], str(r.get("class", "")), float(r["disagreement"]), r["better"], r["truth_better"])
        for r in records
        if r.get("truth_better") in BETTER and r.get("better") in BETTER and not r.get("abstain")
    ]


def items_against_labels(records: Iterable[Mapping[str, Any]], labels: Mapping[str, Better]) -> list[AuditItem]:
    """Judge-log records whose case a reviewer decided -> audit items against the reviewer's labels."""
    return [
        AuditItem(r["case_id"], str(r.get("class", "")), float(r["disagreement"]), r["better"], labels[r["case_id"]])
        for r in records
        if r.get("case_id") in labels and r.get("better") in BETTER and not r.get("abstain")
    ]
