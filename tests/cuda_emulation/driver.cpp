// Python entry points of the CPU-emulated CUDA kernels (see emulation.py). Outputs start as NaN,
// so that any element a kernel fails to write shows up.
#include <torch/extension.h>

#include "local_attention_cuda.cuh"

namespace cuda = localattn::cuda;

namespace {

at::ScalarType accumulate_type(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v, const at::Tensor& rpb,
                                           int64_t block_size, double scale, bool symmetric) {
  at::Tensor out = at::full_like(q, NAN);
  at::Tensor lse = at::full(q.sizes().slice(0, 4), NAN, q.options().dtype(accumulate_type(q)));
  cuda::launch_forward(q, k, v, rpb.to(accumulate_type(q)).contiguous(), block_size, scale,
                       symmetric, out, lse);
  return {out, lse};
}

std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& q,
                                 const at::Tensor& k, const at::Tensor& v, const at::Tensor& rpb,
                                 const at::Tensor& out, const at::Tensor& lse, int64_t block_size,
                                 double scale, bool symmetric) {
  at::Tensor grad_q = at::full_like(q, NAN), grad_k = at::full_like(q, NAN),
             grad_v = at::full_like(q, NAN), delta = at::full_like(lse, NAN);
  at::Tensor grad_bias = at::zeros(rpb.sizes(), rpb.options().dtype(accumulate_type(q)));
  const at::Tensor bias = rpb.to(accumulate_type(q)).contiguous();
  cuda::launch_backward_query(grad_out, q, k, v, bias, out, lse, block_size, scale, symmetric,
                              grad_q, delta, grad_bias);
  cuda::launch_backward_key(grad_out, q, k, v, bias, lse, delta, block_size, scale, symmetric,
                            grad_k, grad_v);
  return {grad_q, grad_k, grad_v, grad_bias.to(rpb.scalar_type())};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward);
  m.def("backward", &backward);
}
