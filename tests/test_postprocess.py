"""unet.postprocess (C++) against the plain Python reference of Algorithms 2-4 and of the paper
author's boundary preparation, and independent oracles (NumPy, scipy.ndimage), plus the paper's
claim that 2-thick boundaries let FLOOD recover the regions of a label map."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage

from unet import postprocess

import postprocess_reference as reference

FEW = settings(max_examples=60, deadline=None)
SOME = settings(max_examples=120, deadline=None)


# ----------------------------------------------------------------------------- input generators


@st.composite
def label_maps(draw, max_side=12, max_labels=4):
    h, w = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return rng.integers(0, draw(st.integers(1, max_labels)), size=(h, w))


@st.composite
def boundaries(draw, max_side=14):
    h, w = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return rng.random((h, w)) < draw(st.sampled_from([0.0, 0.2, 0.4, 0.6, 0.8, 1.0]))


@st.composite
def wide_boundaries(draw, max_width=150, max_height=10):
    """Rows of 1..150 pixels: the kernels pack rows 64 pixels to a word, so widths on both sides
    of multiples of 64 matter more than height."""
    h, w = draw(st.integers(1, max_height)), draw(st.integers(1, max_width))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return rng.random((h, w)) < draw(st.sampled_from([0.0, 0.2, 0.5, 0.7, 0.9, 1.0]))


def _probabilities(rng, num_labels, shape, kind, dtype):
    """kind 'smooth': Dirichlet vectors; 'sharp': mostly confident; 'coarse': small integers
    normalized, with exact ties and all-zero pixels."""
    if kind == "coarse":
        probs = rng.integers(0, 3, size=(num_labels, *shape)).astype(np.float64)
        total = probs.sum(axis=0, keepdims=True)
        probs = np.divide(probs, total, out=np.zeros_like(probs), where=total > 0)
    else:
        alpha = 0.2 if kind == "sharp" else 2.0
        probs = rng.dirichlet(np.full(num_labels, alpha), size=shape).transpose(2, 0, 1)
    return probs.astype(dtype)


@st.composite
def dust_fill_inputs(draw, max_side=12):
    boundary = draw(boundaries(max_side))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    num_labels = draw(st.integers(1, 5))
    kind = draw(st.sampled_from(["smooth", "sharp", "coarse"]))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    probs = _probabilities(rng, num_labels, boundary.shape, kind, dtype)
    regions, _ = postprocess.segment(boundary, draw(st.integers(0, 6)))
    per_label = draw(st.booleans())
    new_threshold = list(rng.uniform(0.3, 1.1, num_labels)) if per_label else draw(st.floats(0.0, 1.1))
    join_threshold = draw(st.floats(0.001, 0.5))
    impatience = draw(st.floats(1.05, 3.0))
    return probs, regions, new_threshold, join_threshold, impatience


@st.composite
def segmented_outputs(draw, max_side=40, labels=(1, 8), any_mass=False):
    """Inputs shaped like a network's output after SEGMENT: 1-400 regions (cells around random
    seeds), 0-90% of the pixels unassigned, mostly in thick noisy bands along the cells' borders,
    and probabilities that favour a label per cell; sometimes ids in another order, or ids of
    regions left without a pixel. With `any_mass`, each pixel's probabilities are scaled to sum to
    anything from 1e-50 to 1e40 (float64) or from 1e-40 to 1e30 (float32)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    h, w = draw(st.integers(8, max_side)), draw(st.integers(8, max_side))
    n_regions = min(draw(st.integers(1, 400)), h * w)
    seeds = rng.integers(0, (h, w), size=(n_regions, 2))
    yy, xx = np.mgrid[:h, :w]
    distance = np.abs(yy - seeds[:, 0, None, None]) + np.abs(xx - seeds[:, 1, None, None])
    regions = (distance + 2.0 * rng.random(distance.shape)).argmin(axis=0).astype(np.int32)
    if draw(st.booleans()):
        regions = rng.permutation(n_regions).astype(np.int32)[regions]
    border = postprocess.boundary_from_labels(regions)
    score = rng.random((h, w)) - draw(st.sampled_from([0.0, 0.5, 1.0])) * border
    unassigned = draw(st.sampled_from([0.0, 0.05, 0.3, 0.5, 0.7, 0.9]))
    regions.ravel()[np.argsort(score, axis=None)[: int(unassigned * h * w)]] = -1
    num_labels = draw(st.integers(*labels))
    kind = draw(st.sampled_from(["smooth", "sharp", "coarse"]))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    probs = _probabilities(rng, num_labels, (h, w), kind, dtype)
    favoured = np.eye(num_labels)[np.where(regions >= 0, regions, rng.integers(0, n_regions, (h, w))) % num_labels]
    probs = (probs + draw(st.sampled_from([0.0, 0.5, 2.0])) * favoured.transpose(2, 0, 1).astype(probs.dtype))
    probs /= np.maximum(probs.sum(axis=0, keepdims=True), 1e-30)
    if any_mass:
        exponents = (-50, 40) if dtype == np.float64 else (-40, 30)
        probs = (probs * 10.0 ** rng.uniform(*exponents, size=(h, w))).astype(dtype)
    new_threshold = draw(st.sampled_from([0.4, 0.6, 0.9, 1.1]))  # 1.1: nothing is promoted
    return probs, regions, new_threshold, draw(st.floats(0.001, 0.5)), draw(st.floats(1.05, 3.0))


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to renaming ids: the same pixels unassigned (-1), and ids in one-to-one
    correspondence."""
    if a.shape != b.shape or not np.array_equal(a < 0, b < 0):
        return False
    pairs = np.unique(np.stack([a[a >= 0], b[b >= 0]]), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


# ----------------------------------------------------------------------------- boundary_from_labels


@FEW
@given(label_maps(), st.sampled_from([np.uint8, np.int8, np.int16, np.int32, np.int64, np.uint16, np.uint64]))
def test_boundary_from_labels_matches_reference(labels, dtype):
    labels = labels.astype(dtype)
    assert np.array_equal(postprocess.boundary_from_labels(labels), reference.boundary_from_labels(labels))


def test_boundary_from_labels_is_two_cells_thick():
    labels = np.zeros((4, 6), dtype=np.int64)
    labels[:, 3:] = 7
    expected = np.zeros((4, 6), dtype=bool)
    expected[:, 2:4] = True
    assert np.array_equal(postprocess.boundary_from_labels(labels), expected)


# ----------------------------------------------------------------------------- close_gaps


def _scipy_closing(boundary, iterations):
    """Closing by the octagon that alternating 8- and 4-neighbour steps grow from one pixel, on a
    canvas that surrounds the image with non-boundary pixels."""
    if iterations == 0:
        return boundary
    octagon = np.zeros((2 * iterations + 1,) * 2, dtype=bool)
    octagon[iterations, iterations] = True
    for i in range(iterations):
        octagon = ndimage.binary_dilation(octagon, ndimage.generate_binary_structure(2, 2 - i % 2))
    pad = iterations + 1
    return ndimage.binary_closing(np.pad(boundary, pad), octagon)[pad:-pad, pad:-pad]


@SOME
@given(boundaries(), st.integers(0, 4))
def test_close_gaps_matches_dilate_then_erode(boundary, iterations):
    closed = postprocess.close_gaps(boundary, iterations)
    assert np.array_equal(closed, reference.close_gaps(boundary, iterations))
    assert np.array_equal(closed, _scipy_closing(boundary, iterations))
    assert not (boundary & ~closed).any(), "closing never removes boundary"


@FEW
@given(boundaries(max_side=8))
def test_close_gaps_caps_iterations_at_the_larger_side(boundary):
    assert np.array_equal(postprocess.close_gaps(boundary, 10**12), reference.close_gaps(boundary, max(boundary.shape)))


@pytest.mark.parametrize("gap", [1, 2, 3])
def test_close_gaps_closes_straight_and_diagonal_gaps(gap):
    """A 2-thick line with `gap` pixels (straight) or rows (diagonal) missing is whole again after
    `gap` (straight) or `2 * gap` (diagonal) iterations, and separates the two sides."""
    straight = np.zeros((14, 16), dtype=bool)
    straight[6:8, :] = True
    diagonal = np.eye(16, dtype=bool) | np.eye(16, k=1, dtype=bool)
    for line, gap_cells, iterations in ((straight, np.s_[:, 6 : 6 + gap], gap), (diagonal, np.s_[6 : 6 + gap, :], 2 * gap)):
        broken = line.copy()
        broken[gap_cells] = False
        assert postprocess.segment(broken, 1)[1] == 1, "the gap lets the flood through"
        closed = postprocess.close_gaps(broken, iterations)
        assert closed[line].all()
        assert postprocess.segment(closed, 1)[1] == 2


# ----------------------------------------------------------------------------- prepare_boundary


def _scipy_kept(boundary):
    """An opening by a 2x2 square keeps exactly the pixels of 2x2 blocks; then the frame."""
    kept = ndimage.binary_opening(boundary, np.ones((2, 2), dtype=bool))
    kept[0, :] = kept[-1, :] = kept[:, 0] = kept[:, -1] = True
    return kept


def _scipy_reopening(closed, kept):
    """The 12-neighbour re-opening of the closed mask, OR the kept pixels."""
    y2, x2 = np.mgrid[-2:3, -2:3]
    ring = (abs(y2) + abs(x2) >= 1) & (abs(y2) + abs(x2) <= 2)
    has_open_neighbour = ndimage.binary_dilation(~closed, ring, border_value=0)
    return (closed & has_open_neighbour) | kept


def _scipy_preparation(boundary, iterations):
    """The author's steps with scipy.ndimage: square dilation and diamond erosion on a canvas that
    holds the whole dilation, between _scipy_kept and _scipy_reopening."""
    h, w = boundary.shape
    kept = _scipy_kept(boundary)
    n = iterations
    yy, xx = np.mgrid[-n : n + 1, -n : n + 1]
    canvas = np.pad(kept, n)
    if n:
        canvas = ndimage.binary_dilation(canvas, np.ones((2 * n + 1,) * 2, dtype=bool))
        canvas = ndimage.binary_erosion(canvas, abs(yy) + abs(xx) <= n, border_value=1)
    return _scipy_reopening(canvas[n : n + h, n : n + w], kept)


def _distance_preparation(boundary, iterations):
    """The same steps by exact distance transforms, fast at any radius: dilated = chessboard
    distance <= n to a kept pixel; the erosion opens the pixels within city-block distance n of a
    pixel not dilated (the outside counts as dilated: the frame's dilation covers it)."""
    kept = _scipy_kept(boundary)
    n = iterations
    dilated = ndimage.distance_transform_cdt(~kept, metric="chessboard") <= n
    opened = np.zeros_like(dilated)
    if not dilated.all():  # (with nothing to measure from, cdt returns -1 everywhere)
        opened = ndimage.distance_transform_cdt(dilated, metric="taxicab") <= n
    return _scipy_reopening(~opened, kept)


@SOME
@given(boundaries(max_side=20), st.integers(0, 6))
def test_prepare_boundary_matches_reference_and_scipy(boundary, iterations):
    prepared = postprocess.prepare_boundary(boundary, iterations)
    assert prepared.dtype == bool
    assert np.array_equal(prepared, reference.prepare_boundary(boundary, iterations))
    assert np.array_equal(prepared, _scipy_preparation(boundary, iterations))
    assert np.array_equal(prepared, _distance_preparation(boundary, iterations))


@SOME
@given(wide_boundaries(), st.integers(0, 6))
def test_prepare_boundary_matches_reference_on_wide_rows(boundary, iterations):
    assert np.array_equal(postprocess.prepare_boundary(boundary, iterations), reference.prepare_boundary(boundary, iterations))


@FEW
@given(st.integers(120, 200), st.integers(120, 200), st.integers(50, 90), st.sampled_from([0.0, 0.003, 0.02]),
       st.integers(0, 2**32 - 1))
def test_prepare_boundary_matches_distance_transforms_at_large_radii(height, width, iterations, density, seed):
    """Radii on both sides of the 64 cross-shaped steps after which the kernel's erosion switches
    to a distance transform, on images large enough to leave pixels undilated."""
    boundary = np.random.default_rng(seed).random((height, width)) < density
    expected = _distance_preparation(boundary, iterations)
    assert np.array_equal(postprocess.prepare_boundary(boundary, iterations), expected)


@pytest.mark.parametrize("iterations", [63, 64, 65, 70, 100])
def test_prepare_boundary_erosion_beyond_64_steps(iterations):
    """An empty 200 x 200 image: the frame's dilation leaves a square in the middle, whose
    erosion takes more than 64 cross-shaped steps to reach the corners."""
    boundary = np.zeros((200, 200), dtype=bool)
    boundary[150:153, 30:33] = True
    expected = _distance_preparation(boundary, iterations)
    assert not expected[90:110, 90:110].any() and np.array_equal(postprocess.prepare_boundary(boundary, iterations), expected)


@pytest.mark.parametrize("shape", [(0, 0), (0, 7), (7, 0), (1, 1), (1, 70), (70, 1), (2, 130)])
def test_prepare_boundary_and_segment_on_empty_and_thin_images(shape):
    rng = np.random.default_rng(0)
    for boundary in (np.zeros(shape, dtype=bool), np.ones(shape, dtype=bool), rng.random(shape) < 0.5):
        for iterations in (0, 1, 5):
            prepared = postprocess.prepare_boundary(boundary, iterations)
            assert prepared.shape == shape and np.array_equal(prepared, reference.prepare_boundary(boundary, iterations))
        for min_size in (0, 1):
            regions, count = postprocess.segment(boundary, min_size)
            expected, expected_count = reference.segment(boundary, min_size)
            assert count == expected_count and np.array_equal(regions, expected)
        probs = rng.random(shape).astype(np.float32)
        assert np.array_equal(postprocess.boundary_regions(probs, 0.5, 5, 0),
                              reference.boundary_regions(probs, 0.5, 5, 0))


@FEW
@given(boundaries(max_side=20), st.integers(0, 6))
def test_prepare_boundary_keeps_blocks_and_frame(boundary, iterations):
    prepared = postprocess.prepare_boundary(boundary, iterations)
    assert prepared[0].all() and prepared[-1].all() and prepared[:, 0].all() and prepared[:, -1].all()
    blocks = boundary[:-1, :-1] & boundary[:-1, 1:] & boundary[1:, :-1] & boundary[1:, 1:]
    for dy in (0, 1):
        for dx in (0, 1):
            window = prepared[dy : dy + blocks.shape[0], dx : dx + blocks.shape[1]]
            assert window[blocks].all(), "a pixel of a 2x2 block was dropped"


@FEW
@given(boundaries(max_side=8))
def test_prepare_boundary_caps_iterations_at_the_larger_side(boundary):
    expected = reference.prepare_boundary(boundary, max(boundary.shape))
    assert np.array_equal(postprocess.prepare_boundary(boundary, 10**12), expected)


def test_prepare_boundary_drops_speckle_and_thin_lines():
    boundary = np.zeros((20, 20), dtype=bool)
    boundary[5, 3:17] = True  # a 1-pixel line
    boundary[12, 8] = boundary[14, 4] = True  # speckle
    assert np.array_equal(postprocess.prepare_boundary(boundary, 0), postprocess.prepare_boundary(np.zeros_like(boundary), 0))


@pytest.mark.parametrize("iterations", [1, 2, 3])
def test_prepare_boundary_closes_straight_gaps_and_reopens_blobs(iterations):
    """A 2-thick wall with a gap of 2 * iterations pixels is whole again and splits the image in
    two regions. A 2-thick ring around a hole 2 * iterations wide: the closing fills the hole,
    the re-opening clears it again, so it stays a region of its own."""
    wall = np.zeros((24, 30), dtype=bool)
    wall[:, 10:12] = True
    wall[8 : 8 + 2 * iterations, 10:12] = False
    assert postprocess.segment(wall, 0)[1] == 1, "the gap lets the flood through"
    closed = postprocess.prepare_boundary(wall, iterations)
    assert closed[:, 10:12].all() and postprocess.segment(closed, 10)[1] == 2
    ring = np.zeros((40, 40), dtype=bool)  # far enough from the frame not to close onto it
    hole = np.s_[16 : 16 + 2 * iterations, 16 : 16 + 2 * iterations]
    ring[14 : 18 + 2 * iterations, 14 : 18 + 2 * iterations] = True
    ring[hole] = False
    closed = reference.close_gaps(ring, iterations)  # a closing alone fills the hole
    assert closed[hole].all()
    prepared = postprocess.prepare_boundary(ring, iterations)
    assert not prepared[hole].any(), "the hole is re-opened"
    regions, _ = postprocess.segment(prepared, 3)
    inside, outside = regions[hole][0, 0], regions[30, 30]
    assert inside >= 0 and (regions[hole] == inside).all() and inside != outside


# ----------------------------------------------------------------------------- segment


@SOME
@given(boundaries(), st.integers(0, 6))
def test_segment_matches_flood_reference(boundary, min_size):
    regions, count = postprocess.segment(boundary, min_size)
    expected, expected_count = reference.segment(boundary, min_size)
    assert regions.dtype == np.int32 and count == expected_count
    assert same_partition(regions, expected)
    # ids are numbered in scan order of each region's first pixel
    flat = regions.ravel()
    firsts = [np.flatnonzero(flat == k)[0] for k in range(count)]
    assert firsts == sorted(firsts) and set(np.unique(flat)) <= set(range(-1, count))


@SOME
@given(wide_boundaries(), st.integers(0, 3))
def test_segment_matches_flood_reference_on_wide_rows(boundary, min_size):
    """Also min_size 0, where every boundary pixel with no non-boundary 4-neighbour is a region."""
    regions, count = postprocess.segment(boundary, min_size)
    expected, expected_count = reference.segment(boundary, min_size)
    assert count == expected_count and np.array_equal(regions, expected)


def _expected_regions(labels: np.ndarray, min_size: int) -> list[np.ndarray]:
    """Per 4-connected region of `labels`: its pixels except boundary cells with no non-boundary
    4-neighbour (which FLOOD cannot claim and leaves to DUST_FILL), where more than `min_size`
    remain (a 3x3 cell keeps 5)."""
    boundary = reference.boundary_from_labels(labels)
    interior = np.pad(~boundary, 1)
    next_to_interior = interior[:-2, 1:-1] | interior[2:, 1:-1] | interior[1:-1, :-2] | interior[1:-1, 2:]
    claimable = ~boundary | next_to_interior
    expected = []
    for value in np.unique(labels):
        components, n = ndimage.label(labels == value)
        expected += [(components == k) & claimable for k in range(1, n + 1)]
    return [mask for mask in expected if mask.sum() > min_size]


def _assert_recovers(labels: np.ndarray, min_size: int):
    regions, count = postprocess.segment(postprocess.boundary_from_labels(labels), min_size)
    expected = _expected_regions(labels, min_size)
    assert count == len(expected)
    for mask in expected:
        assert ndimage.label(mask)[1] == 1, "test input must have a connected interior per region"
        ids = np.unique(regions[mask])
        assert len(ids) == 1 and ids[0] >= 0
        assert np.array_equal(regions == ids[0], mask)
    assert (regions[~np.any(expected, axis=0)] == -1).all()


def test_segment_keeps_a_3x3_cell_only_below_min_size_5():
    """FLOOD claims 5 pixels of a 3x3 cell inside another label (its centre and the middle of each
    side): a region at min_size 4, dropped at min_size 5 (hypothesis found this one)."""
    labels = np.kron(np.array([[1, 1, 1, 1], [1, 0, 1, 1], [1, 1, 1, 1]]), np.ones((3, 3), dtype=np.int64))
    for min_size, count in ((4, 2), (5, 1)):
        assert postprocess.segment(postprocess.boundary_from_labels(labels), min_size)[1] == count
        _assert_recovers(labels, min_size)


@FEW
@given(st.data())
def test_segment_recovers_rectangles_at_least_3_wide(data):
    """A grid of cells at least 3 pixels wide, neighbouring cells possibly sharing a label."""
    row_widths = data.draw(st.lists(st.integers(3, 7), min_size=1, max_size=4))
    col_widths = data.draw(st.lists(st.integers(3, 7), min_size=1, max_size=4))
    cells = data.draw(arrays(np.int64, (len(row_widths), len(col_widths)), elements=st.integers(0, 3)))
    labels = np.repeat(np.repeat(cells, row_widths, axis=0), col_widths, axis=1)
    _assert_recovers(labels, min_size=data.draw(st.integers(2, 5)))


@FEW
@given(st.lists(st.tuples(st.integers(1, 3), st.integers(3, 5)), min_size=1, max_size=4), st.integers(2, 4))
def test_segment_recovers_discs(discs, min_size):
    """Discs of radius 3-5 on a background, 4 pixels apart and from the edges."""
    size = 64
    yy, xx = np.mgrid[:size, :size]
    labels = np.zeros((size, size), dtype=np.int64)
    for i, (label, radius) in enumerate(discs):
        cy, cx = 10 + 15 * (i // 2) * 2, 10 + 30 * (i % 2)
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = label
    _assert_recovers(labels, min_size)


@SOME
@given(label_maps(max_side=14, max_labels=5))
def test_segment_never_spans_two_labels(labels):
    regions, count = postprocess.segment(postprocess.boundary_from_labels(labels), 0)
    for k in range(count):
        assert len(np.unique(labels[regions == k])) == 1


def test_segment_no_boundary_is_one_region_all_boundary_is_singletons():
    regions, count = postprocess.segment(np.zeros((5, 7), dtype=bool), 10)
    assert count == 1 and (regions == 0).all()
    regions, count = postprocess.segment(np.ones((5, 7), dtype=bool), 0)
    assert count == 35 and np.array_equal(regions.ravel(), np.arange(35))
    regions, count = postprocess.segment(np.ones((5, 7), dtype=bool), 1)
    assert count == 0 and (regions == -1).all()


@pytest.mark.parametrize("min_size", [1, 3, 10])
def test_segment_keeps_regions_of_more_than_min_size(min_size):
    """The paper author's rule: masks of more than min_size pixels stay. One row: min_size - 1
    cells, a 2-thick wall, min_size cells; each side claims one wall cell, so the masks have
    min_size and min_size + 1 pixels."""
    row = np.array([False] * (min_size - 1) + [True, True] + [False] * min_size)[None]
    regions, count = postprocess.segment(row, min_size)
    assert count == 1 and (regions[0, :min_size] == -1).all() and (regions[0, min_size:] == 0).all()
    assert postprocess.segment(row, min_size - 1)[1] == 2
    assert same_partition(regions, reference.segment(row, min_size)[0])


def test_segment_one_thick_boundary_does_not_stop_the_flood():
    boundary = np.zeros((5, 9), dtype=bool)
    boundary[:, 4] = True
    regions, count = postprocess.segment(boundary, 1)
    assert count == 1 and (regions == 0).all()
    boundary[:, 5] = True
    regions, count = postprocess.segment(boundary, 1)
    assert count == 2 and (regions[:, :5] == 0).all() and (regions[:, 5:] == 1).all()


def test_segment_4096_square_single_region():
    regions, count = postprocess.segment(np.zeros((4096, 4096), dtype=bool), 10)
    assert count == 1 and not regions.any()


def test_segment_4096_square_serpentine():
    """One region winding through the whole image: the worst case for a recursive flood."""
    boundary = np.zeros((4096, 4096), dtype=bool)
    walls = np.arange(2, 4092, 4)  # 2-thick walls on rows w, w + 1; open at alternating ends
    for w, left_open in zip(walls, np.arange(len(walls)) % 2 == 0):
        boundary[w : w + 2, slice(2, None) if left_open else slice(None, -2)] = True
    regions, count = postprocess.segment(boundary, 10)
    assert count == 1 and not regions.any()


# ----------------------------------------------------------------------------- boundary_regions


@FEW
@given(boundaries(max_side=16), st.floats(0.05, 0.95), st.integers(0, 4), st.integers(0, 6),
       st.sampled_from(postprocess.BOUNDARY_METHODS), st.integers(0, 2**32 - 1))
def test_boundary_regions_matches_reference(boundary, threshold, gap_iterations, min_size, method, seed):
    boundary_prob = np.random.default_rng(seed).random(boundary.shape).astype(np.float32)
    regions = postprocess.boundary_regions(boundary_prob, threshold, gap_iterations, min_size, boundary_method=method)
    expected = reference.boundary_regions(boundary_prob, threshold, gap_iterations, min_size, method)
    assert regions.dtype == np.int32 and np.array_equal(regions, expected)
    ready = postprocess.prepare_boundary if method == "paper" else postprocess.close_gaps
    assert np.array_equal(regions, postprocess.segment(ready(boundary_prob >= threshold, gap_iterations), min_size)[0])


@FEW
@given(wide_boundaries(), st.sampled_from([np.float32, np.float64]), st.integers(0, 6), st.integers(0, 3),
       st.integers(0, 2**32 - 1))
def test_boundary_regions_matches_reference_on_wide_rows(boundary, dtype, gap_iterations, min_size, seed):
    boundary_prob = np.random.default_rng(seed).random(boundary.shape).astype(dtype)
    regions = postprocess.boundary_regions(boundary_prob, 0.3, gap_iterations, min_size)
    assert np.array_equal(regions, reference.boundary_regions(boundary_prob, 0.3, gap_iterations, min_size))


@pytest.mark.parametrize("threshold", [0.7, 0.1 + 2**-40, 1 / 3, 1e-45, 1e300, -1e300])
def test_boundary_regions_thresholds_float32_as_float64(threshold):
    """float32 probabilities compare with the threshold as float64 values: those next to it on
    either side, and thresholds between two float32 values or beyond their range."""
    near = np.float32(threshold) if abs(threshold) < 1e38 else np.float32(0.5)
    values = np.array([np.nextafter(near, np.float32(-1)), near, np.nextafter(near, np.float32(1)), 0, 1], np.float32)
    boundary_prob = np.random.default_rng(1).choice(values, size=(12, 90))
    expected = reference.boundary_regions(boundary_prob, threshold, 1, 0)
    assert np.array_equal(postprocess.boundary_regions(boundary_prob, threshold, 1, 0), expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_boundary_regions_names_the_first_value_not_finite(dtype):
    boundary_prob = np.zeros((3, 130), dtype=dtype)
    boundary_prob[1, 100], boundary_prob[2, 5] = -np.inf, np.nan  # past the first 64-pixel word
    with pytest.raises(ValueError, match="boundary_prob: expected finite probabilities, got -inf"):
        postprocess.boundary_regions(boundary_prob)


def test_boundary_regions_default_is_the_paper_preparation():
    boundary_prob = np.random.default_rng(5).random((3, 30, 40))
    regions = postprocess.boundary_regions(boundary_prob)
    paper = postprocess.boundary_regions(boundary_prob, boundary_method="paper")
    close_gaps = postprocess.boundary_regions(boundary_prob, boundary_method="close_gaps")
    assert np.array_equal(regions, paper) and not np.array_equal(regions, close_gaps)
    with_channel = postprocess.boundary_regions(torch.from_numpy(boundary_prob[:, None]))
    assert isinstance(with_channel, torch.Tensor) and np.array_equal(with_channel.numpy(), regions)
    assert np.array_equal(postprocess.boundary_regions(boundary_prob[1]), regions[1])


# ----------------------------------------------------------------------------- dust_fill / argmax


def _assert_dust_fill_matches_reference(inputs):
    """Labels, and with return_masks the final masks and statistics, exactly the reference's; the
    labels are the statistics' argmax per mask."""
    probs, regions = inputs[:2]
    labels = postprocess.dust_fill(*inputs)
    expected_labels, expected_masks, expected_statistics = reference.dust_fill(*inputs, return_masks=True)
    assert labels.dtype == np.int64
    assert np.array_equal(labels, expected_labels)
    same_labels, masks, statistics = postprocess.dust_fill(*inputs, return_masks=True)
    assert np.array_equal(same_labels, labels)
    assert masks.dtype == np.int32 and masks.shape == regions.shape
    assert statistics.dtype == np.float64 and statistics.shape == (regions.max() + 1 + len(probs), len(probs))
    assert np.array_equal(masks, expected_masks)
    assert np.array_equal(statistics, expected_statistics)
    assert np.array_equal(labels, statistics.argmax(1)[masks])


@SOME
@given(dust_fill_inputs())
def test_dust_fill_matches_reference_exactly(inputs):
    _assert_dust_fill_matches_reference(inputs)


@settings(max_examples=300, deadline=None)
@given(segmented_outputs())
def test_dust_fill_matches_reference_on_segmented_outputs(inputs):
    """The frontier relaxation against the pseudo-code's stack and swap buffer: many regions, up
    to 90% of the pixels waiting, every round order and relaxation speed."""
    _assert_dust_fill_matches_reference(inputs)


@settings(max_examples=40, deadline=None)
@given(segmented_outputs(max_side=20, labels=(20, 40), any_mass=True))
def test_dust_fill_matches_reference_with_many_labels_and_any_mass(inputs):
    """Many labels (20-40: the float distances' lanes padded, their error bound growing with the
    count), and pixels too small or too large for float distances, which take exact ones."""
    _assert_dust_fill_matches_reference(inputs)


def _network_like_output(seed: int, side: int = 128, cells: int = 60, num_labels: int = 8):
    """Half the pixels unassigned, in bands along the borders of `cells` cells, nearly all of them
    under the paper's promotion threshold (0.5); probabilities that lean towards a label per cell."""
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, side, size=(cells, 2))
    yy, xx = np.mgrid[:side, :side]
    distance = np.abs(yy - seeds[:, 0, None, None]) + np.abs(xx - seeds[:, 1, None, None])
    regions = (distance + 2.0 * rng.random(distance.shape)).argmin(axis=0).astype(np.int32)
    score = rng.random((side, side)) - postprocess.boundary_from_labels(regions)
    regions.ravel()[np.argsort(score, axis=None)[: side * side // 2]] = -1
    favoured = np.eye(num_labels)[np.where(regions >= 0, regions, rng.integers(0, cells, (side, side))) % num_labels]
    probs = 0.8 * _probabilities(rng, num_labels, (side, side), "smooth", np.float64) + 0.2 * favoured.transpose(2, 0, 1)
    return probs.astype(np.float32), regions


@pytest.mark.parametrize("seed", range(3))
def test_dust_fill_visits_a_waiting_pixel_little_more_than_once(seed):
    """The relaxation's work: every waiting pixel joins at a visit, and the visits that fail are
    few (the pseudo-code visits every waiting pixel each round; visiting a pixel at each wake by
    a neighbour's join or a region's drift made about 3 visits per waiting pixel here, 1.3 now)."""
    probs, regions = _network_like_output(seed)
    new_threshold = postprocess.PAPER_SETTINGS["new_threshold"]  # 0.5: most unassigned pixels wait
    waiting = int(((regions < 0) & (probs.max(axis=0) < new_threshold)).sum())
    assert waiting > 0.9 * (regions < 0).sum()
    visits = torch.ops.unet._dust_fill_visits(
        torch.from_numpy(probs)[None], torch.from_numpy(regions)[None],
        torch.full((len(probs),), new_threshold, dtype=torch.float64),
        postprocess.JOIN_THRESHOLD, postprocess.IMPATIENCE)
    assert visits.shape == (1,) and waiting <= int(visits[0]) <= 1.5 * waiting


def test_dust_fill_masks_are_regions_grown_and_promoted_masks():
    """Region pixels keep their region, promoted pixels get M + label, and a region's statistics
    are the sums of the probabilities of its final pixels; promoted masks' rows are one-hot."""
    rng = np.random.default_rng(4)
    probs = rng.dirichlet(np.ones(4), size=(12, 15)).transpose(2, 0, 1)
    probs[:, 0, 0] = [0.0, 0.0, 0.95, 0.05]  # promoted to label 2
    regions = np.full((12, 15), -1, dtype=np.int32)
    regions[2:6, 2:6], regions[7:11, 8:14] = 0, 1
    labels, masks, statistics = postprocess.dust_fill(probs, regions, new_threshold=0.9, return_masks=True)
    assert (masks[regions >= 0] == regions[regions >= 0]).all() and masks[0, 0] == 2 + 2
    assert set(np.unique(masks)) <= {0, 1, 4, 5, 6, 7}
    for k in (0, 1):
        assert np.allclose(statistics[k], probs[:, masks == k].sum(axis=1), rtol=1e-12, atol=0)
    assert np.array_equal(statistics[2:], np.eye(4))
    assert np.array_equal(labels, statistics.argmax(1)[masks])


def test_dust_fill_masks_where_the_argmax_stands_in():
    """No region and nothing confident: each pixel is in its argmax label's promoted mask (M = 0)."""
    probs = np.random.default_rng(2).dirichlet(np.ones(3), size=(5, 6)).transpose(2, 0, 1)
    regions = np.full((5, 6), -1, dtype=np.int32)
    labels, masks, statistics = postprocess.dust_fill(probs, regions, 0.99, return_masks=True)
    assert np.array_equal(labels, probs.argmax(axis=0)) and np.array_equal(masks, labels)
    assert np.array_equal(statistics, np.eye(3))
    assert np.array_equal(reference.dust_fill(probs, regions, 0.99, 0.05, 1.5, return_masks=True)[2], statistics)


def test_dust_fill_masks_of_a_batch_and_of_torch_tensors():
    """A batch gives (B, H, W) masks and one statistics array per image (region counts differ);
    torch in, torch out."""
    probs, _, _, boundary = _batch_inputs()
    regions = postprocess.segment(boundary, 2)[0]
    regions[1][regions[1] >= 0] = 0  # one region in image 1
    labels, masks, statistics = postprocess.dust_fill(probs, regions, return_masks=True)
    assert masks.shape == regions.shape and isinstance(statistics, list) and len(statistics) == 3
    assert statistics[1].shape == (1 + 5, 5)
    for i in range(3):
        single = postprocess.dust_fill(probs[i], regions[i], return_masks=True)
        assert np.array_equal(labels[i], single[0]) and np.array_equal(masks[i], single[1])
        assert np.array_equal(statistics[i], single[2])
    as_torch = postprocess.dust_fill(torch.from_numpy(probs), torch.from_numpy(regions), return_masks=True)
    assert all(isinstance(s, torch.Tensor) and s.dtype == torch.float64 for s in as_torch[2])
    assert as_torch[1].dtype == torch.int32 and np.array_equal(as_torch[1].numpy(), masks)


def test_dust_fill_covering_regions_take_their_pooled_argmax():
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(6), size=(20, 30)).transpose(2, 0, 1)
    regions = (np.arange(20)[:, None] // 7) * 5 + np.arange(30)[None, :] // 7
    labels = postprocess.dust_fill(probs, regions.astype(np.int32))
    for k in np.unique(regions):
        assert (labels[regions == k] == probs[:, regions == k].sum(axis=1).argmax()).all()


def test_dust_fill_promotes_confident_pixels_and_grows_masks():
    probs = np.full((3, 5, 5), 1 / 3)
    probs[:, 2, 2] = [0.0, 0.9, 0.1]  # confident: promoted to label 1; everything else joins it
    regions = np.full((5, 5), -1, dtype=np.int32)
    assert (postprocess.dust_fill(probs, regions, 0.5) == 1).all()
    # nothing confident and no region: Algorithm 4 cannot start, the argmax stands in
    assert np.array_equal(postprocess.dust_fill(probs, regions, 0.95), probs.argmax(axis=0))


@FEW
@given(st.integers(1, 6), st.integers(1, 9), st.integers(1, 9), st.sampled_from(["smooth", "coarse"]), st.integers(0, 2**32 - 1))
def test_argmax_labels_first_maximum(num_labels, h, w, kind, seed):
    probs = _probabilities(np.random.default_rng(seed), num_labels, (h, w), kind, np.float32)
    assert np.array_equal(postprocess.argmax_labels(probs), np.argmax(probs, axis=0))


# ----------------------------------------------------------------------------- postprocess


@FEW
@given(dust_fill_inputs(), st.floats(0.1, 0.9), st.integers(0, 3), st.integers(0, 2**32 - 1),
       st.sampled_from(postprocess.BOUNDARY_METHODS))
def test_postprocess_matches_reference_chain(inputs, boundary_threshold, gap_iterations, seed, method):
    probs, _, new_threshold, join_threshold, impatience = inputs
    boundary_prob = np.random.default_rng(seed).random(probs.shape[1:])
    args = (boundary_threshold, gap_iterations, 3, new_threshold, join_threshold, impatience)
    labels, regions = postprocess.postprocess(probs, boundary_prob, *args, boundary_method=method, return_regions=True)
    expected_labels, expected_regions = reference.postprocess(probs, boundary_prob, *args, method)
    assert np.array_equal(labels, expected_labels)
    assert np.array_equal(regions, expected_regions)


@pytest.mark.parametrize("method", ["paper", "close_gaps"])
def test_postprocess_matches_reference_on_a_noisy_prediction(method):
    """A 96x128 label map of overlapping shapes, a noisy softmax and a speckled boundary with gaps:
    the whole chain matches the reference exactly (labels and regions)."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[:96, :128]
    labels = np.zeros((96, 128), dtype=np.int64)
    for _ in range(12):
        cy, cx, ry, rx = rng.integers(0, 96), rng.integers(0, 128), rng.integers(4, 25), rng.integers(4, 25)
        labels[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = rng.integers(1, 8)
    logits = rng.normal(size=(8, 96, 128)) + 3.0 * np.eye(8)[labels].transpose(2, 0, 1)
    probs = torch.softmax(torch.from_numpy(logits), dim=0).float().numpy()
    edge = reference.boundary_from_labels(labels)
    boundary_prob = np.clip(0.8 * edge + 0.3 * rng.random(edge.shape) - 0.4 * (rng.random(edge.shape) < 0.1), 0, 1)
    args = (0.5, 3, 10, 0.5, 0.05, 1.5)
    labels_out, regions = postprocess.postprocess(probs, boundary_prob, *args, boundary_method=method, return_regions=True)
    expected_labels, expected_regions = reference.postprocess(probs, boundary_prob, *args, method)
    assert np.array_equal(regions, expected_regions) and regions.max() >= 3
    assert np.array_equal(labels_out, expected_labels)


def test_postprocess_recovers_a_clean_prediction():
    """Exact boundaries, confused probabilities: every pixel of a region gets its true label;
    only the corner cells left to DUST_FILL's joining may not."""
    labels = np.zeros((40, 50), dtype=np.int64)
    labels[5:25, 5:20], labels[10:35, 25:45], labels[28:36, 3:15] = 1, 2, 3
    rng = np.random.default_rng(0)
    noise = rng.dirichlet(np.ones(4), size=labels.shape).transpose(2, 0, 1)
    probs = 0.3 * np.eye(4)[labels].transpose(2, 0, 1) + 0.7 * noise
    boundary_prob = postprocess.boundary_from_labels(labels).astype(np.float32)
    result, regions = postprocess.postprocess(probs, boundary_prob, gap_iterations=0, min_size=2, new_threshold=1.01, return_regions=True)
    assert np.array_equal(result[regions >= 0], labels[regions >= 0])
    assert (regions < 0).sum() <= 4 * 4 + 4, "only corners are unassigned"
    assert (postprocess.argmax_labels(probs) != labels).sum() > 10 * (result != labels).sum()


# ----------------------------------------------------------------------------- input forms


def _batch_inputs():
    """probs, boundary_prob, label map and boundary map of a batch of 3 images."""
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(5), size=(3, 17, 23)).transpose(0, 3, 1, 2).astype(np.float32)
    boundary_prob = rng.random((3, 17, 23)).astype(np.float32)
    labels = rng.integers(0, 3, size=(3, 17, 23))
    return probs, boundary_prob, labels, boundary_prob > 0.5


CALLS = {
    "boundary_from_labels": lambda p, b, l, m: postprocess.boundary_from_labels(l),
    "close_gaps": lambda p, b, l, m: postprocess.close_gaps(m, 2),
    "prepare_boundary": lambda p, b, l, m: postprocess.prepare_boundary(m, 2),
    "segment": lambda p, b, l, m: postprocess.segment(m, 2)[0],
    "boundary_regions": lambda p, b, l, m: postprocess.boundary_regions(b, gap_iterations=1, min_size=2),
    "dust_fill": lambda p, b, l, m: postprocess.dust_fill(p, postprocess.segment(m, 2)[0]),
    "argmax_labels": lambda p, b, l, m: postprocess.argmax_labels(p),
    "postprocess": lambda p, b, l, m: postprocess.postprocess(p, b, gap_iterations=1, min_size=2),
}


@pytest.mark.parametrize("name", CALLS)
def test_batch_equals_single_images_and_torch_equals_numpy(name):
    call = CALLS[name]
    inputs = _batch_inputs()
    batch = call(*inputs)
    assert isinstance(batch, np.ndarray)
    for i in range(len(inputs[0])):
        assert np.array_equal(batch[i], call(*(a[i] for a in inputs)))
    as_torch = call(*map(torch.from_numpy, inputs))
    assert isinstance(as_torch, torch.Tensor) and np.array_equal(as_torch.numpy(), batch)


def _read_only(array):
    array = array.copy()
    array.flags.writeable = False
    return array


LAYOUTS = {
    "fortran": np.asfortranarray,
    "sliced": lambda a: a[..., ::2],
    "reversed": lambda a: a[..., ::-1],
    "big-endian": lambda a: a.astype(a.dtype.newbyteorder(">")),
    "read-only": _read_only,
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", CALLS)
def test_any_memory_layout(name, layout):
    call, change = CALLS[name], LAYOUTS[layout]
    inputs = _batch_inputs()
    expected = call(*(np.ascontiguousarray(change(a)) for a in inputs))
    assert np.array_equal(call(*(change(a) for a in inputs)), expected)
    # a transposed torch view
    transposed = [torch.from_numpy(np.ascontiguousarray(np.swapaxes(a, -1, -2))).transpose(-1, -2) for a in inputs]
    assert np.array_equal(call(*transposed).numpy(), call(*inputs))


def test_thin_and_degenerate_images():
    for shape in [(1, 1), (1, 9), (9, 1)]:
        rng = np.random.default_rng(sum(shape))
        labels = rng.integers(0, 2, size=shape)
        boundary = postprocess.boundary_from_labels(labels)
        assert np.array_equal(boundary, reference.boundary_from_labels(labels))
        assert same_partition(postprocess.segment(boundary, 1)[0], reference.segment(boundary, 1)[0])
        probs = rng.dirichlet(np.ones(3), size=shape).transpose(2, 0, 1)
        assert np.array_equal(postprocess.postprocess(probs, boundary * 1.0, min_size=1), reference.postprocess(probs, boundary * 1.0, postprocess.BOUNDARY_THRESHOLD, 5, 1, postprocess.NEW_THRESHOLD, 0.05, 1.5)[0])
    empty = postprocess.segment(np.zeros((0, 4), dtype=bool), 1)
    assert empty[0].shape == (0, 4) and empty[1] == 0


def test_postprocess_returns_masks_and_statistics():
    """return_masks gives DUST_FILL's masks and statistics of the chain's regions; with
    return_regions too, (labels, regions, masks, statistics)."""
    probs, boundary_prob, _, _ = _batch_inputs()
    labels, regions = postprocess.postprocess(probs, boundary_prob, return_regions=True)
    expected = postprocess.dust_fill(probs, regions, return_masks=True)
    got = postprocess.postprocess(probs, boundary_prob, return_masks=True)
    got_all = postprocess.postprocess(probs, boundary_prob, return_regions=True, return_masks=True)
    assert len(got) == 3 and len(got_all) == 4 and np.array_equal(got_all[1], regions)
    for result in (got, got_all[:1] + got_all[2:]):
        assert np.array_equal(result[0], labels) and np.array_equal(result[1], expected[1])
        assert all(np.array_equal(a, b) for a, b in zip(result[2], expected[2], strict=True))
    single = postprocess.postprocess(probs[0], boundary_prob[0], return_regions=True, return_masks=True)
    assert np.array_equal(single[2], expected[1][0]) and np.array_equal(single[3], expected[2][0])


def test_boundary_prob_with_channel_and_regions_returned():
    probs, boundary_prob, _, _ = _batch_inputs()
    labels = postprocess.postprocess(torch.from_numpy(probs), torch.from_numpy(boundary_prob[:, None]))
    labels2, regions = postprocess.postprocess(probs, boundary_prob, return_regions=True)
    assert np.array_equal(labels.numpy(), labels2) and regions.dtype == np.int32 and regions.shape == labels2.shape
    single = postprocess.postprocess(probs[0], boundary_prob[0][None])
    assert np.array_equal(single, labels2[0])


# ----------------------------------------------------------------------------- errors


P = np.full((2, 4, 5), 0.5, dtype=np.float32)
R = np.zeros((4, 5), dtype=np.int32)
B = np.zeros((4, 5), dtype=bool)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: postprocess.boundary_from_labels(np.zeros(5, dtype=np.int64)), ValueError, "labels: expected shape"),
        (lambda: postprocess.boundary_from_labels(np.zeros((3, 3))), TypeError, "labels: expected an integer"),
        (lambda: postprocess.boundary_from_labels([[1, 2]]), TypeError, "labels: expected a torch.Tensor"),
        (lambda: postprocess.close_gaps(B, -1), ValueError, "iterations: expected a non-negative"),
        (lambda: postprocess.close_gaps(B, 1.5), TypeError, "iterations: expected an int"),
        (lambda: postprocess.close_gaps(B.astype(np.uint8), 1), TypeError, "boundary: expected bool"),
        (lambda: postprocess.prepare_boundary(B, -1), ValueError, "iterations: expected a non-negative"),
        (lambda: postprocess.prepare_boundary(B.astype(np.float32)), TypeError, "boundary: expected bool"),
        (lambda: postprocess.prepare_boundary(np.zeros(4, dtype=bool)), ValueError, "boundary: expected shape"),
        (lambda: postprocess.boundary_regions(np.zeros((4, 5)), boundary_method="scipy"), ValueError, "boundary_method: expected one of"),
        (lambda: postprocess.boundary_regions(np.zeros((4, 5)), boundary_method=None), TypeError, "boundary_method: expected a str"),
        (lambda: postprocess.boundary_regions(np.zeros((4, 5), dtype=bool)), TypeError, "boundary_prob: expected float32"),
        (lambda: postprocess.boundary_regions(np.full((4, 5), np.nan)), ValueError, "boundary_prob: expected finite"),
        (lambda: postprocess.boundary_regions(np.zeros((2, 3, 4, 5))), ValueError, "boundary_prob: expected shape"),
        (lambda: postprocess.boundary_regions(np.zeros((4, 5)), min_size=-1), ValueError, "min_size"),
        (lambda: postprocess.postprocess(P, np.zeros((4, 5)), boundary_method="Paper"), ValueError, "boundary_method"),
        (lambda: postprocess.segment(B, -3), ValueError, "min_size: expected a non-negative"),
        (lambda: postprocess.segment(np.zeros((1, 2, 3, 4), dtype=bool)), ValueError, "boundary: expected shape"),
        (lambda: postprocess.segment(np.zeros((4, 5))), TypeError, "boundary: expected bool"),
        (lambda: postprocess.dust_fill(P, R[:, :4]), ValueError, "regions: expected shape"),
        (lambda: postprocess.dust_fill(P.astype(np.float16), R), TypeError, "probs: expected float32 or float64"),
        (lambda: postprocess.dust_fill(P[0], R), ValueError, "probs: expected shape"),
        (lambda: postprocess.dust_fill(np.zeros((0, 4, 5)), R), ValueError, "probs: expected at least one label"),
        (lambda: postprocess.dust_fill(P, R.astype(np.float32)), TypeError, "regions: expected an integer"),
        (lambda: postprocess.dust_fill(P, R - 2), ValueError, "regions: expected ids"),
        (lambda: postprocess.dust_fill(np.where(R == 0, np.nan, P), R), ValueError, "probs: expected finite"),
        (lambda: postprocess.dust_fill(P * np.inf, R - 1), ValueError, "probs: expected finite"),
        (lambda: postprocess.dust_fill(-P, R), ValueError, "probs: expected finite, non-negative"),
        (lambda: postprocess.argmax_labels(P - 1), ValueError, "probs: expected finite, non-negative"),
        (lambda: postprocess.dust_fill(P, R, new_threshold=-0.1), ValueError, "new_threshold: expected non-negative"),
        (lambda: postprocess.dust_fill(P, R, new_threshold=[0.5]), ValueError, "new_threshold: expected 2 thresholds"),
        (lambda: postprocess.dust_fill(P, R, new_threshold="a"), TypeError, "new_threshold"),
        (lambda: postprocess.dust_fill(P, R, join_threshold=0.0), ValueError, "join_threshold: expected a finite number > 0"),
        (lambda: postprocess.dust_fill(P, R, join_threshold=float("nan")), ValueError, "join_threshold"),
        (lambda: postprocess.dust_fill(P, R, impatience=1.0), ValueError, "impatience: expected a finite number > 1"),
        (lambda: postprocess.dust_fill(P, R, impatience=None), TypeError, "impatience: expected a real number"),
        (lambda: postprocess.dust_fill(P, R, join_threshold=1e-300, impatience=1.0001), ValueError, "relaxation rounds"),
        (lambda: postprocess.postprocess(P, np.full((4, 5), np.inf)), ValueError, "boundary_prob: expected finite"),
        (lambda: postprocess.postprocess(P, np.zeros((4, 6))), ValueError, "boundary_prob: expected shape"),
        (lambda: postprocess.postprocess(P, np.zeros((4, 5), dtype=np.int64)), TypeError, "boundary_prob: expected float32"),
        (lambda: postprocess.postprocess(P, np.zeros((4, 5)), boundary_threshold=float("inf")), ValueError, "boundary_threshold"),
        (lambda: postprocess.postprocess(P, np.zeros((4, 5)), gap_iterations=-1), ValueError, "gap_iterations"),
        (lambda: postprocess.postprocess(P, np.zeros((4, 5)), min_size=-1), ValueError, "min_size"),
    ],
)
def test_bad_input_raises_naming_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -1.0])
def test_a_bad_value_anywhere_is_found(dtype, bad):
    """The read pass checks 8 labels of several pixels at once: a bad value is found in any label
    of any pixel, of a region or unassigned (promoted or waiting), and -0.0 passes."""
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(21), size=(6, 20)).transpose(2, 0, 1).astype(dtype)
    probs[3, :, 10:] += 2.0  # the unassigned right half: confident (promoted) but for row 5
    probs /= probs.sum(0)
    regions = np.full((6, 20), -1, dtype=np.int32)
    regions[:, :10] = 0
    for label in (0, 7, 8, 20):
        for y, x in ((1, 0), (1, 5), (2, 9), (0, 10), (2, 14), (4, 19), (5, 12)):
            broken = probs.copy()
            broken[label, y, x] = bad
            with pytest.raises(ValueError, match="probs: expected finite, non-negative"):
                postprocess.dust_fill(broken, regions, new_threshold=0.5)
            broken[label, y, x] = -0.0
            postprocess.dust_fill(broken, regions, new_threshold=0.5)


