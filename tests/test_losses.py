"""Each loss against a direct NumPy evaluation of its formula, its zeros, and its gradients."""

import numpy as np
import pytest
import torch

from unet.labels import LABEL_INDEX, NUM_LABELS
from unet.losses import (
    DEFAULT_LABEL_WEIGHTS,
    SegmentationLoss,
    boundary_bce,
    clamped_lp,
    gradient_sparsity,
    soft_iou_loss,
    weighted_cross_entropy,
)
from unet.model import SegmentationOutput

B, L, H, W = 2, 5, 6, 7


def random_case(seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, L, H, W, generator=g, dtype=torch.float64) * scale
    labels = torch.randint(0, L, (B, H, W), generator=g)
    boundary = (torch.rand(B, 1, H, W, generator=g) < 0.3).double()
    boundary_logits = torch.randn(B, 1, H, W, generator=g, dtype=torch.float64) * 2
    return logits, labels, boundary, boundary_logits


def np_softmax(logits):
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def np_cross_entropy(logits, labels, weights, clamp, pixel_weights):
    probs = np_softmax(logits)
    total = 0.0
    for b, y, x in np.ndindex(labels.shape):
        label = labels[b, y, x]
        total += pixel_weights[b, y, x] * weights[label] * min(-np.log(probs[b, label, y, x]), clamp)
    return total / labels.size


def np_soft_iou(probs, labels, eps):
    per_image = []
    for b in range(labels.shape[0]):
        loss = 0.0
        for j in range(probs.shape[1]):
            f = (labels[b] == j).astype(float)
            g = probs[b, j]
            intersection = (f * g).sum()
            union = (f + g).sum() - intersection
            loss += f.mean() * (1 - (intersection + eps) / (union + eps))
        per_image.append(loss)
    return np.mean(per_image)


def test_weighted_cross_entropy_matches_formula_with_clamp_and_weights():
    logits, labels, boundary, _ = random_case(scale=8.0)
    weights = torch.linspace(0.5, 3.0, L, dtype=torch.float64)
    pixel_weights = 1 + 2 * boundary[:, 0]
    clamp = 4.0
    got = weighted_cross_entropy(logits, labels, weights, clamp, pixel_weights)
    want = np_cross_entropy(logits.numpy(), labels.numpy(), weights.numpy(), clamp, pixel_weights.numpy())
    assert got.item() == pytest.approx(want, rel=1e-5)
    # The scale 8 makes some pixels hopeless: the clamp must actually bite for this test to mean anything.
    assert want < np_cross_entropy(logits.numpy(), labels.numpy(), weights.numpy(), np.inf, pixel_weights.numpy())


def test_weighted_cross_entropy_stops_gradient_beyond_the_clamp():
    logits, labels, _, _ = random_case(scale=8.0)
    logits.requires_grad_(True)
    clamp = 4.0
    weighted_cross_entropy(logits, labels, log_clamp=clamp).backward()
    nll = -torch.log_softmax(logits.detach(), 1).gather(1, labels[:, None])[:, 0]
    hopeless = nll > clamp
    assert hopeless.any() and (~hopeless).any()
    grad_norm = logits.grad.abs().sum(1)
    assert torch.all(grad_norm[hopeless] == 0)
    assert torch.all(grad_norm[~hopeless] > 0)


def test_soft_iou_loss_matches_formula():
    logits, labels, _, _ = random_case()
    probs = torch.softmax(logits, 1)
    got = soft_iou_loss(probs, labels, eps=0.5)
    assert got.item() == pytest.approx(np_soft_iou(probs.numpy(), labels.numpy(), 0.5), rel=1e-5)


def test_soft_iou_loss_is_zero_for_a_perfect_one_hot_prediction():
    _, labels, _, _ = random_case()
    one_hot = torch.nn.functional.one_hot(labels, L).permute(0, 3, 1, 2).double()
    assert soft_iou_loss(one_hot, labels).item() == 0.0


def test_soft_iou_loss_ignores_labels_absent_from_the_target():
    """Predicting an absent label costs only through the present labels it takes mass from."""
    labels = torch.zeros(1, 4, 4, dtype=torch.int64)
    probs = torch.zeros(1, L, 4, 4, dtype=torch.float64)
    probs[:, 0] = 1.0
    assert soft_iou_loss(probs, labels).item() == 0.0
    probs[:, 0, 0, 0], probs[:, 3, 0, 0] = 0.0, 1.0  # one pixel wrongly labelled 3
    want = 1 - (15 + 1.0) / (16 + 1.0)  # label 0 holds all the mass; label 3's IoU weighs 0
    assert soft_iou_loss(probs, labels).item() == pytest.approx(want)


def test_boundary_bce_matches_formula_and_weighs_false_negatives():
    _, _, boundary, boundary_logits = random_case()
    z, t = boundary_logits.numpy(), boundary.numpy()
    sigmoid = 1 / (1 + np.exp(-z))
    for fn_weight in (1.0, 20.0):
        want = np.mean(-(fn_weight * t * np.log(sigmoid) + (1 - t) * np.log(1 - sigmoid)))
        assert boundary_bce(boundary_logits, boundary, fn_weight).item() == pytest.approx(want, rel=1e-6)
    missed = torch.full((1, 1, 1, 1), -2.0)  # predicts "no boundary"
    false_alarm = torch.full((1, 1, 1, 1), 2.0)  # predicts "boundary"
    ratio = boundary_bce(missed, torch.ones_like(missed)) / boundary_bce(false_alarm, torch.zeros_like(false_alarm))
    assert ratio.item() == pytest.approx(20.0)


