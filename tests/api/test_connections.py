"""Connection limits of a real server: DDPM_MAX_CONNECTIONS (503 beyond), the keep-alive timeout, and clients
that trickle their headers on many connections without delaying anyone else."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from tests.api.conftest import Server


def _connect(srv: Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", srv.port), timeout=10)


@pytest.mark.slow
def test_connections_beyond_the_limit_get_503_and_idle_keep_alive_connections_are_closed(
    model_t1000: Path, tmp_path: Path
) -> None:
    srv = Server(model_t1000, tmp_path, DDPM_MAX_CONNECTIONS="4", DDPM_KEEP_ALIVE_S="1")
    try:
        idle = [_connect(srv) for _ in range(4)]
        time.sleep(0.2)  # the server has accepted them
        assert srv.client.get("/healthz").status_code == 503  # a fifth connection
        for s in idle:
            s.close()
        time.sleep(0.2)
        assert srv.client.get("/healthz").status_code == 200

        with _connect(srv) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
            response = b""
            while not response.endswith(b'{"status":"ok"}'):
                response += s.recv(65536)
            assert response.startswith(b"HTTP/1.1 200")
            start = time.monotonic()
            assert s.recv(65536) == b""  # the server closed the idle keep-alive connection
            assert time.monotonic() - start < 5
    finally:
        assert srv.stop() == 0, srv.log()


@pytest.mark.slow
def test_trickled_headers_on_many_connections_do_not_delay_other_clients(
    model_t1000: Path, tmp_path: Path
) -> None:
    srv = Server(model_t1000, tmp_path)
    stop = threading.Event()
    header = b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Slow: " + b"a" * 400

    def trickle(s: socket.socket) -> None:  # one byte every 50 ms: 20 s to send the header, never finished here
        for byte in header:
            if stop.wait(0.05):
                return
            s.sendall(bytes([byte]))

    slow: list[socket.socket] = []
    threads: list[threading.Thread] = []
    try:
        body = {"num_images": 1, "sampler": "ddim", "steps": 10, "format": "json"}
        baseline = []
        for _ in range(5):
            start = time.monotonic()
            assert srv.client.post("/generate", json=body).status_code == 200
            baseline.append(time.monotonic() - start)

        slow = [_connect(srv) for _ in range(50)]
        threads = [threading.Thread(target=trickle, args=(s,), daemon=True) for s in slow]
        for t in threads:
            t.start()
        time.sleep(0.5)
        during = []
        for _ in range(5):
            start = time.monotonic()
            assert srv.client.post("/generate", json=body).status_code == 200
            assert srv.client.get("/healthz").status_code == 200
            during.append(time.monotonic() - start)
        assert all(t.is_alive() for t in threads)  # every slow client is still mid-header: served meanwhile
        print(f"median /generate latency alone {sorted(baseline)[2] * 1e3:.1f} ms, "
              f"beside 50 trickling connections {sorted(during)[2] * 1e3:.1f} ms")
    finally:
        stop.set()
        for t in threads:
            t.join()  # before closing: a trickler mid-send on a closed socket raises in its thread
        for s in slow:
            s.close()
        assert srv.stop() == 0, srv.log()
