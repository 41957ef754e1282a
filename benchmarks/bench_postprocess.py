"""Post-processing speed on one 512x512 image with 24 labels, one CPU thread.

Three inputs, each drawn around a seeded label map of overlapping ellipses and rectangles; the
figures below are at the paper's settings (boundary threshold 0.5, promotion threshold 0.5):

* ``clean``: a noisy softmax around the label map (a little confusion everywhere, more near the
  edges of shapes) and a boundary probability that is high on the label map's 2-thick boundary,
  with speckle and gaps; SEGMENT leaves about 2% of the pixels unassigned, in some 260 regions;
* ``model``: shaped like a trained network's output: smooth noisy probabilities (low-frequency
  noise on every label, under 0.5 on about a third of the pixels), a thick, blurred boundary
  probability with spurious blobs; SEGMENT leaves about a third of the pixels unassigned (two
  thirds of those under 0.5, left to DUST_FILL's relaxation), in some 280 regions;
* ``heavy``: the same with boundary over most of the picture: about 60% unassigned, 360 regions.

At the library's defaults (boundary threshold 0.7, promotion threshold 0.2) ``model`` leaves 25%
unassigned and ``heavy`` 48%, of which about 6% and 7% of the pixels wait for the relaxation.
`test_inputs_look_as_documented` checks those statistics. Compared on each: the whole chain
(`postprocess`), `boundary_regions` and `dust_fill` alone, our `argmax_labels`, and NumPy's
``argmax(0)`` of the same probabilities, the yardstick (target: the chain at most 10 ms and at
most 0.5x NumPy's argmax). On ``clean`` also the plain Python reference of
tests/postprocess_reference.py (one round: it takes seconds) and `scipy.ndimage.label` for
`segment`. Run pinned to one core, e.g. ``taskset -c 0 pytest benchmarks/bench_postprocess.py``.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import postprocess_reference as reference
from unet import postprocess
from unet.labels import NUM_LABELS

SIZE = 512
SEED = 0
INPUTS = ("clean", "model", "heavy")
pytestmark = pytest.mark.usefixtures("one_thread")  # the timings are one thread's (root conftest.py)


def _label_map(rng: np.random.Generator, shapes: int) -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    labels = np.zeros((SIZE, SIZE), dtype=np.int64)
    for _ in range(shapes):
        label = rng.integers(1, NUM_LABELS)
        cy, cx = rng.integers(0, SIZE, size=2)
        ry, rx = rng.integers(8, 90, size=2)
        if rng.random() < 0.5:
            inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        else:
            inside = (abs(yy - cy) <= ry) & (abs(xx - cx) <= rx)
        labels[inside] = label
    return labels


def _smooth_noise(rng: np.random.Generator, channels: int, cell: int) -> np.ndarray:
    """Standard normal noise on a grid of `cell`-pixel cells, interpolated: (channels, SIZE, SIZE)."""
    coarse = torch.from_numpy(rng.normal(size=(1, channels, SIZE // cell + 2, SIZE // cell + 2)))
    return F.interpolate(coarse, size=(SIZE, SIZE), mode="bicubic", align_corners=False)[0].numpy()


def _blur(image: np.ndarray, radius: int) -> np.ndarray:
    """Two box filters of width 2 * radius + 1 (about a Gaussian)."""
    blurred = torch.from_numpy(image.astype(np.float64))[None, None]
    for _ in range(2):
        blurred = F.avg_pool2d(blurred, 2 * radius + 1, 1, radius, count_include_pad=False)
    return blurred[0, 0].numpy()


def _clean(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    labels = _label_map(rng, shapes=40)
    edge = postprocess.boundary_from_labels(labels)
    logits = rng.normal(0.0, 1.0, size=(NUM_LABELS, SIZE, SIZE)) + 4.0 * np.eye(NUM_LABELS)[labels].transpose(2, 0, 1)
    logits -= 2.5 * edge * rng.random((SIZE, SIZE))  # less confident near edges
    probs = torch.softmax(torch.from_numpy(logits), dim=0).float().numpy()
    boundary_prob = np.clip(0.8 * edge + 0.25 * rng.random((SIZE, SIZE)) - 0.3 * (rng.random((SIZE, SIZE)) < 0.05), 0, 1)
    return probs, boundary_prob.astype(np.float32)


def _model_like(rng: np.random.Generator, boundary_bias: float) -> tuple[np.ndarray, np.ndarray]:
    """Smooth, unsure probabilities and a thick blurred boundary with blobs; `boundary_bias` sets
    how much of the picture the boundary covers."""
    labels = _label_map(rng, shapes=28)
    near_edge = np.minimum(4.0 * _blur(postprocess.boundary_from_labels(labels), 4), 1.0)
    one_hot = np.eye(NUM_LABELS)[labels].transpose(2, 0, 1)
    noise = 1.0 * _smooth_noise(rng, NUM_LABELS, 24) + 0.5 * rng.normal(size=one_hot.shape)
    logits = (4.5 - 3.0 * near_edge) * one_hot + noise
    probs = torch.softmax(torch.from_numpy(logits), dim=0).float().numpy()
    boundary_logit = 8.0 * near_edge + 2.0 * _smooth_noise(rng, 1, 64)[0] + 0.3 * rng.normal(size=labels.shape)
    boundary_prob = 1.0 / (1.0 + np.exp(-(boundary_logit + boundary_bias)))
    return probs, boundary_prob.astype(np.float32)


def _inputs(kind: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED)
    if kind == "clean":
        probs, boundary_prob = _clean(rng)
    else:
        probs, boundary_prob = _model_like(rng, boundary_bias={"model": -2.0, "heavy": 0.0}[kind])
    return {"probs": probs, "boundary_prob": boundary_prob, "regions": postprocess.boundary_regions(boundary_prob)}


@pytest.fixture(scope="module", params=INPUTS)
def inputs(request):
    return _inputs(request.param)


@pytest.fixture(scope="module")
def clean():
    return _inputs("clean")


def test_inputs_look_as_documented():
    """Unassigned share, region count and share of pixels left to DUST_FILL's relaxation (not
    promoted) of each input, at the paper's settings and at the library's defaults."""
    paper = postprocess.PAPER_SETTINGS
    expected = {"clean": ((0.0, 0.05), (150, 400)), "model": ((0.25, 0.4), (200, 350)), "heavy": ((0.5, 0.7), (250, 450))}
    unassigned_at_defaults = {"model": (0.2, 0.3), "heavy": (0.4, 0.55)}
    for kind, (unassigned_range, regions_range) in expected.items():
        data = _inputs(kind)
        most = data["probs"].max(axis=0)
        regions = postprocess.boundary_regions(data["boundary_prob"], boundary_threshold=paper["boundary_threshold"])
        unassigned = regions < 0
        waiting = unassigned & (most < paper["new_threshold"])
        assert unassigned_range[0] <= unassigned.mean() <= unassigned_range[1], (kind, unassigned.mean())
        assert regions_range[0] <= regions.max() + 1 <= regions_range[1], (kind, regions.max() + 1)
        if kind == "clean":
            continue
        assert waiting.mean() > 0.15, (kind, waiting.mean())
        assert 0.25 < (most < 0.5).mean() < 0.45, "about a third of the pixels unsure"
        unassigned = data["regions"] < 0  # at the defaults
        waiting = unassigned & (most < postprocess.NEW_THRESHOLD)
        low, high = unassigned_at_defaults[kind]
        assert low <= unassigned.mean() <= high, (kind, unassigned.mean())
        assert 0.04 < waiting.mean() < 0.1, (kind, waiting.mean())


def test_boundary_regions_matches_reference(inputs):
    """The regions of each input (threshold, the paper's preparation, SEGMENT at the library's
    defaults) are the plain Python reference's, pixel for pixel."""
    expected = reference.boundary_regions(
        inputs["boundary_prob"], postprocess.BOUNDARY_THRESHOLD, postprocess.GAP_ITERATIONS, postprocess.MIN_SIZE
    )
    assert np.array_equal(inputs["regions"], expected)


