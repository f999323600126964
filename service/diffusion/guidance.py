"""The noise-aware classifier p_φ(y | x_t, t) of classifier guidance (Dhariwal & Nichol 2021, arXiv:2105.05233).

Classifier guidance steers a class-agnostic ε-model towards a label y with the gradient of a classifier
trained on *noised* images x_t ~ q(x_t | x_0) at every t (section 4). For DDIM and the other ε-samplers
the guided noise prediction is (eq. 14, Algorithm 2)::

    ε̂(x_t) = ε_θ(x_t, t) − s · √(1 − ᾱ_t) · ∇_{x_t} log p_φ(y | x_t, t)

and for ancestral DDPM the mean shifts by s · Σ · ∇ log p_φ (Algorithm 1). This module holds the
serving half: the classifier, its file format and :func:`log_prob_grad`; the samplers and engine apply
the shift, and :mod:`service.train_guidance` trains the classifier.

The network is a small time-conditioned CNN in the spirit of the paper's half-UNet classifier: a
sinusoidal embedding of t → MLP → per-channel scale and shift of a GroupNorm in every residual block
("AdaGN", section 3 of the paper; FiLM, Perez et al. 2018), GroupNorm + SiLU, stride-2 convolutions
between resolution levels, global average pooling and a linear head. The default config has 241 k
parameters and costs 21.6 MFLOP per 28×28 image forward (the UNet: 2.7 M, ~580 MFLOP), so a gradient
(forward + backward ≈ 3×) costs about a ninth of a UNet step. (Short pilots on MNIST: the second 7×7
block buys ~1.5 points of accuracy at t ≤ 250 over the 18.4-MFLOP (16, 32, 64)/(0, 1, 1) variant.) GroupNorm keeps rows
independent: a row's gradient does not depend on the rest of the batch.

A model-store entry may hold one, beside ``config.json`` / ``model.safetensors``::

    guidance_classifier.safetensors  the state dict (float32)
    guidance_classifier.json         {"format": "ddpm-service-guidance/1", "config": {...},
                                      "sha256": <of the safetensors file>,
                                      "training": {split, steps, images_seen, command, wall_seconds, ...},
                                      "accuracy_by_t": {"0": 0.99, "250": 0.98, ...}, "test_split": "...",
                                      "recommended_guidance_scale": null | float}
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from service.diffusion.checkpoint import CheckpointError, sha256_file
from service.diffusion.unet import timestep_embedding

if TYPE_CHECKING:
    from service.diffusion.checkpoint import ModelSpec

__all__ = [
    "CONFIG_FILE",
    "FORMAT",
    "WEIGHTS_FILE",
    "GuidanceClassifier",
    "GuidanceClassifierConfig",
    "load_guidance_classifier",
    "log_prob_grad",
    "save_guidance_classifier",
]

FORMAT = "ddpm-service-guidance/1"
WEIGHTS_FILE = "guidance_classifier.safetensors"
CONFIG_FILE = "guidance_classifier.json"


@dataclass(frozen=True)
class GuidanceClassifierConfig:
    channels: int = 1  # image channels of x_t (the diffusion model's)
    image_size: int = 28  # H = W of x_t
    num_classes: int = 10  # digits 0-9
    widths: tuple[int, ...] = (16, 24, 64)  # channels per resolution level; level i works at image_size / 2^i
    blocks: tuple[int, ...] = (0, 1, 2)  # residual blocks per level (none at full resolution: the stem only)
    norm_groups: int = 8  # GroupNorm groups (must divide every width)
    time_freq_dim: int = 64  # size of the sinusoidal embedding of t
    time_embed_dim: int = 128  # width of the time MLP whose output conditions every block
    num_train_timesteps: int = 1000  # T of the diffusion schedule it was trained on (t in 0..T-1)

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        object.__setattr__(self, "blocks", tuple(int(b) for b in self.blocks))
        if not self.widths or len(self.blocks) != len(self.widths):
            raise ValueError(f"widths {self.widths} and blocks {self.blocks} must be non-empty and of equal length")
        if any(w % self.norm_groups for w in self.widths):
            raise ValueError(f"norm_groups {self.norm_groups} must divide every width {self.widths}")
        if self.num_train_timesteps < 1 or self.num_classes < 2:
            raise ValueError("num_train_timesteps must be >= 1 and num_classes >= 2")

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> GuidanceClassifierConfig:
        """Build from :meth:`to_dict`'s output; unknown keys are an error (a newer format, not silently dropped)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown guidance classifier config keys {unknown}")
        return cls(**d)


