"""The paper's post-processing (sections 5.2, 7.2, 7.3), compiled in C++ (csrc/postprocess).

From the network's label probabilities and boundary probability to one label per pixel:

1. threshold the boundary probability (``boundary_prob >= boundary_threshold``);
2. ready the boundary for the flood, closing small gaps (``boundary_method``):
   :func:`prepare_boundary`, the paper author's preparation (the default), or :func:`close_gaps`,
   a plain morphological closing;
3. :func:`segment`: FLOOD + SEGMENT (Algorithms 2-3) cut the image into regions, keeping those of
   more than ``min_size`` pixels; a boundary must be two cells thick to stop a flood, which is
   what :func:`boundary_from_labels` produces;
4. :func:`dust_fill`: DUST_FILL (Algorithm 4) pools the label statistics of each region, promotes
   confident leftover pixels, grows the masks over the remaining pixels, and gives each mask its
   most probable label.

Steps 1-3 are :func:`boundary_regions`; :func:`postprocess` runs all four.

Every function takes a single image or a batch, as torch tensors or NumPy arrays, and answers in
kind (NumPy for NumPy, torch on the input's device for torch). Contiguous CPU input is not copied;
batches run in parallel over images on torch's intra-op threads, without the GIL.

Shapes: label and region maps and boundaries ``(H, W)`` or ``(B, H, W)``; probabilities
``(L, H, W)`` or ``(B, L, H, W)``, float32 or float64, finite and non-negative (checked while the
kernels read them, ValueError otherwise).
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Sequence

import numpy as np
import torch

import unet._C  # noqa: F401  (registers torch.ops.unet.*)

# The paper's settings: a 5-pixel expand-contract, promotion threshold 0.5 for every label, join
# threshold 0.05, impatience 1.5, regions of more than 10 pixels, boundary thresholds of 0.1-0.7.
# Two defaults differ (`PAPER_SETTINGS` keeps the paper's, at the middle threshold 0.5):
# - the promotion threshold is 0.2, not 0.5. With 24 labels a network's top probability is often
#   below 0.5 (12% of the pixels of the default `python -m unet.train` checkpoint); such leftover
#   pixels wait and join a bordering mask, which erases the small parts of rare labels (belt, bag,
#   neckwear). 0.2 is still about 5 times the uniform 1/24, so only pixels without an opinion wait.
# - the boundary threshold is 0.7, the best of the paper author's thresholds on that checkpoint.
# On the validation split of that checkpoint (62x62 interior) these defaults score mean IoU 0.2261
# against 0.2207 for argmax and 0.2142 for the paper's settings (README, Evaluation).
BOUNDARY_THRESHOLD = 0.7
BOUNDARY_METHODS = ("paper", "close_gaps")
BOUNDARY_METHOD = "paper"
GAP_ITERATIONS = 5
MIN_SIZE = 10
NEW_THRESHOLD = 0.2
JOIN_THRESHOLD = 0.05
IMPATIENCE = 1.5
PAPER_SETTINGS = {"boundary_threshold": 0.5, "gap_iterations": 5, "min_size": 10, "new_threshold": 0.5,
                  "join_threshold": 0.05, "impatience": 1.5, "boundary_method": "paper"}

# DUST_FILL keeps regions x labels statistics and refuses more than this many (also as labels).
MAX_STATISTICS = 2**28

_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_UNSIGNED_AS_SIGNED = {torch.uint16: torch.int16, torch.uint32: torch.int32, torch.uint64: torch.int64}
_FLOAT_DTYPES = (torch.float32, torch.float64)


class _Input:
    """A tensor view of a user's array, and how to hand results back in the same kind."""

    def __init__(self, value, name: str):
        self.is_numpy = isinstance(value, np.ndarray)
        if self.is_numpy:
            self.device = torch.device("cpu")
            self.tensor = _from_numpy(value, name)
        elif isinstance(value, torch.Tensor):
            self.device = value.device
            self.tensor = value.detach().cpu()
        else:
            raise TypeError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(value).__name__}")

    def give_back(self, result: torch.Tensor):
        return result.numpy() if self.is_numpy else result.to(self.device)


def _from_numpy(array: np.ndarray, name: str) -> torch.Tensor:
    """Shares memory with `array` where torch can (native byte order, non-negative strides)."""
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    if any(stride < 0 for stride in array.strides):
        array = np.ascontiguousarray(array)
    try:
        with warnings.catch_warnings():
            # Read-only arrays are fine: the kernels never write their inputs.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(array)
    except TypeError as error:
        raise TypeError(f"{name}: unsupported NumPy dtype {array.dtype}") from error


