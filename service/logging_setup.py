"""Logging of ``python -m service serve``: readable text (default) or one JSON object per line for log shippers.

Every line emitted while a request is handled carries its id: :class:`~service.api.middleware.RequestIdMiddleware`
sets :data:`request_id_var` and a handler filter copies it onto each record. uvicorn's own loggers go through the
same handler; its access log is off, the middleware writes one access line per request instead (logger
``service.access``, with route, method, status, duration and, for generations, sampler and images).

JSON lines (python-json-logger) hold ``time`` (ISO 8601, UTC), ``level``, ``logger``, ``message``,
``request_id`` (inside a request) and any ``extra`` fields of the record.
"""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar
from typing import Any, Literal, TextIO

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

__all__ = ["TEXT_FORMAT", "RequestIdFilter", "configure_logging", "log_handler", "request_id_var"]

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
_UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")


class RequestIdFilter(logging.Filter):
    """Puts the current request's id on every record (unless the record brings its own)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            request_id = request_id_var.get()
            if request_id is not None:
                record.request_id = request_id
        return True


class _JsonFormatter(JsonFormatter):
    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        return {"time": log_data.pop("time"), **log_data}  # time first, as in the text format


def _formatter(fmt: Literal["text", "json"]) -> logging.Formatter:
    if fmt == "json":
        return _JsonFormatter(
            "%(levelname)s %(name)s %(message)s",
            rename_fields={"levelname": "level", "name": "logger"},
            timestamp="time",
            reserved_attrs=[*RESERVED_ATTRS, "color_message"],  # uvicorn's ANSI-coloured copy of the message
        )
    return logging.Formatter(TEXT_FORMAT, defaults={"request_id": "-"})


def log_handler(fmt: Literal["text", "json"] = "text", stream: TextIO | None = None) -> logging.Handler:
    """A stream handler (stderr by default) in the given format whose records carry the request id."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_formatter(fmt))
    handler.addFilter(RequestIdFilter())
    return handler


def configure_logging(level: str, fmt: Literal["text", "json"] = "text") -> logging.Handler:
    """One stderr handler on the root logger (replacing any) that uvicorn's loggers propagate to.

    Call before ``uvicorn.Config(..., log_config=None, access_log=False)``, so uvicorn keeps this setup.
    Python warnings are logged too, so with ``json`` every line on stderr is JSON.
    """
    handler = log_handler(fmt)
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in _UVICORN_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    logging.captureWarnings(True)
    return handler
