"""Liveness and readiness, for systemd, Kubernetes-style probes and load balancers."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.api.context import DaemonContext
from service.api.schemas import Health, Readiness


def build_router(ctx: DaemonContext) -> APIRouter:
    router = APIRouter(tags=["health"])

    @router.get("/healthz", response_model=Health, summary="Liveness: the process answers")
    async def healthz() -> Health:  # on the event loop: no worker thread to wait for under load
        return Health(status="alive")

    @router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}},
                summary="Readiness: 200 only when the camera is connected and the engine loaded")
    def readyz() -> JSONResponse:
        reasons = ctx.not_ready()
        body = Readiness(ready=not reasons, reasons=reasons)
        return JSONResponse(body.model_dump(), status_code=200 if not reasons else 503)

    return router
