"""Uploaded photos: decoded within stated limits, upright, RGB, ready for the model and the page.

Limits (each refusal is a `BadInput` whose message names the problem):

* at most `MAX_UPLOAD_BYTES` bytes, and not empty;
* JPEG, PNG or WebP (`ACCEPTED_FORMATS`), identified from the bytes, not from the name;
* at most `MAX_PIXELS` pixels as declared in the header (a 10,000 x 10,000 photo passes; PIL's own
  decompression-bomb warning is replaced by this limit);
* larger photos are downscaled to `MAX_SIDE` pixels on the longest side: JPEGs decode straight at
  a reduced scale (PIL's ``draft``: the DCT scales 1/2, 1/4, 1/8), the rest after a full decode.

The EXIF orientation is applied and transparency composited on white, so the stored pixels are
what a browser shows.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from unet.data import border_colour

MAX_UPLOAD_BYTES = 100 * 2**20
MAX_PIXELS = 150_000_000
MAX_SIDE = 4096
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP")
DISPLAY_QUALITY = 92  # the JPEG the page shows


class BadInput(ValueError):
    """A problem with what the user sent; its message is shown to them as it is."""


@dataclass
class Photo:
    """A decoded upload: RGB pixels (H, W, 3) uint8 at most `MAX_SIDE` on a side."""

    name: str
    pixels: np.ndarray
    original_size: tuple[int, int]  # (width, height) as uploaded
    display_jpeg: bytes  # the pixels as the page shows them
    fill: torch.Tensor  # (3,) in [0, 1]: the backdrop colour that pads the frame beyond the photo

    @property
    def size(self) -> tuple[int, int]:
        return self.pixels.shape[1], self.pixels.shape[0]

    @property
    def downscaled(self) -> bool:
        return self.size != self.original_size

    def describe(self) -> dict:
        width, height = self.size
        return {"name": self.name, "width": width, "height": height, "original_width": self.original_size[0],
                "original_height": self.original_size[1], "downscaled": self.downscaled, "max_side": MAX_SIDE}


def decode_photo(data: bytes, name: str) -> Photo:
    """Decode an upload within the limits above; `BadInput` says what is wrong with it."""
    if not data:
        raise BadInput(f"{name}: the file is empty")
    if len(data) > MAX_UPLOAD_BYTES:
        raise BadInput(f"{name}: {len(data)} bytes, more than the {MAX_UPLOAD_BYTES} accepted")
    with warnings.catch_warnings():
        # MAX_PIXELS below is the limit; PIL's warning threshold (89 MP) is lower.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as image:
                original_size = image.size
                _check_pixels(name, *original_size)
                image = _upright_rgb(_downscaled(image))
        except BadInput:
            raise
        except Image.DecompressionBombError as error:  # over twice PIL's limit: refused while opening
            raise _too_large(name, str(error)) from None
        except Image.UnidentifiedImageError:
            raise BadInput(f"{name}: not a JPEG, PNG or WebP image") from None
        except (OSError, SyntaxError, ValueError, EOFError) as error:  # what PIL raises for damaged data
            raise BadInput(f"{name}: cannot decode the image, the file may be truncated or damaged ({error})") from None
    pixels = np.array(image)  # writable: torch.from_numpy shares it without a warning
    display = io.BytesIO()
    image.save(display, format="JPEG", quality=DISPLAY_QUALITY)
    # The median of the uint8 edge pixels, then to [0, 1]: the whole photo is never made float.
    fill = border_colour(torch.from_numpy(pixels).permute(2, 0, 1)).float().div(255)
    return Photo(name, pixels, original_size, display.getvalue(), fill)


def _too_large(name: str, detail: str) -> BadInput:
    return BadInput(f"{name}: too large, at most {MAX_PIXELS} pixels are accepted ({detail})")


def _check_pixels(name: str, width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise _too_large(name, f"{width}x{height} is {width * height} pixels")


def _downscaled(image: Image.Image) -> Image.Image:
    """At most MAX_SIDE on the longest side; a JPEG decodes at the smallest DCT scale that stays above it."""
    if max(image.size) <= MAX_SIDE:
        image.load()  # decode now, inside the caller's error handling
        return image
    # reducing_gap=1: draft() may reduce as long as the result stays at least MAX_SIDE wide.
    image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.BICUBIC, reducing_gap=1.0)
    return image


def _upright_rgb(image: Image.Image) -> Image.Image:
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")
