"""The web page in headless Chromium against a real server (tiny random-weight model, few steps).

Each test drives the page the way a person would (fill inputs, click, drag the slider) and checks
what the page shows: images that decode, numbers that move, errors that are visible.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from tests.web.cdp import Browser, Page
from tests.web.conftest import QUEUE_ROWS, WEB_API_KEY

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# Grey values of an <img> or <canvas>, read back through a canvas (the image as the browser decoded it).
PIXELS_JS = """
((el) => {
  const w = el.naturalWidth ?? el.width, h = el.naturalHeight ?? el.height;
  if (!w || !h) return null;
  const c = document.createElement('canvas'); c.width = w; c.height = h;
  const ctx = c.getContext('2d'); ctx.drawImage(el, 0, 0);
  const d = ctx.getImageData(0, 0, w, h).data;
  const out = []; for (let i = 0; i < d.length; i += 4) out.push(d[i]);
  return out;
})(document.querySelector(%s))
"""


def pixels(page: Page, selector: str) -> list[int] | None:
    return page.eval(PIXELS_JS % json.dumps(selector))


def set_value(page: Page, selector: str, value: object, event: str = "input") -> None:
    """Set an input's value and fire the event a person's edit would fire."""
    page.eval(
        f"(() => {{ const el = document.querySelector({json.dumps(selector)});"
        f" el.value = {json.dumps(str(value))};"
        f" el.dispatchEvent(new Event({json.dumps(event)}, {{bubbles: true}})); }})()"
    )


def click(page: Page, selector: str) -> None:
    page.eval(f"document.querySelector({json.dumps(selector)}).click()")


def text(page: Page, selector: str) -> str:
    return page.eval(f"document.querySelector({json.dumps(selector)}).textContent")


def visible(page: Page, selector: str) -> bool:
    """Whether the element takes up space on screen (not merely whether its ``hidden`` property is set)."""
    return page.eval(f"document.querySelector({json.dumps(selector)}).checkVisibility()")


def options(page: Page, selector: str) -> list[str]:
    return page.eval(f"[...document.querySelectorAll({json.dumps(selector + ' option')})].map(o => o.value)")


def test_page_reports_the_model(page: Page) -> None:
    info = page.wait_for("(t => t.includes('T = 1000') && t)(document.getElementById('model-info').textContent)")
    assert "tiny" in info and "1×8×8" in info
    assert page.eval("document.getElementById('fwd-t').max") == "999"
    assert page.eval("[...document.querySelectorAll('#fwd-example option')].map(o => o.value)") == ["0", "1"]


def test_generate_streams_progress_and_shows_images(page: Page) -> None:
    set_value(page, "#gen-num", 2)
    set_value(page, "#gen-seed", 1234)
    set_value(page, "#gen-sampler", "ddim", "change")
    set_value(page, "#gen-steps", 10)
    page.eval("window.seenSteps = []; new MutationObserver(() => window.seenSteps.push("
              "document.getElementById('gen-progress').value)).observe("
              "document.getElementById('gen-progress-text'), {childList: true, characterData: true, subtree: true})")
    click(page, "#gen-run")
    page.wait_for("document.querySelectorAll('#gen-results img').length === 2", timeout_s=30)
    page.wait_for("[...document.querySelectorAll('#gen-results img')].every(i => i.complete && i.naturalWidth === 8)")
    assert text(page, "#gen-seed-shown") == "seed 1234"
    assert page.eval("document.getElementById('gen-progress').value") == 10
    assert page.eval("document.getElementById('gen-progress').max") == 10
    assert text(page, "#gen-progress-text").startswith("done: 2 image(s), ddim-10")
    # progress events arrived one by one, and a predicted-x0 preview was drawn
    seen = page.eval("window.seenSteps")
    assert len({s for s in seen if 0 < s < 10}) >= 3, seen
    assert page.eval("document.getElementById('gen-preview').src").startswith("data:image/png;base64,")
    assert page.eval("document.getElementById('gen-error').hidden") is True
    # the shown seed reproduces the images: the same request through the API gives the same pixels
    first = pixels(page, "#gen-results img")
    click(page, "#gen-reuse-seed")
    assert page.eval("document.getElementById('gen-seed').value") == "1234"
    base = page.eval("location.origin")
    again = httpx.post(f"{base}/generate", json={"num_images": 2, "seed": 1234, "sampler": "ddim", "steps": 10,
                                                   "format": "json"}, timeout=30).json()
    assert page.eval(f"document.querySelector('#gen-results img').src.endsWith({json.dumps(again['images'][0])})")
    assert first is not None and len(first) == 64


def test_invalid_input_shows_422(page: Page) -> None:
    assert page.eval("document.getElementById('gen-sampler').value") == "unipc"
    set_value(page, "#gen-steps", 5000)
    page.eval("document.getElementById('gen-steps').removeAttribute('max')")  # past the form's own check
    click(page, "#gen-run")
    message = page.wait_for("!document.getElementById('gen-error').hidden && "
                            "document.getElementById('gen-error').textContent")
    # UniPC takes at most T − 1 steps
    assert message.startswith("422") and "steps" in message and "1..999" in message and "unipc" in message
    assert page.eval("document.getElementById('gen-run').disabled") is False


def test_sampler_menu_follows_the_model(page: Page) -> None:
    """Samplers, default steps, max steps, η and spacings come from GET /v1/model; dpmpp_2m + karras generates."""
    base = page.eval("location.origin")
    info = httpx.get(f"{base}/v1/model").json()
    assert len(info["samplers"]) == 6
    assert options(page, "#gen-sampler") == info["samplers"]
    labels = page.eval("[...document.querySelectorAll('#gen-sampler option')].map(o => o.textContent)")
    assert "DPM-Solver++ 2M" in labels and "UniPC" in labels and "DDPM (ancestral)" in labels
    # the default: UniPC, its default steps, no η, spacing left to the model
    assert page.eval("document.getElementById('gen-sampler').value") == "unipc"
    assert page.eval("document.getElementById('gen-steps').value") == str(info["default_steps"]["unipc"]) == "20"
    assert page.eval("document.getElementById('gen-steps').max") == str(info["max_steps"]["unipc"]) == "999"
    assert not visible(page, "#gen-eta-label")
    assert options(page, "#gen-spacing") == ["", *info["timestep_spacings"]["unipc"]]
    assert "karras" in options(page, "#gen-spacing")
    default_label = f"model default ({info['default_timestep_spacing']['unipc']})"
    assert page.eval("document.querySelector('#gen-spacing option').textContent") == default_label
    # an explicit karras does not survive a switch to a sampler without it
    set_value(page, "#gen-spacing", "karras", "change")
    set_value(page, "#gen-sampler", "ddim", "change")
    assert visible(page, "#gen-eta-label")
    assert page.eval("document.getElementById('gen-steps').value") == "50"
    assert page.eval("document.getElementById('gen-steps').max") == "1000"
    assert options(page, "#gen-spacing") == ["", "leading", "trailing", "linspace"]
    assert page.eval("document.getElementById('gen-spacing').value") == ""
    # DDPM keeps the page's quick respaced default rather than the full chain
    set_value(page, "#gen-sampler", "ddpm", "change")
    assert page.eval("document.getElementById('gen-steps').value") == "100"
    assert not visible(page, "#gen-eta-label")
    # dpmpp_2m + karras: the request names the spacing, the result line shows it
    page.eval("window.sentBodies = []; const f = window.fetch; window.fetch = (url, o) => "
              "(o && o.body && window.sentBodies.push(JSON.parse(o.body)), f(url, o))")
    set_value(page, "#gen-sampler", "dpmpp_2m", "change")
    set_value(page, "#gen-spacing", "karras", "change")
    set_value(page, "#gen-num", 2)
    set_value(page, "#gen-steps", 6)
    click(page, "#gen-run")
    page.wait_for("document.querySelectorAll('#gen-results img').length === 2", timeout_s=30)
    page.wait_for("[...document.querySelectorAll('#gen-results img')].every(i => i.complete && i.naturalWidth === 8)")
    assert text(page, "#gen-progress-text").startswith("done: 2 image(s), dpmpp_2m-6, karras spacing")
    assert page.eval("window.sentBodies.at(-1)") == {"num_images": 2, "sampler": "dpmpp_2m", "steps": 6,
                                                      "timestep_spacing": "karras"}
    # back to "model default": no timestep_spacing is sent, and the result names the model's
    set_value(page, "#gen-spacing", "", "change")
    page.wait_for("!document.getElementById('gen-run').disabled")
    click(page, "#gen-run")
    page.wait_for("document.getElementById('gen-progress-text').textContent.startsWith('done')"
                  " && !document.getElementById('gen-progress-text').textContent.includes('karras')", timeout_s=30)
    assert "timestep_spacing" not in page.eval("window.sentBodies.at(-1)")
    spacing = info["default_timestep_spacing"]["dpmpp_2m"]
    assert text(page, "#gen-progress-text").startswith(f"done: 2 image(s), dpmpp_2m-6, {spacing} spacing")
    assert page.eval("document.getElementById('gen-error').hidden") is True


def _generate_while_queue_is_full(page: Page, base: str) -> tuple[str, str]:
    """Hold every queue row with a streamed DDPM-1000 request, click Generate, return (progress, error) text."""
    body = {"num_images": QUEUE_ROWS, "sampler": "ddpm", "steps": 1000, "seed": 0}
    with httpx.Client(timeout=30) as client, client.stream("POST", f"{base}/generate/stream", json=body) as stream:
        assert stream.status_code == 200
        # Keep the iterator: a `for` loop directly over stream.iter_lines() that breaks closes the generator,
        # and with it the connection, which cancels the request.
        lines = stream.iter_lines()
        for line in lines:  # the first progress event: all QUEUE_ROWS rows are running
            if line == "event: progress":
                break
        click(page, "#gen-run")
        page.wait_for("['failed', 'cancelled'].includes(document.getElementById('gen-progress-text').textContent)"
                      " || document.getElementById('gen-progress-text').textContent.startsWith('done')")
        return text(page, "#gen-progress-text"), text(page, "#gen-error")
    # leaving the block closes the stream, which cancels the blocker and evicts its rows


def test_queue_full_shows_429(page: Page) -> None:
    """Fill the server's queue with one long streamed DDPM request, then generate from the page."""
    base = page.eval("location.origin")
    set_value(page, "#gen-num", 1)
    set_value(page, "#gen-steps", 5)
    for _ in range(3):  # DDPM-1000 of the tiny model takes ~1 s on an idle machine: retry if it finished first
        progress, message = _generate_while_queue_is_full(page, base)
        if progress == "failed":
            break
    assert progress == "failed"
    assert message.startswith("429 server busy") and "retry in" in message
    assert page.eval("document.getElementById('gen-error').hidden") is False
    # after the blocker is gone the same click succeeds and the error goes away
    deadline = time.monotonic() + 20
    while "ddpm_active_rows 0.0" not in httpx.get(f"{base}/metrics").text:
        assert time.monotonic() < deadline, "the cancelled request's rows were never evicted"
        time.sleep(0.05)
    click(page, "#gen-run")
    page.wait_for("document.querySelectorAll('#gen-results img').length === 1", timeout_s=30)
    assert page.eval("document.getElementById('gen-error').hidden") is True


