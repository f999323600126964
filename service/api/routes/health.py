"""Liveness, readiness, model description and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.auth import AUTH_RESPONSES, RequireApiKey, RequireMetricsKey
from service.api.deps import ModelQuery, served_model
from service.api.errors import error_responses
from service.api.models import ServedModel, ServedModels
from service.api.schemas import HealthResponse, ModelResponse, ModelsResponse, ScheduleInfo
from service.diffusion.samplers import DEFAULT_SAMPLER, SAMPLERS

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
    responses={503: {"model": HealthResponse, "description": "a model not loaded/warm yet, or draining"}},
)
async def readyz(request: Request) -> JSONResponse:
    """200 once every served model is loaded and warm and its engine admits work; 503 before that, while
    draining and once an engine failed. `models` gives each model's readiness."""
    models: ServedModels = request.app.state.models
    each = {m.name: "ready" if m.ready else "not ready" for m in models}
    if models.ready and not getattr(request.app.state, "draining", False):
        return JSONResponse({"status": "ready", "models": each})
    if _failed(request):
        status = "failed"
    else:
        status = "draining" if getattr(request.app.state, "draining", False) else "not ready"
    return JSONResponse({"status": status, "models": each}, status_code=503)


def _describe(request: Request, served: ServedModel) -> ModelResponse:
    engine = served.engine
    if engine is None:
        raise HTTPException(503, f"not ready: model {served.name!r} is loading", headers={"Retry-After": "5"})
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
        default_sampler=DEFAULT_SAMPLER,
        default_steps=info.default_steps,
        max_steps=info.max_steps,
        timestep_spacings={name: list(s.spacings) for name, s in SAMPLERS.items()},
        default_timestep_spacing=info.default_timestep_spacing,
        eps_scale=info.eps_scale,
        resampling_samplers=[name for name, s in SAMPLERS.items() if s.supports_resampling],
        max_images_per_request=request.app.state.max_images,
        examples=list(served.examples),
        ready=served.ready,
        conditioning=list(info.conditioning),
        num_classes=info.num_classes,
        default_guidance_scale=info.default_guidance_scale,
    )


@router.get(
    "/v1/model",
    summary="A served model",
    response_model=ModelResponse,
    responses={**AUTH_RESPONSES, **error_responses(404, 422, 503)},
    dependencies=[RequireApiKey],
)
async def model(request: Request, model: ModelQuery = None) -> ModelResponse:
    """Name, sha256 of the weights, image shape, T, noise schedule, variance type, device, dtype, samplers — of
    `?model=` (default: the first served model)."""
    return _describe(request, served_model(request, model))


@router.get(
    "/v1/models",
    summary="Every served model",
    response_model=ModelsResponse,
    responses={**AUTH_RESPONSES, **error_responses(503)},
    dependencies=[RequireApiKey],
)
async def models(request: Request) -> ModelsResponse:
    """The served models (`DDPM_MODELS`), each as `GET /v1/model` describes it; requests without `model` use
    `default`."""
    served: ServedModels = request.app.state.models
    if served.default is None:
        raise HTTPException(503, "not ready: the models are loading", headers={"Retry-After": "5"})
    return ModelsResponse(default=served.default.name, models=[_describe(request, m) for m in served])


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
