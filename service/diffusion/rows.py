"""Rows of many requests, each at its own step of its own sampler's plan, advanced by ONE UNet forward.

The rows of a request form a :class:`RowGroup`: its images x (n, C, H, W), its sampler and
:class:`~service.diffusion.samplers.Plan`, its position in that plan, η, the sampler's per-row state
(``history``: the last model outputs of multistep solvers) and one generator per row
(:func:`row_generator` (seed, i)). x_T is drawn first from each row's generator, then the noise of
every stochastic step, so a request's images do not depend on which other rows shared its forwards.
The offline pipeline and the serving engine both run :func:`batched_step`.

A group may carry its request's conditioning (:mod:`service.diffusion.conditioning`: image-to-image,
inpainting, classifier guidance): it changes the group's plan and start, shifts its ε after the shared
forward (one batched classifier gradient over all guided rows) and its x after the sampler's update. Groups
without one run exactly as plain generation, at the same cost.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from service.diffusion.checkpoint import DiffusionModel, eps_scale_at
from service.diffusion.conditioning import Conditioning, RowConditioning, after_step, conditioned_plan, guide
from service.diffusion.samplers import Plan, Rows, Sampler, SamplerOptions, Spacing, get_sampler
from service.diffusion.schedule import NoiseSchedule

__all__ = ["RowGroup", "batched_step", "make_noise", "predict_eps", "row_generator", "to_device"]


def row_generator(seed: int, row: int) -> torch.Generator:
    """The CPU generator of row ``row`` of a request with ``seed``: x_T first, then each step's z.

    Seeds are mixed (golden-ratio multiply) so rows of nearby seeds do not share streams.
    """
    return torch.Generator().manual_seed((seed * 0x9E3779B97F4A7C15 + row) % (1 << 63))


def make_noise(
    shape: tuple[int, ...], generators: list[torch.Generator], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Standard normal noise of ``shape`` (B, …), row i drawn from ``generators[i]`` on the CPU.

    Drawing on the CPU keeps a row's noise identical on every device and batch composition; a GPU gets it
    through pinned memory without waiting (:func:`to_device`).
    """
    rows = [torch.randn(shape[1:], generator=g) for g in generators]
    return to_device(torch.stack(rows), device)


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` (on the CPU) on ``device``; to CUDA as an asynchronous copy from pinned memory (no host sync)."""
    device = torch.device(device)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def predict_eps(unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """ε_θ(x, t) in float32; ``dtype`` other than float32 runs the UNet under autocast (channels_last)."""
    device = x.device
    if dtype == torch.float32:
        with torch.inference_mode():
            return unet(x, t.to(device)).float()
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype):
        return unet(x.contiguous(memory_format=torch.channels_last), t.to(device)).float()


@functools.lru_cache(maxsize=256)
def _plan(sampler: Sampler, schedule: NoiseSchedule, steps: int, spacing: Spacing, options: SamplerOptions) -> Plan:
    """One plan per (sampler, model, steps, spacing): requests alike share it and its memoised coefficients."""
    return sampler.plan(schedule, steps, spacing, options)


@dataclass(eq=False)
class RowGroup:
    """The rows of one request inside the running batch; all rows of a request move together."""

    x: torch.Tensor  # current x of every row, (n, C, H, W) float32 on the model's device
    sampler: Sampler
    plan: Plan  # the request's timesteps and noise levels
    eta: float  # DDIM η (0 = deterministic); unused by the other samplers
    generators: list[torch.Generator]  # row i's generator: x_T, then every step's z
    history: torch.Tensor | None = field(default=None, repr=False)  # sampler state, (n, slots, C, H, W)
    index: int = 0  # steps already taken; plan.timesteps[index] is the current t
    pred_x0: torch.Tensor | None = field(default=None, repr=False)  # x̂_0 of the last step, (n, C, H, W)
    cond: RowConditioning | None = field(default=None, repr=False)  # the request's conditioning; None = plain

    @classmethod
    def start(
        cls,
        model: DiffusionModel,
        num: int,
        seed: int,
        sampler: str,
        steps: int,
        eta: float = 0.0,
        spacing: Spacing | None = None,
        device: torch.device | str = "cpu",
        init_noise: torch.Tensor | None = None,
        first_row: int = 0,
        conditioning: Conditioning | None = None,
    ) -> RowGroup:
        """New rows at x_T ~ N(0, I) drawn from each row's own generator (or ``init_noise``, (n, C, H, W)).

        Rows are numbered from ``first_row`` (an offline batch that is not the request's first). With
        ``conditioning`` the rows run its plan from its start (image-to-image: q(x_t | x_0) from that same first
        draw); ValueError when this model or plan cannot run it.
        """
        s = get_sampler(sampler)
        plan = _plan(s, model.schedule, steps, spacing or model.spec.default_spacing(sampler), model.spec.options)
        cond = None
        if conditioning is not None:
            conditioning.check(model, sampler, steps)
            effective = conditioning.effective()
            if effective is not None:
                plan, jumps = conditioned_plan(plan, effective)
                cond = RowConditioning.prepare(effective, num, device, jumps)
        gens = [row_generator(seed, r) for r in range(first_row, first_row + num)]
        shape = (num, model.spec.channels, model.spec.image_size, model.spec.image_size)
        x = make_noise(shape, gens, device)
        if init_noise is not None:
            x = init_noise.to(device, torch.float32)
        if cond is not None:
            x = cond.start(plan, x)
        history = torch.zeros(num, s.history_slots, *shape[1:], device=device) if s.history_slots else None
        return cls(x=x, sampler=s, plan=plan, eta=float(eta), generators=gens, history=history, cond=cond)

    @property
    def rows(self) -> int:
        return self.x.shape[0]

    @property
    def total(self) -> int:
        return len(self.plan)

    @property
    def remaining(self) -> int:
        return len(self.plan) - self.index

    @property
    def done(self) -> bool:
        return self.index >= len(self.plan)

    @property
    def t(self) -> int:
        return self.plan.timesteps[self.index]

    @property
    def draws_noise(self) -> bool:
        """Whether this step adds σ z, and so draws z from the rows' generators."""
        return self.sampler.draws_noise(self.plan, self.index, self.eta)

    @property
    def state_bytes(self) -> int:
        """Memory of the sampler state these rows keep between steps."""
        return 0 if self.history is None else self.history.numel() * self.history.element_size()


def _guided_eps(
    model: DiffusionModel, groups: list[RowGroup], x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ε̂, guided): ε of the stacked rows of ``groups`` with the guided rows shifted by their classifier's gradient
    (eq. 14, after clipping x̂_0 where the sampler clips), and the (B,) mask of the guided rows."""
    if model.guidance is None:
        raise ValueError("guided rows need a model with a guidance classifier")
    index, labels, params, start = [], [], [], 0
    for g in groups:
        if g.cond is not None and g.cond.labels is not None:
            index.append(torch.arange(start, start + g.rows))
            labels.append(g.cond.labels)
            clip = g.sampler.clip_range(g.plan.options)
            params += [(g.cond.scale, g.plan.alphas_cumprod[g.index], clip)] * g.rows  # s, ᾱ_t, clip range
        start += g.rows
    rows = to_device(torch.cat(index), x.device)
    scale, abar, clip = to_device(torch.tensor(params, dtype=torch.float64), x.device).unbind(1)
    guided = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device).index_fill(0, rows, True)
    return guide(model.guidance, x, t, eps, rows, torch.cat(labels), scale, abar, clip), guided


@torch.inference_mode()
def batched_step(
    model: DiffusionModel,
    groups: list[RowGroup],
    dtype: torch.dtype = torch.float32,
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Advance every group by one step of its own plan with one UNet forward over all rows.

    ``forward(x, t)`` computes ε_θ in float32 (default: :func:`predict_eps` with ``dtype``). Updates each
    group's ``x``, ``pred_x0``, ``history`` and ``index`` in place. Groups that are done must not be passed.
    Guided groups need ``model.guidance``.
    """
    if not groups:
        return
    device = groups[0].x.device
    groups = sorted(groups, key=lambda g: g.sampler.name)  # each sampler's rows contiguous (stable sort)
    # 1. stack rows and their per-row timesteps
    x = torch.cat([g.x for g in groups])  # (B, C, H, W)
    t = to_device(torch.tensor([g.t for g in groups for _ in range(g.rows)], dtype=torch.long), device)  # (B,)
    # 2. one forward: ε_θ(x_t, t) for all rows at their own t
    eps = forward(x, t) if forward is not None else predict_eps(model.unet, x, t, dtype)
    # 2a. Epsilon Scaling (Ning et al. 2023): ε_θ/λ_t, λ_t set per sampler in the model's config (1 = none)
    scales = [model.spec.eps_scale(g.sampler.name) for g in groups]
    if any(s != 1.0 for s in scales):
        per_row = torch.cat([eps_scale_at(s, ts, model.spec.num_train_timesteps)
                             for s, ts in zip(scales, t.split([g.rows for g in groups]), strict=True)])
        eps = eps / per_row.to(eps.dtype).reshape(-1, *([1] * (eps.ndim - 1)))
    # 2b. classifier guidance — ε − s √(1−ᾱ_t) ∇ log p(y | x_t, t): ONE batched gradient over the guided rows only
    guided = None
    if any(g.cond is not None and g.cond.guided for g in groups):
        eps, guided = _guided_eps(model, groups, x, t, eps)
    # 3. per sampler, one vectorised update; z from each row's own generator (zeros where no noise is added)
    start = 0
    for _, members in itertools.groupby(groups, key=lambda g: g.sampler.name):
        gs = list(members)
        sizes = [g.rows for g in gs]
        rows = slice(start, start + sum(sizes))
        start = rows.stop
        noise = torch.cat([make_noise(tuple(g.x.shape), g.generators, device) if g.draws_noise
                           else torch.zeros_like(g.x) for g in gs])
        history = torch.cat([g.history for g in gs]) if gs[0].history is not None else None
        out = gs[0].sampler.step(Rows(x[rows], eps[rows], noise, history, [g.plan for g in gs],
                                      [g.index for g in gs], [g.eta for g in gs], sizes,
                                      None if guided is None else guided[rows]))
        # 4. hand each group its rows back (conditioned ones after RePaint's replacement and resampling jumps)
        hists = out.history.split(sizes) if out.history is not None else [None] * len(gs)
        for g, xs, ps, hs in zip(gs, out.prev_sample.split(sizes), out.pred_x0.split(sizes), hists, strict=True):
            if g.cond is not None:
                xs, ps, hs = after_step(g.cond, g.plan, g.index, g.x, xs, ps, hs, g.sampler.corrected_x_slot,
                                        lambda g=g: make_noise(tuple(g.x.shape), g.generators, device))
            g.x, g.pred_x0, g.history = xs, ps, hs
            g.index += 1
