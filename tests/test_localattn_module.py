"""localattn.LocalAttention2d: shapes, layouts, dtypes, state_dict, errors, torch.compile.

Tests that take a `device` run on the CPU and, with a GPU (marker `cuda`), on it: the layer with
the CUDA kernels, autocast, channels_last and torch.compile there."""

import pytest
import torch
from torch import nn

import localattn
from localattn.functional import kernel_available

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def require_kernel(device):
    if device == "cuda":
        assert kernel_available("cuda"), "no CUDA kernel: build localattn._C with LOCALATTN_WITH_CUDA=1"
    elif not kernel_available("cpu"):
        pytest.skip("localattn._C has no CPU kernel (extension not built)")


def make_layer(seed=0, **kwargs):
    torch.manual_seed(seed)
    options = dict(in_channels=12, out_channels=8, heads=3, block_size=2) | kwargs
    return localattn.LocalAttention2d(**options)


def explicit_layer_forward(layer, x):
    """The layer's computation spelled out: 1x1 projections as einsums, then the reference op."""
    heads, dim = layer.heads, layer.head_dim
    qkv = torch.einsum("bchw,oc->bhwo", x, layer.qkv.weight)
    if layer.qkv.bias is not None:
        qkv = qkv + layer.qkv.bias
    q, k, v = qkv.unflatten(-1, (3, heads, dim)).unbind(-3)
    out = localattn.local_attention2d_reference(
        q, k, v, layer.relative_position_bias, layer.block_size, dim**-0.5, layer.symmetric
    )
    return torch.einsum("bhwc,oc->bohw", out.flatten(-2), layer.proj.weight) + layer.proj.bias[:, None, None]


@pytest.mark.parametrize("height, width", [(8, 8), (7, 5), (1, 3)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_matches_explicit_computation_for_any_size(height, width, symmetric):
    layer = make_layer(symmetric=symmetric).double()
    x = torch.randn(2, 12, height, width, dtype=torch.float64)
    out = layer(x)
    assert out.shape == (2, 8, height, width)
    torch.testing.assert_close(out, explicit_layer_forward(layer, x))


def test_defaults_and_bias_table_shape():
    layer = localattn.LocalAttention2d(16, block_size=4)
    assert (layer.out_channels, layer.heads, layer.head_dim) == (16, 4, 4)
    assert layer.relative_position_bias.shape == (4, 15, 15)
    assert layer.qkv.bias is not None
    assert localattn.LocalAttention2d(16, qkv_bias=False).qkv.bias is None


def test_explicit_head_dim_need_not_divide_channels():
    layer = localattn.LocalAttention2d(10, 6, heads=3, head_dim=5)
    assert layer(torch.randn(1, 10, 5, 4)).shape == (1, 6, 5, 4)


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_and_reference_backends_agree_with_gradients(device):
    require_kernel(device)
    layers = [make_layer(backend=backend).double().to(device) for backend in ("kernel", "reference")]
    x = torch.randn(2, 12, 9, 6, dtype=torch.float64, device=device)
    outputs, grads = [], []
    for layer in layers:
        out = layer(x)
        out.square().sum().backward()
        outputs.append(out)
        grads.append([p.grad for p in layer.parameters()])
    torch.testing.assert_close(outputs[0], outputs[1])
    for kernel_grad, reference_grad in zip(*grads):
        torch.testing.assert_close(kernel_grad, reference_grad)


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_input_gives_the_same_result(device):
    layer = make_layer().to(device)
    x = torch.randn(2, 12, 6, 10, device=device)
    out = layer(x)
    out_channels_last = layer(x.contiguous(memory_format=torch.channels_last))
    assert out_channels_last.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out_channels_last, out)


def test_state_dict_round_trip():
    layer, other = make_layer(seed=1), make_layer(seed=2)
    x = torch.randn(1, 12, 5, 6)
    assert not torch.allclose(layer(x), other(x))
    other.load_state_dict(layer.state_dict())
    assert set(layer.state_dict()) == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "relative_position_bias"}
    torch.testing.assert_close(other(x), layer(x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_float64_and_bfloat16_models(backend, device):
    layer = make_layer(backend=backend).to(device)
    x = torch.randn(2, 12, 6, 7, device=device)
    expected = layer.double()(x.double())
    assert expected.dtype == torch.float64
    out = layer.bfloat16()(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected, atol=5e-2, rtol=5e-2)
    out.float().sum().backward()
    assert layer.relative_position_bias.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_bfloat16_with_float32_parameters(device):
    layer = make_layer().to(device)
    x = torch.randn(1, 12, 6, 6, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), layer(x), atol=5e-2, rtol=5e-2)
    out.float().sum().backward()
    assert layer.relative_position_bias.grad.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_autocast_bias_gradient_is_not_rounded_to_bfloat16(backend, device):
    """Under bf16 autocast the float32 table goes to the op as it is (the rpb dtype rule), so its
    gradient is summed in float32; through a bf16 copy it would hold bf16 values only."""
    layer = make_layer(backend=backend).to(device)
    x = torch.randn(1, 12, 6, 6, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = layer(x)
    out.float().sum().backward()
    grad = layer.relative_position_bias.grad
    assert grad.dtype == torch.float32
    assert not torch.equal(grad, grad.bfloat16().float())


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(in_channels=10, heads=4), ValueError, "heads=4 must divide in_channels=10"),
        (dict(block_size=0), ValueError, "block_size must be >= 1"),
        (dict(heads=0), ValueError, "heads must be >= 1"),
        (dict(in_channels=8.0), TypeError, "in_channels must be an int"),
        (dict(backend="fast"), ValueError, "backend must be one of"),
    ],
)
def test_constructor_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        localattn.LocalAttention2d(**(dict(in_channels=12, heads=3) | kwargs))


def test_forward_errors():
    layer = make_layer()
    with pytest.raises(ValueError, match=r"expected a \(B, C, H, W\) input"):
        layer(torch.randn(12, 5, 5))
    with pytest.raises(ValueError, match="expected 12 input channels, got 11"):
        layer(torch.randn(1, 11, 5, 5))
    with pytest.raises(TypeError, match="x must be floating point .* got dtype torch.int64"):
        layer(torch.ones(1, 12, 5, 5, dtype=torch.int64))
    with pytest.raises(TypeError, match="x must be a Tensor, got ndarray"):
        layer(torch.randn(1, 12, 5, 5).numpy())


@pytest.mark.parametrize(
    "compile_backend",
    # aot_eager traces through dynamo (fullgraph) and AOT autograd with the fake kernels; inductor
    # also generates C++ code, which takes most of a minute on 2 cores.
    ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)],
)
@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_matches_eager(compile_backend, device, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # full-precision convolutions
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1),
        localattn.LocalAttention2d(12, 12, heads=3, block_size=2),
        nn.GELU(),
        nn.Conv2d(12, 2, 1),
    ).to(device)
    x = torch.randn(2, 3, 10, 9, device=device)
    compiled = torch.compile(model, fullgraph=True, backend=compile_backend)
    out = compiled(x)
    torch.testing.assert_close(out, model(x), atol=1e-5, rtol=1e-5)
    out.sum().backward()
    compiled_grad = model[1].relative_position_bias.grad.clone()
    model.zero_grad()
    model(x).sum().backward()
    torch.testing.assert_close(compiled_grad, model[1].relative_position_bias.grad, atol=1e-5, rtol=1e-5)
