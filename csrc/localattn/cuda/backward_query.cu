// Query-centric backward kernel: for a tile of queries, recomputes p = exp(s - lse), then
//   delta_i = <dO_i, O_i>, dS_ij = p_ij (<dO_i, v_j> - delta_i), dq_i = scale * sum_j dS_ij k_j,
// reduces dS per bias-table offset in shared memory (one global atomic per entry and block), and
// writes delta for the key-centric kernel (backward_key.cu), which runs after it.
#include "local_attention_cuda.cuh"

namespace localattn::cuda {
namespace {

template <typename T, typename acc_t>
struct QueryShared {
  T *key, *value;        // halo rows
  T *query, *grad_out;   // tile rows
  acc_t* score;          // [tile pixels][window]: scores, then dS
  acc_t *bias, *grad_bias;
  acc_t *lse, *delta;    // per tile pixel
  int64_t bytes;

  C10_HOST_DEVICE QueryShared(unsigned char* base, const Geometry& g) {
    SharedCarver carve(base);
    key = carve.take<T>(static_cast<int64_t>(g.halo_pixels()) * g.row);
    value = carve.take<T>(static_cast<int64_t>(g.halo_pixels()) * g.row);
    query = carve.take<T>(static_cast<int64_t>(g.tile_pixels()) * g.row);
    grad_out = carve.take<T>(static_cast<int64_t>(g.tile_pixels()) * g.row);
    score = carve.take<acc_t>(static_cast<int64_t>(g.tile_pixels()) * g.score_stride());
    bias = carve.take<acc_t>(g.table_size());
    grad_bias = carve.take<acc_t>(g.table_size());
    lse = carve.take<acc_t>(g.tile_pixels());
    delta = carve.take<acc_t>(g.tile_pixels());
    bytes = carve.bytes();
  }
};

// Per tile pixel: lse from global memory, and delta = <dO, O> with dO from shared memory and O
// read once from global memory; delta also goes to global memory. Pixels outside the image get
// zeros (their probabilities are zero anyway).
template <typename T, typename acc_t>
__device__ void stage_row_statistics(const Geometry& g, const TilePosition& t,
                                     const T* __restrict__ out, const acc_t* __restrict__ lse,
                                     const T* grad_out_rows, acc_t* lse_rows, acc_t* delta_rows,
                                     acc_t* __restrict__ delta) {
  for (int i = threadIdx.x; i < g.tile_pixels(); i += blockDim.x) {
    const Pixel px = tile_pixel(g, t, i);
    if (!in_image(g, px)) {
      lse_rows[i] = acc_t(0);
      delta_rows[i] = acc_t(0);
      continue;
    }
    const int64_t index = row_index(g, t.n, px, t.h);
    const T* o = out + index * g.dim;
    const T* d_o = grad_out_rows + static_cast<int64_t>(i) * g.row;
    acc_t sum = 0;
    for (int d = 0; d < g.dim; ++d) sum += static_cast<acc_t>(o[d]) * static_cast<acc_t>(d_o[d]);
    lse_rows[i] = lse[index];
    delta_rows[i] = sum;
    delta[index] = sum;
  }
}

template <typename T, int B>
__global__ void __launch_bounds__(kThreads) backward_query_kernel(
    Geometry g, const T* __restrict__ grad_out, const T* __restrict__ q, const T* __restrict__ k,
    const T* __restrict__ v, const at::opmath_type<T>* __restrict__ bias,
    const T* __restrict__ out, const at::opmath_type<T>* __restrict__ lse,
    at::opmath_type<T> scale, T* __restrict__ grad_q,
    at::opmath_type<T>* __restrict__ delta, at::opmath_type<T>* __restrict__ grad_bias) {
  using acc_t = at::opmath_type<T>;
  extern __shared__ __align__(16) unsigned char shared[];
  const QueryShared<T, acc_t> s(shared, g);
  const TilePosition t = tile_position(g);

  stage_tile_rows(g, t, q, s.query);
  stage_tile_rows(g, t, grad_out, s.grad_out);
  stage_halo_rows(g, t, k, s.key);
  stage_halo_rows(g, t, v, s.value);
  stage_bias(g, bias, t.h, s.bias);
  for (int i = threadIdx.x; i < g.table_size(); i += blockDim.x) s.grad_bias[i] = acc_t(0);
  __syncthreads();

  stage_row_statistics(g, t, out, lse, s.grad_out, s.lse, s.delta, delta);
  for_each_pair<B>(g, t, s.query, s.key, [&](const Pair& p, acc_t dot) {
    const int offset = bias_index(g, p.tile_px, p.halo_px);
    s.score[p.score] = p.visible ? scale * dot + s.bias[offset] : acc_t(0);
  });
  __syncthreads();

  // Same pairs, same threads: each entry is read and rewritten by the thread that wrote it.
  for_each_pair<B>(g, t, s.grad_out, s.value, [&](const Pair& p, acc_t dot) {
    if (!p.visible) return;
    const acc_t prob = exp_acc(s.score[p.score] - s.lse[p.tile]);
    const acc_t grad_score = prob * (dot - s.delta[p.tile]);
    s.score[p.score] = grad_score;
    atomicAdd(&s.grad_bias[bias_index(g, p.tile_px, p.halo_px)],
              grad_score);
  });
  __syncthreads();

  for_each_weighted_chunk<B>(g, s.score, s.key, scaled_row_store(g, t, grad_q, scale));

  for (int i = threadIdx.x; i < g.table_size(); i += blockDim.x) {
    if (s.grad_bias[i] != acc_t(0)) atomicAdd(&grad_bias[t.h * g.table_size() + i], s.grad_bias[i]);
  }
}

}  // namespace

void launch_backward_query(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                           const at::Tensor& v, const at::Tensor& bias, const at::Tensor& out,
                           const at::Tensor& lse, int64_t block_size, double scale,
                           bool symmetric, at::Tensor& grad_q, at::Tensor& delta,
                           at::Tensor& grad_bias) {
  const Geometry g = make_geometry(q, block_size, symmetric, {&grad_out, &q, &k, &v, &grad_q});
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, q.scalar_type(), "local_attention2d_backward_query_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        with_block_size(block_size, [&](auto b) {
          launch_tiled<QueryShared<scalar_t, acc_t>>(
              backward_query_kernel<scalar_t, decltype(b)::value>, g, q.size(0),
              grad_out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
              v.data_ptr<scalar_t>(), bias.data_ptr<acc_t>(), out.data_ptr<scalar_t>(),
              lse.data_ptr<acc_t>(), static_cast<acc_t>(scale), grad_q.data_ptr<scalar_t>(),
              delta.data_ptr<acc_t>(), grad_bias.data_ptr<acc_t>());
        });
      });
}

}  // namespace localattn::cuda
