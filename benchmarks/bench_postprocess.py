"""Post-processing speed on one 512x512 image with 24 labels, one CPU thread.

The input imitates a network's output: a label map of overlapping ellipses and rectangles,
label probabilities that are a noisy softmax around it (a little confusion everywhere, more near
the edges of shapes), and a boundary probability that is high on the label map's 2-thick
boundary, with speckle and gaps. Compared: the C++ ops, the plain Python reference of
tests/postprocess_reference.py (one round: it takes seconds), and scipy.ndimage.label for
`segment`. Targets: postprocess <= 10 ms, segment no slower than scipy.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from unet import postprocess
from unet.labels import NUM_LABELS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import postprocess_reference as reference  # noqa: E402

SIZE = 512
SEED = 0


def _label_map(rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    labels = np.zeros((SIZE, SIZE), dtype=np.int64)
    for _ in range(40):
        label = rng.integers(1, NUM_LABELS)
        cy, cx = rng.integers(0, SIZE, size=2)
        ry, rx = rng.integers(8, 90, size=2)
        if rng.random() < 0.5:
            inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        else:
            inside = (abs(yy - cy) <= ry) & (abs(xx - cx) <= rx)
        labels[inside] = label
    return labels


def _inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED)
    labels = _label_map(rng)
    edge = postprocess.boundary_from_labels(labels)
    logits = rng.normal(0.0, 1.0, size=(NUM_LABELS, SIZE, SIZE)) + 4.0 * np.eye(NUM_LABELS)[labels].transpose(2, 0, 1)
    logits -= 2.5 * edge * rng.random((SIZE, SIZE))  # less confident near edges
    probs = torch.softmax(torch.from_numpy(logits), dim=0).float().numpy()
    boundary_prob = np.clip(0.8 * edge + 0.25 * rng.random((SIZE, SIZE)) - 0.3 * (rng.random((SIZE, SIZE)) < 0.05), 0, 1)
    boundary = boundary_prob >= postprocess.BOUNDARY_THRESHOLD
    return {
        "probs": probs,
        "boundary_prob": boundary_prob.astype(np.float32),
        "boundary": boundary,
        "closed": postprocess.close_gaps(boundary),
    }


@pytest.fixture(scope="module")
def inputs():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield _inputs()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def regions(inputs):
    return postprocess.segment(inputs["closed"])[0]


def _once(benchmark, fn, *args):
    """One round of a slow reference: enough to compare, short enough for --benchmark-disable."""
    return benchmark.pedantic(fn, args=args, rounds=1, iterations=1)


@pytest.mark.benchmark(group="segment 512x512")
def test_segment_cpp(benchmark, inputs):
    benchmark(postprocess.segment, inputs["closed"], postprocess.MIN_SIZE)


@pytest.mark.benchmark(group="segment 512x512")
def test_segment_scipy_label(benchmark, inputs):
    ndimage = pytest.importorskip("scipy.ndimage")
    benchmark(ndimage.label, ~inputs["closed"])


@pytest.mark.benchmark(group="segment 512x512")
def test_segment_reference(benchmark, inputs):
    _once(benchmark, reference.segment, inputs["closed"], postprocess.MIN_SIZE)


@pytest.mark.benchmark(group="close_gaps 512x512")
def test_close_gaps_cpp(benchmark, inputs):
    benchmark(postprocess.close_gaps, inputs["boundary"], postprocess.GAP_ITERATIONS)


@pytest.mark.benchmark(group="dust_fill 512x512x24")
def test_dust_fill_cpp(benchmark, inputs, regions):
    benchmark(postprocess.dust_fill, inputs["probs"], regions)


@pytest.mark.benchmark(group="dust_fill 512x512x24")
def test_dust_fill_reference(benchmark, inputs, regions):
    args = (postprocess.NEW_THRESHOLD, postprocess.JOIN_THRESHOLD, postprocess.IMPATIENCE)
    _once(benchmark, reference.dust_fill, inputs["probs"], regions, *args)


@pytest.mark.benchmark(group="postprocess 512x512x24")
def test_postprocess_cpp(benchmark, inputs):
    benchmark(postprocess.postprocess, inputs["probs"], inputs["boundary_prob"])


@pytest.mark.benchmark(group="postprocess 512x512x24")
def test_argmax_cpp(benchmark, inputs):
    benchmark(postprocess.argmax_labels, inputs["probs"])


@pytest.mark.benchmark(group="postprocess 512x512x24")
def test_postprocess_reference(benchmark, inputs):
    p = postprocess
    args = (p.BOUNDARY_THRESHOLD, p.GAP_ITERATIONS, p.MIN_SIZE, p.NEW_THRESHOLD, p.JOIN_THRESHOLD, p.IMPATIENCE)
    _once(benchmark, reference.postprocess, inputs["probs"], inputs["boundary_prob"], *args)
