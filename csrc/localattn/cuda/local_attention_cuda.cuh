// Shared pieces of the CUDA kernels of localattn::local_attention2d_forward / _backward
// (contract in docs/local-attention.md, input checks in ../checks.h, schemas in
// ../local_attention.cpp).
//
// Work decomposition. A thread block owns one (batch item, head) and a square tile of TB x TB
// pixel blocks of b x b pixels. All b*b pixels of a block see the same 3b x 3b window of pixels
// (the block and its 8 neighbours), so the windows of the whole tile lie in a "halo" square of
// (TB+2) x (TB+2) blocks around it. Each kernel stages the tile rows and the halo rows of one
// head in shared memory once, then works from there:
//   * query-centric (forward, backward for dq): the tile holds queries, the halo keys/values;
//   * key-centric (backward for dk, dv): the tile holds keys/values, the halo the queries that
//     see them. The visibility relation is symmetric in block terms (|dY| <= 1, |dX| <= 1) and
//     the symmetric mask (|dy| <= b, |dx| <= b) too, so a key's queries are exactly the pixels
//     of the 3x3 blocks around the key's block: dk and dv are written once, without atomics.
// The score matrix of the tile ([tile pixels] x [9b^2 window pixels]) lives in shared memory.
//
// Score loops are register-tiled on b: one thread takes a row of b pixels of a block (they share
// the window) against a run of b consecutive window pixels. Weighted sums take one pixel and one
// 8-element chunk of the head dimension per thread. Rows are stored in shared memory in the input
// dtype, padded to a multiple of 8 elements (zeros) plus 16 bytes, so that any head size works,
// every chunk is one or more aligned 16-byte accesses, and rows of neighbouring pixels start in
// different banks. Arithmetic is in at::opmath_type (float; double for double inputs).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <type_traits>

namespace localattn::cuda {

constexpr int kThreads = 256;     // most threads per block of every kernel
constexpr int kChunk = 8;         // head-dimension elements per register chunk
constexpr int kSoftmaxLanes = 4;  // lanes that share one score row in the forward softmax

template <typename T>
struct alignas(16) Chunk {
  T v[kChunk];
};

// Sizes of one call and of its tiling; built on the host, passed by value.
struct Geometry {
  int height, width, heads, dim;
  int block;        // b
  int chunks;       // ceil(dim / 8)
  int row;          // shared-memory row stride in elements: 8 * chunks + 16 / sizeof(T)
  int tile_blocks;  // TB: the tile is TB x TB blocks
  int tiles_x;      // tiles per tile row
  int tiles;        // tiles per image
  bool symmetric;
  bool vectorized;  // dim % 8 == 0 and all global pointers 16-byte aligned

  C10_HOST_DEVICE int tile_side() const { return tile_blocks * block; }
  C10_HOST_DEVICE int halo_side() const { return (tile_blocks + 2) * block; }
  C10_HOST_DEVICE int tile_pixels() const { return tile_side() * tile_side(); }
  C10_HOST_DEVICE int halo_pixels() const { return halo_side() * halo_side(); }
  C10_HOST_DEVICE int window() const { return 9 * block * block; }
  // Score-row stride: odd, so that threads walking different rows hit different banks.
  C10_HOST_DEVICE int score_stride() const { return window() | 1; }
  C10_HOST_DEVICE int table() const { return 4 * block - 1; }
  C10_HOST_DEVICE int table_size() const { return table() * table(); }
};

// Bump allocator over dynamic shared memory. On the host (base = nullptr) it only adds up sizes,
// so that the launcher and the kernel compute the layout with the same code.
class SharedCarver {
 public:
  C10_HOST_DEVICE explicit SharedCarver(unsigned char* base) : base_(base) {}
  template <typename U>
  C10_HOST_DEVICE U* take(int64_t count) {
    U* region = base_ != nullptr ? reinterpret_cast<U*>(base_ + offset_) : nullptr;
    offset_ += (count * static_cast<int64_t>(sizeof(U)) + 15) / 16 * 16;
    return region;
  }
  C10_HOST_DEVICE int64_t bytes() const { return offset_; }

