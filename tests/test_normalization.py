"""unet.normalization: sub-batch batch normalization against a NumPy transcription of section 6.4,
its step API (accumulation, ranks, checkpointing, resume), and the normalization option of the model."""

import copy

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.checkpoint import checkpoint

from unet.blocks import norm_layer
from unet.model import AttentionUNet, UNetConfig
from unet.normalization import (
    CheckpointSafeBatchNorm2d, SubBatchNorm2d, discard_step, end_step, guarded_extrapolation, subbatch_layers,
)
from unet.synthetic import render_figure

EPS = 1e-5


# ----------------------------------------------------------------------------- NumPy transcription


def paper_stats(sub_batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """mu_hat and sigma_hat^2 = eps + variance of one sub-batch (N, C, H, W), per channel."""
    mu = sub_batch.mean(axis=(0, 2, 3))
    return mu, EPS + ((sub_batch - mu[None, :, None, None]) ** 2).mean(axis=(0, 2, 3))


def paper_norm(x, previous, weight, bias, predict=None):
    """Section 6.4 for one sub-batch ``x`` given the previous iteration's sub-batches (a list).

    ``predict``: optional (mu_prev_k, sigma2_prev_k) -> predicted values, applied to each previous
    sub-batch's statistics (the extrapolation)."""
    mu_hat, sigma2_hat = paper_stats(x)
    n = len(previous)
    prev = [paper_stats(p) for p in previous]
    if predict is not None:
        prev = [predict(k) for k in range(n)]
    mu = mu_hat / (n + 1) + sum(m for m, _ in prev) / (n + 1)
    sigma2 = sigma2_hat / (n + 1) + sum(s for _, s in prev) / (n + 1)
    normalized = (x - mu[None, :, None, None]) / np.sqrt(sigma2)[None, :, None, None]
    return normalized * weight[None, :, None, None] + bias[None, :, None, None]


def batchnorm_style_grad(x, previous, weight, upstream):
    """d/dx of sum(upstream * N(x)) as the layer defines it: BatchNorm's backward over the sub-batch's
    own statistics, divided by the blended sigma instead of the sub-batch's."""
    n = len(previous)
    mu_hat, sigma2_hat = paper_stats(x)
    sigma2 = sigma2_hat / (n + 1) + sum(paper_stats(p)[1] for p in previous) / (n + 1)
    c = lambda v: v[None, :, None, None]  # noqa: E731
    x_hat = (x - c(mu_hat)) / np.sqrt(c(sigma2_hat))
    g_mean = upstream.mean(axis=(0, 2, 3))
    gx_mean = (upstream * x_hat).mean(axis=(0, 2, 3))
    return c(weight / np.sqrt(sigma2)) * (upstream - c(g_mean) - x_hat * c(gx_mean))


def run_step(layer: torch.nn.Module, sub_batches) -> int:
    """One optimizer step's training-mode forwards, then the step's end."""
    with torch.no_grad():
        for sub_batch in sub_batches:
            layer(sub_batch)
    return end_step(layer)


def random_layer(channels=3, dtype=torch.float64, **kwargs) -> SubBatchNorm2d:
    layer = SubBatchNorm2d(channels, eps=EPS, **kwargs).to(dtype)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2.0)
        layer.bias.uniform_(-1.0, 1.0)
    return layer


