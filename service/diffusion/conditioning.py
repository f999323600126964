"""Steering the reverse process per request: image-to-image (SDEdit), inpainting (RePaint), classifier guidance.

A request's :class:`Conditioning` is shared by its rows (:class:`~service.diffusion.rows.RowGroup`); plain rows
carry none and run exactly as before (no extra noise draws, no extra tensors). Rows of every mode share one UNet
forward: the conditioning acts on a row's start, on its ε after the forward, and on its x after the sampler's
update, never on the forward itself. Every random number comes from the row's own generator, in a fixed order
(below), so a conditioned request gives the same images alone or amid other traffic.

**Image-to-image** (SDEdit, Meng et al. 2022), with the rule of diffusers' img2img pipelines (``get_timesteps``).
For a sampler plan of S steps and strength s ∈ (0, 1]::

    init_timestep = min(⌊S·s⌋, S),   t_start = S − init_timestep

the row runs steps t_start … S−1 of its plan (a tail :class:`~service.diffusion.samplers.Plan` with ``first =
t_start`` and its own memo, so a multistep solver starts it at first order with an empty history, as diffusers'
``set_begin_index`` does), starting from q(x_t | x_0) (DDPM eq. 4)::

    x = √ᾱ x_0 + √(1 − ᾱ) z,   ᾱ = plan.alphas_cumprod[t_start]  (the ᾱ the sampler assigns x at that step)

where z is the row's first draw — the draw plain generation uses as x_T. ⌊S·s⌋ must be ≥ 1 (diffusers refuses a
strength that leaves no step, too). **s = 1 is plain generation exactly**: x = z and the init image is ignored
(the rule of diffusers' inpainting pipelines, "strength 1 starts from pure noise"; their img2img pipelines would
noise x_0 to ᾱ of the first step instead, which keeps √ᾱ ≈ 0.006 of x_0 at t = 999).

**Inpainting** (RePaint, Lugmayr et al. 2022, eq. 8). With m = 1 where the mask regenerates, after every step i::

    x ← m ⊙ x + (1 − m) ⊙ (√ᾱ' x_0 + √(1 − ᾱ') z'),   ᾱ' = plan.alphas_cumprod_next[i], and ᾱ' = 1 at the last step

so the known pixels are x_0 exactly at the end (and in every x̂_0 preview). It composes with image-to-image (the
row starts from the noised init image) and with every sampler. UniPC's corrector redoes each step from its own
copy of the previous x, not from the x it is given; that copy gets the known pixels of x too, or the known region
would only reach the row through ε. A mask of all ones is plain image-to-image (or generation); a mask of all
zeros has nothing to regenerate: the row runs only the plan's last step and returns the init image exactly.

*Resampling* (RePaint, section 4.2; ``jump_length`` j, ``jump_n_sample`` r). The generated pixels see the known ones
only through each step's ε, and the coarse shape is decided at high noise, where the known pixels are mostly noise;
resampling lets the two harmonise. Measured on the MNIST model (lower half regenerated, 80 test digits, the share
the evaluator's classifier labels correctly): plain RePaint 53 % (DDIM-50, η = 0) to 71 % (η = 1), no better with
more steps (DDIM-100: 54 %) or a few jumps (DDIM-25, j = 5, r = 5: 71 %); DDIM-25 j = 3 r = 10 (214 steps) 78 %,
DDIM-50 η = 1 j = 5 r = 10 (455 steps) 82.5 % (``bench/conditioning.py`` measures it at N = 200). Every j-th level
counted back from the end of the plan (levels j … S−1 steps done) is a jump point: on reaching it the row goes back
j levels by the forward process, x ← √(ᾱ_to/ᾱ_from) x + √(1 − ᾱ_to/ᾱ_from) z'' (q(x_{t+j} | x_t)), and denoises
them again, r − 1 times per point. The row's plan then holds every step it takes, ≈ r·S in all, and that is its
step count. Only for samplers without per-row history (ddpm, ddim: a multistep solver's history does not survive
a jump), and bounded: r ≤ :data:`MAX_JUMP_N_SAMPLE` and the resampled plan within the sampler's step limit (T), so
a request never asks for more forwards per row than a plain T-step DDPM request.

**Classifier guidance** (Dhariwal & Nichol 2021, eq. 14): after the one UNet forward, one batched call of
:func:`service.diffusion.guidance.log_prob_grad` over the guided rows only (their x, the t the UNet saw, their
labels) gives ∇ₓ log p_φ(y | x_t, t), and::

    ε̂ = ε_θ(x_t, t) − s √(1 − ᾱ_t) ∇ₓ log p_φ(y | x_t, t),   ᾱ_t = plan.alphas_cumprod[i]

replaces ε before the sampler's update, so it composes with every sampler. Where the sampler clips x̂_0 (ddpm,
ddim with the model's ``clip_sample``) the clip comes first and ε is re-derived from the clipped x̂_0 before the
shift, with no clip after it (guided-diffusion's ``condition_score`` order; see :func:`guide`). s = 0 is plain
generation (no classifier call); ``guidance_scale=None`` in a request means the classifier's recommended scale, else
:data:`DEFAULT_GUIDANCE_SCALE`.

Draw order of a row's generator: z (start), then per step the sampler's z (when it draws one), RePaint's z' (when
ᾱ' < 1) and the jump's z'' (at a jump point).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from service.diffusion.samplers import Plan, get_sampler

if TYPE_CHECKING:
    from service.diffusion.checkpoint import DiffusionModel

__all__ = [
    "CONDITIONING_KINDS",
    "DEFAULT_GUIDANCE_SCALE",
    "MAX_GUIDANCE_SCALE",
    "MAX_JUMP_N_SAMPLE",
    "Conditioning",
    "RowConditioning",
    "after_step",
    "conditioned_plan",
    "default_guidance_scale",
    "guide",
    "jump_schedule",
    "num_classes",
    "q_sample",
    "start_index",
    "supported_conditioning",
]

CONDITIONING_KINDS = ("image_to_image", "inpainting", "class_guidance")
DEFAULT_GUIDANCE_SCALE = 1.0  # s = 1: p(x) p(y | x)^s is the Bayes posterior p(x | y) itself
MAX_GUIDANCE_SCALE = 100.0
MAX_JUMP_N_SAMPLE = 10


def _finite(value: float, name: str) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value


@dataclass(frozen=True, eq=False)
class Conditioning:
    """One request's steering, broadcast to its rows (module docstring). Construction validates and copies.

    ``strength = 1`` ignores ``init_image`` unless a mask keeps some of it: that is plain generation exactly.
    """

    init_image: torch.Tensor | None = None  # (C, H, W) float32 in [-1, 1]: SDEdit's x_0, RePaint's known image
    strength: float = 1.0  # (0, 1]: the share of the plan run from the noised init image; 1 = from pure noise
    mask: torch.Tensor | None = None  # (H, W), (1, H, W) or (C, H, W) in {0, 1}: 1 = regenerate, 0 = keep x_0
    class_label: int | None = None  # the class classifier guidance steers to
    guidance_scale: float = 0.0  # s of eq. 14, in [0, MAX_GUIDANCE_SCALE]; 0 = no guidance
    jump_length: int = 1  # RePaint resampling: levels jumped back at each jump point
    jump_n_sample: int = 1  # RePaint resampling: passes over each jump point; 1 = none

    def __post_init__(self) -> None:
        set_ = functools.partial(object.__setattr__, self)
        if self.init_image is not None:
            x = torch.as_tensor(self.init_image).detach().to("cpu", torch.float32)
            if x.ndim != 3:
                raise ValueError(f"init_image must have shape (C, H, W), got {tuple(x.shape)}")
            if not bool(torch.isfinite(x).all()):
                raise ValueError("init_image has NaN or infinite values")
            if x.numel() and (float(x.min()) < -1.0 - 1e-4 or float(x.max()) > 1.0 + 1e-4):
                raise ValueError(f"init_image values must be in [-1, 1], "
                                 f"got [{float(x.min()):.3g}, {float(x.max()):.3g}]")
            set_("init_image", x.clamp(-1.0, 1.0).contiguous())
        strength = _finite(self.strength, "strength")
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        set_("strength", strength)
        if strength < 1.0 and self.init_image is None:
            raise ValueError("strength < 1 needs an init_image (strength 1 is plain generation)")
        if self.mask is not None:
            if self.init_image is None:
                raise ValueError("a mask needs an init_image: the image whose unmasked pixels are kept")
            m = torch.as_tensor(self.mask).detach().to("cpu", torch.float32)
            m = m[None] if m.ndim == 2 else m
            c, h, w = self.init_image.shape
            if m.ndim != 3 or m.shape[0] not in (1, c) or tuple(m.shape[1:]) != (h, w):
                raise ValueError(f"mask must have shape ({h}, {w}), (1, {h}, {w}) or ({c}, {h}, {w}) like the "
                                 f"init_image, got {tuple(torch.as_tensor(self.mask).shape)}")
            if not bool(((m == 0) | (m == 1)).all()):
                raise ValueError("mask values must be 0 (keep) or 1 (regenerate)")
            set_("mask", m.contiguous())
        if self.class_label is not None:
            if isinstance(self.class_label, bool) or int(self.class_label) != self.class_label or self.class_label < 0:
                raise ValueError(f"class_label must be an integer >= 0, got {self.class_label!r}")
            set_("class_label", int(self.class_label))
        scale = _finite(self.guidance_scale, "guidance_scale")
        if not 0.0 <= scale <= MAX_GUIDANCE_SCALE:
            raise ValueError(f"guidance_scale must be in [0, {MAX_GUIDANCE_SCALE:g}], got {scale}")
        if scale > 0 and self.class_label is None:
            raise ValueError("guidance_scale needs a class_label")
        set_("guidance_scale", scale)
        if int(self.jump_length) != self.jump_length or self.jump_length < 1:
            raise ValueError(f"jump_length must be an integer >= 1, got {self.jump_length}")
        if int(self.jump_n_sample) != self.jump_n_sample or not 1 <= self.jump_n_sample <= MAX_JUMP_N_SAMPLE:
            raise ValueError(f"jump_n_sample must be an integer in 1..{MAX_JUMP_N_SAMPLE}, got {self.jump_n_sample}")
        set_("jump_length", int(self.jump_length))
        set_("jump_n_sample", int(self.jump_n_sample))
        if self.jump_n_sample > 1 and self.mask is None:
            raise ValueError("resampling (jump_n_sample > 1) is part of inpainting: it needs a mask")

    # ------------------------------------------------------------------ what it asks for
    @property
    def guided(self) -> bool:
        """Classifier guidance with s > 0 (s = 0 is plain: the classifier is not called)."""
        return self.class_label is not None and self.guidance_scale > 0

    @property
    def keeps_all(self) -> bool:
        """A mask of all zeros: nothing to regenerate, the row returns the init image."""
        return self.mask is not None and not bool(self.mask.any())

    @property
    def resampling(self) -> bool:
        return self.jump_n_sample > 1 and self.mask is not None and not self.keeps_all

    def effective(self) -> Conditioning | None:
        """The same request with what cannot change the images dropped; None when it is plain generation.

        A mask of all ones regenerates everything: plain image-to-image (or generation at strength 1). At strength 1
        without a mask the init image is ignored.
        """
        c = self
        if c.mask is not None and bool(c.mask.all()):
            c = replace(c, mask=None, jump_length=1, jump_n_sample=1)
        if c.mask is None and c.strength >= 1.0 and c.init_image is not None:
            c = replace(c, init_image=None)
        if c.init_image is None and not c.guided:
            return None
        return c

    def row_steps(self, steps: int) -> int:
        """The steps (UNet forwards) a row of this request runs on a plan of ``steps``: the image-to-image tail,
        resampled (with ``jump_n_sample > 1``); ``steps`` when neither applies."""
        c = self.effective()
        if c is None:
            return steps
        n = steps - start_index(c, steps)
        return len(jump_schedule(n, c.jump_length, c.jump_n_sample)[0]) if c.resampling else n

    # ------------------------------------------------------------------ against a model and a sampler
    def check(self, model: DiffusionModel, sampler: str, steps: int) -> None:
        """ValueError when this model or sampler plan cannot run it (shapes, classes, strength, resampling)."""
        spec = model.spec
        shape = (spec.channels, spec.image_size, spec.image_size)
        if self.init_image is not None and tuple(self.init_image.shape) != shape:
            raise ValueError(f"init_image must have the model's shape (C, H, W) = {shape}, "
                             f"got {tuple(self.init_image.shape)}")
        if self.class_label is not None:
            if model.guidance is None:
                raise ValueError("class_label: this model has no guidance classifier")
            k = num_classes(model.guidance)
            if k is not None and self.class_label >= k:
                raise ValueError(f"class_label must be in 0..{k - 1}, got {self.class_label}")
        c = self.effective()
        if c is None:
            return
        if c.init_image is not None and c.strength < 1.0 and not c.keeps_all and int(steps * c.strength) < 1:
            raise ValueError(f"strength {c.strength} leaves no step of {steps}: "
                             f"need strength >= 1/steps = {1 / steps:.4g}, or more steps")
        if c.resampling:
            s = get_sampler(sampler)
            if not s.supports_resampling:
                raise ValueError(f"resampling (jump_n_sample > 1) works with the samplers that keep no history "
                                 f"(ddpm, ddim), not {sampler!r}")
            n = c.row_steps(steps)
            top = s.max_steps(spec.num_train_timesteps)
            if n > top:
                raise ValueError(f"resampling makes {n} steps (jump_length={c.jump_length}, "
                                 f"jump_n_sample={c.jump_n_sample}, {steps} steps); at most {top}")


def default_guidance_scale(model: DiffusionModel) -> float | None:
    """The scale a request without one gets: the classifier's recommended one, else the default; None: no classifier."""
    if model.guidance is None:
        return None
    recommended = getattr(model.guidance, "recommended_guidance_scale", None)
    return float(recommended) if recommended is not None else DEFAULT_GUIDANCE_SCALE


