// Backward of the CPU kernel (see local_attention_cpu.h). Each item (batch, block row, head)
// recomputes the probabilities of its queries from the saved log-sum-exp, writes their dq, and
// adds into dk/dv of the key rows it sees: its own block row and the ones above and below. So
// the items run in three phases (block row mod 3): items of one phase touch disjoint key rows,
// hence no race and no per-thread copies of dk/dv. Sums over keys that give a D-vector (dq, dk,
// dv) run over the untransposed rows of k, dk, dv directly, vectorised along D. The bias
// gradient is summed per thread, then reduced by the caller.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "local_attention_cpu.h"

namespace localattn::cpu {
namespace {

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
// The same loops compiled for AVX2+FMA.
template <typename scalar_t>
__attribute__((target("avx2,fma"))) void backward_items_avx2(
    const BackwardArgs<scalar_t>& a, int64_t phase, int64_t begin, int64_t end) {
  backward_items(a, phase, begin, end);
}
#endif

template <typename scalar_t>
void backward_dispatch(const BackwardArgs<scalar_t>& a, int64_t phase, int64_t begin, int64_t end) {
#ifdef LOCALATTN_HAVE_AVX2_CLONE
  if (cpu_has_avx2()) return backward_items_avx2(a, phase, begin, end);
#endif
  backward_items(a, phase, begin, end);
}

}  // namespace

void launch_backward(const Geometry& g, const at::Tensor& grad_out, const at::Tensor& q,
                     const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                     const at::Tensor& bias_t, const at::Tensor& lse, double scale,
                     at::Tensor& grad_q, at::Tensor& grad_k, at::Tensor& grad_v,
                     at::Tensor& grad_bias_t_per_thread) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(),
                                  "local_attention2d_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
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

}  // namespace localattn::cpu
