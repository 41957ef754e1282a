// CPU kernels of localattn::local_attention2d_forward / _backward (schemas in ../local_attention.cpp,
// contract in shared/design/local-attention.md).
//
// Query (y, x) of block (y/b, x/b) attends to the keys of the 3x3 neighbouring blocks that lie in
// the image (and, if symmetric, within b pixels in each direction). All queries of a block share
// that window (a rectangle); the symmetric mask only sets some of its scores to -inf.
//
// Work is split into items (batch, block row, head). An item first copies the key rows its
// block row sees into a transposed "strip" (see Strip), then walks its queries; every loop over
// keys is then a contiguous SIMD loop. The forward writes only the item's own queries. The
// backward also adds into dk/dv of the block rows above and below, so it runs in three phases
// (block row mod 3): items of one phase touch disjoint key rows, hence no race and no per-thread
// copies of dk/dv. Sums over keys that give a D-vector (dq, dk, dv) run over the untransposed
// rows of k, dk, dv directly, vectorised along D. The bias gradient is summed per thread, then
// reduced.
//
// Probabilities are never stored: the forward saves the log-sum-exp of each query row and the
// backward recomputes p = exp(s - lse), with delta = rowsum(dO * O) as in FlashAttention.
//
// Low-precision inputs (bf16, fp16) are computed in float; the hot loops are compiled twice, for
// AVX2+FMA and for the baseline ISA, and chosen at run time.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#if defined(__GNUC__)
#define LOCALATTN_INLINE inline __attribute__((always_inline))
#else
#define LOCALATTN_INLINE inline
#endif

#if defined(__GNUC__) && defined(__x86_64__)
#define LOCALATTN_HAVE_AVX2_CLONE 1
#endif

namespace localattn {
namespace {

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
  const uint32_t bits = std::bit_cast<uint32_t>(x);
  const bool underflow = bits > kMinus87;
  const float clamped = std::bit_cast<float>(underflow ? kMinus87 : bits);
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
  const float result = p * std::bit_cast<float>((n + 127) << 23);
  return std::bit_cast<float>(std::bit_cast<uint32_t>(result) & (underflow ? 0u : ~0u));
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

template <typename scalar_t>
struct ForwardArgs {
  using acc_t = at::opmath_type<scalar_t>;
  Geometry g;
  const scalar_t *q, *k, *v;
  const acc_t* bias_t;  // rpb transposed to [heads, x-offset, y-offset]
  scalar_t* out;
  acc_t* lse;
  acc_t scale;
};

// Forward of the queries of items [begin, end), an item being (batch, block row, head).
template <typename scalar_t>
LOCALATTN_INLINE void forward_items(const ForwardArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry& g = a.g;
  const int64_t D = g.dim, b = g.block;
  Strip<acc_t> keys(g), values(g);
  std::vector<acc_t> probs(keys.stride), q_scaled(D);
  for (int64_t index = begin; index < end; ++index) {
    const Item it = item_at(g, index, g.block_rows(), 0, 1);
    const Window rows = block_window(g, it.block_row, 0);
    keys.gather(a.k, g, it.n, it.h, rows);
    values.gather(a.v, g, it.n, it.h, rows);
    const acc_t* bias_t = a.bias_t + it.h * g.table * g.table;
    for (int64_t y = it.block_row * b; y < std::min(g.height, (it.block_row + 1) * b); ++y) {
      for (int64_t x = 0; x < g.width; ++x) {
        const QueryAt qa(g, keys.rows, y, x);
        const int64_t query = g.pixel(it.n, y, x) + it.h * D;
        if (x + kPrefetchAhead < g.width) prefetch(a.q + query + kPrefetchAhead * g.heads * D, D);
        load_scaled(q_scaled.data(), a.q + query, a.scale, D);
        const acc_t max_score = query_scores(probs.data(), q_scaled.data(), keys, bias_t, g, qa);
        const acc_t sum = exp_shifted(probs.data(), max_score, qa.padded);
        const acc_t inv_sum = acc_t(1) / sum;
        for (int64_t d = 0; d < D; ++d) {
          const acc_t o = dot_lanes(probs.data(), values.feature(d) + qa.start, qa.padded);
          a.out[query + d] = static_cast<scalar_t>(o * inv_sum);
        }
        a.lse[query / D] = max_score + std::log(sum);
      }
    }
  }
}

template <typename scalar_t>
struct BackwardArgs {
  using acc_t = at::opmath_type<scalar_t>;
  Geometry g;
  const scalar_t *grad_out, *q, *k, *v, *out;
  const acc_t* bias_t;  // rpb transposed to [heads, x-offset, y-offset]
  const acc_t* lse;
  acc_t scale;
  acc_t *grad_q, *grad_k, *grad_v;  // accumulated in acc_t, cast by the caller
  acc_t* grad_bias_t;               // one transposed [heads, T, T] table per thread
};

// Per-thread buffers of the backward. p, dS, q * scale and dO are kept for every query of the
// current block, so that dK and dV are updated once per block (see add_to_keys).
template <typename acc_t>
struct BackwardWorkspace {
  Strip<acc_t> keys, values;
  int64_t row;       // stride of probs and grad_scores: a window, rounded up
  int64_t features;  // stride of q_scaled and grad_o: D rounded up to whole groups, zero-padded
  std::vector<acc_t> probs, grad_scores;  // [b*b][row]
  std::vector<acc_t> q_scaled, grad_o;    // [b*b][features]
  std::vector<int64_t> query;             // [b*b]: offset of the slot's query in q

