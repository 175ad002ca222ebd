"""Request and response bodies of the HTTP API (apart from the routes, as OpenAPI documents them)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

VerdictName = Literal["OK", "NG", "UNCERTAIN", "NO_FRAME"]


class Problem(BaseModel):
    detail: str = Field(description="what was wrong, in one line")


class Health(BaseModel):
    status: Literal["alive"]


class Readiness(BaseModel):
    ready: bool
    reasons: list[str] = Field(description="why not ready (empty when ready)")


class TriggerRequest(BaseModel):
    # strict: the body is JSON as documented; 0 or "yes" is not a boolean, 17 not a part id
    model_config = ConfigDict(extra="forbid", strict=True)

    part_id: str | None = Field(
        default=None, min_length=1, max_length=128, pattern=r"^[\x21-\x7e][\x20-\x7e]*$",
        description="identifier of the part in front of the camera (printable ASCII); tags the result",
    )
    wait: bool = Field(
        default=False, description="answer with the result (up to the trigger timeout + 5 s) instead of at once",
    )


class DefectOut(BaseModel):
    class_id: int
    class_: str = Field(alias="class")
    score: float
    predicted_iou: float
    area_px: int
    bbox: list[int] = Field(description="x, y, width, height in frame pixels")
    centroid: list[float]
    point: list[float]
    polygon: list[list[int]] | None = None

    model_config = ConfigDict(populate_by_name=True)


class ResultOut(BaseModel):
    id: int = Field(description="inspection id, unique across restarts")
    acquisition_id: int = Field(description="the camera's frame counter (0: no frame)")
    part_id: str | None
    trigger_id: int | None
    source: str
    bundle: str
    captured_at: str = Field(description="capture time, ISO 8601 UTC")
    wall_time: float = Field(description="capture time, Unix seconds")
    verdict: VerdictName
    frame: dict[str, int]
    defect_count: int
    max_peak_score: float
    defects: list[DefectOut]
    reason: str | None = Field(description="why a NO_FRAME result has no frame")
    latency_ms: dict[str, float]
    stored: bool = Field(description="committed to the record store (its frame and overlay are kept)")
    links: dict[str, str] = Field(default_factory=dict)


class ResultPage(BaseModel):
    items: list[ResultOut]
    next: str | None = Field(description="URL of the next (older) page; null on the last page")


class TriggerAccepted(BaseModel):
    trigger_id: int
    part_id: str | None
    mode: str
    result: ResultOut | None = Field(description="the result when 'wait' was asked and it came in time")


def result_out(record: dict[str, Any], *, stored: bool) -> ResultOut:
    rid = record["id"]
    links = {"self": f"/api/results/{rid}"}
    if record.get("verdict") != "NO_FRAME":
        links.update(frame=f"/api/results/{rid}/frame.jpg", overlay=f"/api/results/{rid}/overlay.jpg")
    return ResultOut.model_validate({**record, "stored": stored, "links": links})


class BundleActivateRequest(BaseModel):
    """POST /api/bundle/activate (docs/bundle.md, "Hot swap")."""

    model_config = ConfigDict(extra="forbid", strict=True)

    bundle: str = Field(
        min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$",
        description="an installed bundle in engine.bundle_store: its name, hash (4+ hex digits) or name-hash",
    )


class BundleVersionOut(BaseModel):
    directory: str
    name: str
    hash: str
    installed_at: str
    active: bool = Field(description="the store's 'active' pointer names it")
