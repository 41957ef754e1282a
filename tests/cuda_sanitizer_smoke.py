"""A few small forward and backward launches of every CUDA kernel variant, for compute-sanitizer.

Covers every dtype and block size, both masks, head sizes off the vector path (5), on it (16)
and the large ones of the paper's levels (64, 128), images of one tile and of several (sides
that are not multiples of the block size), a float32 bias table with half inputs, and a
misaligned input. Run with the caching allocator off, so that out-of-bounds accesses are not
hidden inside pooled memory (benchmarks/gpu_check.sh runs the first two):

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python tests/cuda_sanitizer_smoke.py
    compute-sanitizer --tool racecheck --racecheck-report hazard python tests/cuda_sanitizer_smoke.py
    compute-sanitizer --tool synccheck python tests/cuda_sanitizer_smoke.py
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool initcheck python tests/cuda_sanitizer_smoke.py

It prints one line per configuration and exits non-zero if a result is not finite.
"""

import itertools

import torch

import localattn._C  # noqa: F401  (registers the ops)

FORWARD = torch.ops.localattn.local_attention2d_forward
BACKWARD = torch.ops.localattn.local_attention2d_backward
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
HEAD_SIZES = (5, 16, 64, 128)


def configurations():
    """(dtype, b, symmetric, D, several tiles, float32 table, misaligned): 16 small ones that
    cycle through the head sizes and options, and one of several tiles per block size."""
    for index, (dtype, block_size) in enumerate(itertools.product(DTYPES, (1, 2, 3, 4))):
        dim = HEAD_SIZES[index % 4]
        if dtype == torch.float64 and block_size == 4 and dim == 128:
            dim = 64  # float64 at D=128, b=4 does not fit in shared memory (a ValueError)
        half = dtype in (torch.float16, torch.bfloat16)
        yield dtype, block_size, index % 2 == 1, dim, False, half and block_size % 2 == 1, index % 5 == 0
    for block_size, dim in zip((1, 2, 3, 4), (128, 64, 128, 64)):
        yield torch.bfloat16, block_size, block_size % 2 == 0, dim, True, True, False


def run(dtype, block_size, symmetric, dim, several_tiles, float32_table, misaligned):
    # A tile is at most 8 x 8 pixels: 2-3 tiles a side when several, else one (or part of one).
    side = (8 * block_size + 3, 6 * block_size + 1) if several_tiles else (3 * block_size + 1, 2 * block_size + 3)
    shape = (2, *side, 2, dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=dtype) for _ in range(3))
    if misaligned:
        storage = torch.empty(q.numel() + 1, device="cuda", dtype=dtype)
        q = storage[1:].view(shape).copy_(q)
    table = 4 * block_size - 1
    rpb = torch.randn(shape[3], table, table, device="cuda",
                      dtype=torch.float32 if float32_table else dtype)
    out, lse = FORWARD(q, k, v, rpb, block_size, dim**-0.5, symmetric)
    grads = BACKWARD(torch.randn_like(out), q, k, v, rpb, out, lse, block_size, dim**-0.5, symmetric)
    torch.cuda.synchronize()
    return shape, all(torch.isfinite(t).all().item() for t in (out, lse, *grads))


def main():
    failures = 0
    for config in configurations():
        dtype, block_size, symmetric, dim, several_tiles, float32_table, misaligned = config
        shape, finite = run(*config)
        failures += not finite
        print(f"{dtype} b={block_size} symmetric={symmetric} shape={shape} "
              f"rpb={'float32' if float32_table else 'like q'} misaligned={misaligned}: "
              f"{'ok' if finite else 'NOT FINITE'}", flush=True)
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
