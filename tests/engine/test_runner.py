"""UNetRunner: the traced + frozen UNet agrees with the eager one at any batch size, or is not used."""

from __future__ import annotations

import pytest
import torch

from service.diffusion.checkpoint import DiffusionModel
from service.diffusion.pipeline import sample
from service.engine.client import GenerationRequest
from service.engine.runner import UNetRunner


@pytest.mark.parametrize("rows", [1, 5, 16])
def test_traced_unet_matches_eager_at_other_batch_sizes(tiny_model: DiffusionModel, rows: int) -> None:
    runner = UNetRunner(tiny_model, torch.float32, jit=True)
    runner.prepare(example_rows=4)
    assert runner.traced
    x, t = torch.randn(rows, 1, 8, 8), torch.randint(0, 1000, (rows,))
    with torch.no_grad():
        expected = tiny_model.unet(x, t)
    torch.testing.assert_close(runner(x, t), expected, atol=1e-4, rtol=0)


def test_a_disagreeing_trace_is_discarded(tiny_model: DiffusionModel) -> None:
    runner = UNetRunner(tiny_model, torch.float32, jit=True)
    runner.prepare(example_rows=4, tolerance=-1.0)  # nothing can pass: falls back to eager
    assert not runner.traced
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 700])
    with torch.no_grad():
        torch.testing.assert_close(runner(x, t), tiny_model.unet(x, t), atol=0, rtol=0)


def test_eager_runner_does_not_trace(tiny_model: DiffusionModel) -> None:
    runner = UNetRunner(tiny_model, torch.float32, jit=False)
    runner.prepare(example_rows=4)
    assert not runner.traced


def test_engine_with_jit_generates_the_pipeline_images(tiny_model: DiffusionModel, run_engine) -> None:
    req = GenerationRequest(2, seed=11, sampler="ddim", steps=10)
    result = run_engine(lambda e: e.submit(req).result(), jit=True, max_batch_rows=8)
    expected = sample(tiny_model, 2, 11, "ddim", 10)
    torch.testing.assert_close(result.images, expected, atol=1e-3, rtol=0)
