"""The Open Inference Protocol under ``/v2`` through a real uvicorn process, driven by Triton's own client
(``tritonclient[http]``) and by raw httpx; plus the tensor codec (``service.api.oip_tensors``) in process."""

from __future__ import annotations

import base64
import io
import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

from service.api.oip_tensors import (
    HEADER_LENGTH,
    OutputTensor,
    TensorError,
    bytes_array,
    decode_request,
    encode_response,
)
from tests.api.conftest import SIZE, Server

MODEL = "tiny-T1000"  # make_model's name for T = 1000
KEY = "oip-test-key"


def npy(content: bytes) -> np.ndarray:
    return np.load(io.BytesIO(content), allow_pickle=False)


TYPES = {"num_images": (np.int32, "INT32"), "seed": (np.int64, "INT64"), "steps": (np.int32, "INT32"),
         "eta": (np.float32, "FP32"), "sampler": (np.object_, "BYTES"), "timestep_spacing": (np.object_, "BYTES")}


def inputs(binary: bool = False, **values: object) -> list[triton.InferInput]:
    """tritonclient inputs of shape [1], each of its model-metadata datatype."""
    out = []
    for name, value in values.items():
        dtype, datatype = TYPES[name]
        array = np.array([value.encode() if isinstance(value, str) else value], dtype=dtype)
        out.append(triton.InferInput(name, [1], datatype).set_data_from_numpy(array, binary_data=binary))
    return out


def tensor(name: str, datatype: str, data: list, shape: list[int] | None = None) -> dict:
    return {"name": name, "datatype": datatype, "shape": shape or [len(data)], "data": data}


def body(**extra: object) -> dict:
    """A JSON inference request for 2 DDIM-3 images, seed 5."""
    return {
        "inputs": [tensor("num_images", "INT32", [2]), tensor("sampler", "BYTES", ["ddim"]),
                   tensor("steps", "INT32", [3]), tensor("seed", "INT64", [5])],
        **extra,
    }


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}", network_timeout=120)
    yield c
    c.close()


def generate_npy(server: Server, **options: object) -> np.ndarray:
    r = server.client.post("/generate", json={**options, "format": "npy"})
    assert r.status_code == 200, r.text
    return npy(r.content)


# ------------------------------------------------------------------------------------------- tritonclient
def test_health_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    server_meta = client.get_server_metadata()
    assert server_meta["name"] == "ddpm-service" and "binary_tensor_data" in server_meta["extensions"]
    for version in ("", "1"):
        assert client.is_model_ready(MODEL, version)
        meta = client.get_model_metadata(MODEL, version)
        assert meta["name"] == MODEL and meta["versions"] == ["1"]
        assert {t["name"]: (t["datatype"], t["shape"]) for t in meta["inputs"]} == {
            "num_images": ("INT32", [1]), "seed": ("INT64", [1]), "sampler": ("BYTES", [1]),
            "steps": ("INT32", [1]), "eta": ("FP32", [1]), "timestep_spacing": ("BYTES", [1]),
            "init_image": ("BYTES", [1]), "strength": ("FP32", [1]), "mask": ("BYTES", [1]),
            "class_label": ("INT32", [1]), "guidance_scale": ("FP32", [1]),
        }
        assert {t["name"]: (t["datatype"], t["shape"]) for t in meta["outputs"]} == {
            "images": ("FP32", [-1, 1, SIZE, SIZE]), "png": ("BYTES", [-1]),
        }
    assert not client.is_model_ready("cifar10")
    assert not client.is_model_ready(MODEL, "2")
    for name, version in (("cifar10", ""), (MODEL, "2")):
        with pytest.raises(InferenceServerException) as missing:
            client.get_model_metadata(name, version)
        assert missing.value.status() == "404" and name in missing.value.message()


def test_infer_json_equals_generate(server: Server, client: triton.InferenceServerClient) -> None:
    options = {"num_images": 2, "seed": 11, "sampler": "ddim", "steps": 4, "eta": 0.5, "timestep_spacing": "trailing"}
    result = client.infer(MODEL, inputs(**options), outputs=[triton.InferRequestedOutput("images", binary_data=False)],
                          request_id="req-1")
    response = result.get_response()
    assert response["id"] == "req-1" and response["model_name"] == MODEL and response["model_version"] == "1"
    assert response["parameters"] == {"seed": 11, "sampler": "ddim", "steps": 4, "eta": 0.5,
                                      "timestep_spacing": "trailing"}
    assert "binary_data_size" not in response["outputs"][0].get("parameters", {})  # the numbers are in the JSON
    images = result.as_numpy("images")
    assert images.dtype == np.float32 and images.shape == (2, 1, SIZE, SIZE)
    assert images.min() >= -1 and images.max() <= 1
    assert np.array_equal(images, generate_npy(server, **options))  # same engine, same rows: bit for bit


