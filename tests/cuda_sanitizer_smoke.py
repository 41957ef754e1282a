"""A few small forward and backward launches of every CUDA kernel variant, for compute-sanitizer.

Covers every dtype and block size, both masks, a head size on the vector path (16) and one off
it (5), image sides that are not multiples of the block size, and a misaligned input. Run with
the caching allocator off, so that out-of-bounds accesses are not hidden inside pooled memory:

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python tests/cuda_sanitizer_smoke.py
    compute-sanitizer --tool racecheck --racecheck-report all python tests/cuda_sanitizer_smoke.py
    compute-sanitizer --tool synccheck python tests/cuda_sanitizer_smoke.py
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool initcheck python tests/cuda_sanitizer_smoke.py

It prints one line per launch and exits non-zero if a result is not finite.
"""

import itertools

import torch

import localattn._C  # noqa: F401  (registers the ops)

FORWARD = torch.ops.localattn.local_attention2d_forward
BACKWARD = torch.ops.localattn.local_attention2d_backward


def run(dtype, block_size, symmetric, dim, misaligned):
    shape = (2, 3 * block_size + 1, 2 * block_size + 3, 2, dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=dtype) for _ in range(3))
    if misaligned:
        storage = torch.empty(q.numel() + 1, device="cuda", dtype=dtype)
        q = storage[1:].view(shape).copy_(q)
    table = 4 * block_size - 1
    rpb = torch.randn(shape[3], table, table, device="cuda", dtype=dtype)
    out, lse = FORWARD(q, k, v, rpb, block_size, dim**-0.5, symmetric)
    grads = BACKWARD(torch.randn_like(out), q, k, v, rpb, out, lse, block_size, dim**-0.5, symmetric)
    torch.cuda.synchronize()
    return all(torch.isfinite(t).all().item() for t in (out, lse, *grads))


def main():
    failures = 0
    dtypes = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
    for dtype, block_size, symmetric, dim in itertools.product(dtypes, (1, 2, 3, 4), (False, True), (5, 16)):
        misaligned = dim == 16 and symmetric
        finite = run(dtype, block_size, symmetric, dim, misaligned)
        failures += not finite
        print(f"{dtype} b={block_size} symmetric={symmetric} D={dim} misaligned={misaligned}: "
              f"{'ok' if finite else 'NOT FINITE'}", flush=True)
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
