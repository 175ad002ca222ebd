"""The ``judge`` section of a training config: which judge re-examines teacher/student disagreements.

Pure pydantic (no torch), so ``training.config`` can include it and ``defectsam-train config``
lists its keys. Off by default (``kind: none``); docs/judge.md describes every judge.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

JUDGE_KINDS = ("none", "contour", "vlm", "human")
#: Recipes whose loss has a per-instance teacher soft-mask term and a ground-truth dice term.
JUDGED_RECIPES = frozenset({"blog", "nofeature"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ContourJudgeConfig(_Strict):
    tie_margin: float = Field(
        default=0.05, ge=0, le=1, description="contour: boundary scores closer than this are a tie"
    )
    percentile: float = Field(
        default=95.0, gt=0, le=100, description="contour: gradients are divided by this percentile of the crop's"
    )


class VlmJudgeConfig(_Strict):
    base_url: str | None = Field(
        default=None,
        description="OpenAI-compatible API root, e.g. http://127.0.0.1:8080/v1 (a Bifrost gateway); "
        "requests go to {base_url}/chat/completions",
    )
    models: list[str] = Field(
        default_factory=list, description="models in order of preference; the next one is tried when one keeps failing"
    )
    api_key_env: str = Field(
        default="DEFECTSAM_JUDGE_API_KEY",
        description="environment variable holding the bearer API key (unset or empty: no Authorization header)",
    )
    timeout_s: float = Field(default=60.0, gt=0, description="socket timeout of one request (connect, each read), s")
    retries: int = Field(default=2, ge=0, description="retries per model on 429, 5xx, timeouts and connection errors")
    backoff_s: float = Field(default=1.0, ge=0, description="first retry delay, doubled per retry, + up to 25% jitter")
    max_backoff_s: float = Field(default=30.0, ge=0, description="longest single delay, a Retry-After included")
    json_mode: bool = Field(default=True, description="ask for a JSON answer (response_format json_object)")
    max_tokens: int = Field(default=300, ge=16, description="max_tokens of the answer")
    image_size: int = Field(
        default=384, ge=32, le=2048, description="longest side of the images sent (small crops are upscaled, nearest)"
    )
    cache: Path | None = Field(
        default=None, description="verdict cache (JSON lines); default: OUT/judge/vlm-cache.jsonl"
    )

    @model_validator(mode="after")
    def _url(self) -> VlmJudgeConfig:
        if self.base_url is not None and not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"vlm.base_url must start with http:// or https://, got {self.base_url!r}")
        if any(not m.strip() for m in self.models):
            raise ValueError("vlm.models: model names must not be empty")
        return self


class JudgeConfig(_Strict):
    kind: Literal["none", "contour", "vlm", "human"] = Field(
        default="none", description="who judges student/teacher disagreements after an epoch (docs/judge.md); none: off"
    )
    threshold: float = Field(
        default=0.15, ge=0, lt=1, description="an instance is a case when 1 - IoU(student mask, teacher mask) > this"
    )
    weight: float = Field(
        default=2.0, ge=1,
        description="judged for the student: that instance's dice to ground truth x weight, its soft-mask BCE / weight",
    )
    max_cases: int = Field(default=64, ge=1, description="most cases judged per pass (largest disagreements first)")
    samples: int | None = Field(
        default=None, ge=1,
        description="training samples looked at per pass (a new random subset each time); default: all"
    )
    every: int = Field(default=1, ge=1, description="judge after every N epochs (not after the last)")
    margin: int = Field(default=8, ge=0, description="context in input pixels around the two masks in a crop")
    contour: ContourJudgeConfig = Field(default_factory=ContourJudgeConfig, description="the contour judge")
    vlm: VlmJudgeConfig = Field(
        default_factory=VlmJudgeConfig, description="the vlm judge: an OpenAI-compatible chat-completions endpoint"
    )

    @model_validator(mode="after")
    def _vlm_endpoint(self) -> JudgeConfig:
        if self.kind == "vlm" and (self.vlm.base_url is None or not self.vlm.models):
            raise ValueError("judge kind 'vlm' needs vlm.base_url and at least one model in vlm.models")
        return self
