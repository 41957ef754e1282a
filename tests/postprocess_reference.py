"""Plain Python/NumPy reference of the post-processing, written from the paper's pseudo-code and,
for the boundary preparation, from the description of the paper author's steps.

Algorithms 2-4 (FLOOD, SEGMENT, DUST_FILL) follow the pseudo-code line by line: FLOOD's stack of
(y, x, b) pushed for all four neighbours, SEGMENT's seeds taken in scan order, DUST_FILL's stack
and swap buffer. DUST_FILL's arithmetic is double precision in the documented order of
csrc/postprocess/dust_fill.cpp (sums over labels 0..L-1, a region's first statistics summed run by
run along the rows, pixels added to statistics in the order they join, normalization by the
reciprocal of the sum), so the labels must match exactly.
One image at a time, NumPy in and out.
"""

from __future__ import annotations

import numpy as np

CELL, BOUNDARY, CLAIMED = 0, 1, 2


def boundary_from_labels(labels: np.ndarray) -> np.ndarray:
    """True where a 4-neighbour inside the image has another label."""
    out = np.zeros(labels.shape, dtype=bool)
    vertical = labels[1:, :] != labels[:-1, :]
    horizontal = labels[:, 1:] != labels[:, :-1]
    out[1:, :] |= vertical
    out[:-1, :] |= vertical
    out[:, 1:] |= horizontal
    out[:, :-1] |= horizontal
    return out


def _dilate_once(canvas: np.ndarray, eight: bool) -> np.ndarray:
    """Each pixel or any of its 8- (or 4-) neighbours; outside the canvas counts as False."""
    out = canvas.copy()
    padded = np.pad(canvas, 1)
    h, w = canvas.shape
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if eight or dy == 0 or dx == 0:
                out |= padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
    return out


def close_gaps(boundary: np.ndarray, iterations: int) -> np.ndarray:
    """Dilate `iterations` times, then erode as often, alternating the 8- and 4-neighbourhood
    (8 first), on a canvas padded so that the image is surrounded by non-boundary pixels."""
    pad = iterations + 1
    canvas = np.pad(boundary.astype(bool), pad)
    for i in range(iterations):
        canvas = _dilate_once(canvas, eight=i % 2 == 0)
    for i in range(iterations):
        canvas = ~_dilate_once(~canvas, eight=i % 2 == 0)
    return canvas[pad:-pad, pad:-pad]


def _shift_or(image: np.ndarray, offsets, outside: bool) -> np.ndarray:
    """OR of `image` shifted by each (dy, dx): out[y, x] |= image[y + dy, x + dx], where pixels
    outside the image read as `outside`."""
    h, w = image.shape
    reach = max((max(abs(dy), abs(dx)) for dy, dx in offsets), default=0)
    padded = np.pad(image, reach, constant_values=outside)
    out = np.zeros(image.shape, dtype=bool)
    for dy, dx in offsets:
        out |= padded[reach + dy : reach + dy + h, reach + dx : reach + dx + w]
    return out


def _square(radius: int):
    return [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)]


def _diamond(radius: int, inner: int = 0):
    """Offsets at city-block distance inner..radius."""
    return [(dy, dx) for dy, dx in _square(radius) if inner <= abs(dy) + abs(dx) <= radius]


