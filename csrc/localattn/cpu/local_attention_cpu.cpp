// CPU kernels of localattn::local_attention2d_forward / _backward (schemas in ../local_attention.cpp,
// contract in shared/design/local-attention.md).
//
// Query (y, x) of block (y/b, x/b) attends to the keys of the 3x3 neighbouring blocks that lie in
// the image (and, if symmetric, within b pixels in each direction); that key set is always a
// rectangle, so every loop below walks a rectangle of key pixels.
//
// Work is split into items (batch, block row, head). The forward writes only the item's own
// queries. The backward also scatters into dk/dv of the block rows above and below, so it runs
// in three phases (block row mod 3): items of one phase touch disjoint key rows, hence no race
// and no per-thread copies of dk/dv. The bias gradient is summed per thread, then reduced.
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

LOCALATTN_INLINE Window key_window(const Geometry& g, int64_t y, int64_t x) {
  const int64_t b = g.block;
  const int64_t block_y = y / b * b, block_x = x / b * b;
  Window w{std::max<int64_t>(0, block_y - b), std::min(g.height, block_y + 2 * b),
           std::max<int64_t>(0, block_x - b), std::min(g.width, block_x + 2 * b)};
  if (g.symmetric) {
    w.y0 = std::max(w.y0, y - b);
    w.y1 = std::min(w.y1, y + b + 1);
    w.x0 = std::max(w.x0, x - b);
    w.x1 = std::min(w.x1, x + b + 1);
  }
  return w;
}

template <typename acc_t, typename scalar_t>
LOCALATTN_INLINE acc_t dot(const acc_t* a, const scalar_t* b, int64_t n) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += a[i] * static_cast<acc_t>(b[i]);
  return sum;
}

// y += alpha * x
template <typename acc_t, typename scalar_t>
LOCALATTN_INLINE void axpy(acc_t* y, acc_t alpha, const scalar_t* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * static_cast<acc_t>(x[i]);
}

template <typename acc_t, typename scalar_t>
LOCALATTN_INLINE void load(acc_t* dst, const scalar_t* src, acc_t factor, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = factor * static_cast<acc_t>(src[i]);
}

template <typename scalar_t>
struct ForwardArgs {
  Geometry g;
  const scalar_t *q, *k, *v, *rpb;
  scalar_t* out;
  at::opmath_type<scalar_t>* lse;
  at::opmath_type<scalar_t> scale;
};

// Forward of the queries of items [begin, end), an item being (batch, block row, head).
template <typename scalar_t>
LOCALATTN_INLINE void forward_items(const ForwardArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry& g = a.g;
  const int64_t D = g.dim, b = g.block, T = g.table;
  std::vector<acc_t> scores(9 * b * b), q_scaled(D), acc(D);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t h = item % g.heads;
    const int64_t block_row = item / g.heads % g.block_rows();
    const int64_t n = item / g.heads / g.block_rows();
    const scalar_t* bias = a.rpb + h * T * T;
    for (int64_t y = block_row * b; y < std::min(g.height, (block_row + 1) * b); ++y) {
      for (int64_t x = 0; x < g.width; ++x) {
        const int64_t query = g.pixel(n, y, x) + h * D;
        const Window w = key_window(g, y, x);
        load(q_scaled.data(), a.q + query, a.scale, D);
        acc_t max_score = -std::numeric_limits<acc_t>::infinity();
        int64_t count = 0;
        for (int64_t ky = w.y0; ky < w.y1; ++ky) {
          const scalar_t* bias_row = bias + (ky - y + 2 * b - 1) * T + 2 * b - 1 - x;
          for (int64_t kx = w.x0; kx < w.x1; ++kx) {
            const acc_t s = dot(q_scaled.data(), a.k + g.pixel(n, ky, kx) + h * D, D) +
                static_cast<acc_t>(bias_row[kx]);
            scores[count++] = s;
            max_score = std::max(max_score, s);
          }
        }
        acc_t sum = 0;
        for (int64_t i = 0; i < count; ++i) {
          scores[i] = std::exp(scores[i] - max_score);
          sum += scores[i];
        }
        std::fill(acc.begin(), acc.end(), acc_t(0));
        count = 0;
        for (int64_t ky = w.y0; ky < w.y1; ++ky) {
          for (int64_t kx = w.x0; kx < w.x1; ++kx) {
            axpy(acc.data(), scores[count++], a.v + g.pixel(n, ky, kx) + h * D, D);
          }
        }
        const acc_t inv_sum = acc_t(1) / sum;
        for (int64_t d = 0; d < D; ++d) a.out[query + d] = static_cast<scalar_t>(acc[d] * inv_sum);
        a.lse[query / D] = max_score + std::log(sum);
      }
    }
  }
}

