"""Security headers on every HTTP response: no MIME sniffing, no framing, a Content-Security-Policy.

The live page (service/static) has no inline script or style and loads nothing from elsewhere, so
its policy allows only the daemon's own origin: a value that reached the page (a part id, a class
name) can never run as script there, and no other site can frame the page to trick an operator
into a click. The API docs pages (``/docs``, ``/redoc``: service/api/docs.py) load Swagger UI and
ReDoc from the daemon too, and start them with one inline script: their policy allows it by the
SHA-256 of the very page being sent, never ``'unsafe-inline'``, and names no other origin.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

PAGE_POLICY = "; ".join((
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data:",
    "connect-src 'self'",  # fetch and the EventSource of /api/events
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
))
# The docs pages: Swagger UI and ReDoc from the daemon (service/api/docs.py). {scripts} are the page's
# inline scripts' hashes. Styles: both UIs inject style elements at run time; ReDoc starts a blob worker.
_DOCS_POLICY = "; ".join((
    "default-src 'none'",
    "script-src 'self'{scripts}",
    "style-src 'self' 'unsafe-inline'",
    "font-src 'self' data:",
    "img-src 'self' data:",
    "connect-src 'self'",
    "worker-src 'self' blob:",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
))
HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
_INLINE_SCRIPT = re.compile(rb"<script\b(?![^>]*\bsrc\s*=)[^>]*>(.*?)</script\s*>", re.S | re.I)


def docs_policy(html: bytes) -> str:
    """The docs pages' policy, allowing exactly the inline scripts of ``html``."""
    hashes = sorted({base64.b64encode(hashlib.sha256(body).digest()).decode() for body in _INLINE_SCRIPT.findall(html)})
    return _DOCS_POLICY.format(scripts="".join(f" 'sha256-{digest}'" for digest in hashes))


class SecurityHeaders:
    """ASGI middleware adding HEADERS and a Content-Security-Policy to every response that lacks them
    (a route may set its own). Responses of ``docs_paths`` are held until their body is complete (a
    page of about 1 KB) so that their policy can name their inline scripts' hashes."""

    def __init__(self, app: ASGIApp, docs_paths: Iterable[str | None] = ()) -> None:
        self.app = app
        self.docs_paths = frozenset(path for path in docs_paths if path)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope.get("path") in self.docs_paths:
            await self._docs(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                _add(message, PAGE_POLICY)
            await send(message)

        await self.app(scope, receive, send_with_headers)

    async def _docs(self, scope: Scope, receive: Receive, send: Send) -> None:
        start: Message | None = None
        body: list[bytes] = []

        async def hold(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                return
            if message["type"] != "http.response.body" or start is None:
                await send(message)
                return
            body.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            _add(start, docs_policy(b"".join(body)))
            await send(start)
            await send({"type": "http.response.body", "body": b"".join(body), "more_body": False})

        await self.app(scope, receive, hold)


def _add(start: Message, policy: str) -> None:
    headers = MutableHeaders(scope=start)
    for name, value in (*HEADERS.items(), ("Content-Security-Policy", policy)):
        if name not in headers:
            headers[name] = value