def test_clamped_lp_matches_formula():
    x = torch.linspace(-1, 1, 101, dtype=torch.float64)
    p, eps, c = 0.4, 0.02, 0.05
    want = np.maximum((np.abs(x.numpy()) + eps) ** p - eps**p - c, 0)
    np.testing.assert_allclose(clamped_lp(x, p, eps, c).numpy(), want, rtol=1e-12)


def test_gradient_sparsity_matches_formula():
    probs = torch.softmax(random_case()[0], 1)
    p, eps, c = 0.5, 0.01, 0.04
    n = probs.numpy()
    penalty = lambda d: np.maximum((np.abs(d) + eps) ** p - eps**p - c, 0).sum()  # noqa: E731
    want = (penalty(np.diff(n, axis=3)) + penalty(np.diff(n, axis=2))) / n.size
    assert gradient_sparsity(probs, p, eps, c).item() == pytest.approx(want, rel=1e-6)


def test_gradient_sparsity_prefers_one_jump_and_ignores_small_variations():
    flat = torch.full((1, 1, 1, 8), 0.5, dtype=torch.float64)
    noise = 0.002 * torch.sin(torch.arange(8, dtype=torch.float64))
    assert gradient_sparsity(flat + noise).item() == 0.0
    one_jump = torch.tensor([[[[0, 0, 0, 0, 1, 1, 1, 1]]]], dtype=torch.float64)
    ramp = torch.linspace(0, 1, 8, dtype=torch.float64).view(1, 1, 1, 8)  # same total rise, in small steps
    assert 0 < gradient_sparsity(one_jump) < gradient_sparsity(ramp)


def test_default_label_weights_raise_small_items():
    assert DEFAULT_LABEL_WEIGHTS.shape == (NUM_LABELS,)
    for name in ("ring", "earrings", "necklace", "wrist wearing", "belt", "socks", "gloves", "eyeglass", "tie"):
        assert DEFAULT_LABEL_WEIGHTS[LABEL_INDEX[name]] > DEFAULT_LABEL_WEIGHTS[LABEL_INDEX["skin"]]
    assert DEFAULT_LABEL_WEIGHTS[LABEL_INDEX["background"]] == 1.0


def test_segmentation_loss_is_the_weighted_sum_of_its_parts():
    logits, labels, boundary, boundary_logits = random_case()
    weights = torch.arange(1.0, L + 1.0)
    loss_fn = SegmentationLoss(weights, ce_weight=0.7, iou_weight=0.3, boundary_weight=0.5, fn_weight=10.0,
                               sparsity_weight=2.0, edge_weight=1.5, log_clamp=6.0)
    logits.requires_grad_(True)
    boundary_logits.requires_grad_(True)
    total, parts = loss_fn(SegmentationOutput(logits, boundary_logits), labels, boundary)
    probs = torch.softmax(logits.detach(), 1)
    want = {
        "ce": weighted_cross_entropy(logits.detach(), labels, weights, 6.0, 1 + 1.5 * boundary[:, 0]),
        "iou": soft_iou_loss(probs, labels),
        "boundary": boundary_bce(boundary_logits.detach(), boundary, 10.0),
        "sparsity": gradient_sparsity(probs),
    }
    for name, value in want.items():
        assert parts[name].item() == pytest.approx(value.item(), rel=1e-5), name
        assert not parts[name].requires_grad
    expected = 0.7 * want["ce"] + 0.3 * want["iou"] + 0.5 * want["boundary"] + 2.0 * want["sparsity"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    assert parts["total"].item() == pytest.approx(total.item())
    total.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    assert torch.isfinite(boundary_logits.grad).all() and boundary_logits.grad.abs().sum() > 0


def test_segmentation_loss_reports_zero_weight_terms_without_gradient():
    logits, labels, boundary, boundary_logits = random_case()
    logits = logits.float().requires_grad_(True)
    loss_fn = SegmentationLoss(torch.ones(L), iou_weight=0.0, sparsity_weight=0.0)
    total, parts = loss_fn(SegmentationOutput(logits, boundary_logits.float()), labels, boundary.float())
    assert parts["iou"] > 0 and parts["sparsity"] >= 0
    (grad_total,) = torch.autograd.grad(total, logits)
    (grad_ce,) = torch.autograd.grad(weighted_cross_entropy(logits, labels, torch.ones(L), 10.0), logits)
    torch.testing.assert_close(grad_total, grad_ce)


def test_losses_reject_bad_targets():
    logits, labels, boundary, boundary_logits = random_case()
    output = SegmentationOutput(logits, boundary_logits)
    loss_fn = SegmentationLoss(torch.ones(L))
    with pytest.raises(ValueError, match=r"labels values must lie in \[0, 5\)"):
        loss_fn(output, torch.full_like(labels, L), boundary)
    with pytest.raises(TypeError, match="labels must be an int64 tensor"):
        loss_fn(output, labels.int(), boundary)
    with pytest.raises(ValueError, match="labels must have shape"):
        loss_fn(output, labels[:, :-1], boundary)
    with pytest.raises(ValueError, match="boundary must have shape"):
        loss_fn(output, labels, boundary[:, :, :-1])
    with pytest.raises(ValueError, match="label_weights has 24"):
        SegmentationLoss()(output, labels, boundary)
    with pytest.raises(ValueError, match="fn_weight must be >= 0"):
        SegmentationLoss(fn_weight=-1.0)
