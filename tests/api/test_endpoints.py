"""Every endpoint and format through a real uvicorn process (tiny random-weight model, T = 1000, 16×16 grey)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from service.diffusion.checkpoint import load_model
from service.diffusion.pipeline import sample
from tests.api.conftest import SIZE, Server

T = 1000


def png(content: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(content))
    img.load()
    return img


def npy(content: bytes | str) -> np.ndarray:
    data = base64.b64decode(content) if isinstance(content, str) else content
    return np.load(io.BytesIO(data), allow_pickle=False)


def linear_alpha_bar(t: int, big_t: int = T) -> float:
    """ᾱ_t for the linear 1e-4 → 0.02 schedule, in float64 (independent of service.diffusion)."""
    return float(np.prod(1.0 - np.linspace(1e-4, 0.02, big_t, dtype=np.float64)[: t + 1]))


def sse_events(text: str) -> list[tuple[str, dict]]:
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields["event"], json.loads(fields["data"])))
    return events


# ----------------------------------------------------------------------------------------- operations
def test_health_ready_and_model(server: Server, model_t1000: Path) -> None:
    c = server.client
    assert c.get("/healthz").json() == {"status": "ok"}
    r = c.get("/readyz")
    assert r.status_code == 200 and r.json() == {"status": "ready", "models": {"tiny-T1000": "ready"}}
    info = c.get("/v1/model").json()
    assert info["name"] == "tiny-T1000" and info["ready"] is True
    assert c.get("/v1/models").json() == {"default": "tiny-T1000", "models": [info]}
    assert c.get("/v1/model", params={"model": "tiny-T1000"}).json() == info
    missing = c.get("/v1/model", params={"model": "nope"})
    assert missing.status_code == 404 and "served models: tiny-T1000" in missing.json()["detail"]
    assert info["sha256"] == hashlib.sha256((model_t1000 / "model.safetensors").read_bytes()).hexdigest()
    assert info["image_shape"] == [1, SIZE, SIZE]
    assert info["num_train_timesteps"] == T
    assert info["schedule"]["beta_schedule"] == "linear"
    assert info["schedule"]["beta_start"] == pytest.approx(1e-4) and info["schedule"]["beta_end"] == pytest.approx(0.02)
    assert info["variance_type"] == "fixed_small"
    assert info["device"] == "cpu" and info["dtype"] == "float32"
    assert info["samplers"] == ["ddpm", "ddim", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "unipc"]
    assert info["default_steps"] == {"ddpm": T, "ddim": 50, "dpmpp_2m": 20, "dpmpp_3m": 20, "dpmpp_2m_sde": 20,
                                     "unipc": 20}
    assert info["max_steps"]["ddpm"] == T and info["max_steps"]["unipc"] == T - 1
    assert info["timestep_spacings"]["ddim"] == ["leading", "trailing", "linspace"]
    assert info["timestep_spacings"]["dpmpp_2m"] == ["leading", "trailing", "linspace", "karras", "logsnr"]
    assert info["resampling_samplers"] == ["ddpm", "ddim"]  # RePaint's jumps need samplers without solver history
    # no "sampling" in the tiny model's config.json: diffusers' class defaults
    assert info["default_timestep_spacing"] == {"ddpm": "leading", "ddim": "leading", "dpmpp_2m": "linspace",
                                                "dpmpp_3m": "linspace", "dpmpp_2m_sde": "linspace",
                                                "unipc": "linspace"}
    assert info["max_images_per_request"] == 8
    assert info["examples"] == ["bar", "ring"]


def test_metrics_exposes_engine_and_http(server: Server) -> None:
    server.client.post("/generate", json={"sampler": "ddim", "steps": 3, "seed": 1})
    r = server.client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    model = {"model": "tiny-T1000"}
    assert server.metric("ddpm_http_requests_total", route="/generate", method="POST", status="200", **model) >= 1
    assert server.metric("ddpm_http_request_duration_seconds_count", route="/generate", method="POST", **model) >= 1
    assert server.metric("ddpm_http_requests_total", route="/metrics", method="GET", status="200", model="") >= 0
    assert server.metric("ddpm_requests_total", outcome="ok", **model) >= 1
    assert server.metric("ddpm_engine_iterations_total", **model) >= 3
    assert server.metric("ddpm_ready", **model) == 1
    for name in ("ddpm_queue_depth_rows", "ddpm_active_rows", "ddpm_batch_rows_count", "ddpm_step_duration_seconds"):
        assert name in r.text


def test_openapi_and_docs(server: Server) -> None:
    doc = server.client.get("/openapi.json").json()
    ops = {(path, method) for path, item in doc["paths"].items() for method in item}
    assert ops >= {
        ("/generate", "post"), ("/generate/stream", "post"), ("/noise", "get"), ("/noise", "post"),
        ("/noise/examples", "get"), ("/denoise-step", "post"), ("/metrics", "get"), ("/healthz", "get"),
        ("/readyz", "get"), ("/v1/model", "get"), ("/v1/models", "get"),
    }
    schemas = doc["components"]["schemas"]
    assert schemas["DenoiseStepRequest"]["properties"]["t"]["maximum"] == T - 1  # the model's own limit
    assert schemas["GenerateRequest"]["examples"] and schemas["DenoiseStepRequest"]["examples"]
    assert "0-based" in doc["info"]["description"]
    assert "text/html" in server.client.get("/docs").headers["content-type"]


# ---------------------------------------------------------------------------------------- /generate
def test_generate_png_single_and_grid(server: Server) -> None:
    r = server.client.post("/generate", json={"sampler": "ddim", "steps": 4, "seed": 5})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-seed"] == "5"
    img = png(r.content)
    assert img.size == (SIZE, SIZE) and img.mode == "L"
    r = server.client.post("/generate", json={"sampler": "ddim", "steps": 4, "num_images": 4})
    grid = png(r.content)  # 2×2 tiles with 2-pixel padding
    assert grid.size == (2 * (SIZE + 2) + 2, 2 * (SIZE + 2) + 2)
    assert int(r.headers["x-seed"]) >= 0


def test_generate_json(server: Server) -> None:
    r = server.client.post("/generate", json={"sampler": "ddim", "num_images": 3, "seed": 11, "format": "json"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["seed"] == 11 and body["sampler"] == "ddim" and body["steps"] == 50  # DDIM default
    assert body["shape"] == [3, 1, SIZE, SIZE] and len(body["images"]) == 3
    assert all(png(base64.b64decode(b)).size == (SIZE, SIZE) for b in body["images"])


def test_generate_without_a_sampler_is_fast(server: Server) -> None:
    """A bare request runs SDE-DPM-Solver++(2M) at 20 steps (docs/benchmarks.md's best for its cost), not DDPM-T,
    and /v1/model names that default."""
    assert server.client.get("/v1/model").json()["default_sampler"] == "dpmpp_2m_sde"
    body = server.client.post("/generate", json={"seed": 3, "format": "json"}).json()
    assert body["sampler"] == "dpmpp_2m_sde" and body["steps"] == 20
    named = server.client.post("/generate", json={"seed": 3, "format": "json", "sampler": "dpmpp_2m_sde"}).json()
    assert named["images"] == body["images"]


def test_generate_npy_matches_offline_sampler(server: Server, model_t1000: Path) -> None:
    """The served images equal pipeline.sample's for the same seed (determinism across batching)."""
    for sampler, steps, eta in (("ddim", 10, 0.5), ("ddpm", 8, 0.0)):
        body = {"sampler": sampler, "steps": steps, "eta": eta, "num_images": 2, "seed": 1234, "format": "npy"}
        r = server.client.post("/generate", json=body)
        assert r.status_code == 200 and r.headers["content-type"] == "application/x-npy"
        arr = npy(r.content)
        assert arr.dtype == np.float32 and arr.shape == (2, 1, SIZE, SIZE)
        assert arr.min() >= -1 and arr.max() <= 1
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny tensors: one thread avoids OpenMP spinning on a busy machine
        try:
            offline = sample(load_model(model_t1000), 2, 1234, sampler, steps, eta)
        finally:
            torch.set_num_threads(threads)
        np.testing.assert_allclose(arr, offline.numpy(), atol=1e-4)  # threads differ: conv sums reorder


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "unipc"])
def test_every_new_sampler_in_every_format(server: Server, model_t1000: Path, sampler: str) -> None:
    """png, json and npy of one request agree, and equal the offline sampler with the same spacing."""
    base = {"sampler": sampler, "steps": 6, "num_images": 2, "seed": 77, "timestep_spacing": "karras"}
    arr = npy(server.client.post("/generate", json={**base, "format": "npy"}).content)
    body = server.client.post("/generate", json={**base, "format": "json"}).json()
    grid_png = server.client.post("/generate", json={**base, "format": "png"})
    assert body["sampler"] == sampler and body["steps"] == 6 and body["timestep_spacing"] == "karras"
    assert grid_png.status_code == 200 and grid_png.headers["x-seed"] == "77"
    decoded = np.stack([np.asarray(png(base64.b64decode(b)), np.float32) for b in body["images"]])
    np.testing.assert_allclose(decoded, np.round((arr[:, 0] + 1) * 127.5), atol=1)  # PNG = quantised npy
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        offline = sample(load_model(model_t1000), 2, 77, sampler, 6, spacing="karras")
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_allclose(arr, offline.numpy(), atol=1e-4)
    default = server.client.post("/generate", json={"sampler": sampler, "steps": 6, "seed": 1, "format": "json"})
    assert default.json()["timestep_spacing"] == "linspace"  # the model's (here: diffusers') default


