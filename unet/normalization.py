"""Sub-batch batch normalization (section 6.4 of the paper).

A batch of B images split into n sub-batches (gradient-accumulation micro-batches, and each
process's share under torchrun: n = accumulation steps x world size) is too small, per sub-batch,
for BatchNorm's statistics to represent the population. :class:`SubBatchNorm2d` normalizes
sub-batch j of step i with its own per-channel statistics blended with the previous step's
sub-batches::

    mu_{i,j}      = mu_hat_{i,j} / (n+1)        + 1/(n+1) * sum_k mu_hat_{i-1,k}
    sigma^2_{i,j} = sigma_hat^2_{i,j} / (n+1)   + 1/(n+1) * sum_k sigma_hat^2_{i-1,k}
    sigma_hat^2   = eps + (biased) variance of the sub-batch,  N(x) = (x - mu) / sigma

The blend weights sum to one, so the eps of each sigma_hat^2 adds up to a single eps. ``n`` is
the number of sub-batches the previous step actually had, so a short last accumulation group or a
resume on another world size stays a proper average.

The gradient is BatchNorm's: it flows through the sub-batch's own statistics in full, and the
previous step's statistics are buffers that get none. The forward is written as Batch
Renormalization writes it (Ioffe, 2017)::

    N(x) = (x - mu_hat) / sigma_hat * r + d,   r = sg(sigma_hat / sigma),  d = sg((mu_hat - mu) / sigma)

(sg: no gradient), which equals the blend above, while the backward is
``weight * (g - mean(g) - x_hat * mean(g * x_hat)) / sigma`` per channel, x_hat = (x - mu_hat) / sigma_hat.
The exact derivative of the blend would let only 1/(n+1) of the gradient through the statistics:
the loss would then depend on the mean and scale of each normalized layer's input, the optimizer
moves them by large steps, and the next step's statistics no longer match the history they are
blended with. That is the drift the paper warns of: on the tiny model (4 sub-batches of 2, AdamW
3e-3, 40 steps) the exact derivative ended at a training loss of 3.2 against 1.1, with training-
and evaluation-mode predictions disagreeing on nearly every pixel; BatchNorm's gradient makes the loss
invariant to those shifts and scales, and the statistics stay put.

With ``extrapolate=True`` the previous step's statistics are first predicted forward to this step
with the second-order extrapolation ``s_i ~ 5/2 s_{i-1} - 2 s_{i-2} + 1/2 s_{i-3}`` of the steps'
average statistics (plain blend until three steps are recorded). That prediction amplifies the
step-to-step noise of the statistics by sqrt(2.5^2 + 2^2 + 0.5^2) ~ 3.2, can make a variance
negative, and feeds the error into every later layer's statistics; :func:`guarded_extrapolation`
keeps it in a trust region around the last step's statistics: the predicted mean moves at most
``max_mean_shift`` standard deviations, the predicted variance at most a factor ``max_var_ratio``
(so it stays positive). The plain blend needs no such clamp: it is a convex combination of
observed statistics. Together with BatchNorm's gradient above, this is the drift guard.

Evaluation mode normalizes with running statistics: an exponential moving average (``momentum``)
of each step's average sub-batch mean and variance, the very quantities the blend averages in
training, so evaluation-mode outputs match training-mode ones. Until ``1/momentum`` steps are seen
it is the plain average of the steps so far (no pull toward the initial 0 and 1).

Trainer contract::

    model.train()
    for each optimizer step:
        for each sub-batch (accumulation):     # every training-mode forward records its statistics
            loss = criterion(model(images), ...)
            loss.backward()                     # a gradient-checkpointing recomputation records nothing
        optimizer.step(); optimizer.zero_grad()
        end_step(model)                         # on every rank, after the step's last backward
        (checkpoint here if wanted: the buffers hold the whole state, nothing is pending)

:func:`end_step` sums the step's statistics of all layers and all ranks with ONE all-reduce
(2C numbers per layer plus the sub-batch count), then shifts every layer's history and updates its
running statistics; nothing synchronizes inside the forward. It is a no-op (and no collective) for
a model without a :class:`SubBatchNorm2d`, so a trainer can call it unconditionally. After
training-mode forwards that must not count (no optimizer step follows them), call
:func:`discard_step`.

The history, its sub-batch counts, the running statistics and the step count are registered
buffers, so ``state_dict`` (and thus a checkpoint) carries everything a resume needs. The step's
recorded statistics are buffers too (``pending_sum``, ``pending_count``), summed in place, but not
persistent: a checkpoint taken after :func:`end_step` has none to carry. In-place buffer updates
(no Python list) let ``torch.compile`` trace the whole model, gradient checkpointing included, in
one graph that it does not recompile from one sub-batch to the next.

:class:`CheckpointSafeBatchNorm2d` is the model's ``batch`` option: ``nn.BatchNorm2d``, except that
a gradient-checkpointing recomputation leaves its running statistics alone (plain BatchNorm
updates them a second time per sub-batch there, with the same batch statistics).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

HISTORY_STEPS = 3  # the extrapolation uses the statistics of steps i-1, i-2 and i-3
EXTRAPOLATION = (2.5, -2.0, 0.5)  # s_i ~ 5/2 s_{i-1} - 2 s_{i-2} + 1/2 s_{i-3}


def guarded_extrapolation(
    history_mean: torch.Tensor, history_var: torch.Tensor, eps: float, max_mean_shift: float, max_var_ratio: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """This step's statistics predicted from the last three steps' (row 0 = the last), kept in a trust region.

    The mean is clamped to ``last_mean +- max_mean_shift * sqrt(last_var + eps)`` and the variance to
    ``[last_var / max_var_ratio, last_var * max_var_ratio]``: a larger predicted change within one
    optimizer step is amplified noise rather than a trend, and a non-positive variance is meaningless.
    """
    weights = history_mean.new_tensor(EXTRAPOLATION).view(-1, 1)
    predicted_mean = (weights * history_mean).sum(0)
    predicted_var = (weights * history_var).sum(0)
    last_mean, last_var = history_mean[0], history_var[0]
    shift = max_mean_shift * torch.sqrt(last_var + eps)
    mean = torch.clamp(predicted_mean, last_mean - shift, last_mean + shift)
    var = torch.clamp(predicted_var, last_var / max_var_ratio, last_var * max_var_ratio)
    return mean, var


def _inside_backward() -> bool:
    """True while the autograd engine runs, e.g. when gradient checkpointing recomputes a forward.

    Both checkpoint flavours recompute inside the backward's graph task, and the original forward
    runs outside any (torch.utils.checkpoint itself tells the two apart this way). Code that
    torch.compile traces is a forward: the compiled backward recomputes checkpointed activations
    without replaying the forward's buffer updates, and an eager backward runs this check in Python.
    """
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


class SubBatchNorm2d(nn.Module):
    """BatchNorm over (N, H, W) whose training statistics blend in the previous step's sub-batches.

    See the module docstring for the formulas and for the :func:`end_step` a trainer must call
    once per optimizer step. Statistics are kept in float32 (float64 for float64 inputs), so the
    layer works under autocast; the output has the input's dtype and memory format, as BatchNorm's.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        extrapolate: bool = False,
        max_mean_shift: float = 0.5,
        max_var_ratio: float = 2.0,
    ) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be an int >= 1, got {num_features!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        if not 0 < momentum <= 1:
            raise ValueError(f"momentum must be in (0, 1], got {momentum!r}")
        if not max_mean_shift >= 0:
            raise ValueError(f"max_mean_shift must be >= 0, got {max_mean_shift!r}")
        if not max_var_ratio >= 1:
            raise ValueError(f"max_var_ratio must be >= 1, got {max_var_ratio!r}")
        if not isinstance(extrapolate, bool):
            raise ValueError(f"extrapolate must be a bool, got {extrapolate!r}")
        self.num_features = num_features
        self.eps, self.momentum = eps, momentum
        self.extrapolate = extrapolate
        self.max_mean_shift, self.max_var_ratio = max_mean_shift, max_var_ratio
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        # Row 0 holds the last step: the average over its sub-batches of their mean and variance.
        self.register_buffer("history_mean", torch.zeros(HISTORY_STEPS, num_features))
        self.register_buffer("history_var", torch.zeros(HISTORY_STEPS, num_features))
        self.register_buffer("history_count", torch.zeros(HISTORY_STEPS))  # sub-batches per step, 0: none yet
        self.register_buffer("num_steps_tracked", torch.tensor(0, dtype=torch.long))
        # This step's sub-batches so far: the sum of their (mean, variance) rows, and their number.
        # Not persistent: end_step empties them before any checkpoint.
        self.register_buffer("pending_sum", torch.zeros(2, num_features), persistent=False)
        self.register_buffer("pending_count", torch.tensor(0, dtype=torch.long), persistent=False)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, extrapolate={self.extrapolate}"
                + (f", max_mean_shift={self.max_mean_shift}, max_var_ratio={self.max_var_ratio}"
                   if self.extrapolate else ""))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.num_features:
            raise ValueError(f"SubBatchNorm2d expects (N, {self.num_features}, H, W), got {tuple(x.shape)}")
        stats_dtype = torch.promote_types(x.dtype, torch.float32)
        weight, bias = self.weight.to(stats_dtype), self.bias.to(stats_dtype)
        if not self.training:
            return F.batch_norm(x, self.running_mean.to(stats_dtype), self.running_var.to(stats_dtype), weight, bias,
                                training=False, eps=self.eps)
        r, d = self._renormalization(x.to(stats_dtype))
        # BatchNorm over the sub-batch (its fused kernel and gradient), rescaled and shifted onto the blend.
        return F.batch_norm(x, None, None, weight * r, bias + weight * d, training=True, eps=self.eps)

    @torch.no_grad()
    def _renormalization(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``r`` and ``d`` that turn the sub-batch's own normalization into the blend's; records its statistics."""
        sub_var, sub_mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
        if not _inside_backward():
            self.pending_sum.add_(torch.stack([sub_mean, sub_var]))
            self.pending_count.add_(1)
        mean, var = self._blend(sub_mean, sub_var)
        inv_std = torch.rsqrt(var + self.eps)
        return torch.sqrt(sub_var + self.eps) * inv_std, (sub_mean - mean) * inv_std

    def previous_statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The previous step's average statistics, extrapolated to this step when enabled and possible."""
        last_mean, last_var = self.history_mean[0], self.history_var[0]
        if not self.extrapolate:
            return last_mean, last_var
        mean, var = guarded_extrapolation(
            self.history_mean, self.history_var, self.eps, self.max_mean_shift, self.max_var_ratio
        )
        have_three_steps = self.history_count[-1] > 0  # a tensor test: no host synchronization
        return torch.where(have_three_steps, mean, last_mean), torch.where(have_three_steps, var, last_var)

    def _blend(self, sub_mean: torch.Tensor, sub_var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # n = history_count[0] earlier sub-batches weigh n/(n+1), this one 1/(n+1); n = 0 on the first step.
        previous_mean, previous_var = self.previous_statistics()
        n = self.history_count[0]
        return (sub_mean + n * previous_mean) / (n + 1), (sub_var + n * previous_var) / (n + 1)

    @torch.no_grad()
    def _push_step(self, mean: torch.Tensor, var: torch.Tensor, sub_batches: float) -> None:
        """Record a finished step (its average statistics over `sub_batches`) and update the running ones."""
        self.history_mean.copy_(torch.cat([mean[None], self.history_mean[:-1]]))
        self.history_var.copy_(torch.cat([var[None], self.history_var[:-1]]))
        self.history_count.copy_(torch.cat([self.history_count.new_tensor([sub_batches]), self.history_count[:-1]]))
        self.num_steps_tracked += 1
        # The plain average of the steps so far until 1/momentum steps are in (no host synchronization).
        weight = self.num_steps_tracked.to(mean.dtype).reciprocal().clamp(min=self.momentum)
        self.running_mean.lerp_(mean, weight)
        self.running_var.lerp_(var, weight)
        self.discard_pending()

    def discard_pending(self) -> None:
        self.pending_sum.zero_()
        self.pending_count.zero_()


class CheckpointSafeBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose running statistics are updated once per forward, not again by a
    gradient-checkpointing recomputation (same outputs and gradients: both use the batch statistics)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and _inside_backward():
            # Momentum 0 keeps the running statistics; the call still saves the tensors the forward saved,
            # as non-reentrant checkpointing requires.
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training=True,
                                momentum=0.0, eps=self.eps)
        return super().forward(x)


def subbatch_layers(model: nn.Module) -> list[tuple[str, SubBatchNorm2d]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, SubBatchNorm2d)]


