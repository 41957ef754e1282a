"""Segment images with a trained checkpoint: label maps, colour overlays and region maps.

    python -m unet.predict --checkpoint runs/tiny/best.pt photos/ --output predictions/
    python -m unet.predict --checkpoint runs/tiny/best.pt "shots/*.jpg" --postprocess argmax --device cuda
    python -m unet.predict --checkpoint runs/tiny/best.pt photos/ --postprocess-config tuned.json

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

The post-processing settings are those of ``--postprocess-config`` if given, else the
``postprocess.json`` beside the checkpoint (written by ``python -m unet.evaluate --tune``) if there is
one, else the library's defaults; the tool says which it used.
"""

from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from unet import postprocess_config
from unet.checkpoint import load_model
from unet.cli import AMP_DTYPES, number_type, positive_int
from unet.data import IMAGE_SUFFIXES, load_image
from unet.distributed import resolve_device
from unet.inference import POSTPROCESS_METHODS, predict_images
from unet.labels import PALETTE, palette_image


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
    palette_image(labels_np).save(output_dir / f"{name}_labels.png")
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
    parser.add_argument("--postprocess-config", default=None, metavar="PATH",
                        help=postprocess_config.FLAG_HELP)
    parser.add_argument("--batch-size", type=positive_int, default=4)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--amp", choices=tuple(AMP_DTYPES), default="none")
    parser.add_argument("--max-size", type=int, default=None,
                        help="resize so the longest side is this before predicting (default: the training "
                             "image size; 0: predict at the image's own size); outputs keep the original size")
    parser.add_argument("--alpha", type=number_type(float, 0.0, True, "a number in [0, 1]", maximum=1.0), default=0.5, help="overlay opacity in [0, 1]")
    return parser


def _load_batch(paths: list[Path], failures: list[str]) -> tuple[list[str], list[torch.Tensor]]:
    names, images = [], []
    for path in paths:
        try:
            images.append(torch.as_tensor(load_image(path)))
            names.append(path.stem)
        except (OSError, ValueError) as error:
            failures.append(f"{path}: {error}")
    return names, images


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        device = resolve_device(args.device)
        paths = find_images(args.inputs)
        model, state = load_model(args.checkpoint, device)
        config, config_line = postprocess_config.resolve(args.postprocess_config, args.checkpoint,
                                                         global_step=state.get("global_step"))
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
    print(config_line)

    max_size = model.config.image_size if args.max_size is None else args.max_size
    failures: list[str] = []
    written = 0
    batches = [paths[i : i + args.batch_size] for i in range(0, len(paths), args.batch_size)]
    with tqdm(total=len(paths), desc="predict", unit="img", dynamic_ncols=True) as bar:
        for batch_paths in batches:
            names, images = _load_batch(batch_paths, failures)
            predictions = predict_images(
                model, images, device, method=args.postprocess, amp=args.amp, max_size=max_size,
                postprocess_config=config,
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
