"""Datasets: the built-in procedural set, DeepFashion-MultiModal and generic label folders.

Every dataset yields dicts {"image": float32 (3, S, S) in [0, 1], "labels": int64 (S, S) in
[0, 24), "boundary": float32 (1, S, S) in {0, 1}, "name": str}, where S is `image_size`.

Real images are letterboxed: the shorter side is padded symmetrically to a square (image with
the median colour of its border, labels with background) and the square is resized to S
(images bilinear with antialiasing, labels nearest so ids stay exact). Augmentation (horizontal
flip, scale 0.75-1.25, random crop or pad back to S) draws from torch's global generator, so
DataLoader workers get distinct streams; image and labels always get the same transform.

Files are checked at construction from headers only (readable, single-channel label map, same
size as the image); failing pairs are skipped, kept in `dataset.skipped`, and reported in one
warning. Label ids are checked when a map is decoded (at load, or at construction with
`check_labels=True`): at load an id outside the label set is an error naming the file.
"""

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from unet.checks import check_int
from unet.inference import resize
from unet.labels import LABEL_INDEX, LABELS, NUM_LABELS
from unet.postprocess import boundary_from_labels
from unet.synthetic import render_figure

__all__ = [
    "SyntheticClothing",
    "DeepFashionMultiModal",
    "LabelFolder",
    "build_datasets",
    "load_image",
    "render_figure",
    "split_indices",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
SPLITS = ("train", "val", "all")
SCALE_RANGE = (0.75, 1.25)
_LABEL_MODES = ("L", "P", "I", "I;16")
_REPORTED_NAMES = 5


def make_item(image: torch.Tensor, labels: torch.Tensor, name: str) -> dict:
    boundary = boundary_from_labels(labels).to(torch.float32)[None]
    return {"image": image.contiguous(), "labels": labels.contiguous(), "boundary": boundary, "name": name}


# ----------------------------------------------------------------------------- geometry


def resize_labels(labels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Nearest-neighbour resize sampling each output pixel's centre, so ids are copied exactly."""
    if labels.shape == (height, width):
        return labels
    # Integer arithmetic: source index floor((i + 1/2) * in / out), exact even on ties.
    rows = (2 * torch.arange(height) + 1) * labels.shape[0] // (2 * height)
    cols = (2 * torch.arange(width) + 1) * labels.shape[1] // (2 * width)
    return labels[rows][:, cols]


def border_colour(image: torch.Tensor) -> torch.Tensor:
    """Median colour of the outermost pixels: the backdrop to extend when padding."""
    border = torch.cat([image[:, 0], image[:, -1], image[:, :, 0], image[:, :, -1]], dim=1)
    return border.median(dim=1).values


def place(image, labels, size, top, left, fill):
    """Window (top, left, size, size) of the pair; parts outside it become `fill` / background."""
    out_image = fill[:, None, None].expand(3, size, size).clone()
    out_labels = torch.zeros((size, size), dtype=labels.dtype)
    height, width = labels.shape
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + size, height), min(left + size, width)
    if y1 > y0 and x1 > x0:
        out_image[:, y0 - top : y1 - top, x0 - left : x1 - left] = image[:, y0:y1, x0:x1]
        out_labels[y0 - top : y1 - top, x0 - left : x1 - left] = labels[y0:y1, x0:x1]
    return out_image, out_labels


def letterbox(image, labels):
    """Pad the shorter side symmetrically so the pair is square, keeping the aspect ratio."""
    height, width = labels.shape
    side = max(height, width)
    if height == width:
        return image, labels
    return place(image, labels, side, -((side - height) // 2), -((side - width) // 2), border_colour(image))


def _uniform_int(low: int, high: int) -> int:
    return int(torch.randint(low, high + 1, ()).item())


def fit_pair(image, labels, size: int, augment: bool):
    """Letterbox and resize to (size, size); with `augment`, flip, rescale and crop/pad at random."""
    image, labels = letterbox(image, labels)
    scaled = size
    if augment:
        if torch.rand(()) < 0.5:
            image, labels = image.flip(-1), labels.flip(-1)
        low, high = SCALE_RANGE
        scaled = max(1, round(size * (low + (high - low) * torch.rand(()).item())))
    fill = border_colour(image)
    # clamp: a rounding error may take a resized pixel just outside [0, 1]
    image, labels = resize(image, scaled, scaled).clamp(0, 1), resize_labels(labels, scaled, scaled)
    if scaled == size:
        return image, labels
    spare = scaled - size
    top, left = _uniform_int(min(spare, 0), max(spare, 0)), _uniform_int(min(spare, 0), max(spare, 0))
    return place(image, labels, size, top, left, fill)


# ----------------------------------------------------------------------------- files


def load_image(path) -> torch.Tensor:
    """An image file as float32 (3, H, W) in [0, 1]; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: '{path}'")
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read image '{path}': {error}") from error
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).to(torch.float32).div_(255)


def load_labels(path, lookup: np.ndarray | None = None) -> torch.Tensor:
    """A single-channel label map as int64 (H, W) of our ids; `lookup[file_id]` maps foreign ids."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            if image.mode not in _LABEL_MODES:
                raise ValueError(f"label map '{path}': expected a grayscale or palette image, got mode {image.mode}")
            ids = np.asarray(image).astype(np.int64)
    except OSError as error:
        raise ValueError(f"cannot read label map '{path}': {error}") from error
    count = NUM_LABELS if lookup is None else len(lookup)
    bad = np.unique(ids[(ids < 0) | (ids >= count)])
    if bad.size:
        raise ValueError(f"label map '{path}': ids {bad[:8].tolist()} out of range, expected 0..{count - 1}")
    return torch.from_numpy(ids if lookup is None else lookup[ids])


def _header(path):
    with Image.open(path) as image:
        return image.size, image.mode


def pair_problem(image_path: Path | None, label_path: Path, check_labels: bool, lookup=None) -> str | None:
    """Why a pair is unusable, naming the file, from headers (and decoded ids if asked); None if fine."""
    if image_path is None:
        return f"no image for label map '{label_path}'"
    headers = []
    for kind, path in (("image", image_path), ("label map", label_path)):
        try:
            headers.append(_header(path))
        except (OSError, ValueError) as error:
            return f"unreadable {kind} '{path}' ({type(error).__name__})"
    (image_size, _), (label_size, mode) = headers
    if mode not in _LABEL_MODES:
        return f"label map '{label_path}' has mode {mode}, expected a single channel"
    if image_size != label_size:
        return (f"size mismatch: image '{image_path}' is {image_size[0]}x{image_size[1]}, "
                f"label map {label_size[0]}x{label_size[1]}")
    if check_labels:
        try:
            load_labels(label_path, lookup)
        except ValueError as error:
            return str(error)
    return None


def _check_fraction(val_fraction):
    if not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction: expected a number in [0, 1), got {val_fraction!r}")


def split_indices(count: int, split: str, val_fraction: float, seed: int) -> list[int]:
    """Indices of `split` among `count` sorted items: a seeded permutation's first part is val."""
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    _check_fraction(val_fraction)
    if split == "all":
        return list(range(count))
    order = np.random.default_rng(seed).permutation(count)
    num_val = round(count * val_fraction)
    if val_fraction > 0 and count >= 2:
        num_val = min(max(num_val, 1), count - 1)
    chosen = order[:num_val] if split == "val" else order[num_val:]
    return sorted(chosen.tolist())


# ----------------------------------------------------------------------------- datasets


class SyntheticClothing(Dataset):
    """The built-in procedural dataset: item `index` is drawn from numpy's rng seeded (seed, index)."""

    def __init__(self, num_images: int, image_size: int = 128, seed: int = 0, augment: bool = False):
        self.num_images = check_int("num_images", num_images)
        self.image_size = check_int("image_size", image_size)
        self.seed, self.augment = check_int("seed", seed, minimum=0), augment

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> dict:
        if not -self.num_images <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        index %= self.num_images
        pixels, ids = render_figure(np.random.default_rng([self.seed, index]), self.image_size)
        image = torch.from_numpy(pixels).permute(2, 0, 1).to(torch.float32).div_(255)
        labels = torch.from_numpy(ids)
        if self.augment:
            image, labels = fit_pair(image, labels, self.image_size, augment=True)
        return make_item(image, labels, f"synthetic-{self.seed}-{index:06d}")


class LabelledFiles(Dataset):
    """Image files paired with label maps: split by sorted name, then checked from file headers."""

    def __init__(self, pairs, image_size, split, val_fraction, seed, augment, lookup=None, check_labels=False):
        self.image_size = check_int("image_size", image_size)
        self.augment, self.lookup = augment, lookup
        pairs = sorted(pairs)
        chosen = [pairs[i] for i in split_indices(len(pairs), split, val_fraction, seed)]
        self.pairs, self.skipped = [], []
        for name, image_path, label_path in chosen:
            problem = pair_problem(image_path, label_path, check_labels, lookup)
            if problem is None:
                self.pairs.append((name, image_path, label_path))
            else:
                self.skipped.append((name, problem))
        if self.skipped:
            shown = "; ".join(why for _, why in self.skipped[:_REPORTED_NAMES])
            warnings.warn(f"{type(self).__name__} ({split}): skipped {len(self.skipped)} of {len(chosen)} "
                          f"files, first: {shown}", stacklevel=3)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        name, image_path, label_path = self.pairs[index]
        image, labels = load_image(image_path), load_labels(label_path, self.lookup)
        if image.shape[1:] != labels.shape:
            raise ValueError(f"'{image_path}' is {tuple(image.shape[1:])} but '{label_path}' is {tuple(labels.shape)}")
        image, labels = fit_pair(image, labels, self.image_size, self.augment)
        return make_item(image, labels, name)


def _require_dir(argument: str, path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{argument}: expected a directory, got '{path}'")
    return path


class DeepFashionMultiModal(LabelledFiles):
    """DeepFashion-MultiModal: `root/images/<stem>.jpg` with `root/segm/<stem>_segm.png` (ids 0-23).

    Only images with a label map belong to the set (most of the release's images have none).
    """

    def __init__(self, root, image_size=512, split="train", val_fraction=0.1, seed=0, augment=False,
                 check_labels=False):
        root = _require_dir("root", root)
        images, segm = _require_dir("root/images", root / "images"), _require_dir("root/segm", root / "segm")
        pairs = []
        for label_path in segm.glob("*_segm.png"):
            stem = label_path.name[: -len("_segm.png")]
            image_path = images / f"{stem}.jpg"
            pairs.append((stem, image_path if image_path.is_file() else None, label_path))
        if not pairs:
            raise ValueError(f"root: no '*_segm.png' label maps in '{segm}'")
        super().__init__(pairs, image_size, split, val_fraction, seed, augment, check_labels=check_labels)


class LabelFolder(LabelledFiles):
    """Images in `image_dir` and label maps `label_dir/<stem>.png` with the same stem.

    A label map holds one id per pixel (grayscale, or the indices of a palette PNG). Without
    `label_names` the ids are ours (unet.labels.LABELS). With it, id i means `label_names[i]`,
    which must be one of our names; ids past the list's end are out of range.
    """

    def __init__(self, image_dir, label_dir, label_names=None, image_size=512, split="train",
                 val_fraction=0.1, seed=0, augment=False, check_labels=False):
        image_dir, label_dir = _require_dir("image_dir", image_dir), _require_dir("label_dir", label_dir)
        images = {}
        for path in sorted(image_dir.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                images.setdefault(path.stem, path)
        pairs = [(path.stem, images.get(path.stem), path) for path in label_dir.glob("*.png")]
        if not pairs:
            raise ValueError(f"label_dir: no '*.png' label maps in '{label_dir}'")
        super().__init__(pairs, image_size, split, val_fraction, seed, augment, label_lookup(label_names), check_labels)


def label_lookup(label_names) -> np.ndarray | None:
    """Our id for each of a folder's ids, from its label names; None when the ids are ours."""
    if label_names is None:
        return None
    if isinstance(label_names, str) or not all(isinstance(name, str) for name in label_names):
        raise TypeError(f"label_names: expected a list of str, got {label_names!r}")
    unknown = [name for name in label_names if name not in LABEL_INDEX]
    if unknown or not label_names:
        raise ValueError(f"label_names: expected names from {LABELS}, got unknown {unknown or 'empty list'}")
    return np.array([LABEL_INDEX[name] for name in label_names], dtype=np.int64)


def build_datasets(data: str = "synthetic", image_size: int = 128, seed: int = 0, val_fraction: float = 0.1,
                   augment: bool = True, num_synthetic: int = 512) -> tuple[Dataset, Dataset]:
    """(train, val) for `data`: "synthetic", a DeepFashion-MultiModal root, or a label folder root.

    Synthetic train and val use seeds 2*seed and 2*seed+1, so they never share a figure. A
    folder root holds `images/` and `labels/`, and optionally `label_names.txt` (one name per id).
    Validation data are never augmented.
    """
    _check_fraction(val_fraction)
    if data == "synthetic":
        num_val = max(1, round(check_int("num_synthetic", num_synthetic) * val_fraction))
        return (SyntheticClothing(num_synthetic, image_size, 2 * seed, augment),
                SyntheticClothing(num_val, image_size, 2 * seed + 1, augment=False))
    root = Path(data)
    if not root.is_dir():
        state = "is not a directory" if root.exists() else "does not exist"
        raise ValueError(f"data: expected 'synthetic' or a dataset directory, got '{data}', which {state}")
    common = dict(image_size=image_size, val_fraction=val_fraction, seed=seed)
    if (root / "images").is_dir() and (root / "segm").is_dir():
        return (DeepFashionMultiModal(root, split="train", augment=augment, **common),
                DeepFashionMultiModal(root, split="val", **common))
    if (root / "images").is_dir() and (root / "labels").is_dir():
        names_file = root / "label_names.txt"
        names = names_file.read_text().split("\n") if names_file.is_file() else None
        names = [name.strip() for name in names if name.strip()] if names else None
        folders = (root / "images", root / "labels", names)
        return (LabelFolder(*folders, split="train", augment=augment, **common),
                LabelFolder(*folders, split="val", **common))
    raise ValueError(f"data: '{data}' has neither images/ + segm/ (DeepFashion-MultiModal) "
                     f"nor images/ + labels/ (label folder)")