def _batched(tensor: torch.Tensor, name: str, image_dims: int, layout: str) -> tuple[torch.Tensor, bool]:
    """(batch, was_single): a single image becomes a batch of one (a view)."""
    if tensor.dim() == image_dims:
        return tensor.unsqueeze(0), True
    if tensor.dim() == image_dims + 1:
        return tensor, False
    raise ValueError(f"{name}: expected shape {layout} or (B, {layout[1:]}, got {tuple(tensor.shape)}")


def _check_dtype(tensor: torch.Tensor, name: str, allowed: Sequence[torch.dtype], what: str) -> None:
    if tensor.dtype not in allowed:
        raise TypeError(f"{name}: expected {what}, got {tensor.dtype}")


def _count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name}: expected a non-negative int, got {value!r}")
    return int(value)


def _real(value, name: str, *, above: float | None = None) -> float:
    """A finite float, strictly above `above` when given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    value = float(value)
    if not np.isfinite(value) or (above is not None and not value > above):
        bound = "" if above is None else f" > {above}"
        raise ValueError(f"{name}: expected a finite number{bound}, got {value!r}")
    return value


def _thresholds(new_threshold, num_labels: int) -> torch.Tensor:
    """One promotion threshold per label, float64: a number for all labels or a sequence."""
    if isinstance(new_threshold, numbers.Real) and not isinstance(new_threshold, bool):
        values = [new_threshold] * num_labels
    elif isinstance(new_threshold, (Sequence, np.ndarray, torch.Tensor)) and not isinstance(new_threshold, str):
        values = list(np.asarray(new_threshold, dtype=np.float64).reshape(-1))
        if len(values) != num_labels:
            raise ValueError(f"new_threshold: expected {num_labels} thresholds (one per label), got {len(values)}")
    else:
        raise TypeError(f"new_threshold: expected a number or a sequence of numbers, got {type(new_threshold).__name__}")
    for value in values:
        if not (value >= 0):  # also rejects NaN; +inf disables promotion for a label
            raise ValueError(f"new_threshold: expected non-negative thresholds, got {value!r}")
    return torch.tensor(values, dtype=torch.float64)


def _probabilities(probs, name: str = "probs") -> tuple[_Input, torch.Tensor, bool]:
    source = _Input(probs, name)
    batch, single = _batched(source.tensor, name, 3, "(L, H, W)")
    _check_dtype(batch, name, _FLOAT_DTYPES, "float32 or float64")
    if batch.shape[1] == 0:
        raise ValueError(f"{name}: expected at least one label, got shape {tuple(source.tensor.shape)}")
    return source, batch, single


def _image_map(value, name: str, probs_batch: torch.Tensor, single: bool) -> torch.Tensor:
    """A (H, W) / (B, H, W) map that must match the probabilities' batch and image size."""
    tensor = _Input(value, name).tensor
    expected = tuple(probs_batch.shape[2:]) if single else (probs_batch.shape[0], *probs_batch.shape[2:])
    if tuple(tensor.shape) != expected:
        raise ValueError(f"{name}: expected shape {expected} to match probs, got {tuple(tensor.shape)}")
    return tensor.unsqueeze(0) if single else tensor


def boundary_from_labels(labels):
    """Boundary map (bool) of an integer label map ``(H, W)`` or ``(B, H, W)``.

    A pixel is boundary where any 4-neighbour inside the image has another label: the paper's
    symmetric discrete gradient, two cells thick between regions. The training target of the
    boundary head, and the oracle of the post-processing tests.
    """
    source = _Input(labels, "labels")
    tensor = source.tensor
    if tensor.dtype in _UNSIGNED_AS_SIGNED:  # only equality matters: reinterpret the bits
        tensor = tensor.view(_UNSIGNED_AS_SIGNED[tensor.dtype])
    _check_dtype(tensor, "labels", _INTEGER_DTYPES, "an integer dtype")
    batch, single = _batched(tensor, "labels", 2, "(H, W)")
    out = torch.ops.unet.boundary_from_labels(batch)
    return source.give_back(out[0] if single else out)


def _readied(op, boundary, iterations) -> torch.Tensor | np.ndarray:
    """A bool boundary map (H, W) / (B, H, W) through one of the boundary-readying ops."""
    source = _Input(boundary, "boundary")
    _check_dtype(source.tensor, "boundary", (torch.bool,), "bool")
    batch, single = _batched(source.tensor, "boundary", 2, "(H, W)")
    out = op(batch, _count(iterations, "iterations"))
    return source.give_back(out[0] if single else out)


