"""The API's diffusion math against independent oracles: a /denoise-step chain equals /generate, and /noise
has the forward process's statistics."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from tests.api.conftest import SIZE, Server, make_model


def npy(content: bytes | str) -> np.ndarray:
    data = base64.b64decode(content) if isinstance(content, str) else content
    return np.load(io.BytesIO(data), allow_pickle=False)


def b64npy(arr: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, arr.astype(np.float32), allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def server_t50_clip(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """T = 50 with ``clip_sample_range`` 0.25 (diffusers' setting), far inside random weights' x̂_0."""
    tmp = tmp_path_factory.mktemp("m50-clip")
    srv = Server(make_model(tmp / "tiny", timesteps=50, sampling={"clip_sample_range": 0.25}), tmp)
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def server_t50_eps(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """T = 50 with Epsilon Scaling λ_t linear from 0.9 at t = 0 to 0.95 at t = 49 for ddpm (and 0.95 for ddim)."""
    tmp = tmp_path_factory.mktemp("m50-eps")
    sampling = {"eps_scale": {"ddpm": [0.9, 0.95], "ddim": 0.95}}
    srv = Server(make_model(tmp / "tiny", timesteps=50, sampling=sampling), tmp)
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.mark.parametrize(("fixture", "clip"), [("server_t50", 1.0), ("server_t50_clip", 0.25),
                                               ("server_t50_eps", 1.0)])
def test_denoise_chain_reproduces_generate(fixture: str, clip: float, request: pytest.FixtureRequest) -> None:
    """x_T → /denoise-step at t = T-1 … 0 with the request's seed gives /generate's image (ddpm, steps = T),
    with the default clip of x̂_0 to ±1, with the model's own ``clip_sample_range``, and with its Epsilon Scaling
    (both divide ε_θ by the model's λ_t for ddpm).

    x_T is image 0's first draw: torch.Generator seeded as documented for row_generator(seed, 0), i.e.
    (seed · 0x9E3779B97F4A7C15 + 0) mod 2^63. At every step the response must also satisfy
    x_prev = posterior_mean + √σ²·noise and posterior_mean = coef_x0·x0_pred + coef_xt·x_t, and x0_pred lie in ±clip
    (reaching it: random weights' x̂_0 go far past both ranges).
    """
    big_t, seed = 50, 2024
    c = request.getfixturevalue(fixture).client
    gen = torch.Generator().manual_seed((seed * 0x9E3779B97F4A7C15) % (1 << 63))
    x = torch.randn((1, SIZE, SIZE), generator=gen).numpy()
    for t in range(big_t - 1, -1, -1):
        r = c.post("/denoise-step", json={"x_t": b64npy(x), "t": t, "seed": seed})
        assert r.status_code == 200, r.text
        b = r.json()
        x0, mean, noise, x_prev = (npy(b[k]) for k in ("x0_pred", "posterior_mean", "noise", "x_prev"))
        np.testing.assert_allclose(mean, b["posterior_mean_coef_x0"] * x0 + b["posterior_mean_coef_xt"] * x, atol=1e-5)
        np.testing.assert_allclose(x_prev, mean + np.sqrt(b["sigma_squared"]) * noise, atol=1e-5)
        assert (t == 0) == (not noise.any())
        assert np.abs(x0).max() == pytest.approx(clip)
        x = x_prev
    r = c.post("/generate", json={"sampler": "ddpm", "steps": big_t, "seed": seed, "format": "npy"})
    generated = npy(r.content)[0]
    np.testing.assert_allclose(np.clip(x, -1, 1), generated, atol=1e-4)
    assert np.abs(generated).mean() > 0.05  # not a trivial all-zero image
    assert np.abs(generated).max() <= clip + 1e-6


def test_eps_scale_is_reported_and_divides_the_denoise_step_eps(server_t50: Server, server_t50_eps: Server) -> None:
    info = server_t50_eps.client.get("/v1/model").json()
    assert info["eps_scale"] == {"ddpm": [0.9, 0.95], "ddim": 0.95, "dpmpp_2m": 1.0, "dpmpp_3m": 1.0,
                                 "dpmpp_2m_sde": 1.0, "unipc": 1.0}
    assert set(server_t50.client.get("/v1/model").json()["eps_scale"].values()) == {1.0}
    x = np.linspace(-1, 1, SIZE * SIZE, dtype=np.float32).reshape(1, SIZE, SIZE)
    # the same random weights (make_model seeds them): only λ differs
    plain, scaled = (npy(s.client.post("/denoise-step", json={"x_t": b64npy(x), "t": 30, "seed": 1}).json()["eps"])
                     for s in (server_t50, server_t50_eps))
    np.testing.assert_allclose(scaled, plain / (0.9 + 0.05 * 30 / 49), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("t", [50, 300, 999])
def test_noise_statistics(server: Server, t: int) -> None:
    """Over many pixels, x_t − √ᾱ_t·x_0 has mean ≈ 0 and std ≈ √(1 − ᾱ_t) (linear 1e-4 → 0.02, T = 1000)."""
    abar = float(np.prod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64)[: t + 1]))
    residuals = []
    for seed in range(24):  # 24 × 256 = 6144 pixels
        arr = npy(server.client.get(f"/noise?t={t}&seed={seed}&image=ring&format=npy&include=x0").content)
        x_t, x0 = arr[0], arr[1]
        residuals.append((x_t - np.sqrt(abar) * x0).ravel())
    res = np.concatenate(residuals)
    sd = np.sqrt(1 - abar)
    n = res.size
    assert abs(res.mean()) < 4 * sd / np.sqrt(n)
    assert abs(res.std() / sd - 1) < 4 / np.sqrt(2 * n)  # std of a sample std ≈ σ/√(2n)
