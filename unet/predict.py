"""Segment images with a trained checkpoint: label maps, colour overlays and region maps.

    python -m unet.predict --checkpoint runs/tiny/best.pt photos/ --output predictions/
    python -m unet.predict --checkpoint runs/tiny/best.pt "shots/*.jpg" --postprocess argmax --device cuda

For every input image ``<name>.<ext>`` the output folder receives

* ``<name>_labels.png``: the label map, a palette ("P" mode) PNG whose pixel values are label
  indices (see `unet.labels.LABELS`) and whose palette is `unet.labels.PALETTE`;
* ``<name>_overlay.png``: the label colours alpha-blended over the input (``--alpha``);
* ``<name>_regions.png``: the region map of the boundary segmentation, a 16-bit greyscale PNG where
  0 marks unassigned (boundary) pixels and region ``r`` is stored as ``r + 1``.

Outputs keep each image's size. By default an image is first resized so that its longest side is
the checkpoint's training image size (the scale the network learned; ``--max-size`` picks another,
0 keeps the image's own), then padded (replicating the edge) up to a multiple of the model's
``input_multiple``; the probabilities are cropped and resized back before post-processing.
Images of the same size share a batch.
"""

from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from unet.checkpoint import load_model
from unet.cli import AMP_DTYPES, autocast, number_type, positive_int
from unet.distributed import resolve_device
from unet.labels import PALETTE

POSTPROCESS_METHODS = ("argmax", "dust_fill")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def pad_to_multiple(images: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad (B,C,H,W) at the bottom/right, replicating the edge, so H and W divide by `multiple`."""
    height, width = images.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    if pad_h == 0 and pad_w == 0:
        return images
    return F.pad(images, (0, pad_w, 0, pad_h), mode="replicate")


@torch.no_grad()
def predict_probabilities(model, images: torch.Tensor, *, amp: str = "none", channels_last: bool = False):
    """Label probabilities (B,L,H,W) and boundary probability (B,1,H,W), float32, at the input size."""
    from unet.model import to_probabilities

    height, width = images.shape[-2:]
    padded = pad_to_multiple(images, model.input_multiple)
    if channels_last:
        padded = padded.contiguous(memory_format=torch.channels_last)
    with autocast(images.device, amp):
        output = model(padded)
    probs, boundary = to_probabilities(output)
    return probs[..., :height, :width].float(), boundary[..., :height, :width].float()


def label_map(method: str, probs: torch.Tensor, boundary: torch.Tensor, *, return_regions: bool = False):
    """Labels (B,H,W) int64 from probabilities: plain argmax, or the paper's segment + DUST_FILL.

    With `return_regions`, also the int32 region map (-1 where unassigned) of the boundary segmentation.
    """
    from unet import postprocess

    if method not in POSTPROCESS_METHODS:
        raise ValueError(f"postprocess: expected one of {POSTPROCESS_METHODS}, got {method!r}")
    probs, boundary = probs.cpu(), boundary.cpu()
    if method == "dust_fill":
        return postprocess.postprocess(probs, boundary, return_regions=return_regions)
    labels = postprocess.argmax_labels(probs)
    if not return_regions:
        return labels
    # The same boundary segmentation `postprocess` does, without the label vote.
    closed = postprocess.close_gaps(boundary[:, 0] >= postprocess.BOUNDARY_THRESHOLD)
    regions, _ = postprocess.segment(closed)
    return labels, regions


def find_images(inputs: list[str]) -> list[Path]:
    """Expand files, folders (their image files, sorted) and glob patterns, in the order given."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.exists():
            found.append(path)
        else:
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True))
            if not matches:
                raise FileNotFoundError(f"inputs: {item!r} is neither a file, a folder nor a matching glob")
            found += [p for p in matches if p.is_file()]
    return found


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float) -> np.ndarray:
    """Blend the label colours over an RGB uint8 image; background pixels stay as they were."""
    colours = PALETTE[labels].astype(np.float32)
    weight = np.where(labels[..., None] > 0, alpha, 0.0)
    return (image * (1 - weight) + colours * weight).round().astype(np.uint8)


