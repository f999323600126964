"""Image-to-image, inpainting and classifier guidance on rows, against independent oracles.

Oracles: the schedule's closed form ᾱ_t = ∏(1 − β_s) and each row's generator replayed by hand; diffusers' own
``get_timesteps`` (read from its source) and its schedulers with ``set_begin_index``; a Gaussian data model whose
exact ε is known in closed form (so "the output moves away from the input as strength grows" has a definite
answer, which a random-weight UNet does not give); a linear-softmax classifier whose ∇ log p is W_y − Σ p_k W_k.
The mechanics run on the tiny random-weight model of ``tests/conftest.py``.
"""

from __future__ import annotations

import ast
import copy
import math
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler
from PIL import Image
from torch import nn

from service.__main__ import main
from service.diffusion.checkpoint import DiffusionModel, ModelSpec, load_model
from service.diffusion.conditioning import (
    MAX_JUMP_N_SAMPLE,
    Conditioning,
    jump_schedule,
)
from service.diffusion.guidance import GuidanceClassifier, GuidanceClassifierConfig, save_guidance_classifier
from service.diffusion.pipeline import sample
from service.diffusion.rows import RowGroup, batched_step, predict_eps, row_generator
from service.diffusion.samplers import SAMPLER_NAMES
from tests.conftest import tiny_unet_config

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (1, 8, 8)
STEPS = {"ddpm": 12, "ddim": 10, "dpmpp_2m": 10, "dpmpp_3m": 10, "dpmpp_2m_sde": 10, "unipc": 10}
X0 = torch.linspace(-0.8, 0.9, 64).reshape(SHAPE)  # the "user's" image
LOWER_HALF = torch.zeros(SHAPE)
LOWER_HALF[:, 4:] = 1.0  # regenerate the lower half