def test_generate_reports_random_seed_that_reproduces(server: Server) -> None:
    body = {"sampler": "ddim", "steps": 3, "format": "npy"}
    first = server.client.post("/generate", json=body)
    again = server.client.post("/generate", json={**body, "seed": int(first.headers["x-seed"])})
    assert np.array_equal(npy(first.content), npy(again.content))


def test_generate_stream_sse(server: Server) -> None:
    with server.client.stream(
        "POST", "/generate/stream", json={"sampler": "ddim", "steps": 20, "seed": 3, "num_images": 2}
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-seed"] == "3"
        events = sse_events(r.read().decode())
    progress = [d for e, d in events if e == "progress"]
    assert [d["step"] for d in progress] == list(range(1, 21)) and all(d["total"] == 20 for d in progress)
    previews = [d["preview"] for d in progress if d["preview"]]
    assert len(previews) == 10  # every 20 // 10 = 2 steps
    assert png(base64.b64decode(previews[0])).size == (2 * (SIZE + 2) + 2, SIZE + 4)  # 2 images → 2×1 grid
    kind, result = events[-1]
    assert kind == "result" and result["seed"] == 3 and len(result["images"]) == 2
    final = server.client.post("/generate", json={"sampler": "ddim", "steps": 20, "seed": 3, "num_images": 2,
                                                  "format": "json"}).json()
    assert final["images"] == result["images"]


# ------------------------------------------------------------------------------------------- /noise
def test_noise_png_default_and_strip(server: Server) -> None:
    r = server.client.get("/noise", params={"t": 300, "seed": 1})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert png(r.content).size == (SIZE, SIZE) and r.headers["x-seed"] == "1"
    r = server.client.get("/noise?ts=0,100,500,999&image=ring&include=x0,noise&scale=2")
    assert r.headers["x-rows"] == "x0,x_t@0,x_t@100,x_t@500,x_t@999,noise"
    assert png(r.content).size == (2 * (6 * (SIZE + 2) + 2), 2 * (SIZE + 4))


def test_noise_npy_and_json_are_the_forward_process(server: Server) -> None:
    r = server.client.get("/noise?ts=0,300,999&seed=9&format=npy&include=x0,noise&image=bar")
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-npy"
    assert r.headers["x-rows"] == "x_t@0,x_t@300,x_t@999,x0,noise"
    arr = npy(r.content)
    assert arr.shape == (5, 1, SIZE, SIZE) and arr.dtype == np.float32
    x0, eps = arr[3], arr[4]
    for i, t in enumerate((0, 300, 999)):  # eq. (4) with an independent float64 ᾱ_t
        ab = linear_alpha_bar(t)
        np.testing.assert_allclose(arr[i], np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps, atol=1e-5)
    example = np.asarray(Image.open(server.model_dir / "examples" / "bar.png"), dtype=np.float64)
    np.testing.assert_allclose(x0[0], example / 127.5 - 1.0, atol=1e-6)
    body = server.client.get("/noise?t=300&seed=9&format=json&include=x0&image=bar").json()
    assert body["ts"] == [300] and body["seed"] == 9 and body["image"] == "bar" and body["noise"] is None
    assert body["alpha_bar"][0] == pytest.approx(linear_alpha_bar(300), rel=1e-5)
    np.testing.assert_allclose(npy(body["x_t"])[0], arr[1], atol=1e-6)  # same seed → same ε
    np.testing.assert_allclose(npy(body["x0"]), x0, atol=1e-6)


def test_noise_examples_list(server: Server) -> None:
    assert server.client.get("/noise/examples").json() == {"images": ["bar", "ring"]}
    r = server.client.get("/noise?t=3&image=nope")
    assert r.status_code == 404 and "bar" in r.json()["detail"]


def _png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_noise_upload_png_and_jpeg(server: Server) -> None:
    rgb = Image.new("RGB", (64, 48), (255, 255, 255))  # non-square colour → centre-cropped grey 16×16
    for fmt, media in (("PNG", "image/png"), ("JPEG", "image/jpeg")):
        r = server.client.post(
            "/noise?t=0&format=npy&include=x0", content=_png_bytes(rgb, fmt), headers={"content-type": media}
        )
        assert r.status_code == 200, r.text
        arr = npy(r.content)
        assert arr.shape == (2, 1, SIZE, SIZE)
        np.testing.assert_allclose(arr[1], 1.0, atol=0.02)  # white → +1
    octet = {"content-type": "application/octet-stream"}
    r = server.client.post("/noise?ts=1,2", content=_png_bytes(rgb), headers=octet)
    assert r.status_code == 200 and png(r.content).size == (2 * (SIZE + 2) + 2, SIZE + 4)


# ------------------------------------------------------------------------------------ /denoise-step
def b64npy(arr: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode()


def test_denoise_step_identities_and_eps(server: Server, model_t1000: Path) -> None:
    rng = np.random.default_rng(0)
    x_t = rng.standard_normal((1, SIZE, SIZE)).astype(np.float32)
    model = load_model(model_t1000)
    for t, variance in ((500, "fixed_small"), (10, "fixed_large"), (0, None)):
        req = {"x_t": b64npy(x_t), "t": t, "seed": 4}
        if variance:
            req["variance"] = variance
        r = server.client.post("/denoise-step", json=req)
        assert r.status_code == 200, r.text
        b = r.json()
        arrays = {k: npy(b[k]) for k in ("x_prev", "eps", "x0_pred", "posterior_mean", "noise")}
        assert all(a.shape == (1, SIZE, SIZE) and a.dtype == np.float32 for a in arrays.values())
        with torch.inference_mode():  # ε from the same weights, computed here
            eps = model.unet(torch.from_numpy(x_t)[None], torch.tensor([t]))[0].numpy()
        np.testing.assert_allclose(arrays["eps"], eps, atol=1e-5)
        ab, ab_prev = linear_alpha_bar(t), (linear_alpha_bar(t - 1) if t > 0 else 1.0)
        beta = 1 - ab / ab_prev
        assert b["alpha_bar_t"] == pytest.approx(ab, rel=1e-5)
        assert b["alpha_bar_prev"] == pytest.approx(ab_prev, rel=1e-5)
        assert b["beta_t"] == pytest.approx(beta, rel=1e-4) and b["alpha_t"] == pytest.approx(1 - beta, rel=1e-6)
        assert b["posterior_variance"] == pytest.approx(beta * (1 - ab_prev) / (1 - ab), rel=1e-4, abs=1e-12)
        assert b["posterior_mean_coef_x0"] == pytest.approx(np.sqrt(ab_prev) * beta / (1 - ab), rel=1e-4)
        assert b["posterior_mean_coef_xt"] == pytest.approx(np.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab), rel=1e-4)
        x0 = np.clip((x_t - np.sqrt(1 - ab) * eps) / np.sqrt(ab), -1, 1)  # eq. (15), clipped
        np.testing.assert_allclose(arrays["x0_pred"], x0, atol=1e-4)
        mean = b["posterior_mean_coef_x0"] * arrays["x0_pred"] + b["posterior_mean_coef_xt"] * x_t
        np.testing.assert_allclose(arrays["posterior_mean"], mean, atol=1e-5)
        expected_var = {"fixed_small": b["posterior_variance"], "fixed_large": b["beta_t"], None: 0.0}[variance]
        assert b["sigma_squared"] == pytest.approx(expected_var if t > 0 else 0.0)
        np.testing.assert_allclose(
            arrays["x_prev"], arrays["posterior_mean"] + np.sqrt(b["sigma_squared"]) * arrays["noise"], atol=1e-5
        )
        if t == 0:
            assert not arrays["noise"].any()
        else:
            assert abs(arrays["noise"].std() - 1) < 0.2
        assert png(base64.b64decode(b["x_prev_png"])).size == (SIZE, SIZE)
        assert png(base64.b64decode(b["x0_pred_png"])).size == (SIZE, SIZE)


def test_denoise_step_image_input_and_explicit_noise(server: Server) -> None:
    img = Image.new("L", (SIZE, SIZE), 255)
    z = np.full((1, 1, SIZE, SIZE), 0.5, np.float32)
    b = server.client.post(
        "/denoise-step", json={"image": base64.b64encode(_png_bytes(img)).decode(), "t": 100, "noise": b64npy(z)}
    ).json()
    np.testing.assert_allclose(npy(b["noise"]), z[0])
    expected = npy(b["posterior_mean"]) + np.sqrt(b["sigma_squared"]) * 0.5
    np.testing.assert_allclose(npy(b["x_prev"]), expected, atol=1e-5)


def test_web_page_mounted_after_the_api(server: Server) -> None:
    from service.api.app import WEB_DIR

    if not (WEB_DIR / "index.html").is_file():
        pytest.skip("service/web/index.html not present")
    r = server.client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert r.text == (WEB_DIR / "index.html").read_text()
    assert server.client.get("/healthz").json() == {"status": "ok"}  # API routes win over the static mount
    # the web page is counted as "static" (the count lands just after the last body chunk is sent)
    deadline = time.monotonic() + 5
    while server.metric("ddpm_http_requests_total", route="static", method="GET", status="200") < 1:
        assert time.monotonic() < deadline, "GET / never counted as route=static"
        time.sleep(0.05)