class _Block(nn.Module):
    """Residual block: GN → SiLU → conv, AdaGN(t) (GN · (1 + scale) + shift) → SiLU → conv, + x."""

    def __init__(self, ch: int, temb_ch: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, ch)
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, ch)
        self.film = nn.Linear(temb_ch, 2 * ch)  # → (scale, shift) per channel
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(temb)[:, :, None, None].chunk(2, dim=1)  # (B, C, 1, 1) each
        h = self.norm2(h) * (1 + scale) + shift
        return x + self.conv2(F.silu(h))


class GuidanceClassifier(nn.Module):
    """Logits of p_φ(y | x_t, t): x_t (B, C, H, W) float in the diffusion space, t (B,) long → (B, num_classes)."""

    def __init__(self, config: GuidanceClassifierConfig) -> None:
        super().__init__()
        self.config = config
        self.info: dict = {}  # the guidance_classifier.json record when loaded from a folder
        temb = config.time_embed_dim
        self.time_mlp = nn.Sequential(
            nn.Linear(config.time_freq_dim, temb), nn.SiLU(), nn.Linear(temb, temb), nn.SiLU()
        )
        self.stem = nn.Conv2d(config.channels, config.widths[0], 3, padding=1)
        self.levels = nn.ModuleList(
            nn.ModuleList(_Block(w, temb, config.norm_groups) for _ in range(n))
            for w, n in zip(config.widths, config.blocks, strict=True)
        )
        self.downs = nn.ModuleList(  # stride-2 conv between consecutive levels
            nn.Conv2d(w_in, w_out, 3, stride=2, padding=1)
            for w_in, w_out in zip(config.widths[:-1], config.widths[1:], strict=True)
        )
        self.out_norm = nn.GroupNorm(config.norm_groups, config.widths[-1])
        self.head = nn.Linear(config.widths[-1], config.num_classes)

    @property
    def recommended_guidance_scale(self) -> float | None:
        """The guidance scale s the training record recommends, if any (``None``: the caller's choice)."""
        s = self.info.get("recommended_guidance_scale")
        return None if s is None else float(s)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        dtype = self.stem.weight.dtype
        freqs = timestep_embedding(t, self.config.time_freq_dim, flip_sin_to_cos=True, freq_shift=0)
        temb = self.time_mlp(freqs.to(dtype))  # (B, time_embed_dim)
        h = self.stem(x.to(dtype))  # (B, widths[0], H, W)
        for i, blocks in enumerate(self.levels):
            if i > 0:
                h = self.downs[i - 1](h)  # (B, widths[i], ⌈H / 2^i⌉, ⌈W / 2^i⌉)
            for block in blocks:
                h = block(h, temb)
        h = F.silu(self.out_norm(h)).mean(dim=(2, 3))  # global average pool → (B, widths[-1])
        return self.head(h)


