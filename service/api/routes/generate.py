"""``POST /generate`` (PNG | JSON | npy) and ``POST /generate/stream`` (Server-Sent Events)."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from typing import TypeVar

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from service.api.auth import AUTH_RESPONSES, RequireApiKey
from service.api.deps import ClientDisconnected, SettingsDep, await_unless_disconnected, engine_for, submit
from service.api.encoding import b64_png, decode_image_field, decode_mask_field
from service.api.errors import CLIENT_CLOSED_REQUEST, engine_error_status, error_body, error_responses, invalid
from service.api.middleware import log_fields, request_id
from service.api.schemas import GenerateRequest, GenerateResponse, ProgressData, StreamErrorData
from service.config import Settings
from service.diffusion.samplers import get_sampler
from service.engine.client import EngineClient, EngineError, GenerationRequest, GenerationResult, ProgressEvent
from service.imaging import grid, npy_bytes, png_bytes

__all__ = ["client_id", "generation_request", "result_payload", "router"]

T = TypeVar("T")

router = APIRouter(tags=["generate"], dependencies=[RequireApiKey], responses=AUTH_RESPONSES)

_SEED_HEADER = {
    "X-Seed": {"description": "the seed used (reproduces the images)", "schema": {"type": "integer"}},
    "X-Model": {"description": "the model that generated the images", "schema": {"type": "string"}},
}
_GENERATE_200 = {
    "description": "png: one image, or a grid when num_images > 1; json: base64 PNGs; npy: float32 (N, C, H, W)",
    "headers": _SEED_HEADER,
    "content": {
        "image/png": {"schema": {"type": "string", "format": "binary"}},
        "application/json": {"schema": {"$ref": "#/components/schemas/GenerateResponse"}},
        "application/x-npy": {"schema": {"type": "string", "format": "binary"}},
    },
}
_STREAM_200 = {
    "description": (
        "Server-Sent Events: `progress` events (data: ProgressData JSON — step, total and, every k steps, a base64 "
        "PNG preview of the predicted x_0), then one `result` event (data: GenerateResponse JSON) or one `error` "
        "event (data: StreamErrorData JSON, e.g. status 504 when the deadline passed)."
    ),
    "headers": _SEED_HEADER,
    "content": {
        "text/event-stream": {
            "schema": {
                "type": "object",
                "description": "one event; `data` is JSON (ProgressData, GenerateResponse or StreamErrorData)",
                "required": ["event", "data"],
                "properties": {
                    "event": {"type": "string", "enum": ["progress", "result", "error"]},
                    "data": {"type": "string"},
                },
            },
            "example": 'event: progress\ndata: {"step": 1, "total": 50, "preview": null}\n\n'
            'event: result\ndata: {"seed": 42, "sampler": "ddim", "steps": 50, ...}\n\n',
        }
    },
}
_ERRORS = error_responses(404, 422, 429, 500, 503, 504)


def client_id(request: Request) -> str:
    """Whose share of the queue a request uses: its API key's fingerprint, else the remote address."""
    key_id = getattr(request.state, "client_key_id", None)
    if key_id is not None:
        return f"key:{key_id}"
    return f"addr:{request.client.host if request.client else 'unknown'}"