def prepare_boundary(boundary: np.ndarray, iterations: int) -> np.ndarray:
    """The paper author's boundary preparation, step by step:

    1. keep the boundary pixels that belong to a 2x2 block of boundary pixels;
    2. make the image's outermost rows and columns boundary (the frame);
    3. dilate by the square of radius `iterations`, then erode by the diamond (city-block ball)
       of the same radius; the image is treated as lying on an endless plane of non-boundary
       pixels (so the frame's dilation covers the plane around the image);
    4. clear the pixels whose 12 neighbours at city-block distance 1 or 2 are all set, pixels
       outside the image counting as set (re-opens the inside of blobs the closing filled);
    5. OR with the mask of steps 1-2.
    """
    b = np.asarray(boundary, dtype=bool)
    h, w = b.shape
    # The 2x2 blocks, each marked at its top-left pixel, then spread to their four pixels.
    block = np.zeros((h + 1, w + 1), dtype=bool)
    block[1:h, 1:w] = b[:-1, :-1] & b[:-1, 1:] & b[1:, :-1] & b[1:, 1:]
    kept = block[1:, 1:] | block[1:, :-1] | block[:-1, 1:] | block[:-1, :-1]
    if h and w:
        kept[0, :] = kept[-1, :] = kept[:, 0] = kept[:, -1] = True
    # Dilation and erosion on a canvas wide enough to hold the whole dilation.
    n = iterations
    canvas = np.pad(kept, n)
    dilated = _shift_or(canvas, _square(n), outside=False)
    eroded = ~_shift_or(~dilated, _diamond(n), outside=False)
    closed = eroded[n : n + h, n : n + w]
    reopened = closed & _shift_or(~closed, _diamond(2, inner=1), outside=False)
    return reopened | kept


def flood(data: list[list[int]], mask: list[tuple[int, int]], x: int, y: int) -> int:
    """Algorithm 2: claims cells in `data` from the seed, appends them to `mask`, returns filled."""
    height, width = len(data), len(data[0])
    stack = [(y, x, 0)]
    filled = 0
    while stack:
        y, x, b = stack.pop()
        if x < 0 or x >= width or y < 0 or y >= height:
            continue
        if data[y][x] == CELL or (data[y][x] == BOUNDARY and b == 0):
            b = 1 if data[y][x] == BOUNDARY else 0
            data[y][x] = CLAIMED
            mask.append((y, x))
            stack.append((y + 1, x, b))
            stack.append((y - 1, x, b))
            stack.append((y, x + 1, b))
            stack.append((y, x - 1, b))
            filled += 1
    return filled


def segment(boundary: np.ndarray, min_size: int) -> tuple[np.ndarray, int]:
    """Algorithm 3 with seeds in scan order, keeping regions of more than `min_size` pixels (the
    author's code; the pseudo-code writes `mass >= T`): int32 region map (-1 unassigned) and
    region count."""
    data = [[BOUNDARY if v else CELL for v in row] for row in np.asarray(boundary, dtype=bool).tolist()]
    masks = []
    for y in range(boundary.shape[0]):
        for x in range(boundary.shape[1]):
            if data[y][x] == CLAIMED:
                continue
            mask: list[tuple[int, int]] = []
            if flood(data, mask, x, y) > min_size:
                masks.append(mask)
    regions = np.full(boundary.shape, -1, dtype=np.int32)
    for k, mask in enumerate(masks):
        for y, x in mask:
            regions[y, x] = k
    return regions, len(masks)


def _normalize(values: list[float]) -> list[float]:
    total = 0.0
    for v in values:
        total += v
    inverse = 1.0 / total if total > 0.0 else 0.0
    return [v * inverse for v in values]


def _l1(a: list[float], b: list[float]) -> float:
    d = 0.0
    for u, v in zip(a, b):
        d += abs(u - v)
    return d


def argmax_labels(probs: np.ndarray) -> np.ndarray:
    return np.argmax(probs, axis=0).astype(np.int64)


def _region_stats(seg: np.ndarray, regions: np.ndarray, num_masks: int) -> list[list[float]]:
    """Per region, per label: each run of the region along a row summed in two lanes (its even and
    its odd pixels, each in order from 0), the lanes added, and the runs added in scan order
    (np.bincount adds in input order, sequentially)."""
    height, width = regions.shape
    flat = regions.ravel()
    starts = np.ones(flat.size, dtype=bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::width] = True
    run = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    odd = (np.arange(flat.size) - first[run]) % 2 == 1
    run_region = flat[first]
    assigned, counted = flat >= 0, run_region >= 0
    sums = []
    for plane in seg:
        values = plane.ravel()
        lanes = [np.bincount(run[assigned & lane], weights=values[assigned & lane], minlength=len(first)) for lane in (~odd, odd)]
        run_sums = lanes[0] + lanes[1]
        sums.append(np.bincount(run_region[counted], weights=run_sums[counted], minlength=num_masks))
    return [[float(sums[l][k]) for l in range(len(seg))] for k in range(num_masks)]


