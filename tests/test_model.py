"""The attention UNet: shapes per preset, heads, blocks, switches, errors, and that it learns."""

import json
import sys

import pytest
import torch

from unet.blocks import (
    BottleneckBlock,
    DownBlock,
    LocalFeatureNorm,
    UpBlock,
    sincos_position_encoding_2d,
)
from unet.labels import NUM_LABELS, PALETTE
from unet.losses import SegmentationLoss
from unet.metrics import ConfusionMatrix
from unet.model import (
    PRESETS,
    AttentionUNet,
    SegmentationOutput,
    UNetConfig,
    build_model,
    to_probabilities,
)


def bottleneck_shape(model: AttentionUNet, x: torch.Tensor) -> tuple[int, ...]:
    shapes = []
    handle = model.bottleneck.register_forward_hook(lambda module, inputs, output: shapes.append(output.shape))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return tuple(shapes[0])


def test_paper_preset_matches_section_3():
    """3x512x512 -> 1536x16x16 at the bottleneck; shapes only, on the meta device (no compute)."""
    config = PRESETS["paper"]
    assert config.widths == (96, 192, 384, 768, 1536) and config.image_size == 512
    with torch.device("meta"):
        model = AttentionUNet(config)
        x = torch.empty(1, 3, 512, 512)
    assert bottleneck_shape(model, x) == (1, 1536, 16, 16)
    with torch.device("meta"), torch.no_grad():
        output = model(x)
    assert output.label_logits.shape == (1, NUM_LABELS, 512, 512)
    assert output.boundary_logits.shape == (1, 1, 512, 512)


@pytest.mark.slow
def test_paper_preset_runs_on_a_small_input():
    model = build_model("paper").eval()
    x = torch.rand(1, 3, 64, 64)
    assert bottleneck_shape(model, x) == (1, 1536, 2, 2)
    with torch.no_grad():
        output = model(x)
    assert torch.isfinite(output.label_logits).all() and torch.isfinite(output.boundary_logits).all()


@pytest.mark.parametrize("preset, size", [("tiny", 64), ("tiny", 40), ("small", 48)])
def test_output_shapes_and_probabilities(preset, size):
    model = build_model(preset).eval()
    depth = model.config.depth
    x = torch.rand(2, 3, size, size + model.input_multiple)
    assert bottleneck_shape(model, x) == (2, model.config.widths[-1], size >> depth, (size >> depth) + 1)
    with torch.no_grad():
        output = model(x)
    assert isinstance(output, SegmentationOutput)
    assert output.label_logits.shape == (2, NUM_LABELS, size, size + model.input_multiple)
    assert output.boundary_logits.shape == (2, 1, size, size + model.input_multiple)
    probs, boundary = to_probabilities(output)
    torch.testing.assert_close(probs.sum(1), torch.ones(2, size, size + model.input_multiple))
    assert probs.min() >= 0 and boundary.min() >= 0 and boundary.max() <= 1


def test_label_logits_are_locally_normalized():
    """Section 6.5: per pixel, the logits have zero mean and the learnable per-label scale."""
    norm = LocalFeatureNorm(5)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    x = torch.randn(2, 5, 3, 4) * 7 + 3
    y = norm(x)
    centred = x - x.mean(1, keepdim=True)
    expected = centred / centred.pow(2).mean(1, keepdim=True).add(norm.eps).sqrt() * norm.weight.view(1, -1, 1, 1)
    torch.testing.assert_close(y, expected)
    model = build_model("tiny").eval()
    with torch.no_grad():
        logits = model(torch.rand(1, 3, 32, 32)).label_logits
    torch.testing.assert_close(logits.mean(1), torch.zeros(1, 32, 32), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "block, inputs",
    [
        (DownBlock(8, 16, convs=2, norm_groups=4), (torch.randn(2, 8, 8, 8),)),
        (UpBlock(16, 8, 8, convs=3, norm_groups=4), (torch.randn(2, 16, 4, 4), torch.randn(2, 8, 8, 8))),
        (BottleneckBlock(16, heads=4, mlp_ratio=2.0, norm_groups=4), (torch.randn(2, 16, 4, 4),)),
    ],
    ids=["down", "up", "bottleneck"],
)
def test_blocks_do_not_end_with_a_sign_killing_activation(block, inputs):
    """Section 6.2: block outputs reach well below SiLU's minimum (-0.2785)."""
    with torch.no_grad():
        assert block(*inputs).min() < -1.0


def test_sincos_position_encoding_separates_positions():
    code = sincos_position_encoding_2d(5, 7, 16)
    assert code.shape == (35, 16)
    distances = torch.cdist(code, code)
    assert (distances + torch.eye(35) * 10).min() > 0.1
    torch.testing.assert_close(code.pow(2).sum(1), torch.full((35,), 8.0))  # sin^2 + cos^2 per frequency
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_position_encoding_2d(2, 2, 6)


def test_bad_inputs_raise_clear_errors():
    model = build_model("tiny")
    with pytest.raises(ValueError, match=r"divisible by 8 \(2\*\*depth\), got 60x64"):
        model(torch.rand(1, 3, 60, 64))
    with pytest.raises(ValueError, match=r"shape \(B, 3, H, W\), got \(1, 4, 64, 64\)"):
        model(torch.rand(1, 4, 64, 64))
    with pytest.raises(ValueError, match=r"shape \(B, 3, H, W\)"):
        model(torch.rand(3, 64, 64))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


