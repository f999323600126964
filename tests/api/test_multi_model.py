"""Several models in one server (``DDPM_MODELS``): a model-store entry and an imported diffusers folder, through a
real uvicorn process — /v1 routes with ``model``, /v1/models, per-model readiness and metrics, both models making
progress under concurrent load, and Triton's own client (``tritonclient[http]``) on /v2 for both."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton
from diffusers import DDPMScheduler, UNet2DModel

from tests.api.conftest import SIZE, Server, make_model
from tests.conftest import REPO, tiny_unet_config

STORE = "tiny-T1000"  # make_model's name
IMPORTED = "rgb8"  # the diffusers folder's name: 8×8 RGB


def diffusers_folder(folder: Path) -> Path:
    """A random diffusers UNet2DModel folder (8×8 RGB) with a DDPM scheduler_config.json."""
    torch.manual_seed(1)
    UNet2DModel(**tiny_unet_config(8, channels=3).to_dict()).save_pretrained(folder, safe_serialization=True)
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model-repository folder: one model per sub-folder (names sort the store entry first)."""
    root = tmp_path_factory.mktemp("repo")
    make_model(root / "a-store")
    diffusers_folder(root / IMPORTED)
    return root


@pytest.fixture(scope="module")
def server(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(repository / "a-store", tmp_path_factory.mktemp("multi"),
                 DDPM_MODELS=f"{repository / 'a-store'},{repository / IMPORTED}",
                 DDPM_MAX_BATCH_ROWS="8", DDPM_MAX_IMAGES_PER_REQUEST="4")
    yield srv
    assert srv.stop() == 0, srv.log()


def npy(content: bytes) -> np.ndarray:
    return np.load(io.BytesIO(content), allow_pickle=False)


def generate_npy(server: Server, **options: object) -> np.ndarray:
    r = server.client.post("/generate", json={**options, "format": "npy"})
    assert r.status_code == 200, r.text
    return npy(r.content)


def test_models_are_listed_ready_and_addressable(server: Server) -> None:
    c = server.client
    listing = c.get("/v1/models").json()
    assert listing["default"] == STORE
    assert [(m["name"], m["image_shape"], m["ready"]) for m in listing["models"]] == [
        (STORE, [1, SIZE, SIZE], True), (IMPORTED, [3, 8, 8], True)
    ]
    assert c.get("/readyz").json() == {"status": "ready", "models": {STORE: "ready", IMPORTED: "ready"}}
    assert c.get("/v1/model", params={"model": IMPORTED}).json()["image_shape"] == [3, 8, 8]
    assert c.get("/v1/model").json()["name"] == STORE  # no model: the first
    # each model's own images; without `model`, the default's
    rgb = generate_npy(server, model=IMPORTED, num_images=2, sampler="ddim", steps=3, seed=4)
    grey = generate_npy(server, num_images=2, sampler="ddim", steps=3, seed=4)
    assert rgb.shape == (2, 3, 8, 8) and grey.shape == (2, 1, SIZE, SIZE)
    r = c.post("/generate", json={"model": IMPORTED, "sampler": "ddim", "steps": 2, "seed": 1, "format": "json"})
    assert r.json()["model"] == IMPORTED and r.headers["x-model"] == IMPORTED
    # /noise and /denoise-step take the model too: the store entry has example images, the import has none
    assert c.get("/noise", params={"t": 10}).status_code == 200
    assert c.get("/noise", params={"t": 10, "model": IMPORTED}).status_code == 404
    assert c.get("/noise/examples", params={"model": IMPORTED}).json() == {"images": []}
    x_t = io.BytesIO()
    np.save(x_t, np.zeros((3, 8, 8), np.float32))
    step = c.post("/denoise-step", json={"model": IMPORTED, "x_t": base64.b64encode(x_t.getvalue()).decode(),
                                         "t": 5, "seed": 0})
    assert step.status_code == 200, step.text
    assert npy(base64.b64decode(step.json()["x_prev"])).shape == (3, 8, 8)


def test_unknown_model_is_404_everywhere(server: Server) -> None:
    c = server.client
    for r in (
        c.post("/generate", json={"model": "nope", "steps": 2, "sampler": "ddim"}),
        c.post("/generate/stream", json={"model": "nope", "steps": 2, "sampler": "ddim"}),
        c.get("/noise", params={"model": "nope"}),
        c.get("/v1/model", params={"model": "nope"}),
    ):
        assert r.status_code == 404, r.text
        assert r.json()["detail"] == f"unknown model 'nope'; served models: {STORE}, {IMPORTED}"
    v2 = c.get("/v2/models/nope")
    assert v2.status_code == 404 and "unknown model 'nope'" in v2.json()["error"]


def test_tritonclient_serves_both_models(server: Server) -> None:
    client = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}", network_timeout=120)
    try:
        assert client.is_server_live() and client.is_server_ready()
        for name, shape in ((STORE, [-1, 1, SIZE, SIZE]), (IMPORTED, [-1, 3, 8, 8])):
            assert client.is_model_ready(name)
            meta = client.get_model_metadata(name)
            assert meta["name"] == name
            assert {o["name"]: o["shape"] for o in meta["outputs"]}["images"] == shape
            for binary in (False, True):
                values = {"num_images": (np.int32, "INT32", 2), "sampler": (np.object_, "BYTES", b"dpmpp_2m"),
                          "steps": (np.int32, "INT32", 4), "seed": (np.int64, "INT64", 9)}
                tensors = [triton.InferInput(k, [1], dt).set_data_from_numpy(np.array([v], dtype), binary_data=binary)
                           for k, (dtype, dt, v) in values.items()]
                wanted = [triton.InferRequestedOutput("images", binary_data=binary)]
                result = client.infer(name, tensors, outputs=wanted)
                expected = generate_npy(server, model=name, num_images=2, sampler="dpmpp_2m", steps=4, seed=9)
                np.testing.assert_array_equal(result.as_numpy("images"), expected)
    finally:
        client.close()


