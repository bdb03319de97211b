"""mdx-ui end to end in a real headless browser: Debian's chromium driven by playwright.

Open the page, tick a class, click Generate, and find the generated image in the page.
With MDX_UPDATE_SCREENSHOT=1 the page is saved to docs/ui.png for the README.

playwright's own browser download is never used: the test launches /usr/bin/chromium
(`apt-get install chromium`; `.ci/run` installs it) and is skipped without it.
"""

from __future__ import annotations

import io
import os
import re
import socket
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser,
              # gradio 6.31's queue calls pandas APIs that pandas 3 deprecates; not ours to fix.
              pytest.mark.filterwarnings("ignore::DeprecationWarning:gradio.queueing")]

CHROMIUM = Path(os.environ.get("MDX_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "ui.png"
TIMEOUT_MS = 30_000

if not CHROMIUM.is_file():
    pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium, or set MDX_CHROMIUM)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
pytest.importorskip("gradio", reason="gradio is not installed (pip install 'microdiffusion[ui]')")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from mdx.runtime import ui  # noqa: E402
from test_ui import class_images, write_contract_model  # noqa: E402  (also skips without gradio, onnx)


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    models = tmp_path_factory.mktemp("ui-browser") / "models"
    models.mkdir()
    write_contract_model(models / "tiny.onnx")
    (models / "broken.onnx").write_bytes(b"not an onnx model" * 8)
    app = ui.build_app(models, max_batch=16)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app.close()


@pytest.fixture(scope="module")
def page(url):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 860})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url)
            yield page
        finally:
            browser.close()


def test_tick_a_class_generate_and_see_the_image(page):
    page.locator("#classes").get_by_label("ball").check()
    page.locator("#steps input[type=number]").fill("8")
    page.locator("#steps input[type=number]").press("Enter")
    page.locator("#generate").click()

    image = page.locator("#grid img")
    image.wait_for(state="visible")
    src = image.get_attribute("src")
    assert src, "the generated image has no src"
    page.wait_for_function("document.querySelector('#grid img').naturalWidth > 0")
    timings = page.locator("#timings textarea").input_value()
    # The batch default is 2 per class (3 classes); the steps are what the page was given.
    assert timings.startswith("6 images of 16×16 (ball, ddim 8 steps") and "images/s" in timings
    page.locator("#animation img").wait_for(state="visible")

    # The image the page shows is the ticked class: the test model draws "ball" as a blue square.
    with urllib.request.urlopen(urllib.parse.urljoin(page.url, src), timeout=10) as response:
        grid = np.asarray(Image.open(io.BytesIO(response.read())).convert("RGB"))
    ball = ui.make_grid(ui.to_uint8(np.repeat(class_images()[1:2], 6, axis=0)), 3, ui.GRID_PIXELS // 16)
    assert grid.shape == ball.shape and np.abs(grid.astype(int) - ball).max() <= 2

    if os.environ.get("MDX_UPDATE_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)
        assert SCREENSHOT.stat().st_size < 300_000


def test_corrupt_model_shows_an_error_and_the_page_keeps_working(page):
    expect = sync_api.expect
    page.locator("#model input").click()
    page.get_by_role("option", name="broken.onnx").click()
    expect(page.locator("#model-card")).to_contain_text("not an ONNX model")
    page.locator("#generate").click()
    expect(page.locator("[data-testid=toast-body].error")).to_contain_text("broken.onnx")

    page.locator("#model input").click()
    page.get_by_role("option", name="tiny.onnx").click()
    expect(page.locator("#model-card")).to_contain_text("tiny.onnx")
    page.locator("#classes").get_by_label("apple").check()
    page.locator("#classes").get_by_label("cat").check()  # two classes: a mix
    page.locator("#generate").click()
    # tiny.onnx has no mdx.recommended: picking it again resets the steps to mdx-sample's 25.
    expect(page.locator("#timings textarea")).to_have_value(re.compile(r"6 images .*apple\+cat, ddim 25 steps"))
