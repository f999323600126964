"""DDIM (Song, Meng & Ermon 2021, eq. 12) with stochasticity η.

As in diffusers' DDIMScheduler, step i goes from t_i to t_i − ⌊T/S⌋ — the next timestep of the plan
for ``leading`` and ``trailing`` spacing when S divides T — with ᾱ = 1 below t = 0 (``set_alpha_to_one``;
else ᾱ_0), and x̂_0 is clipped when the model asks for it.
"""

from __future__ import annotations

import math

from service.diffusion.samplers.base import Plan, Rows, Sampler, SamplerOptions, StepOutput
from service.diffusion.samplers.spacing import DISCRETE_SPACINGS, Spacing, discrete_timesteps
from service.diffusion.schedule import NoiseSchedule

__all__ = ["DDIM"]


def _sigma(abar_t: float, abar_prev: float, eta: float) -> float:
    """σ_t(η) — eq. (16): η √((1−ᾱ_{t'})/(1−ᾱ_t)) √(1 − ᾱ_t/ᾱ_{t'})."""
    var = (1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev)
    return eta * math.sqrt(max(var, 0.0))


class DDIM(Sampler):
    name = "ddim"
    family = "ddim"
    clips_pred_x0 = True
    spacings = DISCRETE_SPACINGS
    default_spacing: Spacing = "leading"
    default_steps = 50
    uses_eta = True

    def plan(self, schedule: NoiseSchedule, steps: int, spacing: Spacing, options: SamplerOptions) -> Plan:
        big_t = schedule.num_timesteps
        self.check(big_t, steps, spacing)
        ts = discrete_timesteps(big_t, steps, spacing, options.steps_offset).tolist()
        abar = schedule.alphas_cumprod_f64().tolist()
        final = 1.0 if options.set_alpha_to_one else abar[0]
        prev = [t - big_t // steps for t in ts]
        return Plan(self.name, spacing, tuple(ts), tuple(abar[t] for t in ts),
                    tuple(abar[t] if t >= 0 else final for t in prev), options)

    def draws_noise(self, plan: Plan, i: int, eta: float) -> bool:
        return _sigma(plan.alphas_cumprod[i], plan.alphas_cumprod_next[i], eta) > 0

    def step(self, rows: Rows) -> StepOutput:
        # 1. "predicted x_0" of eq. (12), clipped when the model asks for it
        x0 = rows.pred_x0(self.clip_range(rows.plans[0].options))

        # 2. x_{t'} = √ᾱ_{t'} x̂_0 + √(1 − ᾱ_{t'} − σ²) ε + σ z — eq. (12), σ from eq. (16)
        def coef(p: Plan, i: int, eta: float) -> tuple[float, float, float]:
            abar_prev = p.alphas_cumprod_next[i]
            sigma = _sigma(p.alphas_cumprod[i], abar_prev, eta)
            return math.sqrt(abar_prev), math.sqrt(max(1.0 - abar_prev - sigma**2, 0.0)), sigma

        c = rows.per_row(coef)
        return StepOutput(c[:, 0] * x0 + c[:, 1] * rows.eps + c[:, 2] * rows.noise, x0)
