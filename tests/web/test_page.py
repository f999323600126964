"""The web page in headless Chromium (driven by Playwright) against a real server (tiny random-weight model, few steps).

Each test drives the page the way a person would (fill inputs, pick options, click, drag the slider) and checks
what the page shows: images that decode, numbers that move, errors that are visible.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect

from tests.web.conftest import QUEUE_ROWS, WEB_API_KEY

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# Grey values of an <img> or <canvas>, read back through a canvas (the image as the browser decoded it).
PIXELS_JS = """
(el) => {
  const w = el.naturalWidth ?? el.width, h = el.naturalHeight ?? el.height;
  if (!w || !h) return null;
  const c = document.createElement('canvas'); c.width = w; c.height = h;
  const ctx = c.getContext('2d'); ctx.drawImage(el, 0, 0);
  const d = ctx.getImageData(0, 0, w, h).data;
  const out = []; for (let i = 0; i < d.length; i += 4) out.push(d[i]);
  return out;
}
"""


def pixels(page: Page, selector: str) -> list[int] | None:
    return page.locator(selector).evaluate(PIXELS_JS)


def wait_for_pixels(page: Page, selector: str, condition: str, arg: object = None) -> None:
    """Wait until ``condition`` (a JS expression of ``p``, the pixels, and ``arg``) holds for ``selector``."""
    page.wait_for_function(
        f"([arg, el]) => (p => {condition})(({PIXELS_JS})(el))", arg=[arg, page.locator(selector).element_handle()]
    )


def options(page: Page, selector: str) -> list[str]:
    return page.locator(f"{selector} option").evaluate_all("os => os.map(o => o.value)")


def number(page: Page, selector: str) -> float:
    return float(page.locator(selector).text_content() or "nan")


def generate(page: Page, num: int, sampler: str, steps: int, spacing: str | None = None) -> None:
    page.locator("#gen-num").fill(str(num))
    page.locator("#gen-sampler").select_option(sampler)
    if spacing is not None:
        page.locator("#gen-spacing").select_option(spacing)
    page.locator("#gen-steps").fill(str(steps))
    page.locator("#gen-run").click()


def expect_images(page: Page, n: int, size: int = 8) -> None:
    """``n`` result images, each decoded at ``size``×``size``."""
    results = page.locator("#gen-results img")
    expect(results).to_have_count(n, timeout=30_000)
    for i in range(n):
        expect(results.nth(i)).to_have_js_property("complete", True)
        expect(results.nth(i)).to_have_js_property("naturalWidth", size)


def test_page_reports_the_model(page: Page) -> None:
    expect(page.locator("#model-info")).to_contain_text("T = 1000")
    info = page.locator("#model-info").text_content() or ""
    assert "tiny" in info and "1×8×8" in info
    expect(page.locator("#fwd-t")).to_have_attribute("max", "999")
    assert options(page, "#fwd-example") == ["0", "1"]


def test_generate_streams_progress_and_shows_images(page: Page) -> None:
    page.locator("#gen-seed").fill("1234")
    page.evaluate("window.seenSteps = []; new MutationObserver(() => window.seenSteps.push("
                  "document.getElementById('gen-progress').value)).observe(document.getElementById("
                  "'gen-progress-text'), {childList: true, characterData: true, subtree: true})")
    generate(page, 2, "ddim", 10)
    expect_images(page, 2)
    expect(page.locator("#gen-seed-shown")).to_have_text("seed 1234")
    expect(page.locator("#gen-progress")).to_have_js_property("value", 10)
    expect(page.locator("#gen-progress")).to_have_js_property("max", 10)
    expect(page.locator("#gen-progress-text")).to_have_text(re.compile(r"^done: 2 image\(s\), ddim-10"))
    # progress events arrived one by one, and a predicted-x0 preview was drawn
    seen = page.evaluate("window.seenSteps")
    assert len({s for s in seen if 0 < s < 10}) >= 3, seen
    expect(page.locator("#gen-preview")).to_have_attribute("src", re.compile(r"^data:image/png;base64,"))
    expect(page.locator("#gen-error")).to_be_hidden()
    # the shown seed reproduces the images: the same request through the API gives the same pixels
    first = pixels(page, "#gen-results img >> nth=0")
    page.locator("#gen-reuse-seed").click()
    expect(page.locator("#gen-seed")).to_have_value("1234")
    base = page.evaluate("location.origin")
    again = httpx.post(f"{base}/generate", json={"num_images": 2, "seed": 1234, "sampler": "ddim", "steps": 10,
                                                   "format": "json"}, timeout=30).json()
    assert (page.locator("#gen-results img").first.get_attribute("src") or "").endswith(again["images"][0])
    assert first is not None and len(first) == 64


def test_invalid_input_shows_422(page: Page) -> None:
    expect(page.locator("#gen-sampler")).to_have_value("dpmpp_2m_sde")
    page.locator("#gen-steps").fill("5000")
    page.locator("#gen-steps").evaluate("el => el.removeAttribute('max')")  # past the form's own check
    page.locator("#gen-run").click()
    error = page.locator("#gen-error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("422")
    message = error.text_content() or ""
    # SDE-DPM-Solver++ takes at most T − 1 steps
    assert message.startswith("422") and "steps" in message and "1..999" in message and "dpmpp_2m_sde" in message
    expect(page.locator("#gen-run")).to_be_enabled()


def test_sampler_menu_follows_the_model(page: Page) -> None:
    """Samplers, default steps, max steps, η and spacings come from GET /v1/model; dpmpp_2m + karras generates."""
    base = page.evaluate("location.origin")
    info = httpx.get(f"{base}/v1/model").json()
    sampler, steps, eta = page.locator("#gen-sampler"), page.locator("#gen-steps"), page.locator("#gen-eta-label")
    spacing_menu = page.locator("#gen-spacing")
    assert len(info["samplers"]) == 6
    assert options(page, "#gen-sampler") == info["samplers"]
    labels = page.locator("#gen-sampler option").all_text_contents()
    assert "DPM-Solver++ 2M" in labels and "UniPC" in labels and "DDPM (ancestral)" in labels
    # the default: SDE-DPM-Solver++(2M), its default steps, no η, spacing left to the model
    expect(sampler).to_have_value("dpmpp_2m_sde")
    assert str(info["default_steps"]["dpmpp_2m_sde"]) == "20" and str(info["max_steps"]["dpmpp_2m_sde"]) == "999"
    expect(steps).to_have_value("20")
    expect(steps).to_have_attribute("max", "999")
    expect(eta).to_be_hidden()
    assert options(page, "#gen-spacing") == ["", *info["timestep_spacings"]["dpmpp_2m_sde"]]
    assert "karras" in options(page, "#gen-spacing")
    default_label = f"model default ({info['default_timestep_spacing']['dpmpp_2m_sde']})"
    expect(page.locator("#gen-spacing option").first).to_have_text(default_label)
    # an explicit karras does not survive a switch to a sampler without it
    spacing_menu.select_option("karras")
    sampler.select_option("ddim")
    expect(eta).to_be_visible()
    expect(steps).to_have_value("50")
    expect(steps).to_have_attribute("max", "1000")
    assert options(page, "#gen-spacing") == ["", "leading", "trailing", "linspace"]
    expect(spacing_menu).to_have_value("")
    # DDPM keeps the page's quick respaced default rather than the full chain
    sampler.select_option("ddpm")
    expect(steps).to_have_value("100")
    expect(eta).to_be_hidden()
    # dpmpp_2m + karras: the request names the spacing, the result line shows it
    with page.expect_request("**/generate/stream") as sent:
        generate(page, 2, "dpmpp_2m", 6, spacing="karras")
    assert sent.value.post_data_json == {"num_images": 2, "sampler": "dpmpp_2m", "steps": 6,
                                         "timestep_spacing": "karras"}
    expect_images(page, 2)
    expect(page.locator("#gen-progress-text")).to_have_text(
        re.compile(r"^done: 2 image\(s\), dpmpp_2m-6, karras spacing"))
    # back to "model default": no timestep_spacing is sent, and the result names the model's
    spacing_menu.select_option("")
    expect(page.locator("#gen-run")).to_be_enabled()
    with page.expect_request("**/generate/stream") as sent:
        page.locator("#gen-run").click()
    assert "timestep_spacing" not in sent.value.post_data_json
    spacing = info["default_timestep_spacing"]["dpmpp_2m"]
    assert spacing != "karras"
    expect(page.locator("#gen-progress-text")).to_have_text(
        re.compile(rf"^done: 2 image\(s\), dpmpp_2m-6, {re.escape(spacing)} spacing"), timeout=30_000)
    expect(page.locator("#gen-error")).to_be_hidden()


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
        page.locator("#gen-run").click()
        status = page.locator("#gen-progress-text")
        expect(status).to_have_text(re.compile(r"^(failed|cancelled)$|^done"))
        return status.text_content() or "", page.locator("#gen-error").text_content() or ""
    # leaving the block closes the stream, which cancels the blocker and evicts its rows


def test_queue_full_shows_429(page: Page) -> None:
    """Fill the server's queue with one long streamed DDPM request, then generate from the page."""
    base = page.evaluate("location.origin")
    page.locator("#gen-num").fill("1")
    page.locator("#gen-steps").fill("5")
    for _ in range(3):  # DDPM-1000 of the tiny model takes ~1 s on an idle machine: retry if it finished first
        progress, message = _generate_while_queue_is_full(page, base)
        if progress == "failed":
            break
    assert progress == "failed"
    assert message.startswith("429 server busy") and "retry in" in message
    expect(page.locator("#gen-error")).to_be_visible()
    # after the blocker is gone the same click succeeds and the error goes away
    deadline = time.monotonic() + 20
    while 'ddpm_active_rows{model="tiny"} 0.0' not in httpx.get(f"{base}/metrics").text:
        assert time.monotonic() < deadline, "the cancelled request's rows were never evicted"
        time.sleep(0.05)
    page.locator("#gen-run").click()
    expect(page.locator("#gen-results img")).to_have_count(1, timeout=30_000)
    expect(page.locator("#gen-error")).to_be_hidden()


