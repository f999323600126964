"""Offline sampling loop: the same rows and per-row updates as the serving engine, without engine or HTTP.

Each image's randomness comes from its own generator, :func:`~service.diffusion.rows.row_generator`
(seed, index), and every step is :func:`~service.diffusion.rows.batched_step`, so ``sample`` gives
the same images as the serving engine for the same seed, sampler, steps, spacing and η — and the same
conditioning (:mod:`service.diffusion.conditioning`: image-to-image, inpainting, classifier guidance).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from service.diffusion.checkpoint import DiffusionModel
from service.diffusion.conditioning import Conditioning
from service.diffusion.rows import RowGroup, batched_step
from service.diffusion.samplers import Spacing, get_sampler

__all__ = ["default_steps", "prepare_unet", "sample"]


def prepare_unet(model: DiffusionModel, dtype: torch.dtype) -> None:
    """channels_last memory format for reduced-precision inference (oneDNN bf16 on CPU, tensor cores on CUDA)."""
    if dtype != torch.float32:
        model.unet.to(memory_format=torch.channels_last)


def default_steps(model: DiffusionModel, sampler: str) -> int:
    """The sampler's default step count for this model (T for ddpm), capped by what the sampler can run."""
    s = get_sampler(sampler)
    big_t = model.spec.num_train_timesteps
    return min(s.default_steps or big_t, s.max_steps(big_t))


def sample(
    model: DiffusionModel,
    num: int,
    seed: int,
    sampler: str = "ddpm",
    steps: int | None = None,
    eta: float = 0.0,
    init_noise: torch.Tensor | None = None,
    batch: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    progress: Callable[[int], None] | None = None,
    spacing: Spacing | None = None,
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    conditioning: Conditioning | None = None,
) -> torch.Tensor:
    """``num`` images (N, C, H, W) float32 in [-1, 1]; ``progress`` is called with each finished step count.

    ``spacing`` defaults to the model's spacing for ``sampler`` (``ModelSpec.default_spacing``); ``forward``
    computes ε_θ (default: the eager UNet in ``dtype``; e.g. a prepared :class:`~service.diffusion.runner.UNetRunner`).
    ``conditioning`` applies to every image (ValueError when the model or plan cannot run it); its steps per
    batch are those of its plan (fewer for image-to-image, more with resampling).
    """
    spec = model.spec
    device = torch.device(device) if device is not None else next(model.unet.parameters()).device
    steps = steps or default_steps(model, sampler)
    shape = (num, spec.channels, spec.image_size, spec.image_size)
    if init_noise is not None and tuple(init_noise.shape) != shape:
        raise ValueError(f"init noise has shape {tuple(init_noise.shape)}, expected {shape}")
    batch = batch or num
    out = []
    for start in range(0, num, batch):
        n = min(batch, num - start)
        init = init_noise[start : start + n] if init_noise is not None else None
        group = RowGroup.start(model, n, seed, sampler, steps, eta, spacing, device, init_noise=init, first_row=start,
                               conditioning=conditioning)
        while not group.done:
            batched_step(model, [group], dtype, forward)
            if progress is not None:
                progress(1)
        out.append(group.x.clamp(-1, 1).cpu())
    return torch.cat(out)
