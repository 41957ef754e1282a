// CPU implementations of localattn::local_attention2d_forward / _backward: input checks (the
// shared contract of ../checks.h, plus contiguity), output allocation and registration under the
// CPU dispatch key. The passes are in forward.cpp and backward.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "../checks.h"
#include "local_attention_cpu.h"

namespace localattn::cpu {
namespace {

constexpr const char* kWhere = "local_attention2d (CPU)";

// The kernels index raw pointers: unlike the CUDA ops, which copy strided inputs, the forward
// requires contiguous tensors (localattn.local_attention2d passes contiguous ones). The
// backward's inputs come from autograd, not the caller, and torch.compile before torch 2.6
// re-lays out saved tensors (lse with strides (270, 1, 30, 10) was seen under torch 2.4 and
// 2.5): it takes contiguous copies where needed.
void check_contiguous(std::initializer_list<std::pair<const char*, const at::Tensor*>> tensors) {
  for (const auto& [name, t] : tensors) {
    TORCH_CHECK_VALUE(t->is_contiguous(), kWhere, ": ", name, " must be contiguous");
  }
}

Geometry geometry(const at::Tensor& q, int64_t block_size, bool symmetric) {
  return Geometry{q.size(0), q.size(1), q.size(2), q.size(3), q.size(4),
                  block_size, 4 * block_size - 1, symmetric};
}

// rpb [heads, y-offset, x-offset] in the accumulation dtype, as [heads, x-offset, y-offset]: the
// kernels walk keys down the columns of a window.
at::Tensor transposed_bias(const at::Tensor& rpb, at::ScalarType q_dtype) {
  return rpb.to(accumulate_type(q_dtype)).transpose(1, 2).contiguous();
}

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& q, const at::Tensor& k,
                                               const at::Tensor& v, const at::Tensor& rpb,
                                               int64_t block_size, double scale, bool symmetric) {
  check_inputs(kWhere, at::kCPU, q, k, v, rpb, block_size);
  check_contiguous({{"q", &q}, {"k", &k}, {"v", &v}, {"rpb", &rpb}});
  const Geometry g = geometry(q, block_size, symmetric);
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({g.batch, g.height, g.width, g.heads},
                             q.options().dtype(accumulate_type(q.scalar_type())));
  if (q.numel() > 0) {
    launch_forward(g, q, k, v, transposed_bias(rpb, q.scalar_type()), scale, out, lse);
  }
  return {out, lse};
}

// grad_rpb comes back in the dtype of rpb (float32 for a float32 table with half inputs).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& rpb_in, const at::Tensor& out_in,
    const at::Tensor& lse_in, int64_t block_size, double scale, bool symmetric) {
  check_inputs(kWhere, at::kCPU, q_in, k_in, v_in, rpb_in, block_size);
  check_backward_inputs(kWhere, grad_out_in, out_in, lse_in, q_in);
  const at::Tensor grad_out = grad_out_in.contiguous(), q = q_in.contiguous(),
                   k = k_in.contiguous(), v = v_in.contiguous(), rpb = rpb_in.contiguous(),
                   out = out_in.contiguous(), lse = lse_in.contiguous();
  const Geometry g = geometry(q, block_size, symmetric);
  const auto acc_options = q.options().dtype(accumulate_type(q.scalar_type()));
  at::Tensor grad_q = at::empty(q.sizes(), acc_options);
  at::Tensor grad_k = at::zeros(q.sizes(), acc_options);
  at::Tensor grad_v = at::zeros(q.sizes(), acc_options);
  const int64_t threads = at::get_num_threads();
  at::Tensor grad_bias_t_per_thread = at::zeros({threads, g.heads, g.table, g.table}, acc_options);
  if (q.numel() > 0) {
    launch_backward(g, grad_out, q, k, v, out, transposed_bias(rpb, q.scalar_type()), lse, scale,
                    grad_q, grad_k, grad_v, grad_bias_t_per_thread);
  }
  const auto dtype = q.scalar_type();
  return {grad_q.to(dtype), grad_k.to(dtype), grad_v.to(dtype),
          grad_bias_t_per_thread.sum(0).transpose(1, 2).contiguous().to(rpb.scalar_type())};
}

}  // namespace
}  // namespace localattn::cpu

TORCH_LIBRARY_IMPL(localattn, CPU, m) {
  m.impl("local_attention2d_forward", &localattn::cpu::forward_cpu);
  m.impl("local_attention2d_backward", &localattn::cpu::backward_cpu);
}
