"""A real ``python -m service serve`` process on a free port, over a tiny random-weight model, driven with httpx."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image, ImageDraw

from service.diffusion.checkpoint import ModelSpec, save_model
from service.diffusion.unet import UNet
from tests.conftest import REPO, tiny_unet_config

SIZE = 16  # tiny model's image size: 256 pixels per image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model(
    folder: Path, timesteps: int = 1000, size: int = SIZE, examples: bool = True, sampling: dict | None = None
) -> Path:
    """A model-store entry with random weights (linear 1e-4 → 0.02 over ``timesteps``), ``sampling`` settings in
    its config.json, and example PNGs."""
    torch.manual_seed(0)
    spec = ModelSpec(name=f"tiny-T{timesteps}", unet=tiny_unet_config(size), num_train_timesteps=timesteps,
                     sampling=sampling or {})
    save_model(spec, UNet(spec.unet), folder)
    if examples:
        (folder / "examples").mkdir()
        for name, box in (("bar", (6, 2, 9, 13)), ("ring", (3, 3, 12, 12))):
            img = Image.new("L", (size, size))
            draw = ImageDraw.Draw(img)
            if name == "bar":
                draw.rectangle(box, fill=255)
            else:
                draw.ellipse(box, outline=255, width=2)
            img.save(folder / "examples" / f"{name}.png")
    return folder


class Server:
    """``python -m service serve`` (or ``argv``) in a subprocess; ``client`` talks to it."""

    def __init__(self, model: Path, tmp: Path, wait: bool = True, argv: list[str] | None = None, **env: str) -> None:
        self.model_dir = Path(model)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"server-{self.port}.log"
        full_env = {
            **os.environ,
            "DDPM_MODEL": str(model),
            "DDPM_PORT": str(self.port),
            "DDPM_HOST": "127.0.0.1",
            "DDPM_DEVICE": "cpu",
            "DDPM_THREADS": "1",
            "DDPM_LOG_LEVEL": "warning",
            # exact: responses are compared with the offline float32 pipeline (the default, auto, is bf16 on
            # CPUs with avx512_bf16; tests/test_hardware.py covers it)
            "DDPM_DTYPE": "float32",
            **env,
        }
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv or [sys.executable, "-m", "service", "serve"], cwd=REPO, env=full_env, stdout=self._log,
            stderr=self._log,
        )
        self.client = httpx.Client(base_url=self.url, timeout=60)
        if wait:
            try:
                self.wait_ready()
            except BaseException:
                self.stop()
                raise

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.client.get("/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log()}")

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def metric(self, name: str, **labels: str) -> float:
        """Value of one sample from /metrics (0 when absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        for family in text_string_to_metric_families(self.client.get("/metrics").text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return 0.0

    def stop(self, timeout: float = 30.0) -> int:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def model_t1000(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("m1000") / "tiny", timesteps=1000)


@pytest.fixture(scope="session")
def server(model_t1000: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """T = 1000 (linear 1e-4 → 0.02), 16×16 grey, two example images."""
    srv = Server(model_t1000, tmp_path_factory.mktemp("srv"), DDPM_MAX_IMAGES_PER_REQUEST="8",
                 DDPM_MAX_BATCH_ROWS="16", DDPM_MAX_QUEUE_ROWS="64")
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="session")
def server_t50(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """T = 50: whole DDPM chains stay fast."""
    tmp = tmp_path_factory.mktemp("m50")
    srv = Server(make_model(tmp / "tiny", timesteps=50), tmp, DDPM_MAX_IMAGES_PER_REQUEST="4")
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="session")
def server_json(model_t1000: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``DDPM_LOG_FORMAT=json`` at info level (access lines on), a 64 KiB upload limit."""
    srv = Server(model_t1000, tmp_path_factory.mktemp("srv-json"), DDPM_LOG_FORMAT="json", DDPM_LOG_LEVEL="info",
                 DDPM_MAX_UPLOAD_BYTES=str(64 * 1024))
    yield srv
    assert srv.stop() == 0, srv.log()