def test_absurd_label_and_region_counts_are_refused_before_any_work():
    """Statistics are regions x labels: counts whose product passes 2^28 fail with a clear error,
    before the (broadcast, never materialized) probabilities are touched. (The kernel's own
    check needs probabilities of over 2^28 values to trigger: regions never outnumber pixels.)"""
    too_many_labels = torch.zeros(1, 1, 1).expand(postprocess.MAX_STATISTICS + 1, 2, 2)
    with pytest.raises(ValueError, match="probs: expected at most 268435456 labels"):
        postprocess.dust_fill(too_many_labels, np.zeros((2, 2), dtype=np.int32))
    labels = 2**10
    regions = np.arange(2**18 + 1, dtype=np.int32).reshape(1, -1)  # 2^18 + 1 regions
    probs = torch.zeros(1, 1, 1).expand(labels, *regions.shape)
    with pytest.raises(ValueError, match="dust_fill: 262145 regions x 1024 labels need 268436480 label statistics"):
        postprocess.dust_fill(probs, regions)
    labels = 2**14  # (regions + labels) x labels returned statistics: refused; without them, fine
    probs = torch.zeros(1, 1, 1).expand(labels, 1, 2)
    with pytest.raises(ValueError, match="return_masks: 1 regions \\+ 16384 labels x 16384 labels"):
        postprocess.dust_fill(probs, np.zeros((1, 2), dtype=np.int32), return_masks=True)
    with pytest.raises(ValueError, match="return_masks: 1 regions \\+ 16384 labels x 16384 labels"):
        torch.ops.unet.dust_fill_masks(probs[None], torch.zeros(1, 1, 2, dtype=torch.int32), torch.zeros(labels, dtype=torch.float64), 0.05, 1.5)
    assert (postprocess.dust_fill(probs, np.zeros((1, 2), dtype=np.int32)) == 0).all()


