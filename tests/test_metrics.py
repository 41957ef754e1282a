"""ConfusionMatrix against hand-computed matrices and a NumPy reference; merging and reduction."""

import json
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from unet.labels import LABELS
from unet.metrics import ConfusionMatrix, format_table


def hand_example():
    """3 labels; label 2 is never true and never predicted."""
    target = torch.tensor([[0, 0, 1], [1, 1, 0]])
    pred = torch.tensor([[0, 1, 1], [1, 0, 0]])
    # rows = truth: truth 0 -> pred (0, 1, 0); truth 1 -> pred (1, 1, 1)
    expected = [[2, 1, 0], [1, 2, 0], [0, 0, 0]]
    return pred, target, expected


def test_hand_computed_matrix_and_figures():
    pred, target, expected = hand_example()
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    assert cm.matrix.tolist() == expected
    assert cm.intersection().tolist() == [2, 2, 0]
    assert cm.union().tolist() == [4, 4, 0]
    iou = cm.iou()
    assert iou[:2].tolist() == [0.5, 0.5] and math.isnan(iou[2])
    assert cm.mean_iou() == 0.5
    assert cm.pixel_accuracy() == pytest.approx(4 / 6)
    assert cm.predicted_mass().tolist() == pytest.approx([0.5, 0.5, 0.0])
    assert cm.true_mass().tolist() == pytest.approx([0.5, 0.5, 0.0])


def test_mean_iou_counts_only_labels_present_in_the_target():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 2, 2]), torch.tensor([0, 0, 0]))  # label 2 predicted, never true
    iou = cm.iou()
    assert iou[0] == pytest.approx(1 / 3) and math.isnan(iou[1]) and iou[2] == 0.0
    assert cm.mean_iou() == pytest.approx(1 / 3)


def numpy_confusion(pred, target, num_labels):
    matrix = np.zeros((num_labels, num_labels), dtype=np.int64)
    for p, t in zip(pred.ravel(), target.ravel()):
        if 0 <= t < num_labels:
            matrix[t, p] += 1
    return matrix


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), num_labels=st.integers(1, 7), size=st.integers(1, 40))
def test_matrix_matches_numpy_and_ignores_out_of_range_targets(seed, num_labels, size):
    rng = np.random.default_rng(seed)
    pred = rng.integers(0, num_labels, size)
    target = rng.integers(-1, num_labels + 2, size)  # -1 and >= num_labels are ignored
    cm = ConfusionMatrix(num_labels)
    cm.update(torch.from_numpy(pred), torch.from_numpy(target))
    reference = numpy_confusion(pred, target, num_labels)
    np.testing.assert_array_equal(cm.matrix.numpy(), reference)
    diagonal = np.diag(reference)
    union = reference.sum(0) + reference.sum(1) - diagonal
    with np.errstate(invalid="ignore", divide="ignore"):
        np.testing.assert_allclose(cm.iou().numpy(), diagonal / union, equal_nan=True)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), batches=st.integers(1, 4))
def test_merge_equals_update_on_the_concatenation(seed, batches):
    g = torch.Generator().manual_seed(seed)
    preds = [torch.randint(0, 6, (2, 3, 4), generator=g) for _ in range(batches)]
    targets = [torch.randint(0, 6, (2, 3, 4), generator=g) for _ in range(batches)]
    merged = ConfusionMatrix(6)
    for pred, target in zip(preds, targets):
        part = ConfusionMatrix(6)
        part.update(pred, target)
        merged.merge(part)
    whole = ConfusionMatrix(6)
    whole.update(torch.cat(preds), torch.cat(targets))
    assert torch.equal(merged.matrix, whole.matrix)


