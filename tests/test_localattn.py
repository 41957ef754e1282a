"""localattn.local_attention2d: reference path and compiled kernel against a dense oracle.

The oracle is full HW x HW attention with an explicit boolean mask and a gathered bias, built
straight from shared/design/local-attention.md, in float64.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import localattn
from localattn.functional import kernel_available

needs_cpu_kernel = pytest.mark.skipif(
    not kernel_available("cpu"), reason="localattn._C has no CPU kernel (extension not built)"
)
BACKENDS = ["reference", pytest.param("kernel", marks=needs_cpu_kernel)]


def dense_local_attention(q, k, v, rpb, b, scale, symmetric):
    """Every query against every pixel, the disallowed pairs masked out."""
    batch, height, width, heads, dim = q.shape
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[None, :] - ys[:, None]  # [query, key]: key minus query
    dx = xs[None, :] - xs[:, None]
    allowed = ((ys[None, :] // b - ys[:, None] // b).abs() <= 1) & (
        (xs[None, :] // b - xs[:, None] // b).abs() <= 1
    )
    if symmetric:
        allowed &= (dy.abs() <= b) & (dx.abs() <= b)
    table = 4 * b - 1
    # Disallowed pairs may lie off the table: clamp their index, their score is -inf anyway.
    bias = rpb[:, (dy + 2 * b - 1).clamp(0, table - 1), (dx + 2 * b - 1).clamp(0, table - 1)]

    def per_head(t):
        return t.reshape(batch, height * width, heads, dim).transpose(1, 2)

    scores = scale * per_head(q) @ per_head(k).transpose(-1, -2) + bias
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = scores.softmax(-1) @ per_head(v)
    return out.transpose(1, 2).reshape(batch, height, width, heads, dim)


def random_inputs(batch, height, width, heads, dim, b, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, height, width, heads, dim)
    q, k, v = (torch.randn(shape, generator=generator, dtype=dtype) for _ in range(3))
    rpb = torch.randn(heads, 4 * b - 1, 4 * b - 1, generator=generator, dtype=dtype)
    return [t.requires_grad_() for t in (q, k, v, rpb)]


def forward_and_grads(fn, inputs, grad_out):
    out = fn(*inputs)
    return (out, *torch.autograd.grad(out, inputs, grad_out))


def assert_matches_oracle(inputs, b, symmetric, backend, atol, rtol):
    q = inputs[0]
    scale = q.shape[-1] ** -0.5
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = forward_and_grads(
        lambda *t: dense_local_attention(*(x.double() for x in t), b, scale, symmetric),
        inputs, grad_out,
    )
    actual = forward_and_grads(
        lambda *t: localattn.local_attention2d(*t, b, symmetric=symmetric, backend=backend),
        inputs, grad_out.to(q.dtype),
    )
    for name, a, e in zip(("out", "dq", "dk", "dv", "drpb"), actual, expected):
        assert a.dtype == q.dtype, name
        torch.testing.assert_close(a.double(), e.double(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


configs = st.tuples(
    st.integers(1, 4),  # block size
    st.integers(1, 11),  # height
    st.integers(1, 11),  # width
    st.integers(1, 3),  # heads
    st.sampled_from([1, 3, 8, 16]),  # head dim
    st.booleans(),  # symmetric
)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=30, deadline=None)
@given(config=configs, batch=st.integers(1, 2), seed=st.integers(0, 2**16))
def test_matches_dense_oracle_float64(backend, config, batch, seed):
    b, height, width, heads, dim, symmetric = config
    inputs = random_inputs(batch, height, width, heads, dim, b, seed=seed)
    assert_matches_oracle(inputs, b, symmetric, backend, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "height, width, b",
    [(1, 1, 1), (1, 7, 2), (3, 2, 4), (8, 8, 4), (9, 13, 3), (6, 10, 2)],
)
@pytest.mark.parametrize("symmetric", [False, True])
def test_edges_and_non_multiples(backend, height, width, b, symmetric):
    inputs = random_inputs(2, height, width, 2, 4, b, seed=height * 100 + width)
    assert_matches_oracle(inputs, b, symmetric, backend, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtype, atol, rtol",
    [(torch.float32, 2e-5, 1e-4), (torch.bfloat16, 6e-2, 5e-2), (torch.float16, 1e-2, 1e-2)],
)
@pytest.mark.parametrize("b, symmetric", [(2, False), (4, True)])
def test_low_precision_against_float64_oracle(backend, dtype, atol, rtol, b, symmetric):
    """Float32 checks the kernel's own exp; bf16/fp16 are computed in float32 by both paths."""
    inputs = random_inputs(1, 9, 10, 2, 32, b, seed=b)
    low = [t.detach().to(dtype).requires_grad_() for t in inputs]
    assert_matches_oracle(low, b, symmetric, backend, atol=atol, rtol=rtol)


