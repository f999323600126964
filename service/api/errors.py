"""Error responses: one JSON shape (``{"detail": str, "errors"?: [...], "request_id": str}``) and the status of
each failure. ``request_id`` is the id the response's ``X-Request-ID`` header carries (``RequestIdMiddleware``).

=======================================  ======  =============================================
failure                                   status  notes
=======================================  ======  =============================================
invalid field / array / base64 / NaN     422     readable ``detail`` + per-field ``errors``
body over ``DDPM_MAX_UPLOAD_BYTES``      413
unsupported ``Content-Type``             415
undecodable or oversized image           400     pixel limit checked before decoding
queue full, or the client's share full   429     ``Retry-After`` header (seconds)
API key missing or wrong                 401     ``WWW-Authenticate: Bearer``
engine failed (forward raised, NaN/Inf)  500     detail names the request id
engine not ready / draining / died       503     ``Retry-After`` header
deadline passed                          504
=======================================  ======  =============================================

Under ``/v2`` (the Open Inference Protocol, ``service.api.routes.oip``) the same failures answer in that protocol's
form, ``{"error": str}``, and invalid input is 400 instead of 422.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.encoding import InputError
from service.api.middleware import request_id
from service.api.schemas import ErrorResponse
from service.engine.client import (
    EngineError,
    EngineNotReadyError,
    QueueFullError,
    RequestCancelledError,
    RequestTimeoutError,
)

__all__ = [
    "CLIENT_CLOSED_REQUEST",
    "engine_error_status",
    "error_body",
    "error_responses",
    "install_error_handlers",
    "invalid",
    "to_http_exception",
]

CLIENT_CLOSED_REQUEST = 499  # nginx's code for "the client went away"; never seen by that client

_FASTAPI_BODY_ERROR = "There was an error parsing the body"
_DESCRIPTIONS = {
    400: "Undecodable or oversized image",
    404: "Unknown model (GET /v1/models lists the served ones) or example image",
    413: "Request body larger than DDPM_MAX_UPLOAD_BYTES",
    415: "Unsupported media type",
    422: "Invalid input (readable message in `detail`, one entry per field in `errors`)",
    429: "Queue full, or this client's share of it (DDPM_MAX_ROWS_PER_CLIENT); retry after `Retry-After` seconds",
    500: "The engine failed on this request (the UNet forward raised or returned NaN/Inf)",
    503: "Model not loaded/warm yet, draining for shutdown, or the engine failed",
    504: "Request deadline (DDPM_REQUEST_TIMEOUT_S) passed",
}
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the given error statuses."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        entry: dict[str, Any] = {"model": ErrorResponse, "description": _DESCRIPTIONS[code]}
        if code in (429, 503):
            entry["headers"] = _RETRY_AFTER
        out[code] = entry
    return out


def invalid(field: str, message: str, where: str = "body") -> RequestValidationError:
    """A 422 for one field (``where``: body or query), shaped like pydantic's own validation errors."""
    return RequestValidationError([{"loc": (where, field), "msg": message, "type": "value_error"}])


def _loc(loc: Sequence[Any]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def _summary(errors: Sequence[dict[str, Any]]) -> str:
    return "; ".join(f"{_loc(e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in errors)


def engine_error_status(exc: EngineError) -> tuple[int, str, dict[str, str]]:
    """(status, detail, headers) for an engine failure."""
    if isinstance(exc, QueueFullError):
        return 429, str(exc), {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
    if isinstance(exc, EngineNotReadyError):
        return 503, str(exc) or "engine not ready", {"Retry-After": "5"}
    if isinstance(exc, RequestTimeoutError):
        return 504, str(exc) or "request deadline passed", {}
    if isinstance(exc, RequestCancelledError):
        return CLIENT_CLOSED_REQUEST, str(exc) or "request cancelled", {}
    return 500, f"engine error: {exc}", {}


def error_body(request: Request, detail: str, **extra: Any) -> dict[str, Any]:
    """``{"detail", **extra, "request_id"}``: what every error response carries."""
    return {"detail": detail, **extra, "request_id": request_id(request.scope)}


def to_http_exception(exc: EngineError) -> HTTPException:
    status, detail, headers = engine_error_status(exc)
    return HTTPException(status, detail, headers=headers or None)


def _is_oip(request: Request) -> bool:
    path: str = request.scope.get("path", "")
    return path == "/v2" or path.startswith("/v2/")


def _error(request: Request, status: int, detail: str, headers: dict[str, str] | None = None,
           **extra: Any) -> JSONResponse:
    """The error response: ``error_body``, or under ``/v2`` the Open Inference Protocol's ``{"error"}`` (422 → 400)."""
    if _is_oip(request):
        return JSONResponse({"error": detail}, status_code=400 if status == 422 else status, headers=headers)
    return JSONResponse(error_body(request, detail, **extra), status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Every error body is ``{"detail": str, "request_id": str}``; validation errors add ``errors`` without echoing
    inputs."""

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in exc.errors()
        ]
        return _error(request, 422, _summary(exc.errors()), errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 400 and detail == _FASTAPI_BODY_ERROR:  # undecodable bytes where JSON was expected
            return _error(request, 422, "request body is not valid JSON (UTF-8)")
        return _error(request, exc.status_code, detail, exc.headers)

    @app.exception_handler(InputError)
    async def _input(request: Request, exc: InputError) -> JSONResponse:
        return _error(request, 422, str(exc))

    @app.exception_handler(EngineError)
    async def _engine(request: Request, exc: EngineError) -> JSONResponse:
        status, detail, headers = engine_error_status(exc)
        return _error(request, status, detail, headers)
