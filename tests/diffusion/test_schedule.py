"""The seed's closed forms (DDPM, Ho et al. 2020) against independent float64 oracles and Monte Carlo."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from service.diffusion.schedule import NoiseSchedule, extract, make_betas

T = 1000


@pytest.fixture(scope="module")
def sched() -> NoiseSchedule:
    return NoiseSchedule.create("linear", T, 1e-4, 0.02)


def _abar64(t: int) -> float:
    """ᾱ_t of the linear schedule by hand, in float64 (ᾱ_{-1} = 1)."""
    betas = [1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)]
    return math.prod(1.0 - b for b in betas[: t + 1])


def _beta64(t: int) -> float:
    return 1e-4 + (0.02 - 1e-4) * t / (T - 1)


def test_linear_schedule_is_1e4_to_0_02_not_the_typo(sched: NoiseSchedule) -> None:
    # The source note's 0.002 is a typo for 0.02 (DDPM section 4): ᾱ_T must be ~4e-5 (nearly pure noise).
    assert sched.betas[0].item() == pytest.approx(1e-4, rel=1e-6)
    assert sched.betas[-1].item() == pytest.approx(0.02, rel=1e-6)
    assert sched.alphas_cumprod[-1].item() == pytest.approx(_abar64(T - 1), rel=1e-5)
    assert sched.alphas_cumprod[-1].item() < 1e-4
    assert all(v.dtype == torch.float32 for v in vars(sched).values())


@pytest.mark.parametrize("t", [0, 1, 10, 487, 998, 999])
def test_tables_equal_hand_computed_float64(sched: NoiseSchedule, t: int) -> None:
    abar, abar_prev, beta = _abar64(t), (_abar64(t - 1) if t > 0 else 1.0), _beta64(t)
    assert sched.alphas_cumprod[t].item() == pytest.approx(abar, rel=2e-6)
    assert sched.alphas_cumprod_prev[t].item() == pytest.approx(abar_prev, rel=2e-6)
    assert sched.posterior_variance[t].item() == pytest.approx(beta * (1 - abar_prev) / (1 - abar), rel=2e-6, abs=1e-30)
    assert sched.posterior_mean_coef1[t].item() == pytest.approx(beta * math.sqrt(abar_prev) / (1 - abar), rel=2e-6)
    assert sched.posterior_mean_coef2[t].item() == pytest.approx(
        (1 - abar_prev) * math.sqrt(1 - beta) / (1 - abar), rel=2e-6, abs=1e-30
    )


def test_pinned_posterior_variances(sched: NoiseSchedule) -> None:
    # The values diffusers pins for the linear schedule (tests/schedulers/test_scheduler_ddpm.py).
    var = sched.variance(torch.tensor([0, 487, 999]), "fixed_small", 1)
    assert var[0].item() == 0.0
    assert var[1].item() == pytest.approx(0.00979, abs=1e-5)
    assert var[2].item() == pytest.approx(0.02, abs=1e-5)
    large = sched.variance(torch.tensor([0, 487, 999]), "fixed_large", 1)
    assert large.tolist() == pytest.approx([1e-4, _beta64(487), 0.02], rel=1e-6)


def test_cosine_schedule_matches_the_formula_and_diffusers() -> None:
    from diffusers import DDPMScheduler

    s = NoiseSchedule.create("cosine", T)
    f = [math.cos((i / T + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(T + 1)]
    # ᾱ_t = f(t+1)/f(0) wherever β was not clipped at 0.999 (only the very last steps are).
    for t in (0, 10, 500, 900):
        assert s.alphas_cumprod[t].item() == pytest.approx(f[t + 1] / f[0], rel=1e-5)
    assert s.betas.max().item() == pytest.approx(0.999, rel=1e-6)
    ref = DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2")
    torch.testing.assert_close(s.betas, ref.betas, rtol=1e-6, atol=1e-7)


def test_make_betas_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown beta schedule"):
        make_betas("quadratic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_timesteps"):
        make_betas("linear", 0)
    with pytest.raises(ValueError, match="betas"):
        NoiseSchedule.from_betas(torch.tensor([0.1, 1.5]))


def test_extract_gathers_per_row_and_broadcasts() -> None:
    table = torch.arange(10.0)
    out = extract(table, torch.tensor([3, 0, 9]), 4)
    assert out.shape == (3, 1, 1, 1)
    assert out.flatten().tolist() == [3.0, 0.0, 9.0]


def test_forward_chain_matches_one_shot_q_sample_monte_carlo(sched: NoiseSchedule) -> None:
    """Iterate x_t = √α_t x_{t-1} + √(1-α_t) z (eq. 2) from a fixed x0 and compare with eq. (4).

    N = 20,000 chains per coordinate. Tolerance: 5 standard errors, where SE(mean) = √(σ²/N) and
    SE(variance) = σ² √(2/(N-1)) for a Gaussian (a false alarm has probability below 1e-5 per check).
    """
    n = 20_000
    x0 = np.array([-1.0, -0.3, 0.4, 1.0], dtype=np.float32)
    rng = np.random.default_rng(1234)
    x = np.repeat(x0[None], n, axis=0)
    check_at = {0, 9, 99, 499, 999}
    alphas = sched.alphas.double().numpy()  # coefficients in float64; the chain in float32 numpy (single-threaded)
    z = np.empty_like(x)
    for t in range(T):
        rng.standard_normal(out=z, dtype=np.float32)
        x *= np.float32(math.sqrt(alphas[t]))
        x += np.float32(math.sqrt(1 - alphas[t])) * z
        if t not in check_at:
            continue
        tt = torch.full((1,), t)
        # q_sample with zero noise is the mean √ᾱ_t x0; with x0 = 0, unit noise it is the std √(1-ᾱ_t).
        mean = sched.q_sample(torch.from_numpy(x0)[None], tt, torch.zeros(1, 4)).double()[0].numpy()
        var = sched.q_sample(torch.zeros(1, 4), tt, torch.ones(1, 4)).double()[0].numpy() ** 2
        se_mean = np.sqrt(var / n)
        se_var = var * math.sqrt(2 / (n - 1))
        emp_mean, emp_var = x.mean(0, dtype=np.float64), x.var(0, dtype=np.float64, ddof=1)
        assert (np.abs(emp_mean - mean) < 5 * se_mean).all(), (t, emp_mean, mean)
        assert (np.abs(emp_var - var) < 5 * se_var).all(), (t, emp_var, var)


def test_q_sample_is_per_row(sched: NoiseSchedule) -> None:
    x0, eps = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t = torch.tensor([0, 500, 999])
    out = sched.q_sample(x0, t, eps)
    for i in range(3):
        alone = sched.q_sample(x0[i : i + 1], t[i : i + 1], eps[i : i + 1])
        torch.testing.assert_close(out[i : i + 1], alone, rtol=0, atol=0)
        abar = _abar64(int(t[i]))
        ref = math.sqrt(abar) * x0[i].double() + math.sqrt(1 - abar) * eps[i].double()
        torch.testing.assert_close(out[i].double(), ref, rtol=1e-5, atol=1e-6)


def _log_normal(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    return -0.5 * (torch.log(2 * math.pi * var) + (x - mean) ** 2 / var)


@pytest.mark.parametrize("t", [1, 2, 10, 100, 500, 999])
def test_posterior_equals_bayes_product(sched: NoiseSchedule, t: int) -> None:
    """q(x_{t-1}|x_t,x0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x0): product of Gaussians in float64, by hand."""
    gen = torch.Generator().manual_seed(t)
    x0 = torch.rand(5, generator=gen, dtype=torch.float64) * 2 - 1
    xt = torch.randn(5, generator=gen, dtype=torch.float64)
    beta, alpha = _beta64(t), 1 - _beta64(t)
    abar_prev, abar = _abar64(t - 1), _abar64(t)
    # As a function of x_{t-1}: q(x_t|x_{t-1}) = N(x_t; √α_t x_{t-1}, β_t) has precision α_t/β_t and
    # mean x_t/√α_t; q(x_{t-1}|x0) = N(√ᾱ_{t-1} x0, 1-ᾱ_{t-1}). Precisions add, means are precision-weighted.
    precision = alpha / beta + 1 / (1 - abar_prev)
    var_ref = 1 / precision
    mean_ref = var_ref * (math.sqrt(alpha) * xt / beta + math.sqrt(abar_prev) * x0 / (1 - abar_prev))

    mean, var = sched.q_posterior(x0.float()[:, None], xt.float()[:, None], torch.full((5,), t))
    mean, var = mean.double()[:, 0], var.double()[:, 0]
    torch.testing.assert_close(var, torch.full_like(var, var_ref), rtol=1e-5, atol=0)
    torch.testing.assert_close(mean, mean_ref, rtol=1e-5, atol=1e-6)

    # Bayes' rule pointwise, normalisation included: log q(x_t|x_{t-1}) + log q(x_{t-1}|x0) - log q(x_t|x0)
    # equals log N(x_{t-1}; μ̃, β̃) at points within a few standard deviations of the mean.
    for k in (-2.0, 0.0, 1.5):
        x_prev = mean_ref + k * math.sqrt(var_ref)
        bayes = (
            _log_normal(xt, math.sqrt(alpha) * x_prev, torch.tensor(beta, dtype=torch.float64))
            + _log_normal(x_prev, math.sqrt(abar_prev) * x0, torch.tensor(1 - abar_prev, dtype=torch.float64))
            - _log_normal(xt, math.sqrt(abar) * x0, torch.tensor(1 - abar, dtype=torch.float64))
        )
        torch.testing.assert_close(_log_normal(x_prev, mean, var), bayes, rtol=0, atol=1e-3)


def test_posterior_at_t0_is_the_data(sched: NoiseSchedule) -> None:
    # ᾱ_{-1} = 1: q(x_{-1}|x_0, x_0) is a point mass at x_0.
    x0, xt = torch.randn(2, 3), torch.randn(2, 3)
    mean, var = sched.q_posterior(x0, xt, torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(mean, x0)
    assert (var == 0).all()


@pytest.mark.parametrize("t", [0, 1, 50, 500, 999])
def test_eps_form_and_x0_form_of_the_mean_agree(sched: NoiseSchedule, t: int) -> None:
    gen = torch.Generator().manual_seed(7)
    x0 = torch.rand(4, 1, 3, 3, generator=gen) * 2 - 1
    eps = torch.randn(4, 1, 3, 3, generator=gen)
    tt = torch.full((4,), t)
    xt = sched.q_sample(x0, tt, eps)
    mean_x0, _ = sched.q_posterior(x0, xt, tt)
    mean_eps = sched.posterior_mean_from_eps(xt, tt, eps)  # eq. (11)
    torch.testing.assert_close(mean_eps, mean_x0, rtol=1e-4, atol=1e-5)
    # eq. (4) solved for x0 and back: the two parametrisations are one map.
    x0_hat = sched.predict_x0_from_eps(xt, tt, eps)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-3, atol=2e-4 if t < 999 else 5e-3)
    torch.testing.assert_close(sched.predict_eps_from_x0(xt, tt, x0), eps, rtol=1e-3, atol=1e-3)


def test_alpha_bar_of_clean_data_is_one(sched: NoiseSchedule) -> None:
    out = sched.alpha_bar(torch.tensor([-1, 0, 999]))
    assert out[0].item() == 1.0
    assert out[1].item() == pytest.approx(1 - 1e-4, rel=1e-7)
    assert out[2].item() == pytest.approx(_abar64(999), rel=1e-5)
