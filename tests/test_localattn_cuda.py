"""CUDA kernels of the local attention op (csrc/localattn/cuda) against a dense float64 oracle.

Every kernel test runs twice, through the `kernels` fixture:

* ``[cuda]`` (marker `cuda`, skipped without a GPU): the compiled ops on the GPU;
* ``[emulated]`` (marker `slow`): the same kernel and launcher sources (ops.cu included)
  compiled for the CPU by tests/cuda_emulation, with emulated threads, barriers and shared
  memory, every global- and shared-memory access checked against its bounds and alignment and
  every launch against an H100's limits. The first run builds it (minutes); later runs reuse it.

Tolerance. The kernels sum in another order than the oracle (atomics in an order that changes
from run to run, included), so each result may differ from the exact one by rounding that
grows with the number and size of the terms summed. tests/localattn_oracle.py's
rounding_error_bounds derives, from the data, an elementwise bound on that error for the
kernels' arithmetic (accumulation in float32, float64 for float64 inputs; results rounded to
their dtype), from the standard bound gamma_n = n u / (1 - n u) times the sum of the absolute
values of n terms, summed in any order: scores over D products, the softmax over the 9b^2 keys,
the outputs and gradients over 9b^2 terms, grad_rpb over the B*H*W terms of each table entry,
with the errors of each stage propagated into the next. The oracle's own float64 rounding gets
the same bound. A result passes when |kernel - oracle| <= kernel bound + oracle bound for every
element. Being a bound for any summation order, it cannot pass on one run and fail on the next;
the tests below that feed it wrong results (a dropped key, a transposed bias table) show that it
still catches kernel bugs, and the reference path and CPU kernel, summing in other orders again,
stay inside it.
"""

import functools
import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from localattn.functional import kernel_available, local_attention2d
from localattn_oracle import dense_local_attention, random_inputs, rounding_error_bounds, unit_roundoff

FORWARD = torch.ops.localattn.local_attention2d_forward
BACKWARD = torch.ops.localattn.local_attention2d_backward
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
GRADIENTS = ("grad_q", "grad_k", "grad_v", "grad_rpb")


@functools.cache
def emulated_module():
    """The CUDA sources compiled for the CPU (tests/cuda_emulation), built once per session."""
    path = Path(__file__).parent / "cuda_emulation" / "emulation.py"
    spec = importlib.util.spec_from_file_location("cuda_emulation", path)
    emulation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(emulation)
    return emulation.build()


class EmulatedAttention(torch.autograd.Function):
    """The emulated forward and backward ops as one differentiable function, for gradcheck."""

    @staticmethod
    def forward(ctx, q, k, v, rpb, block_size, scale, symmetric):
        out, lse = emulated_module().forward(q, k, v, rpb, block_size, scale, symmetric)
        ctx.save_for_backward(q, k, v, rpb, out, lse)
        ctx.options = (block_size, scale, symmetric)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, rpb, out, lse = ctx.saved_tensors
        grads = emulated_module().backward(grad_out.contiguous(), q, k, v, rpb, out, lse, *ctx.options)
        return (*grads, None, None, None)


@dataclass
class Kernels:
    """One way of running the CUDA kernels: on the GPU, or emulated on the CPU."""

    name: str
    device: str
    forward: Callable  # (q, k, v, rpb, b, scale, symmetric) -> (out, lse)
    backward: Callable  # (grad_out, q, k, v, rpb, out, lse, b, scale, symmetric) -> 4 gradients
    attention: Callable  # (q, k, v, rpb, b, scale, symmetric) -> out, differentiable

    @property
    def on_gpu(self):
        return self.name == "cuda"


def gpu_kernels():
    assert kernel_available("cuda"), "no CUDA kernel: build localattn._C with LOCALATTN_WITH_CUDA=1"
    return Kernels(
        "cuda", "cuda", FORWARD, BACKWARD,
        lambda *args: local_attention2d(*args, backend="kernel"),
    )


