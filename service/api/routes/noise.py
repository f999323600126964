"""``GET /noise`` and ``POST /noise``: the forward process q(x_t | x_0) on an example or uploaded image.

x_t = √ᾱ_t · x_0 + √(1 − ᾱ_t) · ε (Ho et al. 2020, eq. 4), ε ~ N(0, I) from the request's seed; every
t of a ``ts`` strip shares the same ε, so the strip shows one noising trajectory's marginals.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Annotated, Literal

import torch
from fastapi import APIRouter, HTTPException, Query, Request, Response

from service.api.auth import AUTH_RESPONSES, RequireApiKey
from service.api.deps import EngineDep, ModelQuery, ReadyModelDep, SettingsDep, served_model
from service.api.encoding import (
    IMAGE_MEDIA_TYPES,
    InputError,
    b64_npy,
    b64_png,
    decode_image,
    sniff_image_type,
)
from service.api.errors import error_responses, invalid
from service.api.schemas import MAX_SEED, NoiseExamplesResponse, NoiseResponse
from service.diffusion.rows import make_noise, row_generator
from service.diffusion.schedule import NoiseSchedule
from service.imaging import grid, npy_bytes, png_bytes

__all__ = ["DEFAULT_T", "MAX_TS", "load_examples", "router"]

router = APIRouter(tags=["noise"], dependencies=[RequireApiKey], responses=AUTH_RESPONSES)

MAX_TS = 64
DEFAULT_T = 300  # when neither t nor ts is given (T-1 if the model has fewer steps)
_INCLUDE = ("x0", "noise")

_NOISE_200 = {
    "description": (
        "png: x_t (one image, or a strip of x_t across `ts`; with `include`, x_0 first and ε last); "
        "npy: float32 (K, C, H, W) with the K timesteps' x_t, then x_0 and ε if included (rows named in `X-Rows`); "
        "json: NoiseResponse"
    ),
    "headers": {
        "X-Seed": {"description": "seed of ε", "schema": {"type": "integer"}},
        "X-Rows": {"description": "what each image/row is, e.g. `x_t@0,x_t@300,noise`", "schema": {"type": "string"}},
    },
    "content": {
        "image/png": {"schema": {"type": "string", "format": "binary"}},
        "application/x-npy": {"schema": {"type": "string", "format": "binary"}},
        "application/json": {"schema": {"$ref": "#/components/schemas/NoiseResponse"}},
    },
}

TQuery = Annotated[
    int | None,
    Query(ge=0, description=f"0-based timestep 0..T-1 (t=0: one step of noise); default {DEFAULT_T} if no ts"),
]
TS_PARAM = {
    "name": "ts",
    "in": "query",
    "required": False,
    "style": "form",
    "explode": False,
    "description": f"comma-separated 0-based timesteps (at most {MAX_TS}) for a strip, e.g. `ts=0,100,300,600,999`; "
    "instead of `t`",
    "schema": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1, "maxItems": MAX_TS},
}
SeedQuery = Annotated[int | None, Query(ge=0, le=MAX_SEED, description="seed of ε; random when absent")]
FormatQuery = Annotated[Literal["png", "npy", "json"], Query(description="response format")]
IncludeQuery = Annotated[
    str | None,
    Query(
        pattern=r"^\s*(x0|noise)(\s*,\s*(x0|noise))*\s*$",
        description="also return x_0 and/or the noise ε: `x0`, `noise` or `x0,noise`",
    ),
]
ScaleQuery = Annotated[int, Query(ge=1, le=16, description="PNG upscaling factor (nearest neighbour)")]


def load_examples(folder: Path, channels: int, size: int, max_pixels: int) -> dict[str, torch.Tensor]:
    """``folder/*.png`` as (C, H, W) tensors in [-1, 1], keyed by file stem (sorted); {} if absent."""
    out: dict[str, torch.Tensor] = {}
    if not folder.is_dir():
        return out
    for path in sorted(folder.glob("*.png")):
        try:
            out[path.stem] = decode_image(path.read_bytes(), channels, size, max_pixels)
        except InputError:
            continue
    return out


def _timesteps(t: int | None, request: Request, big_t: int) -> list[int]:
    raw = request.query_params.getlist("ts")
    if t is not None and raw:
        raise invalid("ts", "give either t or ts, not both", "query")
    if t is None and not raw:
        t = min(DEFAULT_T, big_t - 1)
    if t is not None:
        values = [t]
    else:
        parts = [p.strip() for v in raw for p in v.split(",")]
        if not all(p.isdigit() and p.isascii() and len(p) <= 9 for p in parts):
            raise invalid("ts", "must be comma-separated non-negative integers, e.g. ts=0,100,300", "query")
        values = [int(p) for p in parts]
    if len(values) > MAX_TS:
        raise invalid("ts", f"at most {MAX_TS} timesteps, got {len(values)}", "query")
    for v in values:
        if not 0 <= v < big_t:
            field = "t" if t is not None else "ts"
            raise invalid(field, f"must be in 0..{big_t - 1} (0-based timestep), got {v}", "query")
    return values


def _render(
    name: str,
    x0: torch.Tensor,
    schedule: NoiseSchedule,
    steps: list[int],
    seed: int | None,
    fmt: str,
    include: str | None,
    scale: int,
) -> Response:
    seed = seed if seed is not None else secrets.randbelow(2**32)
    extras = [v.strip() for v in include.split(",")] if include else []
    extras = [e for e in _INCLUDE if e in extras]  # canonical order, no duplicates
    eps = make_noise((1, *x0.shape), [row_generator(seed, 0)])[0]
    k = len(steps)
    t = torch.tensor(steps, dtype=torch.long)
    x_t = schedule.q_sample(x0.expand(k, *x0.shape), t, eps.expand(k, *eps.shape))  # (K, C, H, W)
    abar = schedule.alpha_bar(t)
    rows = [f"x_t@{s}" for s in steps]
    headers = {"X-Seed": str(seed), "X-Timesteps": ",".join(map(str, steps))}
    if fmt == "json":
        body = NoiseResponse(
            image=name,
            seed=seed,
            ts=steps,
            alpha_bar=[float(a) for a in abar],
            x_t=b64_npy(x_t),
            x_t_png=[b64_png(img, scale) for img in x_t],
            x0=b64_npy(x0) if "x0" in extras else None,
            noise=b64_npy(eps) if "noise" in extras else None,
        )
        return Response(body.model_dump_json(), media_type="application/json", headers=headers)
    stack = [x_t]
    if "x0" in extras:
        stack.insert(0, x0[None]) if fmt == "png" else stack.append(x0[None])
        rows = ["x0", *rows] if fmt == "png" else [*rows, "x0"]
    if "noise" in extras:
        stack.append(eps[None])
        rows.append("noise")
    images = torch.cat(stack)
    headers["X-Rows"] = ",".join(rows)
    if fmt == "npy":
        return Response(npy_bytes(images), media_type="application/x-npy", headers=headers)
    image = images[0] if images.shape[0] == 1 else grid(images, nrow=images.shape[0])
    return Response(png_bytes(image, scale), media_type="image/png", headers=headers)


@router.get(
    "/noise",
    summary="Forward process on an example image",
    response_class=Response,
    openapi_extra={"parameters": [TS_PARAM]},
    responses={200: _NOISE_200, **error_responses(404, 422)},
)
async def noise_example(
    served: ReadyModelDep,
    request: Request,
    t: TQuery = None,
    image: Annotated[str | None, Query(max_length=128, description="example name (GET /noise/examples)")] = None,
    seed: SeedQuery = None,
    format: FormatQuery = "png",
    include: IncludeQuery = None,
    scale: ScaleQuery = 1,
) -> Response:
    """x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε (eq. 4) on a bundled example digit.

    **Timesteps are 0-based, t ∈ 0..T-1, as in diffusers**: t = 0 adds one step of noise (β_1 in the
    paper's 1-based notation), t = T-1 is (nearly) pure noise. `ts=0,100,200` returns a strip with
    one x_t per listed t, all sharing the same ε.
    """
    examples = served.examples
    if not examples:
        raise HTTPException(404, "no example images are shipped with this model; POST an image to /noise instead")
    name = image if image is not None else next(iter(examples))
    if name not in examples:
        raise HTTPException(404, f"unknown example image {name!r}; available: {', '.join(examples)}")
    assert served.engine is not None
    info = served.engine.model_info
    steps = _timesteps(t, request, info.num_train_timesteps)
    return _render(name, examples[name], info.schedule, steps, seed, format, include, scale)


@router.get(
    "/noise/examples",
    summary="Example images for GET /noise",
    response_model=NoiseExamplesResponse,
    responses=error_responses(404, 422),
)
async def noise_examples(request: Request, model: ModelQuery = None) -> NoiseExamplesResponse:
    """Names accepted by `GET /noise?image=` (PNG files shipped next to the model)."""
    return NoiseExamplesResponse(images=list(served_model(request, model).examples))


async def _read_body(request: Request) -> bytes:
    chunks = []
    async for chunk in request.stream():  # BodyLimitMiddleware stops this at DDPM_MAX_UPLOAD_BYTES (413)
        chunks.append(chunk)
    return b"".join(chunks)


_UPLOAD_BODY = {
    "required": True,
    "description": "the image file itself as the request body (not multipart/form-data)",
    "content": {
        "image/png": {"schema": {"type": "string", "format": "binary"}},
        "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
    },
}


@router.post(
    "/noise",
    summary="Forward process on an uploaded image",
    response_class=Response,
    openapi_extra={"requestBody": _UPLOAD_BODY, "parameters": [TS_PARAM]},
    responses={200: _NOISE_200, **error_responses(400, 404, 413, 415, 422)},
)
async def noise_upload(
    engine: EngineDep,
    settings: SettingsDep,
    request: Request,
    t: TQuery = None,
    seed: SeedQuery = None,
    format: FormatQuery = "png",
    include: IncludeQuery = None,
    scale: ScaleQuery = 1,
) -> Response:
    """Same as `GET /noise`, on the PNG or JPEG sent as the raw request body
    (`curl --data-binary @digit.png -H 'Content-Type: image/png' ...`). The image is converted to the
    model's channels (grey or RGB), centre-cropped to a square and resized to the model's size.
    Bodies over `DDPM_MAX_UPLOAD_BYTES` get 413, other media types 415, undecodable images or more
    than `DDPM_MAX_IMAGE_PIXELS` pixels 400 (checked from the header, before decoding).
    """
    info = engine.model_info
    steps = _timesteps(t, request, info.num_train_timesteps)
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media and media not in IMAGE_MEDIA_TYPES and media != "application/octet-stream":
        raise HTTPException(
            415, f"unsupported Content-Type {media!r}: send the PNG or JPEG file as the raw body "
            "with Content-Type image/png or image/jpeg (multipart/form-data is not accepted)"
        )
    data = await _read_body(request)
    if not data:
        raise HTTPException(400, "empty body: send a PNG or JPEG image")
    if media in ("", "application/octet-stream") and sniff_image_type(data) is None:
        raise HTTPException(415, "the body is neither PNG nor JPEG")
    try:
        x0 = decode_image(data, info.channels, info.image_size, settings.max_image_pixels)
    except InputError as exc:
        raise HTTPException(400, str(exc)) from exc
    return _render("upload", x0, info.schedule, steps, seed, format, include, scale)