def test_slider_changes_the_picture(page: Page) -> None:
    image = page.locator("#fwd-image")
    expect(image).to_have_attribute("data-t", "0")
    expect(image).to_have_js_property("complete", True)
    at0 = pixels(page, "#fwd-image")
    abar0 = number(page, "#fwd-numbers dd[data-name=alpha_bar_t]")
    page.locator("#fwd-t").fill("700")  # a range input: Playwright sets it and fires input and change
    expect(image).to_have_attribute("data-t", "700")
    expect(image).to_have_js_property("complete", True)
    at700 = pixels(page, "#fwd-image")
    abar700 = number(page, "#fwd-numbers dd[data-name=alpha_bar_t]")
    expect(page.locator("#fwd-t-value")).to_have_text("700")
    assert at0 is not None and at700 is not None and len(at0) == len(at700) == 64
    assert sum(abs(a - b) for a, b in zip(at0, at700, strict=True)) > 64 * 10  # visibly different
    assert abar0 == pytest.approx(1 - 1e-4, abs=1e-6)  # ᾱ_0 = 1 − β_1
    assert 0 < abar700 < 0.1  # linear schedule: ᾱ_700 ≈ 0.012
    # another example digit at the same t and seed is another picture
    page.locator("#fwd-example").select_option("1")
    expect(image).to_have_js_property("complete", True)
    wait_for_pixels(page, "#fwd-image", "JSON.stringify(p) !== arg", json.dumps(at700))