def batches(count, shape=(2, 3, 5, 4), loc=0.0, scale=1.0, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [loc + scale * torch.randn(shape, generator=generator, dtype=dtype) for _ in range(count)]


def numpy_params(layer):
    return layer.weight.detach().numpy(), layer.bias.detach().numpy()


# ----------------------------------------------------------------------------- the formulas


@pytest.mark.parametrize("previous_count", [0, 1, 4])
def test_forward_matches_the_paper_after_a_step_of_n_sub_batches(previous_count):
    layer = random_layer()
    previous = batches(previous_count, loc=0.7, scale=1.5, seed=1)
    assert run_step(layer, previous) == previous_count
    x = batches(1, loc=-0.3, scale=0.8, seed=2)[0]
    expected = paper_norm(x.numpy(), [p.numpy() for p in previous], *numpy_params(layer))
    np.testing.assert_allclose(layer(x).detach().numpy(), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("previous_count", [0, 3])
def test_backward_is_batchnorm_s_over_the_blended_sigma(previous_count):
    layer = random_layer()
    previous = batches(previous_count, seed=3)
    run_step(layer, previous)
    x = batches(1, loc=0.5, seed=4)[0].requires_grad_()
    upstream = torch.randn_like(x)
    (layer(x) * upstream).sum().backward()
    expected = batchnorm_style_grad(x.detach().numpy(), [p.numpy() for p in previous],
                                    layer.weight.detach().numpy(), upstream.numpy())
    np.testing.assert_allclose(x.grad.numpy(), expected, rtol=1e-9, atol=1e-10)
    # The loss cannot move a channel's mean or scale: the gradient has no such component (no drift);
    # along the scale only up to eps / variance.
    centered = x.detach() - x.detach().mean(dim=(0, 2, 3), keepdim=True)
    torch.testing.assert_close(x.grad.sum(dim=(0, 2, 3)), torch.zeros(3, dtype=torch.float64))
    along_scale = x.grad * centered
    assert (along_scale.sum(dim=(0, 2, 3)).abs() <= 1e-4 * along_scale.abs().sum(dim=(0, 2, 3))).all()
    assert not layer.history_mean.requires_grad


def test_gradcheck_without_history_where_the_layer_is_batchnorm():
    layer = random_layer()
    x = batches(1, shape=(2, 3, 3, 3), seed=20)[0].requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: _with_params(layer, x, w, b), (x, layer.weight, layer.bias))
    reference = F.batch_norm(x, None, None, layer.weight, layer.bias, training=True, eps=EPS)
    torch.testing.assert_close(layer(x), reference)


@pytest.mark.parametrize("extrapolate", [False, True])
def test_gradcheck_with_the_history_fixed(extrapolate):
    """weight and bias: the exact derivative; the input: the derivative of the Batch Renormalization
    form with r and d frozen at the point (what the layer promises), against finite differences."""
    layer = random_layer(extrapolate=extrapolate)
    for step in range(3):
        run_step(layer, batches(2, loc=0.2 * step, seed=10 + step))
    x0 = batches(1, shape=(2, 3, 3, 3), loc=0.4, seed=20)[0]
    assert torch.autograd.gradcheck(lambda w, b: _with_params(layer, x0, w, b), (layer.weight, layer.bias))

    sub_var, sub_mean = torch.var_mean(x0, dim=(0, 2, 3), unbiased=False)
    mean, var = layer._blend(sub_mean, sub_var)
    r, d = torch.sqrt((sub_var + EPS) / (var + EPS)), (sub_mean - mean) / torch.sqrt(var + EPS)
    c = lambda v: v.view(1, -1, 1, 1)  # noqa: E731

    def renorm_frozen(x):
        v, m = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
        return ((x - c(m)) / torch.sqrt(c(v) + EPS) * c(r) + c(d)) * c(layer.weight) + c(layer.bias)

    torch.testing.assert_close(renorm_frozen(x0), layer(x0))
    analytic = torch.autograd.functional.jacobian(lambda x: layer(x), x0)
    numeric = torch.zeros_like(analytic)
    step = 1e-6
    for index in np.ndindex(*x0.shape):
        delta = torch.zeros_like(x0)
        delta[index] = step
        numeric[(...,) + index] = (renorm_frozen(x0 + delta) - renorm_frozen(x0 - delta)).detach() / (2 * step)
    torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-7)


def _with_params(layer, x, weight, bias):
    return torch.func.functional_call(layer, {"weight": weight, "bias": bias}, (x,))


def test_the_blend_uses_the_previous_step_only_and_its_own_sub_batch_count():
    layer = random_layer()
    run_step(layer, batches(5, loc=9.0, seed=5))  # two steps back: must not count
    previous = batches(2, loc=-1.0, seed=6)
    run_step(layer, previous)
    x = batches(1, seed=7)[0]
    expected = paper_norm(x.numpy(), [p.numpy() for p in previous], *numpy_params(layer))
    np.testing.assert_allclose(layer(x).detach().numpy(), expected, rtol=1e-10, atol=1e-10)
    assert layer.history_count.tolist() == [2, 5, 0]


