"""The UNet forward ε_θ(x, t) that sampling runs: the compiled artifact when one is valid, else the eager UNet.

``compiled="auto"`` looks for ``<model folder>/compiled/unet-<device>-<dtype>.pt2`` (:mod:`service.diffusion.compiled`,
built by ``python -m service compile``). :meth:`UNetRunner.prepare` loads it and checks it against the eager
forward on batches of 1 and 3 rows (sizes the export never saw as its example) at fixed inputs; it is dropped with a
log line if the largest difference in ε exceeds the tolerance (float32: 1e-3, reduced precision: 0.1; measured on
the default model: 2e-6 in float32). Without a valid artifact, or with ``compiled="off"``, the eager UNet runs.
This replaces the TorchScript trace the engine had (``DDPM_JIT``): AOTInductor's code is 1.5–5× faster than eager
on the development CPU, and needs no compiler where it is served.

On CUDA (``cuda_graphs=True``) the chosen forward is replayed from CUDA graphs, one per batch-size bucket
(:mod:`service.diffusion.graphs`), captured in :meth:`UNetRunner.prepare`.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch

from service.diffusion.checkpoint import DiffusionModel
from service.diffusion.compiled import CompiledUNet, load_compiled
from service.diffusion.graphs import BucketedForward
from service.diffusion.rows import predict_eps

__all__ = ["Compiled", "UNetRunner"]

log = logging.getLogger(__name__)

Compiled = Literal["auto", "off"]


class UNetRunner:
    """ε_θ(x, t) in float32 for (B, C, H, W) inputs, B up to the ``max_batch_rows`` given to :meth:`prepare`."""

    def __init__(self, model: DiffusionModel, dtype: torch.dtype, compiled: Compiled = "auto",
                 cuda_graphs: bool = True) -> None:
        self.model = model
        self.dtype = dtype
        self.mode = compiled
        self.cuda_graphs = cuda_graphs
        self._compiled: CompiledUNet | None = None
        self._graphed: BucketedForward | None = None
        self._max_rows = 0

    @property
    def compiled(self) -> bool:
        """Whether the compiled artifact is in use."""
        return self._compiled is not None

    @property
    def graphed(self) -> bool:
        """Whether forwards replay CUDA graphs."""
        return self._graphed is not None

    def prepare(self, max_batch_rows: int, tolerance: float | None = None) -> None:
        """Load the compiled UNet (``compiled="auto"``) and keep it only if it agrees with eager; on CUDA, capture
        the graphs."""
        self._load_compiled(max_batch_rows, tolerance)
        device = next(self.model.unet.parameters()).device
        if self.cuda_graphs and device.type == "cuda" and self._graphed is None:
            spec = self.model.spec
            shape = (spec.channels, spec.image_size, spec.image_size)
            self._graphed = BucketedForward(self._forward, shape, max_batch_rows, device)
            self._graphed.capture()
            self._max_rows = max_batch_rows

    def _load_compiled(self, max_batch_rows: int, tolerance: float | None) -> None:
        if self.mode == "off" or self._compiled is not None:
            return
        fn = load_compiled(self.model, self.model.folder, self.dtype, max_batch_rows)
        if fn is None:
            return
        spec = self.model.spec
        device = next(self.model.unet.parameters()).device
        gen = torch.Generator().manual_seed(0)
        limit = tolerance if tolerance is not None else (1e-3 if self.dtype == torch.float32 else 0.1)
        for rows in (1, 3):
            x = torch.randn((rows, spec.channels, spec.image_size, spec.image_size), generator=gen).to(device)
            t = torch.randint(0, spec.num_train_timesteps, (rows,), generator=gen).to(device)
            with torch.inference_mode():
                got = fn(x, t)
            err = (got.float() - predict_eps(self.model.unet, x, t, self.dtype)).abs().max().item()
            if not err <= limit:
                log.warning("compiled UNet differs from eager by %.3g at %d rows (limit %.3g); using the eager UNet",
                            err, rows, limit)
                return
        self._compiled, self._max_rows = fn, max_batch_rows
        log.info("using the compiled UNet of %s (%s, up to %d rows)", self.model.folder, self.dtype, max_batch_rows)

    def _forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self._compiled is not None and x.shape[0] <= self._max_rows:
            with torch.inference_mode():
                return self._compiled(x.contiguous(), t.to(x.device))
        return predict_eps(self.model.unet, x, t, self.dtype)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self._graphed is not None and x.shape[0] <= self._max_rows:
            return self._graphed(x, t)
        return self._forward(x, t)