template <typename scalar_t>
struct BackwardArgs {
  using acc_t = at::opmath_type<scalar_t>;
  Geometry g;
  const scalar_t *grad_out, *q, *k, *v, *rpb, *out;
  const acc_t* lse;
  acc_t scale;
  acc_t *grad_q, *grad_k, *grad_v;  // accumulated in acc_t, cast by the caller
  acc_t* grad_rpb;                  // one [heads, T, T] table per thread
};

// Backward of the queries of items [begin, end) of the block rows `phase, phase + 3, ...`.
template <typename scalar_t>
LOCALATTN_INLINE void backward_items(
    const BackwardArgs<scalar_t>& a, int64_t phase, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry& g = a.g;
  const int64_t D = g.dim, b = g.block, T = g.table;
  const int64_t rows_in_phase = (g.block_rows() - phase + 2) / 3;
  acc_t* grad_rpb = a.grad_rpb + at::get_thread_num() * g.heads * T * T;
  std::vector<acc_t> q_scaled(D), grad_o(D), grad_q(D);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t h = item % g.heads;
    const int64_t block_row = phase + 3 * (item / g.heads % rows_in_phase);
    const int64_t n = item / g.heads / rows_in_phase;
    const scalar_t* bias = a.rpb + h * T * T;
    acc_t* grad_bias = grad_rpb + h * T * T;
    for (int64_t y = block_row * b; y < std::min(g.height, (block_row + 1) * b); ++y) {
      for (int64_t x = 0; x < g.width; ++x) {
        const int64_t query = g.pixel(n, y, x) + h * D;
        const Window w = key_window(g, y, x);
        load(q_scaled.data(), a.q + query, a.scale, D);
        load(grad_o.data(), a.grad_out + query, acc_t(1), D);
        std::fill(grad_q.begin(), grad_q.end(), acc_t(0));
        const acc_t delta = dot(grad_o.data(), a.out + query, D);
        const acc_t lse = a.lse[query / D];
        for (int64_t ky = w.y0; ky < w.y1; ++ky) {
          const int64_t offset_row = (ky - y + 2 * b - 1) * T + 2 * b - 1 - x;
          for (int64_t kx = w.x0; kx < w.x1; ++kx) {
            const int64_t key = g.pixel(n, ky, kx) + h * D;
            const acc_t s = dot(q_scaled.data(), a.k + key, D) +
                static_cast<acc_t>(bias[offset_row + kx]);
            const acc_t p = std::exp(s - lse);
            const acc_t grad_s = p * (dot(grad_o.data(), a.v + key, D) - delta);
            axpy(a.grad_v + key, p, grad_o.data(), D);
            axpy(a.grad_k + key, grad_s, q_scaled.data(), D);
            axpy(grad_q.data(), grad_s, a.k + key, D);
            grad_bias[offset_row + kx] += grad_s;
          }
        }
        load(a.grad_q + query, grad_q.data(), a.scale, D);
      }
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
    const ForwardArgs<scalar_t> args{g, q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                                     v.data_ptr<scalar_t>(), rpb.data_ptr<scalar_t>(),
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
  at::Tensor grad_rpb_per_thread = at::zeros({threads, g.heads, g.table, g.table}, acc_options);
  if (q.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(),
                                    "local_attention2d_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const BackwardArgs<scalar_t> args{
          g, grad_out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
          v.data_ptr<scalar_t>(), rpb.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
          lse.data_ptr<acc_t>(), static_cast<acc_t>(scale), grad_q.data_ptr<acc_t>(),
          grad_k.data_ptr<acc_t>(), grad_v.data_ptr<acc_t>(), grad_rpb_per_thread.data_ptr<acc_t>()};
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
          grad_rpb_per_thread.sum(0).to(dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(localattn, CPU, m) {
  m.impl("local_attention2d_forward", &forward_cpu);
  m.impl("local_attention2d_backward", &backward_cpu);
}

}  // namespace localattn
