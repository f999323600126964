"""Request and response bodies of the HTTP API (pydantic models; they generate the OpenAPI schema).

Timesteps are 0-based, ``t ∈ {0, …, T-1}`` as in diffusers: ``t = 0`` is the first noising step
(x_0 → x_1 in the paper's 1-based notation) and ``t = T-1`` is pure noise.
"""

from __future__ import annotations

import base64
import io
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from service.diffusion.conditioning import MAX_GUIDANCE_SCALE, MAX_JUMP_N_SAMPLE
from service.diffusion.samplers import DEFAULT_SAMPLER, SAMPLER_NAMES, SPACINGS

__all__ = [
    "MAX_SEED",
    "DenoiseStepRequest",
    "DenoiseStepResponse",
    "ErrorResponse",
    "GenerateRequest",
    "GenerateResponse",
    "HealthResponse",
    "ModelResponse",
    "ModelsResponse",
    "NoiseExamplesResponse",
    "NoiseResponse",
    "ProgressData",
    "ScheduleInfo",
    "StreamErrorData",
]

MAX_SEED = 2**63 - 1
SamplerLiteral = Literal[SAMPLER_NAMES]  # 422 lists the names
SpacingLiteral = Literal[SPACINGS]
_B64_NPY = "base64 of a float32 `.npy` file"


