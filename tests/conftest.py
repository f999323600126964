"""Shared fixtures: tiny random-weight models that every layer's tests can build in milliseconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from bench.unet_throughput import CONFIGS as UNET_CONFIGS
from service.diffusion.checkpoint import DiffusionModel, ModelSpec, load_model, save_model
from service.diffusion.unet import UNet, UNetConfig

REPO = Path(__file__).resolve().parents[1]

# diffusers UNet2DModel kwargs: the project's 28×28 architecture with the original DDPM options
SMALL_DDPM_UNET = UNET_CONFIGS["small"]


@pytest.fixture
def one_thread():
    """Small models run fastest on one intra-op thread (and leave the other core to other work)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_unet_config(size: int = 8, channels: int = 1) -> UNetConfig:
    """A 2-level UNet with attention at the lower level; a forward takes about a millisecond."""
    return UNetConfig(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
    )


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    """A model-store entry with random weights (T = 1000, 8×8 grey images)."""
    torch.manual_seed(0)
    spec = ModelSpec(name="tiny", unet=tiny_unet_config())
    return save_model(spec, UNet(spec.unet), tmp_path / "tiny")


@pytest.fixture
def tiny_model(tiny_model_dir: Path) -> DiffusionModel:
    return load_model(tiny_model_dir)


COMPILED_ROWS = 16  # the batch bound the shared compiled artifact is built for


@pytest.fixture(scope="session")
def compiled_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 16×16 tiny model with a float32 AOTInductor artifact built by ``python -m service compile`` (≈1.5 min:
    built once per run, by the CLI itself, so the command is tested too; under pytest-xdist the workers share it,
    the first one to ask building it under a file lock)."""
    import subprocess
    import sys

    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's temporary folder, shared by its workers
    folder, built = root / "compiled" / "tiny", root / "compiled" / "built"
    with FileLock(str(root / "compiled.lock")):
        if not built.is_file():
            torch.manual_seed(1)
            spec = ModelSpec(name="tiny-compiled", unet=tiny_unet_config(16))
            save_model(spec, UNet(spec.unet), folder)
            done = subprocess.run(
                [sys.executable, "-m", "service", "compile", "--model", str(folder), "--dtype", "float32",
                 "--max-batch-rows", str(COMPILED_ROWS), "--threads", "1"],
                cwd=REPO, capture_output=True, text=True, timeout=900,
            )
            assert done.returncode == 0, done.stdout + done.stderr
            assert "checked against the eager UNet: OK" in done.stdout, done.stdout
            built.touch()
    return folder