def test_infer_binary_equals_generate_and_png(server: Server, client: triton.InferenceServerClient) -> None:
    options = {"num_images": 3, "seed": 12, "sampler": "unipc", "steps": 3}
    wanted = [triton.InferRequestedOutput("images", binary_data=True), triton.InferRequestedOutput("png")]
    result = client.infer(MODEL, inputs(binary=True, **options), outputs=wanted, model_version="1")
    sizes = {o["name"]: o["parameters"]["binary_data_size"] for o in result.get_response()["outputs"]}
    assert sizes["images"] == 3 * SIZE * SIZE * 4
    images = result.as_numpy("images")
    assert np.array_equal(images, generate_npy(server, **options))
    pngs = result.as_numpy("png")
    assert pngs.shape == (3,)
    r = server.client.post("/generate", json={**options, "format": "json"})
    assert [bytes(p) for p in pngs] == [base64.b64decode(s) for s in r.json()["images"]]  # /generate's PNGs exactly
    img = Image.open(io.BytesIO(pngs[0]))
    assert img.size == (SIZE, SIZE) and img.mode == "L"


def test_infer_without_outputs_returns_binary_images(client: triton.InferenceServerClient) -> None:
    """tritonclient asks for every output as binary (``binary_data_output``) when given none: ``images`` alone."""
    result = client.infer(MODEL, inputs(num_images=1, sampler="ddim", steps=2, seed=3))
    outputs = result.get_response()["outputs"]
    assert [o["name"] for o in outputs] == ["images"] and "binary_data_size" in outputs[0]["parameters"]
    assert result.as_numpy("images").shape == (1, 1, SIZE, SIZE) and result.as_numpy("png") is None


BAD = [
    ({"num_images": 9, "sampler": "ddim"}, "num_images"),  # > DDPM_MAX_IMAGES_PER_REQUEST = 8
    ({"num_images": 0, "sampler": "ddim"}, "num_images"),
    ({"num_images": 1, "sampler": "euler"}, "sampler"),
    ({"num_images": 1, "sampler": "ddim", "steps": 1001}, "steps"),  # > T
    ({"num_images": 1, "sampler": "ddim", "eta": 1.5}, "eta"),
    ({"num_images": 1, "sampler": "ddim", "seed": -1}, "seed"),
    ({"num_images": 1, "sampler": "ddim", "timestep_spacing": "karras"}, "timestep_spacing"),
    ({"num_images": 1}, "missing input(s): sampler"),
    ({"sampler": "ddim"}, "missing input(s): num_images"),
]


@pytest.mark.parametrize(("values", "needle"), BAD, ids=[n for _, n in BAD])
def test_infer_bad_values_are_400(client: triton.InferenceServerClient, values: dict, needle: str) -> None:
    with pytest.raises(InferenceServerException) as bad:
        client.infer(MODEL, inputs(**values))
    assert bad.value.status() == "400" and needle in bad.value.message()


def test_infer_bad_tensors_and_model_are_400_and_404(client: triton.InferenceServerClient) -> None:
    ok = inputs(sampler="ddim", steps=2)
    wrong_type = triton.InferInput("num_images", [1], "INT64").set_data_from_numpy(np.array([1], np.int64))
    wrong_shape = triton.InferInput("num_images", [2], "INT32").set_data_from_numpy(np.array([1, 1], np.int32))
    unknown = triton.InferInput("guidance", [1], "FP32").set_data_from_numpy(np.array([1], np.float32))
    cases = [
        ([wrong_type, *ok], "datatype INT64, expected INT32"),
        ([wrong_shape, *ok], "shape [2], expected [1]"),
        ([*inputs(num_images=1), unknown, *ok], "unknown input 'guidance'"),
    ]
    for tensors, needle in cases:
        with pytest.raises(InferenceServerException) as bad:
            client.infer(MODEL, tensors)
        assert bad.value.status() == "400" and needle in bad.value.message(), bad.value.message()
    with pytest.raises(InferenceServerException) as bad:
        client.infer(MODEL, inputs(num_images=1, sampler="ddim"), outputs=[triton.InferRequestedOutput("latents")])
    assert bad.value.status() == "400" and "unknown output 'latents'" in bad.value.message()
    for name, version in (("cifar10", ""), (MODEL, "7")):
        with pytest.raises(InferenceServerException) as missing:
            client.infer(name, inputs(num_images=1, sampler="ddim"), model_version=version)
        assert missing.value.status() == "404"


