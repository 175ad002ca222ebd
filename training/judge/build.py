"""One factory for the judges behind the ``Judge`` protocol, by ``judge.kind``."""

from __future__ import annotations

from pathlib import Path

from training.judge.base import Judge, JudgeError
from training.judge.config import JudgeConfig
from training.judge.contour import ContourJudge
from training.judge.human import HumanJudge
from training.judge.store import judge_dir, read_human

VLM_CACHE = "vlm-cache.jsonl"


def build_judge(config: JudgeConfig, run: Path | str, kind: str | None = None) -> Judge:
    """The judge of ``kind`` (default ``config.kind``) for the run directory ``run``.

    contour: ContourJudge; vlm: VlmJudge with its verdict cache (``vlm.cache``, default
    OUT/judge/vlm-cache.jsonl); human: the decisions imported into the run so far.
    """
    kind = kind or config.kind
    if kind == "contour":
        return ContourJudge(config.contour.tie_margin, config.contour.percentile)
    if kind == "vlm":
        from training.judge.vlm import VlmJudge

        return VlmJudge(config.vlm, config.vlm.cache or judge_dir(run) / VLM_CACHE)
    if kind == "human":
        return HumanJudge(read_human(run))
    raise JudgeError(f"no judge of kind {kind!r} (known: contour, vlm, human)")
