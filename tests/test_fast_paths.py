"""The training step's fast paths compute what the plain ones do: torch.compile of the model and
the loss without graph breaks (local attention and gradient checkpointing included), the loss
without its label range check, fused AdamW, and the bottleneck attention in the layout that
scaled_dot_product_attention's flash kernel accepts."""

import functools

import pytest
import torch
import torch.nn.functional as F

from unet import losses, train
from unet.blocks import BottleneckBlock
from unet.losses import SegmentationLoss
from unet.model import PRESETS, build_model, SegmentationOutput

from test_train import make_trainer, one_step


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


# ----------------------------------------------------------------------------- torch.compile


def aot_eager_fullgraph(original):
    """torch.compile as the trainer calls it, but tracing only (forward and backward graphs, no codegen),
    and with fullgraph=True: any graph break is an error."""
    return functools.partial(original, backend="aot_eager", fullgraph=True)


@pytest.mark.slow
@pytest.mark.parametrize("grad_checkpointing", [False, True], ids=["plain", "grad-checkpointing"])
def test_compiled_trainer_has_no_graph_break_and_matches_eager(tmp_path, monkeypatch, grad_checkpointing):
    flags = ["--local-attention-levels", "0,1,2", "--channels-last", "--no-augment"]
    flags += ["--grad-checkpointing"] if grad_checkpointing else []
    eager, loader = make_trainer(tmp_path, *flags)
    monkeypatch.setattr(torch, "compile", aot_eager_fullgraph(torch.compile))
    compiled, _ = make_trainer(tmp_path, *flags, "--compile")
    assert compiled.forward_model is not compiled.model  # the model and the loss both went through compile
    assert isinstance(compiled.criterion, torch._dynamo.eval_frame.OptimizedModule)
    batches = list(loader)[:2]
    for batch in batches:
        assert one_step(compiled, batch) == pytest.approx(one_step(eager, batch), rel=1e-5)
    for (name, a), b in zip(compiled.model.named_parameters(), eager.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def flat(grads):
    return torch.cat([grad.float().flatten() for grad in grads.values()])


@pytest.mark.slow
def test_compiled_model_and_loss_under_bf16_autocast_have_no_graph_break():
    """Under bf16 the compiled step is as close to the float32 step as the eager bf16 step is."""
    images, labels, boundary = random_batch()
    torch.manual_seed(0)
    model = build_model("tiny", local_attention_levels=(0, 1, 2)).to(memory_format=torch.channels_last)
    images = images.contiguous(memory_format=torch.channels_last)
    loss_fn = SegmentationLoss(check_labels=False)
    compile_ = aot_eager_fullgraph(torch.compile)
    reference = loss_and_grads(model, loss_fn, images, labels, boundary)
    with torch.autocast("cpu", torch.bfloat16):
        eager = loss_and_grads(model, loss_fn, images, labels, boundary)
        compiled = loss_and_grads(model, compile_(loss_fn, dynamic=False), images, labels, boundary,
                                  forward=compile_(model, dynamic=False))
    eager_error = torch.linalg.vector_norm(flat(eager[2]) - flat(reference[2]))
    compiled_error = torch.linalg.vector_norm(flat(compiled[2]) - flat(reference[2]))
    assert compiled_error <= 2 * eager_error
    assert abs(compiled[0] - reference[0]) <= 2 * abs(eager[0] - reference[0]) + 1e-3 * reference[0]


def test_the_label_range_check_is_what_would_break_the_graph():
    """Why the trainer's loss skips it: the check reads tensor values back to Python."""
    images, labels, boundary = random_batch(size=8)
    output = SegmentationOutput(torch.randn(2, 24, 8, 8), torch.randn(2, 1, 8, 8))
    explained = torch._dynamo.explain(SegmentationLoss())(output, labels, boundary)
    assert explained.graph_break_count >= 1
    torch._dynamo.reset()
    assert torch._dynamo.explain(SegmentationLoss(check_labels=False))(output, labels, boundary).graph_break_count == 0


# ----------------------------------------------------------------------------- fused AdamW


def test_fused_adamw_steps_like_the_plain_one(tmp_path):
    fused, loader = make_trainer(tmp_path, "--no-augment")
    plain, _ = make_trainer(tmp_path, "--no-augment")
    assert fused.optimizer.defaults["fused"] is True
    plain.optimizer = torch.optim.AdamW(train.param_groups(plain.model, plain.args.weight_decay), lr=plain.args.lr)
    plain.scheduler = torch.optim.lr_scheduler.LambdaLR(
        plain.optimizer, train.warmup_cosine(plain.args.warmup_steps, plain.args.epochs * len(loader)))
    for batch in list(loader)[:3]:
        assert one_step(fused, batch) == pytest.approx(one_step(plain, batch), rel=1e-5)
    for (name, a), b in zip(fused.model.named_parameters(), plain.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------- attention layout


@pytest.mark.parametrize("preset", ["paper", "small"])
def test_bottleneck_attention_meets_the_flash_kernels_layout(preset, monkeypatch):
    """Under bf16 autocast q, k, v reach scaled_dot_product_attention as bf16 (B, heads, L, D) with a
    unit-stride last dimension and D a multiple of 8 (at most 256): what the CUDA flash kernel takes."""
    config = PRESETS[preset]
    width = config.widths[-1]
    block = BottleneckBlock(width, config.heads, config.mlp_ratio, config.norm_groups)
    seen = []
    original = F.scaled_dot_product_attention

    def record(q, k, v, *args, **kwargs):
        seen.append((q, k, v))
        return original(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", record)
    side = 4
    x = torch.randn(2, width, side, side).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", torch.bfloat16), torch.no_grad():
        block(x)
    (q, k, v), = seen
    head_dim = width // config.heads
    for t in (q, k, v):
        assert t.dtype == torch.bfloat16
        assert t.shape == (2, config.heads, side * side, head_dim)
        assert t.stride(-1) == 1
    assert head_dim % 8 == 0 and head_dim <= 256
