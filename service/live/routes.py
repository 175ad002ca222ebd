"""The live page (``/``), its MJPEG stream and the server-sent event stream of results."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from importlib import resources
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import HTMLResponse, Response, StreamingResponse

from service.api.context import DaemonContext
from service.api.schemas import Problem
from service.live.view import MAX_VIEWERS

BOUNDARY = "frame"
STATUS_EVERY_S = 1.0
_STATIC = resources.files("service") / "static"
_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}


def build_router(ctx: DaemonContext) -> APIRouter:
    router = APIRouter(tags=["live view"])

    @router.get("/", response_class=HTMLResponse, summary="The live page: stream, FPS, latency, OK/NG, defects")
    def page() -> HTMLResponse:
        return HTMLResponse((_STATIC / "index.html").read_text(encoding="utf-8"),
                            headers={"Cache-Control": "no-cache"})

    @router.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        suffix = name[name.rfind("."):] if "." in name else ""
        if suffix not in _TYPES or "/" in name or name.startswith("."):
            raise HTTPException(404, f"no static file {name!r}")
        path = _STATIC / name
        if not path.is_file():
            raise HTTPException(404, f"no static file {name!r}")
        return Response(path.read_bytes(), media_type=_TYPES[suffix], headers={"Cache-Control": "no-cache"})

    @router.get("/api/live.mjpeg", response_class=StreamingResponse,
                responses={200: {"content": {f"multipart/x-mixed-replace; boundary={BOUNDARY}": {}}},
                           503: {"model": Problem, "description": f"{MAX_VIEWERS} viewers are already watching"}},
                summary="MJPEG stream of results drawn over their frames (encoded only while watched)")
    async def live(
        t: Annotated[str | None, Query(max_length=32, description="cache buster for reconnects; ignored")] = None,
    ) -> StreamingResponse:
        if ctx.live.viewers >= MAX_VIEWERS:
            raise HTTPException(503, f"too many live viewers ({MAX_VIEWERS}); close a page and retry")

        async def parts() -> AsyncIterator[bytes]:
            sub = ctx.live.frames.subscribe()
            try:
                while True:
                    jpeg = await sub.get()
                    head = f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n"
                    yield head.encode() + jpeg + b"\r\n"
            finally:
                ctx.live.frames.unsubscribe(sub)

        return StreamingResponse(parts(), media_type=f"multipart/x-mixed-replace; boundary={BOUNDARY}",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    @router.get("/api/events", response_class=StreamingResponse,
                responses={200: {"content": {"text/event-stream": {}}}},
                summary="Server-sent events: 'result' per inspection, 'status' every second")
    async def events() -> StreamingResponse:
        async def stream() -> AsyncIterator[str]:
            sub = ctx.events.fanout.subscribe()
            loop = asyncio.get_running_loop()
            try:
                yield "retry: 2000\n\n"
                next_status = 0.0
                while True:
                    now = loop.time()
                    if now >= next_status:
                        snapshot = ctx.snapshot().model_dump(mode="json")
                        yield f"event: status\ndata: {json.dumps(_compact(snapshot))}\n\n"
                        next_status = now + STATUS_EVERY_S
                    try:
                        item = await asyncio.wait_for(sub.get(), timeout=max(0.01, next_status - loop.time()))
                    except TimeoutError:
                        continue
                    yield f"id: {item['id']}\nevent: result\ndata: {json.dumps(item, separators=(',', ':'))}\n\n"
            finally:
                ctx.events.fanout.unsubscribe(sub)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    return router


def _compact(snapshot: dict[str, object]) -> dict[str, object]:
    """The status event: the snapshot without histogram buckets (the page needs the recent percentiles)."""
    pipeline = dict(snapshot["pipeline"])  # type: ignore[call-overload]
    pipeline["latency"] = {stage: {k: v for k, v in lat.items() if k != "buckets"}
                           for stage, lat in pipeline["latency"].items()}
    return {**snapshot, "pipeline": pipeline}
