"""FastAPI dependencies and helpers shared by the routes: the engine client, settings, disconnect watching."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Annotated, TypeVar

from fastapi import Depends, HTTPException, Request

from service.config import Settings
from service.engine.client import EngineClient, EngineError, GenerationRequest, RequestHandle

__all__ = [
    "ClientDisconnected",
    "EngineDep",
    "SettingsDep",
    "await_unless_disconnected",
    "get_engine",
    "get_settings",
    "submit",
    "wait_for_disconnect",
]

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The HTTP client went away before its result was ready."""


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_engine(request: Request) -> EngineClient:
    """The engine client; 503 (with Retry-After) while the model loads or warms up, and while draining."""
    engine: EngineClient | None = getattr(request.app.state, "engine", None)
    if engine is None or not engine.ready:
        state = "draining for shutdown" if getattr(request.app.state, "draining", False) else "loading or warming up"
        raise HTTPException(503, f"not ready: the model is {state}", headers={"Retry-After": "5"})
    return engine


EngineDep = Annotated[EngineClient, Depends(get_engine)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def submit(engine: EngineClient, request: GenerationRequest) -> RequestHandle:
    """``engine.submit`` with engine errors (queue full, draining) mapped to HTTP errors."""
    from service.api.errors import to_http_exception

    try:
        return engine.submit(request)
    except EngineError as exc:
        raise to_http_exception(exc) from exc
    except ValueError as exc:  # the engine's own validation: still the client's input
        raise HTTPException(422, str(exc)) from exc


async def wait_for_disconnect(request: Request) -> None:
    """Return when the client disconnects (ASGI ``http.disconnect``); the body must have been read."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def await_unless_disconnected(request: Request, awaitable: asyncio.Future[T] | asyncio.Task[T]) -> T:
    """Await ``awaitable`` unless the client disconnects first (then cancel it, raise ClientDisconnected)."""
    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        raise ClientDisconnected
    finally:
        for pending in (watcher, task):
            if not pending.done():
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await pending
