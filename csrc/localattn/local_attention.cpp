// Schemas of the local attention op (contract in docs/local-attention.md, input checks in
// checks.h). Kernels live in cpu/ and cuda/ and register themselves with TORCH_LIBRARY_IMPL.
//
// Layout: q, k, v and out are [B, H, W, heads, D] (heads-last, what a channels-last projection
// yields without a copy); rpb is [heads, 4b-1, 4b-1]; lse is [B, H, W, heads] in float32
// (float64 for float64 inputs). H and W need not be multiples of the block size: keys outside
// the image are simply absent, which equals padding, masking the padding, and cropping.
#include <Python.h>
#include <torch/library.h>

#include "checks.h"

namespace {

// The device types this build registers kernels for, as localattn.ops.kernel_available reads
// them: the CUDA sources are compiled (and register under the CUDA key) only with -DWITH_CUDA.
PyObject* kernel_devices() {
#ifdef WITH_CUDA
  return Py_BuildValue("(ss)", "cpu", "cuda");
#else
  return Py_BuildValue("(s)", "cpu");
#endif
}

}  // namespace

extern "C" {
// Importing localattn._C from Python runs the static TORCH_LIBRARY initialisers below, and
// publishes KERNEL_DEVICES and CUDA_MAX_BLOCK_SIZE for the backend choice of localattn.functional.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  PyObject* devices = kernel_devices();
  const bool ok = devices != nullptr && PyModule_AddObjectRef(module, "KERNEL_DEVICES", devices) == 0 &&
                  PyModule_AddIntConstant(module, "CUDA_MAX_BLOCK_SIZE",
                                          localattn::kCudaMaxBlockSize) == 0;
  Py_XDECREF(devices);
  if (!ok) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}

TORCH_LIBRARY(localattn, m) {
  m.def(
      "local_attention2d_forward(Tensor q, Tensor k, Tensor v, Tensor rpb, int block_size, "
      "float scale, bool symmetric) -> (Tensor out, Tensor lse)");
  m.def(
      "local_attention2d_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor rpb, "
      "Tensor out, Tensor lse, int block_size, float scale, bool symmetric) "
      "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_rpb)");
}
