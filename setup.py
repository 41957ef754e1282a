"""Build the two compiled extensions.

* ``localattn._C``: the local attention op (csrc/localattn). C++ CPU kernels always; the CUDA
  kernels in csrc/localattn/cuda when torch has CUDA and a CUDA toolkit is found.
* ``unet._C``: the post-processing ops (csrc/postprocess), CPU only.

Environment switches:
  LOCALATTN_WITH_CUDA=1  build the CUDA kernels, fail if that is impossible
  LOCALATTN_WITH_CUDA=0  never build them
  (unset)                build them when torch.version.cuda and CUDA_HOME are both present
  TORCH_CUDA_ARCH_LIST   the GPU architectures to compile for, as usual for torch extensions
  MAX_JOBS               parallel compile jobs, as usual for torch extensions
  BUILD_EXTENSIONS       comma-separated subset to build (e.g. "unet._C"), for quick rebuilds
"""

import glob
import os
import sys

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
CXX_FLAGS = ["-O3", "-fopenmp"]
NVCC_FLAGS = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]


def link_options() -> dict:
    """How every extension links: with OpenMP, and the C++ runtime named as a shared library,
    ahead of torch's libraries.

    A compiler whose private library folder holds only ``libstdc++.a`` links the runtime
    statically: the extension then carries a second copy of it beside the one torch loaded. On
    one GPU image (its g++ a wrapper passing such a folder with ``-B``) the extension came out so,
    and every C++ exception thrown from it (each TORCH_CHECK on a bad input) crashed the process
    instead of reaching Python.
    Naming the shared object's file resolves every runtime symbol from it, so the static archive
    adds nothing. New lists each call: torch's extension helpers append to them in place.
    """
    runtime = [":libstdc++.so.6"] if sys.platform.startswith("linux") else []
    return {"extra_link_args": ["-fopenmp"], "libraries": runtime}


def sources(pattern: str) -> list[str]:
    """Sorted source files relative to the repository root, so builds are reproducible."""
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def want_cuda() -> bool:
    switch = os.environ.get("LOCALATTN_WITH_CUDA", "").strip()
    # torch guesses CUDA_HOME from the nvcc on PATH; a wrapper script there can mislead it.
    toolkit_found = CUDA_HOME is not None and os.path.exists(
        os.path.join(CUDA_HOME, "include", "cuda_runtime.h")
    )
    available = torch.version.cuda is not None and toolkit_found
    if switch == "0":
        return False
    if switch == "1":
        if not available:
            sys.exit(
                "LOCALATTN_WITH_CUDA=1 but CUDA cannot be built: "
                f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME}"
            )
        return True
    return available


def localattn_extension():
    cpp = sources("csrc/localattn/*.cpp") + sources("csrc/localattn/cpu/*.cpp")
    if want_cuda():
        return CUDAExtension(
            "localattn._C",
            cpp + sources("csrc/localattn/cuda/*.cu"),
            extra_compile_args={"cxx": CXX_FLAGS + ["-DWITH_CUDA"], "nvcc": NVCC_FLAGS},
            **link_options(),
        )
    return CppExtension("localattn._C", cpp, extra_compile_args={"cxx": CXX_FLAGS}, **link_options())


def postprocess_extension():
    return CppExtension(
        "unet._C",
        sources("csrc/postprocess/*.cpp"),
        extra_compile_args={"cxx": CXX_FLAGS},
        **link_options(),
    )


def selected_extensions():
    extensions = [localattn_extension(), postprocess_extension()]
    only = [name for name in os.environ.get("BUILD_EXTENSIONS", "").split(",") if name]
    return [ext for ext in extensions if not only or ext.name in only]


setup(
    ext_modules=selected_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
