"""Builds the CUDA sources of csrc/localattn/cuda as a CPU extension, for testing without a GPU.

The kernels and their host launchers (ops.cu included: input checks, contiguous copies, the
empty-tensor shortcut, tiling, shared-memory attributes, launch geometry) are compiled by the
host C++ compiler with shim.h standing in for CUDA, after these mechanical rewrites:

* every pointer the device code declares (``const T*``, ``acc_t*``, ``unsigned char*``...)
  becomes a ``Checked<...>``, which bounds-checks and alignment-checks each access; the tensors
  handed to a launch (``x.data_ptr<T>()``) carry their own bounds, the shared-memory regions
  (``carve.take``) theirs, and ``reinterpret_cast<Chunk<T>*>`` becomes a checked vector access;
* ``extern __shared__`` becomes the emulated block's shared memory, and
  ``kernel<<<grid, threads, bytes, stream>>>(...)`` a call of shim_launch, which checks the
  launch against an H100's limits;
* CUDA headers are dropped (shim.h emulates the runtime calls: an H100's shared-memory sizes,
  cudaFuncSetAttribute, launch errors), ``at::kCUDA`` becomes ``at::kCPU``, the CUDA
  registration is dropped, and ``at::empty``/``at::empty_like`` fill with NaN.

driver.cpp, appended to the rewritten ops.cu, exposes its forward_cuda/backward_cuda to Python.
What this checks: indexing, tiling, masking, the phases and their barriers, staging and
zero-filling, every global and shared access against its bounds and alignment, shared-memory
layout and size, launch geometry and attributes, every dtype and block size. What it cannot
check: timing-dependent races the threads do not happen to hit, and anything else specific to
the GPU (the compiler's code generation, the hardware's rounding of exp/log).
"""

import hashlib
import os
import re
from pathlib import Path

from torch.utils.cpp_extension import load

HERE = Path(__file__).resolve().parent
LOCALATTN = HERE.parents[1] / "csrc" / "localattn"
KERNELS = LOCALATTN / "cuda"
KERNEL_FILES = ("forward.cu", "backward_query.cu", "backward_key.cu")

# A pointer declaration of device code: type, '*', optional __restrict__, then the name.
POINTER = re.compile(
    r"\b(const\s+)?(T|U|acc_t|unsigned char|at::opmath_type<T>)\s*\*\s*(?:__restrict__\s+)?"
    r"(?=[A-Za-z_])"
)
# What must not be left after the rewrites (a raw pointer would escape the checks).
LEFTOVERS = re.compile(r"<<<|__restrict__|\b(T|U|acc_t|unsigned char|opmath_type<T>)\s*\*\s*\w|"
                       r"reinterpret_cast<(const )?Chunk")


def _device_source(text: str) -> str:
    """The rewrites shared by every source: checked pointers, shared memory, launches."""
    text = re.sub(r"#include <c10/cuda/\w+\.h>\n", "", text)
    # `T *a, *b;` declares two pointers: one declaration each, so that both get checked.
    text = re.sub(r"\b(T|acc_t) \*(\w+), \*(\w+);", r"\1 *\2; \1 *\3;", text)
    text = POINTER.sub(lambda m: f"Checked<{m.group(1) or ''}{m.group(2)}> ", text)
    text = re.sub(r"reinterpret_cast<(const )?Chunk<T>\*>\(", r"shim_chunk<\1Chunk<T>>(", text)
    # The shared-memory carver: each region gets its own bounds and the name of its field.
    text = text.replace("reinterpret_cast<U*>(base_ + offset_)",
                        "base_.template narrow<U>(offset_, count)")
    text = re.sub(r"(\w+) = carve\.take<(\w+)>\((.*)\);",
                  r'\1 = shim_named("\1", carve.take<\2>(\3));', text)
    text = text.replace("extern __shared__ __align__(16) unsigned char shared[];",
                        "const Checked<unsigned char> shared = shim_shared_memory();")
    text = re.sub(
        r"kernel<<<(.*?), (.*?), bytes, c10::cuda::getCurrentCUDAStream\(\)>>>\(\s*",
        r"shim_launch(kernel, kThreads, \1, \2, bytes, ",
        text,
        flags=re.S,
    )
    return re.sub(r"(\w+)\.data_ptr<(\w+)>\(\)", r'shim_global<\2>(\1, "\1")', text)


def _ops_source(text: str) -> str:
    """ops.cu on CPU tensors, without its CUDA registration, with NaN-filled outputs."""
    text = _device_source(text + "\n" + (HERE / "driver.cpp").read_text())
    text = text.replace('#include "../checks.h"', '#include "checks.h"')
    text = text.replace("at::kCUDA", "at::kCPU")
    text = re.sub(r"\nTORCH_LIBRARY_IMPL\(localattn, CUDA, m\) \{.*?\n\}\n", "\n", text, flags=re.S)
    text = text.replace("at::empty_like(", "shim_empty_like(").replace("at::empty(", "shim_empty(")
    return text


def sources() -> dict[str, str]:
    """File name -> rewritten text of every source of the emulated extension."""
    header = "local_attention_cuda.cuh"
    rewritten = {header: _device_source((KERNELS / header).read_text())}
    for name in KERNEL_FILES:
        rewritten[name.replace(".cu", ".cpp")] = _device_source((KERNELS / name).read_text())
    rewritten["ops.cpp"] = _ops_source((KERNELS / "ops.cu").read_text())
    for name, text in rewritten.items():
        code = re.sub(r"//.*", "", text)
        leftover = LEFTOVERS.search(code)
        if leftover or "cudaStream" in code or "TORCH_LIBRARY_IMPL" in code:
            raise RuntimeError(f"emulation.py: CUDA-only code or a raw pointer left in {name} "
                               f"({leftover.group(0) if leftover else 'CUDA API'}); update the "
                               "rewrites")
    return rewritten


def build(directory: Path | None = None):
    """Writes the rewritten sources, compiles them (or reuses an identical earlier build) and
    returns the module: forward(q, k, v, rpb, b, scale, symmetric) and backward(grad_out, q, k,
    v, rpb, out, lse, b, scale, symmetric) run ops.cu's entry points on CPU tensors, and
    fault(kind) launches a deliberately faulty kernel (see driver.cpp)."""
    texts = sources()
    flags = ["-O1", "-std=c++20", "-include", str(HERE / "shim.h"), f"-I{LOCALATTN}"]
    digest = hashlib.sha256(
        "".join(texts.values()).encode() + (HERE / "shim.h").read_bytes() + str(flags).encode()
    ).hexdigest()[:16]
    if directory is None:
        cache = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))
        directory = cache / f"localattn_cuda_emulated_{digest}"
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        path = directory / name
        if not path.exists() or path.read_text() != text:  # unchanged files keep ninja's mtimes
            path.write_text(text)
    compiled = [str(directory / name) for name in texts if name.endswith(".cpp")]
    return load(f"localattn_cuda_emulated_{digest}", compiled, extra_cflags=flags,
                build_directory=str(directory))
