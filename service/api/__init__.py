"""The HTTP API: ``create_fastapi_app(ctx)`` includes one router per domain.

health (/healthz, /readyz), status (/api/status, /api/config, /metrics), results
(/api/results...), control (POST /api/trigger, bearer token), live view (/, /api/live.mjpeg,
/api/events), bundle (/api/bundle, POST /api/bundle/activate: hot swap, bearer token).
Request and response schemas live in service/api/schemas.py; every response carries
the security headers of service/api/headers.py. Requests in flight are bounded, with a reserve for the
probes, /metrics and the trigger (service/api/limits.py).
"""

from __future__ import annotations

from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api import bundles, control, health, results, status
from service.api.context import DaemonContext
from service.api.docs import DOCS_PATHS, add_docs
from service.api.errors import BodyLimit, http_error, reject_unknown_query, unhandled_error, validation_error
from service.api.headers import SecurityHeaders
from service.api.limits import RequestLimit
from service.api.schemas import Problem
from service.live import routes as live_routes

VERSION = "0.1.0"
# What every route may answer besides its own responses, with the body errors.py really sends: an unknown
# query parameter (400) and a rejected value (422) come back as {"detail": "<one line>"}, not as
# FastAPI's default list of errors. A route that declares one of these codes keeps its own.
COMMON_RESPONSES: dict[int | str, dict[str, object]] = {
    400: {"model": Problem, "description": "Bad request: an unknown query parameter, malformed JSON"},
    422: {"model": Problem, "description": "A parameter or body field failed validation (named in 'detail')"},
}


def create_fastapi_app(ctx: DaemonContext) -> FastAPI:
    app = FastAPI(
        title="defectsam daemon",
        version=VERSION,
        description="Surface-defect inspection: results, live view, triggers, health and metrics. "
                    "Mutating endpoints need 'Authorization: Bearer <api.token>'.",
        dependencies=[Depends(reject_unknown_query)],
        responses=COMMON_RESPONSES,
        docs_url=None, redoc_url=None,  # add_docs: the same pages, their assets served here, not from a CDN
    )
    add_docs(app)
    for module in (health, status, results, control, live_routes, bundles):
        app.include_router(module.build_router(ctx))
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unhandled_error)
    app.add_middleware(RequestLimit)  # inside BodyLimit: a request counts in flight once its body is in
    app.add_middleware(BodyLimit, limit=ctx.config.api.max_body_bytes)
    # Added last, so outermost: a 413 of BodyLimit carries the headers too (a 500 gets them from unhandled_error).
    app.add_middleware(SecurityHeaders, docs_paths=DOCS_PATHS)
    return app
