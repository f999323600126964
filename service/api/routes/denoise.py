"""``POST /denoise-step``: one ancestral reverse step x_t → x_{t-1} with every intermediate exposed.

Ho et al. 2020: ε_θ(x_t, t) from the UNet, x̂_0 from eq. (15) (clipped to [-1, 1] when the model
samples that way), the posterior q(x_{t-1} | x_t, x̂_0) of eq. (6)-(7), then Algorithm 2, line 4:
x_{t-1} = μ̃_t + σ_t z, with no noise at t = 0. The update is ``samplers.ddpm.posterior_step`` — the math the
engine applies — so a chain of calls from t = T-1 reproduces ``POST /generate`` (ddpm, steps = T).
"""

from __future__ import annotations

import secrets

import torch
from fastapi import APIRouter, Request

from service.api.auth import AUTH_RESPONSES, RequireApiKey
from service.api.deps import SettingsDep, engine_for
from service.api.encoding import InputError, b64_npy, b64_png, decode_b64, decode_image, decode_npy
from service.api.errors import error_responses, invalid
from service.api.schemas import DenoiseStepRequest, DenoiseStepResponse
from service.diffusion.checkpoint import eps_scale_at
from service.diffusion.rows import row_generator
from service.diffusion.samplers.ddpm import posterior_step
from service.diffusion.schedule import NoiseSchedule

__all__ = ["generation_noise", "router"]

router = APIRouter(tags=["denoise"], dependencies=[RequireApiKey], responses=AUTH_RESPONSES)


def generation_noise(seed: int, draw: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Draw number ``draw`` (0 = x_T) of image 0's generator of a request with ``seed``.

    ``POST /generate`` with ddpm and steps = T draws x_T first, then one z per step for t = T-1 … 1,
    so the z added at timestep t is draw T - t.
    """
    gen = row_generator(seed, 0)
    z = torch.randn(shape, generator=gen)
    for _ in range(draw):
        z = torch.randn(shape, generator=gen)
    return z


def _scalar(table: torch.Tensor, t: int) -> float:
    return float(table[t])


def _x_t(body: DenoiseStepRequest, shape: tuple[int, int, int], max_pixels: int) -> torch.Tensor:
    if (body.x_t is None) == (body.image is None):
        raise invalid("x_t", "give exactly one of x_t (base64 .npy) or image (base64 PNG/JPEG)")
    if body.x_t is not None:
        return decode_npy(decode_b64(body.x_t, "x_t"), "x_t", shape)
    data = decode_b64(body.image or "", "image")
    try:
        return decode_image(data, shape[0], shape[1], max_pixels)
    except InputError as exc:
        raise InputError(f"image: {exc}") from exc


@router.post(
    "/denoise-step",
    summary="One reverse diffusion step, with all intermediates",
    response_model=DenoiseStepResponse,
    responses=error_responses(404, 422, 429, 503),
)
async def denoise_step(body: DenoiseStepRequest, request: Request, settings: SettingsDep) -> DenoiseStepResponse:
    """x_{t-1} = μ̃_t(x_t, x̂_0) + σ_t z for one x_t at 0-based timestep `t` (0..T-1).

    Returns ε_θ, x̂_0, the posterior mean, the noise z added and the schedule's scalars at t, so that
    `x_prev = posterior_mean + sqrt(sigma_squared)·noise` and
    `posterior_mean = posterior_mean_coef_x0·x0_pred + posterior_mean_coef_xt·x_t` can be checked.
    With `seed`, z is the very draw `POST /generate` makes at t for image 0 of that seed
    (ddpm, steps = T), so calling this from t = T-1 down to 0 on that request's x_T reproduces its image.
    """
    engine = engine_for(request, body.model)
    info = engine.model_info
    big_t = info.num_train_timesteps
    if body.t >= big_t:
        raise invalid("t", f"must be in 0..{big_t - 1} (0-based timestep), got {body.t}")
    shape = (info.channels, info.image_size, info.image_size)
    x_t = _x_t(body, shape, settings.max_image_pixels)
    seed = body.seed if body.seed is not None else secrets.randbelow(2**32)
    if body.noise is not None:
        z = decode_npy(decode_b64(body.noise, "noise"), "noise", shape)
    elif body.t > 0:
        z = generation_noise(seed, big_t - body.t, shape)
    else:
        z = torch.zeros(shape)  # t = 0 steps into clean data: no noise
    variance = body.variance or info.variance_type
    t = torch.tensor([body.t], dtype=torch.long)
    x = x_t[None]
    # (1, C, H, W) on the engine's worker; divided by the model's Epsilon Scaling λ_t for ddpm, as /generate steps
    eps = await engine.predict_eps(x, t) / eps_scale_at(info.eps_scale.get("ddpm", 1.0), t, big_t).reshape(-1, 1, 1, 1)
    schedule: NoiseSchedule = info.schedule
    added = z if body.t > 0 else torch.zeros_like(z)
    x_prev, x0_pred, mean = posterior_step(schedule, x, eps, body.t, added[None], variance, info.ddpm_clip_range)
    sigma2 = schedule.posterior_variance if variance == "fixed_small" else schedule.betas
    return DenoiseStepResponse(
        t=body.t,
        seed=seed,
        variance=variance,
        x_prev=b64_npy(x_prev[0]),
        eps=b64_npy(eps[0]),
        x0_pred=b64_npy(x0_pred[0]),
        posterior_mean=b64_npy(mean[0]),
        noise=b64_npy(added),
        x_prev_png=b64_png(x_prev[0]),
        x0_pred_png=b64_png(x0_pred[0]),
        alpha_t=_scalar(schedule.alphas, body.t),
        alpha_bar_t=_scalar(schedule.alphas_cumprod, body.t),
        alpha_bar_prev=_scalar(schedule.alphas_cumprod_prev, body.t),
        beta_t=_scalar(schedule.betas, body.t),
        posterior_mean_coef_x0=_scalar(schedule.posterior_mean_coef1, body.t),
        posterior_mean_coef_xt=_scalar(schedule.posterior_mean_coef2, body.t),
        posterior_variance=_scalar(schedule.posterior_variance, body.t),
        sigma_squared=_scalar(sigma2, body.t) if body.t > 0 else 0.0,
    )
