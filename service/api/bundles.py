"""The running bundle and hot swaps: GET /api/bundle, POST /api/bundle/activate (bearer token).

Activation loads an installed bundle from engine.bundle_store, checks it (every checksum, the engine
opened, a warm-up inspection of a camera frame), swaps it in between two frames and points the store's
``active`` at it; on any failure the running bundle stays and the answer says why (service/reload.py).
"""

from __future__ import annotations

from typing import Any, Protocol

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import JSONResponse

from service.api.auth import token_guard
from service.api.schemas import BundleActivateRequest, BundleVersionOut, Problem
from service.config.models import DaemonConfig
from service.metrics import BundleSnapshot
from service.reload import LoadBusyError, LoadTicket, Reloader

ACTIVATE_WAIT_S = 300.0  # a TensorRT build can take minutes; past this the answer is 202 (still loading)


class BundleContext(Protocol):
    config: DaemonConfig
    reloader: Reloader

    def bundle_snapshot(self) -> BundleSnapshot:
        ...

    def activate_bundle(self, ref: str) -> LoadTicket:
        ...


def build_router(ctx: Any) -> APIRouter:
    daemon: BundleContext = ctx
    router = APIRouter(prefix="/api", tags=["bundle"])

    @router.get("/bundle", response_model=BundleSnapshot, summary="The running bundle, the last hot swap")
    def bundle() -> BundleSnapshot:
        return daemon.bundle_snapshot()

    @router.get("/bundle/versions", response_model=list[BundleVersionOut],
                responses={409: {"model": Problem}}, summary="The bundles installed in engine.bundle_store")
    def versions() -> list[BundleVersionOut]:
        store = daemon.reloader.store
        if store is None:
            raise HTTPException(409, "no engine.bundle_store is configured")
        active = store.active_target()
        return [BundleVersionOut(directory=v.directory, name=v.name, hash=v.digest, installed_at=v.installed_at,
                                 active=v.directory == active) for v in store.versions()]

    @router.post(
        "/bundle/activate", response_model=BundleSnapshot,
        dependencies=[Depends(token_guard(ctx.config.api.token))],
        responses={202: {"model": BundleSnapshot}, 401: {"model": Problem}, 403: {"model": Problem},
                   404: {"model": Problem}, 409: {"model": Problem}, 413: {"model": Problem},
                   503: {"model": Problem}},
        summary="Load an installed bundle, check it and swap it in without a restart",
    )
    def activate(request: BundleActivateRequest) -> BundleSnapshot | JSONResponse:
        if daemon.reloader.store is None:
            raise HTTPException(409, "no engine.bundle_store is configured: bundles are switched from a store")
        if getattr(ctx, "pipeline", None) is None:
            raise HTTPException(503, "no engine is running yet to replace")
        try:
            ticket = daemon.activate_bundle(request.bundle)
        except LoadBusyError as exc:
            raise HTTPException(409, str(exc)) from None
        event = ticket.wait(ACTIVATE_WAIT_S)
        if event is None:  # still loading: GET /api/bundle says when it is done
            return JSONResponse(daemon.bundle_snapshot().model_dump(mode="json"), status_code=202)
        if event.phase != "active":
            code = 404 if event.kind == "unknown" else 409
            raise HTTPException(code, f"bundle {request.bundle!r} not activated, the running one stays: "
                                      f"{event.reason}")
        return daemon.bundle_snapshot()

    return router
