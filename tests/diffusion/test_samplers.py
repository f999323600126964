"""DDPM / respaced DDPM / DDIM updates against diffusers' schedulers (test-only oracle), tolerance 1e-5.

diffusers keeps its tables in float32 and forms 1 - ᾱ_t/ᾱ_{t_prev} and 1 - ᾱ from them, which costs
it three to four significant digits near t = 0 (errors up to ~3e-4 against float64). Our samplers
form those from log ᾱ in float64 (see ``samplers._StepAlphas``). So the oracle is diffusers' own
``step`` code with its tables promoted to float64 (:func:`_float64`), fed float64 inputs; the stock
float32 scheduler is compared too, within its own rounding error.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from service.diffusion.samplers import ddim_step, ddpm_step, make_noise, row_generator, timesteps
from service.diffusion.schedule import NoiseSchedule

T = 1000
SHAPE = (3, 2, 5, 5)
TOL = {"rtol": 0, "atol": 1e-5}
# x̂_0 = (x_t - √(1-ᾱ_t) ε)/√ᾱ_t divides float32 rounding of the numerator by √ᾱ_999 ≈ 6e-3
X0_TOL = {"rtol": 1e-4, "atol": 1e-5}


@pytest.fixture(scope="module")
def sched() -> NoiseSchedule:
    return NoiseSchedule.create("linear", T)


def _state(t: int, seed: int = 0, model_error: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A realistic (x_t, ε_θ, z): x_t from data in [-1, 1], ε_θ = true noise + error (so clipping matters)."""
    gen = torch.Generator().manual_seed(seed * 10_000 + t)
    x0 = torch.rand(SHAPE, generator=gen) * 2 - 1
    eps_true = torch.randn(SHAPE, generator=gen)
    abar = NoiseSchedule.create("linear", T).alphas_cumprod[t]
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps_true
    eps = eps_true + model_error * torch.randn(SHAPE, generator=gen)
    return x_t, eps, torch.randn(SHAPE, generator=gen)


def _float64(ref: DDPMScheduler | DDIMScheduler) -> DDPMScheduler | DDIMScheduler:
    """Promote a diffusers scheduler's tables to float64 (same formulas, recomputed from float64 betas)."""
    ref.betas = ref.betas.double()
    ref.alphas = 1.0 - ref.betas
    ref.alphas_cumprod = torch.cumprod(ref.alphas, dim=0)
    ref.one = torch.tensor(1.0, dtype=torch.float64)
    if isinstance(ref, DDIMScheduler):
        ref.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    return ref


def _diffusers_noise(seed: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Generator]:
    """The noise diffusers' DDPMScheduler.step draws from ``Generator().manual_seed(seed)``, and that generator."""
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return noise, torch.Generator().manual_seed(seed)


def _ddpm_refs(variance_type: str, clip: bool, custom: list[int] | None = None) -> list[DDPMScheduler]:
    refs = [DDPMScheduler(num_train_timesteps=T, variance_type=variance_type, clip_sample=clip) for _ in range(2)]
    if custom is not None:
        for r in refs:
            r.set_timesteps(timesteps=custom)
    _float64(refs[1])
    return refs


def _full(v: int) -> torch.Tensor:
    return torch.full((SHAPE[0],), v, dtype=torch.long)


@pytest.mark.parametrize("t", [0, 3, 500, 999])
def test_q_sample_equals_diffusers_add_noise(sched: NoiseSchedule, t: int) -> None:
    ref = DDPMScheduler(num_train_timesteps=T)
    x0, eps, _ = _state(t)
    tt = torch.tensor([t, 0, 999])  # per row
    torch.testing.assert_close(sched.q_sample(x0, tt, eps), ref.add_noise(x0, eps, tt), **TOL)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("t", [999, 700, 250, 20, 1, 0])