def test_table_and_dict():
    cm = ConfusionMatrix()
    cm.update(torch.tensor([[0, 16, 16]]), torch.tensor([[0, 16, 15]]))
    table = cm.table()
    ring_row = next(line for line in table.splitlines() if line.startswith("ring"))
    assert ring_row.split()[1:4] == ["1", "2", "0.5000"]
    assert "pixel accuracy: 0.6667" in table
    assert "mean IoU (labels present in the target): 0.5000" in table  # (1 + 0.5 + 0) / 3
    summary = json.loads(json.dumps(cm.as_dict()))
    assert summary["labels"] == list(LABELS)
    assert summary["iou"][16] == 0.5 and summary["iou"][1] is None
    assert summary["mean_iou"] == pytest.approx(0.5)
    assert summary["matrix"][15][16] == 1


def test_format_table_puts_methods_side_by_side():
    argmax, dust_fill = ConfusionMatrix(), ConfusionMatrix()
    argmax.update(torch.tensor([[0, 16, 16]]), torch.tensor([[0, 16, 15]]))
    dust_fill.update(torch.tensor([[0, 16, 15, 15]]), torch.tensor([[0, 16, 15, 15]]))
    lines = format_table({"argmax": argmax, "dust_fill": dust_fill}).splitlines()
    assert "argmax IoU" in lines[0] and "dust_fill IoU" in lines[0] and lines[0].count("|") == 1
    assert len(lines) == 2 + 24 + 2
    ring = next(line for line in lines if line.startswith("ring"))
    left, right = (part.split() for part in ring.split("|"))
    assert left[1:4] == ["1", "2", "0.5000"] and right[:3] == ["1", "1", "1.0000"]
    assert right[3:] == ["25.00%", "25.00%"]  # predicted and true mass
    assert lines[-2] == "pixel accuracy: 0.6667 (argmax), 1.0000 (dust_fill)"
    assert lines[-1] == "mean IoU (labels present in the target): 0.5000 (argmax), 1.0000 (dust_fill)"
    assert format_table({"": argmax}) == argmax.table()
    with pytest.raises(ValueError, match=r"same num_labels, got sizes \[3, 24\]"):
        format_table({"a": argmax, "b": ConfusionMatrix(3)})


def test_reset_and_empty():
    cm = ConfusionMatrix(4)
    cm.update(torch.tensor([1]), torch.tensor([1]))
    cm.reset()
    assert int(cm.matrix.sum()) == 0
    assert math.isnan(cm.mean_iou()) and math.isnan(cm.pixel_accuracy())
    assert json.loads(json.dumps(cm.as_dict()))["mean_iou"] is None


def test_bad_input():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=r"pred values must lie in \[0, 3\)"):
        cm.update(torch.tensor([3]), torch.tensor([0]))
    with pytest.raises(ValueError, match="same shape"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0]))
    with pytest.raises(TypeError, match="pred must be an integer tensor"):
        cm.update(torch.tensor([0.0]), torch.tensor([0]))
    with pytest.raises(ValueError, match="num_labels"):
        ConfusionMatrix(0)
    with pytest.raises(ValueError, match="num_labels=3"):
        cm.merge(ConfusionMatrix(4))
    with pytest.raises(ValueError, match="label_names must hold 3 names"):
        cm.table(["a", "b"])


def test_all_reduce_without_distributed_is_a_no_op():
    pred, target, expected = hand_example()
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    assert cm.all_reduce().matrix.tolist() == expected


def _reduce_worker(rank, world_size, init_file, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        cm = ConfusionMatrix(3)
        cm.update(torch.tensor([rank % 3]), torch.tensor([0]))
        results[rank] = cm.all_reduce().matrix.tolist()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_all_reduce_sums_over_processes(tmp_path):
    world_size = 2
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_reduce_worker, args=(world_size, str(tmp_path / "init"), results), nprocs=world_size)
        gathered = dict(results)
    expected = [[1, 1, 0], [0, 0, 0], [0, 0, 0]]  # rank 0 predicts 0, rank 1 predicts 1; truth 0 for both
    assert gathered == {0: expected, 1: expected}
