"""Conditioned requests in the engine: image-to-image, inpainting and guided rows share forwards with plain ones,
each gives its result alone (and the offline pipeline's), and what the engine cannot run is refused at submit."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from service.diffusion.checkpoint import DiffusionModel
from service.diffusion.conditioning import Conditioning
from service.diffusion.guidance import GuidanceClassifier, GuidanceClassifierConfig
from service.diffusion.pipeline import sample
from service.engine.batcher import Engine, EngineSettings
from service.engine.client import GUIDED_ROW_WEIGHT, ClientQuotaError, GenerationRequest, QueueFullError

Req = GenerationRequest
X0 = torch.linspace(-0.9, 0.8, 64).reshape(1, 8, 8)
MASK = torch.zeros(1, 8, 8)
MASK[:, 4:] = 1.0


@pytest.fixture
def guided_model(tiny_model: DiffusionModel) -> DiffusionModel:
    """The tiny model with a tiny random-weight guidance classifier (10 classes; its output convs made non-zero)."""
    torch.manual_seed(0)
    config = GuidanceClassifierConfig(image_size=8, widths=(8, 16), blocks=(0, 1), norm_groups=4, time_freq_dim=16,
                                      time_embed_dim=16)
    clf = GuidanceClassifier(config)
    with torch.no_grad():
        for p in clf.parameters():
            p.normal_(0.0, 0.3)
    tiny_model.guidance = clf.eval().requires_grad_(False)
    return tiny_model


MIX = [  # one of each mode, different samplers
    Req(2, seed=1, sampler="ddpm", steps=12),
    Req(2, seed=2, sampler="ddim", steps=10, eta=1.0, init_image=X0, strength=0.6),
    Req(1, seed=3, sampler="unipc", steps=10, init_image=X0, mask=MASK),
    Req(2, seed=4, sampler="dpmpp_2m", steps=8, class_label=3, guidance_scale=4.0),
    Req(1, seed=5, sampler="ddim", steps=9, init_image=X0, strength=0.8, mask=MASK, class_label=7),
    Req(1, seed=6, sampler="ddpm", steps=6, init_image=X0, mask=MASK, jump_length=2, jump_n_sample=2),
]


def test_every_mode_in_one_batch_equals_each_alone_and_the_pipeline(guided_model: DiffusionModel, run_engine) -> None:
    async def together(engine: Engine) -> tuple[list[torch.Tensor], float]:
        handles = [engine.submit(r) for r in MIX]
        results = await asyncio.gather(*(h.result() for h in handles))
        return [r.images for r in results], engine.stats()["iterations"]

    async def alone(engine: Engine) -> list[torch.Tensor]:
        return [(await engine.submit(r).result()).images for r in MIX]

    mixed, iterations = run_engine(together)
    one_by_one = run_engine(alone)
    row_steps = [r.conditioning(guided_model).row_steps(r.steps) if r.conditioning(guided_model) else r.steps
                 for r in MIX]
    assert row_steps == [12, 6, 10, 8, 7, 10]  # img2img: ⌊10·0.6⌋, ⌊9·0.8⌋; resampling: 6 + 2 points × 1 × 2
    assert iterations <= max(row_steps) + 2 < sum(row_steps)  # they shared forwards
    for r, a, b in zip(MIX, mixed, one_by_one, strict=True):
        assert (a - b).abs().max().item() <= 1 / 255
        c = r.conditioning(guided_model)
        expected = sample(guided_model, r.num_images, r.seed, r.sampler, r.steps, r.eta, conditioning=c)
        torch.testing.assert_close(a, expected, rtol=0, atol=1e-4)  # float rounding of other batch sizes
        if r.mask is not None:
            assert torch.equal(a[:, :, :4], X0[None, :, :4].expand(r.num_images, -1, -1, -1))


def test_guided_request_amid_traffic_gives_its_pixels_alone(guided_model: DiffusionModel, run_engine) -> None:
    target = Req(2, seed=9, sampler="ddim", steps=12, init_image=X0, strength=0.9, mask=MASK, class_label=1,
                 guidance_scale=2.0)
    traffic = [Req(1, seed=i, sampler=s, steps=10 + i, class_label=i if i % 2 else None)
               for i, s in enumerate(("ddpm", "unipc", "dpmpp_2m_sde", "ddim"))]

    async def alone(engine: Engine) -> torch.Tensor:
        return (await engine.submit(target).result()).images

    async def amid(engine: Engine) -> torch.Tensor:
        first = [engine.submit(r) for r in traffic[:2]]
        await anext(aiter(first[0].events()))  # the target joins a batch in flight
        h = engine.submit(target)
        rest = [engine.submit(r) for r in traffic[2:]]
        images = (await h.result()).images
        await asyncio.gather(*(x.result() for x in first + rest))
        return images

    assert (run_engine(alone) - run_engine(amid)).abs().max().item() <= 1 / 255


def test_default_guidance_scale_is_the_classifiers_recommendation(guided_model: DiffusionModel) -> None:
    assert guided_model.guidance is not None
    assert Req(1, seed=0, class_label=2).conditioning(guided_model).guidance_scale == 1.0  # none recommended
    guided_model.guidance.info = {"recommended_guidance_scale": 6.5}
    assert Req(1, seed=0, class_label=2).conditioning(guided_model).guidance_scale == 6.5
    assert Req(1, seed=0, class_label=2, guidance_scale=0.0).conditioning(guided_model).guided is False
    assert Req(1, seed=0).conditioning(guided_model) is None
    info = Engine(guided_model, EngineSettings()).model_info
    assert info.conditioning == ("image_to_image", "inpainting", "class_guidance")
    assert (info.num_classes, info.default_guidance_scale) == (10, 6.5)


def test_model_without_a_guidance_classifier(tiny_model: DiffusionModel, run_engine) -> None:
    info = Engine(tiny_model, EngineSettings()).model_info
    assert info.conditioning == ("image_to_image", "inpainting") and info.num_classes is None

    async def body(engine: Engine) -> None:
        with pytest.raises(ValueError, match="this model has no guidance classifier"):
            engine.submit(Req(1, seed=0, sampler="ddim", steps=5, class_label=1))
        await engine.submit(Req(1, seed=0, sampler="ddim", steps=5, init_image=X0, strength=0.5)).result()

    run_engine(body)


BAD = [  # (request, message): each is a 422 at the HTTP layer
    (Req(1, seed=0, sampler="ddim", steps=10, init_image=torch.zeros(1, 6, 6), strength=0.5), "model's shape"),
    (Req(1, seed=0, sampler="ddim", steps=10, init_image=torch.zeros(3, 8, 8), strength=0.5), "model's shape"),
    (Req(1, seed=0, sampler="ddim", steps=10, init_image=X0, strength=0.0), r"strength must be in \(0, 1\]"),
    (Req(1, seed=0, sampler="ddim", steps=10, init_image=X0, strength=0.05), "leaves no step"),
    (Req(1, seed=0, sampler="ddim", steps=10, strength=0.5), "needs an init_image"),
    (Req(1, seed=0, sampler="ddim", steps=10, mask=MASK), "needs an init_image"),
    (Req(1, seed=0, sampler="ddim", steps=10, init_image=X0, mask=torch.ones(1, 4, 4)), "mask must have shape"),
    (Req(1, seed=0, sampler="ddim", steps=10, init_image=X0, mask=MASK * 0.3), "0 \\(keep\\) or 1"),
    (Req(1, seed=0, sampler="ddim", steps=10, class_label=10), r"class_label must be in 0\.\.9"),
    (Req(1, seed=0, sampler="ddim", steps=10, class_label=-2), "integer >= 0"),
    (Req(1, seed=0, sampler="ddim", steps=10, class_label=1, guidance_scale=-1.0), "guidance_scale must be in"),
    (Req(1, seed=0, sampler="ddim", steps=10, guidance_scale=2.0), "needs a class_label"),
    (Req(1, seed=0, sampler="unipc", steps=10, init_image=X0, mask=MASK, jump_n_sample=2, jump_length=2),
     "ddpm, ddim"),
    (Req(1, seed=0, sampler="ddpm", steps=1000, init_image=X0, mask=MASK, jump_n_sample=2, jump_length=5),
     "at most 1000"),
    (Req(3, seed=0, sampler="ddim", steps=10, class_label=1), "guided rows count 2x"),
]


def test_requests_the_engine_cannot_run_are_refused_at_submit(guided_model: DiffusionModel, run_engine) -> None:
    async def body(engine: Engine) -> None:
        for request, message in BAD:
            with pytest.raises(ValueError, match=message):
                engine.submit(request)
        assert engine.stats()["queued_rows"] == 0

    run_engine(body, max_batch_rows=4)


def test_guided_rows_weigh_more_in_the_queue_bound() -> None:
    assert Req(3, seed=0, class_label=1).queue_rows == 3 * GUIDED_ROW_WEIGHT
    assert Req(3, seed=0, class_label=1, guidance_scale=0.0).queue_rows == 3
    assert Req(3, seed=0, init_image=X0, mask=MASK, strength=0.5).queue_rows == 3


def test_guided_rows_are_admitted_by_their_weight(guided_model: DiffusionModel, run_engine) -> None:
    async def body(engine: Engine) -> None:
        running = engine.submit(Req(2, seed=0, sampler="ddpm", steps=1000))
        with pytest.raises(QueueFullError, match="6 more exceed"):  # 3 guided images are 6 rows; 2 + 6 > 6
            engine.submit(Req(3, seed=1, sampler="ddim", steps=5, class_label=1))
        engine.submit(Req(2, seed=2, sampler="ddim", steps=5, class_label=1)).cancel()  # 2 + 4 rows fit
        running.cancel()

    run_engine(body, max_batch_rows=6, max_queue_rows=6)


def test_retry_after_counts_the_steps_queued_rows_will_really_run(tiny_model: DiffusionModel, run_engine) -> None:
    async def body(engine: Engine) -> float:
        other = engine.submit(Req(4, seed=0, sampler="ddpm", steps=1000, client="b"))
        await anext(aiter(other.events()))
        engine._step_seconds = 0.01  # pin the measured iteration time for the estimate
        # client a's image-to-image rows wait behind b's: at strength 0.1 they run 100 of the plan's 1000 steps
        queued = engine.submit(Req(4, seed=1, sampler="ddpm", steps=1000, init_image=X0, strength=0.1, client="a"))
        with pytest.raises(ClientQuotaError) as quota:
            engine.submit(Req(1, seed=2, sampler="ddim", steps=10, client="a"))
        queued.cancel()
        other.cancel()
        return quota.value.retry_after_s

    retry = run_engine(body, max_batch_rows=4, max_queue_rows=16, max_rows_per_client=4)
    assert 10.5 <= retry <= 11.0  # the backlog (4 rows × ~990 steps + 4 rows × 100 steps) / 4 rows × 10 ms


def test_all_black_mask_returns_the_input_in_one_step(tiny_model: DiffusionModel, run_engine) -> None:
    async def body(engine: Engine) -> tuple:
        h = engine.submit(Req(2, seed=0, sampler="dpmpp_3m", steps=20, init_image=X0, mask=torch.zeros(8, 8)))
        events = [e async for e in h.events()]
        return events, (await h.result()).images

    events, images = run_engine(body)
    assert [(e.step, e.total) for e in events] == [(1, 1)]
    assert torch.equal(images, X0[None].expand(2, -1, -1, -1))
    assert Conditioning(X0, mask=torch.zeros(8, 8)).row_steps(20) == 1


REPO = Path(__file__).resolve().parents[2]
MNIST = REPO.parent / "shared" / "data" / "mnist"


@pytest.mark.slow
@pytest.mark.skipif(not (MNIST / "t10k-images-idx3-ubyte.gz").is_file(), reason=f"MNIST digits not found at {MNIST}")
def test_conditioning_bench_measures_every_part(tmp_path: Path) -> None:
    """bench/conditioning.py end to end on a random-weight 28×28 model with a random guidance classifier."""
    from service.diffusion.checkpoint import ModelSpec, save_model
    from service.diffusion.guidance import save_guidance_classifier
    from service.diffusion.unet import UNet
    from tests.conftest import tiny_unet_config

    torch.manual_seed(0)
    spec = ModelSpec(name="random28", unet=tiny_unet_config(size=28))
    model = save_model(spec, UNet(spec.unet), tmp_path / "random28")
    config = GuidanceClassifierConfig(widths=(8, 16), blocks=(0, 1), norm_groups=4, time_freq_dim=16, time_embed_dim=16)
    save_guidance_classifier(GuidanceClassifier(config), model, {"recommended_guidance_scale": 3.0})
    out = tmp_path / "conditioning.json"
    proc = subprocess.run(
        [sys.executable, "bench/conditioning.py", "--model", str(model), "--classifier",
         str(REPO / "model_store/mnist/classifier.safetensors"), "--steps", "3", "--num", "4", "--img2img-num", "3",
         "--strengths", "0.5,1.0", "--inpaint-steps", "3", "--jump-length", "1", "--jump-n-sample", "2",
         "--per-class", "2", "--classes", "2", "--guidance-steps", "3", "--sweep", "ddim:3:1,ddpm:3:2",
         "--sweep-per-class", "1", "--batch", "8", "--threads", "1", "--plot", str(tmp_path / "sweep.png"),
         "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [p["strength"] for p in report["image_to_image"]["points"]] == [0.5, 1.0]
    inpainting = report["inpainting"]
    assert inpainting["num"] == 4 and inpainting["known_max_abs_error"] <= 1 / 255
    assert inpainting["row_steps"] == 5  # 3 steps + 2 jump points passed twice, 1 step each
    assert 0 <= inpainting["label_recovery"] <= 1 and 0 <= inpainting["unconditional_label_share"] <= 1
    guided = report["guidance"]
    assert guided["guidance_scale"] == 3.0 and [c["class"] for c in guided["classes"]] == [0, 1]
    assert all(c["fld"] >= 0 and c["floor_fld"] >= 0 for c in guided["classes"])
    assert (guided["sampler"], guided["steps"]) == ("unipc", 3)
    sweep = report["guidance_sweep"]["points"]
    assert [(p["sampler"], p["steps"], p["guidance_scale"]) for p in sweep] == [("ddim", 3, 1.0), ("ddpm", 3, 2.0)]
    assert all(len(p["shares"]) == 2 and 0 <= p["min_share"] <= p["mean_share"] <= 1 for p in sweep)
    assert (tmp_path / "sweep.png").stat().st_size > 0
