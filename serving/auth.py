"""Bearer-token auth as a FastAPI security dependency.

`require_token` sits on the router of every endpoint that takes input (/predict, /embed,
/similar, /index), so FastAPI runs it before it validates a parameter or anyone reads the
body: a caller without the token learns nothing but 401 (with `WWW-Authenticate: Bearer`).
The comparison is constant-time (secrets.compare_digest). No token configured = no auth;
serving.settings refuses an empty one at start-up. /health, /ready, /metrics, the page and
the OpenAPI docs stay open (probes and scrapers); they reveal no paths and take no input.
"""

from __future__ import annotations

import secrets

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from serving.errors import ApiError

bearer = HTTPBearer(auto_error=False, description="ALEXNET_TOKEN (or the file ALEXNET_TOKEN_FILE) of the server")


def require_token(request: Request, credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:
    token = request.app.state.settings.token
    if token is None:
        return
    given = credentials.credentials.encode("utf-8") if credentials is not None else b""
    if not secrets.compare_digest(given, token.get_secret_value().encode("utf-8")):
        raise ApiError(401, "unauthorized", "missing or wrong bearer token (Authorization: Bearer <token>)",
                       headers={"WWW-Authenticate": 'Bearer realm="alexnet"'})