def test_upload_shows_the_uploaded_image_noised(page: Page, tmp_path: Path) -> None:
    from PIL import Image

    path = tmp_path / "white.png"
    Image.new("L", (8, 8), 255).save(path)
    page.locator("#fwd-t").fill("0")
    page.locator("#fwd-upload").set_input_files(path)
    expect(page.locator("#fwd-clear-upload")).to_be_visible()
    # t = 0: x_0 = 1 everywhere plus noise of std √β_1 = 0.01 → every pixel within a few grey levels of white
    wait_for_pixels(page, "#fwd-image", "p && p.every(v => v >= 250)")
    expect(page.locator("#fwd-error")).to_be_hidden()


def test_reverse_stepping_advances_t(page: Page) -> None:
    t = page.locator("#rev-t")
    expect(page.locator("#rev-step")).to_be_disabled()
    page.locator("#rev-start").click()
    expect(t).to_have_text("999")
    noise = pixels(page, "#rev-xt")
    page.locator("#rev-step").click()
    expect(t).to_have_text("998")
    numbers = page.locator("#rev-numbers dd").evaluate_all("ds => Object.fromEntries(ds.map(d => "
                                                           "[d.dataset.name, Number(d.textContent)]))")
    assert numbers["t"] == 999
    assert numbers["beta_t"] == pytest.approx(0.02, rel=1e-3)
    assert numbers["alpha_t"] == pytest.approx(0.98, rel=1e-3)
    assert numbers["posterior_mean_coef_x0"] + numbers["posterior_mean_coef_xt"] > 0.9
    for canvas in ("#rev-xt", "#rev-x0", "#rev-eps"):
        values = pixels(page, canvas)
        assert values is not None and len(values) == 64 and len(set(values)) > 1, canvas
    assert pixels(page, "#rev-xt") != noise
    # play runs several steps per frame until paused
    play = page.locator("#rev-play")
    page.locator("#rev-stride").fill("5")
    play.click()
    page.wait_for_function("Number(document.getElementById('rev-t').textContent) <= 980", timeout=30_000)
    play.click()
    expect(play).to_have_text("Play")
    t_paused = int(t.text_content() or "")
    time.sleep(0.3)
    assert int(t.text_content() or "") == t_paused
    expect(page.locator("#rev-error")).to_be_hidden()


