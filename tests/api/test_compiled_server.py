"""A real server over a model with a compiled UNet: it loads the artifact, says so, and serves the eager images."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from service.diffusion.checkpoint import load_model
from service.diffusion.pipeline import sample
from tests.api.conftest import Server
from tests.conftest import COMPILED_ROWS


@pytest.mark.slow
@pytest.mark.parametrize("compiled", ["auto", "off"])
def test_server_serves_with_and_without_the_compiled_unet(
    compiled_model_dir: Path, tmp_path: Path, compiled: str
) -> None:
    srv = Server(compiled_model_dir, tmp_path, DDPM_COMPILED=compiled, DDPM_MAX_BATCH_ROWS=str(COMPILED_ROWS),
                 DDPM_LOG_LEVEL="info")
    try:
        assert srv.client.get("/v1/model").json()["compiled"] is (compiled == "auto")
        r = srv.client.post("/generate", json={"num_images": 3, "seed": 4, "sampler": "ddim", "steps": 6,
                                                "format": "npy"})
        assert r.status_code == 200
        got = torch.from_numpy(np.load(io.BytesIO(r.content)))
        expected = sample(load_model(compiled_model_dir), 3, 4, "ddim", 6)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
        assert ("using the compiled UNet" in srv.log()) is (compiled == "auto")
    finally:
        assert srv.stop() == 0, srv.log()