def test_many_labels_on_a_small_image():
    """Memory is regions x labels, not labels squared: 20,000 labels on 4x4 pixels (the reference
    keeps one-hot statistics per label, so it is not asked)."""
    rng = np.random.default_rng(0)
    probs = 0.5 * rng.dirichlet(np.ones(20000), size=(4, 4)).transpose(2, 0, 1).astype(np.float32)
    probs[7, :, :2] += 0.5  # region 0 is label 7, region 1 label 19999; the middle column waits
    probs[19999, :, 3] += 0.5
    probs[[7, 19999], :, 2] += 0.25
    regions = np.array([[0, 0, -1, 1]] * 4, dtype=np.int32)
    labels = postprocess.dust_fill(probs, regions, new_threshold=1.1)
    assert (labels[:, :2] == 7).all() and (labels[:, 3] == 19999).all() and set(labels[:, 2]) <= {7, 19999}


def test_ops_check_their_inputs_too():
    """Direct torch.ops callers get the same kind of errors from the C++ checks."""
    with pytest.raises(ValueError, match="probs: expected a \\(B, L, H, W\\)"):
        torch.ops.unet.argmax_labels(torch.zeros(3, 3))
    with pytest.raises(TypeError, match="boundary: expected dtype"):
        torch.ops.unet.segment(torch.zeros(1, 3, 3), 1)
    with pytest.raises(ValueError, match="boundary_method: expected 'paper' or 'close_gaps', got 'x'"):
        torch.ops.unet.boundary_regions(torch.zeros(1, 3, 3), 0.5, "x", 1, 1)
    with pytest.raises(ValueError, match="impatience"):
        torch.ops.unet.dust_fill(torch.ones(1, 2, 3, 3), torch.zeros(1, 3, 3, dtype=torch.int32), torch.ones(2, dtype=torch.float64), 0.1, 0.5)
