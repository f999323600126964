"""The offline sampling loop against diffusers' own loops (same weights, same x_T and noise)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from service.diffusion.checkpoint import DiffusionModel
from service.diffusion.pipeline import prepare_unet, sample
from service.diffusion.rows import RowGroup, batched_step, predict_eps, row_generator
from service.diffusion.unet import UNet, UNetConfig


def diffusers_unet(model: DiffusionModel) -> UNet2DModel:
    ref = UNet2DModel(**model.spec.unet.to_dict()).eval()
    ref.load_state_dict(model.unet.state_dict(), strict=True)
    return ref


def _scheduler_kwargs(model: DiffusionModel) -> dict:
    s = model.spec
    return {
        "num_train_timesteps": s.num_train_timesteps,
        "beta_start": s.beta_start,
        "beta_end": s.beta_end,
        "beta_schedule": "linear",
        "clip_sample": s.clip_sample,
    }


def diffusers_loop(
    model: DiffusionModel, scheduler: DDIMScheduler | DDPMScheduler, x: torch.Tensor, steps: int,
    generator: torch.Generator | None = None, eta: float | None = None,
    eps_scale: float | Callable[[int], float] = 1.0,
) -> torch.Tensor:
    """The loop of diffusers' DDPMPipeline / DDIMPipeline: predict ε (divided by ``eps_scale``, or by
    ``eps_scale(t)``: Epsilon Scaling, Ning et al. 2023), then ``scheduler.step``."""
    ref = diffusers_unet(model)
    scheduler.set_timesteps(steps)
    extra = {} if eta is None else {"eta": eta}
    with torch.inference_mode():
        for t in scheduler.timesteps:
            eps = ref(x, t).sample / (eps_scale(int(t)) if callable(eps_scale) else eps_scale)
            x = scheduler.step(eps, t, x, generator=generator, **extra).prev_sample
    return x.clamp(-1, 1)


def test_ddim_eta0_from_init_noise_equals_diffusers(tiny_model: DiffusionModel) -> None:
    x_t = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(11))
    ours = sample(tiny_model, 3, seed=0, sampler="ddim", steps=10, eta=0.0, init_noise=x_t)
    ref = diffusers_loop(tiny_model, DDIMScheduler(**_scheduler_kwargs(tiny_model)), x_t, 10, eta=0.0)
    assert ours.shape == (3, 1, 8, 8) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)
    # η = 0 is fully determined by x_T: the seed does not matter
    torch.testing.assert_close(sample(tiny_model, 3, seed=99, sampler="ddim", steps=10, init_noise=x_t), ours)


@pytest.mark.parametrize(("sampler", "steps"), [("ddpm", 20), ("ddim", 10)])
def test_stochastic_loop_for_one_image_equals_diffusers_with_the_rows_generator(
    tiny_model: DiffusionModel, sampler: str, steps: int
) -> None:
    """One row draws x_T then each step's z from its own generator, in the order diffusers' loop does."""
    seed = 1234
    ours = sample(tiny_model, 1, seed=seed, sampler=sampler, steps=steps, eta=1.0)  # type: ignore[arg-type]
    gen = row_generator(seed, 0)
    x_t = torch.randn(1, 1, 8, 8, generator=gen)
    if sampler == "ddpm":
        sched = DDPMScheduler(**_scheduler_kwargs(tiny_model), variance_type=tiny_model.spec.variance_type)
        ref = diffusers_loop(tiny_model, sched, x_t, steps, generator=gen)
    else:
        ref = diffusers_loop(tiny_model, DDIMScheduler(**_scheduler_kwargs(tiny_model)), x_t, steps, gen, eta=1.0)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)


def test_eps_scale_divides_the_network_output_of_its_sampler_only(tiny_model: DiffusionModel) -> None:
    x_t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    plain = sample(tiny_model, 2, seed=0, sampler="ddim", steps=10, init_noise=x_t)
    scaled_model = replace(tiny_model, spec=replace(tiny_model.spec, sampling={"eps_scale": {"ddim": 0.9}}))
    scaled = sample(scaled_model, 2, seed=0, sampler="ddim", steps=10, init_noise=x_t)
    ref = diffusers_loop(tiny_model, DDIMScheduler(**_scheduler_kwargs(tiny_model)), x_t, 10, eta=0.0, eps_scale=0.9)
    torch.testing.assert_close(scaled, ref, rtol=0, atol=1e-4)
    assert (scaled - plain).abs().max() > 1e-2
    # another sampler of the same model keeps the network's ε, also when its rows share a forward with DDIM's
    ddpm = sample(tiny_model, 2, seed=4, sampler="ddpm", steps=10)
    torch.testing.assert_close(sample(scaled_model, 2, seed=4, sampler="ddpm", steps=10), ddpm, rtol=0, atol=0)
    groups = [RowGroup.start(scaled_model, 2, 4, "ddpm", 10, 0.0, None, "cpu"),
              RowGroup.start(scaled_model, 2, 0, "ddim", 10, 0.0, None, "cpu", init_noise=x_t)]
    while not groups[0].done:
        batched_step(scaled_model, groups)
    torch.testing.assert_close(groups[0].x.clamp(-1, 1), ddpm, rtol=0, atol=1e-4)
    torch.testing.assert_close(groups[1].x.clamp(-1, 1), scaled, rtol=0, atol=1e-4)


def test_linear_eps_scale_divides_by_lambda_t_at_each_step(tiny_model: DiffusionModel) -> None:
    """[λ_0, λ_{T-1}]: the step at t divides ε_θ by λ_0 + (λ_{T-1} − λ_0)·t/(T − 1) (Ning et al.'s λ_t = k·t + b)."""
    x_t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    big_t = tiny_model.spec.num_train_timesteps
    linear = replace(tiny_model, spec=replace(tiny_model.spec, sampling={"eps_scale": {"ddim": [0.8, 1.0]}}))
    ours = sample(linear, 2, seed=0, sampler="ddim", steps=10, init_noise=x_t)
    ref = diffusers_loop(tiny_model, DDIMScheduler(**_scheduler_kwargs(tiny_model)), x_t, 10, eta=0.0,
                         eps_scale=lambda t: 0.8 + 0.2 * t / (big_t - 1))
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)
    # not the same as one λ at the profile's mean
    uniform = replace(tiny_model, spec=replace(tiny_model.spec, sampling={"eps_scale": {"ddim": 0.9}}))
    assert (sample(uniform, 2, seed=0, sampler="ddim", steps=10, init_noise=x_t) - ours).abs().max() > 1e-2


