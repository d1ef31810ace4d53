"""Bearer-token auth as a FastAPI security dependency.

`require_token` sits on the router of every endpoint that takes input (/predict, /embed,
/similar, /index), so FastAPI runs it before it validates a parameter or anyone reads the
body: a caller without the token learns nothing but 401 (with `WWW-Authenticate: Bearer`).
The comparison is constant-time (secrets.compare_digest); `token_matches` is the one check,
which gRPC (serving.oip.grpc_server) applies to its `authorization: Bearer` metadata. No token configured = no auth;
serving.settings refuses an empty one at start-up. /health, /ready, /metrics, the page and
the OpenAPI docs stay open (probes and scrapers); they reveal no paths and take no input.
"""

from __future__ import annotations

import secrets

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from serving.errors import ApiError
from serving.settings import Settings

bearer = HTTPBearer(auto_error=False, description="ALEXNET_TOKEN (or the file ALEXNET_TOKEN_FILE) of the server")


def token_matches(settings: Settings, given: str | None) -> bool:
    """`given` is the server's token (constant-time), or the server has none. The one check
    behind HTTP's bearer dependency and gRPC's `authorization` metadata (serving.oip)."""
    if settings.token is None:
        return True
    supplied = given.encode("utf-8") if given is not None else b""
    return secrets.compare_digest(supplied, settings.token.get_secret_value().encode("utf-8"))


def require_token(request: Request, credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:
    if not token_matches(request.app.state.settings, credentials.credentials if credentials is not None else None):
        raise ApiError(
            401,
            "unauthorized",
            "missing or wrong bearer token (Authorization: Bearer <token>)",
            headers={"WWW-Authenticate": 'Bearer realm="alexnet"'},
        )
