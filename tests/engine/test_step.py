"""batched_step: rows at different timesteps, samplers and step counts share one forward exactly."""

from __future__ import annotations

import copy

import torch

from service.diffusion.checkpoint import DiffusionModel
from service.diffusion.samplers import ddim_step, ddpm_step
from service.engine.step import RowGroup, batched_step


def _groups(model: DiffusionModel) -> list[RowGroup]:
    """Four requests part-way through their own sequences: DDPM-1000, DDPM-50 (respaced), DDIM-20 η=0 and η=1."""
    specs = [("ddpm", 1000, 0.0, 2, 417), ("ddpm", 50, 0.0, 1, 49), ("ddim", 20, 0.0, 3, 7), ("ddim", 20, 1.0, 2, 0)]
    groups = []
    for seed, (sampler, steps, eta, n, index) in enumerate(specs):
        g = RowGroup.start(model, n, seed, sampler, steps, eta)  # type: ignore[arg-type]
        g.index = index
        g.x = torch.randn(g.x.shape, generator=torch.Generator().manual_seed(100 + seed))
        groups.append(g)
    return groups


def _clone(g: RowGroup) -> RowGroup:
    c = copy.copy(g)
    c.generators = [torch.Generator().set_state(gen.get_state()) for gen in g.generators]
    return c


def _oracle_row(model: DiffusionModel, g: RowGroup, row: int) -> torch.Tensor:
    """One row alone, straight from the sampler functions: its own forward and its own generator."""
    x = g.x[row : row + 1]
    t, t_prev = torch.tensor([g.t]), torch.tensor([g.t_prev])
    with torch.no_grad():
        eps = model.unet(x, t)
    gen = torch.Generator().set_state(g.generators[row].get_state())
    noise = torch.randn(x.shape[1:], generator=gen)[None] if g.draws_noise else None
    spec = model.spec
    if g.sampler == "ddpm":
        out = ddpm_step(model.schedule, x, eps, t, t_prev, noise, spec.variance_type, spec.clip_sample)
    else:
        out = ddim_step(model.schedule, x, eps, t, t_prev, g.eta, noise, spec.clip_sample)
    return out.prev_sample[0]


def test_rows_at_different_t_in_one_forward_equal_each_row_alone(tiny_model: DiffusionModel) -> None:
    groups = _groups(tiny_model)
    assert len({g.t for g in groups}) == len(groups)  # really different timesteps
    expected = [torch.stack([_oracle_row(tiny_model, g, r) for r in range(g.rows)]) for g in groups]
    mixed = [_clone(g) for g in groups]
    batched_step(tiny_model, mixed)
    for g, m, exp in zip(groups, mixed, expected, strict=True):
        assert m.index == g.index + 1
        torch.testing.assert_close(m.x, exp, atol=1e-5, rtol=0)
        assert not torch.equal(m.x, g.x)
    # each group alone through the engine's own step gives the same rows too
    for g, m in zip(groups, mixed, strict=True):
        alone = _clone(g)
        batched_step(tiny_model, [alone])
        torch.testing.assert_close(alone.x, m.x, atol=1e-5, rtol=0)


def test_noise_is_drawn_only_on_stochastic_steps(tiny_model: DiffusionModel) -> None:
    ddim0 = RowGroup.start(tiny_model, 1, 0, "ddim", 10, 0.0)
    ddim1 = RowGroup.start(tiny_model, 1, 0, "ddim", 10, 1.0)
    ddpm = RowGroup.start(tiny_model, 1, 0, "ddpm", 10)
    assert not ddim0.draws_noise and ddim1.draws_noise and ddpm.draws_noise
    ddpm.index = ddpm.total - 1  # last step goes into clean data: no z
    assert ddpm.t_prev == -1 and not ddpm.draws_noise
    state = ddim0.generators[0].get_state()
    batched_step(tiny_model, [ddim0, ddpm])
    assert torch.equal(ddim0.generators[0].get_state(), state)
    assert ddpm.done and ddpm.remaining == 0


def test_x_T_comes_first_from_each_rows_generator(tiny_model: DiffusionModel) -> None:
    from service.diffusion.samplers import row_generator

    g = RowGroup.start(tiny_model, 3, 42, "ddpm", 5)
    for r in range(3):
        torch.testing.assert_close(g.x[r], torch.randn((1, 8, 8), generator=row_generator(42, r)), atol=0, rtol=0)
    assert g.seq == [999, 799, 599, 399, 199]
