// Forward kernel: out = softmax(scale * q k^T + bias, masked) v over each query's 3b x 3b
// window, and the log-sum-exp of each score row for the backward. One thread block per
// (batch item, head, tile of query blocks); see local_attention_cuda.cuh for the tiling.
#include "local_attention_cuda.cuh"

namespace localattn::cuda {
namespace {

template <typename T, typename acc_t>
struct ForwardShared {
  T *key, *value;  // halo rows
  T* query;        // tile rows
  acc_t* score;    // [tile pixels][window]: scores, then probabilities
  acc_t* bias;     // this head's table
  int64_t bytes;

  C10_HOST_DEVICE ForwardShared(unsigned char* base, const Geometry& g) {
    SharedCarver carve(base);
    key = carve.take<T>(static_cast<int64_t>(g.halo_pixels()) * g.row);
    value = carve.take<T>(static_cast<int64_t>(g.halo_pixels()) * g.row);
    query = carve.take<T>(static_cast<int64_t>(g.tile_pixels()) * g.row);
    score = carve.take<acc_t>(static_cast<int64_t>(g.tile_pixels()) * g.score_stride());
    bias = carve.take<acc_t>(g.table_size());
    bytes = carve.bytes();
  }
};

// Turns each score row into probabilities in place and writes its log-sum-exp. kSoftmaxLanes
// lanes share a row; rows of pixels outside the image (all -inf) become zeros.
template <typename acc_t>
__device__ void softmax_rows(const Geometry& g, const TilePosition& t, acc_t* score,
                             acc_t* __restrict__ lse) {
  const int rows = g.tile_pixels(), window = g.window();
  const int rows_per_pass = blockDim.x / kSoftmaxLanes, rows_per_warp = 32 / kSoftmaxLanes;
  const int lane = threadIdx.x % kSoftmaxLanes;
  // Every lane of a warp runs the same number of passes, so the shuffles see the whole warp.
  const int padded_rows = (rows + rows_per_warp - 1) / rows_per_warp * rows_per_warp;
  for (int i = threadIdx.x / kSoftmaxLanes; i < padded_rows; i += rows_per_pass) {
    const bool active = i < rows;
    acc_t* s = score + static_cast<int64_t>(active ? i : 0) * g.score_stride();
    acc_t row_max = negative_infinity<acc_t>();
    if (active) {
      for (int j = lane; j < window; j += kSoftmaxLanes) row_max = max(row_max, s[j]);
    }
#pragma unroll
    for (int offset = kSoftmaxLanes / 2; offset > 0; offset /= 2) {
      row_max = max(row_max, __shfl_xor_sync(0xffffffffu, row_max, offset));
    }
    // A pixel inside the image always sees itself, so only rows outside it are all -inf.
    const bool empty = row_max == negative_infinity<acc_t>();
    acc_t row_sum = 0;
    if (active && !empty) {
      for (int j = lane; j < window; j += kSoftmaxLanes) {
        s[j] = exp_acc(s[j] - row_max);
        row_sum += s[j];
      }
    }
#pragma unroll
    for (int offset = kSoftmaxLanes / 2; offset > 0; offset /= 2) {
      row_sum += __shfl_xor_sync(0xffffffffu, row_sum, offset);
    }
    if (active) {
      const acc_t inverse = empty ? acc_t(0) : acc_t(1) / row_sum;
      for (int j = lane; j < window; j += kSoftmaxLanes) s[j] = empty ? acc_t(0) : s[j] * inverse;
      if (lane == 0 && !empty) {
        lse[row_index(g, t.n, tile_pixel(g, t, i), t.h)] = row_max + log_acc(row_sum);
      }
    }
  }
}

template <typename T, int B>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(Geometry g, const T* __restrict__ q, const T* __restrict__ k,
                   const T* __restrict__ v, const at::opmath_type<T>* __restrict__ bias,
                   at::opmath_type<T> scale, T* __restrict__ out,
                   at::opmath_type<T>* __restrict__ lse) {
  using acc_t = at::opmath_type<T>;
  extern __shared__ __align__(16) unsigned char shared[];
  const ForwardShared<T, acc_t> s(shared, g);
  const TilePosition t = tile_position(g);

  stage_tile_rows(g, t, q, s.query);
  stage_halo_rows(g, t, k, s.key);
  stage_halo_rows(g, t, v, s.value);
  stage_bias(g, bias, t.h, s.bias);
  __syncthreads();

  for_each_pair<B>(g, t, s.query, s.key, [&](const Pair& p, acc_t dot) {
    s.score[p.score] =
        p.visible
            ? scale * dot + s.bias[bias_index(g, p.tile_px, p.halo_px)]
            : negative_infinity<acc_t>();
  });
  __syncthreads();

  softmax_rows(g, t, s.score, lse);
  __syncthreads();

  for_each_weighted_chunk<B>(g, s.score, s.value, scaled_row_store(g, t, out, acc_t(1)));
}

}  // namespace

void launch_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& bias, int64_t block_size, double scale, bool symmetric,
                    at::Tensor& out, at::Tensor& lse) {
  const Geometry g = make_geometry(q, block_size, symmetric, {&q, &k, &v, &out});
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, q.scalar_type(), "local_attention2d_forward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        with_block_size(block_size, [&](auto b) {
          launch_tiled<ForwardShared<scalar_t, acc_t>>(
              forward_kernel<scalar_t, decltype(b)::value>, g, q.size(0), q.data_ptr<scalar_t>(),
              k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), bias.data_ptr<acc_t>(),
              static_cast<acc_t>(scale), out.data_ptr<scalar_t>(), lse.data_ptr<acc_t>());
        });
      });
}

}  // namespace localattn::cuda
