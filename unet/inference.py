"""From images to probabilities, label maps and scores: the one inference path.

`unet.train` (validation), `unet.predict` and `unet.evaluate` all call these functions and none of
them imports another; an application embedding the model calls them too.

* `pad_to_multiple`, `resize`: the geometry around the network (any image size in, same size out);
* `predict_probabilities`: label probabilities (B, L, H, W) and boundary probability (B, 1, H, W);
* `label_map`: one label per pixel, by ``"argmax"`` or by the paper's post-processing
  (``"dust_fill"``, with the settings of a `PostprocessConfig`), optionally with the region map of
  the boundary segmentation;
* `predict_images`: all of the above for a list of images of any sizes;
* `confusion_matrices`: a model scored on a data loader, one `ConfusionMatrix` per method,
  optionally without a frame of `interior` pixels (`crop`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm

from unet import postprocess
from unet.cli import autocast
from unet.labels import NUM_LABELS
from unet.metrics import ConfusionMatrix
from unet.model import to_probabilities
from unet.postprocess_config import PostprocessConfig

POSTPROCESS_METHODS = ("argmax", "dust_fill")


def pad_to_multiple(images: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad (B,C,H,W) at the bottom/right, replicating the edge, so H and W divide by `multiple`."""
    height, width = images.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    if pad_h == 0 and pad_w == 0:
        return images
    return F.pad(images, (0, pad_w, 0, pad_h), mode="replicate")


def resize(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear resize of (..., C, H, W) images or probability maps, antialiased when shrinking.

    The weights are non-negative and sum to 1, so values stay within the input's range (up to rounding).
    """
    if images.shape[-2:] == (height, width):
        return images
    batch = images.reshape(-1, *images.shape[-3:])
    # Antialiasing only changes a shrink; enlarging without it gives the same values (within 1e-5)
    # in about 2/3 of the time.
    shrinking = height < images.shape[-2] or width < images.shape[-1]
    resized = F.interpolate(batch, size=(height, width), mode="bilinear", align_corners=False, antialias=shrinking)
    return resized.reshape(*images.shape[:-2], height, width)


@torch.no_grad()
def predict_probabilities(model, images: torch.Tensor, *, amp: str = "none", channels_last: bool = False):
    """Label probabilities (B,L,H,W) and boundary probability (B,1,H,W), float32, at the input size."""
    height, width = images.shape[-2:]
    padded = pad_to_multiple(images, model.input_multiple)
    if channels_last:
        padded = padded.contiguous(memory_format=torch.channels_last)
    with autocast(images.device, amp):
        output = model(padded)
    probs, boundary = to_probabilities(output)
    return probs[..., :height, :width].float(), boundary[..., :height, :width].float()


def label_map(method: str, probs: torch.Tensor, boundary: torch.Tensor, *, return_regions: bool = False,
              postprocess_config: PostprocessConfig | None = None):
    """Labels (B,H,W) int64 on the CPU from probabilities: plain argmax, or the paper's segment + DUST_FILL.

    `postprocess_config` holds the post-processing settings (default: `PostprocessConfig()`, the
    library's defaults). With `return_regions`, also the int32 region map (-1 where unassigned) of
    the boundary segmentation with those settings; both methods return the same regions.
    """
    if method not in POSTPROCESS_METHODS:
        raise ValueError(f"postprocess: expected one of {POSTPROCESS_METHODS}, got {method!r}")
    config = postprocess_config or PostprocessConfig()
    probs, boundary = probs.cpu(), boundary.cpu()
    if method == "dust_fill":
        return postprocess.postprocess(probs, boundary, return_regions=return_regions, **config.kwargs())
    labels = postprocess.argmax_labels(probs)
    if not return_regions:
        return labels
    return labels, postprocess.boundary_regions(
        boundary, config.boundary_threshold, config.gap_iterations, config.min_size,
        boundary_method=config.boundary_method,
    )


def crop(maps: torch.Tensor, interior: int) -> torch.Tensor:
    """The (..., H, W) maps without a frame `interior` pixels wide (scores that leave the edge out)."""
    if interior == 0:
        return maps
    height, width = maps.shape[-2:]
    if interior < 0 or 2 * interior >= min(height, width):
        raise ValueError(f"interior: expected a frame width in [0, {(min(height, width) - 1) // 2}] for "
                         f"{height}x{width} images, got {interior}")
    return maps[..., interior : height - interior, interior : width - interior]


def predict_images(model, images: list[torch.Tensor], device, *, method: str, amp: str = "none", max_size: int = 0,
                   postprocess_config: PostprocessConfig | None = None):
    """(labels, regions) for each (3, H, W) image, at its own size, on the CPU.

    `postprocess_config`: the post-processing settings (see `label_map`).

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
        labels, regions = label_map(method, probs, boundary, return_regions=True, postprocess_config=postprocess_config)
        for j, i in enumerate(indices):
            results[i] = (labels[j], regions[j])
    return results


@torch.no_grad()
def confusion_matrices(model, loader, device, *, methods=("argmax",), amp="none", channels_last=False, progress=True,
                       postprocess_config: PostprocessConfig | None = None, interior: int = 0):
    """Score `model` on `loader` (batches of "image" and "labels"), one `ConfusionMatrix` per method.

    Images are post-processed whole (with `postprocess_config`, see `label_map`); with `interior`,
    a frame that many pixels wide is left out of the count. Only the data this process sees is
    counted; reduce across processes with ``.all_reduce()``.
    """
    was_training = model.training
    model.eval()
    matrices = {method: ConfusionMatrix(NUM_LABELS, device=device) for method in methods}
    for batch in tqdm(loader, desc="eval", unit="batch", leave=False, dynamic_ncols=True, disable=not progress):
        images, target = batch["image"].to(device), batch["labels"].to(device)
        probs, boundary = predict_probabilities(model, images, amp=amp, channels_last=channels_last)
        for method, matrix in matrices.items():
            if method == "argmax":  # no need for a round trip through the CPU post-processing
                labels = probs.argmax(1)
            else:
                labels = label_map(method, probs, boundary, postprocess_config=postprocess_config).to(device)
            matrix.update(crop(labels, interior), crop(target, interior))
    model.train(was_training)
    return matrices