  explicit BackwardWorkspace(const Geometry& g)
      : keys(g), values(g), row(round_up(9 * g.block * g.block, kLanes)),
        features(round_up(g.dim, kGroup * kLanes)),
        probs(g.block * g.block * row), grad_scores(g.block * g.block * row),
        q_scaled(g.block * g.block * features), grad_o(g.block * g.block * features),
        query(g.block * g.block) {}
};

// Row of key (y, kx) of the item's head in a [B, H, W, heads, D] tensor.
template <typename T>
LOCALATTN_INLINE T* key_row(T* tensor, const Geometry& g, const Item& it, int64_t y, int64_t kx) {
  return tensor + g.pixel(it.n, y, kx) + it.h * g.dim;
}

// dq[q] = scale * sum_j dS[q][j] * k_j over the window's keys, for kQueries queries of one block.
// Whole groups of kGroup * kLanes features go along the rows of k, vectorised over features (no
// horizontal sums), each load of k serving kQueries queries; the features past the last whole
// group, if any, go along the strip.
template <int64_t kQueries, typename scalar_t, typename acc_t>
LOCALATTN_INLINE void query_gradients(acc_t* const* grad_q, const acc_t* const* grad_s,
                                      const scalar_t* k, const Strip<acc_t>& keys,
                                      const Geometry& g, const Item& it, const QueryAt& block,
                                      acc_t scale) {
  constexpr int64_t kWidth = kGroup * kLanes;
  const int64_t whole = g.dim / kWidth * kWidth;
  for (int64_t c = 0; c < whole; c += kWidth) {
    acc_t sums[kQueries][kWidth] = {};
    for (int64_t kx = block.x0; kx < block.x1; ++kx) {
      const int64_t column = (kx - block.x0) * keys.rows;
      for (int64_t r = 0; r < keys.rows; ++r) {
        const scalar_t* key = key_row(k, g, it, keys.y0 + r, kx) + c;
        for (int64_t q = 0; q < kQueries; ++q) {
          add_scaled_group(sums[q], sums[q] + kLanes, sums[q] + 2 * kLanes, sums[q] + 3 * kLanes,
                           grad_s[q][column + r], key);
        }
      }
    }
    for (int64_t q = 0; q < kQueries; ++q) {
      for (int64_t d = 0; d < kWidth; ++d) grad_q[q][c + d] = scale * sums[q][d];
    }
  }
  for (int64_t q = 0; q < kQueries; ++q) {
    for (int64_t d = whole; d < g.dim; ++d) {
      grad_q[q][d] = scale * dot_lanes(grad_s[q], keys.feature(d) + block.start, block.padded);
    }
  }
}

// dq of the first `queries` slots of a block, two at a time.
template <typename scalar_t>
LOCALATTN_INLINE void block_query_gradients(const BackwardArgs<scalar_t>& a,
                                            BackwardWorkspace<at::opmath_type<scalar_t>>& ws,
                                            const Item& it, const QueryAt& block,
                                            int64_t queries) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto grad_q = [&](int64_t slot) { return a.grad_q + ws.query[slot]; };
  const auto grad_s = [&](int64_t slot) { return &ws.grad_scores[slot * ws.row]; };
  int64_t slot = 0;
  for (; slot + 2 <= queries; slot += 2) {
    acc_t* const out[2] = {grad_q(slot), grad_q(slot + 1)};
    const acc_t* const in[2] = {grad_s(slot), grad_s(slot + 1)};
    query_gradients<2>(out, in, a.k, ws.keys, a.g, it, block, a.scale);
  }
  if (slot < queries) {
    acc_t* const out = grad_q(slot);
    const acc_t* const in = grad_s(slot);
    query_gradients<1>(&out, &in, a.k, ws.keys, a.g, it, block, a.scale);
  }
}

// dst[k] += sum_q w[q][j + k] * coef[q] for the kKeys keys j, j + 1, ... of a block's window
// (dst[k] being the row of key j + k in dk or dv): sums in registers over the block's queries,
// each load of a coef chunk serving kKeys keys, then one add per row. coef rows are zero-padded
// to whole groups, so only the add back is cut at D.
template <int64_t kKeys, typename acc_t>
LOCALATTN_INLINE void add_to_rows(acc_t* const* dst, const acc_t* coef, int64_t coef_stride,
                                  const acc_t* w, int64_t w_stride, int64_t queries, int64_t j,
                                  int64_t dim) {
  constexpr int64_t kWidth = kGroup * kLanes;
  for (int64_t c = 0; c < dim; c += kWidth) {
    acc_t sums[kKeys][kWidth] = {};
    for (int64_t q = 0; q < queries; ++q) {
      for (int64_t k = 0; k < kKeys; ++k) {
        add_scaled_group(sums[k], sums[k] + kLanes, sums[k] + 2 * kLanes, sums[k] + 3 * kLanes,
                         w[q * w_stride + j + k], coef + q * coef_stride + c);
      }
    }
    for (int64_t k = 0; k < kKeys; ++k) add(dst[k] + c, sums[k], std::min(kWidth, dim - c));
  }
}

// dst_j += sum_q w[q][j] * coef[q] for the keys j of a block's window, dst_j being the row of key
// j in dk or dv (the phases keep other threads off it): the dK or dV update of a whole block,
// added to each row once, two keys at a time.
template <typename acc_t>
LOCALATTN_INLINE void add_to_keys(acc_t* dst, const acc_t* coef, int64_t coef_stride,
                                  const acc_t* w, int64_t w_stride, int64_t queries,
                                  const Geometry& g, const Item& it, const QueryAt& block,
                                  const Strip<acc_t>& keys) {
  const auto row = [&](int64_t j) {
    return key_row(dst, g, it, keys.y0 + j % keys.rows, block.x0 + j / keys.rows);
  };
  int64_t j = 0;
  for (; j + 2 <= block.count; j += 2) {
    acc_t* const rows[2] = {row(j), row(j + 1)};
    add_to_rows<2>(rows, coef, coef_stride, w, w_stride, queries, j, g.dim);
  }
  if (j < block.count) {
    acc_t* const last = row(j);
    add_to_rows<1>(&last, coef, coef_stride, w, w_stride, queries, j, g.dim);
  }
}

// Backward of the query in `slot` of its block: adds dS into the (transposed) bias gradient of
// the head, and leaves p, dS, q * scale, dO and the query's offset in the slot for
// block_query_gradients and add_to_keys.
template <typename scalar_t>
LOCALATTN_INLINE void backward_query(const BackwardArgs<scalar_t>& a,
                                     BackwardWorkspace<at::opmath_type<scalar_t>>& ws,
                                     const Item& it, const QueryAt& qa, int64_t slot,
                                     at::opmath_type<scalar_t>* grad_bias_t) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry& g = a.g;
  const int64_t D = g.dim, n = qa.padded;
  const int64_t query = g.pixel(it.n, qa.y, qa.x) + it.h * D;
  acc_t* q_scaled = &ws.q_scaled[slot * ws.features];
  acc_t* grad_o = &ws.grad_o[slot * ws.features];
  acc_t* probs = &ws.probs[slot * ws.row];
  acc_t* grad_s = &ws.grad_scores[slot * ws.row];
  load_scaled(q_scaled, a.q + query, a.scale, D);
  load_scaled(grad_o, a.grad_out + query, acc_t(1), D);
  acc_t delta = 0;  // rowsum(dO * O)
  for (int64_t d = 0; d < D; ++d) delta += grad_o[d] * static_cast<acc_t>(a.out[query + d]);
  query_scores(probs, q_scaled, ws.keys, a.bias_t + it.h * g.table * g.table, g, qa);
  exp_shifted(probs, a.lse[query / D], n);
  combine_features(grad_s, grad_o, ws.values, qa.start, n);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) grad_s[j] = probs[j] * (grad_s[j] - delta);
  ws.query[slot] = query;
  for (int64_t kx = qa.x0; kx < qa.x1; ++kx) {
    add(grad_bias_t + bias_column(g, qa, ws.keys.y0, kx), grad_s + (kx - qa.x0) * ws.keys.rows,
        ws.keys.rows);
  }
}