@pytest.mark.benchmark(group="postprocess 512x512x24")
def test_postprocess_cpp(benchmark, inputs):
    benchmark(postprocess.postprocess, inputs["probs"], inputs["boundary_prob"])


@pytest.mark.benchmark(group="postprocess 512x512x24")
def test_argmax_cpp(benchmark, inputs):
    benchmark(postprocess.argmax_labels, inputs["probs"])


@pytest.mark.benchmark(group="postprocess 512x512x24")
def test_argmax_numpy(benchmark, inputs):
    benchmark(inputs["probs"].argmax, 0)


@pytest.mark.benchmark(group="boundary_regions 512x512")
def test_boundary_regions_cpp(benchmark, inputs):
    benchmark(postprocess.boundary_regions, inputs["boundary_prob"])


@pytest.mark.benchmark(group="dust_fill 512x512x24")
def test_dust_fill_cpp(benchmark, inputs):
    benchmark(postprocess.dust_fill, inputs["probs"], inputs["regions"])


def _once(benchmark, fn, *args):
    """One round of a slow reference: enough to compare, short enough for --benchmark-disable."""
    return benchmark.pedantic(fn, args=args, rounds=1, iterations=1)


@pytest.fixture(scope="module")
def boundary(clean):
    return clean["boundary_prob"] >= postprocess.BOUNDARY_THRESHOLD


@pytest.mark.benchmark(group="segment 512x512")
def test_segment_cpp(benchmark, boundary):
    prepared = postprocess.prepare_boundary(boundary)
    benchmark(postprocess.segment, prepared, postprocess.MIN_SIZE)


@pytest.mark.benchmark(group="segment 512x512")
def test_segment_scipy_label(benchmark, boundary):
    ndimage = pytest.importorskip("scipy.ndimage")
    benchmark(ndimage.label, ~postprocess.prepare_boundary(boundary))


@pytest.mark.benchmark(group="segment 512x512")
def test_segment_reference(benchmark, boundary):
    _once(benchmark, reference.segment, postprocess.prepare_boundary(boundary), postprocess.MIN_SIZE)


@pytest.mark.benchmark(group="boundary preparation 512x512")
def test_prepare_boundary_cpp(benchmark, boundary):
    benchmark(postprocess.prepare_boundary, boundary, postprocess.GAP_ITERATIONS)


@pytest.mark.benchmark(group="boundary preparation 512x512")
def test_close_gaps_cpp(benchmark, boundary):
    benchmark(postprocess.close_gaps, boundary, postprocess.GAP_ITERATIONS)


@pytest.mark.benchmark(group="dust_fill 512x512x24")
def test_dust_fill_reference(benchmark, clean):
    args = (postprocess.NEW_THRESHOLD, postprocess.JOIN_THRESHOLD, postprocess.IMPATIENCE)
    _once(benchmark, reference.dust_fill, clean["probs"], clean["regions"], *args)


@pytest.mark.benchmark(group="postprocess 512x512x24")
def test_postprocess_reference(benchmark, clean):
    p = postprocess
    args = (p.BOUNDARY_THRESHOLD, p.GAP_ITERATIONS, p.MIN_SIZE, p.NEW_THRESHOLD, p.JOIN_THRESHOLD, p.IMPATIENCE)
    _once(benchmark, reference.postprocess, clean["probs"], clean["boundary_prob"], *args)
