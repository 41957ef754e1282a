"""The training step's fast paths compute what the plain ones do: the loss without its label range
check."""

import pytest
import torch
import torch.nn.functional as F

from unet import losses
from unet.losses import SegmentationLoss
from unet.model import SegmentationOutput, build_model


pytestmark = pytest.mark.usefixtures("one_thread")


def random_batch(batch=2, size=32, labels=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, 3, size, size, generator=g), torch.randint(0, labels, (batch, size, size), generator=g),
            (torch.rand(batch, 1, size, size, generator=g) < 0.1).float())


def loss_and_grads(model, loss_fn, images, labels, boundary, forward=None):
    """Loss, parts and the gradients of `model`'s parameters, through `forward` (default: the model)."""
    model.zero_grad(set_to_none=True)
    loss, parts = loss_fn((model if forward is None else forward)(images), labels, boundary)
    loss.backward()
    return loss.detach(), parts, {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_close_grads(a, b, rtol, atol):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=name)


# ----------------------------------------------------------------------------- the loss


def test_loss_without_the_range_check_is_bitwise_the_same_and_never_reads_the_labels(monkeypatch):
    images, labels, boundary = random_batch()
    torch.manual_seed(0)
    model = build_model("tiny")
    checked = loss_and_grads(model, SegmentationLoss(), images, labels, boundary)
    monkeypatch.setattr(losses, "check_label_range", lambda *args: pytest.fail("the range was checked"))
    unchecked = loss_and_grads(model, SegmentationLoss(check_labels=False), images, labels, boundary)
    assert torch.equal(checked[0], unchecked[0])
    assert all(torch.equal(checked[1][name], unchecked[1][name]) for name in checked[1])
    assert_close_grads(checked[2], unchecked[2], rtol=0, atol=0)
    with pytest.raises(ValueError, match="labels must have shape"):  # the shape checks still run
        SegmentationLoss(check_labels=False)(model(images), labels[:, 1:], boundary)


def test_the_loss_checks_the_label_range_once_per_call(monkeypatch):
    calls = []
    original = losses.check_label_range
    monkeypatch.setattr(losses, "check_label_range", lambda *args: calls.append(1) or original(*args))
    logits = torch.randn(2, 24, 8, 8)
    output = SegmentationOutput(logits, torch.randn(2, 1, 8, 8))
    SegmentationLoss(iou_weight=1.0)(output, torch.randint(0, 24, (2, 8, 8)), torch.zeros(2, 1, 8, 8))
    assert len(calls) == 1


def test_boundary_bce_needs_no_host_tensor():
    """pos_weight is filled on the logits' device: on a GPU a tensor built on the host is a blocking copy."""
    logits = torch.randn(2, 1, 5, 5, dtype=torch.float64)
    target = (torch.rand(2, 1, 5, 5) < 0.3).double()
    want = F.binary_cross_entropy_with_logits(logits.float(), target.float(), pos_weight=torch.tensor(20.0))
    assert torch.equal(losses.boundary_bce(logits, target, 20.0), want)