// Backward of the queries of items [begin, end) of the block rows `phase, phase + 3, ...`.
template <typename scalar_t>
LOCALATTN_INLINE void backward_items(
    const BackwardArgs<scalar_t>& a, int64_t phase, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry& g = a.g;
  const int64_t b = g.block, table_size = g.table * g.table;
  const int64_t rows_in_phase = (g.block_rows() - phase + 2) / 3;
  acc_t* grad_bias_t = a.grad_bias_t + at::get_thread_num() * g.heads * table_size;
  BackwardWorkspace<acc_t> ws(g);
  for (int64_t index = begin; index < end; ++index) {
    const Item it = item_at(g, index, rows_in_phase, phase, 3);
    const Window rows = block_window(g, it.block_row, 0);
    ws.keys.gather(a.k, g, it.n, it.h, rows);
    ws.values.gather(a.v, g, it.n, it.h, rows);
    const int64_t y_end = std::min(g.height, (it.block_row + 1) * b);
    for (int64_t block_x = 0; block_x < g.width; block_x += b) {
      const int64_t x_end = std::min(g.width, block_x + b);
      int64_t slot = 0;
      for (int64_t y = it.block_row * b; y < y_end; ++y) {
        for (int64_t x = block_x; x < x_end; ++x, ++slot) {
          if (x + b < g.width) {  // the same query of the next block
            const int64_t ahead = g.pixel(it.n, y, x + b) + it.h * g.dim;
            for (const scalar_t* t : {a.q, a.grad_out, a.out}) prefetch(t + ahead, g.dim);
          }
          backward_query(a, ws, it, QueryAt(g, ws.keys.rows, y, x), slot,
                         grad_bias_t + it.h * table_size);
        }
      }
      const QueryAt block(g, ws.keys.rows, it.block_row * b, block_x);
      block_query_gradients(a, ws, it, block, slot);
      add_to_keys(a.grad_v, ws.grad_o.data(), ws.features, ws.probs.data(), ws.row, slot, g, it,
                  block, ws.keys);
      add_to_keys(a.grad_k, ws.q_scaled.data(), ws.features, ws.grad_scores.data(), ws.row, slot,
                  g, it, block, ws.keys);
    }
  }
}

