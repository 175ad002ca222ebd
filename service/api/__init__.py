"""The HTTP API: ``create_fastapi_app(ctx)`` includes one router per domain.

health (/healthz, /readyz), status (/api/status, /api/config, /metrics), results
(/api/results...), control (POST /api/trigger, bearer token), live view (/, /api/live.mjpeg,
/api/events). Request and response schemas live in service/api/schemas.py.
"""

from __future__ import annotations

from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api import control, health, results, status
from service.api.context import DaemonContext
from service.api.errors import BodyLimit, http_error, reject_unknown_query, unhandled_error, validation_error
from service.live import routes as live_routes

VERSION = "0.1.0"


def create_fastapi_app(ctx: DaemonContext) -> FastAPI:
    app = FastAPI(
        title="defectsam daemon",
        version=VERSION,
        description="Surface-defect inspection: results, live view, triggers, health and metrics. "
                    "Mutating endpoints need 'Authorization: Bearer <api.token>'.",
        dependencies=[Depends(reject_unknown_query)],
    )
    for module in (health, status, results, control, live_routes):
        app.include_router(module.build_router(ctx))
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unhandled_error)
    app.add_middleware(BodyLimit, limit=ctx.config.api.max_body_bytes)
    return app