def emulated_kernels():
    module = emulated_module()
    return Kernels("emulated", "cpu", module.forward, module.backward, EmulatedAttention.apply)


@pytest.fixture(params=[pytest.param("cuda", marks=pytest.mark.cuda),
                        pytest.param("emulated", marks=pytest.mark.slow)])
def kernels(request):
    return gpu_kernels() if request.param == "cuda" else emulated_kernels()


def test_cuda_build_registers_cuda_kernels():
    """A localattn._C compiled with the CUDA sources has both ops under the CUDA key."""
    import localattn._C as extension

    if b"local_attention2d_forward_cuda" not in Path(extension.__file__).read_bytes():
        pytest.skip("localattn._C was built without CUDA")
    for op in ("localattn::local_attention2d_forward", "localattn::local_attention2d_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op


# The criterion -------------------------------------------------------------------------------


def oracle_results(q, k, v, rpb, grad_out, block_size, scale, symmetric):
    """{name: exact value} of out, lse and the four gradients, from the float64 oracle."""
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v, rpb)]
    out, lse = dense_local_attention(*leaves, block_size, scale, symmetric)
    grads = torch.autograd.grad(out, leaves, grad_out.double())
    return {"out": out.detach(), "lse": lse.detach(), **dict(zip(GRADIENTS, grads))}


def allowed_errors(q, k, v, rpb, grad_out, block_size, scale, symmetric):
    """{name: elementwise bound} on |kernel - oracle|: the kernels' rounding plus the oracle's."""
    args = (q, k, v, rpb, grad_out, block_size, scale, symmetric)
    accumulate = torch.float64 if q.dtype == torch.float64 else torch.float32
    kernel = rounding_error_bounds(*args, accumulate_u=unit_roundoff(accumulate),
                                   store_u=unit_roundoff(q.dtype), rpb_u=unit_roundoff(rpb.dtype))
    u64 = unit_roundoff(torch.float64)
    oracle = rounding_error_bounds(*args, accumulate_u=u64, store_u=u64, rpb_u=u64)
    return {name: kernel[name] + oracle[name] for name in kernel}


def assert_within_bounds(results, expected, allowed, context):
    """Every element of every result within its allowed error of the oracle."""
    for name, actual in results.items():
        assert actual.shape == expected[name].shape, name
        error = (actual.double() - expected[name]).abs().nan_to_num(float("inf"))
        excess = error - allowed[name]
        if (excess > 0).any():
            worst = tuple(torch.unravel_index(excess.argmax(), excess.shape))
            index = tuple(int(i) for i in worst)
            raise AssertionError(
                f"{name}{list(index)}: error {error[worst].item():.3g} exceeds the rounding bound "
                f"{allowed[name][worst].item():.3g} (value {expected[name][worst].item():.6g}, "
                f"{int((excess > 0).sum())} elements over) for {context}"
            )


def misaligned_copy(t):
    """A contiguous copy of t whose data does not start on a 16-byte boundary."""
    storage = torch.empty(t.numel() + 1, device=t.device, dtype=t.dtype)
    shifted = storage[1:].view(t.shape).copy_(t)
    assert shifted.data_ptr() % 16 != 0
    return shifted


def check_against_oracle(kernels, shape, block_size, symmetric, dtype, seed, rpb_dtype=None,
                         misaligned=False):
    """Runs forward and backward of the kernels on random inputs and checks out, lse and every
    gradient against the oracle within the rounding bounds."""
    q, k, v, rpb = random_inputs(shape, block_size, dtype, rpb_dtype, seed=seed, device=kernels.device)
    if misaligned:
        q = misaligned_copy(q)
    generator = torch.Generator(device=kernels.device).manual_seed(seed + 10_000)
    grad_out = torch.randn(shape, generator=generator, device=kernels.device,
                           dtype=torch.float64).to(dtype)
    scale = shape[-1] ** -0.5
    context = (f"shape={shape}, b={block_size}, symmetric={symmetric}, dtype={dtype}, "
               f"rpb_dtype={rpb.dtype}, seed={seed}, misaligned={misaligned}")

    out, lse = kernels.forward(q, k, v, rpb, block_size, scale, symmetric)
    grads = kernels.backward(grad_out, q, k, v, rpb, out, lse, block_size, scale, symmetric)
    assert out.dtype == dtype
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert [g.dtype for g in grads] == [dtype, dtype, dtype, rpb.dtype]

    args = (q, k, v, rpb, grad_out, block_size, scale, symmetric)
    results = {"out": out, "lse": lse, **dict(zip(GRADIENTS, grads))}
    assert_within_bounds(results, oracle_results(*args), allowed_errors(*args), context)


