"""Mutating endpoints need ``Authorization: Bearer <api.token>``; with no token configured they are off."""

from __future__ import annotations

import hmac
from collections.abc import Callable

from fastapi import Depends, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

_bearer = HTTPBearer(auto_error=False, description="the daemon's api.token (DEFECTSAM__API__TOKEN)")


def token_guard(token: SecretStr | None) -> Callable[..., None]:
    """A dependency that lets a request through only with the configured bearer token."""
    expected = token.get_secret_value().encode() if token is not None else None

    def check(credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:  # noqa: B008
        if expected is None:
            raise HTTPException(403, "mutating endpoints are disabled: no api.token is configured "
                                     "(set DEFECTSAM__API__TOKEN or api.token to enable them)")
        if credentials is None:
            raise HTTPException(401, "missing 'Authorization: Bearer <token>' header",
                                headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(credentials.credentials.encode(), expected):
            raise HTTPException(403, "invalid API token", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})

    return check
