// Shared pieces of the CPU kernels of localattn::local_attention2d_forward / _backward (schemas in
// ../local_attention.cpp, input checks in ../checks.h, contract in docs/local-attention.md):
// the geometry of a call, the SIMD helpers and the transposed key strips. forward.cpp and
// backward.cpp hold the two passes, ops.cpp the checks, allocation and registration.
//
// Query (y, x) of block (y/b, x/b) attends to the keys of the 3x3 neighbouring blocks that lie in
// the image (and, if symmetric, within b pixels in each direction). All queries of a block share
// that window (a rectangle); the symmetric mask only sets some of its scores to -inf.
//
// Work is split into items (batch, block row, head). An item first copies the key rows its
// block row sees into a transposed "strip" (see Strip), then walks its queries; every loop over
// keys is then a contiguous SIMD loop.
//
// Probabilities are never stored: the forward saves the log-sum-exp of each query row and the
// backward recomputes p = exp(s - lse), with delta = rowsum(dO * O) as in FlashAttention.
//
// Low-precision inputs (bf16, fp16) are computed in float; the hot loops are compiled twice, for
// AVX2+FMA and for the baseline ISA, and chosen at run time (cpu_has_avx2). Every helper here is
// always_inline, so that it is compiled again inside the AVX2 clones of forward.cpp and
// backward.cpp with the wider instruction set.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
// std::bit_cast is C++20 and torch before 2.14 builds extensions as C++17; c10's compiles as either.
#include <c10/util/bit_cast.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__GNUC__)
#define LOCALATTN_INLINE inline __attribute__((always_inline))
#else
#define LOCALATTN_INLINE inline
#endif

#if defined(__GNUC__) && defined(__x86_64__)
#define LOCALATTN_HAVE_AVX2_CLONE 1
#endif

namespace localattn::cpu {

// Sizes of one call; element (n, y, x, h, d) of q/k/v/out lives at pixel(n, y, x) + h * dim + d.
struct Geometry {
  int64_t batch, height, width, heads, dim, block, table;  // table = 4 * block - 1
  bool symmetric;

  int64_t pixel(int64_t n, int64_t y, int64_t x) const {
    return ((n * height + y) * width + x) * heads * dim;
  }
  int64_t block_rows() const { return (height + block - 1) / block; }
};

// Half-open rectangle [y0, y1) x [x0, x1) of the keys seen by query (y, x).
struct Window {
  int64_t y0, y1, x0, x1;
};

// The keys of every query of block (block_row, block_col): the 3x3 neighbouring blocks, clipped
// to the image.
LOCALATTN_INLINE Window block_window(const Geometry& g, int64_t block_row, int64_t block_col) {
  const int64_t b = g.block;
  return Window{std::max<int64_t>(0, (block_row - 1) * b), std::min(g.height, (block_row + 2) * b),
                std::max<int64_t>(0, (block_col - 1) * b), std::min(g.width, (block_col + 2) * b)};
}

// The keys of query (y, x): its block's window, and if symmetric only those within b pixels.
LOCALATTN_INLINE Window key_window(const Geometry& g, int64_t y, int64_t x) {
  const int64_t b = g.block;
  Window w = block_window(g, y / b, x / b);
  if (g.symmetric) {
    w.y0 = std::max(w.y0, y - b);
    w.y1 = std::min(w.y1, y + b + 1);
    w.x0 = std::max(w.x0, x - b);
    w.x1 = std::min(w.x1, x + b + 1);
  }
  return w;
}

// The vector loops below run over whole groups of kLanes elements (buffers are padded), so the
// compiler emits straight SIMD code without remainder loops.
constexpr int64_t kLanes = 8;
// combine_features, query_gradients and add_to_keys work on kGroup SIMD chunks at a time.
constexpr int64_t kGroup = 4;
// The forward prefetches the query this many pixels ahead.
constexpr int64_t kPrefetchAhead = 4;

LOCALATTN_INLINE int64_t round_up(int64_t n, int64_t multiple) {
  return (n + multiple - 1) / multiple * multiple;
}

// <a, b>; n is a multiple of kLanes. Two independent accumulators, so that consecutive
// multiply-adds do not all wait on each other's latency.
template <typename acc_t>
LOCALATTN_INLINE acc_t dot_lanes(const acc_t* a, const acc_t* b, int64_t n) {
  acc_t even[kLanes] = {}, odd[kLanes] = {};
  int64_t i = 0;
  for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
#pragma omp simd
    for (int64_t t = 0; t < kLanes; ++t) {
      even[t] += a[i + t] * b[i + t];
      odd[t] += a[i + kLanes + t] * b[i + kLanes + t];
    }
  }
  if (i < n) {
#pragma omp simd
    for (int64_t t = 0; t < kLanes; ++t) even[t] += a[i + t] * b[i + t];
  }
  acc_t sum = 0;
  for (int64_t t = 0; t < kLanes; ++t) sum += even[t] + odd[t];
  return sum;
}

