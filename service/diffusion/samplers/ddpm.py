"""Ancestral DDPM sampling (Ho et al. 2020, Algorithm 2), over all T steps or a respaced subset.

A respaced step from t to the next timestep t' of the plan uses β'_t = 1 − ᾱ_t/ᾱ_{t'} (Nichol &
Dhariwal 2021, section 4), as diffusers' DDPMScheduler does. As there, noise is added whenever t > 0,
so the last step of a respaced chain that ends above t = 0 adds σ_t z too (≈ 0 for ``fixed_small``).
Equation numbers refer to the DDPM paper.
"""

from __future__ import annotations

import math

import torch

from service.diffusion.samplers.base import Plan, Rows, Sampler, SamplerOptions, StepOutput
from service.diffusion.samplers.spacing import DISCRETE_SPACINGS, Spacing, discrete_timesteps
from service.diffusion.schedule import NoiseSchedule, VarianceType

__all__ = ["DDPM", "posterior_coefficients", "posterior_step"]


def posterior_coefficients(
    abar_t: float, abar_prev: float, t: int, variance_type: VarianceType
) -> tuple[float, float, float]:
    """(coef_x̂0, coef_xt, σ) of x_{t'} = coef_x̂0 · x̂_0 + coef_xt · x_t + σ z, in float64.

    Eq. (7) with β'_t = 1 − ᾱ_t/ᾱ_{t'}: μ̃ = √ᾱ_{t'} β'_t/(1−ᾱ_t) x̂_0 + √(1−β'_t)(1−ᾱ_{t'})/(1−ᾱ_t) x_t;
    σ² = β̃_t = (1−ᾱ_{t'})/(1−ᾱ_t) β'_t (``fixed_small``) or β'_t (``fixed_large``), and σ = 0 at t = 0.
    """
    beta = 1.0 - abar_t / abar_prev
    coef_x0 = math.sqrt(abar_prev) * beta / (1.0 - abar_t)
    coef_xt = math.sqrt(abar_t / abar_prev) * (1.0 - abar_prev) / (1.0 - abar_t)
    if variance_type == "fixed_small":
        var = max((1.0 - abar_prev) / (1.0 - abar_t) * beta, 1e-20)
    elif variance_type == "fixed_large":
        var = beta
    else:
        raise ValueError(f"unknown variance type {variance_type!r}")
    return coef_x0, coef_xt, math.sqrt(var) if t > 0 else 0.0


class DDPM(Sampler):
    name = "ddpm"
    family = "ddpm"
    clips_pred_x0 = True
    spacings = DISCRETE_SPACINGS
    default_spacing: Spacing = "leading"
    default_steps = None  # T: the full chain

    def plan(self, schedule: NoiseSchedule, steps: int, spacing: Spacing, options: SamplerOptions) -> Plan:
        big_t = schedule.num_timesteps
        self.check(big_t, steps, spacing)
        ts = discrete_timesteps(big_t, steps, spacing, options.steps_offset).tolist()
        abar = schedule.alphas_cumprod_f64().tolist()
        nxt = [*ts[1:], -1]  # the next timestep of the plan; −1 = clean data
        return Plan(self.name, spacing, tuple(ts), tuple(abar[t] for t in ts),
                    tuple(abar[t] if t >= 0 else 1.0 for t in nxt), options)

    def draws_noise(self, plan: Plan, i: int, eta: float) -> bool:
        return plan.timesteps[i] > 0

    def step(self, rows: Rows) -> StepOutput:
        # 1. x̂_0 from ε — eq. (15), clipped to the data range when the model asks for it
        x0 = rows.pred_x0(self.clip_range(rows.plans[0].options))

        # 2. posterior mean μ̃(x_t, x̂_0) and σ_t of the (respaced) step — eq. (7); Algorithm 2, line 4
        def coef(p: Plan, i: int, _eta: float) -> tuple[float, float, float]:
            return posterior_coefficients(p.alphas_cumprod[i], p.alphas_cumprod_next[i], p.timesteps[i],
                                          p.options.variance_type)

        c = rows.per_row(coef)
        return StepOutput(c[:, 0] * x0 + c[:, 1] * rows.x + c[:, 2] * rows.noise, x0)


def posterior_step(
    schedule: NoiseSchedule,
    x_t: torch.Tensor,
    eps: torch.Tensor,
    t: int,
    noise: torch.Tensor,
    variance_type: VarianceType,
    clip_range: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One full-chain step x_t → x_{t−1} for a single timestep, x̂_0 clipped to ±``clip_range`` (∞ = no clip):
    (x_{t−1}, x̂_0, μ̃)."""
    abar = schedule.alphas_cumprod_f64()
    abar_t, abar_prev = abar[t].item(), abar[t - 1].item() if t > 0 else 1.0
    x0 = (x_t - math.sqrt(1.0 - abar_t) * eps) / math.sqrt(abar_t)
    x0 = x0.clamp(-clip_range, clip_range)
    coef_x0, coef_xt, sigma = posterior_coefficients(abar_t, abar_prev, t, variance_type)
    mean = coef_x0 * x0 + coef_xt * x_t
    return mean + sigma * noise, x0, mean
