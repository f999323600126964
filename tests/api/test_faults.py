"""Engine faults through a real server: a failed forward is a 500 (SSE: an error event) naming the request id and
the server goes on; a dead worker fails everything in flight at once, turns the probes 503 and exits non-zero."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import Server

GEN = {"num_images": 2, "sampler": "ddim", "steps": 5, "format": "json"}


def _fault_server(model: Path, tmp: Path, flag: Path, **env: str) -> Server:
    argv = [sys.executable, "-m", "tests.api.fault_server", "--fault-file", str(flag)]
    return Server(model, tmp, argv=argv, **env)


def _sse_events(response: httpx.Response) -> list[tuple[str, dict]]:
    events, name = [], None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[len("data: "):])))
    return events


@pytest.mark.slow
def test_failed_forward_is_a_500_naming_the_request_and_later_requests_succeed(
    model_t1000: Path, tmp_path: Path
) -> None:
    flag = tmp_path / "fault"
    srv = _fault_server(model_t1000, tmp_path, flag, DDPM_LOG_LEVEL="info")
    try:
        flag.write_text("raise")
        r = srv.client.post("/generate", json=GEN, headers={"X-Request-ID": "fault-raise-1"})
        assert r.status_code == 500, r.text
        assert r.json()["request_id"] == "fault-raise-1" and "fault-raise-1" in r.json()["detail"]
        assert "injected forward failure" in r.json()["detail"]

        with srv.client.stream("POST", "/generate/stream", json=GEN, headers={"X-Request-ID": "fault-sse-2"}) as s:
            assert s.status_code == 200
            events = _sse_events(s)
        name, data = events[-1]
        assert name == "error" and data["status"] == 500 and data["request_id"] == "fault-sse-2", events

        flag.write_text("nan")
        r = srv.client.post("/generate", json=GEN, headers={"X-Request-ID": "fault-nan-3"})
        assert r.status_code == 500 and "non-finite" in r.json()["detail"]

        flag.unlink()
        ok = srv.client.post("/generate", json=GEN)
        assert ok.status_code == 200 and len(ok.json()["images"]) == 2
        assert srv.client.get("/readyz").status_code == 200
        assert srv.metric("ddpm_requests_total", outcome="error") == 3
        assert srv.metric("ddpm_requests_total", outcome="ok") == 1
        log = srv.log()
        assert all(rid in log for rid in ("fault-raise-1", "fault-sse-2", "fault-nan-3"))  # one line per request
    finally:
        assert srv.stop() == 0, srv.log()


@pytest.mark.slow
def test_dead_worker_fails_in_flight_requests_at_once_and_the_process_exits_non_zero(
    model_t1000: Path, tmp_path: Path
) -> None:
    flag = tmp_path / "fault"
    srv = _fault_server(model_t1000, tmp_path, flag, DDPM_MAX_BATCH_ROWS="2", DDPM_MAX_IMAGES_PER_REQUEST="2")
    long = {"num_images": 1, "sampler": "ddpm", "steps": 1000, "format": "json"}
    ended: dict[str, tuple[float, int, object]] = {}

    def post(name: str, body: dict) -> None:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            r = c.post("/generate", json=body, headers={"X-Request-ID": name})
            ended[name] = (time.monotonic(), r.status_code, r.json())

    def stream(name: str) -> None:
        with httpx.Client(base_url=srv.url, timeout=60) as c, c.stream(
            "POST", "/generate/stream", json=long, headers={"X-Request-ID": name}
        ) as s:
            events = _sse_events(s)
            ended[name] = (time.monotonic(), events[-1][1].get("status", 200), events[-1])

    try:
        def wait_for(metric: str, value: float) -> None:
            deadline = time.monotonic() + 30
            while srv.metric(metric) < value:
                assert time.monotonic() < deadline, (metric, srv.log())
                time.sleep(0.05)

        threads = [threading.Thread(target=post, args=(f"run-{i}", long)) for i in range(2)]
        for t in threads:
            t.start()
        wait_for("ddpm_active_rows", 2)  # both running: the batch (2 rows) is full
        threads.append(threading.Thread(target=post, args=("queued", {**long, "num_images": 2})))
        threads.append(threading.Thread(target=stream, args=("sse",)))
        for t in threads[2:]:
            t.start()
        wait_for("ddpm_queue_depth_requests", 2)
        assert srv.metric("ddpm_active_rows") == 2
        armed = time.monotonic()
        flag.write_text("die")
        for t in threads:
            t.join(30)
        probes = {path: srv.client.get(path) for path in ("/readyz", "/healthz")}
        code = srv.proc.wait(15)
    finally:
        srv.stop()
    assert set(ended) == {"run-0", "run-1", "queued", "sse"}
    for name, (at, status, body) in ended.items():
        assert status == 503, (name, body)
        # At once, not at the 300 s deadline: ~0.1 s on an idle machine; 2 s leaves room for a loaded one.
        assert at - armed < 2.0, (name, at - armed)
    print(f"in-flight requests failed {max(at for at, _, _ in ended.values()) - armed:.3f} s after the fault")
    assert ended["run-0"][2]["request_id"] == "run-0" and "worker died" in ended["run-0"][2]["detail"]
    for path, r in probes.items():
        assert r.status_code == 503 and r.json()["status"] == "failed", path
    assert code == 1, srv.log()
    assert "engine worker died" in srv.log()
