"""Steering the reverse process from the web page (issue 14): drawing with mouse and touch for image-to-image,
a mask over an example digit for inpainting, a class picker with a guidance slider for generation.

Headless Chromium (Playwright) against a real server whose default model (``guided``, tiny, 8×8, random weights)
has a random-weight guidance classifier; the checks read what the page sent (the request body) and what it shows
(the result PNGs), and hold the page to the API's promises: the known pixels of an inpainting come back exactly.
"""

from __future__ import annotations

import base64
import io
import re

import httpx
import numpy as np
import pytest
from PIL import Image, ImageOps
from playwright.sync_api import Page, Request, expect

pytestmark = [pytest.mark.browser, pytest.mark.slow]

SIZE = 8  # the tiny models' H = W
EXPORT_SCALE = 4  # app.js: the picture and the mask are kept (and sent) at 4× the model's resolution
SIDE = SIZE * EXPORT_SCALE

# The red channel of a <canvas> as a flat list (the picture is grey; the mask overlay is red with alpha).
CANVAS_JS = """
(c, channel) => {
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  const out = []; for (let i = channel; i < d.length; i += 4) out.push(d[i]);
  return out;
}
"""


def canvas(page: Page, selector: str, channel: int = 0) -> np.ndarray:
    """One channel (0 = red, 3 = alpha) of a canvas as (H, W) uint8."""
    el = page.locator(selector)
    side = el.evaluate("c => c.width")
    return np.array(el.evaluate(CANVAS_JS, channel), np.uint8).reshape(side, -1)


def wait_for_example(page: Page) -> None:
    """Wait until the loaded example is drawn: a colour channel above black (a blank canvas is opaque black, so
    its alpha is already 255 and cannot tell)."""
    page.wait_for_function("document.getElementById('steer-canvas').getContext('2d').getImageData(0, 0, 32, 32)"
                           ".data.some((v, i) => i % 4 !== 3 && v > 0)")


def png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64.split(",", 1)[-1])))


def as_the_server_sees_it(b64: str, size: int = SIZE) -> np.ndarray:
    """A PNG field converted as the server does (service.api.encoding.decode_image: alpha on black, grey, Lanczos)."""
    im = png(b64).convert("RGBA")
    im = Image.alpha_composite(Image.new("RGBA", im.size, (0, 0, 0, 255)), im).convert("L")
    return np.asarray(ImageOps.fit(im, (size, size), Image.Resampling.LANCZOS), np.int16)


def results(page: Page, prefix: str, n: int) -> list[np.ndarray]:
    """The panel's ``n`` result images (decoded at the model's size) as (H, W) grey levels."""
    imgs = page.locator(f"#{prefix}-results img")
    expect(imgs).to_have_count(n, timeout=30_000)
    for i in range(n):
        expect(imgs.nth(i)).to_have_js_property("naturalWidth", SIZE)
    return [np.asarray(png(imgs.nth(i).get_attribute("src") or "").convert("L"), np.int16) for i in range(n)]


def steer_settings(page: Page, sampler: str, steps: int, num: int = 2, seed: int = 7) -> None:
    page.locator("#steer-sampler").select_option(sampler)
    page.locator("#steer-steps").fill(str(steps))
    page.locator("#steer-num").fill(str(num))
    page.locator("#steer-seed").fill(str(seed))


def record_previews(page: Page, prefix: str) -> None:
    """Collect every x̂_0 preview the panel shows in ``window.previews``."""
    page.evaluate("(id) => { window.previews = []; new MutationObserver(() => window.previews.push("
                  "document.getElementById(id).src)).observe(document.getElementById(id), {attributes: true}) }",
                  f"{prefix}-preview")


def stroke_box(page: Page) -> dict[str, float]:
    box = page.locator("#steer-stack").bounding_box()
    assert box is not None and box["width"] == box["height"] == 224  # shown 7× the 32-pixel canvas (style.css)
    return box


