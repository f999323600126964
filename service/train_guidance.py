"""Training the noise-aware classifier of classifier guidance (Dhariwal & Nichol 2021, section 4).

``python -m service train-guidance-classifier --model model_store/mnist --data …train-images… --labels …``

The classifier p_φ(y | x_t, t) must see exactly the images the sampler hands it, so each training
example is a clean digit x_0 noised with the *served model's* schedule: x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) z
(DDPM eq. 4), t uniform in 0..T−1, z ~ N(0, I), with ᾱ read from the model entry's config. Loss:
cross-entropy; AdamW with a short warm-up and a cosine decay to zero; random ±``max_shift`` px
translations of x_0 as augmentation. Training uses the MNIST *training* split only; the test split
(never trained on) scores it at t ∈ {0, 100, 250, 500, 750, 900, 999}, each on every test digit with
noise from a generator seeded by (seed, t), and the scores go into ``guidance_classifier.json``.

Checkpointing is deliberately simple: the run is short (the default 4,000 steps of 128 take ~20 min
on one idle CPU thread), so
nothing is written until the end; an interrupted run is rerun from scratch (it is seeded, so a rerun
gives the same classifier on the same machine).
"""

from __future__ import annotations

import math
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from service.diffusion.guidance import (
    GuidanceClassifier,
    GuidanceClassifierConfig,
    save_guidance_classifier,
)
from service.diffusion.schedule import NoiseSchedule

__all__ = [
    "EVAL_TIMESTEPS",
    "accuracy_by_t",
    "eval_timesteps",
    "fit_and_save",
    "flops_per_image",
    "train_guidance_classifier",
]

EVAL_TIMESTEPS = (0, 100, 250, 500, 750, 900, 999)  # for T = 1000; see eval_timesteps


def eval_timesteps(num_timesteps: int) -> tuple[int, ...]:
    """:data:`EVAL_TIMESTEPS` below T, and always T − 1 (the noisiest step)."""
    return tuple(sorted({t for t in EVAL_TIMESTEPS if t < num_timesteps} | {num_timesteps - 1}))


def _shift(x: torch.Tensor, gen: torch.Generator, max_shift: int) -> torch.Tensor:
    """Translate each image by (dy, dx) ∈ [−max_shift, max_shift]², filling with the background −1."""
    n, _, h, w = x.shape
    s = max_shift
    padded = F.pad(x, (s, s, s, s), value=-1.0)  # (N, C, H + 2s, W + 2s)
    dy, dx = torch.randint(0, 2 * s + 1, (2, n, 1), generator=gen)
    rows = (dy + torch.arange(h))[:, :, None]  # (N, H, 1)
    cols = (dx + torch.arange(w))[:, None, :]  # (N, 1, W)
    return padded[torch.arange(n)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)  # (N, H, W, C) → (N, C, H, W)