# ----------------------------------------------------------------------------- extrapolation and drift guard


def test_extrapolation_predicts_a_smooth_trend_as_the_paper_says():
    layer = random_layer(extrapolate=True)
    steps = [batches(2, shape=(2, 3, 16, 16), loc=0.1 * i, scale=1.0 + 0.05 * i, seed=30 + i) for i in range(3)]
    x = batches(1, seed=40)[0]
    for step in steps:
        run_step(layer, step)
    # steps[-1] is i-1, steps[-2] is i-2, steps[-3] is i-3; extrapolate every sub-batch's statistics.
    stats = [[paper_stats(p.numpy()) for p in step] for step in steps]

    def predict(k):
        return tuple(2.5 * stats[2][k][j] - 2.0 * stats[1][k][j] + 0.5 * stats[0][k][j] for j in (0, 1))

    expected = paper_norm(x.numpy(), [p.numpy() for p in steps[-1]], *numpy_params(layer), predict=predict)
    mean, var = guarded_extrapolation(layer.history_mean, layer.history_var, EPS, 0.5, 2.0)
    raw = [2.5 * h[0] - 2 * h[1] + 0.5 * h[2] for h in (layer.history_mean, layer.history_var)]
    assert torch.equal(mean, raw[0]) and torch.equal(var, raw[1]), "the trend must stay inside the trust region"
    np.testing.assert_allclose(layer(x).detach().numpy(), expected, rtol=1e-10, atol=1e-10)


def test_extrapolation_waits_for_three_steps():
    plain, extrapolating = random_layer(), random_layer(extrapolate=True)
    extrapolating.load_state_dict(plain.state_dict())
    x = batches(1, seed=41)[0]
    for step in range(2):
        for layer in (plain, extrapolating):
            run_step(layer, batches(2, loc=step, seed=42 + step))
        assert torch.equal(plain(x), extrapolating(x))
    for layer in (plain, extrapolating):
        run_step(layer, batches(2, loc=2.0, seed=44))
    assert not torch.allclose(plain(x), extrapolating(x))


def test_drift_guard_clamps_a_negative_variance_and_a_runaway_mean():
    # variance 1, 4, 1 over steps i-3..i-1 extrapolates to 2.5 - 8 + 0.5 = -5; mean 0, 0, 3 to 7.5
    history_mean = torch.tensor([[3.0], [0.0], [0.0]])
    history_var = torch.tensor([[1.0], [4.0], [1.0]])
    mean, var = guarded_extrapolation(history_mean, history_var, EPS, max_mean_shift=0.5, max_var_ratio=2.0)
    assert var.item() == pytest.approx(0.5)  # last variance / ratio
    assert mean.item() == pytest.approx(3.0 + 0.5 * (1.0 + EPS) ** 0.5)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(-100, 100), min_size=3, max_size=3),
    st.lists(st.floats(0, 100), min_size=3, max_size=3),
    st.floats(0, 3),
    st.floats(1, 10),
)
def test_drift_guard_stays_in_its_trust_region_and_keeps_inner_predictions(means, variances, shift, ratio):
    history_mean = torch.tensor(means, dtype=torch.float64).view(3, 1)
    history_var = torch.tensor(variances, dtype=torch.float64).view(3, 1)
    mean, var = guarded_extrapolation(history_mean, history_var, EPS, shift, ratio)
    last_mean, last_var = means[0], variances[0]
    band = shift * (last_var + EPS) ** 0.5
    assert last_mean - band - 1e-9 <= mean.item() <= last_mean + band + 1e-9
    assert last_var / ratio - 1e-9 <= var.item() <= last_var * ratio + 1e-9
    raw_mean = 2.5 * means[0] - 2 * means[1] + 0.5 * means[2]
    raw_var = 2.5 * variances[0] - 2 * variances[1] + 0.5 * variances[2]
    if abs(raw_mean - last_mean) < band * 0.999:
        assert mean.item() == pytest.approx(raw_mean, abs=1e-9)
    if last_var / ratio * 1.001 < raw_var < last_var * ratio * 0.999:
        assert var.item() == pytest.approx(raw_var, abs=1e-9)


