"""The web demo in a real browser: Playwright drives Debian's chromium against a real `kosmos2 serve`.

It uploads examples/shapes.png, grounds it, finds the boxes drawn on the image and the coloured phrases of the
text (each phrase coloured like its box, hover linking the two), then draws a box with the mouse and gets its
description. The answers are checked against the `Predictor` alone; a screenshot is saved.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from _server_fixtures import SHAPES, Server
from PIL import Image

from kosmos2.predictor import Predictor

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="no browser: Debian's chromium is missing"
)
SCREENSHOT = Path(os.environ.get("KOSMOS2_SCREENSHOT_DIR", tempfile.gettempdir())) / "kosmos2-demo.png"


def test_demo_grounds_an_upload_and_describes_a_drawn_box(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    predictor = Predictor.from_pretrained()
    image = Image.open(SHAPES)
    expected = predictor.ground(image)
    server = Server("--max-batch", "4")
    try:
        with sync_api.sync_playwright() as p:
            # a fresh profile each run: Playwright takes --user-data-dir as a persistent context's directory
            browser = p.chromium.launch_persistent_context(
                str(tmp_path / "profile"),
                executable_path=CHROMIUM,
                headless=True,
                args=[
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                ],
                viewport={"width": 1280, "height": 800},
                accept_downloads=True,
            )
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/")
            page.set_input_files("#file", str(SHAPES))
            page.wait_for_selector("#stage:not([hidden])")
            # 1. grounded caption
            page.select_option("#task", "ground")
            page.click("#run")
            page.wait_for_function(
                "document.getElementById('status').textContent.startsWith('Done')", timeout=30000
            )
            assert page.inner_text("#output") == expected.caption
            phrases = page.locator("#output .phrase")
            assert phrases.all_inner_texts() == [e.phrase for e in expected.entities]
            boxes = page.locator("#overlay rect.box")
            assert boxes.count() == 3
            for i, e in enumerate(
                expected.entities
            ):  # box i where the predictor put it, in its phrase's colour
                box = page.locator(f'#overlay rect.box[data-entity="{i}"]')
                x, y = float(box.get_attribute("x")), float(box.get_attribute("y"))
                assert (x, y) == pytest.approx(e.pixel_boxes[0][:2], abs=0.01)
                colour = box.get_attribute("stroke")
                phrase = page.locator(f'#output .phrase[data-entity="{i}"]')
                border = phrase.evaluate("n => getComputedStyle(n).borderBottomColor")
                assert border == _rgb(colour)
            # hovering over a phrase highlights its box, and the other way round
            page.hover('#output .phrase[data-entity="1"]')
            assert "hl" in page.locator('#overlay rect.box[data-entity="1"]').get_attribute("class")
            assert "hl" not in page.locator('#overlay rect.box[data-entity="0"]').get_attribute("class")
            page.mouse.move(5, 5)
            page.locator('#overlay rect.box[data-entity="2"]').hover()
            assert "hl" in page.locator('#output .phrase[data-entity="2"]').get_attribute("class")
            page.screenshot(path=str(SCREENSHOT.with_name("kosmos2-demo-ground.png")), full_page=True)
            # the result can be downloaded as JSON
            with page.expect_download() as download:
                page.click("#download")
            saved = Path(download.value.path()).read_text()
            assert '"caption": ' + repr(expected.caption).replace("'", '"') in saved
            # 2. draw a box around the orange circle and ask for its description
            page.select_option("#task", "describe")
            stage = page.locator("#overlay").bounding_box()
            scale = stage["width"] / image.width
            x1, y1, x2, y2 = 153, 110, 251, 217
            page.mouse.move(stage["x"] + x1 * scale, stage["y"] + y1 * scale)
            page.mouse.down()
            page.mouse.move(stage["x"] + (x1 + x2) / 2 * scale, stage["y"] + (y1 + y2) / 2 * scale, steps=4)
            page.mouse.move(stage["x"] + x2 * scale, stage["y"] + y2 * scale, steps=4)
            page.mouse.up()
            assert page.locator("#overlay rect.user-box").count() == 1
            page.click("#run")
            page.wait_for_function(
                "document.getElementById('status').textContent.startsWith('Done')", timeout=30000
            )
            assert page.inner_text("#output").endswith("the large orange circle")
            page.screenshot(path=str(SCREENSHOT), full_page=True)
            assert not errors, errors
            browser.close()
    finally:
        server.stop()
    assert SCREENSHOT.stat().st_size > 10_000


def _rgb(hex_colour: str) -> str:
    h = hex_colour.lstrip("#")
    return "rgb({}, {}, {})".format(*(int(h[i : i + 2], 16) for i in (0, 2, 4)))
