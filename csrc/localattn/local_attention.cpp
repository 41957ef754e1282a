// Schemas of the local attention op (see ../shared/design/local-attention.md, README "Local attention").
// Kernels live in cpu/ and cuda/ and register themselves with TORCH_LIBRARY_IMPL.
//
// Layout: q, k, v and out are [B, H, W, heads, D] (heads-last, what a channels-last projection
// yields without a copy); rpb is [heads, 4b-1, 4b-1]; lse is [B, H, W, heads] in float32
// (float64 for float64 inputs). H and W need not be multiples of the block size: keys outside
// the image are simply absent, which equals padding, masking the padding, and cropping.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing localattn._C from Python runs the static TORCH_LIBRARY initialisers below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
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