def random_config(rng, dtype, max_side, dims):
    block_size = rng.choice((1, 2, 3, 4))
    if dtype == torch.float64 and block_size == 4:  # D=128 does not fit in shared memory
        dims = tuple(d for d in dims if d <= 64)
    return dict(
        shape=(
            rng.choice((1, 2)),
            rng.randrange(1, max_side + 1, 2),
            rng.randrange(1, max_side + 1, 2),
            rng.randint(1, 4),
            rng.choice(dims),
        ),
        block_size=block_size,
        symmetric=rng.random() < 0.5,
    )


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("bug", ("dropped key", "transposed bias table"))
def test_bounds_catch_kernel_bugs(dtype, bug):
    """The criterion is not loose: results of a kernel with a typical bug fail it, in float32
    and float64. The bug is played by the oracle on altered inputs: a bias of -inf for the offset
    (1, 0) drops the key just below every query; a transposed table swaps the x and y offsets."""
    block_size, scale, symmetric = 2, 0.25, False
    q, k, v, rpb = random_inputs((2, 9, 11, 3, 16), block_size, dtype, seed=4)
    grad_out = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    if bug == "dropped key":
        wrong_rpb = rpb.clone()
        wrong_rpb[:, 2 * block_size, 2 * block_size - 1] = float("-inf")
    else:
        wrong_rpb = rpb.transpose(1, 2)
    args = (q, k, v, rpb, grad_out, block_size, scale, symmetric)
    wrong = oracle_results(q, k, v, wrong_rpb, grad_out, block_size, scale, symmetric)
    expected, allowed = oracle_results(*args), allowed_errors(*args)
    for name in ("out", *GRADIENTS):
        with pytest.raises(AssertionError, match="exceeds the rounding bound"):
            assert_within_bounds({name: wrong[name].to(dtype)}, expected, allowed, bug)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("implementation", ("reference", "cpu kernel"))
def test_bounds_hold_for_other_summation_orders(dtype, implementation):
    """The criterion is not too tight: the reference path and the CPU kernel, which sum in other
    orders than the CUDA kernels, stay inside it."""
    if implementation == "cpu kernel" and not kernel_available("cpu"):
        pytest.skip("localattn._C is not built")
    backend = "reference" if implementation == "reference" else "kernel"
    rng = random.Random(f"other-orders-{dtype}")
    for seed in range(3):
        config = random_config(rng, dtype, max_side=11, dims=(3, 16, 64, 128))
        shape, block_size, symmetric = config["shape"], config["block_size"], config["symmetric"]
        q, k, v, rpb = random_inputs(shape, block_size, dtype, seed=seed, requires_grad=True)
        grad_out = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))
        scale = shape[-1] ** -0.5
        out = local_attention2d(q, k, v, rpb, block_size, scale, symmetric, backend=backend)
        grads = torch.autograd.grad(out, (q, k, v, rpb), grad_out)
        args = (q, k, v, rpb, grad_out, block_size, scale, symmetric)
        results = {"out": out, **dict(zip(GRADIENTS, grads))}
        expected, allowed = oracle_results(*args), allowed_errors(*args)
        assert_within_bounds(results, expected, allowed, f"{implementation}, {config}, seed={seed}")


