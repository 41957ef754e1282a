"""localattn.local_attention2d: reference path and compiled kernel against a dense oracle.

The oracle (tests/localattn_oracle.py) is full HW x HW attention with an explicit boolean mask
and a gathered bias, built straight from docs/local-attention.md, in float64.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import localattn
from localattn import functional, ops
from localattn.functional import kernel_available
from localattn_oracle import dense_local_attention, random_inputs

needs_cpu_kernel = pytest.mark.skipif(
    not kernel_available("cpu"), reason="localattn._C has no CPU kernel (extension not built)"
)
BACKENDS = ["reference", pytest.param("kernel", marks=needs_cpu_kernel)]


def forward_and_grads(fn, inputs, grad_out):
    out = fn(*inputs)
    return (out, *torch.autograd.grad(out, inputs, grad_out))


def assert_matches_oracle(inputs, b, symmetric, backend, atol, rtol):
    q = inputs[0]
    scale = q.shape[-1] ** -0.5
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = forward_and_grads(
        lambda *t: dense_local_attention(*(x.double() for x in t), b, scale, symmetric)[0],
        inputs, grad_out,
    )
    actual = forward_and_grads(
        lambda *t: localattn.local_attention2d(*t, b, symmetric=symmetric, backend=backend),
        inputs, grad_out.to(q.dtype),
    )
    # out and each gradient in the dtype of q, of the input it belongs to (rpb may be float32).
    for name, a, e, like in zip(("out", "dq", "dk", "dv", "drpb"), actual, expected, (q, *inputs)):
        assert a.dtype == like.dtype, name
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
    inputs = random_inputs((batch, height, width, heads, dim), b, requires_grad=True, seed=seed)
    assert_matches_oracle(inputs, b, symmetric, backend, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "height, width, b",
    [(1, 1, 1), (1, 7, 2), (3, 2, 4), (8, 8, 4), (9, 13, 3), (6, 10, 2)],
)
@pytest.mark.parametrize("symmetric", [False, True])
def test_edges_and_non_multiples(backend, height, width, b, symmetric):
    inputs = random_inputs((2, height, width, 2, 4), b, requires_grad=True, seed=height * 100 + width)
    assert_matches_oracle(inputs, b, symmetric, backend, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtype, atol, rtol",
    [(torch.float32, 2e-5, 1e-4), (torch.bfloat16, 6e-2, 5e-2), (torch.float16, 1e-2, 1e-2)],
)
@pytest.mark.parametrize("b, symmetric", [(2, False), (4, True)])
def test_low_precision_against_float64_oracle(backend, dtype, atol, rtol, b, symmetric):
    """Float32 checks the kernel's own exp; bf16/fp16 are computed in float32 by both paths."""
    inputs = random_inputs((1, 9, 10, 2, 32), b, requires_grad=True, seed=b)
    low = [t.detach().to(dtype).requires_grad_() for t in inputs]
    assert_matches_oracle(low, b, symmetric, backend, atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtype, atol, rtol", [(torch.bfloat16, 6e-2, 5e-2), (torch.float16, 1e-2, 1e-2)]
)
def test_float32_bias_table_with_half_inputs(backend, dtype, atol, rtol):
    """The rpb dtype rule: a float32 table with float16/bfloat16 q, k, v is used unrounded and
    its gradient comes back in float32, on both paths, against the float64 oracle."""
    inputs = random_inputs((1, 9, 10, 2, 32), 2, seed=2)
    low = [t.detach().to(dtype).requires_grad_() for t in inputs[:3]]
    table = inputs[3].detach().float().requires_grad_()
    assert_matches_oracle([*low, table], 2, False, backend, atol=atol, rtol=rtol)


@needs_cpu_kernel
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("height, width, b", [(4, 5, 2), (3, 3, 1), (5, 4, 3)])
def test_gradcheck_kernel(symmetric, height, width, b):
    inputs = random_inputs((1, height, width, 2, 3), b, requires_grad=True, seed=7)
    assert torch.autograd.gradcheck(
        lambda *t: localattn.local_attention2d(*t, b, scale=0.7, symmetric=symmetric, backend="kernel"),
        inputs,
    )