#ifdef LOCALATTN_HAVE_AVX2_CLONE
// The same loops compiled for AVX2+FMA: the helpers above are always_inline, so they are
// compiled again inside these functions with the wider instruction set.
template <typename scalar_t>
__attribute__((target("avx2,fma"))) void forward_items_avx2(
    const ForwardArgs<scalar_t>& a, int64_t begin, int64_t end) {
  forward_items(a, begin, end);
}

template <typename scalar_t>
__attribute__((target("avx2,fma"))) void backward_items_avx2(
    const BackwardArgs<scalar_t>& a, int64_t phase, int64_t begin, int64_t end) {
  backward_items(a, phase, begin, end);
}

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#endif

template <typename scalar_t>
void forward_dispatch(const ForwardArgs<scalar_t>& a, int64_t begin, int64_t end) {
#ifdef LOCALATTN_HAVE_AVX2_CLONE
  if (cpu_has_avx2()) return forward_items_avx2(a, begin, end);
#endif
  forward_items(a, begin, end);
}

template <typename scalar_t>
void backward_dispatch(const BackwardArgs<scalar_t>& a, int64_t phase, int64_t begin, int64_t end) {
#ifdef LOCALATTN_HAVE_AVX2_CLONE
  if (cpu_has_avx2()) return backward_items_avx2(a, phase, begin, end);
#endif
  backward_items(a, phase, begin, end);
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& rpb,
               int64_t block_size) {
  TORCH_CHECK(q.dim() == 5, "local_attention2d: q must be [B, H, W, heads, D], got ", q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(),
              "local_attention2d: q, k, v must have one shape, got ", q.sizes(), ", ", k.sizes(),
              ", ", v.sizes());
  TORCH_CHECK(block_size >= 1, "local_attention2d: block_size must be >= 1, got ", block_size);
  const int64_t table = 4 * block_size - 1;
  TORCH_CHECK(rpb.dim() == 3 && rpb.size(0) == q.size(3) && rpb.size(1) == table &&
                  rpb.size(2) == table,
              "local_attention2d: rpb must be [heads, 4b-1, 4b-1] = [", q.size(3), ", ", table,
              ", ", table, "], got ", rpb.sizes());
  for (const at::Tensor* t : {&q, &k, &v, &rpb}) {
    TORCH_CHECK(t->device().is_cpu(), "local_attention2d (CPU): all tensors must be on the CPU");
    TORCH_CHECK(t->scalar_type() == q.scalar_type(),
                "local_attention2d: q, k, v, rpb must share a dtype, got ", q.scalar_type(),
                " and ", t->scalar_type());
    TORCH_CHECK(t->is_contiguous(), "local_attention2d: q, k, v, rpb must be contiguous");
  }
}

