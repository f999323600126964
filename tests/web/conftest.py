"""Fixtures for the browser tests: real servers with a tiny model, and Playwright driving the system Chromium.

Playwright's own browser builds are never downloaded: it launches Debian's ``/usr/bin/chromium`` (or
``$CHROMIUM``, or a Chromium/Chrome on PATH). Without one the tests are skipped, saying so.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright
from playwright.sync_api import Error as PlaywrightError

from tests.web.server import add_guidance_classifier, make_tiny_model, running_server

# Rows the queue admits in total: small, so that test_queue_full_shows_429 can fill it.
QUEUE_ROWS = 4
WEB_API_KEY = "web-test-key-0123456789"
VIEWPORT = {"width": 1200, "height": 1600}

# A test waits on what the page shows (a stream of steps, a server round trip) on a busy two-core machine.
expect.set_options(timeout=20_000)


def find_chromium() -> str | None:
    """Debian's ``/usr/bin/chromium`` (or ``$CHROMIUM``, or another Chromium/Chrome on PATH)."""
    env = os.environ.get("CHROMIUM")
    if env and Path(env).exists():
        return env
    for name in ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


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
def web_auth_server(web_model_dir: Path) -> Iterator[str]:
    """Base URL of a server that needs ``Authorization: Bearer WEB_API_KEY`` (DDPM_API_KEYS)."""
    with running_server(web_model_dir, api_keys=WEB_API_KEY) as url:
        yield url


@pytest.fixture(scope="session")
def web_two_models_server(web_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of a server with two models (DDPM_MODELS): ``tiny`` (8×8, the default) and ``tiny12`` (12×12)."""
    second = make_tiny_model(tmp_path_factory.mktemp("web-model-12") / "tiny12", size=12, name="tiny12")
    with running_server(web_model_dir, models=f"{web_model_dir},{second}") as url:
        yield url


@pytest.fixture(scope="session")
def web_guided_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model (``guided``, 8×8, T = 1000) whose folder also holds a random-weight guidance classifier
    (recommended scale 3.0)."""
    return add_guidance_classifier(make_tiny_model(tmp_path_factory.mktemp("web-guided") / "guided", name="guided"))


@pytest.fixture(scope="session")
def web_guided_server(web_guided_model_dir: Path, web_model_dir: Path) -> Iterator[str]:
    """Base URL of a server with ``guided`` (the default: image-to-image, inpainting, class guidance) and the plain
    ``tiny`` (no classifier: no class guidance)."""
    with running_server(web_guided_model_dir, models=f"{web_guided_model_dir},{web_model_dir}") as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Headless Chromium, for one test module.

    Module scope, not session: while Playwright's sync API is started it marks its asyncio loop as running
    in this thread, so ``asyncio.run`` (tests/engine, tests/api) fails until it stops.
    """
    path = find_chromium()
    if path is None:
        pytest.skip("Chromium not found (install Debian's `chromium` package; .ci/run does)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=path)
        yield browser
        browser.close()


@dataclass
class _OpenPage:
    page: Page
    problems: list[str]  # JavaScript exceptions and console errors, for a failed test's report
    screenshot: Path


def _open_page(browser: Browser, base_url: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Page]:
    """The web page in a fresh browser context, loaded and wired up (``document.body.dataset.ready``)."""
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    opened = _OpenPage(page, [], tmp_path / f"failure-{len(_opened(request.node))}.png")
    _opened(request.node).append(opened)

    def on_console(msg: ConsoleMessage) -> None:
        if msg.type in ("error", "warning"):
            opened.problems.append(f"console {msg.type}: {msg.text}")

    page.on("console", on_console)
    page.on("pageerror", lambda err: opened.problems.append(f"exception: {err}"))
    try:
        page.goto(f"{base_url}/")
        expect(page.locator("body")).to_have_attribute("data-ready", "true")
        yield page
    finally:
        context.close()


def _opened(item: pytest.Item) -> list[_OpenPage]:
    if not hasattr(item, "web_pages"):
        item.web_pages = []  # type: ignore[attr-defined]
    return item.web_pages  # type: ignore[attr-defined]


@pytest.fixture
def page(browser: Browser, web_server: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Page]:
    """The web page served by ``web_server``."""
    yield from _open_page(browser, web_server, request, tmp_path)


@pytest.fixture
def two_models_page(browser: Browser, web_two_models_server: str, request: pytest.FixtureRequest, tmp_path: Path
                    ) -> Iterator[Page]:
    """The web page served by ``web_two_models_server``."""
    yield from _open_page(browser, web_two_models_server, request, tmp_path)


@pytest.fixture
def guided_page(browser: Browser, web_guided_server: str, request: pytest.FixtureRequest, tmp_path: Path
                ) -> Iterator[Page]:
    """The web page served by ``web_guided_server`` (the ``guided`` model picked)."""
    yield from _open_page(browser, web_guided_server, request, tmp_path)


@pytest.fixture
def auth_page(browser: Browser, web_auth_server: str, request: pytest.FixtureRequest, tmp_path: Path
              ) -> Iterator[Page]:
    """The web page served by ``web_auth_server`` (it loads, but every API call answers 401 until a key is given)."""
    yield from _open_page(browser, web_auth_server, request, tmp_path)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A failed test's report shows its pages' JavaScript problems; a screenshot of each is kept in tmp_path."""
    rep = yield
    if rep.failed and rep.when in ("setup", "call"):
        for opened in _opened(item):
            lines = [*opened.problems] or ["no JavaScript errors"]
            with contextlib.suppress(PlaywrightError):  # e.g. the page is gone: the report matters more
                opened.page.screenshot(path=opened.screenshot, full_page=True)
                lines.append(f"screenshot: {opened.screenshot}")
            rep.sections.append((f"page {opened.page.url}", "\n".join(lines)))
    return rep
