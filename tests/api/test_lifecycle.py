"""Overload (429), client disconnects (evicted rows), deadlines (504) and SIGTERM draining, each on its own
real server process."""

from __future__ import annotations

import asyncio
import io
import json
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.api.conftest import SIZE, Server

pytestmark = pytest.mark.slow


def wait_until(predicate, timeout: float = 15.0, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError("condition not reached")


def raw_post(server: Server, path: str, body: dict) -> socket.socket:
    """Send a POST on a plain socket (so the test controls exactly when the client goes away)."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    ).encode()
    sock.sendall(head + data)
    return sock


def test_readyz_503_until_warm(model_t1000: Path, tmp_path: Path) -> None:
    """While the engine warms up (a forward at max_batch_rows), /healthz is 200 and /readyz and /generate 503."""
    server = Server(model_t1000, tmp_path, wait=False, DDPM_MAX_BATCH_ROWS="2048", DDPM_MAX_QUEUE_ROWS="2048")
    seen: list[tuple[int, int, int]] = []

    def probe() -> bool:
        try:
            ready = server.client.get("/readyz")
            gen = server.client.post("/generate", json={"sampler": "ddim", "steps": 2})
            seen.append((server.client.get("/healthz").status_code, ready.status_code, gen.status_code))
        except httpx.TransportError:  # not listening yet (the checkpoint loads before the socket opens)
            return False
        if gen.status_code == 503:
            assert ready.json()["status"] == "not ready" and gen.headers["retry-after"]
        return ready.status_code == 200

    try:
        wait_until(probe, timeout=60, interval=0.01)
        assert (200, 503, 503) in seen, seen
        assert seen[-1] == (200, 200, 200)
    finally:
        assert server.stop() == 0, server.log()


def test_sigterm_while_warming_up_exits_cleanly(model_t1000: Path, tmp_path: Path) -> None:
    """SIGTERM during the warm-up forward: the server waits for it to end and exits 0 (no abort mid torch op)."""
    server = Server(model_t1000, tmp_path, wait=False, DDPM_MAX_BATCH_ROWS="4096", DDPM_MAX_QUEUE_ROWS="4096")

    def warming() -> bool:
        try:
            return server.client.get("/readyz").status_code == 503
        except httpx.TransportError:
            return False

    wait_until(warming, timeout=60, interval=0.01)
    server.proc.send_signal(signal.SIGTERM)
    assert server.stop() == 0, server.log()


def test_overload_gets_only_200_and_429(model_t1000: Path, tmp_path: Path) -> None:
    """A burst of 10× the queue capacity: 200s and 429s (with Retry-After) only, bounded RSS, normal service after."""
    capacity = 8
    server = Server(model_t1000, tmp_path, DDPM_MAX_BATCH_ROWS="4", DDPM_MAX_QUEUE_ROWS=str(capacity),
                    DDPM_MAX_ROWS_PER_CLIENT=str(capacity))  # one client: the queue's bound, not the fair share
    try:
        body = {"sampler": "ddim", "steps": 20, "num_images": 1, "format": "png"}

        async def burst() -> list[httpx.Response]:
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
            async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
                return await asyncio.gather(*(client.post("/generate", json=body) for _ in range(10 * capacity)))

        rss_before = server.rss_bytes()
        rss_after = []
        for _ in range(3):
            responses = asyncio.run(burst())
            statuses = [r.status_code for r in responses]
            assert set(statuses) <= {200, 429}, statuses
            assert statuses.count(200) >= capacity and statuses.count(429) >= 1
            for r in responses:
                if r.status_code == 429:
                    assert int(r.headers["retry-after"]) >= 1 and "queue full" in r.json()["detail"]
                else:
                    assert r.headers["content-type"] == "image/png"
            assert server.proc.poll() is None
            rss_after.append(server.rss_bytes())
        assert rss_after[-1] < rss_before + 150 * 2**20, (rss_before, rss_after)
        assert rss_after[-1] < rss_after[0] + 30 * 2**20, rss_after  # no growth from burst to burst
        assert server.metric("ddpm_requests_total", outcome="rejected") >= 3
        r = server.client.post("/generate", json={**body, "format": "npy", "num_images": 4})
        assert r.status_code == 200 and np.load(io.BytesIO(r.content)).shape == (4, 1, SIZE, SIZE)
        assert server.metric("ddpm_queue_depth_rows") == 0 and server.metric("ddpm_active_rows") == 0
    finally:
        assert server.stop() == 0, server.log()


def test_disconnected_clients_are_evicted(model_t1000: Path, tmp_path: Path) -> None:
    """20 clients (10 plain, 10 SSE) drop mid-generation: their requests are cancelled and their rows evicted."""
    server = Server(model_t1000, tmp_path)
    try:
        body = {"sampler": "ddpm", "steps": 1000, "num_images": 1}  # seconds of work each
        ok_before = server.metric("ddpm_requests_total", outcome="ok")
        socks = [raw_post(server, "/generate", body) for _ in range(10)]
        streams = [raw_post(server, "/generate/stream", body) for _ in range(10)]
        for s in streams:  # a stream is mid-generation once it has seen a progress event
            buf = b""
            while b"event: progress" not in buf:
                buf += s.recv(4096)
        wait_until(lambda: server.metric("ddpm_active_rows") == 20)
        for s in socks + streams:
            s.close()
        wait_until(lambda: server.metric("ddpm_requests_total", outcome="cancelled") == 20)
        assert server.metric("ddpm_rows_evicted_total", reason="cancelled") == 20
        wait_until(lambda: server.metric("ddpm_active_rows") == 0, timeout=5)
        assert server.metric("ddpm_requests_total", outcome="ok") == ok_before  # none ran to completion
        assert server.metric("ddpm_http_requests_total", route="/generate", method="POST", status="499") == 10
        r = server.client.post("/generate", json={"sampler": "ddim", "steps": 5})
        assert r.status_code == 200
    finally:
        assert server.stop() == 0, server.log()


def test_deadline_gives_504(model_t1000: Path, tmp_path: Path) -> None:
    server = Server(model_t1000, tmp_path, DDPM_REQUEST_TIMEOUT_S="0.3")
    try:
        body = {"sampler": "ddpm", "steps": 1000, "num_images": 4}
        r = server.client.post("/generate", json=body)
        assert r.status_code == 504 and "deadline" in r.json()["detail"]
        with server.client.stream("POST", "/generate/stream", json=body) as r:
            assert r.status_code == 200  # the stream had started; the failure is an event
            text = r.read().decode()
        last = text.strip().split("\n\n")[-1].splitlines()
        assert last[0] == "event: error" and json.loads(last[1].removeprefix("data: "))["status"] == 504
        assert server.metric("ddpm_requests_total", outcome="timeout") == 2
    finally:
        assert server.stop() == 0, server.log()


def test_sigterm_drains_in_flight_requests(model_t1000: Path, tmp_path: Path) -> None:
    """SIGTERM: /readyz turns 503 at once, new work gets 503, in-flight requests finish, exit code 0."""
    server = Server(model_t1000, tmp_path)
    results: list[httpx.Response] = []

    def request() -> None:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            body = {"sampler": "ddpm", "steps": 500, "num_images": 4, "format": "npy"}
            results.append(c.post("/generate", json=body))

    threads = [threading.Thread(target=request) for _ in range(4)]
    for th in threads:
        th.start()
    wait_until(lambda: server.metric("ddpm_active_rows") == 16)
    server.proc.send_signal(signal.SIGTERM)
    with httpx.Client(base_url=server.url, timeout=5) as c:
        wait_until(lambda: c.get("/readyz").status_code == 503, timeout=5)
        assert c.get("/readyz").json()["status"] == "draining"
        assert c.get("/healthz").status_code == 200
        late = c.post("/generate", json={"sampler": "ddim", "steps": 2})
        assert late.status_code == 503 and late.headers["retry-after"]
    for th in threads:
        th.join(60)
    assert [r.status_code for r in results] == [200] * 4
    assert all(np.load(io.BytesIO(r.content)).shape == (4, 1, SIZE, SIZE) for r in results)
    assert server.proc.wait(30) == 0, server.log()
    server.stop()


def test_corrupt_weights_fail_startup(tmp_path: Path) -> None:
    """The lifespan verifies the checkpoint's sha256: modified weights stop the process before it serves."""
    from tests.api.conftest import make_model

    folder = make_model(tmp_path / "bad", timesteps=10, examples=False)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match="sha256 mismatch"):
        Server(folder, tmp_path)


def test_queued_stream_gets_keep_alive_comments(model_t1000: Path, tmp_path: Path) -> None:
    """A stream waiting behind a full batch sends ': keep-alive' comments until its first progress event."""
    server = Server(model_t1000, tmp_path, DDPM_MAX_BATCH_ROWS="1", DDPM_SSE_KEEP_ALIVE_S="0.2")
    try:
        ahead = threading.Thread(target=server.client.post, args=("/generate",),
                                 kwargs={"json": {"sampler": "ddpm", "steps": 300, "seed": 1}})
        ahead.start()
        wait_until(lambda: server.metric("ddpm_active_rows", model="tiny-T1000") == 1)
        with server.client.stream("POST", "/generate/stream", json={"sampler": "ddim", "steps": 2}) as r:
            lines = [line for line in r.iter_lines() if line]
        ahead.join()
        first_progress = lines.index("event: progress")
        assert ": keep-alive" in lines[:first_progress], lines[:5]
        assert lines.count("event: result") == 1
    finally:
        assert server.stop() == 0, server.log()
