"""The web app: a Starlette application serving the page (`static/`) and a small JSON API.

    POST /api/images                         the photo as the raw request body (X-Filename: its name)
    GET  /api/images/{id}                    the decoded photo as the page shows it (JPEG)
    POST /api/segment                        {"image": id, "crop": {"x", "y", "side"}} -> regions (JSON)
    GET  /api/segmentations/{id}/masks       the mask id of every pixel, int32 little-endian
    POST /api/segmentations/{id}/labels.png  {"edits": [...]} -> the corrected label map (palette PNG)
    GET  /api/segmentations/{id}/regions.png the region map (16-bit PNG of mask ids)
    POST /api/segmentations/{id}/edits.json  {"edits": [...]} -> the edits, checked, with the geometry
    GET  /api/config                         labels, palette, head oval, model input size, limits

Relabelling happens in the page (no new inference); the server checks the edits whenever it
turns them into a download. Bad input gets a 4xx answer ``{"error": message}`` and a warning in
the log; an unexpected failure a 500 with a short message (the traceback goes to the log only).
One segmentation runs at a time: a second request meanwhile gets 409 (the page says to wait).
Photos and segmentations are kept in memory, the most recent `KEEP_PHOTOS` / `KEEP_SEGMENTATIONS`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from urllib.parse import unquote

import anyio.to_thread
import torch
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from unet.app.photos import ACCEPTED_FORMATS, MAX_PIXELS, MAX_SIDE, MAX_UPLOAD_BYTES, BadInput, Photo, decode_photo
from unet.app.segmentation import HEAD_OVAL, RESULT_MAX_SIDE, Crop, HeadOval, Segmentation, segment_photo
from unet.labels import LABELS, PALETTE

log = logging.getLogger("unet.app")

STATIC = Path(__file__).parent / "static"
KEEP_PHOTOS = 8
KEEP_SEGMENTATIONS = 16
MAX_JSON_BYTES = 2 * 2**20


class Recent(OrderedDict):
    """The `limit` most recently added items; lookups of unknown ids say what is missing."""

    def __init__(self, limit: int, what: str):
        super().__init__()
        self.limit, self.what = limit, what

    def add(self, item) -> str:
        key = uuid.uuid4().hex
        self[key] = item
        while len(self) > self.limit:
            self.popitem(last=False)
        return key

    def find(self, key: str):
        if key not in self:
            raise HTTPException(404, f"unknown {self.what} {key!r}: the server keeps the last {self.limit} "
                                     f"(or it was restarted); upload the photo and segment it again")
        return self[key]


class SegmentationApp:
    """The state behind the routes: the model, recent photos and segmentations, the busy flag."""

    def __init__(self, model, device: torch.device, checkpoint: str, head_oval: HeadOval = HEAD_OVAL):
        self.model, self.device, self.checkpoint, self.head_oval = model, torch.device(device), checkpoint, head_oval
        self.photos = Recent(KEEP_PHOTOS, "photo")
        self.segmentations = Recent(KEEP_SEGMENTATIONS, "segmentation")
        self.busy = threading.Lock()
        self.busy_since = 0.0

    def routes(self) -> list:
        return [
            Route("/", self.index),
            Route("/api/config", self.config),
            Route("/api/images", self.upload, methods=["POST"]),
            Route("/api/images/{id}", self.photo, methods=["GET"]),
            Route("/api/segment", self.segment, methods=["POST"]),
            Route("/api/segmentations/{id}/masks", self.masks),
            Route("/api/segmentations/{id}/labels.png", self.label_map, methods=["POST"]),
            Route("/api/segmentations/{id}/regions.png", self.region_map),
            Route("/api/segmentations/{id}/edits.json", self.edits, methods=["POST"]),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ]

    async def index(self, request: Request):
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    async def config(self, request: Request):
        oval = self.head_oval
        return JSONResponse({
            "labels": list(LABELS), "palette": PALETTE.tolist(), "model_input": self.model.config.image_size,
            "head_oval": {"centre_x": oval.centre_x, "centre_y": oval.centre_y, "width": oval.width,
                          "height": oval.height},
            "checkpoint": Path(self.checkpoint).name, "device": str(self.device),
            "limits": {"upload_bytes": MAX_UPLOAD_BYTES, "pixels": MAX_PIXELS, "max_side": MAX_SIDE,
                       "result_max_side": RESULT_MAX_SIDE, "formats": list(ACCEPTED_FORMATS)},
        })

    async def upload(self, request: Request):
        name = unquote(request.headers.get("x-filename", "")) or "upload"
        data = await _read_body(request, MAX_UPLOAD_BYTES, f"{name}: larger than the {MAX_UPLOAD_BYTES} bytes accepted")
        photo: Photo = await anyio.to_thread.run_sync(decode_photo, data, name)
        key = self.photos.add(photo)
        width, height = photo.size
        log.info("photo %s: %s, %dx%d%s", key, name, width, height,
                 f" (downscaled from {photo.original_size[0]}x{photo.original_size[1]})" if photo.downscaled else "")
        return JSONResponse({"id": key, **photo.describe()})

    async def photo(self, request: Request):
        photo = self.photos.find(request.path_params["id"])
        return Response(photo.display_jpeg, media_type="image/jpeg")

    async def segment(self, request: Request):
        body = await _read_json(request)
        if not isinstance(body, dict) or not isinstance(body.get("image"), str):
            raise BadInput('expected {"image": photo id, "crop": {"x", "y", "side"}}')
        photo = self.photos.find(body["image"])
        crop = Crop.from_request(body.get("crop"), photo.size)
        if not self.busy.acquire(blocking=False):
            running = time.monotonic() - self.busy_since
            raise HTTPException(409, f"busy: another segmentation has been running for {running:.1f} s; "
                                     "press Segment again when it has finished")
        try:
            self.busy_since = time.monotonic()
            segmentation = await anyio.to_thread.run_sync(segment_photo, self.model, photo, crop, self.device)
        finally:
            self.busy.release()
        key = self.segmentations.add(segmentation)
        log.info("segmentation %s of %s: crop %s, %d regions, %s ms", key, photo.name, crop,
                 len(segmentation.region_ids()), segmentation.timings_ms)
        return JSONResponse({"id": key, **segmentation.describe()})

    async def masks(self, request: Request):
        segmentation: Segmentation = self.segmentations.find(request.path_params["id"])
        height, width = segmentation.masks.shape
        data = segmentation.masks.astype("<i4").tobytes()
        return Response(data, media_type="application/octet-stream",
                        headers={"X-Width": str(width), "X-Height": str(height)})

    async def label_map(self, request: Request):
        segmentation, mask_labels, _ = await self._edited(request)
        return Response(segmentation.label_png(mask_labels), media_type="image/png")

    async def region_map(self, request: Request):
        segmentation = self.segmentations.find(request.path_params["id"])
        return Response(segmentation.region_png(), media_type="image/png")

    async def edits(self, request: Request):
        segmentation, _, applied = await self._edited(request)
        return JSONResponse(segmentation.edits_document(applied, Path(self.checkpoint).name))

    async def _edited(self, request: Request):
        segmentation: Segmentation = self.segmentations.find(request.path_params["id"])
        body = await _read_json(request)
        if not isinstance(body, dict):
            raise BadInput('expected {"edits": [{"region": id, "label": id}, ...]}')
        mask_labels, applied = segmentation.apply_edits(body.get("edits", []))
        return segmentation, mask_labels, applied


async def _read_body(request: Request, limit: int, too_large: str) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, too_large)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, too_large)
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_json(request: Request):
    data = await _read_body(request, MAX_JSON_BYTES, f"request body larger than {MAX_JSON_BYTES} bytes")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as error:
        raise BadInput(f"the request body is not JSON ({error})") from None


async def _bad_input(request: Request, error: BadInput):
    log.warning("%s %s: %s", request.method, request.url.path, error)
    return JSONResponse({"error": str(error)}, status_code=400)


async def _http_error(request: Request, error: HTTPException):
    log.warning("%s %s: %d %s", request.method, request.url.path, error.status_code, error.detail)
    return JSONResponse({"error": error.detail}, status_code=error.status_code)


async def _server_error(request: Request, error: Exception):
    log.error("%s %s failed", request.method, request.url.path, exc_info=error)
    message = f"internal error ({type(error).__name__}); the server log has the details"
    return JSONResponse({"error": message}, status_code=500)


def create_app(model, device: torch.device | str, checkpoint: str, head_oval: HeadOval = HEAD_OVAL) -> Starlette:
    """The ASGI application serving `model` (in eval mode) on `device`."""
    state = SegmentationApp(model, device, checkpoint, head_oval)
    handlers = {BadInput: _bad_input, HTTPException: _http_error, Exception: _server_error}
    app = Starlette(routes=state.routes(), exception_handlers=handlers)
    app.state.segmentation_app = state
    return app