def test_slider_changes_the_picture(page: Page) -> None:
    page.wait_for("document.getElementById('fwd-image').dataset.t === '0'")
    page.wait_for("document.getElementById('fwd-image').complete")
    at0 = pixels(page, "#fwd-image")
    abar0 = float(page.eval("document.querySelector('#fwd-numbers dd[data-name=alpha_bar_t]').textContent"))
    set_value(page, "#fwd-t", 700)
    page.wait_for("document.getElementById('fwd-image').dataset.t === '700'")
    page.wait_for("document.getElementById('fwd-image').complete")
    at700 = pixels(page, "#fwd-image")
    abar700 = float(page.eval("document.querySelector('#fwd-numbers dd[data-name=alpha_bar_t]').textContent"))
    assert text(page, "#fwd-t-value") == "700"
    assert at0 is not None and at700 is not None and len(at0) == len(at700) == 64
    assert sum(abs(a - b) for a, b in zip(at0, at700, strict=True)) > 64 * 10  # visibly different
    assert abar0 == pytest.approx(1 - 1e-4, abs=1e-6)  # ᾱ_0 = 1 − β_1
    assert 0 < abar700 < 0.1  # linear schedule: ᾱ_700 ≈ 0.012
    # another example digit at the same t and seed is another picture
    set_value(page, "#fwd-example", "1", "change")
    page.wait_for("document.getElementById('fwd-image').complete")
    page.wait_for(f"JSON.stringify({PIXELS_JS % json.dumps('#fwd-image')}) !== {json.dumps(json.dumps(at700))}")


