"""FastAPI dependencies and helpers shared by the routes: the served model and its engine, settings, disconnects."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Annotated, TypeVar

from fastapi import Depends, HTTPException, Query, Request

from service.api.models import ServedModel, ServedModels
from service.config import Settings
from service.engine.client import EngineClient, EngineError, GenerationRequest, RequestHandle

__all__ = [
    "ClientDisconnected",
    "EngineDep",
    "ModelQuery",
    "ReadyModelDep",
    "SettingsDep",
    "await_unless_disconnected",
    "engine_for",
    "get_engine",
    "get_settings",
    "ready_model",
    "served_model",
    "submit",
    "wait_for_disconnect",
]

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The HTTP client went away before its result was ready."""


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def served_model(request: Request, name: str | None) -> ServedModel:
    """The served model called ``name`` (None: the default one); 404 naming the served models otherwise.

    Records the model for the HTTP metrics' ``model`` label.
    """
    models: ServedModels = request.app.state.models
    served = models.get(name)
    if served is None:
        raise HTTPException(404, f"unknown model {name!r}; served models: {', '.join(models.names) or 'none yet'}")
    request.scope.setdefault("state", {})["model"] = served.name
    return served


def ready_model(request: Request, name: str | None) -> ServedModel:
    """The served model ``name`` (None: the default) with its engine ready; 404 for an unknown model, 503 (with
    Retry-After) while it loads or warms up, and while draining."""
    served = served_model(request, name)
    engine = served.engine
    if engine is None or not engine.ready:
        state = "draining for shutdown" if getattr(request.app.state, "draining", False) else "loading or warming up"
        raise HTTPException(503, f"not ready: model {served.name!r} is {state}", headers={"Retry-After": "5"})
    return served


def engine_for(request: Request, name: str | None) -> EngineClient:
    """The ready engine of model ``name`` (:func:`ready_model`): for routes whose body names the model."""
    engine = ready_model(request, name).engine
    assert engine is not None
    return engine


ModelQuery = Annotated[
    str | None,
    Query(max_length=256, description="the served model to use (GET /v1/models); default: the first one"),
]


def get_ready_model(request: Request, model: ModelQuery = None) -> ServedModel:
    """Dependency: the ready model of the ``?model=`` query parameter (:func:`ready_model`)."""
    return ready_model(request, model)


ReadyModelDep = Annotated[ServedModel, Depends(get_ready_model)]


def get_engine(served: ReadyModelDep) -> EngineClient:
    """Dependency: the engine of the ``?model=`` query parameter."""
    assert served.engine is not None
    return served.engine


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
