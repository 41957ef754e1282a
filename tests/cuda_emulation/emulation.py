"""Builds the CUDA kernels of csrc/localattn/cuda as a CPU extension, for testing without a GPU.

The kernel sources are compiled unchanged by the host C++ compiler except for three mechanical
rewrites: the CUDA headers are dropped (shim.h supplies threadIdx, __syncthreads, shuffles,
atomics), `extern __shared__` becomes a pointer to the emulated block's shared memory, and the
`<<<grid, threads, bytes, stream>>>` launch becomes a call to shim_launch. The host helpers of
ops.cu that query the device are replaced by an H100's numbers (227 KiB per block, 228 KiB per
SM). What this checks: indexing, tiling, masking, the phases and their barriers, staging and
zero-filling, shared-memory layout and size, every dtype and block size. What it cannot check:
timing-dependent races the threads do not happen to hit, and anything specific to the GPU.
"""

import re
from pathlib import Path

from torch.utils.cpp_extension import load

HERE = Path(__file__).resolve().parent
KERNELS = HERE.parents[1] / "csrc" / "localattn" / "cuda"
H100_SHARED_MEMORY = (
    "SharedMemoryLimits shared_memory_limits() { return {232448, 233472 / 2 - 1024}; }\n"
)


def _host_source(text: str) -> str:
    for header in ("c10/cuda/CUDAException.h", "c10/cuda/CUDAStream.h"):
        text = text.replace(f"#include <{header}>\n", "")
    text = text.replace(
        "extern __shared__ __align__(16) unsigned char shared[];",
        "unsigned char* shared = shim_shared_memory();",
    )
    return re.sub(
        r"kernel<<<(.*?), (.*?), bytes, c10::cuda::getCurrentCUDAStream\(\)>>>\(\s*",
        r"shim_launch(kernel, \1, \2, bytes, ",
        text,
        flags=re.S,
    )


def _host_helpers(ops: str) -> str:
    """The host helpers of ops.cu (before its anonymous namespace), without device queries."""
    ops = ops[: ops.index("\nnamespace {")] + "\n}  // namespace localattn::cuda\n"
    ops = re.sub(r"#include (<c10/cuda/\w+\.h>|<torch/library\.h>|\"\.\./checks\.h\")\n", "", ops)
    limits = r"SharedMemoryLimits shared_memory_limits\(\) \{.*?\n\}\n"
    ops = re.sub(limits, H100_SHARED_MEMORY, ops, flags=re.S)
    ops = re.sub(
        r"void allow_shared_memory\(const void\* kernel, int64_t bytes\) \{.*?\n\}\n",
        "void allow_shared_memory(const void*, int64_t) {}\n",
        ops,
        flags=re.S,
    )
    return ops


def build(directory: Path):
    """Writes the rewritten sources to `directory`, compiles them and returns the module, with
    forward(q, k, v, rpb, b, scale, symmetric) and backward(grad_out, q, k, v, rpb, out, lse, b,
    scale, symmetric) calling the kernels' host launchers on CPU tensors."""
    header = "local_attention_cuda.cuh"
    sources = {header: _host_source((KERNELS / header).read_text())}
    for name in ("forward", "backward_query", "backward_key"):
        sources[f"{name}.cpp"] = _host_source((KERNELS / f"{name}.cu").read_text())
    sources["ops_host.cpp"] = _host_helpers((KERNELS / "ops.cu").read_text())
    for name, text in sources.items():
        if "<<<" in text or "cudaDeviceGetAttribute" in text or "cudaFuncSetAttribute" in text:
            raise RuntimeError(f"emulation.py: CUDA-only code left in {name}; update the rewrites")
        (directory / name).write_text(text)
    (directory / "driver.cpp").write_text((HERE / "driver.cpp").read_text())
    compiled = [name for name in sources if name.endswith(".cpp")] + ["driver.cpp"]
    return load(
        "localattn_cuda_emulated",
        [str(directory / name) for name in compiled],
        extra_cflags=["-O1", "-std=c++20", "-include", str(HERE / "shim.h")],
        build_directory=str(directory),
    )