def close_gaps(boundary, iterations: int = GAP_ITERATIONS):
    """Expand-contract: ``iterations`` dilations, then as many erosions, alternating the 8- and
    the 4-neighbourhood (8 first).

    The morphological closing by an octagon (a square of radius ``ceil(iterations / 2)`` plus a
    diamond of radius ``floor(iterations / 2)``). Neither neighbourhood alone will do: a closing
    never fills a gap that a corner of its shape fits through, and the diamond's corners fit
    through gaps in straight boundaries, the square's through gaps in diagonal ones. The octagon
    closes gaps of up to ``iterations`` pixels in straight boundaries, ``iterations // 2`` rows
    in diagonal ones. Regions narrower than the octagon may fill up too (DUST_FILL labels their
    pixels). The image is treated as surrounded by non-boundary pixels, so no boundary pixel is
    ever removed. Iterations beyond the image's larger side count as that side.
    """
    return _readied(torch.ops.unet.close_gaps, boundary, iterations)


def prepare_boundary(boundary, iterations: int = GAP_ITERATIONS):
    """The paper author's boundary preparation of a bool boundary map ``(H, W)`` / ``(B, H, W)``.

    1. keeps only boundary pixels that belong to a 2x2 block of boundary pixels (drops speckle and
       one-pixel lines, which cannot stop a flood anyway);
    2. makes the image's outermost rows and columns boundary (a frame, so gaps between a boundary
       and the image's edge close too);
    3. closes gaps: dilates by the square of radius ``iterations`` (``2 * iterations + 1`` wide),
       then erodes by the diamond (city-block ball) of the same radius, the image lying on an
       endless plane of non-boundary pixels. Straight gaps of up to ``2 * iterations`` pixels
       close; the erosion's smaller shape also fills concave corners and narrow regions;
    4. re-opens what the closing filled: clears the pixels whose 12 neighbours at city-block
       distance 1 or 2 are all boundary (pixels outside the image count as boundary), leaving a
       2-pixel shell around each filled blob;
    5. ORs the result with the mask of steps 1-2, so no kept boundary pixel is lost.

    Iterations beyond the image's larger side count as that side. Returns a bool map.
    """
    return _readied(torch.ops.unet.prepare_boundary, boundary, iterations)


def segment(boundary, min_size: int = MIN_SIZE):
    """FLOOD + SEGMENT (Algorithms 2-3) on a bool boundary map ``(H, W)`` or ``(B, H, W)``.

    Floods 4-connected regions from the first unclaimed pixel in scan order; a boundary cell may
    be claimed but never claims another boundary cell. Regions of ``min_size`` pixels or fewer
    are dropped (their pixels stay unassigned): the rule of the paper author's code, which keeps
    masks of more than 10 pixels (Algorithm 3's pseudo-code writes ``mass >= T``). Returns
    ``(regions, count)``: an int32 map with region ids 0, 1, ... in scan order of each region's
    first pixel and -1 where unassigned, and the number of regions (an int for one image, an int64
    array of shape (B,) for a batch).
    """
    source = _Input(boundary, "boundary")
    _check_dtype(source.tensor, "boundary", (torch.bool,), "bool (threshold probabilities first)")
    batch, single = _batched(source.tensor, "boundary", 2, "(H, W)")
    regions, counts = torch.ops.unet.segment(batch, _count(min_size, "min_size"))
    if single:
        return source.give_back(regions[0]), int(counts[0])
    return source.give_back(regions), source.give_back(counts)


def _method(boundary_method) -> str:
    if not isinstance(boundary_method, str):
        raise TypeError(f"boundary_method: expected a str, got {type(boundary_method).__name__}")
    if boundary_method not in BOUNDARY_METHODS:
        raise ValueError(f"boundary_method: expected one of {BOUNDARY_METHODS}, got {boundary_method!r}")
    return boundary_method


def _boundary_regions(boundary_batch: torch.Tensor, boundary_threshold, gap_iterations, min_size, boundary_method):
    """boundary_regions on a (B, H, W) tensor, after checking every argument."""
    _check_dtype(boundary_batch, "boundary_prob", _FLOAT_DTYPES, "float32 or float64")
    return torch.ops.unet.boundary_regions(
        boundary_batch,
        _real(boundary_threshold, "boundary_threshold"),
        _method(boundary_method),
        _count(gap_iterations, "gap_iterations"),
        _count(min_size, "min_size"),
    )


