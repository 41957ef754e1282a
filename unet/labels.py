"""The 24 labels of DeepFashion-MultiModal and their colour palette: the one place they live."""

import numpy as np
from PIL import Image

LABELS: tuple[str, ...] = (
    "background",
    "top",
    "outer",
    "skirt",
    "dress",
    "pants",
    "leggings",
    "headwear",
    "eyeglass",
    "neckwear",
    "belt",
    "footwear",
    "bag",
    "hair",
    "face",
    "skin",
    "ring",
    "wrist wearing",
    "socks",
    "gloves",
    "necklace",
    "rompers",
    "earrings",
    "tie",
)
NUM_LABELS = len(LABELS)
LABEL_INDEX = {name: i for i, name in enumerate(LABELS)}

# One RGB colour per label, chosen to be distinct on screen; background stays black.
PALETTE = np.array(
    [
        (0, 0, 0),
        (255, 85, 0),
        (0, 119, 221),
        (255, 170, 255),
        (220, 20, 60),
        (0, 85, 85),
        (85, 51, 0),
        (255, 255, 0),
        (0, 255, 255),
        (170, 255, 85),
        (128, 0, 128),
        (85, 85, 255),
        (0, 128, 0),
        (139, 69, 19),
        (255, 218, 185),
        (245, 222, 179),
        (255, 0, 0),
        (255, 215, 0),
        (0, 0, 255),
        (128, 128, 128),
        (192, 192, 192),
        (255, 105, 180),
        (0, 255, 0),
        (51, 170, 221),
    ],
    dtype=np.uint8,
)
assert PALETTE.shape == (NUM_LABELS, 3)


def palette_image(labels: np.ndarray) -> Image.Image:
    """A (H, W) map of label ids as a palette image: pixel value = label id, colours `PALETTE`."""
    image = Image.fromarray(labels.astype(np.uint8, copy=False), mode="P")
    image.putpalette(PALETTE.reshape(-1).tolist())
    return image
