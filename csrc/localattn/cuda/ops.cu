// CUDA implementations of localattn::local_attention2d_forward / _backward: input checks, output
// allocation and registration under the CUDA dispatch key. The kernels are in forward.cu,
// backward_query.cu and backward_key.cu.
//
// The input contract is ../checks.h (docs/local-attention.md): rpb in the dtype of q, or float32
// for float16/bfloat16 inputs (a float32 master copy of the table under autocast or mixed
// precision); grad_rpb comes back in rpb's dtype, summed in float32 (float64 for float64
// inputs). lse is float32 (float64 for float64 inputs).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <cstdint>
#include <tuple>

#include "../checks.h"
#include "local_attention_cuda.cuh"

namespace localattn::cuda {

Geometry make_geometry(const at::Tensor& q, int64_t block_size, bool symmetric,
                       std::initializer_list<const at::Tensor*> tensors) {
  Geometry g{};
  g.height = static_cast<int>(q.size(1));
  g.width = static_cast<int>(q.size(2));
  g.heads = static_cast<int>(q.size(3));
  g.dim = static_cast<int>(q.size(4));
  g.block = static_cast<int>(block_size);
  g.chunks = (g.dim + kChunk - 1) / kChunk;
  g.row = g.chunks * kChunk + static_cast<int>(16 / q.element_size());
  g.symmetric = symmetric;
  g.vectorized = g.dim % kChunk == 0;
  for (const at::Tensor* t : tensors) {
    g.vectorized = g.vectorized && reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0;
  }
  return g;
}

int tile_blocks_setting() {
  const char* setting = std::getenv("LOCALATTN_CUDA_TILE_BLOCKS");
  if (setting == nullptr) return 0;
  const int tile_blocks = std::atoi(setting);
  TORCH_CHECK_VALUE(tile_blocks >= 1,
                    "LOCALATTN_CUDA_TILE_BLOCKS must be a positive integer, got '", setting, "'");
  return tile_blocks;
}

SharedMemoryLimits shared_memory_limits() {
  const int device = c10::cuda::current_device();
  int per_block = 0, per_sm = 0, reserved = 0;
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&per_block, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&reserved, cudaDevAttrReservedSharedMemoryPerBlock, device));
  return {per_block, std::min<int64_t>(per_block, per_sm / 2 - reserved)};
}

void allow_shared_memory(const void* kernel, int64_t bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
  }
}

dim3 launch_grid(const Geometry& g, int64_t batch) {
  const int64_t blocks = batch * g.tiles * g.heads;
  TORCH_CHECK_VALUE(blocks >= 1 && blocks <= INT_MAX, "local_attention2d (CUDA): ", batch,
                    " images x ", g.tiles, " tiles x ", g.heads,
                    " heads is outside the grid limit of 1 to 2^31-1 thread blocks");
  return dim3(static_cast<unsigned>(blocks));
}

int launch_threads(const Geometry& g) {
  const int pair_items = 9 * g.tile_pixels();  // for_each_pair: b x b pairs per item
  const int items = std::max(pair_items, g.tile_pixels() * g.chunks);
  return std::min(kThreads, (items + 31) / 32 * 32);
}

namespace {

constexpr const char* kWhere = "local_attention2d (CUDA)";

// The shared contract (../checks.h), plus what the CUDA kernels add: block sizes up to
// kCudaMaxBlockSize (the instantiated ones) and sizes that fit their 32-bit indexing.
void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& rpb, int64_t block_size) {
  TORCH_CHECK_VALUE(block_size >= 1 && block_size <= kCudaMaxBlockSize, kWhere,
                    ": block_size must be 1 to ", kCudaMaxBlockSize, ", got ", block_size);
  localattn::check_inputs(kWhere, at::kCUDA, q, k, v, rpb, block_size);
  for (int64_t size : q.sizes()) {
    TORCH_CHECK_VALUE(size <= INT_MAX / 16, kWhere, ": q is too large: ", q.sizes());
  }
}

// The bias table of every head in the accumulation dtype, as the kernels read it.
at::Tensor bias_table(const at::Tensor& rpb, at::ScalarType dtype) {
  return rpb.to(accumulate_type(dtype)).contiguous();
}

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                const at::Tensor& v_in, const at::Tensor& rpb,
                                                int64_t block_size, double scale,
                                                bool symmetric) {
  check_inputs(q_in, k_in, v_in, rpb, block_size);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  at::Tensor out = at::empty_like(q);
  at::Tensor lse =
      at::empty(q.sizes().slice(0, 4), q.options().dtype(accumulate_type(q.scalar_type())));
  if (q.numel() == 0) return {out, lse};
  launch_forward(q, k, v, bias_table(rpb, q.scalar_type()), block_size, scale, symmetric, out,
                 lse);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& rpb, const at::Tensor& out_in,
    const at::Tensor& lse_in, int64_t block_size, double scale, bool symmetric) {
  check_inputs(q_in, k_in, v_in, rpb, block_size);
  check_backward_inputs(kWhere, grad_out_in, out_in, lse_in, q_in);
  const auto acc_dtype = accumulate_type(q_in.scalar_type());
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor grad_out = grad_out_in.contiguous(), q = q_in.contiguous(),
                   k = k_in.contiguous(), v = v_in.contiguous(), out = out_in.contiguous(),
                   lse = lse_in.contiguous();
  at::Tensor grad_q = at::empty_like(q), grad_k = at::empty_like(k), grad_v = at::empty_like(v);
  at::Tensor grad_bias = at::zeros(rpb.sizes(), rpb.options().dtype(acc_dtype));
  if (q.numel() > 0) {
    const at::Tensor bias = bias_table(rpb, q.scalar_type());
    at::Tensor delta = at::empty(lse.sizes(), lse.options());
    // Stream order makes delta, written by the first kernel, visible to the second.
    launch_backward_query(grad_out, q, k, v, bias, out, lse, block_size, scale, symmetric, grad_q,
                          delta, grad_bias);
    launch_backward_key(grad_out, q, k, v, bias, lse, delta, block_size, scale, symmetric, grad_k,
                        grad_v);
  }
  return {grad_q, grad_k, grad_v, grad_bias.to(rpb.scalar_type())};
}

}  // namespace
}  // namespace localattn::cuda

TORCH_LIBRARY_IMPL(localattn, CUDA, m) {
  m.impl("local_attention2d_forward", &localattn::cuda::forward_cuda);
  m.impl("local_attention2d_backward", &localattn::cuda::backward_cuda);
}