def boundary_regions(
    boundary_prob,
    boundary_threshold: float = BOUNDARY_THRESHOLD,
    gap_iterations: int = GAP_ITERATIONS,
    min_size: int = MIN_SIZE,
    *,
    boundary_method: str = BOUNDARY_METHOD,
):
    """Regions from the boundary probability: threshold -> ready the boundary -> :func:`segment`.

    ``boundary_prob`` float32 or float64, finite: ``(H, W)``, ``(B, H, W)`` or, as the boundary
    head gives it, ``(B, 1, H, W)``. The boundary is ``boundary_prob >= boundary_threshold``,
    readied by ``boundary_method``: ``"paper"`` (:func:`prepare_boundary`, the default) or
    ``"close_gaps"`` (:func:`close_gaps`), with ``gap_iterations``; regions of more than
    ``min_size`` pixels are kept. Returns the int32 region map ``(H, W)`` / ``(B, H, W)`` of
    :func:`segment`: ids 0, 1, ... in scan order, -1 where unassigned (the region count is
    ``regions.max() + 1``). The first three steps of :func:`postprocess`, exactly.
    """
    source = _Input(boundary_prob, "boundary_prob")
    tensor = source.tensor
    if tensor.dim() == 4 and tensor.shape[1] == 1:
        tensor = tensor.squeeze(1)  # the boundary head's channel
    batch, single = _batched(tensor, "boundary_prob", 2, "(H, W)")
    regions = _boundary_regions(batch, boundary_threshold, gap_iterations, min_size, boundary_method)
    return source.give_back(regions[0] if single else regions)


def _check_statistics(num_labels: int, regions: torch.Tensor, return_masks: bool) -> None:
    """DUST_FILL's memory is regions x labels statistics, and what return_masks returns (regions
    + labels) x labels: refuse absurd counts before any work (the kernel checks too, but only
    after making the probabilities contiguous)."""
    num_regions = int(regions.max()) + 1 if regions.numel() else 0
    if num_regions * num_labels > MAX_STATISTICS:
        raise ValueError(
            f"dust_fill: {num_regions} regions x {num_labels} labels need {num_regions * num_labels} label "
            f"statistics, more than the {MAX_STATISTICS} supported (a larger min_size keeps fewer regions)"
        )
    if return_masks and (num_regions + num_labels) * num_labels > MAX_STATISTICS:
        raise ValueError(
            f"dust_fill: return_masks: {num_regions} regions + {num_labels} labels x {num_labels} labels of "
            f"statistics are more than the {MAX_STATISTICS} supported"
        )


def _dust_fill_parameters(new_threshold, join_threshold, impatience, num_labels: int):
    if num_labels > MAX_STATISTICS:
        raise ValueError(f"probs: expected at most {MAX_STATISTICS} labels, got {num_labels}")
    return (
        _thresholds(new_threshold, num_labels),
        _real(join_threshold, "join_threshold", above=0.0),
        _real(impatience, "impatience", above=1.0),
    )


def _run_dust_fill(source: _Input, probs_batch, regions_batch, parameters, single: bool, return_masks: bool):
    """The kernel on checked (B, ...) tensors: labels, or (labels, masks, statistics) handed back
    in the kind of `source`, single images unbatched."""
    _check_statistics(probs_batch.shape[1], regions_batch, return_masks)
    if not return_masks:
        labels = torch.ops.unet.dust_fill(probs_batch, regions_batch, *parameters)
        return source.give_back(labels[0] if single else labels)
    labels, masks, statistics = torch.ops.unet.dust_fill_masks(probs_batch, regions_batch, *parameters)
    statistics = [source.give_back(image_statistics) for image_statistics in statistics]
    if single:
        return source.give_back(labels[0]), source.give_back(masks[0]), statistics[0]
    return source.give_back(labels), source.give_back(masks), statistics


