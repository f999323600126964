"""Helpers for engine tests: run a coroutine against a started engine over the tiny random-weight model."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
import torch
from prometheus_client import CollectorRegistry

from service.diffusion.checkpoint import DiffusionModel
from service.engine.batcher import Engine, EngineSettings
from service.metrics import EngineMetrics

T = TypeVar("T")



@pytest.fixture(autouse=True)
def one_torch_thread() -> object:
    """One intra-op thread: the tiny model gains nothing from more, and on an oversubscribed machine
    (CI, or a training run beside the tests) spinning OpenMP workers make each forward ~30× slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def run_engine(tiny_model: DiffusionModel) -> Callable[..., object]:
    """``run_engine(body, **settings)``: start an engine, ``await body(engine)``, drain it, return body's value."""

    def runner(body: Callable[[Engine], Awaitable[T]], metrics: EngineMetrics | None = None, **settings) -> T:
        async def main() -> T:
            settings.setdefault("threads", 1)
            engine = Engine(tiny_model, EngineSettings(**settings), metrics or EngineMetrics(CollectorRegistry()))
            await engine.start()
            try:
                return await asyncio.wait_for(body(engine), timeout=60)
            finally:
                await engine.drain(timeout_s=5)

        return asyncio.run(main())

    return runner
