"""Timestep spacings with diffusers' semantics, and the σ schedules of the ODE solvers.

``leading``, ``trailing`` and ``linspace`` are the three spacings of Lin et al. 2024 (table 2) as
diffusers implements them. They differ slightly between scheduler families: DDPM/DDIM space S points
over 0…T−1, while DPM-Solver and UniPC space S+1 points and drop the last (so they never evaluate
t = 0). ``karras`` (Karras et al. 2022, eq. 5, ρ = 7) and ``logsnr`` (uniform in log-SNR, Lu et al.
2022; diffusers' ``use_lu_lambdas``) choose noise levels σ first and map each to the nearest
training timestep for the UNet. Here σ is the VE-form noise level σ_t = √((1−ᾱ_t)/ᾱ_t).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

__all__ = ["DISCRETE_SPACINGS", "SIGMA_SPACINGS", "Spacing", "discrete_timesteps", "sigma_levels"]

Spacing = Literal["leading", "trailing", "linspace", "karras", "logsnr"]
DISCRETE_SPACINGS: tuple[Spacing, ...] = ("leading", "trailing", "linspace")
SIGMA_SPACINGS: tuple[Spacing, ...] = ("karras", "logsnr")


def discrete_timesteps(
    num_train_timesteps: int, steps: int, spacing: Spacing, steps_offset: int = 0, solver: bool = False
) -> np.ndarray:
    """``steps`` descending integer timesteps (int64).

    ``solver=False``: DDPMScheduler / DDIMScheduler; ``solver=True``: DPMSolverMultistepScheduler /
    UniPCMultistepScheduler (S+1 points, the last dropped, for ``linspace`` and ``leading``).
    """
    big_t = num_train_timesteps
    points = steps + 1 if solver else steps
    if spacing == "linspace":
        ts = np.linspace(0, big_t - 1, points).round()[::-1]
    elif spacing == "leading":
        ts = (np.arange(0, points) * (big_t // points)).round()[::-1] + steps_offset
    elif spacing == "trailing":
        ts = np.round(np.arange(big_t, 0, -big_t / steps)) - 1
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; expected one of {DISCRETE_SPACINGS}")
    if solver and spacing != "trailing":
        ts = ts[:-1]
    return np.ascontiguousarray(ts).astype(np.int64)


def _sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timestep of each σ: linear interpolation in log σ between neighbouring training steps."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    low = np.clip(np.searchsorted(log_sigmas, log_sigma, side="right") - 1, 0, len(log_sigmas) - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def sigma_levels(
    alphas_cumprod: np.ndarray, steps: int, spacing: Spacing, round_timesteps: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps int64, σ's float64) of a ``karras`` or ``logsnr`` schedule, both descending.

    ``round_timesteps=False`` truncates instead, as diffusers does for its cosine (squaredcos) schedule.
    """
    sigmas = np.sqrt((1 - alphas_cumprod) / alphas_cumprod)  # ascending in t
    log_sigmas = np.log(sigmas)
    ramp = np.linspace(0, 1, steps)
    if spacing == "karras":  # σ_i = (σ_max^{1/ρ} + i/(S−1) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, ρ = 7
        rho = 7.0
        hi, lo = sigmas[-1] ** (1 / rho), sigmas[0] ** (1 / rho)
        levels = (hi + ramp * (lo - hi)) ** rho
    elif spacing == "logsnr":  # log σ (= −½ log-SNR) evenly spaced from log σ_max to log σ_min
        levels = np.exp(log_sigmas[-1] + ramp * (log_sigmas[0] - log_sigmas[-1]))
    else:
        raise ValueError(f"unknown σ spacing {spacing!r}; expected one of {SIGMA_SPACINGS}")
    ts = _sigma_to_t(levels, log_sigmas)
    return (ts.round() if round_timesteps else ts).astype(np.int64), levels
