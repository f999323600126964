"""The FastAPI application: ``create_app(settings)`` and its lifespan (load, warm up, serve, drain).

The lifespan loads the checkpoints synchronously (a bad path or sha256 mismatch fails startup at
once), then warms the engines up in the background so that ``/healthz`` answers and ``/readyz`` says
503 until every model is warm. Shutdown drains the engines: new work is refused (503) and requests in
flight finish. Routes reach an engine only through ``app.state.models`` (:mod:`service.api.models`,
one ``EngineClient`` per served model) and :mod:`service.api.deps`.
Each app has its own Prometheus registry, so tests may build many apps in one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry
from starlette.types import Receive, Scope, Send

from service.api.auth import ApiKeys
from service.api.errors import install_error_handlers
from service.api.middleware import BodyLimitMiddleware, HttpMetricsMiddleware, RequestIdMiddleware, json_error
from service.api.models import ServedModel, ServedModels
from service.api.openapi import install_openapi
from service.api.routes import denoise, generate, health, noise, oip
from service.config import Settings
from service.metrics import EngineMetrics, HttpMetrics

__all__ = ["WEB_DIR", "begin_drain", "create_app", "mark_failed"]

log = logging.getLogger("service.api")

WEB_DIR = Path(__file__).resolve().parents[1] / "web"

DESCRIPTION = """
Denoising diffusion (DDPM, Ho et al. 2020) inference with step-level continuous batching.

**Timesteps are 0-based, `t ∈ 0..T-1`, as in diffusers.** `t = 0` is one step of noise (the paper's
1-based step 1) and `t = T-1` is pure noise. `GET /v1/model` reports T.

**Request ids**: a valid `X-Request-ID` header (≤ 128 printable ASCII characters, no spaces) is kept, otherwise
one is generated; every response echoes it in `X-Request-ID`, and the server's log lines about the request carry it.

**Authentication**: when the server has API keys (`DDPM_API_KEYS`, `DDPM_API_KEYS_FILE`), `/generate*`, `/noise*`,
`/denoise-step` and `/v1/model` need `Authorization: Bearer <key>` (Authorize above); a missing or wrong key gets 401
with `WWW-Authenticate: Bearer`. `/healthz`, `/readyz` and the web page stay open; `/metrics` too unless
`DDPM_METRICS_AUTH=true`. Without keys every route is open (allowed on a loopback bind, or with `DDPM_AUTH=none`).

**Errors** are JSON `{"detail": "...", "request_id": "..."}`; 422 adds `errors` (one entry per field). 422: invalid
field, base64, `.npy`, shape, dtype, NaN/Inf; 413: body over `DDPM_MAX_UPLOAD_BYTES`; 415: media
type; 400: undecodable image; 429 + `Retry-After`: queue full, or this client's share of it (fair share per API key,
or per address without keys); 500: the engine failed on the request; 503: not ready, draining, or the engine died;
504: deadline passed; 401: API key missing or wrong. A client that disconnects cancels its request.
"""

TAGS = [
    {"name": "generate", "description": "Sample images (DDPM ancestral or DDIM)"},
    {"name": "noise", "description": "The forward process q(x_t | x_0)"},
    {"name": "denoise", "description": "One reverse step with every intermediate"},
    {"name": "operations", "description": "Health, readiness, model info, metrics"},
]


class _WebFiles:
    """The static web page, mounted at ``/`` after the API: a wrong method on an API path still gets
    405 with that route's ``Allow`` methods (the catch-all mount would otherwise answer it)."""

    route_label = "static"  # its metrics and access-log label (middleware.route_label)

    def __init__(self, directory: Path, api_methods: dict[str, set[str]]) -> None:
        self.static = StaticFiles(directory=directory, html=True)
        self.api_methods = api_methods

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        methods = self.api_methods.get(scope.get("path", ""))
        if scope["type"] == "http" and methods:
            allow = [(b"allow", ", ".join(sorted(methods)).encode())]
            for message in json_error("Method Not Allowed", scope, 405, allow):
                await send(message)
            return
        await self.static(scope, receive, send)


async def _start_engines(app: FastAPI, loaded: list, settings: Settings, threads: int) -> None:
    """Warm each model's engine up in turn (one device), then publish it; the server is ready when all are."""
    from service.engine.batcher import Engine, EngineSettings

    loop = asyncio.get_running_loop()

    def worker_died(exc: BaseException) -> None:  # on the worker thread, after it failed every request
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            loop.call_soon_threadsafe(mark_failed, app)

    factory = app.state.engine_factory or Engine  # tests wrap it to inject faults
    engine_settings = EngineSettings(
        max_batch_rows=settings.max_batch_rows,
        max_queue_rows=max(settings.max_queue_rows, settings.max_batch_rows),
        max_rows_per_client=settings.max_rows_per_client,
        request_timeout_s=settings.request_timeout_s,
        batching=settings.batching,
        dtype=settings.resolved_dtype(),
        threads=threads,
        compiled=settings.compiled,
        cuda_graphs=settings.cuda_graphs,
    )
    for served, model in loaded:
        engine = factory(
            model,  # type: ignore[arg-type]
            engine_settings,
            metrics=app.state.engine_metrics,
            on_fatal=worker_died,
            device_worker=app.state.device_worker,
        )
        await engine.start()  # warm-up forwards on the worker thread (or the shared device worker)
        served.engine = engine
        info = engine.model_info
        log.info("ready: model %s (sha256 %s) on %s, %s", info.name, info.sha256[:12], info.device, info.dtype)


