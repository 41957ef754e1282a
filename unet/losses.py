"""Losses of section 4 of the paper, each usable alone, combined by :class:`SegmentationLoss`.

- :func:`weighted_cross_entropy`: per-label weighted cross entropy with ``-log p`` cut off at a
  maximum (section 4.2), optionally reweighted per pixel (e.g. up near label boundaries, 4.3).
- :func:`soft_iou_loss`: ``sum_j m_j (1 - (I_j + eps) / (U_j + eps))`` per image, with ``m_j`` the
  mass of label ``j`` in the target (section 4.1), so absent labels cost nothing.
- :func:`boundary_bce`: binary cross entropy of the boundary logit, false negatives (missed
  boundary pixels) ``fn_weight`` times dearer (20 in the paper).
- :func:`gradient_sparsity`: the clamped ``L^p`` semi-norm ``max((|x| + eps)^p - eps^p - c, 0)``,
  ``p < 1``, of the discrete gradients of the probability maps (section 4.3).

All losses are computed in float32 whatever the input dtype (they are cheap and AMP-sensitive).

Checking that label ids lie in ``[0, L)`` reads the labels back to the host: on a GPU that waits for
the queued work, and under ``torch.compile`` it breaks the graph. Each function therefore takes
``check_range``, and ``SegmentationLoss(check_labels=False)`` skips the check for data whose ids
were checked upstream (`unet.data` checks every label map at load).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from unet.labels import LABEL_INDEX, NUM_LABELS
from unet.metrics import check_label_range
from unet.model import SegmentationOutput


def _label_weights(raised: Mapping[str, float]) -> torch.Tensor:
    weights = torch.ones(NUM_LABELS)
    for name, weight in raised.items():
        weights[LABEL_INDEX[name]] = weight
    return weights


# Section 4.2.1: thin, rare items get subsumed by their surroundings (a ring by skin), so they
# weigh more; not too much, or the network starts guessing them everywhere.
DEFAULT_LABEL_WEIGHTS: torch.Tensor = _label_weights(
    {
        "ring": 3.0,
        "earrings": 3.0,
        "necklace": 3.0,
        "wrist wearing": 3.0,
        "belt": 2.0,
        "socks": 2.0,
        "gloves": 2.0,
        "eyeglass": 2.0,
        "tie": 2.0,
    }
)


def check_label_map(
    labels: torch.Tensor, num_labels: int, like: torch.Tensor, name: str = "labels", check_range: bool = True
) -> None:
    """Raise unless ``labels`` is an int64 ``(B, H, W)`` map matching ``like`` (B, L, H, W) with values in [0, L).

    The dtype and shape checks cost nothing; the value range, a device sync, only with ``check_range``.
    """
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64:
        raise TypeError(f"{name} must be an int64 tensor, got {getattr(labels, 'dtype', type(labels).__name__)}")
    expected = (like.shape[0],) + tuple(like.shape[2:])
    if tuple(labels.shape) != expected:
        raise ValueError(f"{name} must have shape {expected} to match the predictions, got {tuple(labels.shape)}")
    if check_range:
        check_label_range(labels, num_labels, name)


def weighted_cross_entropy(
    label_logits: torch.Tensor,
    labels: torch.Tensor,
    label_weights: torch.Tensor | None = None,
    log_clamp: float = 10.0,
    pixel_weights: torch.Tensor | None = None,
    check_range: bool = True,
) -> torch.Tensor:
    """``mean_i  pixel_weight_i * w[y_i] * min(-log p_i[y_i], log_clamp)`` over all pixels.

    ``label_logits`` (B, L, H, W), ``labels`` (B, H, W) int64, ``label_weights`` (L,) (default: all
    ones), ``pixel_weights`` (B, H, W). Beyond ``log_clamp`` a pixel is hopeless and stops
    contributing gradient, so one confidently wrong pixel cannot dominate a batch.
    """
    check_label_map(labels, label_logits.shape[1], label_logits, check_range=check_range)
    nll = F.cross_entropy(label_logits.float(), labels, reduction="none").clamp(max=log_clamp)
    if label_weights is not None:
        nll = nll * label_weights.to(nll.device, torch.float32)[labels]
    if pixel_weights is not None:
        nll = nll * pixel_weights.float()
    return nll.mean()


def soft_iou_loss(probs: torch.Tensor, labels: torch.Tensor, eps: float = 1.0, check_range: bool = True) -> torch.Tensor:
    """Mass-weighted soft IoU loss, averaged over the batch.

    Per image and label ``j``: ``I_j = sum f_j g_j``, ``U_j = sum f_j + g_j - I_j`` with ``f`` the
    one-hot target and ``g = probs``; the loss is ``sum_j m_j (1 - (I_j + eps) / (U_j + eps))`` where
    ``m_j`` is the fraction of the image's pixels labelled ``j``. ``eps`` is in pixels.
    """
    check_label_map(labels, probs.shape[1], probs, check_range=check_range)
    probs = probs.float()
    target = F.one_hot(labels, probs.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    intersection = (probs * target).sum(dim=(2, 3))
    target_mass = target.sum(dim=(2, 3))
    union = target_mass + probs.sum(dim=(2, 3)) - intersection
    iou = (intersection + eps) / (union + eps)
    mass = target_mass / target_mass.sum(dim=1, keepdim=True)
    return (mass * (1.0 - iou)).sum(dim=1).mean()


def boundary_bce(boundary_logits: torch.Tensor, boundary: torch.Tensor, fn_weight: float = 20.0) -> torch.Tensor:
    """Mean binary cross entropy with logits; boundary pixels (target 1) weigh ``fn_weight``."""
    if boundary.shape != boundary_logits.shape:
        raise ValueError(
            f"boundary must have the shape of boundary_logits {tuple(boundary_logits.shape)}, "
            f"got {tuple(boundary.shape)}"
        )
    # Filled on the device: a tensor copied from the host would make a GPU wait for its queue.
    pos_weight = boundary_logits.new_full((), fn_weight, dtype=torch.float32)
    return F.binary_cross_entropy_with_logits(boundary_logits.float(), boundary.float(), pos_weight=pos_weight)


def clamped_lp(x: torch.Tensor, p: float = 0.5, eps: float = 0.01, clamp: float = 0.04) -> torch.Tensor:
    """Elementwise ``max((|x| + eps)^p - eps^p - clamp, 0)``: favours one big jump over many small ones."""
    if not 0 < p < 1:
        raise ValueError(f"p must lie in (0, 1), got {p}")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    return ((x.abs() + eps) ** p - eps**p - clamp).clamp(min=0)


def gradient_sparsity(probs: torch.Tensor, p: float = 0.5, eps: float = 0.01, clamp: float = 0.04) -> torch.Tensor:
    """Sum of :func:`clamped_lp` over the horizontal and vertical differences of ``probs``, per pixel and label."""
    probs = probs.float()
    dx = probs[..., :, 1:] - probs[..., :, :-1]
    dy = probs[..., 1:, :] - probs[..., :-1, :]
    return (clamped_lp(dx, p, eps, clamp).sum() + clamped_lp(dy, p, eps, clamp).sum()) / probs.numel()


class SegmentationLoss(nn.Module):
    """Weighted sum of the losses above; returns ``(total, parts)`` with detached, unweighted parts.

    Defaults follow the paper's training: weighted cross entropy plus the boundary BCE; the soft IoU,
    gradient-sparsity and boundary-pixel reweighting are off (weight 0) but the IoU and sparsity
    terms are still reported in ``parts`` (computed without gradient). ``edge_weight`` multiplies the
    cross entropy of boundary pixels by ``1 + edge_weight`` (section 4.3; needs accurate labels).
    ``check_labels=False`` skips the label range check (a device sync, and a graph break under
    ``torch.compile``) for labels checked upstream; the dtype and shape checks always run.
    """

    def __init__(
        self,
        label_weights: torch.Tensor | None = None,
        ce_weight: float = 1.0,
        iou_weight: float = 0.0,
        boundary_weight: float = 1.0,
        fn_weight: float = 20.0,
        sparsity_weight: float = 0.0,
        edge_weight: float = 0.0,
        log_clamp: float = 10.0,
        iou_eps: float = 1.0,
        sparsity_p: float = 0.5,
        sparsity_eps: float = 0.01,
        sparsity_clamp: float = 0.04,
        check_labels: bool = True,
    ) -> None:
        super().__init__()
        weights = DEFAULT_LABEL_WEIGHTS if label_weights is None else torch.as_tensor(label_weights)
        if weights.dim() != 1:
            raise ValueError(
                f"label_weights must be a 1-D tensor of per-label weights, got shape {tuple(weights.shape)}"
            )
        term_weights = {"ce_weight": ce_weight, "iou_weight": iou_weight, "boundary_weight": boundary_weight,
                        "fn_weight": fn_weight, "sparsity_weight": sparsity_weight, "edge_weight": edge_weight}
        for name, value in term_weights.items():
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if log_clamp <= 0:
            raise ValueError(f"log_clamp must be > 0, got {log_clamp}")
        self.register_buffer("label_weights", weights.clone().float(), persistent=False)
        self.weights = {"ce": ce_weight, "iou": iou_weight, "boundary": boundary_weight, "sparsity": sparsity_weight}
        self.fn_weight = fn_weight
        self.edge_weight = edge_weight
        self.log_clamp = log_clamp
        self.iou_eps = iou_eps
        self.sparsity = {"p": sparsity_p, "eps": sparsity_eps, "clamp": sparsity_clamp}
        self.check_labels = check_labels

    def forward(
        self, output: SegmentationOutput, labels: torch.Tensor, boundary: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = output.label_logits
        if logits.shape[1] != self.label_weights.numel():
            raise ValueError(
                f"label_logits have {logits.shape[1]} labels but label_weights has {self.label_weights.numel()}"
            )
        if boundary.shape != output.boundary_logits.shape:
            raise ValueError(
                f"boundary must have shape {tuple(output.boundary_logits.shape)}, got {tuple(boundary.shape)}"
            )
        check_label_map(labels, logits.shape[1], logits, check_range=self.check_labels)  # once, not per term
        pixel_weights = 1.0 + self.edge_weight * boundary[:, 0] if self.edge_weight else None
        logits = logits.float()  # one float32 copy for the cross entropy and the probabilities
        probs = F.softmax(logits, dim=1)
        terms = {
            "ce": lambda: weighted_cross_entropy(
                logits, labels, self.label_weights, self.log_clamp, pixel_weights, check_range=False
            ),
            "iou": lambda: soft_iou_loss(probs, labels, self.iou_eps, check_range=False),
            "boundary": lambda: boundary_bce(output.boundary_logits, boundary, self.fn_weight),
            "sparsity": lambda: gradient_sparsity(probs, **self.sparsity),
        }
        total = logits.new_zeros((), dtype=torch.float32)
        parts = {}
        for name, term in terms.items():
            weight = self.weights[name]
            with torch.set_grad_enabled(torch.is_grad_enabled() and weight > 0):
                value = term()
            if weight > 0:
                total = total + weight * value
            parts[name] = value.detach()
        parts["total"] = total.detach()
        return total, parts