@needs_cpu_kernel
@pytest.mark.parametrize("symmetric", [False, True])
def test_opcheck_both_ops(symmetric):
    q, k, v, rpb = random_inputs((2, 5, 7, 2, 4), 2, requires_grad=True, seed=3)
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
    q, k, v, rpb = random_inputs((1, 6, 5, 2, 4), 2, seed=5)
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
    q, k, v, rpb = random_inputs((1, 4, 4, 1, 2), 2, requires_grad=True)
    auto = localattn.local_attention2d(q, k, v, rpb, 2)
    forced = localattn.local_attention2d(q, k, v, rpb, 2, backend="reference")
    assert "local_attention2d_forward" in auto.grad_fn.name()
    assert "local_attention2d" not in forced.grad_fn.name()


@pytest.fixture
def fresh_fallback_warnings(monkeypatch):
    """Forgets which fallback reasons were warned about, so a test sees its first warning."""
    monkeypatch.setattr(functional, "_warned_reasons", set())


def test_auto_falls_back_to_reference_without_kernel(fresh_fallback_warnings):
    """The meta device has no kernel registered: auto takes the reference path (shapes only),
    with one FallbackWarning for that reason."""
    q, k, v = (torch.empty(1, 5, 6, 2, 4, device="meta") for _ in range(3))
    rpb = torch.empty(2, 7, 7, device="meta")
    assert not kernel_available("meta")
    with pytest.warns(localattn.FallbackWarning, match="not for device type 'meta'") as record:
        for _ in range(3):
            assert localattn.local_attention2d(q, k, v, rpb, 2).shape == q.shape
    assert len(record) == 1
    with pytest.raises(RuntimeError, match="no compiled kernel"):
        localattn.local_attention2d(q, k, v, rpb, 2, backend="kernel")


def test_fallback_compiles_without_graph_break(fresh_fallback_warnings, monkeypatch):
    """With no kernel to serve the call, torch.compile(fullgraph=True) traces the reference path
    (the FallbackWarning is an eager-mode affair: warnings.warn would break the graph)."""
    monkeypatch.setattr(ops, "KERNEL_DEVICES", frozenset())
    torch._dynamo.reset()
    q, k, v, rpb = random_inputs((1, 5, 6, 2, 4), 2, dtype=torch.float32)
    compiled = torch.compile(localattn.local_attention2d, fullgraph=True, backend="eager")
    expected = dense_local_attention(q, k, v, rpb, 2, 0.5, False)[0].float()
    torch.testing.assert_close(compiled(q, k, v, rpb, 2), expected)
    torch._dynamo.reset()


def test_cuda_block_size_beyond_kernels_falls_back(fresh_fallback_warnings, monkeypatch):
    """On a CUDA device the kernels serve b <= CUDA_MAX_BLOCK_SIZE: auto takes the reference path
    for larger blocks, warning once; backend="kernel" refuses them. (The backend choice only,
    on a pretend CUDA build; test_localattn_cuda.py runs it on a GPU.)"""
    monkeypatch.setattr(ops, "KERNEL_DEVICES", frozenset({"cpu", "cuda"}))
    cuda, largest = torch.device("cuda"), ops.CUDA_MAX_BLOCK_SIZE
    assert largest == 4
    assert functional._use_kernel(cuda, largest, "auto")
    with pytest.warns(localattn.FallbackWarning, match="block sizes up to 4") as record:
        assert not functional._use_kernel(cuda, largest + 1, "auto")
        assert not functional._use_kernel(cuda, largest + 3, "auto")
    assert len(record) == 1
    with pytest.raises(RuntimeError, match="block sizes up to 4"):
        functional._use_kernel(cuda, largest + 1, "kernel")
    assert functional._use_kernel(torch.device("cpu"), 9, "kernel") == kernel_available("cpu")


def test_kernel_devices_match_the_dispatcher():
    """localattn.ops reads the device list the extension was built with; the dispatcher's
    registrations must agree with it."""
    for device, key in (("cpu", "CPU"), ("cuda", "CUDA")):
        for op in (ops.FORWARD_OP, ops.BACKWARD_OP):
            registered = ops.EXTENSION_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(op, key)
            assert kernel_available(device) == registered, (device, op)