def closed_form_abar(t: int) -> float:
    """ᾱ_t = ∏_{s ≤ t} (1 − β_s), linear β from 1e-4 to 0.02 over T = 1000 (DDPM section 4), in float64."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    return float(np.prod(1.0 - betas[: t + 1]))


def run(model: DiffusionModel, group: RowGroup) -> RowGroup:
    while not group.done:
        batched_step(model, [group])
    return group


# ---------------------------------------------------------------------------------- image-to-image
@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_strength_one_is_plain_generation_exactly(tiny_model: DiffusionModel, sampler: str) -> None:
    plain = sample(tiny_model, 2, seed=3, sampler=sampler, steps=STEPS[sampler], eta=1.0)
    for cond in (Conditioning(init_image=X0, strength=1.0),
                 Conditioning(init_image=X0, strength=1.0, mask=torch.ones(SHAPE))):  # all white: nothing kept
        same = sample(tiny_model, 2, seed=3, sampler=sampler, steps=STEPS[sampler], eta=1.0, conditioning=cond)
        assert torch.equal(same, plain)
    assert RowGroup.start(tiny_model, 1, 0, sampler, 5, conditioning=Conditioning(X0, 1.0)).cond is None  # no cost


def _diffusers_get_timesteps():
    """diffusers' own ``StableDiffusionImg2ImgPipeline.get_timesteps``, read from its source (the pipeline itself
    needs ``transformers``, which is not installed)."""
    import diffusers

    path = Path(diffusers.__file__).parent / "pipelines/stable_diffusion/pipeline_stable_diffusion_img2img.py"
    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "StableDiffusionImg2ImgPipeline")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "get_timesteps")
    namespace: dict = {}
    exec(compile(ast.Module([fn], []), str(path), "exec"), namespace)
    return namespace["get_timesteps"]


@pytest.mark.parametrize(("sampler", "spacing", "steps", "strength"), [
    ("ddim", "leading", 20, 0.37), ("ddim", "trailing", 50, 0.58), ("ddpm", "trailing", 10, 0.3),
    ("ddpm", "leading", 1000, 0.25), ("dpmpp_2m", "linspace", 20, 0.5), ("unipc", "linspace", 7, 0.99),
    ("dpmpp_3m", "leading", 25, 0.8), ("ddim", "linspace", 3, 0.34),
])
def test_sdedit_starts_from_q_sample_of_the_rows_first_draw_at_diffusers_t_start(
    tiny_model: DiffusionModel, sampler: str, spacing: str, steps: int, strength: float
) -> None:
    scheduler_class = {"ddim": DDIMScheduler, "ddpm": DDIMScheduler, "dpmpp_2m": DPMSolverMultistepScheduler,
                       "dpmpp_3m": DPMSolverMultistepScheduler, "unipc": UniPCMultistepScheduler}[sampler]
    sched = scheduler_class(timestep_spacing=spacing)
    sched.set_timesteps(steps)
    get_timesteps = _diffusers_get_timesteps()
    ref_timesteps, ref_steps = get_timesteps(types.SimpleNamespace(scheduler=sched), steps, strength, "cpu")
    seed = 17
    g = RowGroup.start(tiny_model, 3, seed, sampler, steps, spacing=spacing,  # type: ignore[arg-type]
                       conditioning=Conditioning(init_image=X0, strength=strength))
    assert g.total == ref_steps and g.plan.timesteps == tuple(ref_timesteps.tolist())
    abar = closed_form_abar(g.plan.timesteps[0])
    for i in range(3):
        z = torch.randn(SHAPE, generator=row_generator(seed, i))
        torch.testing.assert_close(g.x[i], math.sqrt(abar) * X0 + math.sqrt(1 - abar) * z, rtol=0, atol=1e-6)


def test_sdedit_on_sigma_spacings_starts_at_the_plans_own_level(tiny_model: DiffusionModel) -> None:
    """Karras σ's: the solver's ᾱ is 1/(1 + σ²) of its σ, not ᾱ of the rounded timestep the UNet sees."""
    full = RowGroup.start(tiny_model, 1, 0, "dpmpp_2m", 20, spacing="karras")
    g = RowGroup.start(tiny_model, 1, 0, "dpmpp_2m", 20, spacing="karras", conditioning=Conditioning(X0, 0.5))
    abar = full.plan.alphas_cumprod[10]
    assert g.total == 10 and g.plan.first == 10 and abar != closed_form_abar(g.t)
    z = torch.randn(SHAPE, generator=row_generator(0, 0))
    torch.testing.assert_close(g.x[0], math.sqrt(abar) * X0 + math.sqrt(1 - abar) * z, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("sampler", "scheduler"), [
    ("ddim", DDIMScheduler(clip_sample=True)),
    ("dpmpp_2m", DPMSolverMultistepScheduler()),
    ("dpmpp_3m", DPMSolverMultistepScheduler(solver_order=3)),
    ("unipc", UniPCMultistepScheduler()),
])
def test_img2img_tail_equals_diffusers_scheduler_from_its_begin_index(
    tiny_model: DiffusionModel, sampler: str, scheduler
) -> None:
    """From the same x_{t_start}, our tail equals diffusers' loop after ``set_begin_index(t_start)``: first order
    and empty history at the start, and (3M) "fewer than 15 steps" judged on the whole sequence, not the tail."""
    steps, strength = 20, 0.5
    g = RowGroup.start(tiny_model, 2, 4, sampler, steps, conditioning=Conditioning(X0, strength))
    x = g.x.clone()
    run(tiny_model, g)
    scheduler.set_timesteps(steps)
    t_start = steps - int(steps * strength)
    if hasattr(scheduler, "set_begin_index"):  # the multistep schedulers count their steps; DDIM needs no index
        scheduler.set_begin_index(t_start)
    for t in scheduler.timesteps[t_start:]:
        eps = predict_eps(tiny_model.unet, x, t.expand(2), torch.float32)
        x = scheduler.step(eps, t, x).prev_sample
    torch.testing.assert_close(g.x, x, rtol=0, atol=2e-4)


def gaussian_model(mu: float = 0.0, sigma: float = 0.8) -> DiffusionModel:
    """A "model" of data x_0 ~ N(μ, σ² I) with its exact ε: x_t ~ N(√ᾱ μ, (ᾱσ² + 1 − ᾱ) I), so
    ε = √(1 − ᾱ) (x_t − √ᾱ μ) / (ᾱσ² + 1 − ᾱ) (no x̂_0 clipping: the data are not bounded)."""
    spec = ModelSpec(name="gaussian", unet=tiny_unet_config(), clip_sample=False)
    schedule = spec.make_schedule()

    class GaussianEps(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("abar", schedule.alphas_cumprod_f64().float())
            self.unused = nn.Parameter(torch.zeros(()))  # the pipeline reads the device from a parameter

        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            a = self.abar[t].reshape(-1, 1, 1, 1)
            return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * sigma**2 + 1 - a)

    return DiffusionModel(spec, GaussianEps().eval(), schedule, "analytic")  # type: ignore[arg-type]


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_distance_to_the_input_grows_with_strength(sampler: str) -> None:
    model = gaussian_model()
    x0 = torch.where(torch.arange(64).reshape(SHAPE) % 3 == 0, 0.8, -0.8)
    dist = []
    for strength in (0.2, 0.5, 0.8, 1.0):
        out = sample(model, 64, seed=0, sampler=sampler, steps=20, eta=1.0, conditioning=Conditioning(x0, strength))
        dist.append(float((out.clamp(-1, 1) - x0).pow(2).mean().sqrt()))
    assert dist[0] < dist[1] < dist[2], dist
    # from strength 0.8 (t ≈ 800, √ᾱ ≈ 0.04) on, x_t has almost forgotten x_0: as far as plain samples are
    assert dist[0] < 0.75 * dist[3] and abs(dist[2] - dist[3]) < 0.05, dist


def test_strength_that_leaves_no_step_is_refused(tiny_model: DiffusionModel) -> None:
    with pytest.raises(ValueError, match="leaves no step of 10"):
        RowGroup.start(tiny_model, 1, 0, "ddim", 10, conditioning=Conditioning(X0, 0.09))
    assert RowGroup.start(tiny_model, 1, 0, "ddim", 10, conditioning=Conditioning(X0, 0.1)).total == 1


# ---------------------------------------------------------------------------------- inpainting
@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_inpainting_keeps_the_known_pixels_exactly(tiny_model: DiffusionModel, sampler: str, strength: float) -> None:
    cond = Conditioning(X0, strength, mask=LOWER_HALF)
    out = sample(tiny_model, 3, seed=1, sampler=sampler, steps=STEPS[sampler], eta=1.0, conditioning=cond)
    assert torch.equal(out[:, :, :4], X0[None, :, :4].expand(3, -1, -1, -1))  # exact, not only ≤ 1/255
    assert (out[:, :, 4:] - X0[None, :, 4:]).abs().max() > 0.1  # the lower half was generated


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_all_black_mask_returns_the_input_after_one_step(tiny_model: DiffusionModel, sampler: str) -> None:
    cond = Conditioning(X0, 1.0, mask=torch.zeros(SHAPE))
    assert RowGroup.start(tiny_model, 1, 0, sampler, STEPS[sampler], conditioning=cond).total == 1
    out = sample(tiny_model, 2, seed=1, sampler=sampler, steps=STEPS[sampler], conditioning=cond)
    assert torch.equal(out, X0[None].expand(2, -1, -1, -1))


def test_all_white_mask_is_plain_image_to_image(tiny_model: DiffusionModel) -> None:
    a = sample(tiny_model, 2, seed=1, sampler="ddpm", steps=12, conditioning=Conditioning(X0, 0.5, torch.ones(SHAPE)))
    b = sample(tiny_model, 2, seed=1, sampler="ddpm", steps=12, conditioning=Conditioning(X0, 0.5))
    assert torch.equal(a, b)


def test_repaint_step_replaces_known_pixels_by_q_sample_with_the_rows_next_draw(tiny_model: DiffusionModel) -> None:
    """After step 0 (t → t'): known pixels = √ᾱ_{t'} x_0 + √(1 − ᾱ_{t'}) z' with z' the row's third draw
    (x_T, then DDPM's z of the step, then RePaint's z'), ᾱ from the closed form."""
    seed, steps = 8, 10
    g = RowGroup.start(tiny_model, 2, seed, "ddpm", steps, spacing="leading",
                       conditioning=Conditioning(X0, mask=LOWER_HALF))
    t_next = g.plan.timesteps[1]
    batched_step(tiny_model, [g])
    abar = closed_form_abar(t_next)
    for i in range(2):
        gen = row_generator(seed, i)
        torch.randn(SHAPE, generator=gen)  # x_T
        torch.randn(SHAPE, generator=gen)  # the DDPM step's z
        z = torch.randn(SHAPE, generator=gen)
        want = math.sqrt(abar) * X0 + math.sqrt(1 - abar) * z
        torch.testing.assert_close(g.x[i, :, :4], want[:, :4], rtol=0, atol=1e-6)
        assert torch.equal(g.pred_x0[i, :, :4], X0[:, :4])  # previews show the known pixels


def test_unipc_corrector_keeps_the_known_pixels_of_x(tiny_model: DiffusionModel) -> None:
    """UniC redoes each step from its stored copy of x: that copy carries the known pixels x had."""
    g = RowGroup.start(tiny_model, 1, 0, "unipc", 10, conditioning=Conditioning(X0, 0.7, mask=LOWER_HALF))
    for _ in range(3):
        before = g.x.clone()
        batched_step(tiny_model, [g])
        assert g.history is not None
        torch.testing.assert_close(g.history[:, 0, :, :4], before[:, :, :4], rtol=0, atol=0)


def test_jump_schedule_passes_each_point_jump_n_sample_times() -> None:
    seq, jumps = jump_schedule(7, 2, 3)  # jump points: levels ≥ 2 with (7 − level) even, below 7: 5 and 3
    expected: list[int] = [0, 1, 2]  # level 3 reached after step 2: back to level 1, twice
    expected += [1, 2, 1, 2]
    expected += [3, 4]  # level 5 after step 4: back to level 3, twice
    expected += [3, 4, 3, 4]
    expected += [5, 6]
    assert list(seq) == expected
    assert sorted(jumps) == [2, 4, 8, 10]
    assert jump_schedule(7, 2, 1) == (tuple(range(7)), frozenset())
    assert len(jump_schedule(50, 5, 4)[0]) == 50 + 9 * 3 * 5  # 9 points (levels 5 … 45), 3 extra passes of 5


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_resampling_runs_the_jumps_and_keeps_the_known_pixels(tiny_model: DiffusionModel, sampler: str) -> None:
    cond = Conditioning(X0, 1.0, LOWER_HALF, jump_length=2, jump_n_sample=3)
    g = RowGroup.start(tiny_model, 2, 5, sampler, 7, eta=1.0, conditioning=cond)
    assert g.total == len(jump_schedule(7, 2, 3)[0]) == cond.row_steps(7) == 15
    assert list(g.plan.timesteps[:7]) == [g.plan.timesteps[k] for k in (0, 1, 2, 1, 2, 1, 2)]
    run(tiny_model, g)
    assert torch.equal(g.x.clamp(-1, 1)[:, :, :4], X0[None, :, :4].expand(2, -1, -1, -1))
    plain = run(tiny_model, RowGroup.start(tiny_model, 2, 5, sampler, 7, eta=1.0, conditioning=Conditioning(X0, 1.0,
                                                                                                            LOWER_HALF)))
    assert (plain.x - g.x).abs().max() > 1e-3  # the jumps changed the generated half


def test_resampling_is_bounded() -> None:
    model_like = gaussian_model()
    with pytest.raises(ValueError, match="at most 1000"):
        Conditioning(X0, mask=LOWER_HALF, jump_length=10, jump_n_sample=3).check(model_like, "ddpm", 1000)
    with pytest.raises(ValueError, match="ddpm, ddim"):
        Conditioning(X0, mask=LOWER_HALF, jump_length=2, jump_n_sample=2).check(model_like, "unipc", 20)
    with pytest.raises(ValueError, match=f"1..{MAX_JUMP_N_SAMPLE}"):
        Conditioning(X0, mask=LOWER_HALF, jump_n_sample=MAX_JUMP_N_SAMPLE + 1)


# ---------------------------------------------------------------------------------- classifier guidance
class LinearSoftmax(nn.Module):
    """logits = W flatten(x) + b + 0.001·t: ∇ₓ log p(y | x) = W_y − Σ_k p_k W_k. Records what it is called with."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(classes, 64, generator=gen) * 0.5, requires_grad=False)
        self.bias = nn.Parameter(torch.randn(classes, generator=gen), requires_grad=False)
        self.num_classes = classes
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.detach().clone(), t.detach().clone()))
        return x.flatten(1) @ self.weight.T + self.bias + 0.001 * t[:, None].to(x.dtype)


def guided_model(tiny_model: DiffusionModel, classifier: nn.Module) -> DiffusionModel:
    m = copy.copy(tiny_model)
    m.guidance = classifier  # type: ignore[assignment]
    return m


def test_guided_eps_is_shifted_by_hand_computed_gradient(tiny_model: DiffusionModel) -> None:
    clf = LinearSoftmax()
    model = guided_model(tiny_model, clf)
    assert model.spec.clip_sample  # DDIM clips x̂_0: guidance comes after the clip, as in guided-diffusion
    s, label = 2.5, 1
    g = RowGroup.start(model, 2, 3, "ddim", 10, conditioning=Conditioning(class_label=label, guidance_scale=s))
    g.index = 4  # mid-sequence: t = 500 → 400 (leading spacing, 10 of 1000 steps)
    x, t = g.x.clone().double(), g.t
    eps = predict_eps(model.unet, g.x, torch.full((2,), t), torch.float32).double()
    batched_step(model, [g])
    # by hand: ∇ log softmax_y(W x + b) = W_y − Σ_k p_k W_k
    p = torch.softmax(x.flatten(1) @ clf.weight.double().T + clf.bias.double() + 0.001 * t, dim=1)
    grad = (clf.weight.double()[label] - p @ clf.weight.double()).reshape(2, *SHAPE)
    # guided-diffusion's condition_score: x̂_0 clipped, ε re-derived from it, then ε̂ = ε − s √(1 − ᾱ_t) ∇ (eq. 14)
    a, a_next = closed_form_abar(t), closed_form_abar(t - 100)
    x0 = ((x - math.sqrt(1 - a) * eps) / math.sqrt(a)).clamp(-1, 1)
    eps_hat = (x - math.sqrt(a) * x0) / math.sqrt(1 - a) - s * math.sqrt(1 - a) * grad
    # DDIM eq. (12), η = 0, with the guided x̂_0 left unclipped
    x0_hat = (x - math.sqrt(1 - a) * eps_hat) / math.sqrt(a)
    want = math.sqrt(a_next) * x0_hat + math.sqrt(1 - a_next) * eps_hat
    torch.testing.assert_close(g.x.double(), want, rtol=0, atol=1e-5)
    assert len(clf.calls) == 1 and torch.equal(clf.calls[0][1], torch.full((2,), t))


def test_guidance_scale_zero_is_plain_and_never_calls_the_classifier(tiny_model: DiffusionModel) -> None:
    clf = LinearSoftmax()
    model = guided_model(tiny_model, clf)
    plain = sample(model, 2, seed=4, sampler="dpmpp_2m", steps=6)
    zero = sample(model, 2, seed=4, sampler="dpmpp_2m", steps=6, conditioning=Conditioning(class_label=2))
    assert torch.equal(zero, plain) and clf.calls == []
    guided = sample(model, 2, seed=4, sampler="dpmpp_2m", steps=6, conditioning=Conditioning(class_label=2,
                                                                                             guidance_scale=3.0))
    assert (guided - plain).abs().max() > 1e-3 and len(clf.calls) == 6


def test_only_guided_rows_go_through_the_classifier_in_one_batched_call(tiny_model: DiffusionModel) -> None:
    clf = LinearSoftmax()
    model = guided_model(tiny_model, clf)
    forwards: list[int] = []

    def forward(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        forwards.append(x.shape[0])
        return predict_eps(model.unet, x, t, torch.float32)

    plain = RowGroup.start(model, 3, 0, "ddpm", 10)
    a = RowGroup.start(model, 2, 1, "ddim", 10, conditioning=Conditioning(class_label=0, guidance_scale=1.0))
    inpaint = RowGroup.start(model, 1, 2, "unipc", 10, conditioning=Conditioning(X0, 0.5, LOWER_HALF))
    b = RowGroup.start(model, 1, 3, "dpmpp_2m", 10, conditioning=Conditioning(X0, 0.7, class_label=2,
                                                                              guidance_scale=1.0))
    b.index = 2
    alone = []
    for g in (a, b):
        c = copy.copy(g)
        c.generators = [torch.Generator().set_state(gen.get_state()) for gen in g.generators]
        alone.append(c)
    batched_step(model, [plain, a, inpaint, b], forward=forward)
    assert forwards == [7]  # one UNet forward over all seven rows
    assert len(clf.calls) == 1 and clf.calls[0][0].shape[0] == 3  # one classifier call, guided rows only
    assert clf.calls[0][1].tolist() == [a.plan.timesteps[0]] * 2 + [b.plan.timesteps[2]]
    for c in alone:
        batched_step(model, [c])
    for g, c in zip((a, b), alone, strict=True):
        torch.testing.assert_close(g.x, c.x, rtol=0, atol=1e-5)


def test_guidance_classifier_loads_with_the_model(tiny_model_dir: Path) -> None:
    assert load_model(tiny_model_dir).guidance is None
    config = GuidanceClassifierConfig(image_size=8, widths=(8, 16), blocks=(0, 1), norm_groups=4)
    save_guidance_classifier(GuidanceClassifier(config), tiny_model_dir, {"recommended_guidance_scale": 4.0})
    model = load_model(tiny_model_dir)
    assert isinstance(model.guidance, GuidanceClassifier) and model.guidance.recommended_guidance_scale == 4.0


# ---------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"strength": 0.0, "init_image": X0}, r"strength must be in \(0, 1\]"),
    ({"strength": 1.5, "init_image": X0}, r"strength must be in \(0, 1\]"),
    ({"strength": float("nan"), "init_image": X0}, "finite"),
    ({"strength": 0.5}, "needs an init_image"),
    ({"mask": LOWER_HALF}, "a mask needs an init_image"),
    ({"init_image": X0, "mask": LOWER_HALF * 0.5}, "0 \\(keep\\) or 1"),
    ({"init_image": X0, "mask": torch.ones(1, 4, 4)}, "mask must have shape"),
    ({"init_image": X0 * 2}, r"in \[-1, 1\]"),
    ({"init_image": X0[0]}, r"shape \(C, H, W\)"),
    ({"class_label": -1}, "integer >= 0"),
    ({"class_label": 1, "guidance_scale": -1.0}, "guidance_scale must be in"),
    ({"guidance_scale": 1.0}, "needs a class_label"),
    ({"init_image": X0, "jump_n_sample": 2}, "needs a mask"),
])
def test_invalid_conditioning_is_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Conditioning(**kwargs)


def test_conditioning_the_model_cannot_run_is_refused(tiny_model: DiffusionModel) -> None:
    with pytest.raises(ValueError, match="this model has no guidance classifier"):
        Conditioning(class_label=1, guidance_scale=1.0).check(tiny_model, "ddim", 10)
    with pytest.raises(ValueError, match=r"class_label must be in 0\.\.2"):
        Conditioning(class_label=3, guidance_scale=1.0).check(guided_model(tiny_model, LinearSoftmax()), "ddim", 10)
    with pytest.raises(ValueError, match=r"model's shape .* \(1, 8, 8\)"):
        Conditioning(torch.zeros(1, 6, 6), 0.5).check(tiny_model, "ddim", 10)


# ---------------------------------------------------------------------------------- CLI
def test_cli_sample_inpaints_a_png_with_a_png_mask(tiny_model_dir: Path, tmp_path: Path) -> None:
    digit = (np.arange(16 * 16).reshape(16, 16) % 256).astype(np.uint8)  # 16×16: resized to the model's 8×8
    Image.fromarray(digit).save(tmp_path / "in.png")
    mask = np.zeros((8, 8), np.uint8)
    mask[4:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    base = ["sample", "--model", str(tiny_model_dir), "--sampler", "ddim", "--steps", "6", "--num", "2",
            "--device", "cpu", "--compiled", "off"]
    assert main([*base, "--init-image", str(tmp_path / "in.png"), "--strength", "0.5", "--mask",
                 str(tmp_path / "mask.png"), "--out", str(tmp_path / "out.npy")]) == 0
    out = np.load(tmp_path / "out.npy")
    x0 = np.asarray(Image.fromarray(digit).resize((8, 8), Image.Resampling.BICUBIC), np.float32) / 127.5 - 1
    np.testing.assert_allclose(out[:, 0, :4], np.broadcast_to(x0[:4], (2, 4, 8)), rtol=0, atol=1e-6)
    np.save(tmp_path / "in.npy", x0[None])
    assert main([*base, "--init-image", str(tmp_path / "in.npy"), "--strength", "0.5",
                 "--out", str(tmp_path / "img2img.npy")]) == 0
    with pytest.raises(SystemExit, match="this model has no guidance classifier"):
        main([*base, "--class-label", "3", "--out", str(tmp_path / "g.npy")])
    with pytest.raises(SystemExit, match="needs a class_label"):
        main([*base, "--guidance-scale", "2", "--out", str(tmp_path / "g.npy")])