# The kernels ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_random_configurations_match_oracle(kernels, dtype):
    """Every block size, both masks, head sizes on and off the vector path (64 and 128 too),
    image sides that are not multiples of the block size, several tiles per image."""
    count, max_side = (100, 21) if kernels.on_gpu else (6, 13)
    rng = random.Random(f"random-configurations-{dtype}")
    for seed in range(count):
        config = random_config(rng, dtype, max_side, dims=(3, 16, 32, 40, 64, 128))
        check_against_oracle(kernels, **config, dtype=dtype, seed=seed, misaligned=seed % 3 == 0)


@pytest.mark.slow
@pytest.mark.parametrize("tile_blocks", ("1", "3"))
def test_emulated_tile_sizes(monkeypatch, tile_blocks):
    """Other tile sizes (LOCALATTN_CUDA_TILE_BLOCKS, the benchmarks' tuning knob), emulated."""
    monkeypatch.setenv("LOCALATTN_CUDA_TILE_BLOCKS", tile_blocks)
    kernels = emulated_kernels()
    rng = random.Random(f"tile-blocks-{tile_blocks}")
    for seed in range(3):
        config = random_config(rng, DTYPES[seed], max_side=13, dims=(8, 16, 40, 64))
        check_against_oracle(kernels, **config, dtype=DTYPES[seed], seed=seed)


@pytest.mark.parametrize("dim", (1, 5, 12, 24, 40, 96))
def test_head_sizes_off_the_vector_path(kernels, dim):
    """Head sizes that are not multiples of 8 take the scalar load path and zero padding."""
    check_against_oracle(kernels, (2, 9, 11, 2, dim), 2, False, torch.float32, seed=dim)


@pytest.mark.parametrize("dim", (64, 128))
def test_large_image_uses_several_tiles(kernels, dim):
    """Many tiles at b = 4, tiles shrunk for shared memory (64 x 48 on a GPU, 20 x 16 emulated)."""
    shape = (1, 64, 48, 2, dim) if kernels.on_gpu else (1, 20, 16, 2, dim)
    check_against_oracle(kernels, shape, 4, False, torch.bfloat16, seed=7)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_float32_bias_table_with_low_precision_inputs(kernels, dtype):
    """A float32 table is used unrounded (the bound takes its values as they are), and its
    gradient comes back in float32."""
    check_against_oracle(kernels, (2, 7, 9, 3, 32), 2, True, dtype, seed=3, rpb_dtype=torch.float32)


@pytest.mark.parametrize("symmetric", (False, True))
@pytest.mark.parametrize("block_size", (1, 2, 3, 4))
def test_gradcheck_float64(kernels, block_size, symmetric):
    inputs = random_inputs((1, 5, 7, 2, 5), block_size, torch.float64, requires_grad=True, seed=11,
                           device=kernels.device)
    # grad_rpb is summed with atomics, so repeated backward passes may differ in the last bits.
    # Emulated, fast mode: a random projection of the Jacobian instead of all of it.
    assert torch.autograd.gradcheck(
        lambda *t: kernels.attention(*t, block_size, 0.7, symmetric),
        inputs,
        nondet_tol=1e-12,
        fast_mode=not kernels.on_gpu,
    )


def test_misaligned_and_strided_inputs(kernels):
    """Inputs that start off a 16-byte boundary, or are not contiguous, give the same result."""
    shape = (1, 10, 6, 2, 16)
    q, k, v, rpb = random_inputs(shape, 2, torch.float16, seed=5, device=kernels.device)
    expected, _ = kernels.forward(q, k, v, rpb, 2, 0.25, False)
    shifted = misaligned_copy(q)
    strided = torch.empty(shape[:-1] + (2 * shape[-1],), device=kernels.device, dtype=q.dtype)[..., ::2]
    strided.copy_(k)
    for inputs in ((shifted, k, v, rpb), (q, strided, v, rpb)):
        out, _ = kernels.forward(*inputs, 2, 0.25, False)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_empty_batch(kernels):
    q, k, v, rpb = random_inputs((0, 4, 4, 2, 16), 2, torch.float32, device=kernels.device)
    out, lse = kernels.forward(q, k, v, rpb, 2, 0.25, False)
    assert out.shape == q.shape and lse.shape == q.shape[:4]
    grad_rpb = kernels.backward(out, q, k, v, rpb, out, lse, 2, 0.25, False)[3]
    assert torch.equal(grad_rpb, torch.zeros_like(rpb))


