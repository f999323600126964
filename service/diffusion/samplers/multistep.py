"""The common ground of the multistep exponential-integrator solvers (DPM-Solver++, UniPC).

Both follow diffusers' DPMSolverMultistepScheduler / UniPCMultistepScheduler for the plan: S timesteps for
the UNet, S+1 noise levels for the solver ending at σ = 0 (``final_sigmas_type="zero"``), spaced by
``leading`` / ``trailing`` / ``linspace`` timesteps or by Karras / log-SNR σ's; at most T − 1 steps.
"""

from __future__ import annotations

import numpy as np

from service.diffusion.samplers.base import Plan, Sampler, SamplerOptions
from service.diffusion.samplers.spacing import (
    DISCRETE_SPACINGS,
    SIGMA_SPACINGS,
    Spacing,
    discrete_timesteps,
    sigma_levels,
)
from service.diffusion.schedule import NoiseSchedule

__all__ = ["MultistepSolver", "solver_plan"]


def solver_plan(name: str, schedule: NoiseSchedule, steps: int, spacing: Spacing, options: SamplerOptions) -> Plan:
    """The DPM-Solver / UniPC plan: S timesteps, S+1 noise levels ending at σ = 0 (``final_sigmas_type="zero"``).

    For Karras / log-SNR σ's the UNet gets each σ's nearest timestep (rounded; truncated for the cosine
    schedule, as diffusers does for ``squaredcos_cap_v2``) while the solver uses the σ's themselves.
    """
    abar = schedule.alphas_cumprod_f64().numpy()
    if spacing in SIGMA_SPACINGS:
        ts, sigmas = sigma_levels(abar, steps, spacing, round_timesteps=options.beta_schedule != "cosine")
        levels = 1.0 / (1.0 + sigmas**2)  # ᾱ = 1/(1 + σ²) for the VE-form σ
    else:
        ts = discrete_timesteps(schedule.num_timesteps, steps, spacing, options.steps_offset, solver=True)
        levels = abar[ts]
    levels = np.append(levels, 1.0).tolist()
    return Plan(name, spacing, tuple(ts.tolist()), tuple(levels[:-1]), tuple(levels[1:]), options)


class MultistepSolver(Sampler):
    """A sampler of the DPM-Solver / UniPC family: their spacings, defaults, step limit and plan."""

    spacings = (*DISCRETE_SPACINGS, *SIGMA_SPACINGS)
    default_spacing: Spacing = "linspace"
    default_steps = 20

    def max_steps(self, num_train_timesteps: int) -> int:
        return num_train_timesteps - 1

    def plan(self, schedule: NoiseSchedule, steps: int, spacing: Spacing, options: SamplerOptions) -> Plan:
        self.check(schedule.num_timesteps, steps, spacing)
        return solver_plan(self.name, schedule, steps, spacing, options)