def test_ddpm_step_equals_diffusers(sched: NoiseSchedule, variance_type: str, clip: bool, t: int) -> None:
    ref32, ref64 = _ddpm_refs(variance_type, clip)
    x_t, eps, _ = _state(t)
    # float64 oracle (same noise numbers, drawn in float64 as diffusers does for float64 inputs)
    noise64, gen = _diffusers_noise(t, torch.float64)
    out = ddpm_step(sched, x_t, eps, _full(t), _full(t - 1), noise64.float(), variance_type, clip)  # type: ignore[arg-type]
    expected = ref64.step(eps.double(), t, x_t.double(), generator=gen)
    torch.testing.assert_close(out.prev_sample.double(), expected.prev_sample, **TOL)
    torch.testing.assert_close(out.pred_x0.double(), expected.pred_original_sample, **X0_TOL)
    # the stock float32 scheduler, within its float32 rounding (largest near t = 0)
    noise32, gen = _diffusers_noise(t)
    out32 = ddpm_step(sched, x_t, eps, _full(t), _full(t - 1), noise32, variance_type, clip)  # type: ignore[arg-type]
    torch.testing.assert_close(out32.prev_sample, ref32.step(eps, t, x_t, generator=gen).prev_sample, rtol=0, atol=1e-4)
    if clip:
        assert out.pred_x0.abs().max() <= 1.0
    elif t > 500:
        assert out.pred_x0.abs().max() > 1.0  # the unclipped case really differs from the clipped one


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("steps", [10, 37])
def test_respaced_ddpm_equals_diffusers_custom_timesteps(sched: NoiseSchedule, variance_type: str, steps: int) -> None:
    """Respaced betas β'_t = 1 - ᾱ_t/ᾱ_{t_prev} (Nichol & Dhariwal 2021) vs DDPMScheduler(timesteps=...).

    Documented difference: on the last respaced step (t > 0, t_prev = -1) diffusers still adds
    √β'_t z with β'_t = 1 - ᾱ_t for ``fixed_large`` (and √1e-20 z for ``fixed_small``); we add no
    noise into clean data. Every other step is equal.
    """
    seq = timesteps(T, steps)
    ref32, ref64 = _ddpm_refs(variance_type, True, seq)
    assert ref64.timesteps.tolist() == seq
    for i, t in enumerate(seq):
        t_prev = seq[i + 1] if i + 1 < len(seq) else -1
        x_t, eps, _ = _state(t, seed=steps)
        noise, gen = _diffusers_noise(t, torch.float64)
        out = ddpm_step(sched, x_t, eps, _full(t), _full(t_prev), noise.float(), variance_type).prev_sample  # type: ignore[arg-type]
        expected = ref64.step(eps.double(), t, x_t.double(), generator=gen).prev_sample
        noise32, gen = _diffusers_noise(t)
        out32 = ddpm_step(sched, x_t, eps, _full(t), _full(t_prev), noise32, variance_type).prev_sample  # type: ignore[arg-type]
        expected32 = ref32.step(eps, t, x_t, generator=gen).prev_sample
        if t_prev < 0:
            # the documented difference, exactly: diffusers' extra noise term into clean data
            assert t > 0
            sigma = (1 - sched.alphas_cumprod[t]).sqrt() if variance_type == "fixed_large" else 1e-10
            out, out32 = out + sigma * noise, out32 + sigma * noise32
        torch.testing.assert_close(out.double(), expected, **TOL)
        torch.testing.assert_close(out32, expected32, rtol=0, atol=1e-4)


def test_trailing_timesteps_equal_diffusers_spacing() -> None:
    for steps in (1, 7, 10, 37, 50, 100, 999, 1000):
        seq = timesteps(T, steps)
        assert len(seq) == steps and seq[0] == T - 1 and seq == sorted(set(seq), reverse=True)
        ddpm = DDPMScheduler(num_train_timesteps=T, timestep_spacing="trailing")
        ddpm.set_timesteps(steps)
        assert ddpm.timesteps.tolist() == seq
        if T % steps == 0:
            ddim = DDIMScheduler(num_train_timesteps=T, timestep_spacing="trailing")
            ddim.set_timesteps(steps)
            assert ddim.timesteps.tolist() == seq
    assert timesteps(T, T) == list(range(T - 1, -1, -1))
    with pytest.raises(ValueError):
        timesteps(T, 0)
    with pytest.raises(ValueError):
        timesteps(T, T + 1)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("steps", [10, 50])
def test_ddim_step_equals_diffusers(sched: NoiseSchedule, eta: float, clip: bool, steps: int) -> None:
    ref32, ref64 = (
        DDIMScheduler(num_train_timesteps=T, timestep_spacing="trailing", clip_sample=clip, set_alpha_to_one=True)
        for _ in range(2)
    )
    _float64(ref64)
    seq = timesteps(T, steps)
    for ref in (ref32, ref64):
        ref.set_timesteps(steps)
        assert ref.timesteps.tolist() == seq
    for i, t in enumerate(seq):
        t_prev = seq[i + 1] if i + 1 < len(seq) else -1
        x_t, eps, noise = _state(t, seed=3)
        out = ddim_step(sched, x_t, eps, _full(t), _full(t_prev), eta, noise, clip)
        expected = ref64.step(eps.double(), t, x_t.double(), eta=eta, variance_noise=noise.double())
        torch.testing.assert_close(out.prev_sample.double(), expected.prev_sample, **TOL)
        torch.testing.assert_close(out.pred_x0.double(), expected.pred_original_sample, **X0_TOL)
        stock = ref32.step(eps, t, x_t, eta=eta, variance_noise=noise).prev_sample
        torch.testing.assert_close(out.prev_sample, stock, rtol=0, atol=1e-4)


