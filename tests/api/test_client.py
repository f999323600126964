"""``service.client`` against a real ``python -m service serve`` (sync, async, stream, noise, denoise-step, errors,
API keys, a real 429), and its retry policy against an ``httpx.MockTransport`` (attempts and waits counted)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import get_args

import httpx
import numpy as np
import pytest
from PIL import Image

from service.client import (
    AsyncClient,
    Client,
    GenerationResult,
    ProgressEvent,
    Retry,
    Sampler,
    ServiceError,
    Spacing,
)
from service.diffusion.samplers import SAMPLER_NAMES, SPACINGS
from tests.api.conftest import SIZE, Server
from tests.conftest import REPO

FAST = {"sampler": "ddim", "steps": 3}
KEY = "client-test-key-5c1e"


def test_import_pulls_neither_torch_nor_numpy() -> None:
    code = "import sys, service.client; print(sorted({'torch', 'numpy'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_literals_match_the_server() -> None:
    assert get_args(Sampler) == SAMPLER_NAMES
    assert get_args(Spacing) == SPACINGS


# ------------------------------------------------------------------------------------------------ real server
def test_generate(server: Server) -> None:
    with Client(server.url) as client:
        result = client.generate(3, seed=11, **FAST)
        again = client.generate(3, seed=11, **FAST)
        other = client.generate(3, seed=12, **FAST)
    assert (result.seed, result.sampler, result.steps, result.shape) == (11, "ddim", 3, [3, 1, SIZE, SIZE])
    assert result.timestep_spacing and result.total_seconds >= result.queue_seconds >= 0 and result.request_id
    assert [(img.mode, img.size) for img in result.images] == [("L", (SIZE, SIZE))] * 3
    x = result.numpy()
    assert x.dtype == np.float32 and x.shape == (3, 1, SIZE, SIZE) and -1 <= x.min() <= x.max() <= 1
    np.testing.assert_array_equal(x, again.numpy())  # same seed, same pixels
    assert not np.array_equal(x, other.numpy())


def test_generate_array_is_exact_and_matches_the_pngs(server: Server) -> None:
    with Client(server.url) as client:
        exact = client.generate_array(2, seed=5, **FAST)
        pngs = client.generate(2, seed=5, **FAST)
    assert exact.seed == 5 and exact.array.dtype == np.float32 and exact.array.shape == (2, 1, SIZE, SIZE)
    pixels = np.round((exact.array.clip(-1, 1) + 1) * 127.5).astype(np.uint8)  # the server's PNG rounding
    np.testing.assert_array_equal(pixels[:, 0], np.stack([np.asarray(img) for img in pngs.images]))
    assert np.abs(pngs.numpy() - exact.array.clip(-1, 1)).max() <= 1 / 255 + 1e-6


def test_async_generate_matches_sync(server: Server) -> None:
    async def main() -> tuple[GenerationResult, GenerationResult]:
        async with AsyncClient(server.url) as client:
            assert await client.ready() and await client.health()
            a, b = await asyncio.gather(client.generate(2, seed=3, **FAST), client.generate(2, seed=3, **FAST))
            return a, b

    a, b = asyncio.run(main())
    with Client(server.url) as client:
        sync = client.generate(2, seed=3, **FAST)
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_array_equal(a.numpy(), sync.numpy())


def _check_stream(events: list, steps: int) -> GenerationResult:
    *progress, result = events
    assert all(isinstance(e, ProgressEvent) for e in progress) and isinstance(result, GenerationResult)
    assert [e.step for e in progress] == list(range(1, steps + 1)) and {e.total for e in progress} == {steps}
    assert any(isinstance(e.preview, Image.Image) for e in progress)
    return result


def test_stream_sync_and_async(server: Server) -> None:
    with Client(server.url) as client:
        result = _check_stream(list(client.stream(2, seed=9, sampler="ddim", steps=5)), 5)
        plain = client.generate(2, seed=9, sampler="ddim", steps=5)
    np.testing.assert_array_equal(result.numpy(), plain.numpy())

    async def main() -> list:
        async with AsyncClient(server.url) as client:
            return [e async for e in client.stream(2, seed=9, sampler="ddim", steps=5)]

    np.testing.assert_array_equal(_check_stream(asyncio.run(main()), 5).numpy(), plain.numpy())


def test_leaving_a_stream_cancels_the_request(server: Server) -> None:
    before = server.metric("ddpm_requests_total", outcome="cancelled")
    with Client(server.url) as client:
        for event in client.stream(sampler="ddpm", steps=1000):
            assert isinstance(event, ProgressEvent)
            break
    deadline = time.monotonic() + 15
    while server.metric("ddpm_requests_total", outcome="cancelled") == before:
        assert time.monotonic() < deadline, "the request was not cancelled"
        time.sleep(0.05)


def test_noise(server: Server) -> None:
    with Client(server.url) as client:
        examples = client.model().examples
        one = client.noise(300, image=examples[0], seed=1, include=("x0", "noise"))
        strip = client.noise([0, 500, 999], seed=1)
        upload = client.noise(10, upload=Image.new("L", (SIZE, SIZE), 200), seed=2, scale=2)
    assert (one.image, one.seed, one.ts) == (examples[0], 1, [300])
    assert one.x_t.shape == (1, 1, SIZE, SIZE) and one.x0 is not None and one.noise is not None
    abar = one.alpha_bar[0]
    np.testing.assert_allclose(one.x_t[0], np.sqrt(abar) * one.x0 + np.sqrt(1 - abar) * one.noise, atol=1e-5)
    assert strip.ts == [0, 500, 999] and strip.x_t.shape == (3, 1, SIZE, SIZE) and len(strip.images) == 3
    assert strip.x0 is None and strip.noise is None
    assert upload.image == "upload" and upload.images[0].size == (2 * SIZE, 2 * SIZE)


def test_denoise_step(server: Server) -> None:
    x = np.random.default_rng(0).standard_normal((1, SIZE, SIZE)).astype(np.float32)
    with Client(server.url) as client:
        step = client.denoise_step(x, 500, seed=7)
        again = client.denoise_step(x[None], 500, seed=7)
        from_png = client.denoise_step(Image.new("L", (SIZE, SIZE), 128), 0)
    assert (step.t, step.seed) == (500, 7) and step.x_prev.shape == (1, SIZE, SIZE)
    np.testing.assert_allclose(step.x_prev, step.posterior_mean + np.sqrt(step.sigma_squared) * step.noise, atol=1e-5)
    np.testing.assert_array_equal(step.x_prev, again.x_prev)  # the seed fixes z
    assert step.x0_pred_image.size == (SIZE, SIZE) and step.alpha_bar_t > 0
    assert from_png.sigma_squared == 0 and not from_png.noise.any()  # t = 0 adds no noise


def test_model_health_ready(server: Server) -> None:
    with Client(server.url) as client:
        info = client.model()
        assert client.health() and client.ready()
        assert client.models() == [info] and client.model(info.name) == info
    assert info.ready and info.name == "tiny-T1000"
    assert info.image_shape == [1, SIZE, SIZE] and info.num_train_timesteps == 1000
    assert tuple(info.samplers) == SAMPLER_NAMES and info.default_steps["ddim"] == 50
    assert info.default_sampler == "dpmpp_2m_sde"


def test_errors_carry_status_detail_and_request_id(server: Server) -> None:
    with Client(server.url) as client:
        with pytest.raises(ServiceError) as bad:
            client.generate(steps=0, request_id="client-test-422")
        with pytest.raises(ServiceError) as too_many:
            client.generate(sampler="unipc", steps=1000)
        with pytest.raises(ServiceError) as bad_stream:
            next(client.stream(sampler="ddim", timestep_spacing="karras", request_id="client-test-stream"))
        with pytest.raises(ServiceError) as unknown:
            client.noise(10, image="no-such-image")
        with pytest.raises(ServiceError) as bad_t:
            client.denoise_step(np.zeros((1, SIZE, SIZE), np.float32), 1000)
    assert (bad.value.status, bad.value.request_id) == (422, "client-test-422")
    assert "steps" in bad.value.detail and bad.value.errors and bad.value.errors[0]["loc"][-1] == "steps"
    assert too_many.value.status == 422 and "unipc" in too_many.value.detail and too_many.value.request_id
    assert (bad_stream.value.status, bad_stream.value.request_id) == (422, "client-test-stream")
    assert "timestep_spacing" in bad_stream.value.detail
    assert unknown.value.status == 404 and "no-such-image" in unknown.value.detail
    assert bad_t.value.status == 422 and "0..999" in bad_t.value.detail and "422" in str(bad_t.value)


@pytest.fixture(scope="module")
def guarded(model_t1000: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """API keys on, and room for one row only (queued + running): a second request gets 429."""
    srv = Server(
        model_t1000,
        tmp_path_factory.mktemp("client-guarded"),
        DDPM_API_KEYS=KEY,
        DDPM_MAX_QUEUE_ROWS="1",
        DDPM_MAX_BATCH_ROWS="1",
    )
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.mark.slow
def test_api_key(guarded: Server) -> None:
    with Client(guarded.url) as anonymous, Client(guarded.url, api_key="wrong") as wrong:
        assert anonymous.health() and anonymous.ready()  # open routes
        for client in (anonymous, wrong):
            with pytest.raises(ServiceError) as denied:
                client.generate(**FAST)
            assert denied.value.status == 401 and denied.value.request_id
    with Client(guarded.url, api_key=KEY) as client:
        assert client.model().name and len(client.generate(seed=1, **FAST).images) == 1


@pytest.mark.slow
def test_real_429_is_retried(guarded: Server) -> None:
    """While one long request holds the only row, a no-retry client gets 429 and a retrying one waits and succeeds."""

    def hold_the_row() -> None:
        with Client(guarded.url, api_key=KEY) as client:
            client.generate(sampler="ddpm", steps=400)

    busy = threading.Thread(target=hold_the_row)
    busy.start()
    try:
        deadline = time.monotonic() + 30
        while guarded.metric("ddpm_active_rows") < 1:
            assert time.monotonic() < deadline and busy.is_alive()
            time.sleep(0.02)
        with Client(guarded.url, api_key=KEY, retry=Retry(attempts=1)) as once, pytest.raises(ServiceError) as full:
            once.generate(**FAST)
        assert full.value.status == 429 and full.value.retry_after and full.value.retry_after >= 1
        waits: list[float] = []

        def sleep(seconds: float) -> None:
            waits.append(seconds)
            time.sleep(seconds)

        with Client(guarded.url, api_key=KEY, retry=Retry(attempts=10, max_wait=30), sleep=sleep) as patient:
            assert len(patient.generate(seed=2, **FAST).images) == 1
        assert waits and all(w >= 1 for w in waits)
    finally:
        busy.join(60)


# ------------------------------------------------------------------------------------------------ retries (mocked)
def _png_b64() -> str:
    buf = io.BytesIO()
    Image.new("L", (4, 4), 255).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


RESULT = {
    "seed": 1,
    "sampler": "ddim",
    "steps": 3,
    "eta": 0.0,
    "timestep_spacing": "leading",
    "images": [_png_b64()],
    "shape": [1, 1, 4, 4],
    "queue_seconds": 0.0,
    "total_seconds": 0.1,
}


def _error(status: int, retry_after: str | None = None) -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    return httpx.Response(status, json={"detail": f"status {status}", "request_id": "mock-rid"}, headers=headers)


class Script:
    """A MockTransport handler that answers with the given responses in turn and records the requests."""

    def __init__(self, *responses: httpx.Response | Callable[[], httpx.Response]) -> None:
        self.responses = list(responses)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        response = self.responses[min(len(self.requests), len(self.responses)) - 1]
        return response() if callable(response) else response


def _mock_client(script: Script, waits: list[float], **kwargs) -> Client:
    return Client("http://mock", transport=httpx.MockTransport(script), sleep=waits.append, **kwargs)


def test_retries_honour_retry_after() -> None:
    script = Script(_error(429, "2"), _error(503, "3"), httpx.Response(200, json=RESULT))
    waits: list[float] = []
    with _mock_client(script, waits, api_key="k", retry=Retry(attempts=3)) as client:
        result = client.generate(seed=1, request_id="mine")
    assert result.seed == 1 and len(script.requests) == 3 and waits == [2.0, 3.0]
    for request in script.requests:  # the same request each time
        assert request.headers["authorization"] == "Bearer k" and request.headers["x-request-id"] == "mine"
        assert json.loads(request.content) == {"num_images": 1, "seed": 1, "format": "json"}


def test_retries_give_up_after_max_attempts() -> None:
    script = Script(_error(503, "1"))
    waits: list[float] = []
    with _mock_client(script, waits, retry=Retry(attempts=3)) as client, pytest.raises(ServiceError) as exc:
        client.model()
    assert len(script.requests) == 3 and waits == [1.0, 1.0]
    assert (exc.value.status, exc.value.detail, exc.value.request_id, exc.value.retry_after) == (
        503,
        "status 503",
        "mock-rid",
        1.0,
    )


@pytest.mark.parametrize("status", [400, 401, 404, 422, 500, 504])
def test_other_statuses_are_not_retried(status: int) -> None:
    script = Script(_error(status, "1"))
    waits: list[float] = []
    with _mock_client(script, waits) as client, pytest.raises(ServiceError) as exc:
        client.generate()
    assert exc.value.status == status and len(script.requests) == 1 and waits == []


def test_retry_after_beyond_max_wait_is_not_waited() -> None:
    script = Script(_error(429, "120"), httpx.Response(200, json=RESULT))
    waits: list[float] = []
    with _mock_client(script, waits, retry=Retry(max_wait=30)) as client, pytest.raises(ServiceError) as exc:
        client.generate()
    assert exc.value.status == 429 and exc.value.retry_after == 120 and len(script.requests) == 1 and waits == []


def test_without_retry_after_backoff_doubles() -> None:
    script = Script(_error(503), _error(503), _error(503), httpx.Response(200, json=RESULT))
    waits: list[float] = []
    with _mock_client(script, waits, retry=Retry(backoff=0.5)) as client:
        client.generate()
    assert waits == [0.5, 1.0, 2.0]


def test_retry_after_as_http_date() -> None:
    soon = format_datetime(datetime.now(UTC) + timedelta(seconds=20), usegmt=True)
    script = Script(_error(429, soon), _error(429, "Wed, 21 Oct 2015 07:28:00 GMT"), httpx.Response(200, json=RESULT))
    waits: list[float] = []
    with _mock_client(script, waits) as client:
        client.generate()
    assert len(waits) == 2 and 15 < waits[0] <= 20 and waits[1] == 0.0  # a date in the past: retry at once


def test_ready_and_health_are_never_retried() -> None:
    script = Script(httpx.Response(503, json={"status": "not ready"}, headers={"Retry-After": "1"}))
    waits: list[float] = []
    with _mock_client(script, waits) as client:
        assert client.ready() is False and client.health() is False
    assert len(script.requests) == 2 and waits == []


def _sse(*events: tuple[str, dict] | str) -> httpx.Response:
    """An SSE body of (event, data) pairs and raw text."""
    text = "".join(e if isinstance(e, str) else f"event: {e[0]}\ndata: {json.dumps(e[1])}\n\n" for e in events)
    return httpx.Response(
        200, content=text.encode(), headers={"content-type": "text/event-stream", "x-request-id": "sse-rid"}
    )


def test_async_retries_and_stream_events() -> None:
    progress = ("progress", {"step": 1, "total": 3, "preview": None})
    script = Script(
        _error(429, "4"),
        lambda: _sse(progress, ": keep-alive\n\n", ("new-kind", {}), ("result", RESULT)),
        lambda: _sse(progress, ("error", {"status": 504, "detail": "deadline", "request_id": "r"})),
        lambda: _sse(progress),
    )
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    async def main() -> tuple[list, ServiceError, ServiceError]:
        async with AsyncClient("http://mock", transport=httpx.MockTransport(script), sleep=sleep) as client:
            events = [e async for e in client.stream(seed=1)]
            with pytest.raises(ServiceError) as failed:
                _ = [e async for e in client.stream()]
            with pytest.raises(ServiceError) as cut:
                _ = [e async for e in client.stream()]
            return events, failed.value, cut.value

    events, failed, cut = asyncio.run(main())
    assert waits == [4.0] and len(script.requests) == 4
    assert events[0] == ProgressEvent(1, 3) and isinstance(events[1], GenerationResult) and len(events) == 2
    assert events[1].request_id == "sse-rid" and events[1].images[0].size == (4, 4)
    assert (failed.status, failed.detail, failed.request_id) == (504, "deadline", "r")
    assert "without a result" in cut.detail and cut.request_id == "sse-rid"