def test_drift_guard_keeps_noisy_stationary_statistics_positive_where_raw_extrapolation_fails():
    # Steps of 2 sub-batches of 2x1x2x2 values: very noisy per-step variances of a stationary input.
    layer = random_layer(channels=1, extrapolate=True)
    raw_negative, normalizers = 0, []
    for step in range(60):
        run_step(layer, batches(2, shape=(2, 1, 2, 2), seed=100 + step))
        raw_var = 2.5 * layer.history_var[0] - 2 * layer.history_var[1] + 0.5 * layer.history_var[2]
        raw_negative += int(step >= 2 and raw_var.item() <= 0)
        normalizers.append(layer.previous_statistics()[1].item())
    assert raw_negative > 0, "the test needs a sequence on which plain extrapolation breaks"
    assert min(normalizers[2:]) > 0


# ----------------------------------------------------------------------------- step API, eval mode, state


def test_running_statistics_average_the_steps_then_follow_the_momentum():
    layer = random_layer(momentum=0.25)
    step_means = []
    for step in range(7):
        sub_batches = batches(3, loc=float(step), seed=50 + step)
        step_means.append(np.mean([paper_stats(p.numpy())[0] for p in sub_batches], axis=0))
        run_step(layer, sub_batches)
        if step < 4:  # 1/momentum steps: the plain average
            np.testing.assert_allclose(layer.running_mean.numpy(), np.mean(step_means, axis=0), rtol=1e-12)
    expected = np.mean(step_means[:4], axis=0)
    for mean in step_means[4:]:
        expected = 0.75 * expected + 0.25 * mean
    np.testing.assert_allclose(layer.running_mean.numpy(), expected, rtol=1e-12)
    assert int(layer.num_steps_tracked) == 7


def test_eval_mode_uses_the_running_statistics_and_records_nothing():
    layer = random_layer()
    for step in range(3):
        run_step(layer, batches(2, loc=step, seed=60 + step))
    layer.eval()
    x = batches(1, seed=63)[0]
    expected = (x - layer.running_mean.view(1, -1, 1, 1)) / torch.sqrt(layer.running_var.view(1, -1, 1, 1) + EPS)
    expected = expected * layer.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(layer(x), expected)
    assert end_step(layer) == 0 and int(layer.num_steps_tracked) == 3


def test_the_state_dict_carries_the_history_and_a_loaded_layer_continues_identically():
    layer = random_layer(extrapolate=True)
    for step in range(4):
        run_step(layer, batches(2, loc=0.3 * step, seed=70 + step))
    state = layer.state_dict()
    assert {"history_mean", "history_var", "history_count", "running_mean", "running_var",
            "num_steps_tracked"} <= set(state)
    assert not {"pending_sum", "pending_count"} & set(state)  # emptied by end_step before any checkpoint
    restored = random_layer(extrapolate=True)
    restored.load_state_dict(state)
    x = batches(1, seed=80)[0]
    assert torch.equal(layer(x), restored(x))
    run_step(layer, batches(2, seed=81))
    run_step(restored, batches(2, seed=81))
    assert torch.equal(layer.history_mean, restored.history_mean)
    layer.eval(), restored.eval()
    assert torch.equal(layer(x), restored(x))


def test_end_step_rejects_uneven_recordings_and_non_finite_statistics():
    model = torch.nn.Sequential(SubBatchNorm2d(3), SubBatchNorm2d(3))
    model[0](torch.randn(2, 3, 4, 4))
    with pytest.raises(RuntimeError, match="different numbers of sub-batches"):
        end_step(model)
    discard_step(model)
    model(torch.full((2, 3, 4, 4), float("nan")))
    with pytest.raises(FloatingPointError, match=r"\['0', '1'\]"):
        end_step(model)
    assert int(model[0].num_steps_tracked) == 0 and end_step(model) == 0  # nothing recorded, nothing left
    assert end_step(torch.nn.Conv2d(3, 3, 1)) == 0


