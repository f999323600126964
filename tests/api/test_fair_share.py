"""Fair share through a real server: one client past its share gets 429 client_quota while another is admitted,
and the other client's request runs at once, beside the flood that filled the batch before it came."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import Server

FLOOD = {"num_images": 1, "sampler": "ddpm", "steps": 120, "format": "json"}


@pytest.mark.slow
def test_flooding_client_gets_quota_429_while_another_client_is_served_first(
    model_t1000: Path, tmp_path: Path
) -> None:
    srv = Server(model_t1000, tmp_path, DDPM_API_KEYS="key-a,key-b", DDPM_MAX_BATCH_ROWS="2",
                 DDPM_MAX_QUEUE_ROWS="32", DDPM_MAX_ROWS_PER_CLIENT="8", DDPM_MAX_IMAGES_PER_REQUEST="2")
    done: list[str] = []
    statuses: dict[str, int] = {}

    def post(name: str, key: str, body: dict) -> None:
        with httpx.Client(base_url=srv.url, timeout=120, headers={"Authorization": f"Bearer {key}"}) as c:
            statuses[name] = c.post("/generate", json=body).status_code
            done.append(name)

    a = {"Authorization": "Bearer key-a"}
    try:
        flood = [threading.Thread(target=post, args=(f"a{i}", "key-a", FLOOD)) for i in range(8)]
        for t in flood:
            t.start()
        deadline = time.monotonic() + 30
        while srv.metric("ddpm_queue_depth_rows") + srv.metric("ddpm_active_rows") < 8:
            assert time.monotonic() < deadline, srv.log()
            time.sleep(0.05)

        over = srv.client.post("/generate", json=FLOOD, headers=a)  # a's 9th row
        assert over.status_code == 429, over.text
        assert "client quota" in over.json()["detail"] and int(over.headers["retry-after"]) >= 1

        small = threading.Thread(target=post, args=("b", "key-b", {**FLOOD, "sampler": "ddim", "steps": 20}))
        small.start()
        small.join(120)
        for t in flood:
            t.join(120)
        assert srv.client.post("/generate", json=FLOOD).status_code == 401  # no key
        rejected = {r: srv.metric("ddpm_rejected_requests_total", reason=r)
                    for r in ("client_quota", "queue_full", "unauthorized")}
    finally:
        assert srv.stop() == 0, srv.log()
    assert statuses == {**{f"a{i}": 200 for i in range(8)}, "b": 200}
    # Two of a's requests were running and six queued when b arrived: b runs at once on its share of the batch
    # and finishes first; FIFO would finish it last.
    assert done[0] == "b", done
    assert rejected == {"client_quota": 1.0, "queue_full": 0.0, "unauthorized": 1.0}
