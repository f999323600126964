"""Training loop for ε-prediction (DDPM Algorithm 1): minimise ‖ε - ε_θ(√ᾱ_t x_0 + √(1-ᾱ_t) ε, t)‖².

AdamW, gradient-norm clipping, linear warm-up then cosine decay, optional min-SNR-γ loss weighting
(Hang et al. 2023), an EMA copy of the weights (the EMA copy is what gets exported), an optional
held-out split that training never sees, a loss log (``loss.jsonl``), periodic sample grids, and
resumable training checkpoints that restore model, optimizer, EMA and every RNG so that resuming
continues exactly as an uninterrupted run would, and a warm start (``init_from``) from an exported entry's
weights when a run's full state is gone: a fine-tune with a fresh optimizer, not a resume.
"""

from __future__ import annotations

import copy
import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from service.data import load_images, split_indices, to_model_range
from service.diffusion.checkpoint import DiffusionModel, ModelSpec, load_model, save_model
from service.diffusion.pipeline import sample
from service.diffusion.unet import UNet, UNetConfig
from service.imaging import grid, png_bytes
from service.progress import Progress

__all__ = ["TrainConfig", "train"]

STATE_FILE = "train_state.pt"
LOSS_LOG = "loss.jsonl"


@dataclass
class TrainConfig:
    data: str  # MNIST IDX file (.gz or raw), image folder or .npz
    out: str = "model_store/mnist"  # model-store entry written with the EMA weights
    workdir: str = "runs/mnist"  # training checkpoints and sample grids
    name: str = "mnist"  # model name in config.json
    image_size: int = 28  # H = W of the model
    channels: int = 1  # image channels
    block_out_channels: tuple[int, ...] = (32, 64, 128)  # UNet widths per resolution
    attention_levels: tuple[int, ...] = (2,)  # levels (0 = full resolution) with self-attention
    layers_per_block: int = 1  # residual blocks per down level
    norm_num_groups: int = 8  # GroupNorm groups
    dropout: float = 0.0  # residual-block dropout
    num_train_timesteps: int = 1000  # T
    beta_schedule: str = "linear"  # linear 1e-4 → 0.02 (DDPM) or cosine
    batch_size: int = 128
    lr: float = 8e-4  # AdamW peak learning rate
    weight_decay: float = 0.0
    warmup_steps: int = 500  # linear learning-rate warm-up
    lr_schedule: str = "cosine"  # after warm-up: "constant" or "cosine" (decay to min_lr_ratio·lr at `steps`)
    min_lr_ratio: float = 0.0  # floor of the cosine decay, as a fraction of lr
    min_snr_gamma: float = 5.0  # > 0: weight each ε-loss term by min(SNR_t, γ)/SNR_t (Hang et al. 2023); 0 = plain
    grad_clip: float = 1.0  # max global gradient norm
    ema_decay: float = 0.9995  # EMA decay (with the usual (1+n)/(10+n) warm-up); this EMA is what gets exported
    extra_ema_decays: tuple[float, ...] = ()  # more EMAs of the same run, for measuring the decay (WORKDIR/ema_<d>)
    steps: int = 10_000  # total optimisation steps
    holdout: int = 0  # images of the data held out for evaluation (never trained on); 0 = train on all
    split_seed: int = 0  # seed of the train / held-out permutation
    seed: int = 0  # seed of initialisation, batches, timesteps and noise
    dtype: str = "float32"  # float32 or bfloat16 (autocast)
    device: str = "cpu"  # where the UNet trains: cpu or cuda (batches, t and ε are drawn on the CPU either way)
    threads: int = 0  # torch intra-op threads (0 = torch's default)
    sample_every: int = 500  # write a sample grid every N steps (0 = never)
    checkpoint_every: int = 250  # save training state + export the EMA model every N steps
    snapshot_every: int = 0  # also keep a copy of the exported EMA model every N steps in WORKDIR/snapshots (0 = never)
    log_every: int = 10  # append the mean loss of the last N steps to WORKDIR/loss.jsonl
    init_from: str = ""  # model-store entry whose weights start the model and every EMA (a fine-tune; "" = scratch)
    extra: dict = field(default_factory=dict)  # recorded in the model card metadata

    def unet_config(self) -> UNetConfig:
        n = len(self.block_out_channels)
        down = tuple("AttnDownBlock2D" if i in self.attention_levels else "DownBlock2D" for i in range(n))
        up = tuple("AttnUpBlock2D" if n - 1 - i in self.attention_levels else "UpBlock2D" for i in range(n))
        return UNetConfig(
            sample_size=self.image_size,
            in_channels=self.channels,
            out_channels=self.channels,
            block_out_channels=tuple(self.block_out_channels),
            down_block_types=down,
            up_block_types=up,
            layers_per_block=self.layers_per_block,
            norm_num_groups=self.norm_num_groups,
            dropout=self.dropout,
        )