def test_discard_step_forgets_forwards_that_no_step_follows():
    layer = random_layer()
    run_step(layer, batches(2, seed=90))
    history = layer.history_mean.clone()
    layer(batches(1, loc=5.0, seed=91)[0])
    discard_step(layer)
    assert end_step(layer) == 0
    assert torch.equal(layer.history_mean, history)


def test_bad_input_and_options_are_clear_errors():
    with pytest.raises(ValueError, match=r"expects \(N, 3, H, W\)"):
        SubBatchNorm2d(3)(torch.randn(2, 4, 5, 5))
    with pytest.raises(ValueError, match="momentum"):
        SubBatchNorm2d(3, momentum=0.0)
    with pytest.raises(ValueError, match="max_var_ratio"):
        SubBatchNorm2d(3, max_var_ratio=0.5)


# ----------------------------------------------------------------------------- AMP, channels_last, checkpointing


def test_autocast_keeps_float32_statistics_and_the_input_dtype():
    layer = SubBatchNorm2d(4)
    conv = torch.nn.Conv2d(3, 4, 3)
    x = torch.randn(2, 3, 9, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x)
        y = layer(h)
    assert h.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    assert layer.pending_sum.dtype == torch.float32 and int(layer.pending_count) == 1
    torch.testing.assert_close(layer.pending_sum[0], h.float().mean(dim=(0, 2, 3)))


def test_channels_last_gives_the_same_values_in_the_same_memory_format():
    layer = random_layer(channels=8, dtype=torch.float32)
    run_step(layer, batches(2, shape=(2, 8, 6, 6), dtype=torch.float32, seed=95))
    x = torch.randn(2, 8, 6, 6)
    y_last = layer(x.contiguous(memory_format=torch.channels_last))
    assert y_last.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y_last, layer(x))


