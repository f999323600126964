"""The shape every sampler has: a plan (timesteps and noise levels), per-row state, a vectorised update.

A sampler turns (T, steps, spacing) into a :class:`Plan`: the timestep t_i the UNet sees at step i,
the ᾱ the solver assigns to x at step i, and the ᾱ that step moves x to (1 = clean data). Rows of one
sampler — from many requests, each at its own step of its own plan — are updated together from
ε_θ in :meth:`Sampler.step`. Per-step coefficients are computed per request in float64 from the
plan (the readable math, next to the paper's equations) and broadcast to its rows; multistep
solvers keep the last model outputs of each row in ``history`` (rows × slots × C × H × W).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from service.diffusion.samplers.spacing import Spacing
from service.diffusion.schedule import NoiseSchedule, VarianceType

__all__ = ["Plan", "Rows", "Sampler", "SamplerOptions", "StepOutput", "log_snr_half"]


@dataclass(frozen=True)
class SamplerOptions:
    """The scheduler settings a model carries (its config.json ``sampling``, or diffusers' scheduler_config.json)."""

    variance_type: VarianceType = "fixed_small"  # DDPM σ_t² = β̃_t or β_t
    clip_sample: bool = True  # DDPM/DDIM clip x̂_0 to [−clip_sample_range, clip_sample_range]
    clip_sample_range: float = 1.0
    steps_offset: int = 0  # added to ``leading`` timesteps
    set_alpha_to_one: bool = True  # DDIM: ᾱ after its last step is 1 (else ᾱ_0)
    lower_order_final: bool = True  # DPM-Solver++/UniPC: lower orders for the final steps when steps < 15
    beta_schedule: str = "linear"  # "cosine": Karras / log-SNR timesteps are truncated, not rounded (diffusers)


@dataclass(frozen=True, eq=False)
class Plan:
    """One request's schedule: ``alphas_cumprod[i]`` is x's ᾱ at step i, ``alphas_cumprod_next[i]`` where it lands."""

    sampler: str
    spacing: Spacing
    timesteps: tuple[int, ...]  # t_i given to the UNet, i = 0 … N−1
    alphas_cumprod: tuple[float, ...]  # float64 ᾱ of x at step i
    alphas_cumprod_next: tuple[float, ...]  # float64 ᾱ after step i; 1.0 = clean data
    options: SamplerOptions
    first: int = 0  # index of step 0 in the sampler's full sequence (> 0: an image-to-image tail of it)
    _memo: dict = field(default_factory=dict, repr=False)  # coefficients already computed, by (kind, i, η)

    def __len__(self) -> int:
        return len(self.timesteps)

    def memo(self, coefficients: Callable[[Plan, int, float], Sequence[float]], i: int, eta: float) -> Sequence[float]:
        """``coefficients(self, i, eta)``, computed once per plan (plans are shared by requests alike)."""
        key = (coefficients.__qualname__, i, eta)
        if key not in self._memo:
            self._memo[key] = tuple(coefficients(self, i, eta))
        return self._memo[key]


@dataclass(frozen=True)
class StepOutput:
    prev_sample: torch.Tensor  # x after the step, (B, C, H, W)
    pred_x0: torch.Tensor  # x̂_0 of this step (clipped where the sampler clips), (B, C, H, W)
    history: torch.Tensor | None = None  # the rows' new state, (B, slots, C, H, W)


def log_snr_half(abar: float) -> float:
    """λ = log(α/σ) = ½ log(ᾱ/(1−ᾱ)) (DPM-Solver's half log-SNR); +∞ for clean data."""
    return math.inf if abar >= 1.0 else 0.5 * (math.log(abar) - math.log1p(-abar))


@dataclass(eq=False)
class Rows:
    """The rows of one sampler in one iteration: tensors stacked over requests, and each request's place."""

    x: torch.Tensor  # (B, C, H, W)
    eps: torch.Tensor  # ε_θ(x, t), (B, C, H, W)
    noise: torch.Tensor  # z per row, zeros where the step draws none, (B, C, H, W)
    history: torch.Tensor | None  # (B, slots, C, H, W)
    plans: Sequence[Plan]  # per request
    index: Sequence[int]  # per request: its current step
    eta: Sequence[float]  # per request
    sizes: Sequence[int]  # per request: rows
    unclipped: torch.Tensor | None = None  # (B,) bool: rows whose x̂_0 is never clipped (guided: clipped before)

    def per_row(self, coefficients: Callable[[Plan, int, float], Sequence[float]]) -> torch.Tensor:
        """``coefficients(plan, i, eta)`` of every request (float64), repeated for its rows: (B, K, 1, …, 1).

        ``c[:, k]`` then broadcasts against x: (B, 1, …, 1).
        """
        table = torch.tensor(
            [p.memo(coefficients, i, e) for p, i, e in zip(self.plans, self.index, self.eta, strict=True)],
            dtype=torch.float64,
        )
        rows = table.repeat_interleave(torch.tensor(self.sizes), dim=0)
        return rows.to(self.x).reshape(*rows.shape, *([1] * (self.x.ndim - 1)))

    def pred_x0(self, clip_range: float = math.inf) -> torch.Tensor:
        """x̂_0 = (x − √(1−ᾱ) ε)/√ᾱ at each row's level (DDPM eq. 15), clipped to ±``clip_range`` (not ``unclipped``
        rows; ∞ = no clip)."""

        def coef(p: Plan, i: int, _eta: float) -> tuple[float, float]:
            abar = p.alphas_cumprod[i]
            return math.sqrt(abar), math.sqrt(1.0 - abar)

        c = self.per_row(coef)
        x0 = (self.x - c[:, 1] * self.eps) / c[:, 0]
        if math.isfinite(clip_range):
            clipped = x0.clamp(-clip_range, clip_range)
            if self.unclipped is None:
                return clipped
            x0 = torch.where(self.unclipped.reshape(-1, *([1] * (x0.ndim - 1))), x0, clipped)
        return x0


class Sampler(ABC):
    """A sampler family member: its plan, its per-row state, its noise draws and its vectorised update."""

    name: str
    family: str  # "ddpm" | "ddim" | "dpmsolver" | "unipc": which diffusers class it follows
    spacings: tuple[Spacing, ...]
    default_spacing: Spacing  # diffusers' default for that class
    default_steps: int | None  # None = T
    history_slots: int = 0  # x-shaped tensors kept per row between steps
    corrected_x_slot: int | None = None  # history slot holding a corrected copy of x (UniC), or None
    uses_eta: bool = False
    clips_pred_x0: bool = False  # clips x̂_0 when the model's options ask for it (DDPM, DDIM: diffusers' clip_sample)

    def clip_range(self, options: SamplerOptions) -> float:
        """±range this sampler clips x̂_0 to: the model's ``clip_sample_range`` where it clips and the model asks for it
        (diffusers' ``clip_sample``), else ∞."""
        return options.clip_sample_range if self.clips_pred_x0 and options.clip_sample else math.inf

    @property
    def supports_resampling(self) -> bool:
        """RePaint's jumps back re-noise x mid-plan: only a sampler that keeps no solver history can follow them."""
        return not self.history_slots

    def max_steps(self, num_train_timesteps: int) -> int:
        return num_train_timesteps

    @abstractmethod
    def plan(self, schedule: NoiseSchedule, steps: int, spacing: Spacing, options: SamplerOptions) -> Plan:
        """The request's timesteps and noise levels."""

    def draws_noise(self, plan: Plan, i: int, eta: float) -> bool:
        """Whether step ``i`` adds σ z (and so draws z from each row's generator)."""
        return False

    @abstractmethod
    def step(self, rows: Rows) -> StepOutput:
        """Move every row one step along its own plan."""

    def check(self, num_train_timesteps: int, steps: int, spacing: Spacing) -> None:
        """Raise ValueError for a step count or spacing this sampler cannot run."""
        if spacing not in self.spacings:
            raise ValueError(f"sampler {self.name!r} does not support timestep_spacing {spacing!r}; "
                             f"supported: {', '.join(self.spacings)}")
        top = self.max_steps(num_train_timesteps)
        if not 1 <= steps <= top:
            raise ValueError(f"steps must be in 1..{top} for sampler {self.name!r}, got {steps}")
