"""Fault injection through the engine's own seams: a UNet runner that fails when armed, and an engine factory.

Modes: ``raise`` (the forward raises RuntimeError), ``nan`` (it returns NaN), ``die`` (it raises
:class:`WorkerKilled`, a BaseException that no ``except Exception`` catches, standing for whatever kills a thread
outright). The mode is set with :meth:`FaultyRunner.arm` in process, or read from a file (one word, absent = no
fault) so a test can arm a server running in another process.
"""

from __future__ import annotations

from pathlib import Path

import torch

from service.diffusion.checkpoint import DiffusionModel
from service.diffusion.runner import UNetRunner
from service.engine.batcher import DTYPES, Engine, EngineSettings

__all__ = ["FaultyRunner", "WorkerKilled", "faulty_engine_factory"]


class WorkerKilled(BaseException):
    """Kills the engine's worker thread (not an Exception: the per-iteration handler does not catch it)."""


class FaultyRunner(UNetRunner):
    """The engine's UNet runner, failing every forward while a mode is armed."""

    def __init__(self, model: DiffusionModel, dtype: torch.dtype, flag_file: Path | None = None) -> None:
        super().__init__(model, dtype)
        self.flag_file = flag_file
        self._fault = ""
        self.calls = 0

    def arm(self, mode: str) -> None:
        self._fault = mode

    @property
    def fault(self) -> str:
        if self.flag_file is not None:
            try:
                return self.flag_file.read_text().strip()
            except FileNotFoundError:
                return ""
        return self._fault

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        mode = self.fault
        if mode == "raise":
            raise RuntimeError("injected forward failure")
        if mode == "nan":
            return torch.full_like(x, float("nan"))
        if mode == "die":
            raise WorkerKilled("injected worker death")
        return super().__call__(x, t)


def faulty_engine_factory(flag_file: Path):
    """An ``app.state.engine_factory``: the real Engine over a :class:`FaultyRunner` armed by ``flag_file``."""

    def factory(model: DiffusionModel, settings: EngineSettings, **kwargs) -> Engine:
        return Engine(model, settings, runner=FaultyRunner(model, DTYPES[settings.dtype], flag_file), **kwargs)

    return factory
