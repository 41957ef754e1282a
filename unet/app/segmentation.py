"""From a photo and the head-oval placement to DUST_FILL masks; from a list of edits to the downloads.

The page shows the photo under a square *frame* that stands for the model's input (a training
image is a square of ``image_size`` pixels) and a fixed *head oval* inside it. The oval has the
size and place that a head typically has in a training image (`HEAD_OVAL`), so once the user has
moved and zoomed the photo until the head fills the oval, the frame is a square `Crop` of the
photo in which the person appears at the scale the network was trained at. That square is resized
to ``image_size`` (the parts beyond the photo padded with the photo's backdrop colour, as
`unet.data` letterboxes), the probabilities of the part that covers the photo are resized back to
photo pixels (at most `RESULT_MAX_SIDE` on a side) and post-processed there.

A *region* of the page is one DUST_FILL mask: a SEGMENT region grown over the leftover pixels
(ids ``0 .. M-1``) or the mask of the pixels promoted to a label (id ``M + label``). Relabelling a
region changes exactly its pixels; its alternatives are the other labels ranked by its pooled
DUST_FILL statistics (for a promoted mask, whose statistics are one-hot by definition, by its
pixels' pooled probabilities).
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from unet import postprocess
from unet.app.photos import BadInput, Photo
from unet.inference import predict_probabilities, resize
from unet.labels import LABELS, NUM_LABELS, palette_image

RESULT_MAX_SIDE = 1024
MAX_EDITS = 10_000
MAX_CROP_SCALE = 64  # the frame may be at most this many times the photo's longest side


@dataclass(frozen=True)
class HeadOval:
    """The head's typical box in a training image, as fractions of the image side.

    Measured on the built-in dataset (`unet.synthetic`, labels "hair", "face", "headwear"): from
    the top of the hair or headwear to the chin, the median over the rendered figures (full figures
    and close-ups, the mix the network trains on; augmentation rescales both ways around 1) is
    0.125 of the image side; the median head centre lies 0.086 of the side below the top edge and,
    across the side, in the middle (figures are placed +-15% around it); the median width, hair and
    hat brims included, is 0.115. ``tests/test_app.py`` measures it again.
    """

    centre_x: float = 0.5
    centre_y: float = 0.086
    height: float = 0.125
    width: float = 0.115

    def scaled(self, height: float) -> "HeadOval":
        """The same oval for a head of `height` (a fraction of the side), its top kept in the frame."""
        ratio = height / self.height
        centre_y = max(self.centre_y, height / 2 + 0.01)
        return HeadOval(self.centre_x, centre_y, height, self.width * ratio)


HEAD_OVAL = HeadOval()


@dataclass(frozen=True)
class Crop:
    """The frame as a square of photo pixels: top-left (x, y) and side; it may reach beyond the photo."""

    x: int
    y: int
    side: int

    @classmethod
    def from_request(cls, value, photo_size: tuple[int, int]) -> "Crop":
        """Read ``{"x": .., "y": .., "side": ..}`` (photo pixels, rounded); the square must overlap the photo."""
        if not isinstance(value, dict):
            raise BadInput('crop: expected an object {"x": number, "y": number, "side": number}')
        numbers = {}
        for key in ("x", "y", "side"):
            number = value.get(key)
            if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
                raise BadInput(f"crop.{key}: expected a finite number, got {number!r}")
            numbers[key] = round(number)
        crop = cls(**numbers)
        width, height = photo_size
        if not 1 <= crop.side <= MAX_CROP_SCALE * max(width, height):
            raise BadInput(f"crop.side: expected 1 to {MAX_CROP_SCALE * max(width, height)} pixels, got {crop.side}")
        x0, y0, x1, y1 = crop.box(width, height)
        if x1 <= x0 or y1 <= y0:
            raise BadInput("the frame does not cover the photo: move the photo into the frame")
        return crop

    def box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1): the part of a width x height photo inside the frame."""
        return (max(self.x, 0), max(self.y, 0), min(self.x + self.side, width), min(self.y + self.side, height))