def test_upload_shows_the_uploaded_image_noised(page: Page, tmp_path: Path) -> None:
    from PIL import Image

    path = tmp_path / "white.png"
    Image.new("L", (8, 8), 255).save(path)
    set_value(page, "#fwd-t", 0)
    page.set_files("#fwd-upload", [str(path)])
    page.wait_for("!document.getElementById('fwd-clear-upload').hidden")
    # t = 0: x_0 = 1 everywhere plus noise of std √β_1 = 0.01 → every pixel within a few grey levels of white
    page.wait_for(f"(p => p && p.every(v => v >= 250))({PIXELS_JS % json.dumps('#fwd-image')})")
    assert page.eval("document.getElementById('fwd-error').hidden") is True


def test_reverse_stepping_advances_t(page: Page) -> None:
    assert page.eval("document.getElementById('rev-step').disabled") is True
    click(page, "#rev-start")
    assert text(page, "#rev-t") == "999"
    noise = pixels(page, "#rev-xt")
    click(page, "#rev-step")
    page.wait_for("document.getElementById('rev-t').textContent === '998'")
    numbers = page.eval("Object.fromEntries([...document.querySelectorAll('#rev-numbers dd')]"
                        ".map(d => [d.dataset.name, Number(d.textContent)]))")
    assert numbers["t"] == 999
    assert numbers["beta_t"] == pytest.approx(0.02, rel=1e-3)
    assert numbers["alpha_t"] == pytest.approx(0.98, rel=1e-3)
    assert numbers["posterior_mean_coef_x0"] + numbers["posterior_mean_coef_xt"] > 0.9
    for canvas in ("#rev-xt", "#rev-x0", "#rev-eps"):
        values = pixels(page, canvas)
        assert values is not None and len(values) == 64 and len(set(values)) > 1, canvas
    assert pixels(page, "#rev-xt") != noise
    # play runs several steps per frame until paused
    set_value(page, "#rev-stride", 5)
    click(page, "#rev-play")
    page.wait_for("Number(document.getElementById('rev-t').textContent) <= 980", timeout_s=30)
    click(page, "#rev-play")
    page.wait_for("document.getElementById('rev-play').textContent === 'Play'")
    t_paused = int(text(page, "#rev-t"))
    time.sleep(0.3)
    assert int(text(page, "#rev-t")) == t_paused
    assert page.eval("document.getElementById('rev-error').hidden") is True


