"""unet.app's speed (issue 13, item 5): the `small` preset at 256 px, a 1024x768 photo, the head oval
as the page first places it (the whole photo in the frame).

Targets on 2 CPU cores: from pressing Segment to the overlay at most 1.5 s; a relabel press under
50 ms. Two measurements:

* ``server``: the two requests the page makes (``POST /api/segment``, ``GET .../masks``) through
  Starlette's test client in this process, the segmentation in a worker thread as the server runs
  it; with `segment_photo`'s step times (``prepare`` the frame, the ``network``, ``resize`` back to
  photo pixels, ``postprocess``, the regions' pooled ``shares``) and the encoding of the answers
  (``regions_json``, ``mask_bytes``). Why a worker thread: on a busy machine a forward pass on the
  main thread with two OpenMP threads took several times longer than in a worker thread;
* ``browser``: `python -m unet.app` as a process, its page in headless Chromium (tests/app_browser.py):
  the page's own `performance.now()` marks from the Segment click to the frame that shows the
  overlay (split into the segment request, the masks request and drawing), and from a press on a
  label in the region picker to the repainted overlay (``update_ms``) and to the next frame
  (``to_frame_ms``); skipped without Chromium or Playwright.

Timing does not depend on the weights for the network, so the checkpoint defaults to a randomly
initialised (seeded) `small` model; DUST_FILL's time does depend on the probabilities (a random
network's are noisy, about 1,400 regions on this photo; a trained one's are smoother), so pass
``--checkpoint`` to time a trained one. Each figure comes with the load average, as the CPUs may be
shared. Run as a script::

    python benchmarks/bench_app.py                      # both, 5 segmentations, 10 relabels
    python benchmarks/bench_app.py --threads 1 --only server --checkpoint runs/small/best.pt

or as pytest-benchmark tests: ``pytest benchmarks/bench_app.py`` (``--benchmark-disable`` runs each
once, as a smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # this checkout's unet, and tests/app_browser.py (as under pytest)

from app_browser import (CHROMIUM, CHROMIUM_FLAGS, VIEWPORT, figure_photo, missing_browser,  # noqa: E402
                         open_photo, running_app, segment, stage_point, write_checkpoint)
from unet.checkpoint import load_model  # noqa: E402

starlette = pytest.importorskip("starlette", reason="the app's dependencies: pip install -e '.[app]'")

from starlette.testclient import TestClient  # noqa: E402

from unet.app.server import create_app  # noqa: E402

PRESET, IMAGE_SIZE = "small", 256
PHOTO_WIDTH, PHOTO_HEIGHT = 1024, 768


def fitted_crop(width: int, height: int) -> dict:
    """The frame as the page first places a photo: the whole photo, centred (app.js `fitPhoto`)."""
    side = max(width, height)
    return {"x": (width - side) / 2, "y": (height - side) / 2, "side": side}


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def summary(milliseconds: list[float]) -> dict:
    return {"median_ms": round(statistics.median(milliseconds), 1), "min_ms": round(min(milliseconds), 1),
            "max_ms": round(max(milliseconds), 1), "n": len(milliseconds)}


def encoding_ms(segmentation) -> dict[str, float]:
    """What the server adds after `segment_photo`: the regions' JSON and the mask bytes (ms)."""
    started = time.perf_counter()
    json.dumps(segmentation.describe())
    encoded = time.perf_counter()
    segmentation.masks.astype("<i4").tobytes()
    return {"regions_json": 1000 * (encoded - started), "mask_bytes": 1000 * (time.perf_counter() - encoded)}


def measure_server(checkpoint: Path, photo_path: Path, repeats: int) -> dict:
    """The page's two requests (segment, masks) through the ASGI app in this process, as the server runs
    them (the segmentation in a worker thread); with `segment_photo`'s step times and the encoding."""
    model, _ = load_model(checkpoint, torch.device("cpu"))
    app = create_app(model, "cpu", str(checkpoint))
    state = app.state.segmentation_app
    steps, requests_ms = [], []
    load_before = load_average()
    with TestClient(app) as client:
        described = client.post("/api/images", content=photo_path.read_bytes(),
                                headers={"X-Filename": photo_path.name}).json()
        crop = fitted_crop(described["width"], described["height"])
        for count in range(repeats + 1):  # the first one warms up
            started = time.perf_counter()
            response = client.post("/api/segment", json={"image": described["id"], "crop": crop})
            response.raise_for_status()
            client.get(f"/api/segmentations/{response.json()['id']}/masks").raise_for_status()
            if count > 0:
                requests_ms.append(1000 * (time.perf_counter() - started))
                segmentation = state.segmentations.find(response.json()["id"])
                steps.append({**segmentation.timings_ms, **encoding_ms(segmentation)})
    result = {name: summary([step[name] for step in steps]) for name in steps[0]}
    result["segment_and_masks_requests"] = summary(requests_ms)
    result["regions"] = len(segmentation.region_ids())
    result["json_bytes"] = len(response.content)
    result["load_average"] = [load_before, load_average()]
    return result


