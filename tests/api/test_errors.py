"""Bad input never gets a 500: 422 with a readable message, 413, 415, 400 — through the real server."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from tests.api.conftest import SIZE, Server


def b64npy(arr: np.ndarray, allow_pickle: bool = False) -> str:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return base64.b64encode(buf.getvalue()).decode()


def png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width×height but whose data is a few bytes (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\x00" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")


GOOD = np.zeros((1, SIZE, SIZE), np.float32)
NAN = GOOD.copy()
NAN[0, 3, 3] = np.nan
INF = GOOD.copy()
INF[0, 0, 0] = -np.inf
TRUNCATED = base64.b64encode(base64.b64decode(b64npy(GOOD))[:-10]).decode()

GENERATE_422 = [
    ({"num_images": 9}, "num_images"),  # > DDPM_MAX_IMAGES_PER_REQUEST = 8
    ({"num_images": 0}, "num_images"),
    ({"steps": 1001}, "steps"),  # > T
    ({"steps": 0}, "steps"),
    ({"sampler": "euler"}, "sampler"),
    ({"sampler": "ddim", "timestep_spacing": "karras"}, "timestep_spacing"),  # not a DDIM spacing
    ({"sampler": "dpmpp_2m", "timestep_spacing": "sideways"}, "timestep_spacing"),
    ({"sampler": "dpmpp_3m", "steps": 1000}, "steps"),  # > T − 1 for the ODE solvers
    ({"sampler": "unipc", "steps": 0}, "steps"),
    ({"sampler": "ddim", "eta": 1.5}, "eta"),
    ({"sampler": "ddim", "eta": -0.1}, "eta"),
    ({"seed": -1}, "seed"),
    ({"num_images": "2"}, "num_images"),  # strict: no string → int coercion
    ({"format": "gif"}, "format"),
    ({"colour": "red"}, "colour"),
]


@pytest.mark.parametrize(("body", "field"), GENERATE_422)
@pytest.mark.parametrize("path", ["/generate", "/generate/stream"])
def test_generate_422(server: Server, path: str, body: dict, field: str) -> None:
    r = server.client.post(path, json={"steps": 2, "sampler": "ddim", **body})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and field in detail


def test_generate_malformed_json_is_422(server: Server) -> None:
    for content in (b"{not json", b"\xff\xfe\x00", b"[1, 2]", b"null"):
        r = server.client.post("/generate", content=content, headers={"content-type": "application/json"})
        assert r.status_code == 422, (content, r.text)


DENOISE_422 = [
    ({"x_t": b64npy(GOOD), "t": 1000}, "t"),
    ({"x_t": b64npy(GOOD), "t": -1}, "t"),
    ({"t": 5}, "x_t"),  # neither x_t nor image
    ({"x_t": b64npy(GOOD), "image": "aGk=", "t": 5}, "x_t"),  # both
    ({"x_t": "not base64!!", "t": 5}, "base64"),
    ({"x_t": base64.b64encode(b"hello world").decode(), "t": 5}, ".npy"),
    ({"x_t": TRUNCATED, "t": 5}, "x_t"),
    ({"x_t": b64npy(np.zeros((1, 8, 8), np.float32)), "t": 5}, "shape"),
    ({"x_t": b64npy(np.zeros((2, 1, SIZE, SIZE), np.float32)), "t": 5}, "shape"),
    ({"x_t": b64npy(np.zeros((1, SIZE, SIZE), np.int32)), "t": 5}, "dtype"),
    ({"x_t": b64npy(np.zeros((1, SIZE, SIZE), np.complex64)), "t": 5}, "dtype"),
    ({"x_t": b64npy(np.array([None] * 3, dtype=object), allow_pickle=True), "t": 5}, "dtype"),
    ({"x_t": b64npy(NAN), "t": 5}, "NaN"),
    ({"x_t": b64npy(INF), "t": 5}, "Inf"),
    ({"x_t": b64npy(GOOD), "t": 5, "noise": b64npy(np.zeros((3, SIZE, SIZE), np.float32))}, "noise"),
    ({"x_t": b64npy(GOOD), "t": 5, "noise": b64npy(NAN)}, "noise"),
    ({"x_t": b64npy(GOOD), "t": 5, "variance": "learned"}, "variance"),
    ({"image": "aGVsbG8=", "t": 5}, "image"),  # base64 of "hello": not an image
    ({"image": base64.b64encode(huge_png_header(100_000, 100_000)).decode(), "t": 5}, "pixels"),
]


@pytest.mark.parametrize(("body", "needle"), DENOISE_422)
def test_denoise_step_422(server: Server, body: dict, needle: str) -> None:
    r = server.client.post("/denoise-step", json=body)
    assert r.status_code == 422, r.text
    assert needle in r.json()["detail"]


NOISE_422 = ["t=1000", "t=-1", "ts=0,1000", "ts=a,b", "ts=", "t=3&ts=4", "include=foo", "scale=0", "format=gif",
             "seed=-5", "ts=" + ",".join(["1"] * 65)]


@pytest.mark.parametrize("query", NOISE_422)
def test_noise_422(server: Server, query: str) -> None:
    r = server.client.get(f"/noise?{query}")
    assert r.status_code == 422, r.text
    assert isinstance(r.json()["detail"], str)
    r = server.client.post(f"/noise?{query}", content=png_bytes(Image.new("L", (4, 4))),
                           headers={"content-type": "image/png"})
    assert r.status_code == 422, r.text


def test_noise_upload_415(server: Server) -> None:
    gif = png_bytes(Image.new("L", (4, 4)), "GIF")
    for media, content in (("image/gif", gif), ("text/plain", b"hi"), ("multipart/form-data; boundary=x", b"--x--")):
        r = server.client.post("/noise?t=1", content=content, headers={"content-type": media})
        assert r.status_code == 415, (media, r.text)
        assert "image/png" in r.json()["detail"]
    r = server.client.post("/noise?t=1", content=gif, headers={"content-type": "application/octet-stream"})
    assert r.status_code == 415


def test_noise_upload_400_undecodable(server: Server) -> None:
    good = png_bytes(Image.new("L", (32, 32), 128))
    gif = png_bytes(Image.new("L", (4, 4)), "GIF")
    cases = {
        "junk": b"definitely not an image",
        "truncated": good[: len(good) // 2],
        "gif labelled png": gif,
        "bomb": huge_png_header(100_000, 100_000),  # 10^10 pixels: rejected from the header, nothing decoded
        "empty": b"",
    }
    for name, content in cases.items():
        r = server.client.post("/noise?t=1", content=content, headers={"content-type": "image/png"})
        assert r.status_code == 400, (name, r.text)
    bomb = huge_png_header(100_000, 100_000)
    r = server.client.post("/noise?t=1", content=bomb, headers={"content-type": "image/png"})
    assert "pixels" in r.json()["detail"]


def test_413_over_upload_limit(server: Server) -> None:
    big = b"\x89PNG\r\n\x1a\n" + b"\x00" * (5 * 1024 * 1024)  # DDPM_MAX_UPLOAD_BYTES defaults to 5 MiB
    r = server.client.post("/noise?t=1", content=big, headers={"content-type": "image/png"})
    assert r.status_code == 413 and "limit" in r.json()["detail"]

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(6):
            yield b"\x00" * (1024 * 1024)

    r = server.client.post("/noise?t=1", content=chunks(), headers={"content-type": "image/png"})
    assert r.status_code == 413
    r = server.client.post("/denoise-step", json={"x_t": "A" * (6 * 1024 * 1024), "t": 1})
    assert r.status_code == 413
    assert server.client.get("/readyz").status_code == 200


def test_unknown_route_and_method(server: Server) -> None:
    assert server.client.get("/nope").status_code == 404
    r = server.client.put("/generate")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