def test_the_model_trains_under_autocast_in_channels_last():
    model = AttentionUNet(tiny_config()).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        labels, boundary = model(x)
    (labels.float().square().mean() + boundary.float().mean()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert all(norm.pending_sum.dtype == torch.float32 for norm in subbatch_norms(model))
    assert end_step(model) == 1


def tiny_config(**overrides) -> UNetConfig:
    fields = dict(base_features=8, depth=2, bottleneck_blocks=1, heads=2, norm_groups=4, image_size=16,
                  norm="subbatch")
    return UNetConfig(**{**fields, **overrides})


def subbatch_norms(model):
    return [m for m in model.modules() if isinstance(m, SubBatchNorm2d)]


@pytest.mark.parametrize("use_reentrant", [None, True])
def test_gradient_checkpointing_records_each_sub_batch_once_and_keeps_the_gradients(use_reentrant):
    torch.manual_seed(0)
    plain = AttentionUNet(tiny_config())
    checkpointed = AttentionUNet(tiny_config())
    checkpointed.load_state_dict(plain.state_dict())
    if use_reentrant:  # the model's own checkpointing is non-reentrant; wrap the whole model instead
        run = lambda x: checkpoint(checkpointed, x, use_reentrant=True)  # noqa: E731
    else:
        checkpointed.set_grad_checkpointing(True)
        run = checkpointed
    x = torch.randn(2, 3, 16, 16, requires_grad=bool(use_reentrant))
    for model, forward in ((plain, plain), (checkpointed, run)):
        model.train()
        labels, boundary = forward(x)  # a plain tuple from the reentrant checkpoint
        (labels.square().mean() + boundary.mean()).backward()
    assert all(int(norm.pending_count) == 1 for norm in subbatch_norms(checkpointed))
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    assert end_step(checkpointed) == 1


@pytest.mark.parametrize("use_reentrant", [None, True])
def test_gradient_checkpointing_updates_batch_norm_running_statistics_once(use_reentrant):
    """Plain nn.BatchNorm2d would count each sub-batch twice: in the forward and in the recomputation."""
    torch.manual_seed(0)
    plain = AttentionUNet(tiny_config(norm="batch"))
    checkpointed = copy.deepcopy(plain)
    if use_reentrant:
        run = lambda x: checkpoint(checkpointed, x, use_reentrant=True)  # noqa: E731
    else:
        checkpointed.set_grad_checkpointing(True)
        run = checkpointed
    for step in range(2):
        x = torch.randn(2, 3, 16, 16, requires_grad=bool(use_reentrant))
        for forward in (plain, run):
            labels, boundary = forward(x)
            (labels.square().mean() + boundary.mean()).backward()
    norms = [m for m in checkpointed.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(isinstance(m, CheckpointSafeBatchNorm2d) and int(m.num_batches_tracked) == 2 for m in norms)
    for (name, a), b in zip(plain.state_dict().items(), checkpointed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_torch_compile_traces_one_graph_and_updates_the_statistics_as_eager_does(grad_checkpointing):
    """fullgraph: no graph break; error_on_recompile: the step's records do not change the graph (the
    fourth step extrapolates). aot_eager runs the real Dynamo and AOTAutograd (functionalization of
    the buffer updates, the recomputation of checkpointed blocks) without Inductor's code generation,
    so values match eager."""
    torch.manual_seed(0)
    model = AttentionUNet(tiny_config(subbatch_extrapolate=True, grad_checkpointing=grad_checkpointing))
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    generator = torch.Generator().manual_seed(5)
    for step in range(4):
        for sub_batch in range(2):
            x = torch.randn(2, 3, 16, 16, generator=generator)
            with torch._dynamo.config.patch(error_on_recompile=step + sub_batch > 0):
                compiled_labels, _ = compiled(x)
            eager_labels, _ = eager(x)
            torch.testing.assert_close(compiled_labels, eager_labels)
            compiled_labels.square().mean().backward()
            eager_labels.square().mean().backward()
        for (name, p), q in zip(model.named_parameters(), eager.parameters()):
            if q.grad is not None:  # the boundary head gets none from this loss (zeros when compiled)
                torch.testing.assert_close(p.grad, q.grad, msg=name)
            p.grad = q.grad = None
        assert all(int(layer.pending_count) == 2 for _, layer in subbatch_layers(model))
        assert end_step(model) == end_step(eager)
        for (name, a), b in zip(model.state_dict().items(), eager.state_dict().values()):
            torch.testing.assert_close(a, b, msg=name)


# ----------------------------------------------------------------------------- the model option


def test_the_model_builds_the_chosen_normalization():
    group, batch, sub = (AttentionUNet(tiny_config(norm=kind)) for kind in ("group", "batch", "subbatch"))
    kinds = lambda model, cls: sum(isinstance(m, cls) for m in model.modules())  # noqa: E731
    total = kinds(group, torch.nn.GroupNorm)
    assert total > 0 and kinds(batch, torch.nn.BatchNorm2d) == total and len(subbatch_norms(sub)) == total
    assert kinds(sub, torch.nn.GroupNorm) == 0 and kinds(batch, torch.nn.GroupNorm) == 0
    extrapolating = AttentionUNet(tiny_config(subbatch_extrapolate=True))
    assert all(norm.extrapolate for norm in subbatch_norms(extrapolating))


def test_old_configs_and_checkpoints_keep_group_norm_and_their_names():
    old = tiny_config().to_dict()
    del old["norm"], old["subbatch_extrapolate"]
    model = AttentionUNet(UNetConfig.from_dict(old))
    assert model.config.norm == "group" and isinstance(model.encoder[0].down[1], torch.nn.GroupNorm)
    # GroupNorm has no buffers: the state_dict is exactly the parameters, under the names they always had.
    assert list(model.state_dict()) == [name for name, _ in model.named_parameters()]
    assert "encoder.0.down.1.weight" in model.state_dict()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"norm": "layer"}, "norm must be one of group, batch, subbatch"),
        ({"norm": "group", "subbatch_extrapolate": True}, "subbatch_extrapolate needs norm='subbatch'"),
        ({"subbatch_extrapolate": 1}, "subbatch_extrapolate must be a bool"),
    ],
)
def test_bad_normalization_options_are_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)
    with pytest.raises(ValueError, match="unknown normalization 'layer'"):
        norm_layer("layer")