def test_cancel_stops_the_request_on_the_server(page: Page) -> None:
    base = page.evaluate("location.origin")

    def evicted() -> float:
        line = next(x for x in httpx.get(f"{base}/metrics").text.splitlines()
                    if x.startswith('ddpm_rows_evicted_total{model="tiny",reason="cancelled"}'))
        return float(line.split()[-1])

    before = evicted()
    generate(page, 2, "ddpm", 1000)
    page.wait_for_function("document.getElementById('gen-progress').value >= 1")
    expect(page.locator("#gen-cancel")).to_be_enabled()
    page.locator("#gen-cancel").click()
    expect(page.locator("#gen-progress-text")).to_have_text("cancelled")
    expect(page.locator("#gen-run")).to_be_enabled()
    deadline = time.monotonic() + 20
    while evicted() < before + 2:  # the server dropped both rows of the abandoned request
        assert time.monotonic() < deadline, "closing the stream did not cancel the request"
        time.sleep(0.05)


def test_api_key_prompt_after_401_then_generates(auth_page: Page) -> None:
    """A server with DDPM_API_KEYS: the first 401 opens the key prompt; a wrong key shows the 401; the right
    one (kept in sessionStorage) loads the model info and the generation stream."""
    p = auth_page
    auth, auth_error = p.locator("#auth"), p.locator("#auth-error")
    expect(auth).to_be_visible()
    expect(p.locator("#auth-key")).to_be_visible()
    expect(p.locator("#model-info")).to_have_text(re.compile(r"^model info unavailable: 401"))
    expect(auth_error).to_be_hidden()  # no key sent yet: no complaint

    p.locator("#auth-key").fill("wrong-key")
    p.locator("#auth-use").click()
    expect(auth_error).to_be_visible()
    expect(auth_error).to_contain_text("401")
    expect(auth).to_be_visible()
    message = auth_error.text_content() or ""
    assert message.startswith("401") and "invalid API key" in message

    p.locator("#auth-key").fill(WEB_API_KEY)
    p.locator("#auth-use").click()
    expect(p.locator("#model-info")).to_contain_text("T = 1000")
    expect(auth).to_be_hidden()
    assert p.evaluate(f"sessionStorage.getItem('ddpm-api-key') === {json.dumps(WEB_API_KEY)}")
    assert p.evaluate("localStorage.length") == 0
    expect(p.locator("#fwd-image")).to_have_attribute("data-t", "0")  # GET /noise with the key

    generate(p, 2, "ddim", 3)
    expect(p.locator("#gen-results img")).to_have_count(2, timeout=30_000)
    expect(p.locator("#gen-error")).to_be_hidden()