def num_classes(classifier: torch.nn.Module) -> int | None:
    """How many classes a guidance classifier tells apart (None if it does not say)."""
    for owner in (classifier, getattr(classifier, "config", None), getattr(classifier, "cfg", None)):
        k = getattr(owner, "num_classes", None)
        if k is not None:
            return int(k)
    return None


def supported_conditioning(model: DiffusionModel) -> tuple[str, ...]:
    """The conditioning kinds a model serves: image-to-image and inpainting always, guidance with a classifier."""
    return CONDITIONING_KINDS if model.guidance is not None else CONDITIONING_KINDS[:2]


# ---------------------------------------------------------------------- plans
def start_index(cond: Conditioning, steps: int) -> int:
    """The plan index a row starts at: diffusers' ``t_start = S − min(⌊S·s⌋, S)``; the last step for an all-0 mask."""
    if cond.keeps_all:
        return steps - 1
    if cond.init_image is None or cond.strength >= 1.0:
        return 0
    return steps - min(int(steps * cond.strength), steps)


def jump_schedule(n: int, jump_length: int, jump_n_sample: int) -> tuple[tuple[int, ...], frozenset[int]]:
    """RePaint's resampling schedule over a plan of ``n`` steps: (the plan indices visited, in order; the positions
    in that sequence after which x jumps back ``jump_length`` levels).

    Jump points are the levels L (steps done) with jump_length ≤ L < n and (n − L) divisible by ``jump_length``;
    each is passed ``jump_n_sample`` times. ``jump_n_sample = 1`` is the plan itself.
    """
    left = {level: jump_n_sample - 1 for level in range(n - jump_length, jump_length - 1, -jump_length)}
    seq: list[int] = []
    jumps: set[int] = set()
    i = 0
    while i < n:
        seq.append(i)
        level = i + 1
        if left.get(level, 0) > 0:
            left[level] -= 1
            jumps.add(len(seq) - 1)
            i = level - jump_length
        else:
            i = level
    return tuple(seq), frozenset(jumps)


