"""Inspection results: the latest, the stored history (paged, newest first), one result and its images.

Overlays are drawn on demand, bounded and cached by service/api/overlays.py.
"""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import urlencode

import cv2
from fastapi import APIRouter, Header, HTTPException, Path, Query
from fastapi.responses import Response

from engines.overlay import overlay_scale, render_overlay
from service.api import overlays
from service.api.context import DaemonContext
from service.api.schemas import Problem, ResultOut, ResultPage, VerdictName, result_out
from service.pipeline.record import InspectionRecord
from service.store import RecordStore

_JPEG: dict[int | str, dict[str, Any]] = {200: {"content": {"image/jpeg": {}}}, 404: {"model": Problem}}
_OVERLAY: dict[int | str, dict[str, Any]] = {
    **_JPEG,
    304: {"description": "If-None-Match named this overlay's ETag: not modified"},
    503: {"model": Problem, "description": f"the overlay renders stayed busy for {overlays.WAIT_S:g} s, or "
                                            f"{overlays.WAITING} requests already wait (retry after Retry-After)"},
}
RecordId = Annotated[int, Path(ge=1, le=2**62, description="inspection id")]


def build_router(ctx: DaemonContext) -> APIRouter:
    router = APIRouter(prefix="/api/results", tags=["results"])

    def store() -> RecordStore:
        if ctx.store is None:
            raise HTTPException(404, "the record store is disabled (store.enabled: false)")
        return ctx.store

    def in_memory(record_id: int) -> InspectionRecord | None:
        """The newest result or the newest NG one (the live page's "Last NG"), when it is ``record_id``:
        their frames stay in memory, so the page's images work whether the store kept them or not."""
        for record in (ctx.latest(), ctx.last_ng()):
            if record is not None and record.inspection_id == record_id:
                return record
        return None

    @router.get("/latest", response_model=ResultOut, responses={404: {"model": Problem}},
                summary="The newest result (kept in memory, whether stored or not)")
    def latest() -> ResultOut:
        record = ctx.latest()
        if record is None:
            reasons = ctx.not_ready()
            raise HTTPException(404, "no result yet" + (f" ({'; '.join(reasons)})" if reasons else ""))
        stored = ctx.store is not None and ctx.store.get(record.inspection_id) is not None
        return result_out(record.to_dict(), stored=stored)

    @router.get("", response_model=ResultPage, responses={404: {"model": Problem}},
                summary="Stored results, newest first, paged with 'before'")
    def history(
        limit: Annotated[int, Query(ge=1, le=200, description="results per page")] = 50,
        before: Annotated[int | None, Query(ge=1, description="only ids below this (the 'next' link sets it)")] = None,
        verdict: Annotated[VerdictName | None, Query(description="only this verdict")] = None,
        part_id: Annotated[str | None, Query(max_length=128, description="only this part id")] = None,
        since: Annotated[float | None, Query(ge=0, description="captured at or after (Unix seconds)")] = None,
        until: Annotated[float | None, Query(ge=0, description="captured before (Unix seconds)")] = None,
    ) -> ResultPage:
        items = store().list(limit=limit, before=before, verdict=verdict, part_id=part_id, since=since, until=until)
        next_url = None
        if len(items) == limit:
            query = {k: v for k, v in {"limit": limit, "before": items[-1]["id"], "verdict": verdict,
                                       "part_id": part_id, "since": since, "until": until}.items() if v is not None}
            next_url = f"/api/results?{urlencode(query)}"
        return ResultPage(items=[result_out(item, stored=True) for item in items], next=next_url)

    @router.get("/{record_id}", response_model=ResultOut, responses={404: {"model": Problem}},
                summary="One result, from the store (or the newest, still in memory)")
    def one(record_id: RecordId) -> ResultOut:
        stored = ctx.store.get(record_id) if ctx.store is not None else None
        if stored is not None:
            return result_out(stored, stored=True)
        record = in_memory(record_id)
        if record is None:
            raise HTTPException(404, f"no result {record_id} (not kept: OK results are sampled, see store.*)")
        return result_out(record.to_dict(), stored=False)

    @router.get("/{record_id}/frame.jpg", response_class=Response, responses=_JPEG, summary="The result's frame")
    def frame(record_id: RecordId) -> Response:
        data = ctx.store.frame_jpeg(record_id) if ctx.store is not None else None
        if data is None:
            record = in_memory(record_id)
            if record is not None and record.frame is not None:
                data = _jpeg(record.frame)
        if data is None:
            raise HTTPException(404, f"no frame kept for result {record_id}")
        return Response(data, media_type="image/jpeg")

    @router.get("/{record_id}/overlay.jpg", response_class=Response, responses=_OVERLAY,
                summary=f"The result's frame with its defect masks drawn on it (at most {overlays.MAX_SIDE} px)")
    async def overlay(
        record_id: RecordId,
        width: Annotated[int | None, Query(ge=64, le=8192, description="downscale to at most this width")] = None,
        if_none_match: Annotated[str | None, Header(max_length=1024, description="an ETag sent before")] = None,
    ) -> Response:
        def render() -> bytes | None:  # on a render thread (service/api/overlays.py)
            store = ctx.store
            data = store.overlay_jpeg(record_id, width, max_side=overlays.MAX_SIDE) if store is not None else None
            if data is None:
                record = in_memory(record_id)
                if record is not None and record.frame is not None:
                    h, w = record.frame.shape[:2]
                    scale = overlay_scale(w, h, width, overlays.MAX_SIDE)
                    data = _jpeg(render_overlay(record.frame, record.result, scale=scale))
            return data

        try:
            drawn = await ctx.overlays.get((record_id, width), render)
        except overlays.OverlayBusyError as exc:
            raise HTTPException(503, exc.detail, headers={"Retry-After": str(exc.retry_after_s)}) from None
        if drawn is None:
            raise HTTPException(404, f"no frame kept for result {record_id}")
        headers = {"ETag": drawn.etag, "Cache-Control": "private, max-age=300"}  # an id's overlay never changes
        if if_none_match is not None and _names_etag(if_none_match, drawn.etag):
            return Response(status_code=304, headers=headers)
        return Response(drawn.jpeg, media_type="image/jpeg", headers=headers)

    return router


def _jpeg(image: object, quality: int = 85) -> bytes | None:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])  # type: ignore[call-overload]
    return buf.tobytes() if ok else None


def _names_etag(if_none_match: str, etag: str) -> bool:
    """Whether an If-None-Match header names ``etag`` (or is '*'); weak comparison, as RFC 9110 asks."""
    return any(tag.strip().removeprefix("W/") in (etag, "*") for tag in if_none_match.split(","))
