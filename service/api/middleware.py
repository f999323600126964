"""Pure ASGI middlewares (no ``BaseHTTPMiddleware``: it would hide client disconnects from the routes).

* :class:`RequestIdMiddleware` (outermost) takes a valid ``X-Request-ID`` or makes one, echoes it on every
  response, puts it in ``request.state.request_id`` and in the log context, writes the access line, and turns
  an unhandled exception into a JSON 500 that names the request.
* :class:`HttpMetricsMiddleware` counts requests and times them by route template, method and status.
* :class:`BodyLimitMiddleware` answers 413 for a body over the limit: at once from ``Content-Length``,
  or as soon as a chunked body crosses the limit while a route reads it.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any

from starlette.exceptions import HTTPException
from starlette.routing import Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.logging_setup import request_id_var
from service.metrics import HttpMetrics

__all__ = [
    "BodyLimitMiddleware",
    "HttpMetricsMiddleware",
    "RequestIdMiddleware",
    "json_error",
    "log_fields",
    "request_id",
    "route_label",
]

_VALID_REQUEST_ID = re.compile(rb"[!-~]{1,128}")  # printable ASCII, no space, at most 128 characters
_MAX_LOGGED_PATH = 256

access_log = logging.getLogger("service.access")
log = logging.getLogger("service.api")


def route_label(scope: Scope) -> str:
    """The matched route's template (``/noise``), ``static`` for the web page, ``unmatched`` otherwise.

    FastAPI's router sets no ``scope["route"]`` for a mount, so a mounted app names itself through a
    ``route_label`` attribute on the endpoint it becomes (``scope["endpoint"]``).
    """
    route = scope.get("route")
    if isinstance(route, Mount):
        return "static"
    path = getattr(route, "path", None)
    if isinstance(path, str) and path:
        return path
    label = getattr(scope.get("endpoint"), "route_label", None)
    return label if isinstance(label, str) else "unmatched"


def request_id(scope: Scope) -> str | None:
    """The id :class:`RequestIdMiddleware` gave this request (``request.state.request_id``)."""
    return scope.get("state", {}).get("request_id")


def log_fields(scope: Scope, **fields: Any) -> None:
    """Extra fields for the request's access line (e.g. ``sampler``, ``images``)."""
    scope.setdefault("state", {}).setdefault("log_fields", {}).update(fields)


def json_error(detail: str, scope: Scope, status: int, headers: list[tuple[bytes, bytes]] | None = None
               ) -> tuple[Message, Message]:
    """``http.response.start`` and ``http.response.body`` of a JSON error ``{"detail", "request_id"}``."""
    body = json.dumps({"detail": detail, "request_id": request_id(scope)}).encode()
    headers = [*(headers or []), (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    return ({"type": "http.response.start", "status": status, "headers": headers},
            {"type": "http.response.body", "body": body})


class RequestIdMiddleware:
    """Request ids, the access line, and a JSON 500 for anything unhandled; add it last (outermost)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    @staticmethod
    def _incoming(scope: Scope) -> str | None:
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":
                return value.decode("ascii") if _VALID_REQUEST_ID.fullmatch(value) else None
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = self._incoming(scope) or uuid.uuid4().hex  # an invalid id is replaced, not refused
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        token = request_id_var.set(rid)
        start = time.perf_counter()
        status: int | None = None
        header = (b"x-request-id", rid.encode("ascii"))

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, header]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:  # Starlette's ServerErrorMiddleware sits outside and would answer in plain text
            log.exception("unhandled error in %s %s", scope["method"], route_label(scope))
            if status is None:
                for message in json_error("internal server error", scope, 500):
                    await send_with_id(message)
            else:
                status = 500  # the response broke off after it started
        finally:
            try:
                self._access_line(scope, status, time.perf_counter() - start)
            finally:
                request_id_var.reset(token)

    @staticmethod
    def _access_line(scope: Scope, status: int | None, seconds: float) -> None:
        """``POST /generate 200 0.153s`` plus fields; never headers, query strings or bodies (keys, inputs)."""
        raw = scope.get("raw_path") or scope.get("path", "").encode()
        # as sent (percent-encoded, no query string), anything but printable ASCII escaped: one line per request
        path = "".join(chr(b) if 0x21 <= b <= 0x7E else f"%{b:02X}" for b in raw[:_MAX_LOGGED_PATH])
        status = 500 if status is None else status  # no response: as HttpMetricsMiddleware counts it
        fields = {
            "route": route_label(scope),
            "method": scope["method"],
            "path": path,
            "status": status,
            "duration": round(seconds, 6),
            **scope.get("state", {}).get("log_fields", {}),
        }
        client = scope.get("client")
        if client:
            fields["client"] = client[0]
        more = "".join(f" {k}={fields[k]}" for k in ("sampler", "images") if k in fields)
        access_log.info("%s %s %d %.3fs%s", scope["method"], path, status, seconds, more, extra=fields)


class HttpMetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            model = scope.get("state", {}).get("model", "")  # set by the route once it resolved its model (deps.py)
            self.metrics.observe(route_label(scope), scope["method"], status, time.perf_counter() - start, model)


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self, size: int | None = None) -> str:
        got = f" ({size} bytes)" if size is not None else ""
        return f"request body too large{got}; the limit is {self.max_bytes} bytes (DDPM_MAX_UPLOAD_BYTES)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    size = int(value)
                except ValueError:
                    size = -1
                if size > self.max_bytes:
                    for message in json_error(self._too_large(size), scope, 413):
                        await send(message)
                    return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, self._too_large())
            return message

        await self.app(scope, limited_receive, send)