// y[i] += x[i] for a short run of any length.
template <typename acc_t>
LOCALATTN_INLINE void add(acc_t* y, const acc_t* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}

// Asks the cache for a row of n elements ahead of its use: the rows of one head are heads * D
// elements apart, a stride the hardware prefetchers follow poorly.
template <typename scalar_t>
LOCALATTN_INLINE void prefetch(const scalar_t* row, int64_t n) {
#if defined(__GNUC__)
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t i = 0; i < n * static_cast<int64_t>(sizeof(scalar_t)); i += 64) {
    __builtin_prefetch(bytes + i);
  }
#endif
}

template <typename acc_t, typename scalar_t>
LOCALATTN_INLINE void load_scaled(acc_t* dst, const scalar_t* src, acc_t factor, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = factor * static_cast<acc_t>(src[i]);
}

// exp(x) for x <= 0 (tiny positive x from rounding is fine), written so that it vectorises
// (std::exp does not without -ffast-math): x = n ln2 + r with |r| <= ln2/2, exp(r) by its Taylor
// polynomial of degree 6 (relative error ~1e-7), 2^n through the exponent bits. Below -87 a
// float exp underflows; those (and the -inf of masked keys) give 0. The comparisons are done on
// the bits as integers: float compares may trap, which keeps GCC from vectorising the selects.
LOCALATTN_INLINE float exp_nonpositive(float x) {
  constexpr uint32_t kMinus87 = 0xC2AE0000u;  // bits of -87.0f; larger bits = more negative
  const uint32_t bits = c10::bit_cast<uint32_t>(x);
  const bool underflow = bits > kMinus87;
  const float clamped = c10::bit_cast<float>(underflow ? kMinus87 : bits);
  const int32_t n = static_cast<int32_t>(clamped * 1.44269504088896341f - 0.5f);
  const float r = clamped - static_cast<float>(n) * 0.693145751953125f -
      static_cast<float>(n) * 1.42860682030941723e-6f;
  float p = 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const float result = p * c10::bit_cast<float>((n + 127) << 23);
  return c10::bit_cast<float>(c10::bit_cast<uint32_t>(result) & (underflow ? 0u : ~0u));
}

LOCALATTN_INLINE double exp_nonpositive(double x) { return std::exp(x); }

// p[i] = exp(s[i] - shift) in place; returns the sum. n is a multiple of kLanes.
template <typename acc_t>
LOCALATTN_INLINE acc_t exp_shifted(acc_t* s, acc_t shift, int64_t n) {
  acc_t partial[kLanes] = {};
  for (int64_t i = 0; i < n; i += kLanes) {
#pragma omp simd
    for (int64_t t = 0; t < kLanes; ++t) {
      s[i + t] = exp_nonpositive(s[i + t] - shift);
      partial[t] += s[i + t];
    }
  }
  acc_t sum = 0;
  for (int64_t t = 0; t < kLanes; ++t) sum += partial[t];
  return sum;
}

