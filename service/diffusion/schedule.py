"""Noise schedules and the closed forms of DDPM (Ho, Jain & Abbeel 2020, arXiv:2006.11239).

Equation numbers refer to the DDPM paper. Timesteps are 0-based, ``t ∈ {0, …, T-1}`` as in
diffusers: row ``t`` of every table describes the paper's step ``t+1``. A timestep of ``-1``
means "clean data", where ᾱ = 1.

Erratum: the project's source note gives the linear schedule as 1e-4 → 0.002. That is a typo;
the paper (section 4) and every reference implementation use β_1 = 1e-4 → β_T = 0.02.

Tables are computed once in float64 and kept as float32 tensors, named after their formula.
Every function takes a per-row timestep vector ``t`` of shape (B,), so one batch may hold rows
at different timesteps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = [
    "BetaSchedule",
    "NoiseSchedule",
    "VarianceType",
    "extract",
    "make_betas",
]

BetaSchedule = Literal["linear", "cosine"]
VarianceType = Literal["fixed_small", "fixed_large"]


def make_betas(
    kind: BetaSchedule = "linear",
    num_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
) -> torch.Tensor:
    """β_1..β_T in float64.

    ``linear``: evenly spaced from ``beta_start`` to ``beta_end`` (DDPM section 4).
    ``cosine``: ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2) with s = 0.008, β_t = 1 - ᾱ_t/ᾱ_{t-1}
    clipped at 0.999 (Nichol & Dhariwal 2021, eq. 17).
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    if kind == "cosine":
        s = 0.008

        def alpha_bar(u: float) -> float:
            return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

        steps = [
            min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), 0.999)
            for i in range(num_timesteps)
        ]
        return torch.tensor(steps, dtype=torch.float64)
    raise ValueError(f"unknown beta schedule {kind!r}; expected 'linear' or 'cosine'")


def extract(table: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Gather ``table[t]`` per row and reshape to (B, 1, …, 1) for broadcasting over ``ndim`` dims."""
    out = table.to(t.device)[t]
    return out.reshape(t.shape[0], *([1] * (ndim - 1)))


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """The diffusion's constant tables (float32 tensors computed in float64)."""

    betas: torch.Tensor
    alphas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    sqrt_recip_alphas_cumprod: torch.Tensor
    sqrt_recipm1_alphas_cumprod: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> NoiseSchedule:
        b = betas.to(torch.float64)
        if b.ndim != 1 or not bool(((b > 0) & (b < 1)).all()):
            raise ValueError("betas must be a 1-D tensor with values in (0, 1)")
        alphas = 1.0 - b  # α_t = 1 - β_t
        abar = torch.cumprod(alphas, dim=0)  # ᾱ_t = ∏_{s≤t} α_s
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        tables = {
            "betas": b,
            "alphas": alphas,
            "alphas_cumprod": abar,
            "alphas_cumprod_prev": abar_prev,
            "sqrt_alphas_cumprod": abar.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - abar).sqrt(),
            "sqrt_recip_alphas_cumprod": (1.0 / abar).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / abar - 1.0).sqrt(),
            # eq. (7): β̃_t = (1 - ᾱ_{t-1}) / (1 - ᾱ_t) · β_t
            "posterior_variance": b * (1.0 - abar_prev) / (1.0 - abar),
            # eq. (7): μ̃_t = coef1 · x_0 + coef2 · x_t
            "posterior_mean_coef1": b * abar_prev.sqrt() / (1.0 - abar),
            "posterior_mean_coef2": (1.0 - abar_prev) * alphas.sqrt() / (1.0 - abar),
        }
        return cls(**{k: v.to(torch.float32) for k, v in tables.items()})

    @classmethod
    def create(
        cls,
        kind: BetaSchedule = "linear",
        num_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
    ) -> NoiseSchedule:
        return cls.from_betas(make_betas(kind, num_timesteps, beta_start, beta_end))

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    def alphas_cumprod_f64(self) -> torch.Tensor:
        """ᾱ_t in float64, exp(Σ_{s≤t} log(1 − β_s)) from the stored betas.

        The samplers form their coefficients from these: 1 − ᾱ and 1 − ᾱ_t/ᾱ_{t'} taken from float32 ᾱ
        lose three to four significant digits near t = 0, where ᾱ ≈ 1.
        """
        return torch.cumsum(torch.log1p(-self.betas.to(torch.float64)), dim=0).exp()

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """ᾱ_t per row, with ᾱ_{-1} = 1 (clean data), shape (B,)."""
        t = t.long()
        abar = self.alphas_cumprod.to(t.device)[t.clamp(min=0)]
        return torch.where(t >= 0, abar, torch.ones_like(abar))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Eq. (4), reparameterised: x_t = √ᾱ_t · x_0 + √(1 - ᾱ_t) · ε."""
        return (
            extract(self.sqrt_alphas_cumprod, t, x0.ndim) * x0
            + extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise
        )

    def q_posterior(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. (6)-(7): mean μ̃_t(x_t, x_0) and variance β̃_t of q(x_{t-1} | x_t, x_0)."""
        mean = (
            extract(self.posterior_mean_coef1, t, x_t.ndim) * x0
            + extract(self.posterior_mean_coef2, t, x_t.ndim) * x_t
        )
        return mean, extract(self.posterior_variance, t, x_t.ndim)

    def predict_x0_from_eps(
        self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor
    ) -> torch.Tensor:
        """Eq. (4) solved for x_0: x̂_0 = (x_t - √(1 - ᾱ_t) ε) / √ᾱ_t."""
        return (
            extract(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
            - extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps
        )

    def predict_eps_from_x0(
        self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor
    ) -> torch.Tensor:
        """Inverse of :meth:`predict_x0_from_eps`: ε = (x_t - √ᾱ_t x_0) / √(1 - ᾱ_t)."""
        return (
            extract(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - x0
        ) / extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim)

    def posterior_mean_from_eps(
        self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor
    ) -> torch.Tensor:
        """Eq. (11): μ_θ(x_t, t) = (x_t - β_t / √(1 - ᾱ_t) · ε_θ) / √α_t."""
        return (
            x_t - extract(self.betas / self.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * eps
        ) / extract(self.alphas.sqrt(), t, x_t.ndim)

    def variance(self, t: torch.Tensor, variance_type: VarianceType, ndim: int) -> torch.Tensor:
        """σ_t² of p(x_{t-1} | x_t) (section 3.2): β̃_t (``fixed_small``) or β_t (``fixed_large``)."""
        if variance_type == "fixed_small":
            return extract(self.posterior_variance, t, ndim)
        if variance_type == "fixed_large":
            return extract(self.betas, t, ndim)
        raise ValueError(f"unknown variance type {variance_type!r}")
