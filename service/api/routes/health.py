"""Liveness, readiness, model description and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.auth import AUTH_RESPONSES, RequireApiKey, RequireMetricsKey
from service.api.errors import error_responses
from service.api.schemas import HealthResponse, ModelResponse, ScheduleInfo
from service.diffusion.samplers import SAMPLERS
from service.engine.client import EngineClient

__all__ = ["router"]

router = APIRouter(tags=["operations"])


def _failed(request: Request) -> bool:
    """The engine failed to start or its worker died: the process is about to exit (server.py)."""
    return bool(getattr(request.app.state, "fatal", False))


@router.get(
    "/healthz",
    summary="Liveness",
    response_model=HealthResponse,
    responses={503: {"model": HealthResponse, "description": "the engine failed; the process is exiting"}},
)
async def healthz(request: Request) -> JSONResponse:
    """200 while the process serves HTTP (also while the model loads and while draining); 503 once the engine
    failed (its worker died), in the second before the process exits."""
    if _failed(request):
        return JSONResponse({"status": "failed"}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get(
    "/readyz",
    summary="Readiness",
    response_model=HealthResponse,
    responses={503: {"model": HealthResponse, "description": "model not loaded/warm yet, or draining"}},
)
async def readyz(request: Request) -> JSONResponse:
    """200 once the model is loaded and warm and the engine admits work; 503 before that, while draining and
    once the engine failed."""
    engine: EngineClient | None = getattr(request.app.state, "engine", None)
    if engine is not None and engine.ready:
        return JSONResponse({"status": "ready"})
    if _failed(request):
        status = "failed"
    else:
        status = "draining" if getattr(request.app.state, "draining", False) else "not ready"
    return JSONResponse({"status": status}, status_code=503)


@router.get(
    "/v1/model",
    summary="The served model",
    response_model=ModelResponse,
    responses={**AUTH_RESPONSES, **error_responses(503)},
    dependencies=[RequireApiKey],
)
async def model(request: Request) -> ModelResponse:
    """Name, sha256 of the weights, image shape, T, noise schedule, variance type, device, dtype, samplers."""
    engine: EngineClient | None = getattr(request.app.state, "engine", None)
    if engine is None:
        raise HTTPException(503, "not ready: the model is loading", headers={"Retry-After": "5"})
    info = engine.model_info
    big_t = info.num_train_timesteps
    betas = info.schedule.betas
    return ModelResponse(
        name=info.name,
        sha256=info.sha256,
        image_shape=[info.channels, info.image_size, info.image_size],
        num_train_timesteps=big_t,
        schedule=ScheduleInfo(
            beta_schedule=info.beta_schedule,
            num_train_timesteps=big_t,
            beta_start=float(betas[0]),
            beta_end=float(betas[-1]),
        ),
        variance_type=info.variance_type,
        clip_sample=info.clip_sample,
        device=info.device,
        dtype=info.dtype,
        compiled=bool(engine.stats().get("compiled", 0.0)),
        samplers=list(SAMPLERS),
        default_steps=info.default_steps,
        max_steps=info.max_steps,
        timestep_spacings={name: list(s.spacings) for name, s in SAMPLERS.items()},
        default_timestep_spacing=info.default_timestep_spacing,
        max_images_per_request=request.app.state.max_images,
        examples=list(getattr(request.app.state, "examples", {})),
    )


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {
        "description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}
    }, **AUTH_RESPONSES},
    dependencies=[RequireMetricsKey],
)
async def metrics(request: Request) -> Response:
    """Engine metrics (queue depth, active rows, batch fill, step time, time to first step, request latency,
    evictions, outcomes) and HTTP metrics (requests and latency by route template, method and status).
    Open unless `DDPM_METRICS_AUTH=true` (then it needs an API key like the other routes)."""
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)
