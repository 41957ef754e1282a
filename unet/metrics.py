"""A confusion matrix of predicted against true labels, and the IoU figures derived from it.

Mergeable across batches (:meth:`ConfusionMatrix.update`, :meth:`ConfusionMatrix.merge`) and across
processes (:meth:`ConfusionMatrix.all_reduce`). Target pixels outside ``[0, num_labels)`` are
ignored (so an "ignore" value such as 255 may be used); predictions outside that range are a bug
upstream and raise ``ValueError``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from unet.checks import check_int
from unet.labels import LABELS, NUM_LABELS


def check_label_range(labels: torch.Tensor, num_labels: int, name: str) -> None:
    """Raise ``ValueError`` unless every value of the integer tensor ``labels`` lies in [0, num_labels)."""
    if labels.numel():
        low, high = torch.stack(torch.aminmax(labels)).tolist()  # one device sync, not two
        if low < 0 or high >= num_labels:
            raise ValueError(f"{name} values must lie in [0, {num_labels}), got [{low}, {high}]")


class ConfusionMatrix:
    """``matrix[t, p]`` counts pixels of true label ``t`` predicted as ``p`` (int64, rows = truth)."""

    def __init__(self, num_labels: int = NUM_LABELS, device: torch.device | str | None = None) -> None:
        self.num_labels = check_int("num_labels", num_labels)
        self.matrix = torch.zeros(num_labels, num_labels, dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.matrix.zero_()

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Count a batch of predicted and true label maps (any equal shapes, integer dtypes)."""
        for name, tensor in (("pred", pred), ("target", target)):
            if not isinstance(tensor, torch.Tensor) or tensor.is_floating_point() or tensor.is_complex():
                got = getattr(tensor, "dtype", type(tensor).__name__)
                raise TypeError(f"{name} must be an integer tensor, got {got}")
        if pred.shape != target.shape:
            raise ValueError(
                f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}"
            )
        pred = pred.to(self.matrix.device, torch.int64).flatten()
        target = target.to(self.matrix.device, torch.int64).flatten()
        check_label_range(pred, self.num_labels, "pred")
        counted = (target >= 0) & (target < self.num_labels)
        pairs = target[counted] * self.num_labels + pred[counted]
        self.matrix += torch.bincount(pairs, minlength=self.num_labels**2).view(self.num_labels, self.num_labels)

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """Add another matrix's counts into this one (returns self)."""
        if not isinstance(other, ConfusionMatrix) or other.num_labels != self.num_labels:
            raise ValueError(f"can only merge a ConfusionMatrix with num_labels={self.num_labels}")
        self.matrix += other.matrix.to(self.matrix.device)
        return self

    def all_reduce(self) -> "ConfusionMatrix":
        """Sum the counts over all torch.distributed processes when initialised; no-op otherwise."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.matrix, op=dist.ReduceOp.SUM)
        return self

    def intersection(self) -> torch.Tensor:
        return self.matrix.diagonal().clone()

    def union(self) -> torch.Tensor:
        return self.matrix.sum(0) + self.matrix.sum(1) - self.matrix.diagonal()

    def iou(self) -> torch.Tensor:
        """Per-label IoU (float64); NaN where a label is neither predicted nor true."""
        union = self.union().double()
        return torch.where(union > 0, self.intersection().double() / union, torch.full_like(union, math.nan))

    def mean_iou(self) -> float:
        """Mean IoU over the labels present in the target (NaN when nothing was counted)."""
        present = self.matrix.sum(1) > 0
        return float(self.iou()[present].mean()) if bool(present.any()) else math.nan

    def pixel_accuracy(self) -> float:
        total = int(self.matrix.sum())
        return int(self.matrix.diagonal().sum()) / total if total else math.nan

    def predicted_mass(self) -> torch.Tensor:
        """Fraction of counted pixels predicted as each label (float64, sums to 1)."""
        return self._fraction(self.matrix.sum(0))

    def true_mass(self) -> torch.Tensor:
        """Fraction of counted pixels truly of each label (float64, sums to 1)."""
        return self._fraction(self.matrix.sum(1))

    def _fraction(self, counts: torch.Tensor) -> torch.Tensor:
        total = counts.sum()
        return counts.double() / total if total > 0 else torch.full_like(counts, math.nan, dtype=torch.float64)

    def label_names(self, label_names: Sequence[str] | None = None) -> list[str]:
        """``label_names`` checked for length; by default LABELS (24 labels) or the label indices."""
        if label_names is None:
            label_names = LABELS if self.num_labels == NUM_LABELS else [str(i) for i in range(self.num_labels)]
        if len(label_names) != self.num_labels:
            raise ValueError(f"label_names must hold {self.num_labels} names, got {len(label_names)}")
        return list(label_names)

    def table(self, label_names: Sequence[str] | None = None) -> str:
        """A printable per-label table, then pixel accuracy and mean IoU (names default to LABELS)."""
        return format_table({"": self}, label_names)

    def as_dict(self, label_names: Sequence[str] | None = None) -> dict[str, Any]:
        """JSON-able summary; NaN becomes None."""
        return {
            "labels": self.label_names(label_names),
            "matrix": self.matrix.tolist(),
            "intersection": self.intersection().tolist(),
            "union": self.union().tolist(),
            "iou": _json_floats(self.iou().tolist()),
            "predicted_mass": _json_floats(self.predicted_mass().tolist()),
            "true_mass": _json_floats(self.true_mass().tolist()),
            "pixel_accuracy": _json_float(self.pixel_accuracy()),
            "mean_iou": _json_float(self.mean_iou()),
        }


def format_table(matrices: Mapping[str, ConfusionMatrix], label_names: Sequence[str] | None = None) -> str:
    """Per-label intersection, union, IoU, predicted and true mass of one or more matrices side by side.

    `matrices` maps a method name to its matrix: one column group each, separated by ``|`` (an
    empty name gives plain column titles); pixel accuracy and mean IoU follow, in the same order.
    """
    sizes = {matrix.num_labels for matrix in matrices.values()}
    if len(sizes) != 1:
        raise ValueError(f"matrices: expected one or more with the same num_labels, got sizes {sorted(sizes)}")
    label_names = next(iter(matrices.values())).label_names(label_names)
    width = max(12, *(len(name) for name in label_names))
    iou_titles = {method: f"{method} IoU".strip() for method in matrices}
    iou_widths = {method: max(7, len(title)) for method, title in iou_titles.items()}

    def row(first_cell: str, groups: list[str]) -> str:
        return f"{first_cell:<{width}} " + " | ".join(groups)

    header = row("label", [f"{'intersection':>12} {'union':>12} {iou_titles[method]:>{iou_widths[method]}} "
                           f"{'pred mass':>9} {'true mass':>9}" for method in matrices])
    columns = {method: list(zip(m.intersection().tolist(), m.union().tolist(), m.iou().tolist(),
                                m.predicted_mass().tolist(), m.true_mass().tolist()))
               for method, m in matrices.items()}
    lines = [header, "-" * len(header)]
    for i, label in enumerate(label_names):
        groups = []
        for method, values in columns.items():
            inter, union, iou, pred_mass, true_mass = values[i]
            iou_width = iou_widths[method]
            groups.append(f"{inter:>12d} {union:>12d} {iou:>{iou_width}.4f} {pred_mass:>9.2%} {true_mass:>9.2%}")
        lines.append(row(label, groups))
    for title, value in (("pixel accuracy", ConfusionMatrix.pixel_accuracy),
                         ("mean IoU (labels present in the target)", ConfusionMatrix.mean_iou)):
        lines.append(f"{title}: " + ", ".join(
            f"{value(m):.4f}" + (f" ({method})" if method else "") for method, m in matrices.items()))
    return "\n".join(lines)


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else value


def _json_floats(values: list[float]) -> list[float | None]:
    return [_json_float(value) for value in values]
