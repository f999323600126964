"""Every sampler against diffusers' scheduler of its family (test-only oracle), whole sequences, tolerance 1e-5.

Both sides run the same model — an analytic ε_θ(x, t) — from the same x_T with the same noise, and every
step's output is compared. diffusers keeps ᾱ in float32, which costs 1 − ᾱ three to four significant
digits near t = 0 (errors up to ~3e-4); our plans form their coefficients from float64 ᾱ. So the oracle is
diffusers' own code with its tables recomputed in float64 from the same float32 betas (:func:`float64_tables`),
fed float64 inputs; the stock float32 schedulers are compared too, within their own rounding.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

from service.diffusion.samplers import Rows, SamplerOptions, get_sampler
from service.diffusion.samplers.spacing import discrete_timesteps
from service.diffusion.schedule import NoiseSchedule

T = 1000
SHAPE = (2, 1, 5, 5)
TOL = {"rtol": 0, "atol": 1e-5}
STEPS = [5, 10, 20, 50]
SCHEDULE = NoiseSchedule.create("linear", T)
ABAR = SCHEDULE.alphas_cumprod_f64()
X0 = torch.linspace(-0.9, 0.9, math.prod(SHAPE[1:]), dtype=torch.float64).reshape(SHAPE[1:])  # the "data"


def model_eps(x: torch.Tensor, t: int) -> torch.Tensor:
    """ε_θ(x, t): the exact ε for data X0, plus a smooth nonlinear error so the solvers' orders matter."""
    abar = ABAR[t].to(x.dtype)
    return (x - abar.sqrt() * X0.to(x.dtype)) / (1 - abar).sqrt() + 0.3 * torch.tanh(2 * x) * math.sin(t / 150)


def float64_tables(s):
    """A diffusers scheduler with its tables recomputed in float64 from its float32 betas (set_timesteps after)."""
    s.betas = s.betas.double()
    s.alphas = 1.0 - s.betas
    s.alphas_cumprod = torch.cumprod(s.alphas, dim=0)
    if hasattr(s, "lambda_t"):  # DPM-Solver / UniPC
        s.alpha_t, s.sigma_t = s.alphas_cumprod.sqrt(), (1 - s.alphas_cumprod).sqrt()
        s.lambda_t = s.alpha_t.log() - s.sigma_t.log()
        s.sigmas = ((1 - s.alphas_cumprod) / s.alphas_cumprod) ** 0.5
    if hasattr(s, "one"):
        s.one = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(s, "final_alpha_cumprod"):
        one = torch.tensor(1.0, dtype=torch.float64)
        s.final_alpha_cumprod = one if s.config.set_alpha_to_one else s.alphas_cumprod[0]
    return s


def noises(steps: int, dtype: torch.dtype) -> list[torch.Tensor]:
    return [torch.randn(SHAPE, generator=torch.Generator().manual_seed(100 + i), dtype=dtype) for i in range(steps)]


def x_T(dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(7), dtype=dtype)


def run_ours(name: str, steps: int, spacing: str, options: SamplerOptions, dtype: torch.dtype,
             eta: float = 0.0) -> tuple[list[int], list[torch.Tensor]]:
    """(timesteps, x after every step) of our sampler, its noise z_i = noises()[i] where it draws any."""
    sampler = get_sampler(name)
    plan = sampler.plan(SCHEDULE, steps, spacing, options)  # type: ignore[arg-type]
    x, zs = x_T(dtype), noises(steps, dtype)
    hist = torch.zeros(SHAPE[0], sampler.history_slots, *SHAPE[1:], dtype=dtype) if sampler.history_slots else None
    out = []
    for i, t in enumerate(plan.timesteps):
        z = zs[i] if sampler.draws_noise(plan, i, eta) else torch.zeros_like(x)
        step = sampler.step(Rows(x, model_eps(x, t), z, hist, [plan], [i], [eta], [SHAPE[0]]))
        x, hist = step.prev_sample, step.history
        out.append(x)
    return list(plan.timesteps), out


