"""Driving unet.app in headless Chromium: shared by tests/test_app_browser.py and benchmarks/bench_app.py.

`python -m unet.app` runs as a process with a real (randomly initialised) checkpoint; its page is
driven through Playwright. Chromium is Debian's (``apt-get install chromium``; `.ci/run` installs
it); ``UNET_APP_CHROMIUM`` names another binary.
"""

import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from unet.checkpoint import save_checkpoint
from unet.model import build_model
from unet.synthetic import render_figure

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path(os.environ.get("UNET_APP_CHROMIUM", "/usr/bin/chromium"))
# Headless, sandbox off (CI runs as root), and nothing that reaches for the network.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1100, "height": 780}
START_TIMEOUT_S = 120


def missing_browser() -> str | None:
    """Why the page cannot be driven here (a missing package or Chromium), or None."""
    try:
        import playwright.sync_api  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        return f"{error.name} is not installed: pip install -e '.[test]'"
    if not CHROMIUM.is_file():
        return f"no Chromium at {CHROMIUM}: apt-get install chromium (or set UNET_APP_CHROMIUM)"
    return None


def write_checkpoint(path: Path, preset: str, image_size: int) -> Path:
    """A randomly initialised (seeded) model of `preset` at `image_size`, saved as unet.train does."""
    torch.manual_seed(0)
    model = build_model(preset, image_size=image_size)
    return save_checkpoint({"model": model.state_dict(), "model_config": model.config.to_dict()}, path)


def figure_photo(path: Path, width: int = 1024, height: int = 768, seed: int = 11) -> Path:
    """A synthetic figure on a 1024x768 landscape photo, its backdrop extended sideways."""
    pixels, _ = render_figure(np.random.default_rng(seed), height)
    canvas = np.empty((height, width, 3), np.uint8)
    canvas[:] = pixels[0, 0]
    canvas[:, 140:140 + height] = pixels
    Image.fromarray(canvas).save(path, quality=92)
    return path


class Server:
    def __init__(self, url: str, log: Path):
        self.url, self.log = url, log

    def log_text(self) -> str:
        return self.log.read_text()


@contextmanager
def running_app(checkpoint: Path, folder: Path, *options: str):
    """`python -m unet.app` on a free port; yields once it printed its address; fails if it died meanwhile."""
    log = folder / "server.log"
    with open(log, "w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "unet.app", "--checkpoint", str(checkpoint), "--port", "0", *options],
            cwd=REPO, stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (match := re.search(r"at (http://\S+/)", log.read_text())):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"unet.app did not start:\n{log.read_text()}")
            time.sleep(0.2)
        yield Server(match.group(1), log)
        if process.poll() is not None:
            raise RuntimeError(f"the server died:\n{log.read_text()}")
    finally:
        process.terminate()
        process.wait(timeout=30)


def open_photo(page, server: Server, photo: Path) -> None:
    page.goto(server.url)
    page.wait_for_function("document.getElementById('model-info').textContent !== ''")
    page.set_input_files("#file", str(photo))
    page.wait_for_function("window.unetApp.mode() === 'place'")


def segment(page) -> dict:
    """Press Segment and wait for the overlay; the page's result."""
    count = page.evaluate("unetApp.timings().segment.length")
    page.click("#segment")
    page.wait_for_function(f"unetApp.mode() === 'result' && unetApp.timings().segment.length > {count}",
                           timeout=60_000)
    return page.evaluate("unetApp.result()")


def stage_point(page, result: dict, column: int, row: int) -> tuple[float, float]:
    """Page coordinates of the centre of result pixel (column, row)."""
    view = page.evaluate("unetApp.view()")
    box = page.locator("#stage").bounding_box()
    x0, y0, x1, y1 = result["box"]
    photo_x = x0 + (column + 0.5) * (x1 - x0) / result["width"]
    photo_y = y0 + (row + 0.5) * (y1 - y0) / result["height"]
    return box["x"] + photo_x * view["zoom"] + view["ox"], box["y"] + photo_y * view["zoom"] + view["oy"]
