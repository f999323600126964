"""The interface between the HTTP layer and the engine: requests, results, events and errors.

Routes depend only on :class:`EngineClient`; the engine in ``service.engine.batcher`` implements it.
No FastAPI here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from service.diffusion.conditioning import DEFAULT_GUIDANCE_SCALE, Conditioning, default_guidance_scale
from service.diffusion.samplers import Spacing
from service.diffusion.schedule import NoiseSchedule, VarianceType

if TYPE_CHECKING:
    from service.diffusion.checkpoint import DiffusionModel, EpsScale

__all__ = [
    "GUIDED_ROW_WEIGHT",
    "ClientQuotaError",
    "EngineClient",
    "EngineError",
    "EngineNotReadyError",
    "GenerationRequest",
    "GenerationResult",
    "ModelInfo",
    "ProgressEvent",
    "QueueFullError",
    "RequestCancelledError",
    "RequestHandle",
    "RequestTimeoutError",
]


class EngineError(RuntimeError):
    """The engine failed while running a request."""


class QueueFullError(EngineError):
    """The bounded queue has no room for the request's rows; retry after ``retry_after_s`` seconds."""

    reason = "queue_full"  # the ddpm_rejected_requests_total label

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ClientQuotaError(QueueFullError):
    """The request's client already has ``max_rows_per_client`` rows queued or running; others are still admitted."""

    reason = "client_quota"


class EngineNotReadyError(EngineError):
    """The engine is not running: not started yet, draining or stopped."""


class RequestTimeoutError(EngineError):
    """The request's deadline passed before it finished."""


class RequestCancelledError(EngineError):
    """The request was cancelled (e.g. the client disconnected)."""


GUIDED_ROW_WEIGHT = 2  # a guided row counts as 2 rows in the queue bound (GenerationRequest.queue_rows)


@dataclass(frozen=True)
class GenerationRequest:
    num_images: int  # rows of this request, 1..max_images_per_request
    seed: int  # row i draws all its noise from row_generator(seed, i)
    sampler: str = "ddpm"  # a name of service.diffusion.samplers.SAMPLERS
    steps: int = 1000  # length of the request's own timestep sequence (1..T, 1..T−1 for the ODE solvers)
    eta: float = 0.0  # DDIM stochasticity η in [0, 1]; ignored by the other samplers
    timestep_spacing: Spacing | None = None  # None = the model's default for the sampler
    timeout_s: float | None = None  # deadline relative to submission; None = engine default
    preview_every: int = 0  # emit a predicted-x_0 preview every k steps (0 = progress only)
    client: str | None = None  # whose share of the queue it uses (engine/admission.py); None = in-process caller
    request_id: str | None = None  # the caller's id for logs and error messages (HTTP: X-Request-ID)
    # conditioning (service.diffusion.conditioning), shared by all rows of the request:
    init_image: torch.Tensor | None = field(default=None, repr=False, compare=False)  # (C, H, W) in [-1, 1]
    strength: float = 1.0  # image-to-image: (0, 1], share of the plan run from the noised init_image; 1 = plain
    mask: torch.Tensor | None = field(default=None, repr=False, compare=False)  # (H, W) or (1|C, H, W); 1 = regenerate
    class_label: int | None = None  # classifier guidance towards this class (models with a guidance classifier)
    guidance_scale: float | None = None  # s >= 0; None = the classifier's recommended scale (else 1.0)
    jump_length: int = 1  # inpainting: RePaint resampling jump (with jump_n_sample > 1; ddpm/ddim)
    jump_n_sample: int = 1  # inpainting: RePaint resampling passes per jump point, 1..10; 1 = none

    @property
    def guided(self) -> bool:
        return self.class_label is not None and self.guidance_scale != 0

    @property
    def queue_rows(self) -> int:
        """Rows this request counts in the queue bound: a guided row weighs :data:`GUIDED_ROW_WEIGHT` (its classifier
        gradient costs extra work every step); image-to-image, inpainting and plain rows weigh 1."""
        return self.num_images * (GUIDED_ROW_WEIGHT if self.guided else 1)

    def conditioning(self, model: DiffusionModel) -> Conditioning | None:
        """The request's :class:`~service.diffusion.conditioning.Conditioning` (None when plain), with the model's
        default guidance scale filled in; ValueError for values out of range (``Conditioning.check`` does the rest)."""
        plain = (self.init_image is None and self.mask is None and self.class_label is None and self.strength == 1.0
                 and self.guidance_scale is None and self.jump_n_sample == 1 and self.jump_length == 1)
        if plain:
            return None
        scale = self.guidance_scale
        if scale is None:
            scale = default_guidance_scale(model) if self.class_label is not None else 0.0
        return Conditioning(self.init_image, self.strength, self.mask, self.class_label,
                            DEFAULT_GUIDANCE_SCALE if scale is None else scale, self.jump_length, self.jump_n_sample)