def save_outputs(output_dir: Path, name: str, image: torch.Tensor, labels: torch.Tensor, regions, alpha: float):
    labels_np = labels.numpy().astype(np.uint8)
    label_png = Image.fromarray(labels_np, mode="P")
    label_png.putpalette(PALETTE.reshape(-1).tolist())
    label_png.save(output_dir / f"{name}_labels.png")
    rgb = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(overlay(rgb, labels_np, alpha)).save(output_dir / f"{name}_overlay.png")
    region_ids = (np.asarray(regions).astype(np.int64) + 1).clip(0, 65535).astype(np.uint16)
    Image.fromarray(region_ids).save(output_dir / f"{name}_regions.png")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Segment images with a trained attention UNet", allow_abbrev=False)
    parser.add_argument("inputs", nargs="+", help="image files, folders or glob patterns")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by unet.train")
    parser.add_argument("--output", default="predictions", help="folder for the PNGs (default: predictions)")
    parser.add_argument("--postprocess", choices=POSTPROCESS_METHODS, default="dust_fill")
    parser.add_argument("--batch-size", type=positive_int, default=4)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--amp", choices=tuple(AMP_DTYPES), default="none")
    parser.add_argument("--max-size", type=int, default=None,
                        help="resize so the longest side is this before predicting (default: the training "
                             "image size; 0: predict at the image's own size); outputs keep the original size")
    parser.add_argument("--alpha", type=number_type(float, 0.0, True, "a number in [0, 1]", maximum=1.0), default=0.5, help="overlay opacity in [0, 1]")
    return parser


def _load_batch(paths: list[Path], failures: list[str]) -> tuple[list[str], list[torch.Tensor]]:
    from unet.data import load_image

    names, images = [], []
    for path in paths:
        try:
            images.append(torch.as_tensor(load_image(path)))
            names.append(path.stem)
        except (OSError, ValueError) as error:
            failures.append(f"{path}: {error}")
    return names, images


def resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear resize of (..., C, H, W), antialiased when shrinking."""
    if image.shape[-2:] == (height, width):
        return image
    batch = image.reshape(-1, *image.shape[-3:])
    resized = F.interpolate(batch, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return resized.reshape(*image.shape[:-2], height, width)


def predict_images(model, images: list[torch.Tensor], device, *, method: str, amp: str = "none", max_size: int = 0):
    """(labels, regions) for each image, at its own size.

    With `max_size`, an image whose longest side differs is first resized to that side (the scale
    the network was trained at); the probabilities are resized back before post-processing.
    Only images of one shape share a forward pass: padding an image up to a larger neighbour
    would change what the global attention of the bottleneck sees.
    """
    by_shape: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        by_shape.setdefault(tuple(image.shape), []).append(i)
    results = [None] * len(images)
    for (_, height, width), indices in by_shape.items():
        scale = max_size / max(height, width) if max_size else 1.0
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        batch = resize(torch.stack([images[i] for i in indices]).to(device), *size)
        probs, boundary = predict_probabilities(model, batch, amp=amp)
        probs, boundary = resize(probs, height, width), resize(boundary, height, width)
        labels, regions = label_map(method, probs, boundary, return_regions=True)
        for j, i in enumerate(indices):
            results[i] = (labels[j], regions[j])
    return results


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        device = resolve_device(args.device)
        paths = find_images(args.inputs)
        model, _ = load_model(args.checkpoint, device)
        if args.max_size is not None and args.max_size < 0:
            raise ValueError(f"--max-size: expected 0 or a positive number of pixels, got {args.max_size}")
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if not paths:
        print("error: no images found in the inputs", file=sys.stderr)
        return 1
    output_dir = Path(args.output)
    output_dir.mkdir(parents=True, exist_ok=True)

    max_size = model.config.image_size if args.max_size is None else args.max_size
    failures: list[str] = []
    written = 0
    batches = [paths[i : i + args.batch_size] for i in range(0, len(paths), args.batch_size)]
    with tqdm(total=len(paths), desc="predict", unit="img", dynamic_ncols=True) as bar:
        for batch_paths in batches:
            names, images = _load_batch(batch_paths, failures)
            predictions = predict_images(
                model, images, device, method=args.postprocess, amp=args.amp, max_size=max_size
            )
            for name, image, (labels, regions) in zip(names, images, predictions):
                save_outputs(output_dir, name, image, labels, regions, args.alpha)
                written += 1
            bar.update(len(batch_paths))

    for failure in failures:
        print(f"skipped {failure}", file=sys.stderr)
    print(f"wrote {written} of {len(paths)} images to {output_dir}")
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
