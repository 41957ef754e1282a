"""unet.app in a real browser: `python -m unet.app` started as a process with a real (small,
randomly initialised) checkpoint, its page driven in headless Chromium through Playwright
(tests/app_browser.py). Without Chromium or Playwright these tests skip, except under CI (CI=true),
where they fail. Screenshots go to tests/artifacts/ (git-ignored). The app's speed is measured by
benchmarks/bench_app.py.
"""

import base64
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from app_browser import (CHROMIUM, CHROMIUM_FLAGS, VIEWPORT, figure_photo, missing_browser, open_photo, running_app,
                         segment, stage_point, write_checkpoint)

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


@pytest.fixture(scope="module")
def playwright_browser():
    reason = missing_browser()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the browser tests must run under CI: {reason}")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory, playwright_browser):
    folder = tmp_path_factory.mktemp("tiny_app")
    with running_app(write_checkpoint(folder / "tiny.pt", "tiny", 64), folder) as server:
        yield server


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    return figure_photo(tmp_path_factory.mktemp("photos") / "figure.jpg")


@pytest.fixture()
def page(playwright_browser):
    context = playwright_browser.new_context(viewport=VIEWPORT, accept_downloads=True)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert errors == [], errors  # no uncaught exception in the page


def screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / name)


def download(page, button: str):
    with page.expect_download() as event:
        page.click(button)
    path = event.value.path()
    if button == "#download-edits":
        return json.loads(Path(path).read_text())
    with Image.open(path) as image:
        return np.asarray(image).copy(), image.mode


def deepest_pixel(masks: np.ndarray, region: int) -> tuple[int, int, float]:
    """(column, row, distance to the region's edge) of the region's most interior pixel."""
    distance = ndimage.distance_transform_edt(np.pad(masks == region, 1))[1:-1, 1:-1]
    row, column = np.unravel_index(distance.argmax(), distance.shape)
    return int(column), int(row), float(distance[row, column])


def test_place_segment_press_relabel_and_download(page, tiny_server, photo):
    open_photo(page, tiny_server, photo)
    config = page.evaluate("fetch('api/config').then(r => r.json())")
    side = page.evaluate("unetApp.view().side")
    oval_height = 2 * float(page.get_attribute("#oval-shape", "ry"))
    assert oval_height / side == pytest.approx(config["head_oval"]["height"], rel=1e-3)

    # zoom with the mouse wheel: the photo point under the pointer stays put
    stage = page.locator("#stage").bounding_box()
    pointer = (round(stage["x"] + 0.4 * side), round(stage["y"] + 0.3 * side))  # mouse events have whole pixels
    before = page.evaluate("unetApp.view()")
    page.mouse.move(*pointer)
    page.mouse.wheel(0, -300)
    page.wait_for_function(f"unetApp.view().zoom > {before['zoom']}")
    after = page.evaluate("unetApp.view()")
    for axis, offset in ((0, "ox"), (1, "oy")):
        local = pointer[axis] - (stage["x"], stage["y"])[axis]
        assert (local - after[offset]) / after["zoom"] == pytest.approx((local - before[offset]) / before["zoom"])

    # drag: the photo follows the pointer exactly
    page.mouse.move(stage["x"] + 200, stage["y"] + 200)
    page.mouse.down()
    page.mouse.move(stage["x"] + 230, stage["y"] + 150, steps=6)
    page.mouse.up()
    dragged = page.evaluate("unetApp.view()")
    assert (dragged["ox"] - after["ox"], dragged["oy"] - after["oy"]) == pytest.approx((30, -50))
    crop = page.evaluate("unetApp.crop()")
    screenshot(page, "1-placed.png")

    result = segment(page)
    x, y, crop_side = round(crop["x"]), round(crop["y"]), round(crop["side"])
    assert result["box"] == [max(x, 0), max(y, 0), min(x + crop_side, 1024), min(y + crop_side, 768)]
    labels_before, mode = download(page, "#download-labels")
    masks, _ = download(page, "#download-regions")
    assert mode == "P" and labels_before.shape == masks.shape == (result["height"], result["width"])
    assert np.array_equal(labels_before, np.array(result["labelOf"])[masks])  # the page shows the server's map

    # the most interior pixel of the largest regions: a press there hits the region whatever the rounding
    regions, counts = np.unique(masks, return_counts=True)
    column, row, depth, region = max(deepest_pixel(masks, r) + (int(r),) for r in regions[np.argsort(counts)[-5:]])
    assert depth >= 2
    point = stage_point(page, result, column, row)
    page.mouse.move(*point)
    tooltip = page.locator("#tooltip")
    tooltip.wait_for(state="visible")
    old_label = result["labelOf"][region]
    assert tooltip.get_attribute("data-region") == str(region)
    assert re.search(rf"{re.escape(config['labels'][old_label])} \d+%", tooltip.inner_text())
    screenshot(page, "2-hover.png")

    page.mouse.click(*point)
    page.locator("#picker").wait_for(state="visible")
    assert page.inner_text("#picker-title").startswith(f"Region {region} is {config['labels'][old_label]}")
    option = page.locator("#picker-options button").first
    new_label = int(option.get_attribute("data-label"))
    assert new_label != old_label
    screenshot(page, "3-picker.png")
    option.click()
    page.locator("#picker").wait_for(state="hidden")
    page.wait_for_function("unetApp.timings().relabel.length === 1")
    assert page.locator(f"#legend li[data-label='{new_label}']").count() == 1
    screenshot(page, "4-relabelled.png")

    labels_after, _ = download(page, "#download-labels")
    assert np.array_equal(labels_after != labels_before, masks == region)
    assert (labels_after[masks == region] == new_label).all()
    edits = download(page, "#download-edits")
    assert edits["edits"] == [{"region": region, "from": old_label, "to": new_label,
                               "from_name": config["labels"][old_label], "to_name": config["labels"][new_label]}]

    page.click("#undo")
    assert np.array_equal(download(page, "#download-labels")[0], labels_before)
    page.click("#redo")
    assert np.array_equal(download(page, "#download-labels")[0], labels_after)
    assert "segmentation" in tiny_server.log_text()

    # a smaller window keeps the crop and the result; the region is still under its pixel
    page.set_viewport_size({"width": 900, "height": 640})
    page.wait_for_function(f"unetApp.view().side < {side}")
    assert page.evaluate("unetApp.crop()") == pytest.approx(crop)
    assert page.evaluate("unetApp.mode()") == "result"
    page.mouse.move(*stage_point(page, result, column, row))
    page.wait_for_function(f"document.getElementById('tooltip').dataset.region === '{region}'")


