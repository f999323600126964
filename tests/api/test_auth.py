"""API keys through a real ``python -m service serve``: 401 without or with a wrong key, 200 with a right one
(from DDPM_API_KEYS and from DDPM_API_KEYS_FILE), open health and docs, /metrics by DDPM_METRICS_AUTH, keys never
logged, and the secure default: no start on a non-loopback address without keys unless DDPM_AUTH=none."""

from __future__ import annotations

import base64
import io
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.api.auth import ApiKeys, is_loopback
from service.config import Settings
from tests.api.conftest import SIZE, Server

ENV_KEYS = ("env-key-1-3f9c2a", "env-key-2-77d0b1")
FILE_KEY = "file-key-9e41cc05"
WRONG = "wrong-key-000000"
TINY = {"sampler": "ddim", "steps": 2, "seed": 0}


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (SIZE, SIZE), 128).save(buf, format="PNG")
    return buf.getvalue()


def _npy_b64(arr: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode()


# (method, path, request kwargs): one request per protected operation
PROTECTED = [
    ("POST", "/generate", {"json": TINY}),
    ("POST", "/generate/stream", {"json": TINY}),
    ("GET", "/noise", {"params": {"t": 10}}),
    ("GET", "/noise/examples", {}),
    ("POST", "/noise", {"params": {"t": 10}, "content": _png(), "headers": {"content-type": "image/png"}}),
    ("POST", "/denoise-step", {"json": {"x_t": _npy_b64(np.zeros((1, SIZE, SIZE), np.float32)), "t": 5}}),
    ("GET", "/v1/model", {}),
]
OPEN = ["/healthz", "/readyz", "/docs", "/openapi.json", "/", "/app.js"]


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def call(srv: Server, method: str, path: str, kwargs: dict, auth: dict[str, str] | None = None):
    headers = {**kwargs.get("headers", {}), **(auth or {})}
    return srv.client.request(method, path, **{**kwargs, "headers": headers})


def assert_401(r, detail: str) -> None:
    assert r.status_code == 401, (r.status_code, r.text)
    assert r.headers["www-authenticate"] == "Bearer"
    body = r.json()
    assert set(body) == {"detail", "request_id"} and detail in body["detail"]
    assert body["request_id"] == r.headers["x-request-id"]


@pytest.fixture(scope="module")
def auth_server(model_t1000: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Keys from both sources; info level, so the access lines are in the log too."""
    tmp = tmp_path_factory.mktemp("auth")
    keys_file = tmp / "keys"
    keys_file.write_text(f"# one key per line\n\n  {FILE_KEY}  \n")
    srv = Server(model_t1000, tmp, DDPM_API_KEYS=",".join(ENV_KEYS), DDPM_API_KEYS_FILE=str(keys_file),
                 DDPM_LOG_LEVEL="info")
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.mark.parametrize(("method", "path", "kwargs"), PROTECTED, ids=[f"{m} {p}" for m, p, _ in PROTECTED])
def test_protected_route_needs_a_right_key(auth_server: Server, method: str, path: str, kwargs: dict) -> None:
    assert_401(call(auth_server, method, path, kwargs), "API key required")
    assert_401(call(auth_server, method, path, kwargs, {"Authorization": f"Basic {ENV_KEYS[0]}"}), "API key required")
    assert_401(call(auth_server, method, path, kwargs, _bearer(WRONG)), "invalid API key")
    assert_401(call(auth_server, method, path, kwargs, _bearer(ENV_KEYS[0] + "x")), "invalid API key")
    for key in (ENV_KEYS[1], FILE_KEY):  # the second env key, and the file's (stripped, comments skipped)
        r = call(auth_server, method, path, kwargs, _bearer(key))
        assert r.status_code == 200, (r.status_code, r.text)
        if path == "/generate/stream":
            assert "event: result" in r.text


def test_health_docs_page_and_metrics_stay_open(auth_server: Server) -> None:
    for path in OPEN:
        assert auth_server.client.get(path).status_code == 200, path
    r = auth_server.client.get("/metrics")  # DDPM_METRICS_AUTH defaults to false
    assert r.status_code == 200 and "ddpm_queue_depth_rows" in r.text


def test_openapi_declares_the_bearer_scheme(auth_server: Server) -> None:
    doc = auth_server.client.get("/openapi.json").json()
    schemes = doc["components"]["securitySchemes"]
    assert schemes["HTTPBearer"]["type"] == "http" and schemes["HTTPBearer"]["scheme"] == "bearer"
    for method, path, _ in PROTECTED:
        op = doc["paths"][path][method.lower()]
        assert op["security"] == [{"HTTPBearer": []}], path
        assert "401" in op["responses"], path
    for path in ("/healthz", "/readyz", "/metrics"):  # /metrics: DDPM_METRICS_AUTH is off
        assert "security" not in doc["paths"][path]["get"], path
        assert "401" not in doc["paths"][path]["get"]["responses"], path
    docs = auth_server.client.get("/docs")  # Swagger UI renders its Authorize button from securitySchemes
    assert docs.status_code == 200 and "swagger-ui" in docs.text and "/openapi.json" in docs.text


def test_keys_never_reach_the_log(auth_server: Server) -> None:
    for key in (*ENV_KEYS, FILE_KEY, WRONG):
        auth_server.client.get("/v1/model", headers=_bearer(key))
    time.sleep(0.2)  # the access lines are written after the responses
    log = auth_server.log()
    assert "GET /v1/model 401" in log and "GET /v1/model 200" in log  # the log does hold the requests
    for secret in (*ENV_KEYS, FILE_KEY, WRONG):
        assert secret not in log


def test_secrets_stay_out_of_repr() -> None:
    s = Settings(api_keys=",".join(ENV_KEYS))
    assert s.resolved_api_keys() == ENV_KEYS
    for text in (repr(s), str(s), repr(ApiKeys(ENV_KEYS)), str(s.model_dump())):
        assert not any(k in text for k in ENV_KEYS), text
    assert Settings(api_keys=" , ").resolved_api_keys() == ()


def test_loopback_hosts() -> None:
    assert all(map(is_loopback, ("127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost", "LOCALHOST")))
    assert not any(map(is_loopback, ("0.0.0.0", "::", "10.0.0.5", "192.168.1.2", "example.com", "")))


# ------------------------------------------------------------------------------------ secure default


def _refused(model: Path, tmp: Path, **env: str) -> str:
    srv = Server(model, tmp, wait=False, **env)
    try:
        rc = srv.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        srv.stop()
        raise AssertionError(f"the server started:\n{srv.log()}") from None
    srv.stop()
    assert rc == 2, (rc, srv.log())
    return srv.log()


def test_start_refused_on_all_interfaces_without_keys(model_t1000: Path, tmp_path: Path) -> None:
    log = _refused(model_t1000, tmp_path, DDPM_HOST="0.0.0.0", DDPM_API_KEYS="", DDPM_AUTH="auto")
    assert "refusing to serve on 0.0.0.0 without API keys" in log
    for name in ("DDPM_API_KEYS", "DDPM_API_KEYS_FILE", "DDPM_AUTH=none"):
        assert name in log
    assert "Traceback" not in log


def test_start_refused_with_an_unreadable_or_empty_keys_file(model_t1000: Path, tmp_path: Path) -> None:
    log = _refused(model_t1000, tmp_path, DDPM_API_KEYS_FILE=str(tmp_path / "missing"))
    assert "cannot read API keys" in log and "missing" in log
    empty = tmp_path / "empty"
    empty.write_text("# no keys yet\n\n")
    assert "contains no key" in _refused(model_t1000, tmp_path, DDPM_API_KEYS_FILE=str(empty))


def test_all_interfaces_with_keys_and_metrics_auth(model_t1000: Path, tmp_path: Path) -> None:
    srv = Server(model_t1000, tmp_path, DDPM_HOST="0.0.0.0", DDPM_API_KEYS=ENV_KEYS[0], DDPM_METRICS_AUTH="true")
    try:
        assert srv.client.get("/readyz").status_code == 200
        assert_401(srv.client.get("/metrics"), "API key required")
        assert_401(srv.client.get("/metrics", headers=_bearer(WRONG)), "invalid API key")
        r = srv.client.get("/metrics", headers=_bearer(ENV_KEYS[0]))
        assert r.status_code == 200 and "ddpm_queue_depth_rows" in r.text
        assert_401(srv.client.post("/generate", json=TINY), "API key required")
        assert srv.client.get("/openapi.json").json()["paths"]["/metrics"]["get"]["security"] == [{"HTTPBearer": []}]
    finally:
        assert srv.stop() == 0, srv.log()


def test_all_interfaces_with_explicit_opt_out(model_t1000: Path, tmp_path: Path) -> None:
    srv = Server(model_t1000, tmp_path, DDPM_HOST="0.0.0.0", DDPM_API_KEYS="", DDPM_AUTH="none")
    try:
        assert srv.client.post("/generate", json=TINY).status_code == 200
        assert srv.client.get("/v1/model").status_code == 200
        assert "without authentication (DDPM_AUTH=none)" in srv.log()
        doc = srv.client.get("/openapi.json").json()  # no key is enforced, so none is declared
        assert "securitySchemes" not in doc["components"]
        assert not any("security" in op for item in doc["paths"].values() for op in item.values())
    finally:
        assert srv.stop() == 0, srv.log()