class EMA:
    """Exponential moving average of parameters: θ_ema ← d·θ_ema + (1-d)·θ, d = min(decay, (1+n)/(10+n)).

    The warm-up governs until (1+n)/(10+n) reaches the decay, at n = (10d − 1)/(1 − d): step 1,790 for 0.995, 8,990
    for 0.999, 17,990 for 0.9995. Until then EMAs of different decays are the same average.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for e, p in zip(self.model.parameters(), model.parameters(), strict=True):
            e.lerp_(p.detach(), 1.0 - d)


def _lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up over ``warmup_steps``, then constant or a half-cosine down to ``min_lr_ratio``·lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule != "cosine":
        raise ValueError(f"unknown lr_schedule {cfg.lr_schedule!r}; expected 'constant' or 'cosine'")
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    floor = cfg.min_lr_ratio * cfg.lr
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def loss_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-row weight of ‖ε − ε_θ‖²: min(SNR_t, γ)/SNR_t with SNR_t = ᾱ_t/(1−ᾱ_t) (min-SNR-γ, ε-prediction);
    all ones when γ = 0 (DDPM's simplified objective, eq. 14)."""
    if gamma <= 0:
        return torch.ones(t.shape, dtype=torch.float32)
    snr = alphas_cumprod[t] / (1.0 - alphas_cumprod[t])
    return (snr.clamp(max=gamma) / snr).float()


def _warm_start(cfg: TrainConfig, model: UNet, emas: list[EMA]) -> dict:
    """Load ``cfg.init_from``'s weights into the model and every EMA; returns what the run records of its source.

    The EMAs continue at their full decay (their warm-up assumed done): they start from weights that are already an
    average, so the (1+n)/(10+n) warm-up would throw that average away for the first thousands of steps.
    """
    source = load_model(cfg.init_from)
    if source.spec.unet != cfg.unet_config():
        raise ValueError(f"--init-from {cfg.init_from}: its UNet config {source.spec.unet} does not match this "
                         f"run's {cfg.unet_config()}")
    if (source.spec.beta_schedule, source.spec.num_train_timesteps) != (cfg.beta_schedule, cfg.num_train_timesteps):
        raise ValueError(f"--init-from {cfg.init_from}: its noise schedule differs from this run's")
    state = source.unet.state_dict()
    model.load_state_dict(state)
    for e in emas:
        e.model.load_state_dict(state)
        e.updates = math.ceil((10 * e.decay - 1) / (1 - e.decay))
    steps = source.spec.extra.get("training", {}).get("steps_done")
    return {"folder": str(cfg.init_from), "sha256": source.sha256, "steps_done": steps}


def _trim_loss_log(path: Path, step: int) -> None:
    """Keep the loss-log lines up to ``step`` (a resumed run rewrites what came after its checkpoint)."""
    if path.is_file():
        lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in lines))


def _spec(cfg: TrainConfig, step: int, seconds: float, ema_decay: float | None = None) -> ModelSpec:
    """The exported entry's spec; ``ema_decay`` names which of the run's EMAs it holds (default: the primary)."""
    info = {k: v for k, v in asdict(cfg).items() if k != "extra"}
    if ema_decay is not None:
        info["ema_decay"] = ema_decay
    extra = {"training": {**info, "steps_done": step, "train_seconds": round(seconds, 1)}, **cfg.extra}
    return ModelSpec(
        name=cfg.name,
        unet=cfg.unet_config(),
        beta_schedule=cfg.beta_schedule,
        num_train_timesteps=cfg.num_train_timesteps,
        extra=extra,
    )


def _export(cfg: TrainConfig, step: int, seconds: float, entries: dict[Path, EMA]) -> None:
    """Write each EMA to its folder as a model-store entry that records its decay."""
    for folder, ema in entries.items():
        save_model(_spec(cfg, step, seconds, ema_decay=ema.decay), ema.model, folder)


