"""``defectsam-train judge --run DIR``: the judge loop's cases, offline.

    --kind contour|vlm          judge the stored cases of an epoch again with that judge (vlm: the
                                run's judge.vlm settings, or --base-url / --model), write
                                OUT/judge/verdicts-KIND-eNNN.jsonl, audit against ground truth
    --kind human --export PAGE  write the review page of an epoch's cases
    --kind human --import FILE  read a reviewer's decisions: kept in OUT/judge/human.jsonl, the
                                instances re-weighted in OUT/judge/weights.json (a resumed run
                                trains with them), and the loop's own verdicts audited against them
    --audit [--labels FILE]     audit the loop's verdicts (judge/log.jsonl) against ground truth,
                                or against a reviewer's decisions file

The audit draws up to --per-stratum verdicts from every (class, disagreement bucket) stratum.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from engines.errors import DefectsamError
from training.judge.audit import audit, items_against_labels, items_against_truth, truth_label
from training.judge.base import JudgeCase, JudgeError, Verdict, judge_all
from training.judge.config import JudgeConfig, VlmJudgeConfig
from training.judge.store import (
    HUMAN,
    LOG,
    WEIGHTS,
    JudgeWeights,
    append_jsonl,
    cases_path,
    judge_dir,
    load_cases,
    read_jsonl,
    stored_epochs,
)


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "judge", help="the judge loop's cases offline: re-judge, human review page and decisions, audit",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument(
        "--run", dest="run_dir", required=True, type=Path, help="run directory (the config's out) with judge/ in it"
    )
    parser.add_argument("--epoch", type=int, help="the pass after this epoch (default: the latest with stored cases)")
    parser.add_argument("--kind", choices=("contour", "vlm", "human"), help="the judge to use (default: the run's)")
    parser.add_argument("--export", type=Path, metavar="PAGE", help="human: write the review page (HTML) here")
    parser.add_argument("--import", dest="import_", type=Path, metavar="FILE", help="human: read a decisions file")
    parser.add_argument("--audit", action="store_true", help="audit the loop's verdicts (judge/log.jsonl)")
    parser.add_argument("--labels", type=Path, help="--audit against this decisions file instead of ground truth")
    parser.add_argument("--per-stratum", type=int, default=20, help="audit sample per stratum (default 20; 0: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the audit sample (default 0)")
    parser.add_argument("--json", action="store_true", help="--audit: print the report as JSON")
    parser.add_argument("--base-url", help="vlm: the OpenAI-compatible API root (default: the run's judge.vlm)")
    parser.add_argument("--model", action="append", default=[], help="vlm: a model, in order (repeatable)")
    parser.set_defaults(run=run)


def _run_config(run: Path) -> JudgeConfig:
    import yaml

    path = run / "config.yaml"
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, yaml.YAMLError) as exc:
        raise DefectsamError(f"{path}: cannot read the run's config ({str(exc).splitlines()[0]})") from None
    section = (raw or {}).get("judge") or {}
    try:
        return JudgeConfig.model_validate(section)
    except ValueError as exc:
        raise DefectsamError(f"{path}: bad judge section ({str(exc).splitlines()[0]})") from None


def _epoch(args: argparse.Namespace) -> int:
    epochs = stored_epochs(args.run_dir)
    if args.epoch is not None:
        if args.epoch not in epochs:
            stored = ", ".join(map(str, epochs)) or "none"
            raise DefectsamError(f"{args.run_dir}: no judge cases stored for epoch {args.epoch} (stored: {stored})")
        return int(args.epoch)
    if not epochs:
        raise DefectsamError(f"{args.run_dir}: no judge cases stored (run distill with judge.kind set first)")
    return epochs[-1]


def _truth_of(cases: list[JudgeCase], log: list[dict[str, Any]]) -> dict[str, str]:
    """Which mask the ground truth favours per case: from the loop's log (input resolution), else the crop."""
    known = {r["case_id"]: r["truth_better"] for r in log if "truth_better" in r}
    out = {}
    for case in cases:
        if case.case_id in known:
            out[case.case_id] = known[case.case_id]
        elif case.truth is not None:
            out[case.case_id] = truth_label(case.student, case.teacher, case.truth)
    return out


def _records(cases: list[JudgeCase], verdicts: list[Verdict], truth: dict[str, str]) -> list[dict[str, Any]]:
    by_id = {c.case_id: c for c in cases}
    records = []
    for v in verdicts:
        case = by_id[v.case_id]
        record = {
            "epoch": case.epoch, "case_id": v.case_id, "source": case.source, "instance": case.instance,
            "class": case.class_name, "disagreement": case.disagreement, "judge": v.judge, "better": v.better,
            "confidence": v.confidence, "reason": v.reason, **({"abstain": True} if v.abstain else {}),
        }  # fmt: skip
        if v.case_id in truth:
            record["truth_better"] = truth[v.case_id]
        records.append(record)
    return records


