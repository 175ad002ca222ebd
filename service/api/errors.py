"""Bad requests end in a 4xx with one clear line, never a 500 and never a traceback.

* a request body over ``api.max_body_bytes``: 413, refused before it is read (Content-Length) or
  as soon as the streamed body passes the limit;
* malformed JSON: 400 naming the position; a well-formed body or query value that fails
  validation: 422 naming the parameter, the value and the rule;
* a query parameter the endpoint does not take: 400 listing what it takes.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.headers import HEADERS, PAGE_POLICY

log = logging.getLogger(__name__)


def problem(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


async def validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    for error in errors:
        if error.get("type") == "json_invalid":
            where = error.get("ctx", {}).get("error", "")
            return problem(400, f"malformed JSON body: {where}".rstrip(": "))
    parts = []
    for error in errors[:3]:
        loc = [str(p) for p in error.get("loc", ())]
        where = ".".join(loc[1:]) if len(loc) > 1 else (loc[0] if loc else "request")
        kind = loc[0] if loc else "request"
        value = error.get("input")
        shown = "" if error.get("type") == "missing" or (kind == "body" and len(loc) == 1) else f" = {_short(value)}"
        message = "unknown field" if error.get("type") == "extra_forbidden" else error.get("msg", "invalid")
        parts.append(f"{kind} {where}{shown}: {message}" if where != kind else f"{kind}{shown}: {message}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return problem(422, "; ".join(parts) + more)


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return problem(exc.status_code, str(exc.detail), dict(exc.headers) if exc.headers else None)


async def unhandled_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("API: %s %s failed", request.method, request.url.path)
    # Starlette sends a 500 from outside every middleware: the security headers are added here.
    return problem(500, f"internal error ({type(exc).__name__}); the daemon logged the details",
                   {**HEADERS, "Content-Security-Policy": PAGE_POLICY})


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def reject_unknown_query(request: Request) -> None:
    """A query parameter the endpoint does not declare is an error, not silently ignored."""
    if not request.query_params:
        return
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return
    allowed = _query_names(dependant)
    unknown = sorted(set(request.query_params) - allowed)
    if unknown:
        takes = ", ".join(sorted(allowed)) if allowed else "no query parameters"
        raise HTTPException(400, f"unknown query parameter(s) {', '.join(unknown)}; this endpoint takes {takes}")


def _query_names(dependant: Any) -> set[str]:
    """Query parameter names of a route and of its dependencies, recursively."""
    names = {param.alias for param in getattr(dependant, "query_params", [])}
    for sub in getattr(dependant, "dependencies", []):
        names |= _query_names(sub)
    return names


class BodyLimit:
    """ASGI middleware refusing request bodies over ``limit`` bytes with 413; a body within it is read
    whole before the app runs."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await problem(400, "Content-Length is not a number")(scope, receive, send)
                return
            if declared > self.limit:
                await self._refuse(scope, receive, send)
                return
        elif scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        # Read the body here (chunked: up to the limit), then hand it on: the routes, and the count of
        # requests in flight inside (service/api/limits.py), see a request only once it is all in.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        await problem(413, f"request body too large: the limit is {self.limit} bytes (api.max_body_bytes)")(
            scope, receive, send)