def test_cancel_stops_the_request_on_the_server(page: Page) -> None:
    base = page.eval("location.origin")

    def evicted() -> float:
        line = next(x for x in httpx.get(f"{base}/metrics").text.splitlines()
                    if x.startswith('ddpm_rows_evicted_total{reason="cancelled"}'))
        return float(line.split()[-1])

    before = evicted()
    set_value(page, "#gen-num", 2)
    set_value(page, "#gen-sampler", "ddpm", "change")
    set_value(page, "#gen-steps", 1000)
    click(page, "#gen-run")
    page.wait_for("document.getElementById('gen-progress').value >= 1")
    assert page.eval("document.getElementById('gen-cancel').disabled") is False
    click(page, "#gen-cancel")
    page.wait_for("document.getElementById('gen-progress-text').textContent === 'cancelled'")
    assert page.eval("document.getElementById('gen-run').disabled") is False
    deadline = time.monotonic() + 20
    while evicted() < before + 2:  # the server dropped both rows of the abandoned request
        assert time.monotonic() < deadline, "closing the stream did not cancel the request"
        time.sleep(0.05)


def test_api_key_prompt_after_401_then_generates(browser: Browser, web_auth_server: str, tmp_path: Path) -> None:
    """A server with DDPM_API_KEYS: the first 401 opens the key prompt; a wrong key shows the 401; the right
    one (kept in sessionStorage) loads the model info and the generation stream."""
    p = browser.new_page()
    try:
        p.send("Emulation.setDeviceMetricsOverride",
               {"width": 1200, "height": 1600, "deviceScaleFactor": 1, "mobile": False})
        p.goto(f"{web_auth_server}/", ready="document.body && document.body.dataset.ready === 'true'")
        p.wait_for("!document.getElementById('auth').hidden")
        assert visible(p, "#auth-key")
        assert text(p, "#model-info").startswith("model info unavailable: 401")
        assert p.eval("document.getElementById('auth-error').hidden") is True  # no key sent yet: no complaint

        set_value(p, "#auth-key", "wrong-key")
        click(p, "#auth-use")
        message = p.wait_for("!document.getElementById('auth').hidden && "
                             "!document.getElementById('auth-error').hidden && "
                             "document.getElementById('auth-error').textContent")
        assert message.startswith("401") and "invalid API key" in message

        set_value(p, "#auth-key", WEB_API_KEY)
        click(p, "#auth-use")
        p.wait_for("document.getElementById('model-info').textContent.includes('T = 1000')")
        assert p.eval("document.getElementById('auth').hidden") is True
        assert p.eval(f"sessionStorage.getItem('ddpm-api-key') === {json.dumps(WEB_API_KEY)}")
        assert p.eval("localStorage.length") == 0
        p.wait_for("document.getElementById('fwd-image').dataset.t === '0'")  # GET /noise with the key

        set_value(p, "#gen-num", 2)
        set_value(p, "#gen-sampler", "ddim", "change")
        set_value(p, "#gen-steps", 3)
        click(p, "#gen-run")
        p.wait_for("document.querySelectorAll('#gen-results img').length === 2", timeout_s=30)
        assert p.eval("document.getElementById('gen-error').hidden") is True
    except BaseException:
        p.screenshot(tmp_path / "failure.png")
        raise
    finally:
        browser.send("Target.closeTarget", {"targetId": p.target_id})