def run(args: argparse.Namespace) -> int:
    folder = judge_dir(args.run_dir)
    if not folder.is_dir():
        raise DefectsamError(f"{args.run_dir}: no judge/ directory (a run with judge.kind set writes one)")
    config = _run_config(args.run_dir)
    kind = args.kind or (config.kind if config.kind != "none" else None)
    per_stratum = args.per_stratum or None
    log = read_jsonl(folder / LOG)
    if (args.export is not None or args.import_ is not None) and kind != "human":
        raise DefectsamError("--export and --import are for --kind human")
    if args.export is not None:
        from training.judge.human import export_review

        epoch = _epoch(args)
        cases = load_cases(cases_path(args.run_dir, epoch))
        title = f"defectsam judge: {args.run_dir.name}, after epoch {epoch}"
        page = export_review(cases, args.export, title=title)
        print(f"wrote {page}: {len(cases)} cases of epoch {epoch}; open it, decide, download decisions.json")
        return 0
    if args.import_ is not None:
        return _import(args, log, per_stratum)
    if args.audit:
        return _audit(args, log, per_stratum)
    if kind not in ("contour", "vlm"):
        raise DefectsamError("say what to do: --kind contour|vlm, --kind human --export/--import, or --audit")
    epoch = _epoch(args)
    cases = load_cases(cases_path(args.run_dir, epoch))
    if kind == "vlm" and (args.base_url or args.model):
        vlm = config.vlm.model_dump()
        vlm.update({k: v for k, v in (("base_url", args.base_url), ("models", args.model or None)) if v})
        config = config.model_copy(update={"vlm": VlmJudgeConfig.model_validate(vlm)})
    from training.judge.build import build_judge

    judge = build_judge(config, args.run_dir, kind)
    errors: list[str] = []
    verdicts = judge_all(judge, cases, on_error=lambda case, exc: errors.append(str(exc)))
    out = folder / f"verdicts-{kind}-e{epoch:03d}.jsonl"
    out.unlink(missing_ok=True)
    records = _records(cases, verdicts, _truth_of(cases, log))
    append_jsonl(out, records)
    counts = {b: sum(v.better == b for v in verdicts) for b in ("student", "teacher", "tie")}
    print(f"{kind}: {len(verdicts)} of {len(cases)} cases of epoch {epoch} judged {counts}; verdicts in {out}")
    items = items_against_truth(records)
    if items:
        print(audit(items, reference="ground truth", per_stratum=per_stratum, seed=args.seed).format())
    if errors:
        raise JudgeError(errors[0])
    return 0


def _import(args: argparse.Namespace, log: list[dict[str, Any]], per_stratum: int | None) -> int:
    from training.judge.human import import_decisions

    cases = {c.case_id: c for e in stored_epochs(args.run_dir) for c in load_cases(cases_path(args.run_dir, e))}
    decided = import_decisions(args.import_, known=cases)
    folder = judge_dir(args.run_dir)
    source = str(args.import_)
    append_jsonl(
        folder / HUMAN,
        [{"case_id": v.case_id, "better": v.better, "reason": v.reason, "file": source} for v in decided.values()],
    )
    weight = _run_config(args.run_dir).weight
    weights = JudgeWeights.load(folder / WEIGHTS)
    weights.apply(decided.values(), cases, weight)
    weights.save(folder / WEIGHTS)
    favoured = sum(v.better == "student" for v in decided.values())
    print(
        f"imported {len(decided)} decisions ({favoured} for the student) into {folder / HUMAN}; "
        f"{len(weights)} instances re-weighted in {folder / WEIGHTS} (a resumed run trains with them)"
    )
    labels = {cid: v.better for cid, v in decided.items()}
    items = items_against_labels([r for r in log if r.get("judge") != "human"], labels)
    if items:
        reviewer = f"reviewer ({args.import_.name})"
        print(audit(items, reference=reviewer, per_stratum=per_stratum, seed=args.seed).format())
    truth = _truth_of(list(cases.values()), log)
    human_items = items_against_truth(_records(list(cases.values()), list(decided.values()), truth))
    if human_items:
        print(audit(human_items, reference="ground truth (reviewer's decisions)", per_stratum=None).format())
    return 0


def _audit(args: argparse.Namespace, log: list[dict[str, Any]], per_stratum: int | None) -> int:
    if args.epoch is not None:
        log = [r for r in log if r.get("epoch") == args.epoch]
    if not log:
        raise DefectsamError(f"{args.run_dir}: no verdicts in {judge_dir(args.run_dir) / LOG}")
    if args.labels is not None:
        from training.judge.human import import_decisions

        labels = {cid: v.better for cid, v in import_decisions(args.labels).items()}
        items = items_against_labels(log, labels)
        reference = f"reviewer ({args.labels.name})"
    else:
        items = items_against_truth(log)
        reference = "ground truth"
    if not items:
        raise DefectsamError(f"{args.run_dir}: no verdict has a {reference} answer to compare with")
    report = audit(items, reference=reference, per_stratum=per_stratum, seed=args.seed)
    print(json.dumps(report.as_dict(), indent=1) if args.json else report.format())
    return 0