def dust_fill(
    probs,
    regions,
    new_threshold: float | Sequence[float] = NEW_THRESHOLD,
    join_threshold: float = JOIN_THRESHOLD,
    impatience: float = IMPATIENCE,
    *,
    return_masks: bool = False,
):
    """DUST_FILL (Algorithm 4): one label per pixel from probabilities and a region map.

    ``probs`` ``(L, H, W)`` / ``(B, L, H, W)``; ``regions`` ``(H, W)`` / ``(B, H, W)`` as from
    :func:`segment` (ids >= 0, -1 unassigned). Each region pools its pixels' probabilities;
    unassigned pixels whose top probability reaches ``new_threshold`` (one number, or one per
    label) are promoted to that label's mask; the rest join the bordering mask whose normalized
    statistics are closest in L1, once that distance is below ``join_threshold * patience``, where
    a pixel's patience grows by ``impatience`` (> 1) each time it borders masks and joins none.
    Returns int64 labels ``(H, W)`` / ``(B, H, W)``. If nothing at all is mapped after promotion
    (no region, no confident pixel) the algorithm could never start; that image gets the argmax.

    With ``return_masks=True`` returns ``(labels, masks, statistics)``, the masks and statistics
    Algorithm 4 ends with, where ``M = regions.max() + 1`` (per image) and ``L`` is the label count:

    * ``masks``: int32 like ``regions``, each pixel's final mask: ``r < M`` for region ``r`` (with
      the pixels that joined it), ``M + l`` for the pixels promoted to label ``l`` or joined to
      them;
    * ``statistics``: float64 ``(M + L, L)`` (a list of them for a batch, one per image, since M
      varies): row ``r < M`` the region's probability sums (its own pixels and those that joined
      it, accumulated in float64), row ``M + l`` the promoted mask's one-hot statistics.

    ``labels == statistics.argmax(1)[masks]`` (the first label on ties). In the argmax case above
    (``M = 0``) every pixel is in its most probable label's promoted mask: ``masks == labels`` and
    ``statistics`` is the ``(L, L)`` identity. (Region ids without a pixel get zero rows.)
    """
    source, probs_batch, single = _probabilities(probs)
    regions_batch = _image_map(regions, "regions", probs_batch, single)
    _check_dtype(regions_batch, "regions", _INTEGER_DTYPES, "an integer dtype")
    if regions_batch.dtype != torch.int32:
        if regions_batch.numel() and not (-1 <= int(regions_batch.min()) and int(regions_batch.max()) < 2**31 - 1):
            raise ValueError("regions: expected ids in [-1, H*W) (-1 = unassigned)")
        regions_batch = regions_batch.to(torch.int32)
    parameters = _dust_fill_parameters(new_threshold, join_threshold, impatience, probs_batch.shape[1])
    return _run_dust_fill(source, probs_batch, regions_batch, parameters, single, return_masks)


def argmax_labels(probs):
    """The plain baseline: the most probable label per pixel (the first on ties), int64."""
    source, batch, single = _probabilities(probs)
    labels = torch.ops.unet.argmax_labels(batch)
    return source.give_back(labels[0] if single else labels)


def postprocess(
    probs,
    boundary_prob,
    boundary_threshold: float = BOUNDARY_THRESHOLD,
    gap_iterations: int = GAP_ITERATIONS,
    min_size: int = MIN_SIZE,
    new_threshold: float | Sequence[float] = NEW_THRESHOLD,
    join_threshold: float = JOIN_THRESHOLD,
    impatience: float = IMPATIENCE,
    *,
    boundary_method: str = BOUNDARY_METHOD,
    return_regions: bool = False,
    return_masks: bool = False,
):
    """The whole chain: :func:`boundary_regions` (threshold -> :func:`prepare_boundary` or
    :func:`close_gaps` -> :func:`segment`), then :func:`dust_fill`.

    ``probs`` ``(L, H, W)`` / ``(B, L, H, W)``; ``boundary_prob`` ``(H, W)`` / ``(B, H, W)``, or
    with the boundary head's channel, ``(1, H, W)`` / ``(B, 1, H, W)``; float32 or float64.
    Returns int64 labels; with ``return_regions=True`` ``(labels, regions)``, adding the int32
    region map of :func:`segment` (the instance map); with ``return_masks=True``
    ``(labels, masks, statistics)``, DUST_FILL's final masks and statistics as
    :func:`dust_fill` returns them; with both, ``(labels, regions, masks, statistics)``.
    """
    source, probs_batch, single = _probabilities(probs)
    boundary = _Input(boundary_prob, "boundary_prob").tensor
    if boundary.dim() == probs_batch.dim() - single and boundary.shape[-3] == 1:
        boundary = boundary.squeeze(-3)  # the boundary head's channel
    boundary_batch = _image_map(boundary, "boundary_prob", probs_batch, single)
    parameters = _dust_fill_parameters(new_threshold, join_threshold, impatience, probs_batch.shape[1])
    regions = _boundary_regions(boundary_batch, boundary_threshold, gap_iterations, min_size, boundary_method)
    result = _run_dust_fill(source, probs_batch, regions, parameters, single, return_masks)
    if not return_regions:
        return result
    regions = source.give_back(regions[0] if single else regions)
    if not return_masks:
        return result, regions
    labels, masks, statistics = result
    return labels, regions, masks, statistics
