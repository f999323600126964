"""Reverse-process updates as per-row functions of (x_t, ε_θ, t, t_prev).

A sampler is a descending sequence of timesteps; each update moves a row from ``t`` to the next
timestep in its own sequence, ``t_prev`` (``-1`` after the last one: clean data). Because every
coefficient is gathered per row, one batch may mix rows at different timesteps, from different
samplers and step counts.

* DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) over all T steps, or over a respaced
  subset with the respaced betas β'_t = 1 - ᾱ_t / ᾱ_{t_prev} (Nichol & Dhariwal 2021, section 4).
* DDIM (Song, Meng & Ermon 2021, eq. 12) with stochasticity η.

Equation numbers without a paper name refer to DDPM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from service.diffusion.schedule import NoiseSchedule, VarianceType

__all__ = [
    "SamplerName",
    "StepOutput",
    "ddim_step",
    "ddpm_step",
    "make_noise",
    "row_generator",
    "timesteps",
]

SamplerName = Literal["ddpm", "ddim"]


@dataclass(frozen=True)
class StepOutput:
    prev_sample: torch.Tensor  # x_{t_prev}, (B, C, H, W)
    pred_x0: torch.Tensor  # x̂_0 used for the update (clipped when asked), (B, C, H, W)


def timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """``steps`` descending timesteps, evenly spaced and ending one stride above clean data.

    "Trailing" spacing (Lin et al. 2024, table 2): t_i = round(T - i·T/S) - 1, so sampling
    always starts at t = T-1 (pure noise) and ``steps == T`` gives T-1, …, 0.
    """
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in 1..{num_train_timesteps}, got {steps}")
    stride = num_train_timesteps / steps
    return [round(num_train_timesteps - i * stride) - 1 for i in range(steps)]


def row_generator(seed: int, row: int) -> torch.Generator:
    """The CPU generator of row ``row`` of a request with ``seed``: x_T first, then each step's z.

    Seeds are mixed (golden-ratio multiply) so rows of nearby seeds do not share streams.
    """
    return torch.Generator().manual_seed((seed * 0x9E3779B97F4A7C15 + row) % (1 << 63))


def make_noise(
    shape: tuple[int, ...], generators: list[torch.Generator], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Standard normal noise of ``shape`` (B, …), row i drawn from ``generators[i]`` on the CPU.

    Drawing on the CPU keeps a row's noise identical on every device and batch composition.
    """
    rows = [torch.randn(shape[1:], generator=g) for g in generators]
    return torch.stack(rows).to(device)


@dataclass(frozen=True)
class _StepAlphas:
    """Per-row ᾱ_t, ᾱ_{t_prev}, 1-ᾱ_t, 1-ᾱ_{t_prev} and β'_t = 1 - ᾱ_t/ᾱ_{t_prev}, float64, shape (B, 1, …, 1).

    All five come from log ᾱ_t = Σ_{s≤t} log(1 - β_s) (float64): 1-ᾱ = -expm1(log ᾱ) and
    β'_t = -expm1(log ᾱ_t - log ᾱ_{t_prev}). Forming 1 - ᾱ or 1 - ᾱ_t/ᾱ_{t_prev} from float32 ᾱ
    instead loses three to four significant digits near t = 0, where ᾱ ≈ 1.
    """

    abar_t: torch.Tensor
    abar_prev: torch.Tensor
    one_minus_t: torch.Tensor
    one_minus_prev: torch.Tensor
    beta_t: torch.Tensor


def _step_alphas(schedule: NoiseSchedule, t: torch.Tensor, t_prev: torch.Tensor, ndim: int) -> _StepAlphas:
    shape = (-1, *([1] * (ndim - 1)))
    log_abar = torch.cumsum(torch.log1p(-schedule.betas.to(t.device, torch.float64)), dim=0)

    def log_abar_at(s: torch.Tensor) -> torch.Tensor:  # log ᾱ_s per row, 0 for clean data (s = -1)
        s = s.long()
        return torch.where(s >= 0, log_abar[s.clamp(min=0)], torch.zeros_like(log_abar[:1])).reshape(shape)

    lt, lp = log_abar_at(t), log_abar_at(t_prev)
    return _StepAlphas(lt.exp(), lp.exp(), -torch.expm1(lt), -torch.expm1(lp), -torch.expm1(lt - lp))


