"""Run the real service (``python -m service serve``) in a subprocess for end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import httpx
import torch
from PIL import Image, ImageDraw

from service.diffusion.checkpoint import ModelSpec, save_model
from service.diffusion.guidance import GuidanceClassifier, GuidanceClassifierConfig, save_guidance_classifier
from service.diffusion.unet import UNet
from tests.conftest import REPO, tiny_unet_config

__all__ = ["add_guidance_classifier", "free_port", "make_tiny_model", "running_server"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_tiny_model(folder: Path, size: int = 8, name: str = "tiny") -> Path:
    """A random-weight model-store entry (T = 1000, grey size×size) with two example digits for /noise."""
    torch.manual_seed(0)
    spec = ModelSpec(name=name, unet=tiny_unet_config(size))
    out = save_model(spec, UNet(spec.unet), folder)
    examples = out / "examples"
    examples.mkdir(exist_ok=True)
    for name, shape in (("0", "ring"), ("1", "bar")):
        img = Image.new("L", (28, 28), 0)
        draw = ImageDraw.Draw(img)
        if shape == "ring":
            draw.ellipse((6, 4, 22, 24), outline=255, width=3)
        else:
            draw.rectangle((12, 4, 16, 24), fill=255)
        img.save(examples / f"{name}.png")
    return out


def add_guidance_classifier(folder: Path, size: int = 8, recommended_scale: float = 3.0) -> Path:
    """Put a random-weight noise-aware digit classifier (10 classes, T = 1000) beside a tiny model's weights, so the
    entry offers class guidance (GET /v1/model: conditioning has "class_guidance", num_classes 10)."""
    torch.manual_seed(3)
    config = GuidanceClassifierConfig(channels=1, image_size=size, num_classes=10, widths=(8, 16), blocks=(0, 1),
                                      norm_groups=4, time_freq_dim=16, time_embed_dim=32, num_train_timesteps=1000)
    save_guidance_classifier(GuidanceClassifier(config), folder, {"recommended_guidance_scale": recommended_scale})
    return folder


@contextlib.contextmanager
def running_server(model_dir: Path, timeout_s: float = 120.0, **settings: object) -> Iterator[str]:
    """Start ``python -m service serve`` on a free port; yield its base URL once /readyz is 200; stop it."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DDPM_")}
    env.update({"DDPM_MODEL": str(model_dir), "DDPM_HOST": "127.0.0.1", "DDPM_PORT": str(port),
                "DDPM_DEVICE": "cpu", "DDPM_LOG_LEVEL": "warning", "DDPM_THREADS": "1"})
    env.update({f"DDPM_{k.upper()}": str(v) for k, v in settings.items()})
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([sys.executable, "-m", "service", "serve"], cwd=REPO, env=env, stdout=log, stderr=log)
        try:
            _wait_ready(proc, f"http://127.0.0.1:{port}", log, timeout_s)
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_ready(proc: subprocess.Popen, base: str, log: IO[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read().decode(errors='replace')}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"server not ready after {timeout_s} s")
        time.sleep(0.1)