def generation_request(
    body: GenerateRequest, engine: EngineClient, settings: Settings, request: Request, previews: bool = False
) -> GenerationRequest:
    """Validate the body against the model and settings (422 with a readable message) and fill defaults.

    ``previews``: ask the engine for predicted-x_0 previews (only the SSE route shows them).
    """
    big_t = engine.model_info.num_train_timesteps
    limit = min(settings.max_images_per_request, settings.max_batch_rows)
    if body.num_images > limit:
        raise invalid(
            "num_images", f"must be in 1..{limit} (DDPM_MAX_IMAGES_PER_REQUEST, at most DDPM_MAX_BATCH_ROWS), "
            f"got {body.num_images}"
        )
    info = engine.model_info
    steps = body.steps if body.steps is not None else info.default_steps[body.sampler]
    spacing = body.timestep_spacing or info.default_timestep_spacing[body.sampler]
    sampler = get_sampler(body.sampler)
    if spacing not in sampler.spacings:
        raise invalid("timestep_spacing", f"{spacing!r} is not supported by sampler {body.sampler!r}; "
                      f"supported: {', '.join(sampler.spacings)}")
    top = sampler.max_steps(big_t)
    if steps > top:
        raise invalid("steps", f"must be in 1..{top} for sampler {body.sampler!r} (T = {big_t}), got {steps}")
    seed = body.seed if body.seed is not None else secrets.randbelow(2**32)
    every = (settings.preview_every or max(1, steps // 10)) if previews else 0
    shape = (info.channels, info.image_size, info.image_size)
    limit_px = settings.max_image_pixels
    init = decode_image_field(body.init_image, "init_image", shape, limit_px) if body.init_image else None
    mask = decode_mask_field(body.mask, "mask", shape, limit_px) if body.mask else None
    if mask is not None and init is None:
        raise invalid("mask", "inpainting needs init_image: the picture whose unmasked pixels are kept")
    if body.class_label is not None and "class_guidance" not in info.conditioning:
        raise invalid("class_label", f"model {info.name!r} has no guidance classifier (GET /v1/model conditioning)")
    if body.class_label is not None and info.num_classes is not None and body.class_label >= info.num_classes:
        raise invalid("class_label", f"must be in 0..{info.num_classes - 1}, got {body.class_label}")
    return GenerationRequest(
        num_images=body.num_images,
        seed=seed,
        sampler=body.sampler,
        steps=steps,
        eta=body.eta if sampler.uses_eta else 0.0,
        timestep_spacing=spacing,
        timeout_s=settings.request_timeout_s,
        preview_every=every,
        client=client_id(request),
        request_id=request_id(request.scope),
        init_image=init,
        strength=body.strength,
        mask=mask,
        class_label=body.class_label,
        guidance_scale=body.guidance_scale,
        jump_length=body.jump_length,
        jump_n_sample=body.jump_n_sample,
    )


def result_payload(result: GenerationResult, model: str) -> dict:
    return GenerateResponse(
        model=model,
        seed=result.seed,
        sampler=result.sampler,
        steps=result.steps,
        eta=result.eta,
        timestep_spacing=result.timestep_spacing,
        images=[b64_png(img) for img in result.images],
        shape=list(result.images.shape),
        queue_seconds=result.queue_seconds,
        total_seconds=result.total_seconds,
    ).model_dump()


@router.post(
    "/generate",
    summary="Generate images",
    response_class=Response,
    responses={200: _GENERATE_200, **_ERRORS},
)
async def generate(body: GenerateRequest, request: Request, settings: SettingsDep) -> Response:
    """Sample `num_images` images with one of the samplers of `GET /v1/model`.

    `ddpm` is ancestral sampling (Ho et al. 2020, Algorithm 2), `ddim` DDIM (Song et al. 2021);
    `dpmpp_2m`, `dpmpp_3m` (DPM-Solver++, Lu et al. 2022) and `unipc` (Zhao et al. 2023) are multistep
    ODE solvers that reach near-converged images in 10–20 steps; `dpmpp_2m_sde` is the stochastic
    DPM-Solver++. The request joins the engine's running batch at its next iteration. The same `seed`,
    `sampler`, `steps`, `timestep_spacing` and `eta` always give the same images. A client that
    disconnects cancels its request.
    """
    engine = engine_for(request, body.model)
    log_fields(request.scope, sampler=body.sampler, images=body.num_images)
    greq = generation_request(body, engine, settings, request)
    handle = submit(engine, greq)
    try:
        result = await await_unless_disconnected(request, handle.result())
    except ClientDisconnected:
        handle.cancel()
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    except EngineError as exc:
        status, detail, headers = engine_error_status(exc)
        return Response(json.dumps(error_body(request, detail)), status, headers, media_type="application/json")
    headers = {"X-Seed": str(result.seed), "X-Model": engine.model_info.name}
    if body.format == "png":
        image = result.images[0] if result.images.shape[0] == 1 else grid(result.images)
        return Response(png_bytes(image), media_type="image/png", headers=headers)
    if body.format == "npy":
        headers["Content-Disposition"] = f'attachment; filename="ddpm-{result.seed}.npy"'
        return Response(npy_bytes(result.images), media_type="application/x-npy", headers=headers)
    payload = result_payload(result, engine.model_info.name)
    return Response(json.dumps(payload), media_type="application/json", headers=headers)


KEEP_ALIVE = b": keep-alive\n\n"  # an SSE comment: clients ignore it, proxies see traffic


async def with_keep_alive(events: AsyncIterator[T], every_s: float) -> AsyncIterator[T | None]:
    """``events``, with None whenever ``every_s`` seconds pass without one (a request waiting in the queue, or a
    long step), so the stream can send :data:`KEEP_ALIVE` before a proxy's read timeout closes it."""
    it = aiter(events)
    pending: asyncio.Future[T] = asyncio.ensure_future(anext(it))
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=every_s)
            if not done:
                yield None
                continue
            try:
                item = pending.result()
            except StopAsyncIteration:
                return
            yield item
            pending = asyncio.ensure_future(anext(it))
    finally:
        pending.cancel()


def _sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def _progress(event: ProgressEvent) -> dict:
    preview = None
    if event.preview is not None:
        images = event.preview
        preview = b64_png(images[0] if images.shape[0] == 1 else grid(images))
    return ProgressData(step=event.step, total=event.total, preview=preview).model_dump()


@router.post(
    "/generate/stream",
    summary="Generate images with progress (Server-Sent Events)",
    response_class=StreamingResponse,
    responses={200: _STREAM_200, **_ERRORS},
)
async def generate_stream(body: GenerateRequest, request: Request, settings: SettingsDep) -> StreamingResponse:
    """Same body as `POST /generate` (`format` is ignored: the result event always carries base64 PNGs).

    Errors found before sampling starts (422, 429, 503) are plain HTTP errors; later ones arrive as an `error`
    event with their status (500: the engine failed, 503: its worker died, 504: the deadline passed). Previews
    come every `DDPM_PREVIEW_EVERY` steps (default: about 10 per request). While no event is due (the request is
    queued), an SSE comment `: keep-alive` comes every `DDPM_SSE_KEEP_ALIVE_S` seconds. Closing the connection
    cancels the request.
    """
    engine = engine_for(request, body.model)
    log_fields(request.scope, sampler=body.sampler, images=body.num_images)
    greq = generation_request(body, engine, settings, request, previews=True)
    handle = submit(engine, greq)

    async def events() -> AsyncIterator[bytes]:
        finished = False
        try:
            async for event in with_keep_alive(handle.events(), settings.sse_keep_alive_s):
                yield KEEP_ALIVE if event is None else _sse("progress", _progress(event))
            try:
                result = await handle.result()
            except EngineError as exc:
                status, detail, _ = engine_error_status(exc)
                finished = True
                yield _sse("error", StreamErrorData(status=status, **error_body(request, detail)).model_dump())
                return
            finished = True
            yield _sse("result", result_payload(result, engine.model_info.name))
        finally:
            if not finished:  # the client went away (the response task was cancelled) or sending failed
                handle.cancel()

    headers = {"X-Seed": str(greq.seed), "X-Model": engine.model_info.name, "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