def test_a_resumed_model_continues_exactly():
    def train_steps(model, optimizer, steps, seed):
        generator = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            for _ in range(2):  # accumulation
                x = torch.randn(2, 3, 16, 16, generator=generator)
                model(x).label_logits.square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            end_step(model)

    torch.manual_seed(0)
    model = AttentionUNet(tiny_config(subbatch_extrapolate=True))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_steps(model, optimizer, 4, seed=1)
    saved = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    train_steps(model, optimizer, 3, seed=2)

    resumed = AttentionUNet(tiny_config(subbatch_extrapolate=True))
    resumed.load_state_dict(saved["model"])
    resumed_optimizer = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    resumed_optimizer.load_state_dict(saved["optimizer"])
    train_steps(resumed, resumed_optimizer, 3, seed=2)
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


# ----------------------------------------------------------------------------- the paper's failure mode


def figures(count, size, seed):
    rng = np.random.default_rng(seed)
    images, labels = zip(*(render_figure(rng, size) for _ in range(count)))
    images = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    return images, torch.from_numpy(np.stack(labels))


@pytest.mark.slow
@pytest.mark.parametrize("extrapolate", [False, True])
def test_a_trained_model_gives_the_same_answers_in_eval_and_training_mode(extrapolate, one_thread):
    """Section 6.4: BatchNorm on undersized batches 'spits out garbage in evaluation mode'. With the
    exact derivative of the blend instead of BatchNorm's gradient, this model agrees on ~0% of pixels."""
    torch.manual_seed(0)
    model = AttentionUNet(tiny_config(image_size=32, subbatch_extrapolate=extrapolate))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    images, labels = figures(40, 32, seed=0)
    model.train()
    for step in range(40):
        for sub in range(4):  # a batch of 8 as 4 sub-batches of 2
            index = torch.randint(0, 32, (2,))
            loss = F.cross_entropy(model(images[index]).label_logits, labels[index]) / 4
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        end_step(model)
    held_out = images[32:]
    with torch.no_grad():
        training_mode = torch.cat([model(held_out[i : i + 2]).label_logits for i in range(0, 8, 2)]).softmax(1)
        discard_step(model)
        model.eval()
        eval_mode = model(held_out).label_logits.softmax(1)
    agreement = (training_mode.argmax(1) == eval_mode.argmax(1)).float().mean().item()
    assert (training_mode - eval_mode).abs().mean().item() < 0.015
    assert agreement > 0.9


# ----------------------------------------------------------------------------- two processes


def _exchange_worker(rank, world_size, init_file, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        calls = []
        real_all_reduce = dist.all_reduce

        def counting_all_reduce(tensor, *args, **kwargs):
            calls.append(tensor.numel())
            return real_all_reduce(tensor, *args, **kwargs)

        dist.all_reduce = counting_all_reduce
        torch.manual_seed(0)
        model = torch.nn.Sequential(random_layer(3), torch.nn.Conv2d(3, 5, 1).double(), random_layer(5))
        step_one = batches(4, seed=200)[2 * rank : 2 * rank + 2]  # accumulation 2 x world size 2: n = 4
        sub_batches = run_step(model, step_one)
        x = batches(1, seed=300 + rank)[0]
        output = model[0](x).detach()
        torch.save({"calls": calls, "n": sub_batches, "state": model.state_dict(), "output": output},
                   f"{results}/rank{rank}.pt")
    finally:
        dist.all_reduce = real_all_reduce
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_share_one_exchange_of_all_sub_batch_statistics(tmp_path):
    mp.spawn(_exchange_worker, args=(2, tmp_path / "init", tmp_path), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["calls"] for r in ranks] == [[2 * 3 + 2 * 5 + 1]] * 2  # one collective, 2C per layer + the count
    assert [r["n"] for r in ranks] == [4, 4]
    for name, value in ranks[0]["state"].items():  # identical buffers: DDP need not broadcast them
        assert torch.equal(value, ranks[1]["state"][name]), name
    torch.manual_seed(0)
    layer = random_layer(3)  # the workers' first layer: the same seed, the same draws
    all_sub_batches = batches(4, seed=200)
    for rank in range(2):
        x = batches(1, seed=300 + rank)[0]
        expected = paper_norm(x.numpy(), [p.numpy() for p in all_sub_batches], *numpy_params(layer))
        np.testing.assert_allclose(ranks[rank]["output"].numpy(), expected, rtol=1e-10, atol=1e-10)
