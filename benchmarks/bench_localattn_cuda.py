"""GPU benchmarks of the local attention op, bfloat16, batch 8: the fused CUDA kernel, the
plain-PyTorch reference path and FlexAttention expressing the same op (block-neighbour BlockMask,
score_mod reading the bias table), forward and forward+backward.

Each result carries, in extra_info, the minimum bytes the pass must move (forward: read q, k, v,
write out = 4·N·C·2 bytes; forward+backward: also read q, k, v, out, grad_out and write
grad_q, grad_k, grad_v = 12·N·C·2 bytes, N = B·H·W, C = heads·D) and the achieved rate against
it; the op is memory-bound, so that rate over the DRAM bandwidth is how close it is to the limit.

    pytest benchmarks/bench_localattn_cuda.py --benchmark-only
"""

import functools

import pytest
import torch

from localattn.functional import local_attention2d

# (image side, channels, block size, head size): the paper's UNet levels.
SHAPES = [(512, 96, 2, 32), (256, 192, 2, 32), (128, 384, 4, 64), (64, 768, 4, 64)]
BATCH = 8
DTYPE = torch.bfloat16
# Nominal DRAM bandwidth (bytes/s) by device name, for the fraction of the limit.
DRAM_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}


@functools.cache
def local_block_mask(height, width, block_size, symmetric):
    """BlockMask of the op on the flattened [H*W] pixel sequence (every index is in the image)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(batch, head, q_index, kv_index):
        qy, qx, ky, kx = q_index // width, q_index % width, kv_index // width, kv_index % width
        visible = ((qy // block_size - ky // block_size).abs() <= 1) & (
            (qx // block_size - kx // block_size).abs() <= 1
        )
        if symmetric:
            visible = visible & ((ky - qy).abs() <= block_size) & ((kx - qx).abs() <= block_size)
        return visible

    n = height * width
    return create_block_mask(mask_mod, None, None, n, n, device="cuda", _compile=True)


@functools.cache
def compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_local_attention(q, k, v, rpb, block_size, scale, block_mask):
    """The op through FlexAttention, in the [B, heads, H*W, D] layout."""
    batch, height, width, heads, dim = q.shape
    table = 4 * block_size - 1

    def score_mod(score, b, h, q_index, kv_index):
        # Masked pairs of partial blocks still reach score_mod: clamp to stay inside the table.
        dy = (kv_index // width - q_index // width + 2 * block_size - 1).clamp(0, table - 1)
        dx = (kv_index % width - q_index % width + 2 * block_size - 1).clamp(0, table - 1)
        return score + rpb[h, dy, dx]

    def by_head(t):
        return t.reshape(batch, height * width, heads, dim).transpose(1, 2)

    out = compiled_flex_attention()(
        by_head(q), by_head(k), by_head(v), score_mod=score_mod, block_mask=block_mask, scale=scale
    )
    return out.transpose(1, 2).reshape(batch, height, width, heads, dim)


def implementations(block_size, symmetric, height, width):
    """name -> f(q, k, v, rpb) for the three ways of computing the op."""

    def op(backend):
        return lambda q, k, v, rpb: local_attention2d(
            q, k, v, rpb, block_size, symmetric=symmetric, backend=backend
        )

    def flex(q, k, v, rpb):
        block_mask = local_block_mask(height, width, block_size, symmetric)
        return flex_local_attention(q, k, v, rpb, block_size, q.shape[-1] ** -0.5, block_mask)

    return {"kernel": op("kernel"), "reference": op("reference"), "flex": flex}


def make_inputs(batch, side, channels, block_size, head_dim, dtype, requires_grad):
    generator = torch.Generator(device="cuda").manual_seed(0)
    shape = (batch, side, side, channels // head_dim, head_dim)
    tensors = [
        torch.randn(size, generator=generator, device="cuda", dtype=dtype)
        for size in (shape, shape, shape, (shape[3], 4 * block_size - 1, 4 * block_size - 1))
    ]
    return [t.requires_grad_(requires_grad) for t in tensors]


def step_function(fn, inputs, backward):
    """One synchronised forward (and backward) pass."""
    grad_out = torch.randn_like(inputs[0]) if backward else None

    def step():
        out = fn(*inputs)
        if backward:
            torch.autograd.grad(out, inputs, grad_out)
        torch.cuda.synchronize()

    return step


def largest_fitting_batch(fn, shape_args, backward):
    """BATCH, or the largest power-of-two batch below it whose pass fits in GPU memory."""
    batch = BATCH
    while True:
        try:
            inputs = make_inputs(batch, *shape_args, requires_grad=backward)
            step = step_function(fn, inputs, backward)
            step()  # also compiles FlexAttention outside the timed rounds
            return batch, step
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            inputs = step = None
            torch.cuda.empty_cache()
            batch //= 2


@pytest.mark.cuda
@pytest.mark.parametrize("passes", ("forward", "forward_backward"))
@pytest.mark.parametrize("name", ("kernel", "flex", "reference"))
@pytest.mark.parametrize("side, channels, block_size, head_dim", SHAPES)
def test_local_attention_cuda(benchmark, side, channels, block_size, head_dim, name, passes):
    fn = implementations(block_size, False, side, side)[name]
    backward = passes == "forward_backward"
    batch, step = largest_fitting_batch(fn, (side, channels, block_size, head_dim, DTYPE), backward)
    benchmark.group = f"{side}x{side} C={channels} b={block_size} D={head_dim} {passes}"
    benchmark.pedantic(step, rounds=10, warmup_rounds=2)

    itemsize = torch.finfo(DTYPE).bits // 8
    minimum_bytes = (12 if backward else 4) * batch * side * side * channels * itemsize
    extra = {"batch": batch, "minimum_bytes": minimum_bytes}
    if benchmark.stats is not None:
        achieved = minimum_bytes / benchmark.stats.stats.median
        extra["achieved_bytes_per_s"] = achieved
        device = torch.cuda.get_device_name()
        bandwidth = next((bw for key, bw in DRAM_BANDWIDTH.items() if key in device), None)
        if bandwidth:
            extra["fraction_of_dram_bandwidth"] = achieved / bandwidth
    benchmark.extra_info.update(extra)


@pytest.mark.cuda
@pytest.mark.parametrize("symmetric", (False, True))
def test_flex_formulation_matches_reference(symmetric):
    """The FlexAttention formulation benchmarked above is the same op (values and gradients)."""
    ways = implementations(2, symmetric, 16, 16)
    inputs = make_inputs(2, 16, 64, 2, 32, torch.float32, requires_grad=True)
    grad_out = torch.randn_like(inputs[0])
    results = {}
    for name in ("flex", "reference"):
        out = ways[name](*inputs)
        results[name] = (out, *torch.autograd.grad(out, inputs, grad_out))
    for flex, reference in zip(results["flex"], results["reference"]):
        torch.testing.assert_close(flex, reference, rtol=1e-4, atol=1e-4)