@needs_cpu_kernel
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("height, width, b", [(4, 5, 2), (3, 3, 1), (5, 4, 3)])
def test_gradcheck_kernel(symmetric, height, width, b):
    inputs = random_inputs(1, height, width, 2, 3, b, seed=7)
    assert torch.autograd.gradcheck(
        lambda *t: localattn.local_attention2d(*t, b, scale=0.7, symmetric=symmetric, backend="kernel"),
        inputs,
    )


@needs_cpu_kernel
@pytest.mark.parametrize("symmetric", [False, True])
def test_opcheck_both_ops(symmetric):
    q, k, v, rpb = random_inputs(2, 5, 7, 2, 4, 2, seed=3)
    forward = torch.ops.localattn.local_attention2d_forward.default
    torch.library.opcheck(forward, (q, k, v, rpb, 2, 0.5, symmetric))
    out, lse = forward(q, k, v, rpb, 2, 0.5, symmetric)
    grad_out = torch.randn_like(out)
    plain = [t.detach() for t in (grad_out, q, k, v, rpb, out)]
    torch.library.opcheck(
        torch.ops.localattn.local_attention2d_backward.default, (*plain, lse, 2, 0.5, symmetric)
    )


@needs_cpu_kernel
def test_forward_saves_log_sum_exp():
    q, k, v, rpb = (t.detach() for t in random_inputs(1, 6, 5, 2, 4, 2, seed=5))
    _, lse = torch.ops.localattn.local_attention2d_forward(q, k, v, rpb, 2, 0.5, False)
    assert lse.shape == (1, 6, 5, 2) and lse.dtype == torch.float64
    ys, xs = 3, 2  # one query, checked against its key set written out by hand
    keys = [(y, x) for y in range(6) for x in range(5) if abs(y // 2 - ys // 2) <= 1 and abs(x // 2 - xs // 2) <= 1]
    h = 1
    scores = torch.stack(
        [0.5 * q[0, ys, xs, h] @ k[0, y, x, h] + rpb[h, y - ys + 3, x - xs + 3] for y, x in keys]
    )
    torch.testing.assert_close(lse[0, ys, xs, h], torch.logsumexp(scores, 0))


@needs_cpu_kernel
def test_auto_uses_kernel_on_cpu_and_reference_when_forced():
    q, k, v, rpb = random_inputs(1, 4, 4, 1, 2, 2)
    auto = localattn.local_attention2d(q, k, v, rpb, 2)
    forced = localattn.local_attention2d(q, k, v, rpb, 2, backend="reference")
    assert "local_attention2d_forward" in auto.grad_fn.name()
    assert "local_attention2d" not in forced.grad_fn.name()


def test_auto_falls_back_to_reference_without_kernel():
    """The meta device has no kernel registered: auto takes the reference path (shapes only)."""
    q, k, v = (torch.empty(1, 5, 6, 2, 4, device="meta") for _ in range(3))
    rpb = torch.empty(2, 7, 7, device="meta")
    assert not kernel_available("meta")
    assert localattn.local_attention2d(q, k, v, rpb, 2).shape == q.shape
    with pytest.raises(RuntimeError, match="no compiled kernel"):
        localattn.local_attention2d(q, k, v, rpb, 2, backend="kernel")


def _good_inputs():
    q, k, v, rpb = (t.detach() for t in random_inputs(1, 4, 4, 2, 3, 2, dtype=torch.float32))
    return dict(q=q, k=k, v=v, rpb=rpb, block_size=2)


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(q=torch.randn(4, 4, 2, 3)), ValueError, "q must be"),
        (dict(k=torch.randn(1, 4, 5, 2, 3)), ValueError, "k must have the shape of q"),
        (dict(v=torch.randn(1, 4, 4, 2, 3, dtype=torch.float64)), TypeError, "v must have the dtype"),
        (dict(rpb=torch.randn(2, 5, 5)), ValueError, r"rpb must be \[heads, 4b-1, 4b-1\]"),
        (dict(rpb=torch.randn(3, 7, 7)), ValueError, "rpb must be"),
        (dict(k=torch.empty(1, 4, 4, 2, 3, device="meta")), ValueError, "k must be on the device"),
        (dict(q=torch.ones(1, 4, 4, 2, 3, dtype=torch.int64)), TypeError, "q must be floating"),
        (dict(v=[1.0]), TypeError, "v must be a Tensor"),
        (dict(block_size=0), ValueError, "block_size must be >= 1"),
        (dict(block_size=2.0), TypeError, "block_size must be an int"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
    ],
)
def test_clear_errors(change, error, message):
    arguments = _good_inputs() | change
    with pytest.raises(error, match=message):
        localattn.local_attention2d(**arguments)


@needs_cpu_kernel
def test_kernel_rejects_bad_input_with_clear_message():
    q, k, v, rpb = (t.detach() for t in random_inputs(1, 4, 4, 2, 3, 2))
    with pytest.raises(RuntimeError, match="rpb must be"):
        torch.ops.localattn.local_attention2d_forward(q, k, v, rpb[:, 1:, 1:], 2, 1.0, False)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        torch.ops.localattn.local_attention2d_forward(q.transpose(1, 2), k, v, rpb, 2, 1.0, False)
