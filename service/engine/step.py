"""One engine iteration over rows of many requests: ONE UNet forward, then per-row sampler updates.

The rows of a request form a :class:`RowGroup`: its images x (n, C, H, W), its own timestep
sequence (``samplers.timesteps(T, steps)``) and position in it, its sampler and η, and one
generator per row (``samplers.row_generator(seed, i)``). x_T is drawn first from each row's
generator, then the noise of every stochastic step, in the same order as ``pipeline.sample`` —
so a request's images do not depend on which other rows shared its forwards.

:func:`batched_step` stacks the groups' x and per-row (t, t_prev), predicts ε once for all rows
(the UNet only needs (x_t, t)), then applies DDPM ancestral updates (Ho et al. 2020, Algorithm 2,
respaced as in Nichol & Dhariwal 2021) to DDPM rows and DDIM updates (Song et al. 2021, eq. 12,
per-row η) to DDIM rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from service.diffusion.checkpoint import DiffusionModel
from service.diffusion.pipeline import predict_eps
from service.diffusion.samplers import SamplerName, ddim_step, ddpm_step, make_noise, row_generator, timesteps

__all__ = ["RowGroup", "batched_step"]


@dataclass(eq=False)
class RowGroup:
    """The rows of one request inside the running batch; all rows of a request move together."""

    x: torch.Tensor  # current x_t of every row, (n, C, H, W) float32 on the model's device
    seq: list[int]  # the request's descending timesteps
    sampler: SamplerName  # "ddpm" or "ddim"
    eta: float  # DDIM η (0 = deterministic); unused by ddpm
    generators: list[torch.Generator]  # row i's generator: x_T, then every step's z
    index: int = 0  # steps already taken; seq[index] is the current t
    pred_x0: torch.Tensor | None = field(default=None, repr=False)  # x̂_0 of the last step, (n, C, H, W)

    @classmethod
    def start(
        cls,
        model: DiffusionModel,
        num: int,
        seed: int,
        sampler: SamplerName,
        steps: int,
        eta: float = 0.0,
        device: torch.device | str = "cpu",
    ) -> RowGroup:
        """New rows at x_T ~ N(0, I), drawn from each row's own generator (as ``pipeline.sample``)."""
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"unknown sampler {sampler!r}")
        spec = model.spec
        seq = timesteps(spec.num_train_timesteps, steps)
        gens = [row_generator(seed, r) for r in range(num)]
        x = make_noise((num, spec.channels, spec.image_size, spec.image_size), gens, device)
        return cls(x=x, seq=seq, sampler=sampler, eta=float(eta), generators=gens)

    @property
    def rows(self) -> int:
        return self.x.shape[0]

    @property
    def total(self) -> int:
        return len(self.seq)

    @property
    def remaining(self) -> int:
        return len(self.seq) - self.index

    @property
    def done(self) -> bool:
        return self.index >= len(self.seq)

    @property
    def t(self) -> int:
        return self.seq[self.index]

    @property
    def t_prev(self) -> int:
        return self.seq[self.index + 1] if self.index + 1 < len(self.seq) else -1

    @property
    def draws_noise(self) -> bool:
        """Whether this step adds σ_t z (and so draws z from the rows' generators), as in ``pipeline.sample``."""
        return self.t_prev >= 0 and (self.sampler == "ddpm" or self.eta > 0)


@torch.inference_mode()
def batched_step(
    model: DiffusionModel,
    groups: list[RowGroup],
    dtype: torch.dtype = torch.float32,
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Advance every group by one step of its own sequence with one UNet forward over all rows.

    ``forward(x, t)`` computes ε_θ in float32 (default: ``pipeline.predict_eps`` with ``dtype``). Updates
    each group's ``x``, ``pred_x0`` and ``index`` in place. Groups that are done must not be passed.
    """
    if not groups:
        return
    spec, schedule = model.spec, model.schedule
    device = groups[0].x.device
    sizes = [g.rows for g in groups]
    # 1. stack rows and their per-row timesteps
    x = torch.cat([g.x for g in groups])  # (B, C, H, W)
    t = torch.tensor([g.t for g in groups for _ in range(g.rows)], dtype=torch.long, device=device)  # (B,)
    t_prev = torch.tensor([g.t_prev for g in groups for _ in range(g.rows)], dtype=torch.long, device=device)
    # 2. one forward: ε_θ(x_t, t) for all rows at their own t
    eps = forward(x, t) if forward is not None else predict_eps(model.unet, x, t, dtype)
    # 3. each row's z from its own generator (zeros where the step adds no noise: σ z = 0 there)
    noise = torch.cat(
        [make_noise(tuple(g.x.shape), g.generators, device) if g.draws_noise else torch.zeros_like(g.x) for g in groups]
    )
    # 4. per-row sampler updates, DDPM rows and DDIM rows each in one vectorised call
    new_x = torch.empty_like(x)
    pred_x0 = torch.empty_like(x)
    sampler_of_row = [g.sampler for g in groups for _ in range(g.rows)]
    for name in ("ddpm", "ddim"):
        idx = [i for i, s in enumerate(sampler_of_row) if s == name]
        if not idx:
            continue
        sel = slice(None) if len(idx) == len(sampler_of_row) else torch.tensor(idx, device=device)
        if name == "ddpm":
            out = ddpm_step(
                schedule, x[sel], eps[sel], t[sel], t_prev[sel], noise[sel], spec.variance_type, spec.clip_sample
            )
        else:
            eta = torch.tensor([g.eta for g in groups for _ in range(g.rows)], dtype=x.dtype, device=device)
            out = ddim_step(schedule, x[sel], eps[sel], t[sel], t_prev[sel], eta[sel], noise[sel], spec.clip_sample)
        new_x[sel] = out.prev_sample
        pred_x0[sel] = out.pred_x0
    # 5. hand each group its rows back
    for g, xs, ps in zip(groups, new_x.split(sizes), pred_x0.split(sizes), strict=True):
        g.x, g.pred_x0 = xs, ps
        g.index += 1