// The keys (or values) of one block row's key rows y0 <= ky < y0 + rows, all columns, transposed
// to [D][stride] with key (ky, kx) at column kx * rows + (ky - y0). The window of block column X
// is then the contiguous run [x0 * rows, x1 * rows): one gather per block row serves all its
// blocks, and every loop over keys is contiguous and needs no horizontal sums.
template <typename acc_t>
struct Strip {
  int64_t y0 = 0, rows = 0, dim, stride;
  std::vector<acc_t> data;

  explicit Strip(const Geometry& g)
      : dim(g.dim), stride(round_up(g.width * 3 * g.block + kGroup * kLanes, kLanes)), data(g.dim * stride) {}
  acc_t* feature(int64_t d) { return data.data() + d * stride; }
  const acc_t* feature(int64_t d) const { return data.data() + d * stride; }

  // Copies rows [window.y0, window.y1) of one (batch, head) of src; zeroes the tail that padded
  // loops read past the last column.
  template <typename scalar_t>
  LOCALATTN_INLINE void gather(const scalar_t* src, const Geometry& g, int64_t n, int64_t h,
                               const Window& window) {
    y0 = window.y0;
    rows = window.y1 - window.y0;
    for (int64_t kx = 0; kx < g.width; ++kx) {
      for (int64_t r = 0; r < rows; ++r) {
        const scalar_t* key = src + g.pixel(n, y0 + r, kx) + h * g.dim;
        for (int64_t d = 0; d < g.dim; ++d) data[d * stride + kx * rows + r] = key[d];
      }
    }
    for (int64_t d = 0; d < g.dim; ++d) {
      std::fill(feature(d) + g.width * rows, feature(d) + stride, acc_t(0));
    }
  }
};

// c_k[t] += w * x[k * kLanes + t] for the kGroup chunks c0..c3 of a group held in registers.
template <typename acc_t, typename src_t>
LOCALATTN_INLINE void add_scaled_group(acc_t* c0, acc_t* c1, acc_t* c2, acc_t* c3, acc_t w,
                                       const src_t* x) {
  static_assert(kGroup == 4, "a group is four chunks");
#pragma omp simd
  for (int64_t t = 0; t < kLanes; ++t) {
    c0[t] += w * static_cast<acc_t>(x[t]);
    c1[t] += w * static_cast<acc_t>(x[kLanes + t]);
    c2[t] += w * static_cast<acc_t>(x[2 * kLanes + t]);
    c3[t] += w * static_cast<acc_t>(x[3 * kLanes + t]);
  }
}

// out[j] = sum_d weight[d] * strip[d][start + j] for j < n (a multiple of kLanes): scores from a
// query, or dO . v. Keys go kGroup SIMD chunks at a time with the sums held in registers
// across d, instead of a read-modify-write of out per d; the last group may read up to
// kGroup - 1 chunks past n (the strip's stride leaves room) and drops them.
template <typename acc_t>
LOCALATTN_INLINE void combine_features(acc_t* out, const acc_t* weight, const Strip<acc_t>& strip,
                                       int64_t start, int64_t n) {
  for (int64_t j = 0; j < n; j += kGroup * kLanes) {
    acc_t c0[kLanes] = {}, c1[kLanes] = {}, c2[kLanes] = {}, c3[kLanes] = {};
    const acc_t* keys = strip.feature(0) + start + j;
    for (int64_t d = 0; d < strip.dim; ++d, keys += strip.stride) {
      add_scaled_group(c0, c1, c2, c3, weight[d], keys);
    }
    const acc_t* sums[kGroup] = {c0, c1, c2, c3};
    for (int64_t chunk = 0; chunk < kGroup && j + chunk * kLanes < n; ++chunk) {
      std::copy(sums[chunk], sums[chunk] + kLanes, out + j + chunk * kLanes);
    }
  }
}