# ----------------------------------------------------------------------------------------------- raw httpx
def test_raw_json_infer_and_png_as_base64(server: Server) -> None:
    wanted = [{"name": "images"}, {"name": "png"}]
    r = server.client.post(f"/v2/models/{MODEL}/infer", json=body(id="abc", outputs=wanted, parameters={"x": 1}),
                           headers={"X-Request-ID": "oip-raw-1"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.headers["x-request-id"] == "oip-raw-1" and HEADER_LENGTH.lower() not in r.headers
    doc = r.json()
    assert doc["id"] == "abc" and doc["model_name"] == MODEL
    images, pngs = doc["outputs"]
    assert (images["name"], images["datatype"], images["shape"]) == ("images", "FP32", [2, 1, SIZE, SIZE])
    assert len(images["data"]) == 2 * SIZE * SIZE  # flat, row-major
    arr = np.array(images["data"], np.float32).reshape(images["shape"])
    assert np.array_equal(arr, generate_npy(server, num_images=2, sampler="ddim", steps=3, seed=5))
    assert (pngs["datatype"], pngs["shape"], pngs["parameters"]) == ("BYTES", [2], {"content_type": "base64"})
    assert Image.open(io.BytesIO(base64.b64decode(pngs["data"][1]))).size == (SIZE, SIZE)


def test_raw_binary_request_and_response(server: Server) -> None:
    """A hand-built binary body: a BYTES input as 4-byte length + bytes, an INT32 one; binary outputs back."""
    sampler = b"ddim"
    raw = [struct.pack("<i", 2), struct.pack("<I", len(sampler)) + sampler]
    head = json.dumps({
        "inputs": [
            {"name": "num_images", "shape": [1], "datatype": "INT32", "parameters": {"binary_data_size": len(raw[0])}},
            {"name": "sampler", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": len(raw[1])}},
            tensor("steps", "INT32", [3]), tensor("seed", "INT64", [5]),
        ],
        "outputs": [{"name": "png", "parameters": {"binary_data": False}}, {"name": "images"}],
        "parameters": {"binary_data_output": True},
    }).encode()
    r = server.client.post(f"/v2/models/{MODEL}/infer", content=head + b"".join(raw),
                           headers={HEADER_LENGTH: str(len(head)), "Content-Type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    n = int(r.headers[HEADER_LENGTH])
    doc = json.loads(r.content[:n])
    pngs, images = doc["outputs"]
    assert "data" in pngs and "data" not in images  # png in the JSON (binary_data false), images after it
    size = images["parameters"]["binary_data_size"]
    assert size == len(r.content) - n == 2 * SIZE * SIZE * 4
    arr = np.frombuffer(r.content[n:], "<f4").reshape(images["shape"])
    assert np.array_equal(arr, generate_npy(server, num_images=2, sampler="ddim", steps=3, seed=5))


def test_raw_errors_are_the_protocol_form(server: Server) -> None:
    c = server.client
    url = f"/v2/models/{MODEL}/infer"
    cases = [
        (c.post(url, content=b"{not json"), 400, "Invalid JSON"),
        (c.post(url, json={"inputs": "x"}), 400, "inputs"),
        (c.post(url, json=body(inputs=[tensor("num_images", "INT32", [1.5])])), 400, "INT32 data must be integers"),
        (c.post(url, json=body(inputs=[tensor("num_images", "INT32", [2**40])])), 400, "out of range"),
        (c.post(url, json=body(inputs=[tensor("num_images", "INT32", [1, 2], [1])])), 400, "2 elements"),
        (c.post(url, json=body(inputs=[tensor("num_images", "COMPLEX", [1])])), 400, "datatype"),
        (c.post(url, content=b"{}", headers={HEADER_LENGTH: "99"}), 400, HEADER_LENGTH),
        (c.post(url, json=body(), headers={HEADER_LENGTH: "x"}), 400, HEADER_LENGTH),
        (c.post("/v2/models/cifar10/infer", json=body()), 404, "unknown model 'cifar10'"),
        (c.get("/v2/models/cifar10/ready"), 404, "cifar10"),
        (c.get("/v2/no/such/thing"), 404, "no such endpoint"),
        (c.delete(url), 405, "method not allowed"),
        (c.get(url), 405, "method not allowed"),
    ]
    for r, status, needle in cases:
        assert r.status_code == status, (r.status_code, r.text)
        assert set(r.json()) == {"error"} and needle in r.json()["error"], r.text
        assert r.headers["x-request-id"]
    assert c.delete(url).headers["allow"] == "POST"
    assert c.get("/v2/health/live").json() == {"live": True}
    assert c.get("/v2/health/ready").json() == {"ready": True}
    assert c.get(f"/v2/models/{MODEL}/versions/1/ready").json() == {"name": MODEL, "ready": True}
    assert c.post("/generate", json={"sampler": "euler"}).json()["detail"]  # /v1 errors keep their own form
    infer_metric = server.metric("ddpm_http_requests_total", route="/v2/models/{name}/infer", method="POST",
                                 status="400")
    assert infer_metric >= 6  # the route template labels the HTTP metrics


# ---------------------------------------------------------------------------- auth, 429, 504, disconnects
@pytest.fixture(scope="module")
def guarded(model_t1000: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """API keys on, one row of room (queued + running) and a 2 s deadline."""
    srv = Server(model_t1000, tmp_path_factory.mktemp("oip-guarded"), DDPM_API_KEYS=KEY, DDPM_MAX_QUEUE_ROWS="1",
                 DDPM_MAX_BATCH_ROWS="1", DDPM_REQUEST_TIMEOUT_S="2")
    yield srv
    assert srv.stop() == 0, srv.log()


def wait_until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


AUTH = {"Authorization": f"Bearer {KEY}"}
LONG = {"inputs": [tensor("num_images", "INT32", [1]), tensor("sampler", "BYTES", ["ddpm"])]}  # 1000 steps: > 2 s


@pytest.mark.slow
def test_auth_on_every_route_but_health(guarded: Server) -> None:
    with triton.InferenceServerClient(url=f"127.0.0.1:{guarded.port}") as c:
        assert c.is_server_live() and c.is_server_ready()  # open, as /healthz and /readyz
        denied = [lambda: c.get_server_metadata(), lambda: c.get_model_metadata(MODEL),
                  lambda: c.infer(MODEL, inputs(num_images=1, sampler="ddim", steps=2))]
        for call in denied:
            with pytest.raises(InferenceServerException) as exc:
                call()
            assert exc.value.status() == "401" and "API key" in exc.value.message()
        assert not c.is_model_ready(MODEL)
        assert c.is_model_ready(MODEL, headers=AUTH) and c.get_server_metadata(headers=AUTH)["name"]
        assert c.get_model_metadata(MODEL, headers=AUTH)["name"] == MODEL
        result = c.infer(MODEL, inputs(num_images=1, sampler="ddim", steps=2), headers=AUTH)
        assert result.as_numpy("images").shape == (1, 1, SIZE, SIZE)
    r = guarded.client.get("/v2", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json() == {"error": "invalid API key"}


@pytest.mark.slow
def test_queue_full_is_429_and_deadline_504(guarded: Server) -> None:
    held: list[httpx.Response] = []

    def hold_the_row() -> None:
        with httpx.Client(base_url=guarded.url, timeout=60) as c:
            held.append(c.post(f"/v2/models/{MODEL}/infer", json=LONG, headers=AUTH))

    busy = threading.Thread(target=hold_the_row)
    busy.start()
    wait_until(lambda: guarded.metric("ddpm_active_rows") >= 1)
    with triton.InferenceServerClient(url=f"127.0.0.1:{guarded.port}") as c, \
            pytest.raises(InferenceServerException) as full:
        c.infer(MODEL, inputs(num_images=1, sampler="ddim", steps=2), headers=AUTH)
    assert full.value.status() == "429" and "queue full" in full.value.message()
    r = guarded.client.post(f"/v2/models/{MODEL}/infer", json=LONG, headers=AUTH)
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1 and set(r.json()) == {"error"}
    busy.join(60)
    assert held[0].status_code == 504 and "deadline" in held[0].json()["error"], held[0].text


@pytest.mark.slow
def test_disconnect_cancels(guarded: Server) -> None:
    cancelled = guarded.metric("ddpm_requests_total", outcome="cancelled")
    payload = json.dumps(LONG).encode()
    sock = socket.create_connection(("127.0.0.1", guarded.port))
    sock.sendall(f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {KEY}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
    wait_until(lambda: guarded.metric("ddpm_active_rows") == 1)
    sock.close()
    wait_until(lambda: guarded.metric("ddpm_requests_total", outcome="cancelled") == cancelled + 1, timeout=5)
    wait_until(lambda: guarded.metric("ddpm_active_rows") == 0, timeout=5)


# ------------------------------------------------------------------------------------------- tensor codec
def _request(*tensors: dict, binary: bytes = b"") -> tuple[bytes, str | None]:
    head = json.dumps({"inputs": list(tensors)}).encode()
    return head + binary, (str(len(head)) if binary else None)


def test_codec_flat_and_nested_json_agree() -> None:
    flat = _request(tensor("x", "FP32", [1, 2, 3, 4, 5, 6], [2, 3]))
    nested = _request(tensor("x", "FP32", [[1, 2, 3], [4, 5, 6]], [2, 3]))
    a, b = decode_request(*flat)[1]["x"].data, decode_request(*nested)[1]["x"].data
    assert a.dtype == np.float32 and a.shape == (2, 3) and np.array_equal(a, b)
    for data in ([[1, 2], [3, 4], [5, 6]], [[1, 2, 3], [4, 5]], [[[1], [2], [3]], [[4], [5], [6]]]):
        with pytest.raises(TensorError, match="shape"):
            decode_request(*_request(tensor("x", "FP32", data, [2, 3])))


def test_codec_binary_inputs_in_order() -> None:
    words = [b"ab", b"", b"\xff\x00"]
    raw_bytes = b"".join(struct.pack("<I", len(w)) + w for w in words)
    raw_ints = np.array([[1, -2], [3, 4]], "<i8").tobytes()
    head = [{"name": "s", "shape": [3], "datatype": "BYTES", "parameters": {"binary_data_size": len(raw_bytes)}},
            tensor("j", "BOOL", [True, False]),
            {"name": "i", "shape": [2, 2], "datatype": "INT64", "parameters": {"binary_data_size": len(raw_ints)}}]
    _, tensors = decode_request(*_request(*head, binary=raw_bytes + raw_ints))
    assert list(tensors["s"].data) == words
    assert tensors["i"].data.tolist() == [[1, -2], [3, 4]] and tensors["j"].data.tolist() == [True, False]
    for binary, needle in ((raw_bytes + raw_ints + b"!", "no input claims"), (raw_bytes + raw_ints[:-1], "only 31")):
        with pytest.raises(TensorError, match=needle):
            decode_request(*_request(*head, binary=binary))
    for cut in (1, 3):  # inside the last element's bytes, inside its length
        short = {**head[0], "parameters": {"binary_data_size": len(raw_bytes) - cut}}
        with pytest.raises(TensorError, match="cut off"):
            decode_request(*_request(short, binary=raw_bytes[:-cut]))
    with pytest.raises(TensorError, match="given twice"):
        decode_request(*_request(tensor("j", "BOOL", [True]), tensor("j", "BOOL", [True])))
    with pytest.raises(TensorError, match="no data"):
        decode_request(*_request({"name": "j", "shape": [1], "datatype": "BOOL"}))
    with pytest.raises(TensorError, match="true or false"):
        decode_request(*_request(tensor("j", "BOOL", [1])))


def test_codec_response_layout() -> None:
    images = np.arange(6, dtype=np.float32).reshape(1, 2, 3)
    outputs = [OutputTensor("png", "BYTES", bytes_array([b"\x89P", b"xyz"]), binary=True),
               OutputTensor("images", "FP32", images, binary=True)]
    content, n = encode_response({"model_name": "m"}, outputs)
    assert n is not None
    doc = json.loads(content[:n])
    assert [o["parameters"]["binary_data_size"] for o in doc["outputs"]] == [2 + 4 + 3 + 4, 24]
    assert content[n:n + 13] == b"\x02\x00\x00\x00\x89P\x03\x00\x00\x00xyz"
    assert np.array_equal(np.frombuffer(content[n + 13:], "<f4").reshape(1, 2, 3), images)
    text, none = encode_response({}, [OutputTensor("images", "FP32", images)])
    assert none is None and json.loads(text)["outputs"][0]["data"] == [0, 1, 2, 3, 4, 5]