def test_a_401_for_a_replaced_key_is_resent_with_the_new_one(auth_page: Page) -> None:
    """A request sent with a wrong key that answers 401 only after the right key was entered (a slow server) is
    resent with the right key: it neither reopens the prompt the right key closed nor blanks the model info."""
    p = auth_page
    held: list = []

    def hold_wrong_key(route) -> None:
        if route.request.headers.get("authorization") == "Bearer wrong-key":
            held.append(route)  # answered below, after the right key
        else:
            route.continue_()

    p.route(lambda url: "/v1/model?" in url, hold_wrong_key)
    p.locator("#auth-key").fill("wrong-key")
    p.locator("#auth-use").click()
    expect(p.locator("#auth-error")).to_contain_text("401")  # GET /v1/models answered; GET /v1/model is held
    for _ in range(200):
        if held:
            break
        p.wait_for_timeout(25)
    assert held, "the page never asked for /v1/model with the wrong key"

    p.locator("#auth-key").fill(WEB_API_KEY)
    p.locator("#auth-use").click()
    expect(p.locator("#model-info")).to_contain_text("T = 1000")
    expect(p.locator("#auth")).to_be_hidden()

    def resent(response) -> bool:
        return "/v1/model?" in response.url and response.request.headers.get("authorization") == f"Bearer {WEB_API_KEY}"

    with p.expect_response(resent, timeout=10_000), p.expect_response(lambda r: "/noise?" in r.url, timeout=10_000):
        held[0].fulfill(status=401, content_type="application/json", body=json.dumps({"detail": "invalid API key"}))
    expect(p.locator("#auth")).to_be_hidden()
    expect(p.locator("#model-info")).to_contain_text("T = 1000")


def test_model_picker_switches_every_panel(two_models_page: Page, page: Page) -> None:
    expect(page.locator("#model-pick")).to_be_hidden()  # one model: no picker
    p = two_models_page
    expect(p.locator("#model-pick")).to_be_visible()
    assert options(p, "#model-select") == ["tiny", "tiny12"]
    expect(p.locator("#model-info")).to_contain_text("1×8×8")
    p.locator("#model-select").select_option("tiny12")
    expect(p.locator("#model-info")).to_contain_text("tiny12")
    expect(p.locator("#model-info")).to_contain_text("1×12×12")
    generate(p, 2, "ddim", 3)
    expect_images(p, 2, size=12)
    expect(p.locator("#fwd-image")).to_have_js_property("naturalWidth", 12)  # GET /noise?model=tiny12
    p.locator("#rev-start").click()
    p.locator("#rev-step").click()
    expect(p.locator("#rev-t")).to_have_text("998")  # POST /denoise-step {model: tiny12}
    expect(p.locator("#rev-error")).to_be_hidden()
