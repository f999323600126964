"""API keys: ``Authorization: Bearer <key>`` on the routes that do work or read data.

Keys come from ``DDPM_API_KEYS`` (comma-separated) and ``DDPM_API_KEYS_FILE`` (one per line). With none
configured every route is open; that is allowed on a loopback bind only, unless ``DDPM_AUTH=none`` says so
explicitly (:func:`startup_refusal`). A presented key is compared with every configured key in constant time
(``hmac.compare_digest``); the request then carries a short, non-reversible fingerprint of the key
(``request.state.client_key_id``: the first 8 hex digits of its sha256), never the key itself.

Routers attach :data:`RequireApiKey` (``/generate*``, ``/noise*``, ``/denoise-step``, ``/v1/model``) or
:data:`RequireMetricsKey` (``/metrics``: enforced only with ``DDPM_METRICS_AUTH=true``). Both declare FastAPI's
``HTTPBearer`` scheme, so the OpenAPI document lists it and ``/docs`` has an Authorize button.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.api.schemas import ErrorResponse
from service.config import Settings

__all__ = [
    "AUTH_RESPONSES",
    "ApiKeys",
    "RequireApiKey",
    "RequireMetricsKey",
    "is_loopback",
    "require_api_key",
    "require_metrics_key",
    "startup_refusal",
]

_CHALLENGE = {"WWW-Authenticate": "Bearer"}

AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {
        "model": ErrorResponse,
        "description": "API key missing or wrong (only when DDPM_API_KEYS / DDPM_API_KEYS_FILE are set)",
        "headers": {"WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}}},
    }
}

bearer = HTTPBearer(
    auto_error=False,  # a missing header is our 401 (with request_id), and only when keys are configured
    description="An API key from DDPM_API_KEYS / DDPM_API_KEYS_FILE: `Authorization: Bearer <key>`.",
)


def fingerprint(key: bytes) -> str:
    """A short id of a key for logs and per-client accounting: not reversible, not the key."""
    return hashlib.sha256(key).hexdigest()[:8]


class ApiKeys:
    """The configured keys (as bytes); its repr names only how many there are."""

    def __init__(self, keys: tuple[str, ...] = ()) -> None:
        self._keys = tuple(k.encode("utf-8") for k in keys)
        self._ids = tuple(fingerprint(k) for k in self._keys)

    def __bool__(self) -> bool:
        return bool(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"ApiKeys(<{len(self._keys)} keys>)"

    def match(self, presented: str) -> str | None:
        """The fingerprint of the configured key equal to ``presented``, else None; every key is compared."""
        candidate = presented.encode("latin-1", "replace")  # header values arrive latin-1 decoded: the raw bytes
        found: str | None = None
        for key, key_id in zip(self._keys, self._ids, strict=True):
            if hmac.compare_digest(key, candidate) and found is None:
                found = key_id
        return found


def _unauthorized(request: Request, detail: str) -> HTTPException:
    request.app.state.engine_metrics.rejections.labels(model="", reason="unauthorized").inc()
    return HTTPException(401, detail, headers=_CHALLENGE)


def _check(request: Request, credentials: HTTPAuthorizationCredentials | None) -> None:
    keys: ApiKeys = request.app.state.api_keys
    if not keys:
        return
    if credentials is None or not credentials.credentials:
        raise _unauthorized(request, "API key required: send Authorization: Bearer <key>")
    key_id = keys.match(credentials.credentials)
    if key_id is None:
        raise _unauthorized(request, "invalid API key")
    request.state.client_key_id = key_id


Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


async def require_api_key(request: Request, credentials: Credentials) -> None:
    """401 unless the request brings a configured key (no-op when no key is configured)."""
    _check(request, credentials)


async def require_metrics_key(request: Request, credentials: Credentials) -> None:
    """As :func:`require_api_key` when ``DDPM_METRICS_AUTH=true``; otherwise ``/metrics`` is open."""
    if request.app.state.settings.metrics_auth:
        _check(request, credentials)


RequireApiKey = Depends(require_api_key)
RequireMetricsKey = Depends(require_metrics_key)


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and ``localhost``; anything else (0.0.0.0, ::, other names) may be reachable."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def startup_refusal(settings: Settings) -> str | None:
    """Why ``serve`` must not start with these settings (unreadable key file, or an open non-loopback bind)."""
    try:
        keys = settings.resolved_api_keys()
    except (OSError, ValueError) as exc:
        return f"cannot read API keys: {exc}"
    if keys or settings.auth == "none" or is_loopback(settings.host):
        return None
    return (
        f"refusing to serve on {settings.host} without API keys: anyone who can reach the port could use it. "
        "Set DDPM_API_KEYS (comma-separated) or DDPM_API_KEYS_FILE (one key per line), bind to 127.0.0.1, "
        "or turn authentication off explicitly with DDPM_AUTH=none."
    )