def dust_fill(probs, regions, new_threshold, join_threshold: float, impatience: float, return_masks: bool = False):
    """Algorithm 4 for one image: probs (L, H, W), regions (H, W) -> int64 labels (H, W); with
    `return_masks` also the final mapping (int32, mask ids: regions 0..M-1, promoted M + label)
    and the final statistics (float64 (M + L, L)). Where nothing can grow (no region, no confident
    pixel), every pixel is in its argmax label's promoted mask."""
    seg = np.asarray(probs, dtype=np.float64)
    num_labels, height, width = seg.shape
    thresholds = np.broadcast_to(np.asarray(new_threshold, dtype=np.float64), (num_labels,))
    regions = np.asarray(regions)
    M = int(regions.max()) + 1 if regions.size else 0

    stats = _region_stats(seg, regions, M)
    for k in range(num_labels):
        stats.append([1.0 if l == k else 0.0 for l in range(num_labels)])
    mapping = regions.astype(np.int64)

    # First pass, in scan order: promote confident pixels, stack the others with patience 1.
    best_label = np.argmax(seg, axis=0)
    best = np.take_along_axis(seg, best_label[None], axis=0)[0]
    stack = []
    promoted = 0
    for s in range(height):
        for t in range(width):
            if mapping[s, t] >= 0:
                continue
            label = int(best_label[s, t])
            if best[s, t] >= thresholds[label]:
                mapping[s, t] = M + label
                promoted += 1
            else:
                stack.append((s, t, 1.0))
    if stack and M == 0 and promoted == 0:  # nothing to grow from: the loop below would never end
        labels = argmax_labels(seg)
        return (labels, labels.astype(np.int32), np.eye(num_labels)) if return_masks else labels

    swap = []
    while stack:
        while stack:
            y, x, patience = stack.pop()
            dist = 1000.0
            mask = -1
            border = 0
            for s, t in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= s < height and 0 <= t < width and mapping[s, t] >= 0:
                    border = 1
                    tempm = int(mapping[s, t])
                    tempd = _l1(_normalize(seg[:, y, x].tolist()), _normalize(stats[tempm]))
                    if tempd < join_threshold * patience and tempd < dist:
                        dist = tempd
                        mask = tempm
            if border == 0:
                swap.append((y, x, patience))
                continue
            if mask == -1:
                swap.append((y, x, patience * impatience))
                continue
            mapping[y, x] = mask
            if mask < M:
                pixel = seg[:, y, x].tolist()
                stats[mask] = [a + b for a, b in zip(stats[mask], pixel)]
        stack, swap = swap, stack

    mask_label = np.array([int(np.argmax(s)) for s in stats], dtype=np.int64)
    labels = mask_label[mapping]
    if return_masks:
        return labels, mapping.astype(np.int32), np.array(stats, dtype=np.float64).reshape(M + num_labels, num_labels)
    return labels


def boundary_regions(boundary_prob, boundary_threshold, gap_iterations, min_size, boundary_method="paper"):
    """Threshold -> prepare_boundary ("paper") or close_gaps ("close_gaps") -> segment."""
    boundary = np.asarray(boundary_prob, dtype=np.float64) >= boundary_threshold
    ready = {"paper": prepare_boundary, "close_gaps": close_gaps}[boundary_method]
    return segment(ready(boundary, gap_iterations), min_size)[0]


def postprocess(probs, boundary_prob, boundary_threshold, gap_iterations, min_size, new_threshold,
                join_threshold, impatience, boundary_method="paper") -> tuple[np.ndarray, np.ndarray]:
    """The chain for one image: boundary_regions -> dust_fill; returns (labels, regions)."""
    regions = boundary_regions(boundary_prob, boundary_threshold, gap_iterations, min_size, boundary_method)
    return dust_fill(probs, regions, new_threshold, join_threshold, impatience), regions
