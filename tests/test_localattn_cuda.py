"""CUDA kernels of the local attention op (csrc/localattn/cuda) against a dense float64 oracle.

The oracle (tests/localattn_oracle.py) builds the full [H*W, H*W] score matrix from pixel
coordinates, straight from the contract in docs/local-attention.md, independently of the
reference path and of the kernels' tiling. Every kernel error is compared with the error of the
plain-PyTorch reference path in the same dtype: the kernel may be at most twice as far from the
oracle, plus a few units of rounding of the largest value.

Tests marked `cuda` need a GPU (skipped without one by conftest.py). Without one, the same
kernel sources still run: tests/cuda_emulation builds them for the CPU with emulated threads,
barriers and shared memory, and they are checked against the same oracle.
"""

import importlib.util
import random
from pathlib import Path

import pytest
import torch

from localattn.functional import kernel_available, local_attention2d
from localattn_oracle import dense_local_attention, random_inputs

FORWARD = torch.ops.localattn.local_attention2d_forward
BACKWARD = torch.ops.localattn.local_attention2d_backward
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
CONFIGS_PER_DTYPE = 100


def test_cuda_build_registers_cuda_kernels():
    """A localattn._C compiled with the CUDA sources has both ops under the CUDA key."""
    import localattn._C as extension

    if b"local_attention2d_forward_cuda" not in Path(extension.__file__).read_bytes():
        pytest.skip("localattn._C was built without CUDA")
    for op in ("localattn::local_attention2d_forward", "localattn::local_attention2d_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op


def grads(fn, inputs, grad_out):
    """Gradients of <fn(*inputs), grad_out> with respect to every input."""
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    return out, torch.autograd.grad(out, inputs, grad_out.to(out.dtype))


def max_error(actual, expected):
    return (actual.double() - expected.double()).abs().max().item()


def assert_as_close_as_reference(name, kernel, reference, oracle, dtype, context):
    """Kernel error at most 2x the reference path's error, plus 4 units of rounding of the
    largest value (the two may round the same float32 sum to neighbouring values)."""
    kernel_error, reference_error = max_error(kernel, oracle), max_error(reference, oracle)
    floor = 4 * torch.finfo(dtype).eps * (1 + oracle.abs().max().item())
    assert kernel_error <= 2 * reference_error + floor, (
        f"{name}: kernel error {kernel_error:.3g} vs reference error {reference_error:.3g} "
        f"(floor {floor:.3g}) for {context}"
    )


def random_config(rng, dtype):
    block_size = rng.choice((1, 2, 3, 4))
    dims = (16, 32, 64) if dtype == torch.float64 and block_size == 4 else (16, 32, 64, 128)
    return dict(
        shape=(
            rng.choice((1, 2)),
            rng.randrange(1, 22, 2),
            rng.randrange(1, 22, 2),
            rng.randint(1, 4),
            rng.choice(dims),
        ),
        block_size=block_size,
        symmetric=rng.random() < 0.5,
    )


def misaligned_copy(t):
    """A contiguous copy of t whose data does not start on a 16-byte boundary."""
    storage = torch.empty(t.numel() + 1, device=t.device, dtype=t.dtype)
    shifted = storage[1:].view(t.shape).copy_(t)
    assert shifted.data_ptr() % 16 != 0
    return shifted


def check_against_oracle(shape, block_size, symmetric, dtype, seed, rpb_dtype=None,
                         forward=FORWARD, backward=BACKWARD, device="cuda", misaligned=False):
    """Runs forward and backward of the kernels (the ops, or emulated ones) on random inputs and
    compares out, lse and every gradient with the oracle, against the reference path's error."""
    q, k, v, rpb = random_inputs(shape, block_size, dtype, rpb_dtype, seed=seed, device=device)
    if misaligned:
        q = misaligned_copy(q)
    scale = shape[-1] ** -0.5
    context = (f"shape={shape}, b={block_size}, symmetric={symmetric}, dtype={dtype}, "
               f"seed={seed}, misaligned={misaligned}")
    inputs = (q, k, v, rpb)
    grad_out = torch.randn(shape, device=device, dtype=torch.float64).to(dtype)

    kernel_out, lse = forward(*inputs, block_size, scale, symmetric)
    kernel_grads = backward(grad_out, *inputs, kernel_out, lse, block_size, scale, symmetric)
    reference_out, reference_grads = grads(
        lambda *t: local_attention2d(*t, block_size, scale, symmetric, backend="reference"),
        inputs,
        grad_out,
    )
    # The oracle gets float64 leaves, so that its gradients are not rounded to dtype.
    oracle_out, oracle_grads = grads(
        lambda *t: dense_local_attention(*t, block_size, scale, symmetric)[0],
        [t.double() for t in inputs],
        grad_out,
    )
    assert kernel_out.dtype == dtype
    assert_as_close_as_reference("out", kernel_out, reference_out, oracle_out, dtype, context)
    for name, kernel, reference, expected in zip(
        ("grad_q", "grad_k", "grad_v", "grad_rpb"), kernel_grads, reference_grads, oracle_grads
    ):
        assert kernel.dtype == reference.dtype, name
        assert_as_close_as_reference(name, kernel, reference, expected, dtype, context)

    oracle_lse = dense_local_attention(*inputs, block_size, scale, symmetric)[1]
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(lse.double(), oracle_lse, rtol=1e-5, atol=1e-5, msg=context)


@pytest.fixture(scope="module")
def emulated_kernels(tmp_path_factory):
    """The CUDA kernel sources compiled for the CPU (tests/cuda_emulation)."""
    path = Path(__file__).parent / "cuda_emulation" / "emulation.py"
    spec = importlib.util.spec_from_file_location("cuda_emulation", path)
    emulation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(emulation)
    return emulation.build(tmp_path_factory.mktemp("cuda_emulation"))


@pytest.mark.slow
@pytest.mark.parametrize("tile_blocks", (None, "1", "3"))
def test_emulated_kernels_match_oracle(emulated_kernels, monkeypatch, tile_blocks):
    """All dtypes and block sizes, head sizes on and off the vector path, odd image sizes,
    misaligned inputs, and (through LOCALATTN_CUDA_TILE_BLOCKS) other tile sizes."""
    if tile_blocks is not None:
        monkeypatch.setenv("LOCALATTN_CUDA_TILE_BLOCKS", tile_blocks)
    rng = random.Random(f"emulated-{tile_blocks}")
    for seed in range(12):
        config = dict(
            shape=(rng.choice((1, 2)), rng.randint(1, 13), rng.randint(1, 13), rng.randint(1, 2),
                   rng.choice((3, 8, 16, 40, 64))),
            block_size=rng.choice((1, 2, 3, 4)),
            symmetric=rng.random() < 0.5,
        )
        check_against_oracle(**config, dtype=DTYPES[seed % len(DTYPES)], seed=seed,
                             forward=emulated_kernels.forward, backward=emulated_kernels.backward,
                             device="cpu", misaligned=seed % 3 == 0)


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_random_configurations_match_oracle(dtype):
    assert kernel_available("cuda"), "no CUDA kernel: build localattn._C with LOCALATTN_WITH_CUDA=1"
    rng = random.Random(1234)
    for seed in range(CONFIGS_PER_DTYPE):
        check_against_oracle(**random_config(rng, dtype), dtype=dtype, seed=seed)


@pytest.mark.cuda
@pytest.mark.parametrize("dim", (1, 5, 12, 24, 40, 96))
def test_head_sizes_off_the_vector_path(dim):
    """Head sizes that are not multiples of 8 take the scalar load path and zero padding."""
    check_against_oracle((2, 9, 11, 2, dim), 2, False, torch.float32, seed=dim)


@pytest.mark.cuda
@pytest.mark.slow
def test_large_image_uses_several_tiles():
    """A 64 x 48 image at b = 4, D = 128: many tiles, shrunken tiles for shared memory."""
    check_against_oracle((1, 64, 48, 2, 128), 4, False, torch.bfloat16, seed=7)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_float32_bias_table_with_low_precision_inputs(dtype):
    q, k, v, rpb = random_inputs((2, 7, 9, 3, 32), 2, dtype, rpb_dtype=torch.float32, seed=3,
                                 device="cuda")
    scale = 32**-0.5
    out, lse = FORWARD(q, k, v, rpb, 2, scale, True)
    rounded_table_out, _ = FORWARD(q, k, v, rpb.to(dtype), 2, scale, True)
    expected, _ = dense_local_attention(q, k, v, rpb, 2, scale, True)
    # The float32 table is used unrounded, so the result is no further from the oracle.
    floor = 4 * torch.finfo(dtype).eps * (1 + expected.abs().max().item())
    assert max_error(out, expected) <= max_error(rounded_table_out, expected) + floor
    grad_out = torch.randn_like(q)
    grad_rpb = BACKWARD(grad_out, q, k, v, rpb, out, lse, 2, scale, True)[3]
    assert grad_rpb.dtype == torch.float32


@pytest.mark.cuda
@pytest.mark.parametrize("symmetric", (False, True))
@pytest.mark.parametrize("block_size", (1, 2, 3, 4))
def test_gradcheck_float64(block_size, symmetric):
    inputs = random_inputs((1, 5, 7, 2, 5), block_size, torch.float64, requires_grad=True, seed=11,
                           device="cuda")
    # grad_rpb is summed with atomics, so repeated backward passes may differ in the last bits.
    assert torch.autograd.gradcheck(
        lambda *t: local_attention2d(*t, block_size, 0.7, symmetric, backend="kernel"),
        inputs,
        nondet_tol=1e-12,
    )


@pytest.mark.cuda
def test_misaligned_and_strided_inputs():
    """Inputs that start off a 16-byte boundary, or are not contiguous, give the same result."""
    shape = (1, 10, 6, 2, 16)
    q, k, v, rpb = random_inputs(shape, 2, torch.float16, seed=5, device="cuda")
    expected, _ = FORWARD(q, k, v, rpb, 2, 0.25, False)
    shifted = misaligned_copy(q)
    strided = torch.empty(shape[:-1] + (2 * shape[-1],), device="cuda", dtype=q.dtype)[..., ::2]
    strided.copy_(k)
    for inputs in ((shifted, k, v, rpb), (q, strided, v, rpb)):
        out, _ = FORWARD(*inputs, 2, 0.25, False)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.cuda
def test_empty_batch():
    q, k, v, rpb = random_inputs((0, 4, 4, 2, 16), 2, torch.float32, device="cuda")
    out, lse = FORWARD(q, k, v, rpb, 2, 0.25, False)
    assert out.shape == q.shape and lse.shape == q.shape[:4]
    grad_rpb = BACKWARD(out, q, k, v, rpb, out, lse, 2, 0.25, False)[3]
    assert torch.equal(grad_rpb, torch.zeros_like(rpb))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_opcheck(dtype):
    q, k, v, rpb = random_inputs((2, 6, 5, 2, 16), 2, dtype, seed=2, device="cuda")
    out, lse = FORWARD(q, k, v, rpb, 2, 0.25, True)
    torch.library.opcheck(FORWARD, (q, k, v, rpb, 2, 0.25, True))
    torch.library.opcheck(BACKWARD, (torch.randn_like(out), q, k, v, rpb, out, lse, 2, 0.25, True))


@pytest.mark.cuda
@pytest.mark.parametrize(
    "name, bad, error, message",
    [
        ("block_size", lambda args: 5, ValueError, "block_size"),
        ("rpb", lambda args: args["rpb"][:, :3, :3], ValueError, "rpb must be"),
        ("k", lambda args: args["k"].double(), TypeError, "dtype of q"),
        ("v", lambda args: args["v"][:, :, :3], ValueError, "shape of q"),
        ("rpb", lambda args: args["rpb"].cpu(), ValueError, "device"),
    ],
)
def test_bad_inputs_raise_clear_errors(name, bad, error, message):
    inputs = random_inputs((1, 4, 4, 2, 8), 2, torch.float32, device="cuda")
    args = dict(zip(("q", "k", "v", "rpb"), inputs))
    args["block_size"] = 2
    args[name] = bad(args)
    with pytest.raises(error, match=message):
        FORWARD(args["q"], args["k"], args["v"], args["rpb"], args["block_size"], 0.3, False)


@pytest.mark.cuda
def test_head_size_beyond_shared_memory_raises():
    q, k, v, rpb = random_inputs((1, 8, 8, 1, 128), 4, torch.float64, device="cuda")
    with pytest.raises(ValueError, match="shared memory"):
        FORWARD(q, k, v, rpb, 4, 0.1, False)