def train_guidance_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    schedule: NoiseSchedule,
    config: GuidanceClassifierConfig | None = None,
    steps: int = 4000,
    batch_size: int = 128,
    lr: float = 4e-3,
    weight_decay: float = 0.05,
    warmup_steps: int = 100,
    max_shift: int = 1,
    seed: int = 0,
    progress: Callable[..., object] | None = None,
) -> GuidanceClassifier:
    """Fit p_φ(y | x_t, t) on clean ``images`` (N, C, H, W) in [−1, 1] noised by ``schedule``; seeded, eval mode out.

    ``progress(1, loss=…, acc=…)`` is called after every step (a :class:`service.progress.Progress`'s update).
    """
    n, c, h, _ = images.shape
    num_t = schedule.num_timesteps
    config = config or GuidanceClassifierConfig(channels=c, image_size=h, num_train_timesteps=num_t)
    if (config.channels, config.image_size, config.num_train_timesteps) != (c, h, num_t):
        raise ValueError(
            f"config is for {config.channels}×{config.image_size}² and T={config.num_train_timesteps}, "
            f"the data are {c}×{h}² and the schedule has T={num_t}"
        )
    if len(labels) != n or int(labels.min()) < 0 or int(labels.max()) >= config.num_classes:
        raise ValueError(f"need {n} labels in 0..{config.num_classes - 1}")
    torch.manual_seed(seed)
    model = GuidanceClassifier(config).train()
    gen = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)

    def lr_factor(step: int) -> float:  # linear warm-up, then cosine to zero
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, steps - warmup_steps)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    perm, pos = torch.randperm(n, generator=gen), 0
    for _ in range(steps):
        if pos + batch_size > n:  # a new epoch (the remainder of the old one is dropped)
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos : pos + batch_size]
        pos += batch_size
        x0 = images[idx].float()
        if max_shift:
            x0 = _shift(x0, gen, max_shift)
        t = torch.randint(0, num_t, (len(idx),), generator=gen)
        z = torch.randn(x0.shape, generator=gen)
        x_t = schedule.q_sample(x0, t, z)  # eq. (4): √ᾱ_t x_0 + √(1 − ᾱ_t) z
        logits = model(x_t, t)
        loss = F.cross_entropy(logits, labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress is not None:
            acc = float((logits.argmax(1) == labels[idx]).float().mean())
            progress(1, loss=f"{loss.item():.3f}", acc=f"{acc:.3f}")
    return model.eval()


@torch.no_grad()
def accuracy_by_t(
    model: GuidanceClassifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    schedule: NoiseSchedule,
    timesteps: tuple[int, ...],
    seed: int = 0,
    batch: int = 500,
) -> dict[str, float]:
    """{str(t): share of ``images`` whose noised x_t (noise seeded by (seed, t)) is classified as its label}."""
    model.eval()
    out: dict[str, float] = {}
    for t_val in timesteps:
        gen = torch.Generator().manual_seed(1_000_003 * seed + t_val)
        correct = 0
        for x0, y in zip(images.split(batch), labels.split(batch), strict=True):
            t = torch.full((len(x0),), t_val, dtype=torch.long)
            x_t = schedule.q_sample(x0.float(), t, torch.randn(x0.shape, generator=gen))
            correct += int((model(x_t, t).argmax(1) == y).sum())
        out[str(t_val)] = round(correct / len(images), 4)
    return out


def flops_per_image(model: GuidanceClassifier) -> int:
    """FLOPs of one image's forward in the convolutions and linear layers (2 per multiply-add; norms and
    activations, a few percent, not counted): what ``torch.utils.flop_counter`` reports, without its slow import."""
    total = 0

    def count(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            k = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            total += 2 * output.numel() * k
        elif isinstance(module, nn.Linear):
            total += 2 * output.numel() * module.in_features

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    cfg = model.config
    try:
        with torch.no_grad():
            model(torch.zeros(1, cfg.channels, cfg.image_size, cfg.image_size), torch.zeros(1, dtype=torch.long))
    finally:
        for h in hooks:
            h.remove()
    return total


def fit_and_save(
    model_dir: str | Path,
    data: str | Path,
    labels: str | Path,
    test_data: str | Path,
    test_labels: str | Path,
    out: str | Path | None = None,
    steps: int = 4000,
    batch_size: int = 128,
    lr: float = 4e-3,
    widths: tuple[int, ...] = (16, 24, 64),
    blocks: tuple[int, ...] = (0, 1, 2),
    max_shift: int = 1,
    seed: int = 0,
    show_progress: bool = True,
    log: Callable[[str], object] = print,
) -> dict:
    """Train on (``data``, ``labels``) with ``model_dir``'s schedule, score on the test split, write to ``out``.

    ``out`` defaults to ``model_dir``. Returns the record written to ``guidance_classifier.json``.
    """
    from service.data import load_images, load_labels, to_model_range
    from service.diffusion.checkpoint import load_model
    from service.progress import Progress

    start = time.perf_counter()
    diffusion = load_model(model_dir)  # sha256-checked; its schedule is the one the sampler will use
    spec = diffusion.spec

    def load(images_path: str | Path, labels_path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
        x = to_model_range(load_images(images_path, channels=spec.channels, size=spec.image_size))
        y = load_labels(labels_path)
        if len(y) != len(x):
            raise ValueError(f"{labels_path}: {len(y)} labels for {len(x)} images")
        return x, y

    train_x, train_y = load(data, labels)
    test_x, test_y = load(test_data, test_labels)
    config = GuidanceClassifierConfig(
        channels=spec.channels,
        image_size=spec.image_size,
        widths=widths,
        blocks=blocks,
        norm_groups=math.gcd(8, *widths),
        num_train_timesteps=spec.num_train_timesteps,
    )
    log(
        f"training the guidance classifier on {len(train_x)} images of {data} with {model_dir}'s schedule "
        f"(T = {spec.num_train_timesteps}), {steps} steps of {batch_size}"
    )
    bar = Progress(steps, desc="guidance") if show_progress else None
    t0 = time.perf_counter()
    model = train_guidance_classifier(
        train_x,
        train_y,
        diffusion.schedule,
        config,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        max_shift=max_shift,
        seed=seed,
        progress=bar.update if bar is not None else None,
    )
    train_seconds = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    timesteps = eval_timesteps(spec.num_train_timesteps)
    accuracy = accuracy_by_t(model, test_x, test_y, diffusion.schedule, timesteps, seed=seed)
    record = {
        "training": {
            "split": f"training split {data} ({len(train_x)} images, labels {labels})",
            "model": str(model_dir),
            "model_sha256": diffusion.sha256,
            "schedule": {
                "beta_schedule": spec.beta_schedule,
                "num_train_timesteps": spec.num_train_timesteps,
                "beta_start": spec.beta_start,
                "beta_end": spec.beta_end,
            },
            "steps": steps,
            "batch_size": batch_size,
            "images_seen": steps * batch_size,
            "lr": lr,
            "max_shift": max_shift,
            "seed": seed,
            "threads": torch.get_num_threads(),
            "command": shlex.join(sys.orig_argv),
            "train_seconds": round(train_seconds, 1),
            "wall_seconds": round(time.perf_counter() - start, 1),
            "parameters": sum(p.numel() for p in model.parameters()),
            "flops_per_image": flops_per_image(model),
        },
        "accuracy_by_t": accuracy,
        "test_split": f"{test_data} ({len(test_x)} images, labels {test_labels}); never trained on",
        "recommended_guidance_scale": None,
    }
    folder = save_guidance_classifier(model, out if out is not None else model_dir, record)
    log("test accuracy by t: " + ", ".join(f"t={t}: {a:.4f}" for t, a in accuracy.items()))
    log(f"wrote {folder} (guidance_classifier.safetensors + .json) in {record['training']['wall_seconds']:.0f} s")
    return record
