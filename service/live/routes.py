"""The live page (``/``), its MJPEG stream and the server-sent event stream of results."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from service.api.context import DaemonContext
from service.api.schemas import Problem
from service.live.view import MAX_EVENT_CLIENTS, MAX_VIEWERS

BOUNDARY = "frame"
STATUS_EVERY_S = 1.0
RETRY_AFTER_S = "5"  # a stream refused at its cap: when to try again
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
        sub = ctx.live.frames.try_subscribe(MAX_VIEWERS)
        if sub is None:
            raise HTTPException(503, f"too many live viewers ({MAX_VIEWERS}); close a page and retry",
                                headers={"Retry-After": RETRY_AFTER_S})

        async def parts() -> AsyncIterator[bytes]:
            while True:
                jpeg = await sub.get()
                head = f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n"
                yield head.encode() + jpeg + b"\r\n"

        return HeldStream(parts(), release=lambda: ctx.live.frames.unsubscribe(sub),
                          media_type=f"multipart/x-mixed-replace; boundary={BOUNDARY}",
                          headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    @router.get("/api/events", response_class=StreamingResponse,
                responses={200: {"content": {"text/event-stream": {}}},
                           503: {"model": Problem,
                                 "description": f"{MAX_EVENT_CLIENTS} clients are already listening"}},
                summary="Server-sent events: 'result' per inspection, 'status' every second")
    async def events() -> StreamingResponse:
        sub = ctx.events.fanout.try_subscribe(MAX_EVENT_CLIENTS)
        if sub is None:
            raise HTTPException(503, f"too many event clients ({MAX_EVENT_CLIENTS}); close one and retry",
                                headers={"Retry-After": RETRY_AFTER_S})

        async def stream() -> AsyncIterator[str]:
            loop = asyncio.get_running_loop()
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
                except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                    continue
                yield f"id: {item['id']}\nevent: result\ndata: {json.dumps(item, separators=(',', ':'))}\n\n"

        return HeldStream(stream(), release=lambda: ctx.events.fanout.unsubscribe(sub), media_type="text/event-stream",
                          headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    return router


class HeldStream(StreamingResponse):
    """A stream admitted by taking its subscription in the route (the count and the add one step, so
    a burst cannot pass the cap), released when the response ends however it ends, even if its body
    never started."""

    def __init__(self, content: AsyncIterator[bytes] | AsyncIterator[str], *, release: Callable[[], None],
                 media_type: str, headers: dict[str, str]) -> None:
        super().__init__(content, media_type=media_type, headers=headers)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


def _compact(snapshot: dict[str, object]) -> dict[str, object]:
    """The status event: the snapshot without histogram buckets (the page needs the recent percentiles)."""
    pipeline = dict(snapshot["pipeline"])  # type: ignore[call-overload]
    pipeline["latency"] = {stage: {k: v for k, v in lat.items() if k != "buckets"}
                           for stage, lat in pipeline["latency"].items()}
    return {**snapshot, "pipeline": pipeline}
