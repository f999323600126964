"""Image-to-image, inpainting and class guidance through ``POST /generate`` of a real uvicorn process (tiny model with
a random-weight guidance classifier): the fields reach the engine, results equal the offline pipeline, bad input
is a clear 422."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.http as triton
from PIL import Image

from service.diffusion.checkpoint import load_model
from service.diffusion.conditioning import Conditioning
from service.diffusion.guidance import GuidanceClassifier, GuidanceClassifierConfig, save_guidance_classifier
from service.diffusion.pipeline import sample
from tests.api.conftest import SIZE, Server, make_model

T = 1000


@pytest.fixture(scope="module")
def guided_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = make_model(tmp_path_factory.mktemp("guided") / "tiny")
    torch.manual_seed(3)
    config = GuidanceClassifierConfig(channels=1, image_size=SIZE, num_classes=10, widths=(8, 16), blocks=(0, 1),
                                      norm_groups=4, time_freq_dim=16, time_embed_dim=32, num_train_timesteps=T)
    save_guidance_classifier(GuidanceClassifier(config), folder, {"recommended_guidance_scale": 3.0})
    return folder


@pytest.fixture(scope="module")
def server(guided_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(guided_dir, tmp_path_factory.mktemp("srv-cond"), DDPM_MAX_BATCH_ROWS="8",
                 DDPM_MAX_IMAGES_PER_REQUEST="4")
    yield srv
    assert srv.stop() == 0, srv.log()


def b64_npy(array: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, array.astype(np.float32))
    return base64.b64encode(buf.getvalue()).decode()


def b64_png(pixels: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), "L").save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def generate(server: Server, **body: object) -> np.ndarray:
    r = server.client.post("/generate", json={**body, "format": "npy"})
    assert r.status_code == 200, r.text
    return np.load(io.BytesIO(r.content))


def source() -> np.ndarray:
    """A (1, SIZE, SIZE) picture in [-1, 1]: a bright square on black."""
    x = -np.ones((1, SIZE, SIZE), np.float32)
    x[:, 4:12, 5:11] = 1.0
    return x


def test_model_reports_its_conditioning(server: Server) -> None:
    info = server.client.get("/v1/model").json()
    assert info["conditioning"] == ["image_to_image", "inpainting", "class_guidance"]
    assert info["num_classes"] == 10 and info["default_guidance_scale"] == 3.0


def test_every_mode_equals_the_offline_pipeline(server: Server, guided_dir: Path) -> None:
    model = load_model(guided_dir)
    x0 = torch.from_numpy(source())
    mask = torch.zeros(1, SIZE, SIZE)
    mask[:, SIZE // 2:] = 1.0  # regenerate the lower half
    cases = [
        ({"init_image": b64_npy(source()), "strength": 0.6}, Conditioning(init_image=x0, strength=0.6)),
        ({"init_image": b64_npy(source()), "mask": b64_npy(mask.numpy())},
         Conditioning(init_image=x0, mask=mask)),
        ({"class_label": 7, "guidance_scale": 2.0}, Conditioning(class_label=7, guidance_scale=2.0)),
        ({"class_label": 3}, Conditioning(class_label=3, guidance_scale=3.0)),  # the model's recommended scale
    ]
    for fields, cond in cases:
        got = generate(server, num_images=2, seed=11, sampler="ddim", steps=10, **fields)
        want = sample(model, 2, 11, "ddim", 10, conditioning=cond).numpy()
        np.testing.assert_allclose(got, want, atol=1 / 255, err_msg=str(fields))  # float rounding, amplified by ∇
    inpainted = generate(server, num_images=2, seed=11, sampler="ddim", steps=10, init_image=b64_npy(source()),
                         mask=b64_npy(mask.numpy()))
    known = mask.numpy()[0] == 0
    np.testing.assert_allclose(inpainted[:, 0][:, known], np.broadcast_to(source()[0][known], (2, known.sum())),
                               atol=1 / 255)


def test_png_inputs_are_converted(server: Server) -> None:
    """A PNG init image of another size is resized; a PNG mask (white = regenerate) is thresholded."""
    big = np.zeros((40, 40), np.uint8)
    big[8:24, 10:22] = 255
    mask = np.zeros((40, 40), np.uint8)
    mask[20:] = 255
    out = generate(server, seed=1, sampler="ddim", steps=5, init_image=b64_png(big), mask=b64_png(mask))
    assert out.shape == (1, 1, SIZE, SIZE)
    buf = io.BytesIO()
    Image.fromarray(big, "L").resize((SIZE, SIZE), Image.Resampling.LANCZOS).save(buf, "PNG")
    resized = np.asarray(Image.open(buf), np.float32) / 127.5 - 1  # PIL's Lanczos resize, as the server's
    top = SIZE // 2 - 1  # rows the resized mask keeps
    np.testing.assert_allclose(out[0, 0, :top], resized[:top], atol=1 / 255)
    plain = generate(server, seed=1, sampler="ddim", steps=5)
    same = generate(server, seed=1, sampler="ddim", steps=5, init_image=b64_png(big), strength=1.0)
    np.testing.assert_array_equal(plain, same)  # strength 1 is plain generation


@pytest.mark.parametrize(("fields", "needle"), [
    ({"mask": b64_npy(np.ones((1, SIZE, SIZE)))}, "inpainting needs init_image"),
    ({"init_image": b64_npy(np.zeros((1, 5, 5)))}, "init_image: shape must be"),
    ({"init_image": b64_npy(3 * np.ones((1, SIZE, SIZE)))}, "values must be in [-1, 1]"),
    ({"init_image": base64.b64encode(b"not an image").decode()}, "neither a PNG, a JPEG nor a .npy"),
    ({"init_image": "%%%"}, "not valid base64"),
    ({"strength": 0.0}, "strength"),
    ({"strength": 1.5}, "strength"),
    ({"class_label": 10}, "class_label: must be in 0..9"),
    ({"class_label": -1}, "class_label"),
    ({"class_label": 1, "guidance_scale": -1.0}, "guidance_scale"),
    ({"init_image": b64_npy(source()), "strength": 0.01}, "strength"),
    ({"jump_n_sample": 1000}, "jump_n_sample"),
])
def test_bad_conditioning_is_422(server: Server, fields: dict, needle: str) -> None:
    r = server.client.post("/generate", json={"sampler": "ddim", "steps": 10, **fields})
    assert r.status_code == 422, r.text
    assert needle in r.json()["detail"], r.json()["detail"]


def test_class_label_on_a_model_without_classifier_is_422(tmp_path: Path) -> None:
    srv = Server(make_model(tmp_path / "plain"), tmp_path)
    try:
        assert srv.client.get("/v1/model").json()["conditioning"] == ["image_to_image", "inpainting"]
        r = srv.client.post("/generate", json={"sampler": "ddim", "steps": 3, "class_label": 1})
        assert r.status_code == 422 and "has no guidance classifier" in r.json()["detail"]
    finally:
        assert srv.stop() == 0, srv.log()


def test_v2_infer_takes_the_conditioning_inputs(server: Server) -> None:
    """Triton's client: init_image and mask as BYTES files (binary tensor data), class_label, guidance_scale."""
    npy = io.BytesIO()
    np.save(npy, source())
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[SIZE // 2:] = 255
    png = base64.b64decode(b64_png(mask))
    values = {"num_images": (np.int32, "INT32", 2), "sampler": (np.object_, "BYTES", b"ddim"),
              "steps": (np.int32, "INT32", 6), "seed": (np.int64, "INT64", 5),
              "init_image": (np.object_, "BYTES", npy.getvalue()), "mask": (np.object_, "BYTES", png),
              "class_label": (np.int32, "INT32", 4), "guidance_scale": (np.float32, "FP32", 1.5)}
    client = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}", network_timeout=120)
    try:
        tensors = [triton.InferInput(k, [1], dt).set_data_from_numpy(np.array([v], dtype=dtype), binary_data=True)
                   for k, (dtype, dt, v) in values.items()]
        got = client.infer("tiny-T1000", tensors).as_numpy("images")
    finally:
        client.close()
    want = generate(server, num_images=2, sampler="ddim", steps=6, seed=5, init_image=b64_npy(source()),
                    mask=base64.b64encode(png).decode(), class_label=4, guidance_scale=1.5)
    np.testing.assert_array_equal(got, want)
