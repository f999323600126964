"""Model-store entries: ``config.json`` + ``model.safetensors`` (sha256-checked), and diffusers folders.

A model-store entry is a folder::

    config.json        {"format", "name", "unet", "schedule", "variance_type", "clip_sample",
                        "sampling": {"timestep_spacing" (one, or one per sampler), "steps_offset", …,
                                     "eps_scale" (one, or one per sampler: λ, or [λ at t = 0, λ at t = T-1])},
                        "image": {"channels", "size", "value_range"}, "weights": {"file", "sha256"}}
    model.safetensors  the UNet state dict (diffusers UNet2DModel key names)
    guidance_classifier.{json,safetensors}  optional: the classifier of classifier guidance (diffusion/guidance.py)

Only safetensors are read on this path: a pickle is code execution. A diffusers ``UNet2DModel``
folder (``config.json`` + ``diffusion_pytorch_model.safetensors`` [+ ``scheduler_config.json``],
or the same under ``unet/`` and ``scheduler/``) loads directly or converts with
:func:`import_diffusers`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from service.diffusion.samplers import SAMPLERS, SamplerOptions, Spacing, get_sampler
from service.diffusion.schedule import NoiseSchedule, VarianceType
from service.diffusion.unet import UNet, UNetConfig, convert_legacy_attention_keys

if TYPE_CHECKING:
    from service.diffusion.guidance import GuidanceClassifier

__all__ = [
    "CheckpointError",
    "DiffusionModel",
    "ModelSpec",
    "import_diffusers",
    "is_model_folder",
    "load_model",
    "save_model",
    "sha256_file",
]

FORMAT = "ddpm-service/1"
WEIGHTS_FILE = "model.safetensors"
DIFFUSERS_WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
SAMPLING_OPTIONS = frozenset(f.name for f in fields(SamplerOptions))
MODEL_OPTIONS = frozenset({"variance_type", "clip_sample", "beta_schedule"})  # top-level config keys, not "sampling"
# scheduler_config.json keys that carry over (diffusers' from_config passes them to every scheduler class)
SAMPLING_KEYS = ("timestep_spacing", "steps_offset", "set_alpha_to_one", "lower_order_final", "clip_sample_range")


class CheckpointError(ValueError):
    """A model folder that cannot be loaded: missing files, bad config or a hash mismatch."""


EpsScale = float | tuple[float, float]  # Epsilon Scaling: one λ, or λ at t = 0 and at t = T-1 (linear between)


def eps_scale_at(scale: EpsScale, t: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """λ_t of Epsilon Scaling at each timestep of ``t`` (float32, t's shape): ``scale`` itself, or
    λ_t = λ_0 + (λ_{T-1} - λ_0)·t/(T-1), Ning et al. 2023's linear schedule λ_t = k·t + b."""
    if not isinstance(scale, tuple):
        return torch.full(t.shape, scale, dtype=torch.float32, device=t.device)
    first, last = scale
    return first + (last - first) * t.to(torch.float32) / (num_train_timesteps - 1)


@dataclass
class ModelSpec:
    """Everything about a model except its weights: what config.json holds."""

    name: str
    unet: UNetConfig
    beta_schedule: str = "linear"  # "linear" (DDPM) or "cosine" (Nichol & Dhariwal)
    num_train_timesteps: int = 1000  # T
    beta_start: float = 1e-4  # β_1 (linear schedule)
    beta_end: float = 0.02  # β_T (linear schedule); the source note's 0.002 is a typo
    variance_type: VarianceType = "fixed_small"  # σ_t² = β̃_t or β_t
    clip_sample: bool = True  # clip x̂_0 to [-1, 1] while sampling (DDPM, DDIM)
    sampling: dict = field(default_factory=dict)  # scheduler settings: timestep_spacing, steps_offset, … (see below)
    extra: dict = field(default_factory=dict)  # free-form metadata (training, data)

    def __post_init__(self) -> None:
        """Check ``sampling``: known keys, and spacings each named sampler supports."""
        known = (SAMPLING_OPTIONS - MODEL_OPTIONS) | {"timestep_spacing", "eps_scale"}
        unknown = sorted(set(self.sampling) - known)
        if unknown:
            raise CheckpointError(f"unknown sampling settings {unknown}; known: {sorted(known)}")
        spacing = self.sampling.get("timestep_spacing")
        per_sampler = spacing if isinstance(spacing, dict) else {n: spacing for n in SAMPLERS} if spacing else {}
        for name, value in per_sampler.items():
            if name not in SAMPLERS:
                raise CheckpointError(f"sampling.timestep_spacing names unknown sampler {name!r}")
            if value not in SAMPLERS[name].spacings:
                raise CheckpointError(f"sampling.timestep_spacing {value!r} is not supported by {name!r}")
        scale = self.sampling.get("eps_scale", {})
        for name, value in (scale if isinstance(scale, dict) else {"*": scale}).items():
            if name != "*" and name not in SAMPLERS:
                raise CheckpointError(f"sampling.eps_scale names unknown sampler {name!r}")
            ends = value if isinstance(value, list | tuple) and len(value) == 2 else [value]
            if not all(isinstance(v, int | float) and not isinstance(v, bool) and 0.5 <= v <= 2.0 for v in ends):
                raise CheckpointError("sampling.eps_scale must be a number in [0.5, 2] or two of them "
                                      f"(λ at t = 0 and at t = T-1), got {value!r}")

    @property
    def options(self) -> SamplerOptions:
        """The settings every sampler's plan reads (with the model's variance type and clipping)."""
        given = {k: v for k, v in self.sampling.items() if k in SAMPLING_OPTIONS - MODEL_OPTIONS}
        return SamplerOptions(variance_type=self.variance_type, clip_sample=self.clip_sample,
                              beta_schedule=self.beta_schedule, **given)

    def default_spacing(self, sampler: str) -> Spacing:
        """The model's spacing for ``sampler`` (one for all, or per sampler), else the diffusers class's default."""
        spacing = self.sampling.get("timestep_spacing")
        if isinstance(spacing, dict):
            spacing = spacing.get(sampler)
        return spacing or get_sampler(sampler).default_spacing

    def eps_scale(self, sampler: str) -> EpsScale:
        """λ of Epsilon Scaling (Ning et al. 2023) for ``sampler``: its rows step with ε_θ/λ_t (one setting for all
        samplers, or one per sampler). One λ for every t, or (λ at t = 0, λ at t = T-1): λ_t linear in t between,
        the paper's λ_t = k·t + b. 1 = the network's ε as it is."""
        scale = self.sampling.get("eps_scale", 1.0)
        value = scale.get(sampler, 1.0) if isinstance(scale, dict) else scale
        return (float(value[0]), float(value[1])) if isinstance(value, list | tuple) else float(value)

    @property
    def channels(self) -> int:
        return self.unet.in_channels

    @property
    def image_size(self) -> int:
        return self.unet.sample_size

    def make_schedule(self) -> NoiseSchedule:
        return NoiseSchedule.create(
            self.beta_schedule, self.num_train_timesteps, self.beta_start, self.beta_end  # type: ignore[arg-type]
        )

    def to_config(self, sha256: str) -> dict:
        return {
            "format": FORMAT,
            "name": self.name,
            "unet": self.unet.to_dict(),
            "schedule": {
                "beta_schedule": self.beta_schedule,
                "num_train_timesteps": self.num_train_timesteps,
                "beta_start": self.beta_start,
                "beta_end": self.beta_end,
            },
            "variance_type": self.variance_type,
            "clip_sample": self.clip_sample,
            "sampling": self.sampling,
            "image": {"channels": self.channels, "size": self.image_size, "value_range": [-1.0, 1.0]},
            "weights": {"file": WEIGHTS_FILE, "sha256": sha256},
            "extra": self.extra,
        }

    @classmethod
    def from_config(cls, cfg: dict) -> ModelSpec:
        try:
            sched = cfg["schedule"]
            return cls(
                name=cfg["name"],
                unet=UNetConfig.from_dict(cfg["unet"]),
                beta_schedule=sched["beta_schedule"],
                num_train_timesteps=int(sched["num_train_timesteps"]),
                beta_start=float(sched["beta_start"]),
                beta_end=float(sched["beta_end"]),
                variance_type=cfg["variance_type"],
                clip_sample=bool(cfg["clip_sample"]),
                sampling=cfg.get("sampling", {}),
                extra=cfg.get("extra", {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"invalid model config: {exc!r}") from exc


@dataclass
class DiffusionModel:
    """A loaded model: its spec, the UNet (eval mode), the noise schedule and the weights' sha256."""

    spec: ModelSpec
    unet: UNet
    schedule: NoiseSchedule
    sha256: str
    folder: Path | None = None  # where it was loaded from (compiled artifacts live in <folder>/compiled)
    guidance: GuidanceClassifier | None = None  # p(y | x_t, t) for classifier guidance, when the entry has one

    @property
    def name(self) -> str:
        return self.spec.name


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def save_model(spec: ModelSpec, unet: UNet, folder: str | Path) -> Path:
    """Write ``folder/model.safetensors`` and ``folder/config.json`` (with the weights' sha256)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in unet.state_dict().items()}
    weights = folder / WEIGHTS_FILE
    save_file(state, str(weights), metadata={"format": "pt"})
    config = spec.to_config(sha256_file(weights))
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def _build(spec: ModelSpec, state: dict[str, torch.Tensor], sha256: str, device: str | torch.device) -> DiffusionModel:
    unet = UNet(spec.unet)
    try:
        unet.load_state_dict(convert_legacy_attention_keys(state), strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"weights do not match the UNet config: {exc}") from exc
    unet = unet.to(device).eval().requires_grad_(False)
    return DiffusionModel(spec, unet, spec.make_schedule(), sha256)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path} not found") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc


def _diffusers_paths(folder: Path) -> tuple[Path, Path, Path] | None:
    for unet_dir, sched_dir in ((folder, folder), (folder / "unet", folder / "scheduler")):
        if (unet_dir / DIFFUSERS_WEIGHTS_FILE).is_file():
            return unet_dir / "config.json", unet_dir / DIFFUSERS_WEIGHTS_FILE, sched_dir / "scheduler_config.json"
    return None


def _diffusers_spec(folder: Path, name: str | None) -> tuple[ModelSpec, Path]:
    paths = _diffusers_paths(folder)
    if paths is None:
        raise CheckpointError(f"{folder} holds neither {WEIGHTS_FILE} nor {DIFFUSERS_WEIGHTS_FILE}")
    config_path, weights, sched_path = paths
    unet_cfg = _read_json(config_path)
    if unet_cfg.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise CheckpointError(f"{config_path}: only UNet2DModel is supported, got {unet_cfg['_class_name']}")
    sched = _read_json(sched_path) if sched_path.is_file() else {}
    kind = {"linear": "linear", "squaredcos_cap_v2": "cosine"}.get(sched.get("beta_schedule", "linear"))
    if kind is None:
        raise CheckpointError(f"{sched_path}: unsupported beta_schedule {sched['beta_schedule']!r}")
    if sched.get("prediction_type", "epsilon") != "epsilon":
        raise CheckpointError(f"{sched_path}: only epsilon prediction is supported")
    if sched.get("thresholding", False):
        raise CheckpointError(f"{sched_path}: dynamic thresholding is not supported")
    sampling = {k: sched[k] for k in SAMPLING_KEYS if k in sched}
    try:
        unet = UNetConfig.from_dict(unet_cfg)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{config_path}: {exc}") from exc
    spec = ModelSpec(
        name=name or folder.resolve().name,
        unet=unet,
        beta_schedule=kind,
        num_train_timesteps=int(sched.get("num_train_timesteps", 1000)),
        beta_start=float(sched.get("beta_start", 1e-4)),
        beta_end=float(sched.get("beta_end", 0.02)),
        variance_type=sched.get("variance_type", "fixed_small"),
        clip_sample=bool(sched.get("clip_sample", True)),
        sampling=sampling,
        extra={"imported_from": "diffusers"},
    )
    if spec.variance_type not in ("fixed_small", "fixed_large"):
        raise CheckpointError(f"{sched_path}: unsupported variance_type {spec.variance_type!r}")
    return spec, weights


def is_model_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a model :func:`load_model` can read (a model-store entry or a diffusers folder)."""
    store_entry = (folder / "config.json").is_file() and (folder / WEIGHTS_FILE).is_file()
    return store_entry or _diffusers_paths(folder) is not None


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> DiffusionModel:
    """Load a model-store entry (hash verified) or a diffusers folder, in eval mode on ``device``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"model folder {folder} does not exist")
    config_path = folder / "config.json"
    if config_path.is_file() and (folder / WEIGHTS_FILE).is_file():
        cfg = _read_json(config_path)
        if cfg.get("format") != FORMAT:
            raise CheckpointError(f"{config_path}: unknown format {cfg.get('format')!r}, expected {FORMAT!r}")
        spec = ModelSpec.from_config(cfg)
        weights = folder / cfg.get("weights", {}).get("file", WEIGHTS_FILE)
        expected = cfg.get("weights", {}).get("sha256")
        actual = sha256_file(weights)
        if expected != actual:
            raise CheckpointError(
                f"sha256 mismatch for {weights}: config.json expects {expected}, file has {actual}; "
                "the weights were modified or corrupted"
            )
    else:
        spec, weights = _diffusers_spec(folder, None)
        actual = sha256_file(weights)
    model = _build(spec, load_file(str(weights)), actual, device)
    model.folder = folder
    from service.diffusion.guidance import load_guidance_classifier  # it imports this module

    model.guidance = load_guidance_classifier(folder, device, spec=spec)
    return model


def import_diffusers(src: str | Path, dst: str | Path, name: str | None = None) -> Path:
    """Convert a diffusers UNet2DModel folder into a model-store entry at ``dst``."""
    spec, weights = _diffusers_spec(Path(src), name or Path(dst).resolve().name)
    model = _build(spec, load_file(str(weights)), "", "cpu")
    return save_model(spec, model.unet, dst)
