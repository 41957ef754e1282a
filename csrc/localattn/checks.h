// The input contract of localattn::local_attention2d_forward / _backward, shared by the CPU
// kernels (cpu/ops.cpp) and the CUDA kernels (cuda/ops.cu); localattn/functional.py checks the
// same rules in Python before it picks a backend. The contract is docs/local-attention.md.
//
//   q, k, v     [B, H, W, heads, D], one shape, D >= 1, float16, bfloat16, float32 or float64
//   rpb         [heads, 4b-1, 4b-1] in the dtype of q, or float32 when q is float16/bfloat16
//               (a float32 master table; its gradient then comes back in float32, unrounded)
//   block_size  b >= 1 (the CUDA kernels serve b <= kCudaMaxBlockSize)
//   all tensors on the device of q
//
// Shape and device errors raise ValueError in Python, dtype errors TypeError, each naming the
// argument.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace localattn {

// The CUDA kernels are instantiated for b = 1..4 (cuda/local_attention_cuda.cuh,
// with_block_size); localattn/functional.py reads this bound from localattn._C and sends larger
// blocks on a GPU to the reference path.
constexpr int64_t kCudaMaxBlockSize = 4;

// Sums, the log-sum-exp and the bias gradient are kept in float32 (float64 for float64 inputs).
inline at::ScalarType accumulate_type(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// rpb is in the dtype of q, or in float32 when q is float16 or bfloat16.
inline bool bias_dtype_allowed(at::ScalarType q_dtype, at::ScalarType rpb_dtype) {
  const bool reduced = q_dtype == at::kHalf || q_dtype == at::kBFloat16;
  return rpb_dtype == q_dtype || (reduced && rpb_dtype == at::kFloat);
}

// `name` has the shape, dtype and device of q.
inline void check_like_q(const char* where, const char* name, const at::Tensor& t,
                         const at::Tensor& q) {
  TORCH_CHECK_VALUE(t.sizes() == q.sizes(), where, ": ", name, " must have the shape of q ",
                    q.sizes(), ", got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), where, ": ", name,
                   " must have the dtype of q (", q.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == q.device(), where, ": ", name, " must be on the device of q (",
                    q.device(), "), got ", t.device());
}

// The inputs of both ops. `where` names the caller in messages ("local_attention2d (CPU)"),
// `device_type` the device the kernel runs on.
inline void check_inputs(const char* where, at::DeviceType device_type, const at::Tensor& q,
                         const at::Tensor& k, const at::Tensor& v, const at::Tensor& rpb,
                         int64_t block_size) {
  TORCH_CHECK_VALUE(q.device().type() == device_type, where, ": q must be a ",
                    c10::DeviceTypeName(device_type), " tensor, got ", q.device());
  TORCH_CHECK_VALUE(q.dim() == 5, where, ": q must be [B, H, W, heads, D], got ", q.sizes());
  TORCH_CHECK_VALUE(q.size(4) >= 1, where, ": the head size D (last dim of q) must be >= 1, got ",
                    q.sizes());
  const auto dtype = q.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat ||
                       dtype == at::kDouble,
                   where, ": q must be float16, bfloat16, float32 or float64, got ", dtype);
  check_like_q(where, "k", k, q);
  check_like_q(where, "v", v, q);
  TORCH_CHECK_VALUE(block_size >= 1, where, ": block_size must be >= 1, got ", block_size);
  const int64_t table = 4 * block_size - 1;
  TORCH_CHECK_VALUE(rpb.dim() == 3 && rpb.size(0) == q.size(3) && rpb.size(1) == table &&
                        rpb.size(2) == table,
                    where, ": rpb must be [heads, 4b-1, 4b-1] = [", q.size(3), ", ", table, ", ",
                    table, "], got ", rpb.sizes());
  TORCH_CHECK_TYPE(bias_dtype_allowed(dtype, rpb.scalar_type()), where,
                   ": rpb must have the dtype of q (", dtype,
                   ") or, when q is float16/bfloat16, float32; got ", rpb.scalar_type());
  TORCH_CHECK_VALUE(rpb.device() == q.device(), where, ": rpb must be on the device of q (",
                    q.device(), "), got ", rpb.device());
}

// The extra inputs of the backward: grad_out and out like q, lse [B, H, W, heads] in
// accumulate_type.
inline void check_backward_inputs(const char* where, const at::Tensor& grad_out,
                                  const at::Tensor& out, const at::Tensor& lse,
                                  const at::Tensor& q) {
  check_like_q(where, "grad_out", grad_out, q);
  check_like_q(where, "out", out, q);
  const auto lse_dtype = accumulate_type(q.scalar_type());
  TORCH_CHECK_VALUE(lse.sizes() == q.sizes().slice(0, 4), where,
                    ": lse must be [B, H, W, heads] = ", q.sizes().slice(0, 4), ", got ",
                    lse.sizes());
  TORCH_CHECK_TYPE(lse.scalar_type() == lse_dtype, where, ": lse must be ", lse_dtype, ", got ",
                   lse.scalar_type());
  TORCH_CHECK_VALUE(lse.device() == q.device(), where, ": lse must be on the device of q (",
                    q.device(), "), got ", lse.device());
}

}  // namespace localattn
