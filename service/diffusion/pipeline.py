"""Offline sampling loop: predict ε with the UNet, then apply the sampler update (no engine, no HTTP).

Each image's randomness comes from its own generator, :func:`row_generator` (seed, index), so
``sample`` gives the same images as the serving engine for the same seed, sampler and steps.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch

from service.diffusion.checkpoint import DiffusionModel
from service.diffusion.samplers import SamplerName, ddim_step, ddpm_step, make_noise, row_generator, timesteps

__all__ = ["predict_eps", "prepare_unet", "sample"]


def prepare_unet(model: DiffusionModel, dtype: torch.dtype) -> None:
    """channels_last memory format for reduced-precision inference (oneDNN bf16 on CPU, tensor cores on CUDA)."""
    if dtype != torch.float32:
        model.unet.to(memory_format=torch.channels_last)


def predict_eps(unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """ε_θ(x, t) in float32; ``dtype`` other than float32 runs the UNet under autocast."""
    device = x.device
    ctx = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    with torch.inference_mode(), ctx:
        if dtype != torch.float32:
            x = x.contiguous(memory_format=torch.channels_last)
        return unet(x, t.to(device)).float()


def sample(
    model: DiffusionModel,
    num: int,
    seed: int,
    sampler: SamplerName = "ddpm",
    steps: int | None = None,
    eta: float = 0.0,
    init_noise: torch.Tensor | None = None,
    batch: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """``num`` images (N, C, H, W) float32 in [-1, 1]; ``progress`` is called with each finished step count."""
    spec, schedule = model.spec, model.schedule
    device = torch.device(device) if device is not None else next(model.unet.parameters()).device
    steps = steps or spec.num_train_timesteps
    seq = timesteps(spec.num_train_timesteps, steps)
    shape = (spec.channels, spec.image_size, spec.image_size)
    if init_noise is not None and tuple(init_noise.shape) != (num, *shape):
        raise ValueError(f"init noise has shape {tuple(init_noise.shape)}, expected {(num, *shape)}")
    batch = batch or num
    out = []
    for start in range(0, num, batch):
        rows = range(start, min(start + batch, num))
        gens = [row_generator(seed, r) for r in rows]
        x = make_noise((len(rows), *shape), gens, device)
        if init_noise is not None:
            x = init_noise[start : start + len(rows)].to(device, torch.float32)
        for i, t_now in enumerate(seq):
            t = torch.full((len(rows),), t_now, dtype=torch.long, device=device)
            t_prev = torch.full_like(t, seq[i + 1] if i + 1 < len(seq) else -1)
            eps = predict_eps(model.unet, x, t, dtype)
            needs_noise = t_prev[0] >= 0 and (sampler == "ddpm" or eta > 0)
            noise = make_noise(x.shape, gens, device) if needs_noise else None
            if sampler == "ddpm":
                x = ddpm_step(schedule, x, eps, t, t_prev, noise, spec.variance_type, spec.clip_sample).prev_sample
            elif sampler == "ddim":
                x = ddim_step(schedule, x, eps, t, t_prev, eta, noise, spec.clip_sample).prev_sample
            else:
                raise ValueError(f"unknown sampler {sampler!r}")
            if progress is not None:
                progress(1)
        out.append(x.clamp(-1, 1).cpu())
    return torch.cat(out)
