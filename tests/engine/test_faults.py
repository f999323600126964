"""Engine faults fail fast: a failing or non-finite forward fails its batch only; a dead worker fails everything."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from prometheus_client import CollectorRegistry

from service.diffusion.checkpoint import DiffusionModel
from service.engine.batcher import Engine, EngineSettings
from service.engine.client import EngineError, EngineNotReadyError, GenerationRequest
from service.metrics import EngineMetrics
from tests.faults import FaultyRunner, WorkerKilled


def _run(model: DiffusionModel, body, on_fatal=None, **settings):
    async def main():
        runner = FaultyRunner(model, torch.float32)
        engine = Engine(model, EngineSettings(threads=1, **settings), EngineMetrics(CollectorRegistry()),
                        runner=runner, on_fatal=on_fatal)
        await engine.start()
        try:
            return await asyncio.wait_for(body(engine, runner), timeout=60)
        finally:
            await engine.drain(timeout_s=5)

    return asyncio.run(main())


@pytest.mark.parametrize("mode", ["raise", "nan"])
def test_failed_forward_fails_that_batch_and_the_engine_goes_on(tiny_model: DiffusionModel, mode: str) -> None:
    async def body(engine: Engine, runner: FaultyRunner):
        runner.arm(mode)
        handles = [engine.submit(GenerationRequest(2, seed=i, sampler="ddim", steps=10, request_id=f"rid-{i}"))
                   for i in range(2)]
        errors = []
        for h in handles:
            with pytest.raises(EngineError) as err:
                await h.result()
            errors.append(err.value)
        runner.arm("")
        later = await engine.submit(GenerationRequest(2, seed=3, sampler="ddim", steps=10)).result()
        return errors, later, engine.stats(), engine.metrics.requests.labels(outcome="error")._value.get()

    errors, later, stats, error_count = _run(tiny_model, body)
    for i, err in enumerate(errors):
        assert type(err) is EngineError and f"rid-{i}" in str(err)
        assert ("non-finite" if mode == "nan" else "injected forward failure") in str(err)
    assert later.images.shape == (2, 1, 8, 8) and torch.isfinite(later.images).all()
    assert stats["requests_error"] == 2 == error_count and stats["requests_ok"] == 1
    assert stats["active_rows"] == stats["queued_rows"] == 0


def test_dead_worker_fails_everything_at_once_and_reports(tiny_model: DiffusionModel) -> None:
    died: list[BaseException] = []

    async def body(engine: Engine, runner: FaultyRunner):
        running = [engine.submit(GenerationRequest(1, seed=i, sampler="ddpm", steps=1000)) for i in range(2)]
        queued = engine.submit(GenerationRequest(2, seed=7, sampler="ddpm", steps=1000))  # no room in the batch
        while engine.stats()["iterations"] < 2:
            await asyncio.sleep(0.01)
        runner.arm("die")
        start = time.monotonic()
        errors = []
        for h in (*running, queued):
            with pytest.raises(EngineNotReadyError) as err:
                await h.result()
            errors.append(err.value)
        elapsed = time.monotonic() - start
        with pytest.raises(EngineNotReadyError):
            engine.submit(GenerationRequest(1, seed=0, sampler="ddim", steps=5))
        return errors, elapsed, engine.ready, engine.failed, engine.stats()

    errors, elapsed, ready, failed, stats = _run(tiny_model, body, on_fatal=died.append, max_batch_rows=2)
    assert all("worker died" in str(e) and "WorkerKilled" in str(e) for e in errors)
    assert elapsed < 5  # one iteration of the tiny model, not the requests' deadlines (300 s)
    assert not ready and failed and stats["failed"] == 1
    assert stats["active_rows"] == stats["queued_rows"] == 0 and stats["requests_error"] == 3
    assert len(died) == 1 and isinstance(died[0], WorkerKilled)