def test_both_models_progress_under_concurrent_load(server: Server) -> None:
    """Two clients flood one model each; both finish requests while the other is loaded, and each model's own
    metrics move (each engine on its own worker thread, the default DDPM_MODEL_SHARING=threads)."""
    def ok(name: str) -> float:
        return server.metric("ddpm_requests_total", model=name, outcome="ok")

    before = {name: ok(name) for name in (STORE, IMPORTED)}
    iterations = {name: server.metric("ddpm_engine_iterations_total", model=name) for name in (STORE, IMPORTED)}
    stop = time.monotonic() + 4.0
    done = {STORE: 0, IMPORTED: 0}
    errors: list[str] = []

    def flood(name: str) -> None:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            while time.monotonic() < stop:
                r = c.post("/generate", json={"model": name, "num_images": 4, "sampler": "ddpm", "steps": 40,
                                              "format": "npy"})
                if r.status_code != 200:
                    errors.append(r.text)
                    return
                done[name] += 1

    threads = [threading.Thread(target=flood, args=(name,)) for name in (STORE, IMPORTED) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert done[STORE] >= 2 and done[IMPORTED] >= 2, done
    for name in (STORE, IMPORTED):
        assert ok(name) - before[name] == done[name]
        assert server.metric("ddpm_engine_iterations_total", model=name) - iterations[name] >= 40  # 2 at a time
        assert server.metric("ddpm_images_generated_total", model=name) >= 4 * done[name]


def test_shared_device_worker_mode_serves_both(server: Server, repository: Path, tmp_path: Path) -> None:
    """DDPM_MODEL_SHARING=worker: one device thread runs both engines' forwards; results equal the default mode's."""
    names = f"{repository / 'a-store'},{repository / IMPORTED}"
    srv = Server(repository / "a-store", tmp_path, DDPM_MODELS=names, DDPM_MODEL_SHARING="worker")
    try:
        for name in (STORE, IMPORTED):
            got = generate_npy(srv, model=name, num_images=2, sampler="ddim", steps=3, seed=4)
            want = generate_npy(server, model=name, num_images=2, sampler="ddim", steps=3, seed=4)
            np.testing.assert_allclose(got, want, atol=1e-5)
    finally:
        assert srv.stop() == 0, srv.log()


def test_repository_folder_is_scanned_and_duplicate_names_refused(repository: Path, tmp_path: Path) -> None:
    srv = Server(repository / "a-store", tmp_path, DDPM_MODELS=str(repository))
    try:
        assert [m["name"] for m in srv.client.get("/v1/models").json()["models"]] == [STORE, IMPORTED]
    finally:
        assert srv.stop() == 0, srv.log()
    twice = f"{repository / 'a-store'},{repository / 'a-store'}"
    env = {"DDPM_MODELS": twice, "DDPM_PORT": "0", "DDPM_LOG_LEVEL": "warning", "DDPM_DEVICE": "cpu"}
    run = subprocess.run([sys.executable, "-m", "service", "serve"], cwd=REPO, env={**os.environ, **env},
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert f"two served models are named '{STORE}'" in run.stdout + run.stderr


def test_python_client_picks_the_model(server: Server) -> None:
    from service.client import Client

    with Client(server.url) as client:
        assert [m.name for m in client.models()] == [STORE, IMPORTED]
        assert client.model(IMPORTED).image_shape == [3, 8, 8]
        result = client.generate(2, model=IMPORTED, sampler="ddim", steps=3, seed=4)
        assert result.model == IMPORTED and result.images[0].mode == "RGB"
        exact = client.generate_array(2, model=IMPORTED, sampler="ddim", steps=3, seed=4).array
        np.testing.assert_array_equal(exact, generate_npy(server, model=IMPORTED, num_images=2, sampler="ddim",
                                                          steps=3, seed=4))
        events = list(client.stream(1, model=IMPORTED, sampler="ddim", steps=3, seed=4))
        assert events[-1].model == IMPORTED
