"""The engine's UNet forward ε_θ(x_t, t): eager, or a traced and frozen TorchScript graph.

Tracing and freezing the module (``torch.jit.trace`` + ``torch.jit.freeze``) folds the weights into the
graph and lets oneDNN fuse convolutions with their bias/activation. It is off by default: on the 2-core
development machine it made bf16 forwards ~1.5× faster while the UNet's GroupNorm hit ATen's slow
channels_last CPU kernel, but once the UNet normalises such maps in contiguous layout, eager bf16 is
faster than the traced graph, and the traced graph gains only 1.1–1.3× in fp32 (docs/benchmarks.md).
The traced graph is checked against the eager module on a batch of a different
size at warm-up and thrown away (eager is used) if they disagree, so a UNet with shape-dependent Python
control flow cannot silently produce wrong images.
"""

from __future__ import annotations

import copy
import logging
import warnings
from contextlib import nullcontext

import torch

from service.diffusion.checkpoint import DiffusionModel
from service.diffusion.rows import predict_eps

__all__ = ["UNetRunner"]

log = logging.getLogger(__name__)


class UNetRunner:
    """ε_θ(x, t) in float32 for (B, C, H, W) inputs at any batch size; ``jit`` builds the traced graph lazily."""

    def __init__(self, model: DiffusionModel, dtype: torch.dtype, jit: bool = False) -> None:
        self.model = model
        self.dtype = dtype
        self.jit = jit
        self._traced: torch.jit.ScriptModule | None = None

    @property
    def traced(self) -> bool:
        return self._traced is not None

    def _autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=self.dtype) if self.dtype != torch.float32 else nullcontext()

    def prepare(self, example_rows: int, tolerance: float | None = None) -> None:
        """Trace at ``example_rows`` rows (when ``jit``) and check against eager at another batch size."""
        if not self.jit or self._traced is not None:
            return
        spec = self.model.spec
        device = next(self.model.unet.parameters()).device
        shape = (spec.channels, spec.image_size, spec.image_size)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn((example_rows, *shape), generator=gen).to(device, memory_format=torch.channels_last)
        t = torch.randint(0, spec.num_train_timesteps, (example_rows,), generator=gen).to(device)
        module = copy.deepcopy(self.model.unet).eval().to(memory_format=torch.channels_last)
        with warnings.catch_warnings():  # TracerWarning / DeprecationWarning of torch.jit: checked below instead
            warnings.simplefilter("ignore")
            with torch.inference_mode(), self._autocast(device):
                traced = torch.jit.freeze(torch.jit.trace(module, (x, t), check_trace=False))
        # Check: another batch size, other timesteps, against the eager forward in the same precision.
        rows = 3 if example_rows != 3 else 2
        xc = torch.randn((rows, *shape), generator=gen).to(device)
        tc = torch.randint(0, spec.num_train_timesteps, (rows,), generator=gen).to(device)
        eager = predict_eps(self.model.unet, xc, tc, self.dtype)
        got = self._run(traced, xc, tc)
        limit = tolerance if tolerance is not None else (1e-4 if self.dtype == torch.float32 else 0.1)
        err = (got - eager).abs().max().item()
        if not err <= limit:
            log.warning("traced UNet differs from eager by %.3g (limit %.3g); using the eager UNet", err, limit)
            return
        self._traced = traced

    def _run(self, traced: torch.jit.ScriptModule, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), self._autocast(x.device):
            return traced(x.contiguous(memory_format=torch.channels_last), t).float()

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self._traced is not None:
            return self._run(self._traced, x, t)
        return predict_eps(self.model.unet, x, t, self.dtype)
