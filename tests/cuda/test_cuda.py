"""The GPU path on a real GPU (skipped without one; bench/gpu_check.py runs these on a lent machine)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from prometheus_client import CollectorRegistry

from service.diffusion.checkpoint import DiffusionModel, load_model
from service.diffusion.graphs import BucketedForward
from service.diffusion.pipeline import sample
from service.diffusion.rows import predict_eps
from service.diffusion.runner import UNetRunner
from service.engine.batcher import Engine, EngineSettings
from service.engine.client import GenerationRequest
from service.metrics import EngineMetrics

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def cuda_model(tiny_model_dir) -> DiffusionModel:
    return load_model(tiny_model_dir, "cuda")


@pytest.mark.parametrize("rows", [1, 3, 8, 13])
def test_graph_replay_equals_eager_and_never_returns_padded_rows(cuda_model: DiffusionModel, rows: int) -> None:
    graphed = BucketedForward(lambda x, t: predict_eps(cuda_model.unet, x, t, torch.float32), (1, 8, 8), 16,
                              torch.device("cuda"))
    assert graphed.graphs
    x = torch.randn(rows, 1, 8, 8, device="cuda")
    t = torch.randint(0, 1000, (rows,), device="cuda")
    got = graphed(x, t)
    assert got.shape == (rows, 1, 8, 8)
    torch.testing.assert_close(got, predict_eps(cuda_model.unet, x, t, torch.float32), atol=1e-4, rtol=0)


def test_runner_captures_graphs_and_sampling_matches_the_cpu(cuda_model: DiffusionModel, tiny_model_dir) -> None:
    runner = UNetRunner(cuda_model, torch.float32)
    runner.prepare(8)
    assert runner.graphed
    got = sample(cuda_model, 3, 9, "unipc", 10, forward=runner)
    expected = sample(load_model(tiny_model_dir), 3, 9, "unipc", 10)  # noise from the rows' CPU generators
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=0)


def test_engine_on_cuda_gives_a_request_the_same_images_alone_and_amid_traffic(cuda_model: DiffusionModel) -> None:
    async def main():
        engine = Engine(cuda_model, EngineSettings(max_batch_rows=16, threads=1), EngineMetrics(CollectorRegistry()))
        await engine.start()
        try:
            req = GenerationRequest(2, seed=5, sampler="dpmpp_2m_sde", steps=12)
            alone = await engine.submit(req).result()
            others = [engine.submit(GenerationRequest(3, seed=i, sampler="ddpm", steps=30)) for i in range(3)]
            amid = await engine.submit(req).result()
            await asyncio.gather(*(h.result() for h in others))
            return alone, amid
        finally:
            await engine.drain(timeout_s=5)

    alone, amid = asyncio.run(main())
    torch.testing.assert_close(alone.images, amid.images, atol=1e-4, rtol=0)


def test_training_on_cuda_follows_the_cpu_run_and_resumes(tmp_path) -> None:
    """The same draws (CPU generators) on either device: the CUDA run's weights track the CPU run's, and a CUDA
    run resumed at step 5 ends where the straight one does."""
    import numpy as np

    from service.train import train
    from tests.test_train import _config, _state

    rng = np.random.default_rng(0)
    data = tmp_path / "digits.npz"
    np.savez(data, images=rng.integers(0, 256, (32, 8, 8), dtype=np.uint8))
    quiet = {"log": lambda *_: None}
    train(_config(data, tmp_path / "cpu", steps=10, batch_size=8, device="cpu"), **quiet)
    train(_config(data, tmp_path / "cuda", steps=10, batch_size=8, device="cuda"), **quiet)
    train(_config(data, tmp_path / "half", steps=5, batch_size=8, device="cuda"), **quiet)
    train(_config(data, tmp_path / "half", steps=10, batch_size=8, device="cuda"), resume=True, **quiet)
    cpu, gpu, resumed = (_state(tmp_path / name / "work") for name in ("cpu", "cuda", "half"))
    for key in cpu["ema"]:
        torch.testing.assert_close(gpu["ema"][key], cpu["ema"][key], rtol=0, atol=1e-3, msg=key)
        torch.testing.assert_close(resumed["ema"][key], gpu["ema"][key], rtol=0, atol=1e-5, msg=key)
