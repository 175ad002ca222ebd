"""Mutating endpoints (bearer token required): triggers."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Depends, HTTPException
from fastapi.responses import JSONResponse

from service.api.auth import token_guard
from service.api.context import DaemonContext
from service.api.schemas import Problem, TriggerAccepted, TriggerRequest, result_out
from service.pipeline.runner import PipelineError

_WAIT_MARGIN_S = 5.0


def build_router(ctx: DaemonContext) -> APIRouter:
    router = APIRouter(prefix="/api", tags=["control"], dependencies=[Depends(token_guard(ctx.config.api.token))])

    @router.post(
        "/trigger", response_model=TriggerAccepted, status_code=202,
        responses={200: {"model": TriggerAccepted}, 401: {"model": Problem}, 403: {"model": Problem},
                   413: {"model": Problem}, 503: {"model": Problem}, 504: {"model": TriggerAccepted}},
        summary="Inspect the next frame (triggered mode) or tag it (free run) with a part id",
    )
    def trigger(request: Annotated[TriggerRequest | None, Body()] = None) -> JSONResponse:
        request = request or TriggerRequest()
        try:
            ticket = ctx.trigger(request.part_id)
        except PipelineError as exc:
            reasons = ctx.not_ready()
            raise HTTPException(
                503, f"cannot trigger: {exc}" + (f" ({'; '.join(reasons)})" if reasons else "")
            ) from None
        body = TriggerAccepted(trigger_id=ticket.trigger_id, part_id=ticket.part_id,
                               mode=ctx.config.pipeline.mode, result=None)
        if not request.wait:
            return JSONResponse(body.model_dump(mode="json", by_alias=True), status_code=202)
        record = ticket.wait(ctx.config.pipeline.trigger_timeout_s + _WAIT_MARGIN_S)
        if record is None:
            return JSONResponse(body.model_dump(mode="json", by_alias=True), status_code=504)
        body.result = result_out(record.to_dict(), stored=False)
        return JSONResponse(body.model_dump(mode="json", by_alias=True), status_code=200)

    return router