def test_ddim_eta0_is_deterministic_and_ignores_noise(sched: NoiseSchedule) -> None:
    x_t, eps, noise = _state(500)
    a = ddim_step(sched, x_t, eps, _full(500), _full(400), 0.0, noise).prev_sample
    b = ddim_step(sched, x_t, eps, _full(500), _full(400), 0.0, None).prev_sample
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_ddim_eta1_without_clipping_is_respaced_ddpm_fixed_small(sched: NoiseSchedule) -> None:
    # Song et al. 2021, section 4.1: η = 1 makes the DDIM update the DDPM posterior (σ² = β̃').
    for t, t_prev in ((999, 899), (500, 499), (120, 20)):
        x_t, eps, noise = _state(t)
        a = ddim_step(sched, x_t, eps, _full(t), _full(t_prev), 1.0, noise, clip_sample=False).prev_sample
        b = ddpm_step(sched, x_t, eps, _full(t), _full(t_prev), noise, "fixed_small", clip_sample=False).prev_sample
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_mixed_batch_equals_each_row_alone(sched: NoiseSchedule) -> None:
    """Rows at different t, from different samplers and step counts, stepped in one batch."""
    # (sampler, t, t_prev, eta, variance_type): DDPM-1000, DDIM-10, respaced DDPM-50, DDIM-50 η=0.5, last steps
    rows = [
        ("ddpm", 999, 998, 0.0, "fixed_small"),
        ("ddim", 899, 799, 0.0, "fixed_small"),
        ("ddpm", 519, 499, 0.0, "fixed_large"),
        ("ddim", 59, 39, 0.5, "fixed_small"),
        ("ddim", 99, -1, 1.0, "fixed_small"),
        ("ddpm", 0, -1, 0.0, "fixed_small"),
    ]
    n = len(rows)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(n, 1, 4, 4, generator=gen)
    eps = torch.randn(n, 1, 4, 4, generator=gen)
    noise = torch.randn(n, 1, 4, 4, generator=gen)
    t = torch.tensor([r[1] for r in rows])
    t_prev = torch.tensor([r[2] for r in rows])
    eta = torch.tensor([r[3] for r in rows])
    is_ddpm = torch.tensor([r[0] == "ddpm" for r in rows])[:, None, None, None]
    is_large = torch.tensor([r[4] == "fixed_large" for r in rows])[:, None, None, None]
    # what an engine does: every update over the whole batch, then pick each row's own
    small = ddpm_step(sched, x, eps, t, t_prev, noise, "fixed_small").prev_sample
    large = ddpm_step(sched, x, eps, t, t_prev, noise, "fixed_large").prev_sample
    ddim = ddim_step(sched, x, eps, t, t_prev, eta, noise).prev_sample
    batch = torch.where(is_ddpm, torch.where(is_large, large, small), ddim)
    for i, (kind, ti, tpi, etai, vt) in enumerate(rows):
        sl = slice(i, i + 1)
        args = (x[sl], eps[sl], torch.tensor([ti]), torch.tensor([tpi]))
        if kind == "ddpm":
            alone = ddpm_step(sched, *args, noise[sl], vt).prev_sample  # type: ignore[arg-type]
        else:
            alone = ddim_step(sched, *args, etai, noise[sl]).prev_sample
        torch.testing.assert_close(batch[sl], alone, rtol=0, atol=0)
    # rows stepping into clean data get no noise
    torch.testing.assert_close(small[5:], ddpm_step(sched, x, eps, t, t_prev, None, "fixed_small").prev_sample[5:])


def test_unknown_variance_type_is_rejected(sched: NoiseSchedule) -> None:
    x_t, eps, noise = _state(10)
    with pytest.raises(ValueError, match="variance"):
        ddpm_step(sched, x_t, eps, _full(10), _full(9), noise, "learned")  # type: ignore[arg-type]


def test_row_noise_does_not_depend_on_the_batch() -> None:
    a = make_noise((3, 1, 4, 4), [row_generator(42, r) for r in range(3)])
    b = make_noise((1, 1, 4, 4), [row_generator(42, 1)])
    torch.testing.assert_close(a[1:2], b, rtol=0, atol=0)
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(a[0], make_noise((1, 1, 4, 4), [row_generator(43, 0)])[0])
    # a row's second draw (its first z) continues its own stream
    g = row_generator(42, 2)
    make_noise((1, 1, 4, 4), [g])
    second = make_noise((1, 1, 4, 4), [g])
    gens = [row_generator(42, r) for r in range(3)]
    make_noise((3, 1, 4, 4), gens)
    torch.testing.assert_close(make_noise((3, 1, 4, 4), gens)[2:], second, rtol=0, atol=0)
