"""The API docs pages, ``/docs`` (Swagger UI) and ``/redoc`` (ReDoc), with every script, style sheet
and icon served by the daemon itself.

FastAPI's own pages load Swagger UI and ReDoc from a CDN (and ReDoc's fonts from Google): on a
plant network without internet they stayed blank. The fastapi-offline package ships those bundles
(Swagger UI 5, ReDoc 2, FastAPI's favicon); they are mounted at ``ASSETS_URL`` and the pages are
FastAPI's, pointed at them. The pages' Content-Security-Policy (headers.py) names no other origin.
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

DOCS_URL = "/docs"
REDOC_URL = "/redoc"
DOCS_PATHS = (DOCS_URL, REDOC_URL)  # the pages with an inline script (headers.py allows it by its hash)
ASSETS_URL = "/docs-assets"
ASSETS = Path(fastapi_offline.__file__).parent / "static"  # swagger-ui-bundle.js, swagger-ui.css, ...
# Swagger UI asks swagger.io's online validator for a badge unless told not to (an outside request).
SWAGGER_UI_PARAMETERS: dict[str, object] = {"validatorUrl": None}


def add_docs(app: FastAPI) -> None:
    """Serve the two docs pages and their assets on ``app`` (made with docs_url=None, redoc_url=None)."""
    if not (ASSETS / "swagger-ui-bundle.js").is_file():
        raise RuntimeError(f"the Swagger UI assets are missing from {ASSETS} (reinstall fastapi-offline)")
    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS), name="docs-assets")
    title = app.title

    @app.get(DOCS_URL, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}", title=f"{title} - Swagger UI",
            swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
            swagger_ui_parameters=SWAGGER_UI_PARAMETERS,
        )

    @app.get(REDOC_URL, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}", title=f"{title} - ReDoc",
            redoc_js_url=f"{root}{ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS_URL}/favicon.png", with_google_fonts=False,
        )