def _good_inputs():
    q, k, v, rpb = random_inputs((1, 4, 4, 2, 3), 2, dtype=torch.float32)
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
        (dict(q=torch.randn(1, 4, 4, 2, 0), k=torch.randn(1, 4, 4, 2, 0), v=torch.randn(1, 4, 4, 2, 0)),
         ValueError, "head size D"),
        (dict(rpb=torch.randn(2, 7, 7, dtype=torch.float64)), TypeError, "rpb must have the dtype of q"),
        (dict(rpb=torch.randn(2, 7, 7).half()), TypeError, "rpb must have the dtype of q"),
        (dict(rpb=torch.ones(2, 7, 7, dtype=torch.int32)), TypeError, "rpb must have the dtype of q"),
        (dict(rpb=torch.randn(2, 7, 7, device="meta")), ValueError, "rpb must be on the device"),
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


def test_float32_bias_table_is_refused_with_float32_or_float64_inputs():
    q, k, v, rpb = random_inputs((1, 4, 4, 2, 3), 2)
    with pytest.raises(TypeError, match=r"rpb must have the dtype of q torch.float64 \(or float32"):
        localattn.local_attention2d(q, k, v, rpb.float(), 2)


@needs_cpu_kernel
def test_kernel_rejects_bad_input_with_clear_message():
    """The CPU op checks the contract of csrc/localattn/checks.h (the one of the CUDA op), with
    the exception types of the Python API."""
    forward = torch.ops.localattn.local_attention2d_forward
    q, k, v, rpb = random_inputs((1, 4, 4, 2, 3), 2)
    with pytest.raises(ValueError, match="rpb must be"):
        forward(q, k, v, rpb[:, 1:, 1:], 2, 1.0, False)
    with pytest.raises(ValueError, match="q must be contiguous"):
        forward(q.transpose(1, 2).contiguous().transpose(1, 2), k, v, rpb, 2, 1.0, False)
    with pytest.raises(ValueError, match="k must have the shape of q"):
        forward(q, k[:, :3].contiguous(), v, rpb, 2, 1.0, False)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        forward(q, k, v, rpb, 0, 1.0, False)
    empty_heads = q[..., :0].contiguous()
    with pytest.raises(ValueError, match="head size D"):
        forward(empty_heads, empty_heads, empty_heads, rpb, 2, 1.0, False)
    with pytest.raises(TypeError, match="v must have the dtype of q"):
        forward(q, k, v.float(), rpb, 2, 1.0, False)
    with pytest.raises(TypeError, match="rpb must have the dtype of q"):
        forward(q, k, v, rpb.float(), 2, 1.0, False)
    with pytest.raises(TypeError, match="q must be float16, bfloat16, float32 or float64"):
        forward(*(t.int() for t in (q, k, v, rpb)), 2, 1.0, False)


@needs_cpu_kernel
def test_kernel_backward_takes_saved_tensors_in_any_layout():
    """torch.compile before torch 2.6 may re-lay out the tensors saved for the backward (lse was
    seen with strides (270, 1, 30, 10)): the backward op copies them, with the same result."""
    q, k, v, rpb = random_inputs((2, 5, 6, 3, 4), 2, seed=1)
    out, lse = torch.ops.localattn.local_attention2d_forward(q, k, v, rpb, 2, 0.5, False)
    grad_out = torch.randn(q.shape, dtype=q.dtype, generator=torch.Generator().manual_seed(2))
    backward = torch.ops.localattn.local_attention2d_backward

    def relaid(t):  # the same values, stored with the height innermost
        return t.transpose(1, -1).contiguous().transpose(1, -1)

    expected = backward(grad_out, q, k, v, rpb, out, lse, 2, 0.5, False)
    actual = backward(relaid(grad_out), q, k, relaid(v), rpb, relaid(out), relaid(lse), 2, 0.5, False)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


@needs_cpu_kernel
def test_kernel_backward_rejects_bad_saved_tensors():
    q, k, v, rpb = random_inputs((1, 4, 4, 2, 3), 2)
    out, lse = torch.ops.localattn.local_attention2d_forward(q, k, v, rpb, 2, 1.0, False)
    backward = torch.ops.localattn.local_attention2d_backward
    with pytest.raises(TypeError, match="lse must be Double"):
        backward(out, q, k, v, rpb, out, lse.float(), 2, 1.0, False)
    with pytest.raises(ValueError, match=r"lse must be \[B, H, W, heads\]"):
        backward(out, q, k, v, rpb, out, lse[:, :2].contiguous(), 2, 1.0, False)
    with pytest.raises(ValueError, match="grad_out must have the shape of q"):
        backward(out[:, :2].contiguous(), q, k, v, rpb, out, lse, 2, 1.0, False)