def ddpm_step(
    schedule: NoiseSchedule,
    x_t: torch.Tensor,
    eps: torch.Tensor,
    t: torch.Tensor,
    t_prev: torch.Tensor,
    noise: torch.Tensor | None,
    variance_type: VarianceType = "fixed_small",
    clip_sample: bool = True,
) -> StepOutput:
    """One ancestral step x_t → x_{t_prev} (Algorithm 2, line 4), with respaced betas.

    Coefficients are formed per row in float64 and applied in ``x_t``'s dtype.
    """
    a = _step_alphas(schedule, t, t_prev, x_t.ndim)
    dt = x_t.dtype
    # 1. alphas of this (possibly respaced) step: β'_t = 1 - ᾱ_t / ᾱ_{t_prev} (see _StepAlphas)
    # 2. predict x_0 from ε — eq. (4) solved for x_0; optionally clip to the data range
    pred_x0 = (x_t - a.one_minus_t.sqrt().to(dt) * eps) / a.abar_t.sqrt().to(dt)
    if clip_sample:
        pred_x0 = pred_x0.clamp(-1.0, 1.0)
    # 3. posterior mean μ̃(x_t, x̂_0) — eq. (7), with √(1 - β'_t) = √(ᾱ_t / ᾱ_{t_prev})
    coef_x0 = a.abar_prev.sqrt() * a.beta_t / a.one_minus_t
    coef_xt = (a.abar_t / a.abar_prev).sqrt() * a.one_minus_prev / a.one_minus_t
    mean = coef_x0.to(dt) * pred_x0 + coef_xt.to(dt) * x_t
    # 4. add σ_t z with σ_t² = β̃_t (fixed_small) or β_t (fixed_large); none into clean data
    if variance_type == "fixed_small":
        var = a.beta_t * a.one_minus_prev / a.one_minus_t
    elif variance_type == "fixed_large":
        var = a.beta_t
    else:
        raise ValueError(f"unknown variance type {variance_type!r}")
    prev = mean
    if noise is not None:
        sigma = torch.where(t_prev.reshape(var.shape) >= 0, var.clamp(min=0).sqrt(), torch.zeros_like(var))
        prev = mean + sigma.to(dt) * noise
    return StepOutput(prev, pred_x0)


def ddim_step(
    schedule: NoiseSchedule,
    x_t: torch.Tensor,
    eps: torch.Tensor,
    t: torch.Tensor,
    t_prev: torch.Tensor,
    eta: torch.Tensor | float,
    noise: torch.Tensor | None,
    clip_sample: bool = True,
) -> StepOutput:
    """One DDIM step (Song et al. 2021, eq. 12); ``eta`` may be a per-row tensor of shape (B,).

    Coefficients are formed per row in float64 and applied in ``x_t``'s dtype.
    """
    nd, dt = x_t.ndim, x_t.dtype
    # 1. alphas
    a = _step_alphas(schedule, t, t_prev, nd)
    eta = torch.as_tensor(eta, dtype=torch.float64, device=x_t.device).reshape(-1, *([1] * (nd - 1)))
    # 2. predicted x_0 — "predicted x_0" term of eq. (12)
    pred_x0 = (x_t - a.one_minus_t.sqrt().to(dt) * eps) / a.abar_t.sqrt().to(dt)
    if clip_sample:
        pred_x0 = pred_x0.clamp(-1.0, 1.0)
    # 3. σ_t(η) — eq. (16): σ² = η² (1 - ᾱ_{t_prev}) / (1 - ᾱ_t) · (1 - ᾱ_t / ᾱ_{t_prev})
    var = a.one_minus_prev / a.one_minus_t * a.beta_t
    sigma = eta * var.clamp(min=0).sqrt()
    # 4. "direction pointing to x_t" and the random term of eq. (12)
    direction = (a.one_minus_prev - sigma**2).clamp(min=0).sqrt()
    prev = a.abar_prev.sqrt().to(dt) * pred_x0 + direction.to(dt) * eps
    if noise is not None:
        prev = prev + sigma.to(dt) * noise
    return StepOutput(prev, pred_x0)
