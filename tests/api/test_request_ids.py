"""Request ids through a real server: ``X-Request-ID`` kept when valid, generated otherwise, echoed on every
response and in every error body; ``DDPM_LOG_FORMAT=json`` gives one JSON object per line with the access fields."""

from __future__ import annotations

import io
import json
import logging
import re
import time
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from service.api.middleware import RequestIdMiddleware
from service.logging_setup import log_handler, request_id_var
from tests.api.conftest import Server

GENERATED = re.compile(r"[0-9a-f]{32}")  # uuid4().hex
GIVEN = "client-42.retry_1:a/b~c"  # printable ASCII without spaces: kept as sent
FAST = {"sampler": "ddim", "steps": 2, "seed": 1}


def records(server: Server) -> list[dict]:
    """Every line the server wrote (stdout and stderr), each parsed as JSON (fails on any other line)."""
    return [json.loads(line) for line in server.log().splitlines() if line.strip()]


def access_line(server: Server, request_id: str, timeout: float = 10.0) -> dict:
    """The access line of one request (written just after its response, so wait for it)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [r for r in records(server) if r["logger"] == "service.access" and r.get("request_id") == request_id]
        if found or time.monotonic() > deadline:
            assert len(found) == 1, f"{len(found)} access lines for {request_id}:\n{server.log()[-4000:]}"
            return found[0]
        time.sleep(0.05)


def test_given_id_is_echoed_on_every_response(server_json: Server) -> None:
    c = server_json.client
    h = {"X-Request-ID": GIVEN}
    responses = {
        "healthz": c.get("/healthz", headers=h),
        "metrics": c.get("/metrics", headers=h),
        "web page": c.get("/", headers=h),
        "generate": c.post("/generate", json=FAST, headers=h),
        "422": c.post("/generate", json={"num_images": 0}, headers=h),
        "422 engine limits": c.post("/generate", json={"sampler": "ddim", "steps": 5000}, headers=h),
        "422 not JSON": c.post("/generate", content=b"\xff", headers={**h, "content-type": "application/json"}),
        "404": c.get("/nope", headers=h),
        "404 example": c.get("/noise?image=missing&t=1", headers=h),
        "405": c.put("/generate", headers=h),
        "413 content-length": c.post("/denoise-step", content=b"x" * (65 * 1024), headers=h),
        "413 chunked": c.post("/noise?t=1", content=iter([b"\x00" * 40_000] * 2),
                              headers={**h, "content-type": "image/png"}),
    }
    with c.stream("POST", "/generate/stream", json=FAST, headers=h) as r:
        r.read()
        responses["sse"] = r
    expected_status = {"healthz": 200, "metrics": 200, "web page": 200, "generate": 200, "sse": 200, "404": 404,
                       "404 example": 404, "405": 405, "413 content-length": 413, "413 chunked": 413}
    for name, r in responses.items():
        assert r.status_code == expected_status.get(name, 422), (name, r.status_code, r.text[:200])
        assert r.headers.get_list("x-request-id") == [GIVEN], name
        if r.status_code >= 400:
            body = r.json()
            assert isinstance(body["detail"], str) and body["request_id"] == GIVEN, (name, body)
    assert "errors" in responses["422"].json()  # the existing keys stay


@pytest.mark.parametrize(
    "value",
    [b"x" * 129, b"has space", b"tab\there", "caf\u00e9".encode(), "\u6f22\u5b57".encode(), b""],
    ids=["too-long", "space", "tab", "latin", "cjk", "empty"],
)
def test_invalid_id_is_replaced(server_json: Server, value: bytes) -> None:
    r = server_json.client.post("/generate", json={"num_images": 0}, headers={"X-Request-ID": value})
    assert r.status_code == 422  # replaced silently, not refused
    rid = r.headers["x-request-id"]
    assert GENERATED.fullmatch(rid) and rid.encode() != value
    assert r.json()["request_id"] == rid


def test_longest_valid_id_is_kept(server_json: Server) -> None:
    rid = "~" * 128
    assert server_json.client.get("/healthz", headers={"X-Request-ID": rid}).headers["x-request-id"] == rid


def test_fresh_id_per_request(server_json: Server) -> None:
    first = server_json.client.get("/healthz").headers["x-request-id"]
    second = server_json.client.post("/generate", json={"steps": 0})
    assert GENERATED.fullmatch(first) and GENERATED.fullmatch(second.headers["x-request-id"])
    assert first != second.headers["x-request-id"] == second.json()["request_id"]


def test_json_logs(server_json: Server) -> None:
    c = server_json.client
    secret, marker = "Bearer sk-not-to-be-logged", "body-marker-not-to-be-logged"
    body = {**FAST, "num_images": 2, "format": "json"}
    r = c.post("/generate", json=body, headers={"X-Request-ID": "log-gen", "Authorization": secret})
    assert r.status_code == 200
    with c.stream("POST", "/generate/stream", json={**FAST, "sampler": "dpmpp_2m"},
                  headers={"X-Request-ID": "log-sse"}) as r:
        r.read()
    r = c.post("/denoise-step", json={"x_t": marker, "t": 1}, headers={"X-Request-ID": "log-422"})
    assert r.status_code == 422
    assert c.get(f"/nope?key={marker}", headers={"X-Request-ID": "log-404"}).status_code == 404

    gen = access_line(server_json, "log-gen")
    assert gen["route"] == "/generate" and gen["method"] == "POST" and gen["status"] == 200
    assert gen["sampler"] == "ddim" and gen["images"] == 2
    assert isinstance(gen["duration"], float) and 0 < gen["duration"] < 60
    sse = access_line(server_json, "log-sse")
    assert (sse["route"], sse["status"], sse["sampler"], sse["images"]) == ("/generate/stream", 200, "dpmpp_2m", 1)
    bad = access_line(server_json, "log-422")
    assert (bad["route"], bad["method"], bad["status"]) == ("/denoise-step", "POST", 422)
    assert "sampler" not in bad
    missing = access_line(server_json, "log-404")
    assert missing["status"] == 404 and missing["path"] == "/nope"  # no query string

    lines = records(server_json)  # every line is JSON, else records() fails
    assert lines and all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    assert any(line["logger"].startswith("uvicorn") for line in lines)  # uvicorn's own lines are JSON too
    assert not any(line["logger"] == "uvicorn.access" for line in lines)  # replaced by service.access
    assert all("color_message" not in line for line in lines)
    startup = [line for line in lines if line["logger"] == "service.api"]
    assert startup and all("request_id" not in line for line in startup)  # outside a request: no id
    text = server_json.log()
    assert "sk-not-to-be-logged" not in text and marker not in text


def test_timeout_errors_carry_the_id(model_t1000: Path, tmp_path: Path) -> None:
    """504 as a body and as an SSE ``error`` event both name the request; the access lines say 504 / 200."""
    server = Server(model_t1000, tmp_path, DDPM_REQUEST_TIMEOUT_S="0.3", DDPM_LOG_FORMAT="json", DDPM_LOG_LEVEL="info")
    try:
        body = {"sampler": "ddpm", "steps": 1000, "num_images": 4}
        r = server.client.post("/generate", json=body, headers={"X-Request-ID": "slow-1"})
        assert r.status_code == 504 and r.json()["request_id"] == "slow-1" == r.headers["x-request-id"]
        with server.client.stream("POST", "/generate/stream", json=body, headers={"X-Request-ID": "slow-2"}) as r:
            assert r.headers["x-request-id"] == "slow-2"
            last = r.read().decode().strip().split("\n\n")[-1].splitlines()
        assert last[0] == "event: error"
        error = json.loads(last[1].removeprefix("data: "))
        assert error.keys() == {"status", "detail", "request_id"}
        assert (error["status"], error["request_id"]) == (504, "slow-2")
        assert access_line(server, "slow-1")["status"] == 504
        assert access_line(server, "slow-2")["status"] == 200  # the stream had started
    finally:
        assert server.stop() == 0, server.log()
    records(server)  # still JSON through shutdown


def test_text_format_shows_the_id() -> None:
    stream = io.StringIO()
    logger = logging.getLogger("tests.request_ids")
    handler = log_handler("text", stream)
    logger.addHandler(handler)
    try:
        logger.warning("outside")
        token = request_id_var.set("abc123")
        try:
            logger.warning("inside")
        finally:
            request_id_var.reset(token)
    finally:
        logger.removeHandler(handler)
    outside, inside = stream.getvalue().splitlines()
    assert outside.endswith("WARNING tests.request_ids [-] outside")
    assert inside.endswith("WARNING tests.request_ids [abc123] inside")


def test_unhandled_error_is_a_json_500_with_the_id() -> None:
    """In process (no route of the real server raises on purpose): a JSON 500 naming the request, one ERROR line
    with the traceback and the id, and the access line."""

    async def boom(_: object) -> None:
        raise RuntimeError("kaboom")

    async def broken_stream(_: object) -> StreamingResponse:
        async def chunks():
            yield b"partial"
            raise RuntimeError("mid-stream")

        return StreamingResponse(chunks())

    routes = [Route("/boom", boom), Route("/stream", broken_stream)]
    app = Starlette(routes=routes, middleware=[Middleware(RequestIdMiddleware)])  # as in create_app
    stream = io.StringIO()
    logger = logging.getLogger("service")
    handler, level = log_handler("json", stream), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with TestClient(app) as client:
            r = client.get("/boom", headers={"X-Request-ID": "b-1"})
            assert (r.status_code, r.headers["x-request-id"]) == (500, "b-1")
            assert r.json() == {"detail": "internal server error", "request_id": "b-1"}
            r = client.get("/stream", headers={"X-Request-ID": "b-2"})
            assert (r.status_code, r.headers["x-request-id"], r.content) == (200, "b-2", b"partial")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    errors = [line for line in lines if line["level"] == "ERROR"]
    assert [e["request_id"] for e in errors] == ["b-1", "b-2"]
    assert "kaboom" in errors[0]["exc_info"] and "mid-stream" in errors[1]["exc_info"]
    access = {line["request_id"]: line for line in lines if line["logger"] == "service.access"}
    assert (access["b-1"]["status"], access["b-2"]["status"]) == (500, 500)  # the stream broke off