def log_prob_grad(classifier: nn.Module, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """∇_{x_t} log p_φ(y = labels | x_t, t), the shape of ``x_t``, in one batched forward + backward.

    With logits f(x) and p = softmax(f), log p(y | x) = f_y(x) − log Σ_k exp f_k(x), so
    ∇_x log p(y | x) = ∇_x f_y − Σ_k p_k ∇_x f_k (the log-softmax gradient; for a linear classifier
    f = W x + b it is W_y − Σ_k p_k W_k). The caller applies it: ε̂ = ε − s √(1 − ᾱ_t) · this
    (Dhariwal & Nichol eq. 14), or μ + s Σ · this for ancestral DDPM (their Algorithm 1).

    Safe to call inside ``torch.inference_mode()`` (the engine's step): autograd runs in a local
    ``inference_mode(False)`` + ``enable_grad`` block on fresh non-inference clones of x_t, t and the
    labels, with autocast off. It computes in the classifier's weight dtype — float32 for every
    classifier :func:`load_guidance_classifier` returns (a float64 classifier, as in the tests, gives
    float64) — and returns a detached tensor on x_t's device. Each row's sum of log-probabilities is
    differentiated together; the classifier's GroupNorms keep rows independent, so row i's gradient is
    that of its own log p(y_i | x_i, t_i).
    """
    try:
        param = next(classifier.parameters())
        dtype, device = param.dtype, param.device
    except StopIteration:
        dtype, device = torch.float32, x_t.device
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        x = x_t.detach().to(device=device, dtype=dtype).clone().requires_grad_(True)
        tt = t.detach().to(device=device, dtype=torch.long).clone().reshape(-1)
        y = labels.detach().to(device=device, dtype=torch.long).clone().reshape(-1)
        if tt.numel() == 1 and x.shape[0] != 1:
            tt = tt.expand(x.shape[0])
        logits = classifier(x, tt)  # (B, K)
        log_p = F.log_softmax(logits, dim=1).gather(1, y[:, None])  # (B, 1): log p(y_i | x_i, t_i)
        (grad,) = torch.autograd.grad(log_p.sum(), x)
    return grad.detach().to(x_t.device)


def save_guidance_classifier(model: GuidanceClassifier, folder: str | Path, info: dict) -> Path:
    """Write ``folder/guidance_classifier.safetensors`` and ``folder/guidance_classifier.json``; returns the folder.

    ``info`` holds the record beside the config: ``training`` (split, steps, images seen, command, wall
    time, ...), ``accuracy_by_t`` ({"t": accuracy}), ``test_split`` and ``recommended_guidance_scale``
    (``None`` unless given). The json gets the weights' sha256, checked at load.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    weights = folder / WEIGHTS_FILE
    save_file(state, str(weights), metadata={"format": FORMAT})
    record = {
        "format": FORMAT,
        "config": model.config.to_dict(),
        "sha256": sha256_file(weights),
        "training": {},
        "accuracy_by_t": {},
        "test_split": None,
        "recommended_guidance_scale": None,
    }
    record.update({k: v for k, v in info.items() if k not in ("format", "config", "sha256")})
    (folder / CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return folder


def load_guidance_classifier(
    folder: str | Path, device: str | torch.device = "cpu", *, spec: ModelSpec | None = None
) -> GuidanceClassifier | None:
    """The guidance classifier of a model-store entry, or ``None`` when it has no ``guidance_classifier.json``.

    Eval mode, ``requires_grad_(False)``, float32 on ``device``; ``.info`` is the json record. Raises
    :class:`~service.diffusion.checkpoint.CheckpointError` on a missing or tampered weights file (sha256),
    an unknown format, a bad config or weights that do not fit it. With ``spec`` (the diffusion model's),
    a classifier for other image channels/size or another T is refused too.
    """
    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        return None
    try:
        record = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        fmt = record.get("format") if isinstance(record, dict) else None
        raise CheckpointError(f"{config_path}: unknown format {fmt!r}, expected {FORMAT!r}")
    try:
        config = GuidanceClassifierConfig.from_dict(record["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{config_path}: invalid guidance classifier config: {exc!r}") from exc
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights} not found (named by {config_path})")
    actual = sha256_file(weights)
    if record.get("sha256") != actual:
        raise CheckpointError(
            f"sha256 mismatch for {weights}: {CONFIG_FILE} expects {record.get('sha256')}, file has {actual}; "
            "the weights were modified or corrupted"
        )
    if spec is not None:
        want = (spec.channels, spec.image_size, spec.num_train_timesteps)
        have = (config.channels, config.image_size, config.num_train_timesteps)
        if want != have:
            raise CheckpointError(f"{config_path}: classifier is for (channels, size, T) = {have}, the model is {want}")
    model = GuidanceClassifier(config)
    try:
        model.load_state_dict(load_file(str(weights)), strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{weights}: weights do not match the guidance classifier config: {exc}") from exc
    model = model.to(device).eval().requires_grad_(False)
    model.info = record
    return model
