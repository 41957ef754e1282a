"""CPU benchmarks of the local attention op, float32: the C++ kernel against the plain-PyTorch
reference path, forward and forward+backward, on UNet-decoder shapes (batch 2, head size 32).

Each result carries in extra_info the peak memory of one call above what was resident before it
(Linux: /proc/self/status VmHWM after resetting it through /proc/self/clear_refs, with malloc's
free lists trimmed first), in MiB, and the thread count. Benchmarks of one shape and pass share a
group, so the table shows kernel and reference side by side.

    pytest benchmarks/bench_localattn_cpu.py --benchmark-only --benchmark-group-by=group
"""

import ctypes
import re
import sys

import pytest
import torch

from localattn.functional import kernel_available, local_attention2d

BATCH = 2
HEAD_DIM = 32
# (image side, channels): decoder levels of the UNet.
SHAPES = [(128, 96), (64, 192)]
BLOCK_SIZES = [2, 4]


def _resident_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE).group(1)) * 1024


def peak_memory_mib(fn) -> float | None:
    """Peak resident memory of fn() above the resident memory before it, or None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # so memory cached by malloc is not counted as free
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current resident size
    before = _resident_bytes("VmRSS")
    fn()
    return (_resident_bytes("VmHWM") - before) / 2**20


def make_inputs(side, channels, block_size):
    generator = torch.Generator().manual_seed(0)
    heads = channels // HEAD_DIM
    shape = (BATCH, side, side, heads, HEAD_DIM)
    q, k, v = (torch.randn(shape, generator=generator).requires_grad_() for _ in range(3))
    table = 4 * block_size - 1
    rpb = (0.02 * torch.randn(heads, table, table, generator=generator)).requires_grad_()
    return q, k, v, rpb


def run_pass(inputs, block_size, backend, backward):
    def forward():
        return local_attention2d(*inputs, block_size, backend=backend)

    if not backward:
        return lambda: forward().detach()

    def forward_backward():
        out = forward()
        return torch.autograd.grad(out, inputs, torch.ones_like(out))

    return forward_backward


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward_backward"])
@pytest.mark.parametrize("block_size", BLOCK_SIZES, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("side, channels", SHAPES, ids=[f"{s}x{s}x{c}" for s, c in SHAPES])
@pytest.mark.parametrize("backend", ["kernel", "reference"])
def test_local_attention_cpu(benchmark, backend, side, channels, block_size, backward):
    if backend == "kernel" and not kernel_available("cpu"):
        pytest.skip("localattn._C has no CPU kernel (extension not built)")
    inputs = make_inputs(side, channels, block_size)
    fn = run_pass(inputs, block_size, backend, backward)
    pass_name = "forward_backward" if backward else "forward"
    benchmark.group = f"{side}x{side}x{channels} b={block_size} {pass_name}"
    benchmark.extra_info.update(
        threads=torch.get_num_threads(), peak_memory_mib=peak_memory_mib(fn)
    )
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