def test_rows_do_not_depend_on_batching(tiny_model: DiffusionModel) -> None:
    whole = sample(tiny_model, 3, seed=5, sampler="ddpm", steps=10)
    split = sample(tiny_model, 3, seed=5, sampler="ddpm", steps=10, batch=2)
    # equal up to float rounding: convolution kernels may sum in a batch-size-dependent order
    torch.testing.assert_close(split, whole, rtol=0, atol=1e-5)
    # a different seed gives different images; every row differs from the others
    other = sample(tiny_model, 3, seed=6, sampler="ddpm", steps=10)
    assert (other - whole).abs().max() > 0.1
    assert (whole[0] - whole[1]).abs().max() > 0.1
    assert whole.min() >= -1 and whole.max() <= 1


def test_progress_reports_every_step_of_every_batch(tiny_model: DiffusionModel) -> None:
    calls: list[int] = []
    sample(tiny_model, 3, seed=0, sampler="ddim", steps=4, batch=2, progress=calls.append)
    assert calls == [1] * 8


def test_init_noise_of_the_wrong_shape_is_rejected(tiny_model: DiffusionModel) -> None:
    with pytest.raises(ValueError, match="init noise"):
        sample(tiny_model, 2, seed=0, sampler="ddim", steps=2, init_noise=torch.zeros(3, 1, 8, 8))


def test_unknown_sampler_is_rejected(tiny_model: DiffusionModel) -> None:
    with pytest.raises(ValueError, match="sampler"):
        sample(tiny_model, 1, seed=0, sampler="euler", steps=2)  # type: ignore[arg-type]


def test_bfloat16_autocast_stays_close_to_float32(tiny_model: DiffusionModel) -> None:
    """bf16 keeps 8 significant bits (relative rounding 2⁻⁹ ≈ 0.2%): loose bounds, deviations printed.

    Per forward, ε deviates by about 1% of its range, on the project's 28×28 config. Over a whole
    DDIM loop a random-weight model amplifies that: its x̂_0 = (x_t - √(1-ᾱ_t) ε)/√ᾱ_t is far outside
    [-1, 1] and clipped, so the image-level bound is statistical (correlation and mean deviation).
    """
    torch.manual_seed(0)
    model = DiffusionModel(tiny_model.spec, UNet(UNetConfig()).eval(), tiny_model.schedule, "")
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0, 10, 500, 999])
    eps32 = predict_eps(model.unet, x, t, torch.float32)
    prepare_unet(model, torch.bfloat16)
    assert model.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    eps16 = predict_eps(model.unet, x, t, torch.bfloat16)
    assert eps16.dtype == torch.float32
    dev = (eps16 - eps32).abs().max().item()
    rel = dev / eps32.abs().max().item()
    print(f"bf16 ε deviation (28×28 config): max abs {dev:.2e}, relative to max |ε| {rel:.2e}")
    assert 0 < rel < 0.05

    x_t = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    a = sample(tiny_model, 8, 0, "ddim", 10, init_noise=x_t)
    prepare_unet(tiny_model, torch.bfloat16)
    b = sample(tiny_model, 8, 0, "ddim", 10, init_noise=x_t, dtype=torch.bfloat16)
    corr = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()
    mean_dev = (a - b).abs().mean().item()
    print(f"bf16 DDIM-10 images (random weights): max abs {(a - b).abs().max().item():.2e}, "
          f"mean abs {mean_dev:.2e}, correlation {corr:.3f}")
    assert corr > 0.75 and mean_dev < 0.3