@dataclass(frozen=True)
class ProgressEvent:
    step: int  # steps finished by every row of the request, 1..total
    total: int  # the request's step count
    preview: torch.Tensor | None = None  # predicted x_0, (N, C, H, W) in [-1, 1], every k steps


@dataclass(frozen=True)
class GenerationResult:
    images: torch.Tensor  # (N, C, H, W) float32 in [-1, 1], on the CPU
    seed: int
    sampler: str
    steps: int
    eta: float
    timestep_spacing: Spacing
    queue_seconds: float = 0.0  # submission → first step
    total_seconds: float = 0.0  # submission → completion


@dataclass(frozen=True)
class ModelInfo:
    name: str
    sha256: str
    channels: int
    image_size: int
    num_train_timesteps: int
    beta_schedule: str
    variance_type: VarianceType
    clip_sample: bool
    ddpm_clip_range: float  # ±range DDPM clips x̂_0 to (the model's clip_sample_range; inf = no clip)
    device: str
    dtype: str
    schedule: NoiseSchedule = field(repr=False)
    default_steps: dict[str, int] = field(default_factory=dict)  # per sampler name
    max_steps: dict[str, int] = field(default_factory=dict)  # per sampler name
    default_timestep_spacing: dict[str, Spacing] = field(default_factory=dict)  # per sampler name
    # per sampler name: it steps with ε_θ/λ_t, λ or (λ at t = 0, λ at t = T-1) (1 = none; checkpoint.eps_scale_at)
    eps_scale: dict[str, EpsScale] = field(default_factory=dict)
    conditioning: tuple[str, ...] = ()  # what requests may ask for: image_to_image, inpainting, class_guidance
    num_classes: int | None = None  # class_label range 0..num_classes-1 (None: no guidance classifier)
    default_guidance_scale: float | None = None  # the scale a guided request without one gets


class RequestHandle(Protocol):
    """A submitted request."""

    id: str
    seed: int

    async def result(self) -> GenerationResult:
        """The images; raises RequestTimeoutError, RequestCancelledError or EngineError."""
        ...

    def events(self) -> AsyncIterator[ProgressEvent]:
        """Progress events in order; ends when the request finishes (then call ``result``)."""
        ...

    def cancel(self) -> None:
        """Drop the request's rows at the next iteration (idempotent)."""
        ...


class EngineClient(Protocol):
    """What the HTTP layer may do with the engine."""

    @property
    def model_info(self) -> ModelInfo: ...

    @property
    def ready(self) -> bool:
        """True once the model is loaded and warm and the engine admits work (false while draining)."""
        ...

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue a request; raises QueueFullError at once when full, EngineNotReadyError when draining."""
        ...

    async def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """One UNet forward ε_θ(x_t, t) on the engine's worker, x_t (B, C, H, W), t (B,); float32 CPU result."""
        ...

    def stats(self) -> dict[str, float]:
        """Queue depth (requests, rows), active rows, iterations, evicted rows, etc."""
        ...