def test_build_model_and_config_errors():
    with pytest.raises(ValueError, match=r"unknown preset 'huge'; valid presets: \['paper', 'small', 'tiny'\]"):
        build_model("huge")
    with pytest.raises(ValueError, match=r"unknown config overrides \['widht'\]; valid fields: .*base_features"):
        build_model("tiny", widht=3)
    with pytest.raises(ValueError, match="heads=5"):
        build_model("tiny", heads=5)
    with pytest.raises(ValueError, match=r"local_attention_levels must hold decoder levels in \[0, depth=3\)"):
        build_model("tiny", local_attention_levels=(3,))
    with pytest.raises(ValueError, match="convs_per_block: expected an int >= 2, got 1"):
        UNetConfig(convs_per_block=1)
    with pytest.raises(ValueError, match="unknown UNetConfig fields"):
        UNetConfig.from_dict({"depht": 2})
    with pytest.raises(TypeError, match="UNetConfig"):
        AttentionUNet({"depth": 3})


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_config_round_trips_through_json(preset):
    config = PRESETS[preset]
    changed = UNetConfig.from_dict({**config.to_dict(), "local_attention_levels": [0, 1]})
    assert UNetConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert changed.local_attention_levels == (0, 1)


def test_build_model_applies_overrides():
    model = build_model("tiny", num_labels=5, depth=2, base_features=8, heads=2)
    assert model.input_multiple == 4
    with torch.no_grad():
        assert model(torch.rand(1, 3, 12, 8)).label_logits.shape == (1, 5, 12, 8)


def forward_backward(model, x):
    output = model(x)
    (output.label_logits.square().mean() + output.boundary_logits.mean()).backward()
    return output


def gradients(model, x):
    model.zero_grad()
    forward_backward(model, x)
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("levels", [(), (0, 2)], ids=["plain", "local-attn"])
def test_grad_checkpointing_gives_the_same_gradients(levels):
    torch.manual_seed(0)
    model = build_model("tiny", local_attention_levels=levels)
    x = torch.rand(2, 3, 32, 32)
    plain = gradients(model, x)
    model.set_grad_checkpointing(True)
    assert model.config.grad_checkpointing
    checkpointed = gradients(model, x)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)


@pytest.mark.parametrize("levels", [(), (0, 2)], ids=["plain", "local-attn"])
def test_channels_last_gives_the_same_output(levels):
    torch.manual_seed(0)
    model = build_model("tiny", local_attention_levels=levels).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last)
        got = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(got.label_logits, expected.label_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.boundary_logits, expected.boundary_logits, atol=1e-4, rtol=1e-4)


def test_local_attention_off_builds_no_local_attention():
    model = build_model("tiny")
    assert all(block.local_attention is None for block in model.decoder)
    forward_backward(model, torch.rand(1, 3, 32, 32))


def test_model_builds_and_runs_without_localattn_when_local_attention_is_off(monkeypatch):
    monkeypatch.setitem(sys.modules, "localattn", None)  # makes `import localattn` fail
    with pytest.raises(ImportError):
        import localattn  # noqa: F401
    forward_backward(build_model("tiny"), torch.rand(1, 3, 32, 32))
    with pytest.raises(ImportError, match=r"local_attention_levels=\(1,\) needs localattn.LocalAttention2d"):
        build_model("tiny", local_attention_levels=(1,))


@pytest.mark.parametrize("levels", [(0,), (0, 2)])
def test_local_attention_runs_forward_and_backward(levels):
    torch.manual_seed(0)
    model = build_model("tiny", local_attention_levels=levels)
    enabled = [block.local_attention is not None for block in model.decoder]
    assert enabled == [level in levels for level in range(3)]
    forward_backward(model, torch.rand(2, 3, 32, 32))
    for level in levels:
        grads = [p.grad for p in model.decoder[level].local_attention.parameters()]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)


def synthetic_rectangles(count: int, size: int, seed: int):
    """Label maps of random rectangles, images of their palette colours plus noise, boundary maps."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.zeros(count, size, size, dtype=torch.int64)
    for label_map in labels:
        for _ in range(4):
            top, left = torch.randint(0, size - size // 4, (2,), generator=g).tolist()
            height, width = torch.randint(size // 8, size // 2, (2,), generator=g).tolist()
            label_map[top : top + height, left : left + width] = int(torch.randint(1, NUM_LABELS, (1,), generator=g))
    images = torch.from_numpy(PALETTE).float()[labels].permute(0, 3, 1, 2) / 255
    images = images + 0.05 * torch.randn(images.shape, generator=g)
    boundary = torch.zeros(count, 1, size, size)
    boundary[:, 0, 1:] += (labels[:, 1:] != labels[:, :-1]).float()
    boundary[:, 0, :, 1:] += (labels[:, :, 1:] != labels[:, :, :-1]).float()
    return images, labels, boundary.clamp(max=1)


def mean_iou(model, images, labels):
    metric = ConfusionMatrix()
    with torch.no_grad():
        metric.update(model(images).label_logits.argmax(1), labels)
    return metric.mean_iou()


@pytest.mark.slow
def test_tiny_model_overfits_a_handful_of_images():
    torch.manual_seed(0)
    images, labels, boundary = synthetic_rectangles(count=4, size=64, seed=0)
    model = build_model("tiny")
    loss_fn = SegmentationLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    iou_before = mean_iou(model, images, labels)
    losses = []
    for _ in range(60):
        loss, _ = loss_fn(model(images), labels, boundary)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    iou_after = mean_iou(model, images, labels)
    assert losses[-1] < 0.25 * losses[0]
    assert iou_before < 0.2 and iou_after > 0.75