def _save_state(path: Path, step: int, seconds: float, model, ema: EMA, extra_emas: dict[float, EMA], opt,
                gens: dict, init_from: dict | None) -> None:
    state = {
        "step": step,
        "init_from": init_from,
        "seconds": seconds,
        "model": model.state_dict(),
        "ema": ema.model.state_dict(),
        "ema_updates": ema.updates,
        "extra_emas": {str(d): e.model.state_dict() for d, e in extra_emas.items()},
        "optimizer": opt.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "generators": {k: g.get_state() for k, g in gens.items()},
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: an interrupted save never corrupts the last good state


def train(cfg: TrainConfig, resume: bool = False, log=print) -> Path:
    """Train (or resume) and export the EMA model to ``cfg.out``; returns that folder."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    workdir = Path(cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")

    images = load_images(cfg.data, cfg.channels, cfg.image_size)
    train_idx, _ = split_indices(len(images), cfg.holdout, cfg.split_seed)
    data = to_model_range(images[train_idx])  # (N, C, H, W) in [-1, 1]
    cfg.extra = {**cfg.extra, "data": {"source": str(cfg.data), "images": len(images), "train": len(train_idx)}}

    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = UNet(cfg.unet_config()).train().to(device)
    ema = EMA(model, cfg.ema_decay)
    extra_emas = {d: EMA(model, d) for d in cfg.extra_ema_decays}
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    spec = _spec(cfg, 0, 0.0)
    schedule = spec.make_schedule()
    gens = {name: torch.Generator().manual_seed(cfg.seed * 7 + i) for i, name in enumerate(("batch", "noise"))}
    step, seconds = 0, 0.0

    state_path = workdir / STATE_FILE
    if resume and state_path.is_file():
        state = torch.load(state_path, weights_only=True, map_location="cpu")
        model.load_state_dict(state["model"])
        ema.model.load_state_dict(state["ema"])
        ema.updates = state["ema_updates"]
        for d, extra in extra_emas.items():
            # a decay added on resume starts from the exported EMA: exact while the warm-up still governs both
            extra.model.load_state_dict(state.get("extra_emas", {}).get(str(d), state["ema"]))
            extra.updates = ema.updates
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        for k, g in gens.items():
            g.set_state(state["generators"][k])
        step, seconds = state["step"], state["seconds"]
        if state.get("init_from"):  # a warm-started run keeps recording where it started
            cfg.extra = {**cfg.extra, "init_from": state["init_from"]}
        log(f"resumed from {state_path} at step {step}")
    elif cfg.init_from:
        cfg.extra = {**cfg.extra, "init_from": _warm_start(cfg, model, [ema, *extra_emas.values()])}
        log(f"warm start from {cfg.init_from} ({cfg.extra['init_from']['sha256'][:12]}): fresh optimizer, step 0")
    loss_log = workdir / LOSS_LOG
    if step == 0:
        loss_log.unlink(missing_ok=True)
    _trim_loss_log(loss_log, step)
    window: list[float] = []

    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    bar = Progress(cfg.steps, initial=step, desc="train")
    t0 = time.perf_counter() - seconds
    while step < cfg.steps:
        # Algorithm 1: x_0 ~ data, t ~ Uniform, ε ~ N(0, I), gradient step on ‖ε - ε_θ(x_t, t)‖²
        idx = torch.randint(0, len(data), (cfg.batch_size,), generator=gens["batch"])
        x0 = data[idx]
        t = torch.randint(0, cfg.num_train_timesteps, (cfg.batch_size,), generator=gens["noise"])
        eps = torch.randn(x0.shape, generator=gens["noise"])
        x_t = schedule.q_sample(x0, t, eps)
        for group in opt.param_groups:
            group["lr"] = _lr_at(cfg, step)
        weights = loss_weights(schedule.alphas_cumprod, t, cfg.min_snr_gamma)
        # the draws stay on the CPU generators: the same run on any device, resumable (.to is a no-op on the CPU)
        x_t, t, eps, weights = (v.to(device, non_blocking=True) for v in (x_t, t, eps, weights))
        with autocast:
            per_row = F.mse_loss(model(x_t, t).float(), eps, reduction="none").mean(dim=(1, 2, 3))
        loss = (weights * per_row).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        for e in (ema, *extra_emas.values()):
            e.update(model)
        step += 1
        seconds = time.perf_counter() - t0
        window.append(loss.item())
        bar.update(1, loss=f"{window[-1]:.4f}", img_s=f"{step * cfg.batch_size / max(seconds, 1e-9):.0f}")
        if step % cfg.log_every == 0 or step == cfg.steps:
            entry = {"step": step, "loss": sum(window) / len(window), "lr": _lr_at(cfg, step - 1), "seconds": seconds}
            with loss_log.open("a") as f:
                f.write(json.dumps(entry) + "\n")
            window.clear()

        if cfg.sample_every and step % cfg.sample_every == 0:
            preview = DiffusionModel(spec, ema.model, schedule, "")
            imgs = sample(preview, 16, seed=0, sampler="ddim", steps=20)
            (workdir / f"samples_{step:06d}.png").write_bytes(png_bytes(grid(imgs, nrow=4), scale=2))
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            _save_state(state_path, step, seconds, model, ema, extra_emas, opt, gens, cfg.extra.get("init_from"))
            _export(cfg, step, seconds,
                    {Path(cfg.out): ema, **{workdir / f"ema_{d:g}": e for d, e in extra_emas.items()}})
        if cfg.snapshot_every and step % cfg.snapshot_every == 0:
            snapshots, name = workdir / "snapshots", f"step_{step:06d}"
            _export(cfg, step, seconds,
                    {snapshots / name: ema, **{snapshots / f"ema_{d:g}" / name: e for d, e in extra_emas.items()}})
    bar.close()
    log(f"trained {step} steps in {seconds:.0f} s; EMA model written to {cfg.out}")
    return Path(cfg.out)
