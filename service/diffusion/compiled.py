"""Ahead-of-time compiled UNets: ``torch.export`` + AOTInductor packages, built once, loaded without a compiler.

``python -m service compile --model PATH`` exports ε_θ(x, t) with a dynamic batch dimension (1..``max_batch_rows``),
compiles it with AOTInductor into ``<model>/compiled/unet-<device>-<dtype>.pt2`` and records, beside it in a
``.json``, what the machine code depends on: the weights' sha256, the dtype, the torch version, the device and its
instruction set (CPU: torch's capability and the ISA flags of /proc/cpuinfo; CUDA: the compute capability) and
the batch bound. :func:`load_compiled` loads the package's shared library (no compiler needed) only when every
recorded value matches this process; anything stale or mismatched
is ignored with one log line saying why, and the caller runs the eager UNet. Reduced precision is compiled
under autocast, so the artifact computes what the eager autocast forward computes.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from service.diffusion.checkpoint import DiffusionModel
from service.hardware import cpu_flags

__all__ = ["ArtifactKey", "artifact_paths", "compile_unet", "load_compiled"]

log = logging.getLogger(__name__)

FORMAT = "ddpm-aoti-1"
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

CompiledUNet = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ArtifactKey:
    """Everything the compiled code depends on; an artifact is used only when its key equals this process's."""

    format: str
    weights_sha256: str
    dtype: str
    torch: str
    device: str  # cpu | cuda
    capability: str  # CPU: torch.backends.cpu.get_cpu_capability(); CUDA: sm_XY
    isa_flags: tuple[str, ...]  # CPU: the ISA extensions present (code may use any of them); CUDA: ()
    machine: str
    max_batch_rows: int

    @classmethod
    def current(cls, model: DiffusionModel, dtype: torch.dtype, device: torch.device, max_batch_rows: int
                ) -> ArtifactKey:
        if device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(device)
            capability, flags = f"sm_{major}{minor}", ()
        else:
            capability, flags = torch.backends.cpu.get_cpu_capability(), tuple(cpu_flags())
        return cls(FORMAT, model.sha256, DTYPE_NAMES[dtype], torch.__version__, device.type, capability, flags,
                   platform.machine(), max_batch_rows)

    def mismatch(self, recorded: dict) -> str | None:
        """Why an artifact recorded with ``recorded`` cannot serve this key (None: it can)."""
        for name, value in asdict(self).items():
            have = recorded.get(name)
            have = tuple(have) if isinstance(have, list) else have
            if name == "max_batch_rows":
                if not isinstance(have, int) or have < value:
                    return f"compiled for at most {have} rows, the engine needs {value}"
            elif have != value:
                return f"{name} differs (artifact {have!r}, here {value!r})"
        return None


def artifact_paths(folder: Path, device: torch.device, dtype: torch.dtype) -> tuple[Path, Path]:
    """(package, metadata) of a model folder's compiled UNet for ``device`` and ``dtype``."""
    stem = folder / "compiled" / f"unet-{device.type}-{DTYPE_NAMES[dtype]}"
    return stem.with_suffix(".pt2"), stem.with_suffix(".json")


class _Eps(torch.nn.Module):
    """ε_θ(x, t) in float32, the UNet under autocast for reduced precision (export traces autocast inside forward)."""

    def __init__(self, unet: torch.nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.unet, self.dtype = unet, dtype

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        autocast = torch.autocast(x.device.type, dtype=self.dtype) if self.dtype != torch.float32 else nullcontext()
        with autocast:
            return self.unet(x, t).float()


def compile_unet(model: DiffusionModel, folder: Path, dtype: torch.dtype = torch.float32,
                 max_batch_rows: int = 64) -> Path:
    """Export and AOT-compile the model's UNet for this machine; returns the package path (needs a C++ compiler)."""
    device = next(model.unet.parameters()).device
    spec = model.spec
    example = min(8, max_batch_rows) if max_batch_rows > 1 else 1
    x = torch.randn(example, spec.channels, spec.image_size, spec.image_size, device=device)
    t = torch.randint(0, spec.num_train_timesteps, (example,), device=device)
    batch = torch.export.Dim("batch", min=1, max=max(max_batch_rows, 2))
    package, meta = artifact_paths(folder, device, dtype)
    package.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with torch.no_grad():
        exported = torch.export.export(_Eps(model.unet, dtype), (x, t), dynamic_shapes=({0: batch}, {0: batch}))
        torch._inductor.aoti_compile_and_package(  # freezing: weights as constants, prepacked (~5 % here)
            exported, package_path=str(package), inductor_configs={"freezing": True}
        )
    key = ArtifactKey.current(model, dtype, device, max_batch_rows)
    meta.write_text(json.dumps({**asdict(key), "compile_seconds": round(time.perf_counter() - start, 1)}, indent=2))
    return package


def _load_package(package: Path, device: torch.device) -> CompiledUNet:
    """ε_θ from an AOTInductor package. ``torch._inductor.aoti_load_package`` wraps the same C++ loader, but importing
    ``torch._inductor`` takes ~2.5 s of a ~3 s cold start on the development CPU, so the loader is used directly
    (with the public function as the fallback should a torch version lack it)."""
    loader_class = getattr(getattr(torch._C, "_aoti", None), "AOTIModelPackageLoader", None)
    if loader_class is None:
        return torch._inductor.aoti_load_package(str(package))
    index = device.index if device.index is not None else (0 if device.type == "cuda" else -1)
    loader = loader_class(str(package), "model", False, 1, index)

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return loader.run([x, t])[0]

    return eps


def load_compiled(model: DiffusionModel, folder: Path | None, dtype: torch.dtype, max_batch_rows: int
                  ) -> CompiledUNet | None:
    """The compiled UNet of ``folder`` when present and valid for this process, else None (with one log line
    when an artifact exists but cannot be used)."""
    if folder is None:
        return None
    device = next(model.unet.parameters()).device
    package, meta = artifact_paths(folder, device, dtype)
    if not package.is_file():
        return None
    try:
        recorded = json.loads(meta.read_text())
    except (OSError, ValueError) as exc:
        log.warning("ignoring compiled UNet %s: unreadable metadata %s (%s); using the eager UNet", package, meta, exc)
        return None
    why = ArtifactKey.current(model, dtype, device, max_batch_rows).mismatch(recorded)
    if why is not None:
        log.warning("ignoring compiled UNet %s: %s; using the eager UNet (rebuild: python -m service compile)",
                    package, why)
        return None
    try:
        return _load_package(package, device)
    except Exception as exc:  # a corrupt package: never fatal, eager still works
        log.warning("ignoring compiled UNet %s: loading failed (%r); using the eager UNet", package, exc)
        return None
