"""Fixtures for the browser tests: one real server with a tiny model, one headless Chromium."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.web.cdp import Browser, Page, find_chromium
from tests.web.server import make_tiny_model, running_server

# Rows the queue admits in total: small, so that test_queue_full_shows_429 can fill it.
QUEUE_ROWS = 4


@pytest.fixture(scope="session")
def web_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("web-model") / "tiny")


@pytest.fixture(scope="session")
def web_server(web_model_dir: Path) -> Iterator[str]:
    """Base URL of ``python -m service serve`` on the tiny model (4 queued/running rows at most)."""
    with running_server(
        web_model_dir, max_queue_rows=QUEUE_ROWS, max_batch_rows=QUEUE_ROWS, max_images_per_request=QUEUE_ROWS
    ) as url:
        yield url


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    path = find_chromium()
    if path is None:
        pytest.skip("Chromium not found (install Debian's `chromium` package; .ci/run does)")
    with Browser(path) as b:
        yield b


@pytest.fixture
def page(browser: Browser, web_server: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Page]:
    """The web page, loaded and wired up; a screenshot is kept in tmp_path when the test fails."""
    p = browser.new_page()
    viewport = {"width": 1200, "height": 1600, "deviceScaleFactor": 1, "mobile": False}
    p.send("Emulation.setDeviceMetricsOverride", viewport)
    p.goto(f"{web_server}/", ready="document.body && document.body.dataset.ready === 'true'")
    yield p
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        p.screenshot(tmp_path / "failure.png")
    browser.send("Target.closeTarget", {"targetId": p.target_id})


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    rep = yield
    if rep.when == "call":
        item.rep_call = rep  # type: ignore[attr-defined]
    return rep


WEB_API_KEY = "web-test-key-0123456789"


@pytest.fixture(scope="session")
def web_auth_server(web_model_dir: Path) -> Iterator[str]:
    """Base URL of a server that needs ``Authorization: Bearer WEB_API_KEY`` (DDPM_API_KEYS)."""
    with running_server(web_model_dir, api_keys=WEB_API_KEY) as url:
        yield url