def measure_browser(checkpoint: Path, photo_path: Path, repeats: int, relabels: int, folder: Path,
                    threads: int | None = None, window: dict = VIEWPORT, pixel_ratio: float = 1) -> dict:
    """Segment `repeats` times and relabel `relabels` times in headless Chromium; the page's own timings."""
    from playwright.sync_api import sync_playwright

    options = () if threads is None else ("--threads", str(threads))
    with running_app(checkpoint, folder, *options) as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport=window, device_scale_factor=pixel_ratio)
        open_photo(page, server, photo_path)
        load_before = load_average()
        for count in range(repeats + 1):  # the first one warms the page and the server up
            result = segment(page)
            if count < repeats:
                page.click("#adjust")  # back to placing, for the next press of Segment
        column, row = result["width"] // 2, result["height"] // 2
        for count in range(1, relabels + 1):
            page.mouse.click(*stage_point(page, result, column, row))
            page.locator("#picker-options button").first.click()
            page.wait_for_function(f"unetApp.timings().relabel.length === {count}")
        timings = page.evaluate("unetApp.timings()")
        stage = page.locator("#stage").bounding_box()
        browser.close()
    segments = timings["segment"][1:]
    return {
        "segment_click_to_overlay": summary([entry["total_ms"] for entry in segments]),
        "segment_request": summary([entry["server_ms"] for entry in segments]),
        "masks_request": summary([entry["masks_ms"] for entry in segments]),
        "draw": summary([entry["draw_ms"] for entry in segments]),
        "server_steps_ms": segments[-1]["server_timings_ms"],
        "relabel_update": summary([entry["update_ms"] for entry in timings["relabel"]]),
        "relabel_to_frame": summary([entry["to_frame_ms"] for entry in timings["relabel"]]),
        "stage_css_px": stage["width"], "pixel_ratio": pixel_ratio, "result_px": [result["width"], result["height"]],
        "load_average": [load_before, load_average()],
    }


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help=f"a checkpoint to time (default: a randomly initialised `{PRESET}` at {IMAGE_SIZE} px)")
    parser.add_argument("--only", choices=("server", "browser"), default=None, help="run one of the two")
    parser.add_argument("--repeats", type=int, default=5, help="segmentations timed (after one to warm up)")
    parser.add_argument("--relabels", type=int, default=10, help="relabel presses timed")
    parser.add_argument("--window", type=int, nargs=2, metavar=("WIDTH", "HEIGHT"),
                        default=(VIEWPORT["width"], VIEWPORT["height"]),
                        help="the browser window in CSS pixels (default %(default)s); the canvases grow with it")
    parser.add_argument("--pixel-ratio", type=float, default=1.0,
                        help="device pixels per CSS pixel (default 1; 2 for a high-density screen, 4x the "
                             "pixels to paint on a relabel)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads, here and in the app (default: torch's, one per core)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_app_") as folder:
        folder = Path(folder)
        checkpoint = args.checkpoint or write_checkpoint(folder / f"{PRESET}.pt", PRESET, IMAGE_SIZE)
        photo_path = figure_photo(folder / "photo.jpg", PHOTO_WIDTH, PHOTO_HEIGHT)
        report = {"checkpoint": str(args.checkpoint or f"random-weight {PRESET} at {IMAGE_SIZE} px"),
                  "threads": torch.get_num_threads(), "cpus": os.cpu_count()}
        if args.only in (None, "server"):
            report["server"] = measure_server(checkpoint, photo_path, args.repeats)
            print(json.dumps({"server": report["server"]}, indent=1), flush=True)
        if args.only in (None, "browser"):
            reason = missing_browser()
            if reason is None:
                width, height = args.window
                report["browser"] = measure_browser(checkpoint, photo_path, args.repeats, args.relabels, folder,
                                                    args.threads, {"width": width, "height": height},
                                                    args.pixel_ratio)
            else:
                report["browser"] = f"skipped: {reason}"
            print(json.dumps({"browser": report["browser"]}, indent=1), flush=True)
    return 0


# ----------------------------------------------------------------------------- as pytest-benchmark tests


@pytest.fixture(scope="module")
def small_app(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench_app")
    return (write_checkpoint(folder / f"{PRESET}.pt", PRESET, IMAGE_SIZE),
            figure_photo(folder / "photo.jpg", PHOTO_WIDTH, PHOTO_HEIGHT), folder)


def test_segment_and_masks_requests(benchmark, small_app):
    checkpoint, photo_path, _ = small_app
    model, _ = load_model(checkpoint, torch.device("cpu"))
    with TestClient(create_app(model, "cpu", str(checkpoint))) as client:
        described = client.post("/api/images", content=photo_path.read_bytes()).json()
        crop = fitted_crop(described["width"], described["height"])

        def segment_and_fetch_masks():
            response = client.post("/api/segment", json={"image": described["id"], "crop": crop})
            response.raise_for_status()
            return response.json(), client.get(f"/api/segmentations/{response.json()['id']}/masks").content

        result, masks = benchmark.pedantic(segment_and_fetch_masks, rounds=3, warmup_rounds=1)
    assert (result["width"], result["height"]) == (PHOTO_WIDTH, PHOTO_HEIGHT)
    assert len(masks) == 4 * PHOTO_WIDTH * PHOTO_HEIGHT
    benchmark.extra_info.update(server_steps_ms=result["timings_ms"], load_average=load_average())


def test_click_to_overlay_and_relabel_in_chromium(benchmark, small_app):
    reason = missing_browser()
    if reason is not None:
        pytest.skip(reason)
    checkpoint, photo_path, folder = small_app
    report = benchmark.pedantic(measure_browser, args=(checkpoint, photo_path, 2, 3, folder), rounds=1)
    benchmark.extra_info.update(report)
    assert report["result_px"] == [PHOTO_WIDTH, PHOTO_HEIGHT] and np.isfinite(report["segment_click_to_overlay"]["median_ms"])


if __name__ == "__main__":
    sys.exit(main())