@pytest.mark.parametrize("name, data, message", [
    ("notes.txt", b"these are not pixels", "notes.txt: not a JPEG, PNG or WebP image"),
    ("empty.png", b"", "empty.png: the file is empty"),
])
def test_a_bad_upload_shows_its_message_on_the_page_and_in_the_log(page, tiny_server, name, data, message):
    page.goto(tiny_server.url)
    page.wait_for_function("document.getElementById('model-info').textContent !== ''")
    page.set_input_files("#file", files=[{"name": name, "mimeType": "application/octet-stream", "buffer": data}])
    page.wait_for_function(f"document.getElementById('message').textContent.includes({json.dumps(message)})")
    assert page.get_attribute("#message", "class") == "error"
    assert page.evaluate("unetApp.mode()") == "empty"
    assert message in tiny_server.log_text()
    screenshot(page, f"bad-upload-{name}.png")


def test_a_photo_dropped_on_the_stage_is_loaded(page, tiny_server, photo):
    page.goto(tiny_server.url)
    page.wait_for_function("document.getElementById('model-info').textContent !== ''")
    page.evaluate("""async (encoded) => {
        const bytes = Uint8Array.from(atob(encoded), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], "dropped.jpg", { type: "image/jpeg" }));
        const drop = new DragEvent("drop", { dataTransfer: transfer, bubbles: true });
        document.getElementById("stage").dispatchEvent(drop);
    }""", base64.b64encode(photo.read_bytes()).decode())
    page.wait_for_function("window.unetApp.mode() === 'place'")
    assert "dropped.jpg: 1024×768" in page.inner_text("#message")


def test_a_truncated_photo_shows_its_message_and_the_next_photo_works(page, tiny_server, photo):
    data = photo.read_bytes()
    page.goto(tiny_server.url)
    page.wait_for_function("document.getElementById('model-info').textContent !== ''")
    page.set_input_files("#file", files=[{"name": "cut.jpg", "mimeType": "image/jpeg", "buffer": data[:4000]}])
    page.wait_for_function("document.getElementById('message').textContent.includes('truncated or damaged')")
    page.set_input_files("#file", str(photo))
    page.wait_for_function("window.unetApp.mode() === 'place'")


def test_a_photo_over_the_byte_limit_shows_its_message_and_the_server_lives_on(page, tiny_server, photo, tmp_path):
    page.goto(tiny_server.url)
    page.wait_for_function("document.getElementById('model-info').textContent !== ''")
    limit = page.evaluate("fetch('api/config').then(r => r.json())")["limits"]["upload_bytes"]
    huge = tmp_path / "huge.jpg"
    with open(huge, "wb") as file:
        file.truncate(limit + 1)  # sparse: no disk, no time
    page.set_input_files("#file", str(huge))
    message = f"huge.jpg: larger than the {limit} bytes accepted"
    page.wait_for_function(f"document.getElementById('message').textContent.includes({json.dumps(message)})")
    assert page.get_attribute("#message", "class") == "error"
    assert f"413 {message}" in tiny_server.log_text()
    page.set_input_files("#file", str(photo))
    page.wait_for_function("window.unetApp.mode() === 'place'")


def test_two_finger_pinch_zooms_about_the_fingers(playwright_browser, tiny_server, photo):
    context = playwright_browser.new_context(viewport=VIEWPORT, has_touch=True)
    page = context.new_page()
    try:
        open_photo(page, tiny_server, photo)
        stage = page.locator("#stage").bounding_box()
        cdp = context.new_cdp_session(page)
        centre = (stage["x"] + 250, stage["y"] + 300)

        def touch(kind: str, spread: float):
            points = [] if kind == "touchEnd" else [
                {"x": centre[0] - spread, "y": centre[1], "id": 1}, {"x": centre[0] + spread, "y": centre[1], "id": 2}]
            cdp.send("Input.dispatchTouchEvent", {"type": kind, "touchPoints": points})

        before = page.evaluate("unetApp.view()")
        touch("touchStart", 40)
        for spread in (50, 60, 70, 80):
            touch("touchMove", spread)
        touch("touchEnd", 0)
        after = page.evaluate("unetApp.view()")
        assert after["zoom"] / before["zoom"] == pytest.approx(2.0, rel=1e-3)
        local_x = centre[0] - stage["x"]
        assert (local_x - after["ox"]) / after["zoom"] == pytest.approx((local_x - before["ox"]) / before["zoom"])
    finally:
        context.close()