@pytest.mark.cuda
def test_batch_beyond_grid_y_limit():
    """More images than a grid's y or z dimension holds (65535): the grid is one-dimensional."""
    check_against_oracle(gpu_kernels(), (65537, 2, 3, 1, 8), 2, False, torch.float32, seed=8)


@pytest.mark.slow
def test_emulated_launches_of_a_batch_beyond_grid_y_limit():
    """The launches of a batch too large to emulate stay within the device's limits (checked
    against them, not run)."""
    q, k, v, rpb = random_inputs((65537, 2, 3, 1, 8), 2, torch.float16, rpb_dtype=torch.float32)
    emulated_module().check_launches(q, k, v, rpb, 2, 0.3, False)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_opcheck(dtype):
    q, k, v, rpb = random_inputs((2, 6, 5, 2, 16), 2, dtype, seed=2, device="cuda")
    out, lse = FORWARD(q, k, v, rpb, 2, 0.25, True)
    torch.library.opcheck(FORWARD, (q, k, v, rpb, 2, 0.25, True))
    torch.library.opcheck(BACKWARD, (torch.randn_like(out), q, k, v, rpb, out, lse, 2, 0.25, True))


@pytest.mark.parametrize(
    "name, bad, error, message",
    [
        ("block_size", lambda args, other_device: 5, ValueError, "block_size"),
        ("rpb", lambda args, other_device: args["rpb"][:, :3, :3], ValueError, "rpb must be"),
        ("k", lambda args, other_device: args["k"].double(), TypeError, "dtype of q"),
        ("v", lambda args, other_device: args["v"][:, :, :3], ValueError, "shape of q"),
        ("rpb", lambda args, other_device: args["rpb"].to(other_device), ValueError, "device"),
    ],
    # ids without spaces: benchmarks/gpu_check.sh deselects a test that crashed by its node id
    ids=("block_size", "rpb_shape", "k_dtype", "v_shape", "rpb_device"),
)
def test_bad_inputs_raise_clear_errors(kernels, name, bad, error, message):
    inputs = random_inputs((1, 4, 4, 2, 8), 2, torch.float32, device=kernels.device)
    args = dict(zip(("q", "k", "v", "rpb"), inputs))
    args["block_size"] = 2
    args[name] = bad(args, "cpu" if kernels.on_gpu else "meta")
    with pytest.raises(error, match=message):
        kernels.forward(args["q"], args["k"], args["v"], args["rpb"], args["block_size"], 0.3, False)


def test_head_size_beyond_shared_memory_raises(kernels):
    q, k, v, rpb = random_inputs((1, 8, 8, 1, 128), 4, torch.float64, device=kernels.device)
    with pytest.raises(ValueError, match="shared memory"):
        kernels.forward(q, k, v, rpb, 4, 0.1, False)


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind, message",
    [
        ("global", "out-of-bounds access of 4 bytes .* of 'in'"),
        ("shared", "out-of-bounds access of 4 bytes .* of 'first'"),
        ("misaligned", "misaligned access of 32 bytes"),
        ("grid", "invalid configuration argument"),
        ("attribute", "cudaFuncSetAttribute"),
    ],
)
def test_emulation_reports_faults(kind, message):
    """Each check of the emulation fires on a deliberately faulty launch (driver.cpp) and raises
    as a GPU's launch check would, instead of reading or writing out of bounds."""
    with pytest.raises(RuntimeError, match=message):
        emulated_module().fault(kind)
    emulated_module().fault("none")  # and a correct launch still runs after it
