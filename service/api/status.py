"""Status (the stats snapshot as JSON), the running config (secrets redacted), Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.context import DaemonContext
from service.config import redacted
from service.metrics import StatsSnapshot


def build_router(ctx: DaemonContext) -> APIRouter:
    router = APIRouter(tags=["status"])

    @router.get("/api/status", response_model=StatsSnapshot,
                summary="FPS, latency, camera, engine, verdict counts, drops: the same snapshot as /metrics")
    def status() -> StatsSnapshot:
        return ctx.snapshot()

    @router.get("/api/config", summary="The running configuration; secrets show as '**********'")
    def config() -> dict[str, Any]:
        return redacted(ctx.config)

    @router.get("/metrics", summary="Prometheus metrics (text exposition format)",
                response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    def metrics() -> Response:
        return Response(generate_latest(ctx.registry), media_type=CONTENT_TYPE_LATEST)

    return router
