"""batched_step: rows of different samplers, at different steps of different plans, share one forward exactly."""

from __future__ import annotations

import copy

import torch

from service.diffusion.checkpoint import DiffusionModel
from service.diffusion.rows import RowGroup, batched_step, row_generator

# (sampler, steps, eta, rows, steps taken before the shared forward)
MIX = [
    ("ddpm", 1000, 0.0, 2, 417),
    ("ddim", 20, 1.0, 2, 3),
    ("dpmpp_2m", 10, 0.0, 3, 4),
    ("dpmpp_3m", 20, 0.0, 1, 6),
    ("dpmpp_2m_sde", 15, 0.0, 2, 2),
    ("unipc", 12, 0.0, 2, 5),
]


def _advance(model: DiffusionModel, g: RowGroup, steps: int) -> RowGroup:
    for _ in range(steps):
        batched_step(model, [g])
    return g


def _groups(model: DiffusionModel) -> list[RowGroup]:
    groups = []
    for seed, (sampler, steps, eta, n, taken) in enumerate(MIX):
        g = RowGroup.start(model, n, seed, sampler, steps, eta)
        if sampler == "ddpm":
            g.index = taken  # far into the chain without running it
        else:
            _advance(model, g, taken)  # real multistep state
        groups.append(g)
    return groups


def _clone(g: RowGroup, rows: slice = slice(None)) -> RowGroup:
    c = copy.copy(g)
    c.x = g.x[rows]
    c.history = g.history[rows] if g.history is not None else None
    c.generators = [torch.Generator().set_state(gen.get_state()) for gen in g.generators[rows]]
    return c


def test_six_samplers_at_different_steps_in_one_forward_equal_each_row_alone(tiny_model: DiffusionModel) -> None:
    groups = _groups(tiny_model)
    assert len({g.t for g in groups}) == len(groups)  # really different timesteps
    assert all(g.history is not None and g.history.abs().sum() > 0 for g in groups if g.sampler.history_slots)
    alone = [[_advance(tiny_model, _clone(g, slice(r, r + 1)), 1) for r in range(g.rows)] for g in groups]
    mixed = [_clone(g) for g in groups]
    batched_step(tiny_model, mixed[::-1])  # any order of groups
    for g, m, rows in zip(groups, mixed, alone, strict=True):
        assert m.index == g.index + 1
        torch.testing.assert_close(m.x, torch.cat([a.x for a in rows]), atol=1e-5, rtol=0)
        if m.history is not None:
            # x̂_0 of a random-weight UNet near t = T is large (/ √ᾱ ≈ 6e-3): compare it relatively
            torch.testing.assert_close(m.history, torch.cat([a.history for a in rows]), atol=1e-5, rtol=1e-5)
        assert not torch.equal(m.x, g.x)


def test_noise_is_drawn_only_on_stochastic_steps(tiny_model: DiffusionModel) -> None:
    ddim0 = RowGroup.start(tiny_model, 1, 0, "ddim", 10, 0.0)
    ddim1 = RowGroup.start(tiny_model, 1, 0, "ddim", 10, 1.0)
    ddpm = RowGroup.start(tiny_model, 1, 0, "ddpm", 10, spacing="leading")
    unipc = RowGroup.start(tiny_model, 1, 0, "unipc", 10)
    sde = RowGroup.start(tiny_model, 1, 0, "dpmpp_2m_sde", 10)
    assert not ddim0.draws_noise and ddim1.draws_noise and ddpm.draws_noise and sde.draws_noise
    assert not unipc.draws_noise
    ddpm.index = ddpm.total - 1  # the last leading step is t = 0: no z, as diffusers
    assert ddpm.t == 0 and not ddpm.draws_noise
    sde.index = sde.total - 1  # into σ = 0: no z
    assert not sde.draws_noise
    states = [g.generators[0].get_state() for g in (ddim0, unipc)]
    batched_step(tiny_model, [ddim0, ddpm, unipc])
    assert all(torch.equal(g.generators[0].get_state(), s) for g, s in zip((ddim0, unipc), states, strict=True))
    assert ddpm.done and ddpm.remaining == 0


def test_x_T_comes_first_from_each_rows_generator(tiny_model: DiffusionModel) -> None:
    g = RowGroup.start(tiny_model, 3, 42, "ddpm", 5, spacing="trailing")
    for r in range(3):
        torch.testing.assert_close(g.x[r], torch.randn((1, 8, 8), generator=row_generator(42, r)), atol=0, rtol=0)
    assert g.plan.timesteps == (999, 799, 599, 399, 199)


def test_sampler_state_is_bounded_per_row(tiny_model: DiffusionModel) -> None:
    """Multistep state: (order − 1) x̂_0 for DPM-Solver++, x and `order` x̂_0 for UniPC, float32, per row."""
    image = 1 * 8 * 8 * 4  # bytes of one float32 image of the tiny model
    expected = {"ddpm": 0, "ddim": 0, "dpmpp_2m": 1, "dpmpp_3m": 2, "dpmpp_2m_sde": 1, "unipc": 3}
    for name, slots in expected.items():
        g = RowGroup.start(tiny_model, 3, 0, name, 10)
        assert g.state_bytes == 3 * slots * image
        _advance(tiny_model, g, 3)
        assert g.state_bytes == 3 * slots * image  # does not grow with the steps taken
