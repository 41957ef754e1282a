// Key-centric backward kernel: for a tile of keys, the queries that see them are the pixels of
// the 3x3 blocks around each key's block (the halo), so
//   dv_j = sum_i p_ij dO_i,  dk_j = scale * sum_i dS_ij q_i,  dS_ij = p_ij (<dO_i, v_j> - delta_i)
// are complete within the thread block and written once, without atomics. p is recomputed from
// the saved lse; delta comes from the query-centric kernel (backward_query.cu).
#include "local_attention_cuda.cuh"

namespace localattn::cuda {
namespace {

template <typename T, typename acc_t>
struct KeyShared {
  T *key, *value;        // tile rows
  T *query, *grad_out;   // halo rows
  acc_t* score;          // [tile pixels][window]: p, then dS
  acc_t* bias;
  acc_t *lse, *delta;    // per halo pixel
  int64_t bytes;

  C10_HOST_DEVICE KeyShared(unsigned char* base, const Geometry& g) {
    SharedCarver carve(base);
    key = carve.take<T>(static_cast<int64_t>(g.tile_pixels()) * g.row);
    value = carve.take<T>(static_cast<int64_t>(g.tile_pixels()) * g.row);
    query = carve.take<T>(static_cast<int64_t>(g.halo_pixels()) * g.row);
    grad_out = carve.take<T>(static_cast<int64_t>(g.halo_pixels()) * g.row);
    score = carve.take<acc_t>(static_cast<int64_t>(g.tile_pixels()) * g.score_stride());
    bias = carve.take<acc_t>(g.table_size());
    lse = carve.take<acc_t>(g.halo_pixels());
    delta = carve.take<acc_t>(g.halo_pixels());
    bytes = carve.bytes();
  }
};

template <typename acc_t>
__device__ void stage_halo_statistics(const Geometry& g, const TilePosition& t,
                                      const acc_t* __restrict__ lse,
                                      const acc_t* __restrict__ delta, acc_t* lse_rows,
                                      acc_t* delta_rows) {
  for (int i = threadIdx.x; i < g.halo_pixels(); i += blockDim.x) {
    const Pixel px = halo_pixel(g, t, i);
    const bool inside = in_image(g, px);
    const int64_t index = inside ? row_index(g, t.n, px, t.h) : 0;
    lse_rows[i] = inside ? lse[index] : acc_t(0);
    delta_rows[i] = inside ? delta[index] : acc_t(0);
  }
}

template <typename T, int B>
__global__ void __launch_bounds__(kThreads) backward_key_kernel(
    Geometry g, const T* __restrict__ grad_out, const T* __restrict__ q, const T* __restrict__ k,
    const T* __restrict__ v, const at::opmath_type<T>* __restrict__ bias,
    const at::opmath_type<T>* __restrict__ lse, const at::opmath_type<T>* __restrict__ delta,
    at::opmath_type<T> scale, T* __restrict__ grad_k, T* __restrict__ grad_v) {
  using acc_t = at::opmath_type<T>;
  extern __shared__ __align__(16) unsigned char shared[];
  const KeyShared<T, acc_t> s(shared, g);
  const TilePosition t = tile_position(g);

  stage_tile_rows(g, t, k, s.key);
  stage_tile_rows(g, t, v, s.value);
  stage_halo_rows(g, t, q, s.query);
  stage_halo_rows(g, t, grad_out, s.grad_out);
  stage_bias(g, bias, t.h, s.bias);
  stage_halo_statistics(g, t, lse, delta, s.lse, s.delta);
  __syncthreads();

  // Here the tile pixel is the key and the halo pixel the query: the offset is tile - halo.
  for_each_pair<B>(g, t, s.key, s.query, [&](const Pair& p, acc_t dot) {
    const int offset = bias_index(g, p.halo_px, p.tile_px);
    s.score[p.score] =
        p.visible ? exp_acc(scale * dot + s.bias[offset] - s.lse[p.halo]) : acc_t(0);
  });
  __syncthreads();

  for_each_weighted_chunk<B>(g, s.score, s.grad_out, scaled_row_store(g, t, grad_v, acc_t(1)));
  __syncthreads();  // the dS pass below overwrites the probabilities read above

  for_each_pair<B>(g, t, s.value, s.grad_out, [&](const Pair& p, acc_t dot) {
    s.score[p.score] = p.visible ? s.score[p.score] * (dot - s.delta[p.halo]) : acc_t(0);
  });
  __syncthreads();

  for_each_weighted_chunk<B>(g, s.score, s.query, scaled_row_store(g, t, grad_k, scale));
}

}  // namespace

void launch_backward_key(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                         const at::Tensor& v, const at::Tensor& bias, const at::Tensor& lse,
                         const at::Tensor& delta, int64_t block_size, double scale,
                         bool symmetric, at::Tensor& grad_k, at::Tensor& grad_v) {
  const Geometry g =
      make_geometry(q, block_size, symmetric, {&grad_out, &q, &k, &v, &grad_k, &grad_v});
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, q.scalar_type(), "local_attention2d_backward_key_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        with_block_size(block_size, [&](auto b) {
          launch_tiled<KeyShared<scalar_t, acc_t>>(
              backward_key_kernel<scalar_t, decltype(b)::value>, g, q.size(0),
              grad_out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
              v.data_ptr<scalar_t>(), bias.data_ptr<acc_t>(), lse.data_ptr<acc_t>(),
              delta.data_ptr<acc_t>(), static_cast<acc_t>(scale), grad_k.data_ptr<scalar_t>(),
              grad_v.data_ptr<scalar_t>());
        });
      });
}

}  // namespace localattn::cuda