def _example_npy() -> str:
    buf = io.BytesIO()
    np.save(buf, np.zeros((1, 28, 28), np.float32), allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _example_png() -> str:
    buf = io.BytesIO()
    Image.new("L", (28, 28)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


class ErrorResponse(BaseModel):
    """Every 4xx/5xx body: a readable ``detail``; 422s also list each problem in ``errors``."""

    detail: str = Field(examples=["t: must be in 0..999 (0-based timestep), got 1000"])
    errors: list[dict] | None = Field(None, description="one entry per invalid field: loc, msg, type")
    request_id: str = Field(
        description="the request's id, also in the X-Request-ID response header and in the server's log lines",
        examples=["3f2c1e0a9b8d4c7e8f6a5b4c3d2e1f00"],
    )


class GenerateRequest(BaseModel):
    """Body of ``POST /generate`` and ``POST /generate/stream``."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,  # no coercion: false is not 0, "5" is not 5
        json_schema_extra={
            "examples": [
                {"num_images": 4, "seed": 42, "sampler": "dpmpp_2m", "steps": 15, "format": "png"},
                {"num_images": 4, "seed": 42, "sampler": "ddim", "steps": 50, "timestep_spacing": "trailing"},
                {"num_images": 1, "sampler": "ddpm", "format": "json"},
                {"num_images": 4, "sampler": "unipc", "steps": 20, "class_label": 7},
            ]
        },
    )

    model: str | None = Field(
        None, max_length=256, description="the served model to use (GET /v1/models); default: the first one"
    )
    num_images: int = Field(1, ge=1, description="1..DDPM_MAX_IMAGES_PER_REQUEST (see GET /v1/model)")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="random when absent; always reported back")
    sampler: SamplerLiteral = Field(  # type: ignore[valid-type]
        DEFAULT_SAMPLER,
        description=f"default {DEFAULT_SAMPLER} (GET /v1/model's default_sampler). ddpm: ancestral (respaced if "
        "steps < T); ddim: DDIM(η); dpmpp_2m / dpmpp_3m: DPM-Solver++ multistep ODE solvers; dpmpp_2m_sde: "
        "its SDE variant; unipc: UniPC-bh2 predictor-corrector. The ODE solvers give near-converged images in "
        "10–20 steps (see GET /v1/model for defaults)",
    )
    steps: int | None = Field(
        None, ge=1, description="1..T (1..T−1 for the DPM-Solver++ and UniPC samplers); default per sampler: "
        "T for ddpm, 50 for ddim, 20 for the others"
    )
    eta: float = Field(0.0, ge=0.0, le=1.0, description="DDIM stochasticity η (ignored by the other samplers)")
    timestep_spacing: SpacingLiteral | None = Field(  # type: ignore[valid-type]
        None, description="leading | trailing | linspace (every sampler), karras | logsnr (DPM-Solver++ and "
        "UniPC); default: the model's spacing for the sampler (GET /v1/model)"
    )
    format: Literal["png", "json", "npy"] = Field(
        "png", description="png: one image or a grid; json: base64 PNGs; npy: float32 (N, C, H, W) in [-1, 1]"
    )
    # steering the reverse process (service/diffusion/conditioning.py); GET /v1/model lists what a model supports
    init_image: str | None = Field(
        None, description="image-to-image (SDEdit) / inpainting source: base64 PNG/JPEG (converted to the model's "
        "channels and size) or base64 float32 .npy (C, H, W) in [-1, 1]"
    )
    strength: float = Field(
        1.0, gt=0.0, le=1.0, description="image-to-image: how much of the sampler's steps run from init_image "
        "noised to the matching t (diffusers' img2img rule); 1 = plain generation (init_image ignored unless a mask "
        "is given)"
    )
    mask: str | None = Field(
        None, description="inpainting (RePaint), with init_image: base64 PNG/JPEG, white = regenerate (converted to "
        "the model's size, threshold 50 %), or base64 .npy (1 or C, H, W) with 1 = regenerate; the other pixels "
        "keep init_image exactly"
    )
    jump_length: int = Field(1, ge=1, description="inpainting: RePaint resampling jump length (ddpm, ddim)")
    jump_n_sample: int = Field(
        1, ge=1, le=MAX_JUMP_N_SAMPLE, description="inpainting: RePaint resampling passes per jump (1 = none)"
    )
    class_label: int | None = Field(
        None, ge=0, description="classifier guidance toward this class (models with a guidance classifier: "
        "GET /v1/model num_classes)"
    )
    guidance_scale: float | None = Field(
        None, ge=0.0, le=MAX_GUIDANCE_SCALE, description="classifier guidance scale s (Dhariwal & Nichol eq. 14); "
        "default: the model's recommended scale (GET /v1/model default_guidance_scale)"
    )


class GenerateResponse(BaseModel):
    """``format=json`` response of ``POST /generate`` (and the SSE ``result`` event)."""

    model: str = Field(description="the model that generated the images")
    seed: int
    sampler: SamplerLiteral  # type: ignore[valid-type]
    steps: int
    eta: float
    timestep_spacing: SpacingLiteral  # type: ignore[valid-type]
    images: list[str] = Field(description="one base64 PNG per image")
    shape: list[int] = Field(description="(N, C, H, W)", examples=[[1, 1, 28, 28]])
    queue_seconds: float = Field(description="submission → first denoising step")
    total_seconds: float = Field(description="submission → completion")


class ProgressData(BaseModel):
    """Data of an SSE ``progress`` event."""

    step: int = Field(description="steps finished, 1..total")
    total: int
    preview: str | None = Field(None, description="base64 PNG (grid) of the predicted x_0, every k steps")


class StreamErrorData(BaseModel):
    """Data of an SSE ``error`` event: the HTTP status the request would have had, and why."""

    status: int = Field(examples=[504])
    detail: str
    request_id: str = Field(description="the request's id (the X-Request-ID response header)")


class DenoiseStepRequest(BaseModel):
    """One reverse step x_t → x_{t-1} of ancestral DDPM (Ho et al. 2020, Algorithm 2, line 4)."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,  # no coercion: false is not 0, "5" is not 5
        json_schema_extra={
            "examples": [
                {"x_t": _example_npy(), "t": 999, "seed": 7},
                {"image": _example_png(), "t": 300, "variance": "fixed_large"},
            ]
        },
    )

    model: str | None = Field(
        None, max_length=256, description="the served model to use (GET /v1/models); default: the first one"
    )
    x_t: str | None = Field(None, description=f"{_B64_NPY}, shape (C, H, W) or (1, C, H, W); or give `image`")
    image: str | None = Field(None, description="base64 PNG/JPEG taken as x_t (converted to the model's shape)")
    t: int = Field(ge=0, description="0-based timestep of x_t, 0..T-1")
    seed: int | None = Field(
        None,
        ge=0,
        le=MAX_SEED,
        description="noise z = the draw that POST /generate {seed, sampler: ddpm, steps: T} makes for image 0 at t; "
        "random when absent",
    )
    noise: str | None = Field(None, description=f"explicit z ({_B64_NPY}, (C, H, W)); overrides seed")
    variance: Literal["fixed_small", "fixed_large"] | None = Field(
        None, description="σ_t² = β̃_t (fixed_small) or β_t (fixed_large); default: the model's"
    )


class DenoiseStepResponse(BaseModel):
    """Arrays are base64 float32 ``.npy`` of shape (C, H, W); x_prev = posterior_mean + √σ²·noise."""

    t: int
    seed: int
    variance: Literal["fixed_small", "fixed_large"]
    x_prev: str = Field(description="x_{t-1}; at t = 0 the clean sample (no noise added)")
    eps: str = Field(description="model prediction ε_θ(x_t, t)")
    x0_pred: str = Field(description="x̂_0 = (x_t − √(1−ᾱ_t) ε_θ)/√ᾱ_t (eq. 15), clipped to [-1, 1] if the model does")
    posterior_mean: str = Field(description="μ̃_t = coef_x0 · x̂_0 + coef_xt · x_t (eq. 7)")
    noise: str = Field(description="z actually added (zeros at t = 0)")
    x_prev_png: str = Field(description="base64 PNG preview of x_prev")
    x0_pred_png: str = Field(description="base64 PNG preview of x0_pred")
    alpha_t: float = Field(description="α_t = 1 − β_t")
    alpha_bar_t: float = Field(description="ᾱ_t = ∏_{s≤t} α_s")
    alpha_bar_prev: float = Field(description="ᾱ_{t-1} (1 at t = 0)")
    beta_t: float
    posterior_mean_coef_x0: float = Field(description="√ᾱ_{t-1} β_t / (1 − ᾱ_t)")
    posterior_mean_coef_xt: float = Field(description="√α_t (1 − ᾱ_{t-1}) / (1 − ᾱ_t)")
    posterior_variance: float = Field(description="β̃_t = (1 − ᾱ_{t-1}) / (1 − ᾱ_t) · β_t")
    sigma_squared: float = Field(description="variance actually used: β̃_t (fixed_small) or β_t (fixed_large)")


class NoiseResponse(BaseModel):
    """``format=json`` response of ``/noise``: x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε for each t (eq. 4)."""

    image: str = Field(description="example name, or 'upload'")
    seed: int
    ts: list[int]
    alpha_bar: list[float] = Field(description="ᾱ_t for each t")
    x_t: str = Field(description=f"{_B64_NPY}, (K, C, H, W) for the K timesteps")
    x_t_png: list[str] = Field(description="base64 PNG of x_t for each t")
    x0: str | None = Field(None, description=f"{_B64_NPY}, (C, H, W) (include=x0)")
    noise: str | None = Field(None, description=f"{_B64_NPY}, (C, H, W), shared by every t (include=noise)")


class NoiseExamplesResponse(BaseModel):
    images: list[str] = Field(description="names accepted by GET /noise?image=", examples=[["0", "1", "7"]])


class ScheduleInfo(BaseModel):
    beta_schedule: str = Field(examples=["linear"])
    num_train_timesteps: int = Field(examples=[1000])
    beta_start: float
    beta_end: float


class ModelResponse(BaseModel):
    name: str
    sha256: str
    image_shape: list[int] = Field(description="(C, H, W)", examples=[[1, 28, 28]])
    num_train_timesteps: int = Field(description="T; timesteps are 0-based, 0..T-1")
    schedule: ScheduleInfo
    variance_type: Literal["fixed_small", "fixed_large"]
    clip_sample: bool
    device: str
    dtype: str
    compiled: bool = Field(description="the UNet runs the model's AOT-compiled artifact (python -m service compile)")
    samplers: list[str]
    default_sampler: str = Field(description="the sampler of a POST /generate that names none")
    default_steps: dict[str, int]
    max_steps: dict[str, int] = Field(description="the most steps each sampler can run")
    timestep_spacings: dict[str, list[str]] = Field(description="the spacings each sampler supports")
    default_timestep_spacing: dict[str, str] = Field(description="the model's spacing for each sampler")
    eps_scale: dict[str, float | tuple[float, float]] = Field(
        description="Epsilon Scaling (Ning et al. 2023) per sampler: it steps with ε_θ/λ_t; one λ for every t, or "
        "[λ at t = 0, λ at t = T-1] with λ_t linear in t between; 1 = the network's ε"
    )
    resampling_samplers: list[str] = Field(
        description="the samplers inpainting's RePaint resampling (jump_n_sample > 1) works with: those that keep no "
        "solver history between steps"
    )
    max_images_per_request: int
    examples: list[str] = Field(description="example images for GET /noise")
    ready: bool = Field(description="its engine is warm and admits work")
    conditioning: list[Literal["image_to_image", "inpainting", "class_guidance"]] = Field(
        description="what POST /generate may ask of this model: init_image + strength, init_image + mask, class_label"
    )
    num_classes: int | None = Field(description="class_label is 0..num_classes-1; null: no guidance classifier")
    default_guidance_scale: float | None = Field(description="guidance_scale of a class_label request without one")


class ModelsResponse(BaseModel):
    """``GET /v1/models``: every served model, the default (used when a request names none) first."""

    default: str
    models: list[ModelResponse]


class HealthResponse(BaseModel):
    status: Literal["ok", "ready", "not ready", "draining", "failed"]
    models: dict[str, Literal["ready", "not ready"]] | None = Field(
        None, description="/readyz: each served model's readiness (the server is ready when all are)"
    )