// One query and the keys of its block's window (a run of a Strip).
struct QueryAt {
  int64_t y, x;         // the query pixel
  int64_t x0, x1;       // the window's key columns
  int64_t start, count, padded;  // its run in the strip, and the run rounded up to kLanes

  LOCALATTN_INLINE QueryAt(const Geometry& g, int64_t rows, int64_t y_, int64_t x_)
      : y(y_), x(x_) {
    const Window block = block_window(g, y / g.block, x / g.block);
    x0 = block.x0;
    x1 = block.x1;
    start = x0 * rows;
    count = (x1 - x0) * rows;
    padded = round_up(count, kLanes);
  }
};

// Column of the transposed bias table [(4b-1) x-offsets][(4b-1) y-offsets] holding key (y0, kx)
// seen from query (y, x); the keys below it in the strip follow contiguously.
LOCALATTN_INLINE int64_t bias_column(const Geometry& g, const QueryAt& qa, int64_t y0, int64_t kx) {
  const int64_t centre = 2 * g.block - 1;
  return (kx - qa.x + centre) * g.table + (y0 - qa.y + centre);
}

// scores[j] = <q_scaled, key j> + bias for the window's keys, -inf for keys the symmetric mask
// removes and for the padding. Returns the largest score.
template <typename acc_t>
LOCALATTN_INLINE acc_t query_scores(acc_t* scores, const acc_t* q_scaled, const Strip<acc_t>& keys,
                                    const acc_t* bias_t, const Geometry& g, const QueryAt& qa) {
  constexpr acc_t minus_inf = -std::numeric_limits<acc_t>::infinity();
  combine_features(scores, q_scaled, keys, qa.start, qa.padded);
  const Window own = key_window(g, qa.y, qa.x);
  for (int64_t kx = qa.x0; kx < qa.x1; ++kx) {
    acc_t* column = scores + (kx - qa.x0) * keys.rows;
    add(column, bias_t + bias_column(g, qa, keys.y0, kx), keys.rows);
    if (kx < own.x0 || kx >= own.x1) {
      std::fill(column, column + keys.rows, minus_inf);
    } else {
      std::fill(column, column + (own.y0 - keys.y0), minus_inf);
      std::fill(column + (own.y1 - keys.y0), column + keys.rows, minus_inf);
    }
  }
  std::fill(scores + qa.count, scores + qa.padded, minus_inf);
  acc_t max_score = minus_inf;
  for (int64_t j = 0; j < qa.count; ++j) max_score = std::max(max_score, scores[j]);
  return max_score;
}

// Which (batch, block row, head) a work item is; block rows are first_row + k * row_step.
struct Item {
  int64_t n, block_row, h;
};

LOCALATTN_INLINE Item item_at(const Geometry& g, int64_t item, int64_t rows, int64_t first_row,
                              int64_t row_step) {
  return Item{item / g.heads / rows, first_row + row_step * (item / g.heads % rows), item % g.heads};
}

#ifdef LOCALATTN_HAVE_AVX2_CLONE
// Whether this CPU runs the AVX2+FMA clones of the hot loops.
inline bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#endif

// Host entry points of the two passes (forward.cpp, backward.cpp), called by ops.cpp on checked,
// contiguous CPU tensors. bias_t is rpb transposed to [heads, x-offset, y-offset] in the
// accumulation dtype (the kernels walk keys down the columns of a window).
void launch_forward(const Geometry& g, const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& v, const at::Tensor& bias_t, double scale, at::Tensor& out,
                    at::Tensor& lse);

// grad_q, grad_k, grad_v (zeroed) and grad_bias_t_per_thread (zeroed, [threads, heads, T, T])
// are in the accumulation dtype.
void launch_backward(const Geometry& g, const at::Tensor& grad_out, const at::Tensor& q,
                     const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                     const at::Tensor& bias_t, const at::Tensor& lse, double scale,
                     at::Tensor& grad_q, at::Tensor& grad_k, at::Tensor& grad_v,
                     at::Tensor& grad_bias_t_per_thread);

}  // namespace localattn::cpu