 private:
  unsigned char* base_;
  int64_t offset_ = 0;
};

// Where one thread block works: batch item, head, and the first block row/column of its tile.
struct TilePosition {
  int n, h, block_y0, block_x0;
};

// The grid is one-dimensional, blockIdx.x = (n * tiles + tile) * heads + h (launch_grid): grid y
// and z stop at 65535, x at 2^31 - 1.
__device__ inline TilePosition tile_position(const Geometry& g) {
  const int index = static_cast<int>(blockIdx.x);
  const int tile = index / g.heads % g.tiles;
  return {index / g.heads / g.tiles, index % g.heads, (tile / g.tiles_x) * g.tile_blocks,
          (tile % g.tiles_x) * g.tile_blocks};
}

struct Pixel {
  int y, x;
};

// Tile pixels are numbered block-major: block (by, bx) of the tile, then row r, column c inside
// it, so the b pixels of one block row are consecutive.
__device__ inline Pixel tile_pixel(const Geometry& g, const TilePosition& t, int index) {
  const int b = g.block;
  const int blk = index / (b * b), within = index % (b * b);
  return {(t.block_y0 + blk / g.tile_blocks) * b + within / b,
          (t.block_x0 + blk % g.tile_blocks) * b + within % b};
}

// Halo pixels are numbered row-major over the (TB+2)b square that starts one block up-left.
__device__ inline Pixel halo_pixel(const Geometry& g, const TilePosition& t, int index) {
  const int side = g.halo_side();
  return {(t.block_y0 - 1) * g.block + index / side, (t.block_x0 - 1) * g.block + index % side};
}

__device__ inline bool in_image(const Geometry& g, Pixel p) {
  return p.y >= 0 && p.y < g.height && p.x >= 0 && p.x < g.width;
}

// Index of (n, y, x, h) in a [B, H, W, heads] tensor (lse, delta); times dim for q/k/v/out.
__device__ inline int64_t row_index(const Geometry& g, int n, Pixel p, int h) {
  return ((static_cast<int64_t>(n) * g.height + p.y) * g.width + p.x) * g.heads + h;
}

// Whether two pixels of neighbouring blocks pass the symmetric mask (|dy| <= b, |dx| <= b, the
// same from either side); the caller checks that both are in the image.
__device__ inline bool symmetric_ok(const Geometry& g, Pixel one, Pixel other) {
  return !g.symmetric || (abs(one.y - other.y) <= g.block && abs(one.x - other.x) <= g.block);
}

// Index in the bias table of the offset key - query.
__device__ inline int bias_index(const Geometry& g, Pixel query, Pixel key) {
  return (key.y - query.y + 2 * g.block - 1) * g.table() + key.x - query.x + 2 * g.block - 1;
}

template <typename acc_t>
__device__ inline acc_t negative_infinity() {
  return -std::numeric_limits<acc_t>::infinity();
}
__device__ inline float exp_acc(float x) { return expf(x); }
__device__ inline double exp_acc(double x) { return exp(x); }
__device__ inline float log_acc(float x) { return logf(x); }
__device__ inline double log_acc(double x) { return log(x); }

// Copies the head-h rows of `count` pixels from global memory into shared rows of stride g.row,
// zero-filling pixels outside the image and the padding of the head dimension (zeros keep padded
// lanes out of dot products, and 0 * garbage could be NaN).
template <typename T, typename PixelOf>
__device__ void stage_rows(const Geometry& g, const T* __restrict__ src, int n, int h, int count,
                           PixelOf pixel_of, T* dst) {
  const int row_elems = g.row;
  for (int i = threadIdx.x; i < count * g.chunks; i += blockDim.x) {
    const int p = i / g.chunks, d0 = (i % g.chunks) * kChunk;
    const Pixel px = pixel_of(p);
    T* out = dst + static_cast<int64_t>(p) * row_elems + d0;
    if (!in_image(g, px)) {
      for (int e = 0; e < kChunk; ++e) out[e] = T(0);
    } else {
      const T* in = src + row_index(g, n, px, h) * g.dim + d0;
      if (g.vectorized) {
        *reinterpret_cast<Chunk<T>*>(out) = *reinterpret_cast<const Chunk<T>*>(in);
      } else {
        for (int e = 0; e < kChunk; ++e) out[e] = d0 + e < g.dim ? in[e] : T(0);
      }
    }
  }
}

template <typename T>
__device__ void stage_tile_rows(const Geometry& g, const TilePosition& t, const T* __restrict__ src,
                                T* dst) {
  stage_rows(g, src, t.n, t.h, g.tile_pixels(), [&](int i) { return tile_pixel(g, t, i); }, dst);
}

template <typename T>
__device__ void stage_halo_rows(const Geometry& g, const TilePosition& t, const T* __restrict__ src,
                                T* dst) {
  stage_rows(g, src, t.n, t.h, g.halo_pixels(), [&](int i) { return halo_pixel(g, t, i); }, dst);
}

// Writes chunk `chunk` of one row (head h of pixel px) from registers to global memory.
template <typename T, typename acc_t>
__device__ void store_chunk(const Geometry& g, T* __restrict__ dst, int n, Pixel px, int h,
                            int chunk, const acc_t (&values)[kChunk]) {
  T* out = dst + row_index(g, n, px, h) * g.dim + chunk * kChunk;
  if (g.vectorized) {
    Chunk<T> packed;
#pragma unroll
    for (int e = 0; e < kChunk; ++e) packed.v[e] = static_cast<T>(values[e]);
    *reinterpret_cast<Chunk<T>*>(out) = packed;
  } else {
#pragma unroll
    for (int e = 0; e < kChunk; ++e) {
      if (chunk * kChunk + e < g.dim) out[e] = static_cast<T>(values[e]);
    }
  }
}

template <typename T, typename acc_t>
__device__ inline void load_chunk(const T* src, acc_t (&values)[kChunk]) {
  const Chunk<T> packed = *reinterpret_cast<const Chunk<T>*>(src);
#pragma unroll
  for (int e = 0; e < kChunk; ++e) values[e] = static_cast<acc_t>(packed.v[e]);
}

// dots[c][t] = <a_c, w_t> for the B consecutive shared rows a (one block row of the tile) and
// the B consecutive shared rows w (a run of one window row of the halo).
template <int B, typename T, typename acc_t>
__device__ void dot_rows(const Geometry& g, const T* a, const T* w, acc_t (&dots)[B][B]) {
#pragma unroll
  for (int c = 0; c < B; ++c) {
#pragma unroll
    for (int t = 0; t < B; ++t) dots[c][t] = acc_t(0);
  }
  for (int chunk = 0; chunk < g.chunks; ++chunk) {
    acc_t av[B][kChunk], wv[B][kChunk];
#pragma unroll
    for (int c = 0; c < B; ++c) load_chunk(a + c * g.row + chunk * kChunk, av[c]);
#pragma unroll
    for (int t = 0; t < B; ++t) load_chunk(w + t * g.row + chunk * kChunk, wv[t]);
#pragma unroll
    for (int c = 0; c < B; ++c) {
#pragma unroll
      for (int t = 0; t < B; ++t) {
#pragma unroll
        for (int e = 0; e < kChunk; ++e) dots[c][t] += av[c][e] * wv[t][e];
      }
    }
  }
}

// sums[:] = sum over the 9b^2 window pixels j of weights[j] * chunk `chunk` of the halo row of
// j; `window_origin` is the halo row of the window's top-left pixel.
template <int B, typename T, typename acc_t>
__device__ void weighted_row(const Geometry& g, const acc_t* weights, const T* window_origin,
                             int chunk, acc_t (&sums)[kChunk]) {
#pragma unroll
  for (int e = 0; e < kChunk; ++e) sums[e] = acc_t(0);
  const int64_t halo_row = static_cast<int64_t>(g.halo_side()) * g.row;
  for (int wy = 0; wy < 3 * B; ++wy) {
    const T* row_start = window_origin + wy * halo_row + chunk * kChunk;
#pragma unroll
    for (int wx = 0; wx < 3 * B; ++wx) {
      acc_t values[kChunk];
      load_chunk(row_start + wx * g.row, values);
      const acc_t p = weights[wy * 3 * B + wx];
#pragma unroll
      for (int e = 0; e < kChunk; ++e) sums[e] += p * values[e];
    }
  }
}

// One work item of the pairwise phases: row r of block `blk` of the tile, numbered
// block_row = blk * b + r (its pixel in column c is tile pixel block_row * b + c), and run `run`
// of b consecutive window pixels (window row run / 3, columns (run % 3) * b ...).
struct PairItem {
  int blk, block_row, run;
};

__device__ inline PairItem pair_item(int item, int b) {
  const int runs = 9 * b, block_row = item / runs;
  return {block_row / b, block_row, item % runs};
}

// Shared row of the window pixel at (wy, wx) of tile block blk, in the halo numbering.
__device__ inline int window_halo_index(const Geometry& g, int blk, int wy, int wx) {
  const int b = g.block;
  return ((blk / g.tile_blocks) * b + wy) * g.halo_side() + (blk % g.tile_blocks) * b + wx;
}

// Copies the bias table of head h (already in acc_t) into shared memory.
template <typename acc_t>
__device__ void stage_bias(const Geometry& g, const acc_t* __restrict__ bias, int h,
                           acc_t* dst) {
  for (int i = threadIdx.x; i < g.table_size(); i += blockDim.x) {
    dst[i] = bias[h * g.table_size() + i];
  }
}

// One (tile pixel, window pixel) pair handed to the epilogues of for_each_pair.
struct Pair {
  int tile, halo, score;  // tile row, halo row, index into the score buffer
  Pixel tile_px, halo_px;
  bool visible;           // both pixels in the image and, if symmetric, within b of each other
};

// For every (tile pixel, window pixel) pair of the tile, computes the dot product of their
// shared rows (tile_rows: one per tile pixel; halo_rows: one per halo pixel) and hands it to
// epilogue(pair, dot). Pairs of one thread never share a score entry with another thread's.
template <int B, typename T, typename Epilogue>
__device__ void for_each_pair(const Geometry& g, const TilePosition& t, const T* tile_rows,
                              const T* halo_rows, Epilogue epilogue) {
  using acc_t = at::opmath_type<T>;
  const int items = g.tile_blocks * g.tile_blocks * B * 9 * B;
  for (int item = threadIdx.x; item < items; item += blockDim.x) {
    const PairItem it = pair_item(item, B);
    const int wy = it.run / 3, wx0 = (it.run % 3) * B;
    const int halo0 = window_halo_index(g, it.blk, wy, wx0);
    acc_t dots[B][B];
    dot_rows<B>(g, tile_rows + static_cast<int64_t>(it.block_row) * B * g.row,
                halo_rows + static_cast<int64_t>(halo0) * g.row, dots);
#pragma unroll
    for (int c = 0; c < B; ++c) {
      const int tile = it.block_row * B + c;
      const Pixel tp = tile_pixel(g, t, tile);
#pragma unroll
      for (int u = 0; u < B; ++u) {
        const Pixel hp = halo_pixel(g, t, halo0 + u);
        const bool visible = in_image(g, tp) && in_image(g, hp) && symmetric_ok(g, tp, hp);
        epilogue(Pair{tile, halo0 + u, tile * g.score_stride() + it.run * B + u, tp, hp, visible},
                 dots[c][u]);
      }
    }
  }
}

// For every tile pixel i and head-dimension chunk, sums over the window pixels j of
// score[i][j] * halo_rows[j] and hands the chunk to store(tile row, chunk, sums). One item per
// (pixel, chunk), chunks innermost: the lanes of a warp read the same window rows (the pixels of
// one block share their window), so the halo loads are broadcasts and every lane has work.
template <int B, typename T, typename acc_t, typename Store>
__device__ void for_each_weighted_chunk(const Geometry& g, const acc_t* score,
                                        const T* halo_rows, Store store) {
  const int items = g.tile_pixels() * g.chunks;
  for (int item = threadIdx.x; item < items; item += blockDim.x) {
    const int chunk = item % g.chunks, tile = item / g.chunks;
    acc_t sums[kChunk];
    const int window_origin = window_halo_index(g, tile / (B * B), 0, 0);
    weighted_row<B>(g, score + static_cast<int64_t>(tile) * g.score_stride(),
                    halo_rows + static_cast<int64_t>(window_origin) * g.row, chunk, sums);
    store(tile, chunk, sums);
  }
}

// A store for for_each_weighted_chunk: writes factor * sums to the head-h row of the tile pixel
// in dst, for pixels inside the image.
template <typename T, typename acc_t>
__device__ auto scaled_row_store(const Geometry& g, const TilePosition& t, T* __restrict__ dst,
                                 acc_t factor) {
  return [&g, &t, dst, factor](int tile, int chunk, const acc_t(&sums)[kChunk]) {
    const Pixel px = tile_pixel(g, t, tile);
    if (!in_image(g, px)) return;
    acc_t scaled[kChunk];
#pragma unroll
    for (int e = 0; e < kChunk; ++e) scaled[e] = factor * sums[e];
    store_chunk(g, dst, t.n, px, t.h, chunk, scaled);
  };
}

// Host side -------------------------------------------------------------------------------------

// Sizes and alignment of a call; the tiling is set by set_tiling.
Geometry make_geometry(const at::Tensor& q, int64_t block_size, bool symmetric,
                       std::initializer_list<const at::Tensor*> tensors);

// Largest tile side in blocks to try: 8 x 8 pixels per tile keeps the halo overhead at
// ((TB+2)/TB)^2 = 2.25 for b = 2.
inline int default_tile_blocks(int b) { return b == 3 ? 2 : 8 / b; }

// The environment variable LOCALATTN_CUDA_TILE_BLOCKS, a tuning knob for benchmarks: the largest
// tile side to try instead of the default, without the two-blocks-per-SM preference below.
// 0 when unset.
int tile_blocks_setting();

// Shared memory per thread block: the device's opt-in maximum, and the most that still lets two
// thread blocks share a multiprocessor (each also reserves 1 KiB).
struct SharedMemoryLimits {
  int64_t per_block, two_per_sm;
};
SharedMemoryLimits shared_memory_limits();

// Uses the largest tile, at most default_tile_blocks a side, that lets two thread blocks share a
// multiprocessor (one block per SM leaves no other block to hide the staging loads and the
// barriers behind), or failing that the largest that fits at all; returns its shared-memory
// bytes (bytes_of). Fails clearly when not even a one-block tile fits.
template <typename BytesOf>
int64_t set_tiling(Geometry& g, BytesOf bytes_of) {
  const SharedMemoryLimits limits = shared_memory_limits();
  const int setting = tile_blocks_setting();
  const auto largest_tile_within = [&](int64_t limit) {
    for (int tb = setting > 0 ? setting : default_tile_blocks(g.block); tb >= 1; --tb) {
      g.tile_blocks = tb;
      if (bytes_of(g) <= limit) return true;
    }
    return false;
  };
  const bool fits = (setting == 0 && largest_tile_within(limits.two_per_sm)) ||
                    largest_tile_within(limits.per_block);
  const int64_t bytes = bytes_of(g);
  TORCH_CHECK_VALUE(fits, "local_attention2d (CUDA): head size D=", g.dim, " with block_size ",
                    g.block, " needs ", bytes,
                    " bytes of shared memory, more than the device has (", limits.per_block,
                    "); use a smaller head size or the CPU");
  const int64_t blocks_y = (g.height + g.block - 1) / g.block;
  const int64_t blocks_x = (g.width + g.block - 1) / g.block;
  const int64_t tiles_x = (blocks_x + g.tile_blocks - 1) / g.tile_blocks;
  const int64_t tiles = tiles_x * ((blocks_y + g.tile_blocks - 1) / g.tile_blocks);
  TORCH_CHECK_VALUE(tiles <= INT_MAX, "local_attention2d (CUDA): image too large: ", g.height,
                    " x ", g.width, " makes ", tiles, " tiles");
  g.tiles_x = static_cast<int>(tiles_x);
  g.tiles = static_cast<int>(tiles);
  return bytes;
}

// Raises the dynamic shared-memory limit of `kernel` to `bytes` when above the default 48 KiB.
void allow_shared_memory(const void* kernel, int64_t bytes);

// Grid of one launch: one thread block per (batch item, tile, head), all along x.
dim3 launch_grid(const Geometry& g, int64_t batch);

// Threads per block: kThreads, or fewer (whole warps) when a small tile has fewer work items
// (pixel pairs, pixel chunks) than that, so that small tiles leave no warps idle.
int launch_threads(const Geometry& g);

// Launches kernel(g, args...) over the tiles of g and the batch on the current stream, with the
// tile sized for the kernel's shared-memory layout Shared.
template <typename Shared, typename... KernelArgs, typename... Args>
void launch_tiled(void (*kernel)(Geometry, KernelArgs...), Geometry g, int64_t batch,
                  Args... args) {
  const int64_t bytes =
      set_tiling(g, [](const Geometry& trial) { return Shared(nullptr, trial).bytes; });
  allow_shared_memory(reinterpret_cast<const void*>(kernel), bytes);
  kernel<<<launch_grid(g, batch), launch_threads(g), bytes, c10::cuda::getCurrentCUDAStream()>>>(
      g, args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename F>
void with_block_size(int64_t b, F&& f) {
  switch (b) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    default:
      TORCH_CHECK_VALUE(false, "local_attention2d (CUDA): block_size must be 1, 2, 3 or 4, got ",
                        b);
  }
}

// Kernels' host entry points (one translation unit each, so they compile in parallel).
void launch_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& bias, int64_t block_size, double scale, bool symmetric,
                    at::Tensor& out, at::Tensor& lse);
void launch_backward_query(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                           const at::Tensor& v, const at::Tensor& bias, const at::Tensor& out,
                           const at::Tensor& lse, int64_t block_size, double scale,
                           bool symmetric, at::Tensor& grad_q, at::Tensor& delta,
                           at::Tensor& grad_bias);
void launch_backward_key(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                         const at::Tensor& v, const at::Tensor& bias, const at::Tensor& lse,
                         const at::Tensor& delta, int64_t block_size, double scale,
                         bool symmetric, at::Tensor& grad_k, at::Tensor& grad_v);

}  // namespace localattn::cuda