def run_diffusers(s, steps: int, dtype: torch.dtype, eta: float | None = None) -> tuple[list[int], list[torch.Tensor]]:
    """diffusers' pipeline loop (predict ε, ``scheduler.step``) with the same noise: (timesteps, x after every step)."""
    s.set_timesteps(steps)
    x, zs = x_T(dtype), noises(steps, dtype)
    out = []
    for i, t in enumerate(s.timesteps):
        eps = model_eps(x, int(t))
        if isinstance(s, DDPMScheduler):  # draws its z from the generator: the same numbers as zs[i]
            x = s.step(eps, t, x, generator=torch.Generator().manual_seed(100 + i)).prev_sample
        elif isinstance(s, UniPCMultistepScheduler):
            x = s.step(eps, t, x).prev_sample
        elif isinstance(s, DDIMScheduler):
            x = s.step(eps, t, x, eta=eta, variance_noise=zs[i]).prev_sample
        else:
            x = s.step(eps, t, x, variance_noise=zs[i]).prev_sample
        out.append(x)
    return s.timesteps.tolist(), out


def assert_same_sequence(ours: tuple[list[int], list[torch.Tensor]], ref: tuple[list[int], list[torch.Tensor]],
                         **tol: float) -> None:
    assert ours[0] == ref[0], "timesteps differ"
    for i, (a, b) in enumerate(zip(ours[1], ref[1], strict=True)):
        torch.testing.assert_close(a.to(b.dtype), b, msg=lambda m, i=i: f"step {i}: {m}", **(tol or TOL))


SPACING_KW = {
    "linspace": {"timestep_spacing": "linspace"},
    "leading": {"timestep_spacing": "leading", "steps_offset": 1},
    "trailing": {"timestep_spacing": "trailing"},
    "karras": {"use_karras_sigmas": True},
    "logsnr": {"use_lu_lambdas": True},
}