def model_input(photo: Photo, crop: Crop, size: int) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """The frame as a (1, 3, size, size) batch, and where the photo lies in it: (top, left, bottom, right)."""
    x0, y0, x1, y1 = crop.box(*photo.size)
    scale = size / crop.side

    def place(start: int, end: int, origin: int) -> tuple[int, int]:
        low = min(max(round((start - origin) * scale), 0), size - 1)
        return low, min(max(round((end - origin) * scale), low + 1), size)

    top, bottom = place(y0, y1, crop.y)
    left, right = place(x0, x1, crop.x)
    pixels = torch.from_numpy(photo.pixels[y0:y1, x0:x1]).permute(2, 0, 1).float().div_(255)
    frame = photo.fill[:, None, None].expand(3, size, size).clone()
    frame[:, top:bottom, left:right] = resize(pixels, bottom - top, right - left).clamp_(0, 1)
    return frame[None], (top, left, bottom, right)


def result_size(height: int, width: int) -> tuple[int, int]:
    """The post-processing resolution: photo pixels, at most RESULT_MAX_SIDE on the longest side."""
    factor = min(1.0, RESULT_MAX_SIDE / max(height, width))
    return max(1, round(height * factor)), max(1, round(width * factor))


@dataclass
class Segmentation:
    """One segmentation of a frame of a photo: the DUST_FILL masks and what the page needs about them."""

    photo: Photo
    crop: Crop
    box: tuple[int, int, int, int]  # the photo pixels it covers, (x0, y0, x1, y1)
    masks: np.ndarray  # int32 (h, w): every pixel's DUST_FILL mask id
    mask_labels: np.ndarray  # int64 (M + L,): DUST_FILL's label of each mask
    shares: np.ndarray  # float64 (M + L, L): each mask's pooled label distribution (rows sum to 1 or are 0)
    pixel_counts: np.ndarray  # int64 (M + L,)
    num_segment_regions: int  # M
    timings_ms: dict

    def labels(self, mask_labels: np.ndarray | None = None) -> np.ndarray:
        """The label map (h, w) uint8, with DUST_FILL's labels or `mask_labels`."""
        mask_labels = self.mask_labels if mask_labels is None else mask_labels
        return mask_labels.astype(np.uint8)[self.masks]

    def region_ids(self) -> np.ndarray:
        return np.flatnonzero(self.pixel_counts)

    def describe(self) -> dict:
        """What the page needs, as JSON: geometry, and per region its label, confidence and alternatives."""
        height, width = self.masks.shape
        ids = self.region_ids()
        labels = self.mask_labels[ids]
        # whole arrays to Python lists at once: per-element conversion took ~100 ms for ~1,400 regions
        columns = zip(ids.tolist(), labels.tolist(), self.shares[ids, labels].round(4).tolist(),
                      self.pixel_counts[ids].tolist(), self.shares[ids].round(4).tolist(),
                      (ids >= self.num_segment_regions).tolist())
        regions = [{"id": region, "label": label, "confidence": confidence, "pixels": pixels, "shares": shares,
                    "promoted": promoted}
                   for region, label, confidence, pixels, shares, promoted in columns]
        return {
            "width": width, "height": height, "box": list(self.box),
            "crop": {"x": self.crop.x, "y": self.crop.y, "side": self.crop.side},
            "num_segment_regions": self.num_segment_regions, "regions": regions, "timings_ms": self.timings_ms,
        }

    def apply_edits(self, edits) -> tuple[np.ndarray, list[dict]]:
        """Apply ``[{"region": id, "label": id}, ...]`` in order: (mask labels, the edits with from/to)."""
        if not isinstance(edits, list):
            raise BadInput('edits: expected a list of {"region": id, "label": id}')
        if len(edits) > MAX_EDITS:
            raise BadInput(f"edits: at most {MAX_EDITS} edits, got {len(edits)}")
        mask_labels = self.mask_labels.copy()
        applied = []
        for number, edit in enumerate(edits):
            region, label = self._checked_edit(number, edit)
            applied.append({"region": region, "from": int(mask_labels[region]), "to": label,
                            "from_name": LABELS[mask_labels[region]], "to_name": LABELS[label]})
            mask_labels[region] = label
        return mask_labels, applied

    def _checked_edit(self, number: int, edit) -> tuple[int, int]:
        if not isinstance(edit, dict):
            raise BadInput(f'edits[{number}]: expected {{"region": id, "label": id}}, got {edit!r}')
        region, label = edit.get("region"), edit.get("label")
        if isinstance(region, bool) or not isinstance(region, int):
            raise BadInput(f"edits[{number}].region: expected a region id (an integer), got {region!r}")
        if not 0 <= region < len(self.pixel_counts) or self.pixel_counts[region] == 0:
            raise BadInput(f"edits[{number}]: unknown region id {region}; this segmentation has "
                           f"{len(self.region_ids())} regions (ids {_id_ranges(self.region_ids())})")
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < NUM_LABELS:
            raise BadInput(f"edits[{number}].label: expected a label id 0 to {NUM_LABELS - 1}, got {label!r}")
        return region, label

    def label_png(self, mask_labels: np.ndarray) -> bytes:
        """The label map as a palette PNG: pixel value = label id (`unet.labels`), colours `PALETTE`."""
        return _png(palette_image(self.labels(mask_labels)))

    def region_png(self) -> bytes:
        """The mask ids as a 16-bit greyscale PNG: pixel value = region id (as in the edits)."""
        if len(self.pixel_counts) > 2**16:
            raise BadInput(f"{len(self.pixel_counts)} region ids do not fit in a 16-bit PNG")
        return _png(Image.fromarray(self.masks.astype(np.uint16)))

    def edits_document(self, applied: list[dict], checkpoint: str) -> dict:
        """The JSON download: where the result lies in the photo, and the edits in order."""
        height, width = self.masks.shape
        return {
            "photo": self.photo.describe(), "checkpoint": checkpoint,
            "crop": {"x": self.crop.x, "y": self.crop.y, "side": self.crop.side},
            "box": {"x0": self.box[0], "y0": self.box[1], "x1": self.box[2], "y1": self.box[3]},
            "label_map_size": {"width": width, "height": height},
            "num_segment_regions": self.num_segment_regions,
            "labels": list(LABELS),
            "edits": applied,
        }


