"""The models one server serves: name → model folder, example images and (once warm) its engine.

``DDPM_MODELS`` lists several (``Settings.model_paths``); the first is the default, used when a request names
no ``model``. Each model has its own engine (with ``DDPM_MODEL_SHARING=worker``, engines share a
:class:`~service.engine.device.DeviceWorker`). Routes reach an engine only through :func:`service.api.deps`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from service.engine.client import EngineClient

__all__ = ["ServedModel", "ServedModels"]


@dataclass(eq=False)
class ServedModel:
    name: str
    path: Path
    examples: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # for GET /noise
    engine: EngineClient | None = None  # set when its engine is warm

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.engine.ready


class ServedModels:
    """The served models in configuration order; names are unique."""

    def __init__(self) -> None:
        self._by_name: dict[str, ServedModel] = {}

    def add(self, model: ServedModel) -> None:
        if model.name in self._by_name:
            raise ValueError(
                f"two served models are named {model.name!r} ({self._by_name[model.name].path} and {model.path}); "
                "model names must be unique (config.json 'name', or the folder name of a diffusers model)"
            )
        self._by_name[model.name] = model

    def get(self, name: str | None) -> ServedModel | None:
        """The model called ``name`` (None: the default), or None when no such model is served."""
        if name is None:
            return self.default
        return self._by_name.get(name)

    @property
    def default(self) -> ServedModel | None:
        return next(iter(self._by_name.values()), None)

    @property
    def names(self) -> list[str]:
        return list(self._by_name)

    @property
    def ready(self) -> bool:
        """Every model is warm and admits work (the server's readiness)."""
        return bool(self._by_name) and all(m.ready for m in self._by_name.values())

    def engines(self) -> list[EngineClient]:
        return [m.engine for m in self._by_name.values() if m.engine is not None]

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(list(self._by_name.values()))

    def __len__(self) -> int:
        return len(self._by_name)