def discard_step(model: nn.Module) -> None:
    """Forget the statistics recorded since the last :func:`end_step` (forwards no step follows)."""
    for _, layer in subbatch_layers(model):
        layer.discard_pending()


@torch.no_grad()
def end_step(model: nn.Module, process_group: dist.ProcessGroup | None = None) -> int:
    """Close an optimizer step: combine its sub-batch statistics across ranks, shift the histories.

    Call it once per optimizer step on every rank, after the step's last backward (see the module
    docstring). ``process_group``: the ranks whose sub-batches make up the step; by default the
    default group when torch.distributed is initialized. Returns the number of sub-batches of the
    step over all ranks (0, and no collective, when the model has no :class:`SubBatchNorm2d`).
    On an error (layers that recorded different numbers of sub-batches, non-finite statistics) the
    step's statistics are discarded and the histories are left as they were.
    """
    layers = subbatch_layers(model)
    if not layers:
        return 0
    counts = torch.stack([layer.pending_count for _, layer in layers])
    if bool((counts != counts[0]).any()):
        recorded = {name: int(layer.pending_count) for name, layer in layers}
        discard_step(model)
        raise RuntimeError(f"SubBatchNorm2d layers recorded different numbers of sub-batches this step: {recorded}")
    # One flat tensor: every layer's summed mean and variance, then the sub-batch count.
    sub_batches = counts[:1].to(layers[0][1].running_mean.dtype)
    totals = torch.cat([layer.pending_sum.flatten().to(sub_batches.dtype) for _, layer in layers] + [sub_batches])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1:
        dist.all_reduce(totals, group=process_group)
    count = int(totals[-1])
    if count == 0:
        return 0
    if not bool(torch.isfinite(totals).all()):
        bad = [name for (name, _), part in zip(layers, _split(totals, layers)) if not bool(torch.isfinite(part).all())]
        discard_step(model)
        raise FloatingPointError(f"non-finite sub-batch statistics this step in SubBatchNorm2d layers {bad}")
    for (_, layer), part in zip(layers, _split(totals, layers)):
        mean, var = (part / count).view(2, layer.num_features)
        layer._push_step(mean, var, count)
    return count


def _split(totals: torch.Tensor, layers: list[tuple[str, SubBatchNorm2d]]) -> tuple[torch.Tensor, ...]:
    return torch.split(totals[:-1], [2 * layer.num_features for _, layer in layers])