Geometry geometry(const at::Tensor& q, int64_t block_size, bool symmetric) {
  return Geometry{q.size(0), q.size(1), q.size(2), q.size(3), q.size(4),
                  block_size, 4 * block_size - 1, symmetric};
}

at::ScalarType lse_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// rpb [heads, y-offset, x-offset] in the accumulation dtype, as [heads, x-offset, y-offset]: the
// kernels walk keys down the columns of a window.
at::Tensor transposed_bias(const at::Tensor& rpb) {
  return rpb.to(lse_dtype(rpb.scalar_type())).transpose(1, 2).contiguous();
}

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& q, const at::Tensor& k,
                                               const at::Tensor& v, const at::Tensor& rpb,
                                               int64_t block_size, double scale, bool symmetric) {
  check_qkv(q, k, v, rpb, block_size);
  const Geometry g = geometry(q, block_size, symmetric);
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({g.batch, g.height, g.width, g.heads},
                             q.options().dtype(lse_dtype(q.scalar_type())));
  if (q.numel() == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(),
                                  "local_attention2d_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor bias_t = transposed_bias(rpb);
    const ForwardArgs<scalar_t> args{g, q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                                     v.data_ptr<scalar_t>(), bias_t.data_ptr<acc_t>(),
                                     out.data_ptr<scalar_t>(), lse.data_ptr<acc_t>(),
                                     static_cast<acc_t>(scale)};
    at::parallel_for(0, g.batch * g.block_rows() * g.heads, 1, [&](int64_t begin, int64_t end) {
      forward_dispatch(args, begin, end);
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& rpb, const at::Tensor& out, const at::Tensor& lse, int64_t block_size,
    double scale, bool symmetric) {
  check_qkv(q, k, v, rpb, block_size);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(),
              "local_attention2d_backward: grad_out and out must have the shape of q ", q.sizes());
  TORCH_CHECK(lse.sizes() == q.sizes().slice(0, 4) && lse.scalar_type() == lse_dtype(q.scalar_type()),
              "local_attention2d_backward: lse must be [B, H, W, heads] in ",
              lse_dtype(q.scalar_type()), ", got ", lse.sizes(), " in ", lse.scalar_type());
  for (const at::Tensor* t : {&grad_out, &out, &lse}) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous(),
                "local_attention2d_backward: grad_out, out, lse must be contiguous CPU tensors");
  }
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              "local_attention2d_backward: grad_out and out must have the dtype of q");
  const Geometry g = geometry(q, block_size, symmetric);
  const auto acc_options = q.options().dtype(lse_dtype(q.scalar_type()));
  at::Tensor grad_q = at::empty(q.sizes(), acc_options);
  at::Tensor grad_k = at::zeros(q.sizes(), acc_options);
  at::Tensor grad_v = at::zeros(q.sizes(), acc_options);
  const int64_t threads = at::get_num_threads();
  at::Tensor grad_bias_t_per_thread = at::zeros({threads, g.heads, g.table, g.table}, acc_options);
  if (q.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(),
                                    "local_attention2d_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const at::Tensor bias_t = transposed_bias(rpb);
      const BackwardArgs<scalar_t> args{
          g, grad_out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
          v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), bias_t.data_ptr<acc_t>(),
          lse.data_ptr<acc_t>(), static_cast<acc_t>(scale), grad_q.data_ptr<acc_t>(),
          grad_k.data_ptr<acc_t>(), grad_v.data_ptr<acc_t>(), grad_bias_t_per_thread.data_ptr<acc_t>()};
      for (int64_t phase = 0; phase < std::min<int64_t>(3, g.block_rows()); ++phase) {
        const int64_t rows_in_phase = (g.block_rows() - phase + 2) / 3;
        at::parallel_for(0, g.batch * rows_in_phase * g.heads, 1, [&](int64_t begin, int64_t end) {
          backward_dispatch(args, phase, begin, end);
        });
      }
    });
  }
  const auto dtype = q.scalar_type();
  return {grad_q.to(dtype), grad_k.to(dtype), grad_v.to(dtype),
          grad_bias_t_per_thread.sum(0).transpose(1, 2).contiguous().to(dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(localattn, CPU, m) {
  m.impl("local_attention2d_forward", &forward_cpu);
  m.impl("local_attention2d_backward", &backward_cpu);
}

}  // namespace localattn
