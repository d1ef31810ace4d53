"""Every client error is a JSON body {"error": ..., "detail": ...} with a 4xx (or a 503
under overload); the server stays up. Under /v2 (the Open Inference Protocol, serving.oip)
the body is that protocol's error shape, {"error": "<message>"}, with the same status.
`install(app)` registers the handlers."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.preprocess import ImageError

# ImageError.kind -> status.
IMAGE_ERROR_STATUS = {"too_large": 413, "over_budget": 413, "unsupported_format": 415}


class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.error, self.detail, self.headers = status, error, detail, headers

    @classmethod
    def from_image_error(cls, exc: ImageError) -> ApiError:
        return cls(IMAGE_ERROR_STATUS.get(exc.kind, 400), exc.kind, exc.reason)


def error_response(status: int, error: str, detail, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


def _answer(request: Request, status: int, error: str, detail, headers: dict[str, str] | None = None) -> JSONResponse:
    path = request.url.path
    if path == "/v2" or path.startswith("/v2/"):  # the Open Inference Protocol's error shape
        return JSONResponse({"error": str(detail)}, status_code=status, headers=headers)
    return error_response(status, error, detail, headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return _answer(request, exc.status, exc.error, exc.detail, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return _answer(request, 422, "invalid_request", detail)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _answer(request, exc.status_code, "http_error", str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        return _answer(request, 500, "internal_error", "the server failed on this request; it is still up")