def segment_photo(model, photo: Photo, crop: Crop, device: torch.device) -> Segmentation:
    """Run the network on the frame and the paper's post-processing on its photo part.

    Under `torch.inference_mode` (no autograd bookkeeping); each step's time goes to ``timings_ms``."""
    timer = _StepTimer()
    with torch.inference_mode():
        x0, y0, x1, y1 = box = crop.box(*photo.size)
        image, (top, left, bottom, right) = model_input(photo, crop, model.config.image_size)
        timer.lap("prepare")
        probs, boundary = predict_probabilities(model, image.to(device))
        timer.lap("network")
        height, width = result_size(y1 - y0, x1 - x0)
        probs = resize(probs[0, :, top:bottom, left:right], height, width).cpu()
        boundary = resize(boundary[0, :, top:bottom, left:right], height, width).cpu()
        timer.lap("resize")
        _, masks, statistics = postprocess.postprocess(probs, boundary, return_masks=True)
        timer.lap("postprocess")
        masks, statistics = masks.numpy(), statistics.numpy()
        num_segment_regions = len(statistics) - NUM_LABELS
        pixel_counts = np.bincount(masks.ravel(), minlength=len(statistics))
        shares = _pooled_shares(masks, statistics, probs.numpy(), num_segment_regions)
        timer.lap("shares")
    return Segmentation(
        photo=photo, crop=crop, box=box, masks=masks, mask_labels=statistics.argmax(1), shares=shares,
        pixel_counts=pixel_counts, num_segment_regions=num_segment_regions, timings_ms=timer.laps_ms,
    )


class _StepTimer:
    """Milliseconds of consecutive steps: ``lap(name)`` ends the step begun at the previous lap."""

    def __init__(self):
        self.laps_ms, self.last = {}, time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps_ms[name] = round(1000 * (now - self.last), 1)
        self.last = now


def _pooled_shares(masks: np.ndarray, statistics: np.ndarray, probs: np.ndarray, num_regions: int) -> np.ndarray:
    """Each mask's label distribution: its normalized statistics; for promoted masks, whose
    statistics are one-hot, the normalized sum of their pixels' probabilities instead."""
    totals = statistics.sum(1, keepdims=True)
    shares = np.divide(statistics, totals, out=np.zeros_like(statistics), where=totals > 0)
    promoted = masks >= num_regions
    if promoted.any():
        ids = masks[promoted]
        sums = np.stack([np.bincount(ids, weights=p[promoted], minlength=len(statistics)) for p in probs], axis=1)
        rows = np.unique(ids)
        shares[rows] = sums[rows] / sums[rows].sum(1, keepdims=True)
    return shares


def _id_ranges(ids: np.ndarray) -> str:
    """'0-11, 30' for [0, 1, ..., 11, 30]."""
    parts, start = [], None
    for i, value in enumerate(ids):
        start = value if start is None else start
        if i + 1 == len(ids) or ids[i + 1] != value + 1:
            parts.append(f"{start}" if start == value else f"{start}-{value}")
            start = None
    return ", ".join(parts)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()