def touch_stroke(page: Page, points: list[tuple[float, float]]) -> None:
    """A finger drawn through ``points`` (page coordinates): touch input through the DevTools protocol, which Chromium
    turns into Pointer Events of pointerType "touch" — and, without ``touch-action: none``, a pointercancel after the
    first move (the browser takes the gesture for a pan): a dot, not a stroke."""
    cdp = page.context.new_cdp_session(page)
    try:
        (x, y), *rest = points
        cdp.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [{"x": x, "y": y}]})
        for x, y in rest:
            cdp.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": [{"x": x, "y": y}]})
        cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
    finally:
        cdp.detach()


def sent_body(request: Request) -> dict:
    body = request.post_data_json
    assert isinstance(body, dict)
    return body


def lit_rows(picture: np.ndarray) -> int:
    """How many rows a stroke spans, first lit row to last."""
    rows = np.flatnonzero(picture.max(axis=1) > 0)
    return int(rows[-1] - rows[0] + 1) if rows.size else 0


def test_draw_with_mouse_and_touch_then_image_to_image(guided_page: Page) -> None:
    p = guided_page
    expect(p.locator("#steer")).to_be_visible()
    assert canvas(p, "#steer-canvas").shape == (SIDE, SIDE)
    assert canvas(p, "#steer-canvas").max() == 0  # starts black
    p.evaluate("window.pointers = []; for (const type of ['pointerdown', 'pointercancel']) document.getElementById("
               "'steer-stack').addEventListener(type, e => pointers.push(`${type} ${e.pointerType}`))")
    box = stroke_box(p)
    x0, y0, w = box["x"], box["y"], box["width"]

    # a mouse stroke down the left half
    p.locator("#steer-brush").fill("1")
    p.mouse.move(x0 + 0.2 * w, y0 + 0.15 * w)
    p.mouse.down()
    p.mouse.move(x0 + 0.3 * w, y0 + 0.85 * w, steps=10)
    p.mouse.up()
    after_mouse = canvas(p, "#steer-canvas")
    assert (after_mouse[:, : SIDE // 2] == 255).sum() > 30  # white on black, along the path
    assert lit_rows(after_mouse) >= 0.6 * SIDE  # from 15 % to 85 % of the height: the whole path, not a dot
    assert after_mouse[:, SIDE // 2 + 2:].max() == 0

    # a finger stroke across the right half, with a wider brush
    p.locator("#steer-brush").fill("2")
    expect(p.locator("#steer-brush-value")).to_have_text("2")
    touch_stroke(p, [(x0 + (0.6 + 0.03 * i) * w, y0 + (0.2 + 0.06 * i) * w) for i in range(11)])
    after_touch = canvas(p, "#steer-canvas")
    assert (after_touch[:, SIDE // 2 + 2:] == 255).sum() > 40
    assert lit_rows(after_touch[:, SIDE // 2 + 2:]) >= 0.6 * SIDE  # 20 % → 80 %: the gesture was not cancelled
    np.testing.assert_array_equal(after_touch[:, : SIDE // 2 - 2], after_mouse[:, : SIDE // 2 - 2])
    assert p.evaluate("window.pointers") == ["pointerdown mouse", "pointerdown touch"]
    expect(p.locator("#steer-mask-lower")).to_be_visible()
    assert canvas(p, "#steer-mask", channel=3).max() == 0  # the pen never touches the mask

    # image-to-image at strength 0.5: the drawing is sent as it is on the canvas, previews stream, results come
    p.locator("#steer-strength").fill("0.5")
    expect(p.locator("#steer-strength-value")).to_have_text("0.50")
    steer_settings(p, "ddim", 10)
    record_previews(p, "steer")
    with p.expect_request("**/generate/stream") as sent:
        p.locator("#steer-run-img2img").click()
    body = sent_body(sent.value)
    assert body["strength"] == 0.5 and "mask" not in body
    assert {k: body[k] for k in ("sampler", "steps", "num_images", "seed")} == {
        "sampler": "ddim", "steps": 10, "num_images": 2, "seed": 7}
    init = png(body["init_image"])
    assert init.size == (SIDE, SIDE)
    np.testing.assert_array_equal(np.asarray(init.convert("L")), after_touch)  # the canvas, pixel for pixel
    images = results(p, "steer", 2)
    expect(p.locator("#steer-progress-text")).to_have_text(re.compile(r"^done: 2 image\(s\), ddim-"))
    expect(p.locator("#steer-error")).to_be_hidden()
    previews = p.evaluate("window.previews")
    assert len(set(previews)) >= 2 and all(s.startswith("data:image/png;base64,") for s in previews), previews
    # the page shows what the API gives for that body
    base = p.evaluate("location.origin")
    again = httpx.post(f"{base}/generate", json={**body, "format": "json"}, timeout=60).json()
    for shown, b64 in zip(images, again["images"], strict=True):
        np.testing.assert_array_equal(shown, np.asarray(png(b64).convert("L"), np.int16))
    expect(p.locator("#gen-results img")).to_have_count(0)  # the Generate panel is untouched

    p.locator("#steer-clear").click()
    assert canvas(p, "#steer-canvas").max() == 0


def test_inpaint_keeps_the_known_half(guided_page: Page) -> None:
    p = guided_page
    base = p.evaluate("location.origin")
    p.locator("#steer-example").select_option("0")  # a ring (tests/web/server.py make_tiny_model)
    p.locator("#steer-load-example").click()
    wait_for_example(p)
    picture = canvas(p, "#steer-canvas")
    # the example as GET /noise gives x_0 at the model's size, each pixel a 4×4 block of the canvas
    out = httpx.get(f"{base}/noise", params={"image": "0", "t": 0, "format": "json", "include": "x0"}).json()
    x0 = np.load(io.BytesIO(base64.b64decode(out["x0"])))[0]
    example = np.rint((x0 + 1) * 127.5).astype(np.int16)
    blocks = picture.reshape(SIZE, EXPORT_SCALE, SIZE, EXPORT_SCALE).astype(np.int16)
    assert np.abs(blocks - example[:, None, :, None]).max() <= 1

    # mask: the lower half, red on the overlay
    p.locator("#steer-mask-lower").click()
    alpha = canvas(p, "#steer-mask", channel=3)
    assert (alpha[SIDE // 2:] == 255).all() and (alpha[: SIDE // 2] == 0).all()
    assert (canvas(p, "#steer-mask")[SIDE // 2:] == 255).all()  # red
    np.testing.assert_array_equal(canvas(p, "#steer-canvas"), picture)  # the mask leaves the picture alone

    # resampling is offered for ddpm/ddim only
    p.locator("#steer-sampler").select_option("unipc")
    expect(p.locator("#steer-resample")).to_be_hidden()
    steer_settings(p, "ddim", 5)
    expect(p.locator("#steer-resample")).to_be_visible()
    p.locator("#steer-jump-n").fill("2")
    record_previews(p, "steer")
    with p.expect_request("**/generate/stream") as sent:
        p.locator("#steer-run-inpaint").click()
    body = sent_body(sent.value)
    assert "strength" not in body and body["jump_n_sample"] == 2 and body["jump_length"] == 1
    mask = np.asarray(png(body["mask"]).convert("L"))
    assert mask.shape == (SIDE, SIDE)
    assert (mask[SIDE // 2:] == 255).all() and (mask[: SIDE // 2] == 0).all()  # white on black = regenerate
    np.testing.assert_array_equal(np.asarray(png(body["init_image"]).convert("L")), picture)
    images = results(p, "steer", 2)
    expect(p.locator("#steer-error")).to_be_hidden()
    assert len(set(p.evaluate("window.previews"))) >= 2

    # which pixels the server keeps: the mask after its resize, thresholded at 50 %; the lower half regenerates
    known = as_the_server_sees_it(body["mask"]) < 128
    assert known[: SIZE // 2].all() and not known[SIZE // 2:].any()
    source = as_the_server_sees_it(body["init_image"])  # the picture after the server's resize
    assert source[known].max() > 150 and source[known].min() < 50  # the ring's top: not a blank region
    plain = httpx.post(f"{base}/generate", json={"num_images": 2, "seed": 7, "sampler": "ddim", "steps": 5,
                                                  "format": "json"}, timeout=60).json()["images"]
    for image, other in zip(images, plain, strict=True):
        assert np.abs(image[known] - source[known]).max() <= 2  # the known pixels: the input, exactly
        assert np.abs(image[~known] - source[~known]).mean() > 10  # the masked ones: generated
        other_grey = np.asarray(png(other).convert("L"), np.int16)
        assert np.abs(other_grey[known] - source[known]).mean() > 10  # not what the sampler gives anyway

    # the eraser takes mask away; an empty mask is refused on the page before any request
    p.locator("#steer-mask-clear").click()
    assert canvas(p, "#steer-mask", channel=3).max() == 0
    p.locator("input[name=steer-tool][value=mask]").check()
    box = stroke_box(p)
    p.mouse.move(box["x"] + 20, box["y"] + 20)
    p.mouse.down()
    p.mouse.move(box["x"] + 200, box["y"] + 20, steps=6)
    p.mouse.up()
    painted = (canvas(p, "#steer-mask", channel=3) > 0).sum()
    assert painted > 0
    p.locator("input[name=steer-tool][value=erase]").check()
    p.mouse.move(box["x"] + 20, box["y"] + 20)
    p.mouse.down()
    p.mouse.move(box["x"] + 110, box["y"] + 20, steps=6)
    p.mouse.up()
    assert 0 < (canvas(p, "#steer-mask", channel=3) > 0).sum() < painted
    np.testing.assert_array_equal(canvas(p, "#steer-canvas"), picture)  # neither tool draws on the picture


def test_guided_generation_sends_class_and_scale(guided_page: Page, page: Page) -> None:
    p = guided_page
    base = p.evaluate("location.origin")
    classes, scale = p.locator("#gen-class"), p.locator("#gen-guidance")
    expect(p.locator("#gen-class-label")).to_be_visible()
    assert classes.locator("option").evaluate_all("os => os.map(o => o.value)") == ["", *map(str, range(10))]
    expect(scale).to_have_value("3")  # GET /v1/model default_guidance_scale
    expect(scale).to_be_disabled()  # no class picked: nothing to scale
    classes.select_option("3")
    expect(scale).to_be_enabled()
    scale.fill("5.5")  # a range input: Playwright sets it and fires input and change
    expect(p.locator("#gen-guidance-value")).to_have_text("5.5")
    p.locator("#gen-seed").fill("5")
    p.locator("#gen-num").fill("2")
    p.locator("#gen-sampler").select_option("ddim")
    p.locator("#gen-steps").fill("5")
    with p.expect_request("**/generate/stream") as sent:
        p.locator("#gen-run").click()
    body = sent_body(sent.value)
    assert body["class_label"] == 3 and body["guidance_scale"] == 5.5
    shown = results(p, "gen", 2)
    expect(p.locator("#gen-error")).to_be_hidden()
    guided = httpx.post(f"{base}/generate", json={**body, "format": "json"}, timeout=60).json()["images"]
    plain_body = {k: v for k, v in body.items() if k not in ("class_label", "guidance_scale")}
    unguided = httpx.post(f"{base}/generate", json={**plain_body, "format": "json"}, timeout=60).json()["images"]
    for image, want, plain in zip(shown, guided, unguided, strict=True):
        np.testing.assert_array_equal(image, np.asarray(png(want).convert("L"), np.int16))
        assert not np.array_equal(image, np.asarray(png(plain).convert("L"), np.int16))  # the gradient acted

    # the plain model of the same server has no classifier: the controls go, and nothing is sent
    p.locator("#model-select").select_option("tiny")
    expect(p.locator("#model-info")).to_contain_text("tiny · 1×8×8")
    expect(p.locator("#gen-class-label")).to_be_hidden()
    expect(p.locator("#gen-guidance-label")).to_be_hidden()
    expect(p.locator("#steer")).to_be_visible()  # every model does image-to-image and inpainting
    with p.expect_request("**/generate/stream") as sent:
        p.locator("#gen-run").click()
    body = sent_body(sent.value)
    assert body["model"] == "tiny" and "class_label" not in body and "guidance_scale" not in body
    results(p, "gen", 2)
    p.locator("#model-select").select_option("guided")
    expect(p.locator("#gen-class-label")).to_be_visible()
    expect(classes).to_have_value("")  # back to "none" and the model's scale
    expect(scale).to_have_value("3")

    # a server with only the plain model: no class picker at all
    expect(page.locator("#model-info")).to_contain_text("T = 1000")
    expect(page.locator("#gen-class-label")).to_be_hidden()
    expect(page.locator("#gen-guidance-label")).to_be_hidden()


def test_controls_follow_the_models_conditioning(guided_page: Page) -> None:
    """A model that offers only image-to-image (GET /v1/model rewritten on its way to the page): the inpainting
    controls and the class picker are hidden; one that offers nothing hides the steer panel. The picture survives
    the switches."""
    p = guided_page
    p.locator("#steer-load-example").click()
    wait_for_example(p)
    picture = canvas(p, "#steer-canvas")
    offered: list[str] = []

    def rewrite(route) -> None:  # type: ignore[no-untyped-def]
        info = route.fetch().json()
        route.fulfill(json={**info, "conditioning": offered, "num_classes": None, "default_guidance_scale": None})

    p.route(re.compile(r"/v1/model\?"), rewrite)
    offered[:] = ["image_to_image"]
    p.locator("#model-select").select_option("tiny")
    expect(p.locator("#model-info")).to_contain_text("tiny · 1×8×8")
    expect(p.locator("#steer-run-img2img")).to_be_visible()
    for hidden in ("#steer-run-inpaint", "#steer-mask-lower", "#steer-mask-clear", "#gen-class-label"):
        expect(p.locator(hidden)).to_be_hidden()
    expect(p.locator("input[name=steer-tool][value=mask]")).to_be_hidden()
    offered[:] = []
    p.locator("#model-select").select_option("guided")
    expect(p.locator("#model-info")).to_contain_text("guided · 1×8×8")
    expect(p.locator("#steer")).to_be_hidden()
    p.unroute(re.compile(r"/v1/model\?"))
    p.locator("#model-select").select_option("tiny")
    expect(p.locator("#steer-run-inpaint")).to_be_visible()
    np.testing.assert_array_equal(canvas(p, "#steer-canvas"), picture)


def test_steer_errors_show_in_the_steer_panel(guided_page: Page) -> None:
    p = guided_page
    error = p.locator("#steer-error")
    # an empty mask: said on the page, no request
    requests: list[str] = []
    p.on("request", lambda r: requests.append(r.url) if r.url.endswith("/generate/stream") else None)
    p.locator("#steer-run-inpaint").click()
    expect(error).to_be_visible()
    expect(error).to_contain_text("nothing to regenerate")
    assert requests == []
    # strength 0.05 of 5 steps leaves no step: the server's 422, in this panel and not in Generate's
    steer_settings(p, "ddim", 5)
    p.locator("#steer-strength").fill("0.05")
    expect(p.locator("#steer-strength-value")).to_have_text("0.05")
    p.locator("#steer-run-img2img").click()
    expect(error).to_contain_text("422")
    message = error.text_content() or ""
    assert message.startswith("422 invalid input") and "strength" in message, message
    expect(p.locator("#steer-progress-text")).to_have_text("failed")
    expect(p.locator("#gen-error")).to_be_hidden()
    expect(p.locator("#steer-run-img2img")).to_be_enabled()
    expect(p.locator("#steer-run-inpaint")).to_be_enabled()
    # a good run clears it
    p.locator("#steer-strength").fill("0.6")
    p.locator("#steer-run-img2img").click()
    results(p, "steer", 2)
    expect(error).to_be_hidden()
    assert len(requests) == 2  # the refused one and this one
