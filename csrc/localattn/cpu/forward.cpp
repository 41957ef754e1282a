// Forward of the CPU kernel (see local_attention_cpu.h): each item (batch, block row, head)
// gathers the key and value rows its block row sees into strips, then computes the softmax and
// the weighted sum of every query of the block row, and writes only those queries and their
// log-sum-exp.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "local_attention_cpu.h"

namespace localattn::cpu {
namespace {

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

#ifdef LOCALATTN_HAVE_AVX2_CLONE
// The same loops compiled for AVX2+FMA.
template <typename scalar_t>
__attribute__((target("avx2,fma"))) void forward_items_avx2(
    const ForwardArgs<scalar_t>& a, int64_t begin, int64_t end) {
  forward_items(a, begin, end);
}
#endif

template <typename scalar_t>
void forward_dispatch(const ForwardArgs<scalar_t>& a, int64_t begin, int64_t end) {
#ifdef LOCALATTN_HAVE_AVX2_CLONE
  if (cpu_has_avx2()) return forward_items_avx2(a, begin, end);
#endif
  forward_items(a, begin, end);
}

}  // namespace

void launch_forward(const Geometry& g, const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& v, const at::Tensor& bias_t, double scale, at::Tensor& out,
                    at::Tensor& lse) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(),
                                  "local_attention2d_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ForwardArgs<scalar_t> args{g, q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                                     v.data_ptr<scalar_t>(), bias_t.data_ptr<acc_t>(),
                                     out.data_ptr<scalar_t>(), lse.data_ptr<acc_t>(),
                                     static_cast<acc_t>(scale)};
    at::parallel_for(0, g.batch * g.block_rows() * g.heads, 1, [&](int64_t begin, int64_t end) {
      forward_dispatch(args, begin, end);
    });
  });
}

}  // namespace localattn::cpu