def mark_failed(app: FastAPI) -> None:
    """The engine cannot serve (failed to start, or its worker died): health probes say 503, and the server's
    ``on_fatal`` (``serve``) stops the process with status 1."""
    app.state.fatal = True
    on_fatal = getattr(app.state, "on_fatal", None)
    if on_fatal is not None:
        on_fatal()


async def begin_drain(app: FastAPI) -> None:
    """Refuse new work (``/readyz`` 503 "draining"), let in-flight requests finish, stop the engines."""
    app.state.draining = True
    starting: asyncio.Task | None = getattr(app.state, "starting", None)
    if starting is not None and not starting.done():
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await starting
    timeout = app.state.settings.drain_timeout_s
    await asyncio.gather(*(engine.drain(timeout) for engine in app.state.models.engines()))
    device_worker = app.state.device_worker
    if device_worker is not None:
        app.state.device_worker = None
        await asyncio.to_thread(device_worker.close)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    from service.api.routes.noise import load_examples
    from service.diffusion.checkpoint import load_model
    from service.engine.batcher import claim_threads_for_worker
    from service.engine.device import DeviceWorker

    settings: Settings = app.state.settings
    device = settings.resolved_device()
    threads = claim_threads_for_worker(settings.threads)  # before the loader thread's first op
    models: ServedModels = app.state.models
    loaded = []
    for index, path in enumerate(settings.model_paths()):
        model = await asyncio.to_thread(load_model, path, device)  # sha256 verified
        spec = model.spec
        examples = load_examples(
            settings.examples_dir_for(path, default=index == 0), spec.channels, spec.image_size,
            settings.max_image_pixels,
        )
        served = ServedModel(spec.name, path, examples)
        models.add(served)  # ValueError for a duplicate name: startup fails
        loaded.append((served, model))
        log.info("loaded %s from %s on %s; %d example images", spec.name, path, device, len(examples))
    if len(loaded) > 1 and settings.model_sharing == "worker":  # one compute thread for all (engine/device.py)
        app.state.device_worker = DeviceWorker(threads)

    def _started(task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("engine failed to start: %r", task.exception())
            mark_failed(app)

    app.state.starting = asyncio.create_task(_start_engines(app, loaded, settings, threads))
    app.state.starting.add_done_callback(_started)
    try:
        yield
    finally:
        await begin_drain(app)


def create_app(settings: Settings | None = None) -> FastAPI:
    """A new app (own metrics registry); the model loads when the lifespan starts."""
    settings = settings or Settings()
    app = FastAPI(
        title="DDPM inference service",
        version="0.1.0",
        description=DESCRIPTION,
        openapi_tags=TAGS,
        lifespan=lifespan,
    )
    registry = CollectorRegistry()
    app.state.settings = settings
    app.state.api_keys = ApiKeys(settings.resolved_api_keys())  # empty: auth off (serve refuses that off loopback)
    app.state.registry = registry
    app.state.engine_metrics = EngineMetrics(registry)
    app.state.models = ServedModels()  # filled by the lifespan (DDPM_MODEL, or DDPM_MODELS)
    app.state.device_worker = None  # several models with DDPM_MODEL_SHARING=worker: the engines' compute thread
    app.state.draining = False
    app.state.fatal = False
    app.state.engine_factory = None  # None: service.engine.batcher.Engine
    app.state.max_images = min(settings.max_images_per_request, settings.max_batch_rows)
    install_error_handlers(app)
    routers = (generate, noise, denoise, health, oip)
    for module in routers:
        app.include_router(module.router)
    if WEB_DIR.is_dir():  # the web page, after the API routes so they take precedence
        api_methods: dict[str, set[str]] = {}
        for route in (r for module in routers for r in module.router.routes):
            if isinstance(route, APIRoute):
                api_methods.setdefault(route.path, set()).update(route.methods)
        app.mount("/", _WebFiles(WEB_DIR, api_methods), name="web")
    install_openapi(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes)
    app.add_middleware(HttpMetricsMiddleware, metrics=HttpMetrics(registry))
    app.add_middleware(RequestIdMiddleware)  # last = outermost: every response gets X-Request-ID
    return app