@functools.lru_cache(maxsize=256)
def _tail(plan: Plan, start: int, jump_length: int, jump_n_sample: int) -> tuple[Plan, frozenset[int]]:
    seq, jumps = jump_schedule(len(plan) - start, jump_length, jump_n_sample)
    seq = tuple(start + k for k in seq)
    sub = Plan(plan.sampler, plan.spacing, tuple(plan.timesteps[k] for k in seq),
               tuple(plan.alphas_cumprod[k] for k in seq), tuple(plan.alphas_cumprod_next[k] for k in seq),
               plan.options, first=plan.first + start)
    return sub, jumps


def conditioned_plan(plan: Plan, cond: Conditioning) -> tuple[Plan, frozenset[int]]:
    """The plan a conditioned row runs (its image-to-image tail, resampled), and its jump positions.

    The plan itself when neither applies; else one shared per (plan, start, jumps), with its own memo.
    """
    start = start_index(cond, len(plan))
    jl, jn = (cond.jump_length, cond.jump_n_sample) if cond.resampling else (1, 1)
    if start == 0 and jn == 1:
        return plan, frozenset()
    return _tail(plan, start, jl, jn)


# ---------------------------------------------------------------------- rows
def q_sample(x0: torch.Tensor, abar: float, z: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ x_0 + √(1 − ᾱ) z — DDPM eq. (4)."""
    return math.sqrt(abar) * x0 + math.sqrt(1.0 - abar) * z


@dataclass(eq=False)
class RowConditioning:
    """A request's conditioning prepared on the model's device, broadcast to its rows."""

    source: Conditioning
    known: torch.Tensor | None  # x_0 of the init image, (1, C, H, W); None without one
    regenerate: torch.Tensor | None  # (1, 1 or C, H, W) bool: True = generated, False = kept from x_0
    labels: torch.Tensor | None  # (n,) long: the class each row is guided to; None when not guided
    jumps: frozenset[int]  # plan indices after which x jumps back (RePaint resampling)

    @classmethod
    def prepare(
        cls, cond: Conditioning, rows: int, device: torch.device | str, jumps: frozenset[int]
    ) -> RowConditioning:
        known = cond.init_image[None].to(device) if cond.init_image is not None else None
        regenerate = cond.mask[None].to(device) > 0.5 if cond.mask is not None else None
        labels = torch.full((rows,), cond.class_label, dtype=torch.long, device=device) if cond.guided else None
        return cls(cond, known, regenerate, labels, jumps)

    @property
    def guided(self) -> bool:
        return self.labels is not None

    @property
    def scale(self) -> float:
        return self.source.guidance_scale

    def start(self, plan: Plan, z: torch.Tensor) -> torch.Tensor:
        """x at the plan's first step: q(x_t | x_0) from the row's first draw z, or z itself (from pure noise)."""
        if self.known is None or (self.source.strength >= 1.0 and plan.first == 0):
            return z
        return q_sample(self.known, plan.alphas_cumprod[0], z)


def guide(
    classifier: torch.nn.Module,
    x: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
    index: torch.Tensor,
    labels: torch.Tensor,
    scale: torch.Tensor,
    abar: torch.Tensor,
    clip_range: torch.Tensor,
) -> torch.Tensor:
    """ε with rows ``index`` (G,) shifted by eq. 14: ε − s √(1 − ᾱ_t) ∇ₓ log p(y | x_t, t); ``scale``, ``abar``
    and ``clip_range`` are (G,) per guided row.

    Rows with a finite ``clip_range`` (samplers that clip x̂_0) are clipped *first*, as guided-diffusion's
    ``condition_score`` does: x̂_0 = clip((x − √(1−ᾱ) ε)/√ᾱ), ε ← (x − √ᾱ x̂_0)/√(1−ᾱ), then shifted; the sampler
    must not clip their x̂_0 again (``Rows.unclipped``). Clipping after the shift instead cancels it where it
    matters most: at large t, x̂_0 moves by s (1−ᾱ)/√ᾱ ∇ (×50 at t = 900), the clip flattens that into a
    saturated blob, and DDIM's guided digits lose their class (docs/benchmarks.md). One batched gradient over
    the guided rows only; returns a new tensor (``eps`` may be a CUDA graph's output).
    """
    from service.diffusion.guidance import log_prob_grad

    view = (-1, *([1] * (eps.ndim - 1)))
    xs, e = x[index], eps[index]
    a = abar.to(eps).reshape(view)
    sa, sb = a.sqrt(), (1.0 - a).sqrt()
    r = clip_range.to(eps).reshape(view)  # inf (no clip) makes the clamp a no-op; no host sync to test for it
    x0 = ((xs - sb * e) / sa).clamp(-r, r)
    e = torch.where(torch.isfinite(r), (xs - sa * x0) / sb, e)
    grad = log_prob_grad(classifier, xs, t[index], labels).to(eps.dtype)  # (G, C, H, W)
    return eps.index_copy(0, index, e - scale.to(eps).reshape(view) * sb * grad)


def after_step(
    rc: RowConditioning,
    plan: Plan,
    i: int,
    x_before: torch.Tensor,
    x: torch.Tensor,
    pred_x0: torch.Tensor,
    history: torch.Tensor | None,
    corrected_x_slot: int | None,
    draw: Callable[[], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(x, x̂_0, history) after step ``i`` of ``plan``: RePaint's known pixels, then a resampling jump back.

    ``draw()`` returns noise (n, C, H, W) from the rows' own generators.
    """
    if rc.regenerate is not None:
        assert rc.known is not None
        abar = 1.0 if i == len(plan) - 1 else plan.alphas_cumprod_next[i]
        known = rc.known if abar >= 1.0 else q_sample(rc.known, abar, draw())  # q(x_{t'} | x_0): RePaint eq. (8a)
        x = torch.where(rc.regenerate, x, known)  # eq. (8c)
        pred_x0 = torch.where(rc.regenerate, pred_x0, rc.known)
        if corrected_x_slot is not None and history is not None:
            k = corrected_x_slot
            fixed = torch.where(rc.regenerate, history[:, k], x_before)
            history = torch.cat([history[:, :k], fixed[:, None], history[:, k + 1:]], dim=1)
    if i in rc.jumps:  # back up to the level of step i + 1: q(x_{t+j} | x_t) = N(√(ᾱ_to/ᾱ_from) x, (1 − ᾱ_to/ᾱ_from) I)
        ratio = min(plan.alphas_cumprod[i + 1] / plan.alphas_cumprod_next[i], 1.0)
        x = math.sqrt(ratio) * x + math.sqrt(1.0 - ratio) * draw()
    return x, pred_x0, history