def _options(spacing: str, **kw: object) -> SamplerOptions:
    return SamplerOptions(steps_offset=1 if spacing == "leading" else 0, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing", "karras", "logsnr"])
@pytest.mark.parametrize(("name", "order", "algorithm"), [
    ("dpmpp_2m", 2, "dpmsolver++"), ("dpmpp_3m", 3, "dpmsolver++"), ("dpmpp_2m_sde", 2, "sde-dpmsolver++"),
])
def test_dpm_solver_pp_equals_diffusers(name: str, order: int, algorithm: str, spacing: str, steps: int) -> None:
    kw = {"num_train_timesteps": T, "solver_order": order, "algorithm_type": algorithm, **SPACING_KW[spacing]}
    ref = float64_tables(DPMSolverMultistepScheduler(**kw))
    ours = run_ours(name, steps, spacing, _options(spacing), torch.float64)
    assert_same_sequence(ours, run_diffusers(ref, steps, torch.float64))
    if steps == 10:  # the stock float32 scheduler, within its rounding
        stock = run_diffusers(DPMSolverMultistepScheduler(**kw), steps, torch.float32)
        assert_same_sequence(run_ours(name, steps, spacing, _options(spacing), torch.float32), stock, rtol=0, atol=2e-4)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing", "karras"])
def test_unipc_bh2_equals_diffusers(spacing: str, steps: int) -> None:
    kw = {"num_train_timesteps": T, "solver_order": 2, "solver_type": "bh2", **SPACING_KW[spacing]}
    ref = float64_tables(UniPCMultistepScheduler(**kw))
    assert_same_sequence(run_ours("unipc", steps, spacing, _options(spacing), torch.float64),
                         run_diffusers(ref, steps, torch.float64))


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_ddpm_equals_diffusers(variance_type: str, spacing: str, steps: int) -> None:
    kw = {"num_train_timesteps": T, "variance_type": variance_type, **SPACING_KW[spacing]}
    ref = float64_tables(DDPMScheduler(**kw))
    options = _options(spacing, variance_type=variance_type)
    ours = run_ours("ddpm", steps, spacing, options, torch.float64)
    assert_same_sequence(ours, run_diffusers(ref, steps, torch.float64))


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize(("eta", "clip", "alpha_one"), [(0.0, True, True), (0.5, True, False), (1.0, False, True)])
def test_ddim_equals_diffusers(eta: float, clip: bool, alpha_one: bool, spacing: str, steps: int) -> None:
    kw = {"num_train_timesteps": T, "clip_sample": clip, "set_alpha_to_one": alpha_one, **SPACING_KW[spacing]}
    ref = float64_tables(DDIMScheduler(**kw))
    options = _options(spacing, clip_sample=clip, set_alpha_to_one=alpha_one)
    ours = run_ours("ddim", steps, spacing, options, torch.float64, eta=eta)
    assert_same_sequence(ours, run_diffusers(ref, steps, torch.float64, eta=eta))


def test_full_chain_ddpm_in_float32_equals_the_stock_scheduler() -> None:
    ours = run_ours("ddpm", T, "leading", SamplerOptions(), torch.float32)
    assert_same_sequence(ours, run_diffusers(DDPMScheduler(num_train_timesteps=T), T, torch.float32), rtol=0, atol=1e-4)


@pytest.mark.parametrize("solver", [True, False])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_discrete_spacings_equal_diffusers_for_every_step_count(spacing: str, solver: bool) -> None:
    cls = DPMSolverMultistepScheduler if solver else DDIMScheduler
    for steps in (1, 2, 3, 7, 15, 37, 100, 999):
        ref = cls(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
        ref.set_timesteps(steps)
        ours = discrete_timesteps(T, steps, spacing, 1 if spacing == "leading" else 0, solver=solver)  # type: ignore[arg-type]
        assert ours.tolist() == ref.timesteps.tolist(), (spacing, steps)


def test_trailing_starts_at_pure_noise_and_covers_the_full_chain() -> None:
    assert discrete_timesteps(T, T, "trailing").tolist() == list(range(T - 1, -1, -1))
    for steps in (1, 10, 37):
        assert discrete_timesteps(T, steps, "trailing")[0] == T - 1


def test_karras_and_logsnr_levels_follow_their_formulas() -> None:
    options = SamplerOptions()
    sigma = lambda abar: np.sqrt((1 - np.array(abar)) / np.array(abar))  # noqa: E731
    karras = get_sampler("dpmpp_2m").plan(SCHEDULE, 10, "karras", options)
    s = sigma(karras.alphas_cumprod)
    lo, hi = sigma(ABAR[0].item()), sigma(ABAR[-1].item())
    expected = (hi ** (1 / 7) + np.linspace(0, 1, 10) * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7  # Karras et al. eq. 5
    np.testing.assert_allclose(s, expected, rtol=1e-12)
    logsnr = get_sampler("unipc").plan(SCHEDULE, 10, "logsnr", options)
    log_s = np.log(sigma(logsnr.alphas_cumprod))
    np.testing.assert_allclose(np.diff(log_s), np.full(9, (np.log(lo) - np.log(hi)) / 9), rtol=1e-10)
    for plan in (karras, logsnr):  # the solver's levels end at σ = 0; the UNet gets the nearest training steps
        assert plan.alphas_cumprod_next[-1] == 1.0
        assert list(plan.timesteps) == sorted(plan.timesteps, reverse=True)
        assert plan.timesteps[0] == T - 1 and plan.timesteps[-1] == 0


def test_ddim_eta1_without_clipping_is_respaced_ddpm_fixed_small() -> None:
    # Song et al. 2021, section 4.1: η = 1 makes the DDIM update the DDPM posterior (σ² = β̃').
    options = SamplerOptions(clip_sample=False)
    ddim = run_ours("ddim", 10, "trailing", options, torch.float64, eta=1.0)
    ddpm = run_ours("ddpm", 10, "trailing", options, torch.float64)
    assert_same_sequence(ddim, ddpm, rtol=1e-9, atol=1e-9)


def test_ddim_eta0_draws_no_noise_and_dpm_sde_none_into_clean_data() -> None:
    for name, eta in (("ddim", 0.0), ("dpmpp_2m", 0.0), ("unipc", 0.0)):
        s = get_sampler(name)
        plan = s.plan(SCHEDULE, 10, s.default_spacing, SamplerOptions())
        assert not any(s.draws_noise(plan, i, eta) for i in range(10))
    sde = get_sampler("dpmpp_2m_sde")
    plan = sde.plan(SCHEDULE, 10, "linspace", SamplerOptions())
    assert [sde.draws_noise(plan, i, 0.0) for i in range(10)] == [True] * 9 + [False]


@pytest.mark.parametrize(("name", "spacing", "steps", "message"), [
    ("ddim", "karras", 10, "does not support"),
    ("ddpm", "linspace", 0, "steps must be in 1..1000"),
    ("dpmpp_2m", "linspace", 1000, "steps must be in 1..999"),
    ("unipc", "sideways", 10, "does not support"),
])
def test_unrunnable_requests_are_refused(name: str, spacing: str, steps: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        get_sampler(name).plan(SCHEDULE, steps, spacing, SamplerOptions())  # type: ignore[arg-type]


def test_unknown_sampler_and_variance_type_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown sampler 'euler'; expected one of ddpm, ddim, dpmpp_2m"):
        get_sampler("euler")
    with pytest.raises(ValueError, match="variance"):
        run_ours("ddpm", 5, "leading", SamplerOptions(variance_type="learned"), torch.float64)  # type: ignore[arg-type]
