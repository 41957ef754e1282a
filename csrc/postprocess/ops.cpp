// Schemas and CPU kernels of the unet post-processing ops. Every op takes a batch: label maps and
// boundaries (B, H, W), probabilities (B, L, H, W); images run in parallel with at::parallel_for
// (torch.ops releases the GIL). unet/postprocess.py validates first and documents the API; the
// checks here guard direct torch.ops callers with the same messages.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "postprocess.h"

namespace unet_postprocess {
namespace {

// More relaxation rounds than this for a pixel to join any mask means the caller's parameters
// make DUST_FILL run (practically) forever.
constexpr double kMaxRelaxationRounds = 10000.0;

void check_shape(const at::Tensor& t, const char* name, int64_t dims, const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == dims, name, ": expected a ", layout, " tensor, got shape ", t.sizes());
  TORCH_CHECK_VALUE(
      t.size(-2) * t.size(-1) < std::numeric_limits<int32_t>::max(),
      name, ": images larger than 2^31 pixels are not supported, got ", t.sizes());
}

void check_dtype(const at::Tensor& t, const char* name, std::initializer_list<at::ScalarType> allowed) {
  for (const at::ScalarType type : allowed) {
    if (t.scalar_type() == type) return;
  }
  TORCH_CHECK_TYPE(false, name, ": expected dtype in ", c10::ArrayRef<at::ScalarType>(allowed), ", got ", t.scalar_type());
}

void check_probs(const at::Tensor& probs) {
  check_shape(probs, "probs", 4, "(B, L, H, W)");
  check_dtype(probs, "probs", {at::kFloat, at::kDouble});
  TORCH_CHECK_VALUE(probs.size(1) > 0, "probs: expected at least one label, got shape ", probs.sizes());
}

void check_image_map(const at::Tensor& map, const char* name, const at::Tensor& probs) {
  check_shape(map, name, 3, "(B, H, W)");
  TORCH_CHECK_VALUE(
      map.size(0) == probs.size(0) && map.size(1) == probs.size(2) && map.size(2) == probs.size(3),
      name, ": expected shape (B, H, W) matching probs ", probs.sizes(), ", got ", map.sizes());
}

void check_count(int64_t value, const char* name) {
  TORCH_CHECK_VALUE(value >= 0, name, ": expected a non-negative integer, got ", value);
}

void check_dust_fill_parameters(
    const at::Tensor& new_threshold, int64_t num_labels, double join_threshold, double impatience) {
  TORCH_CHECK_VALUE(
      new_threshold.dim() == 1 && new_threshold.size(0) == num_labels,
      "new_threshold: expected one threshold per label (", num_labels, "), got shape ", new_threshold.sizes());
  check_dtype(new_threshold, "new_threshold", {at::kDouble});
  TORCH_CHECK_VALUE(
      (new_threshold >= 0).all().item<bool>(), "new_threshold: expected non-negative thresholds, got ", new_threshold);
  TORCH_CHECK_VALUE(
      std::isfinite(join_threshold) && join_threshold > 0,
      "join_threshold: expected a finite value > 0, got ", join_threshold);
  TORCH_CHECK_VALUE(
      std::isfinite(impatience) && impatience > 1, "impatience: expected a finite value > 1, got ", impatience);
  // Normalized probability vectors are at most 2 apart in L1: after this many rounds any
  // bordering pixel joins.
  const double rounds = std::log(2.0 / join_threshold) / std::log(impatience);
  TORCH_CHECK_VALUE(
      rounds <= kMaxRelaxationRounds, "join_threshold, impatience: a pixel may need ", rounds,
      " relaxation rounds (log(2/join_threshold)/log(impatience)), expected at most ", kMaxRelaxationRounds);
}

// Calls fn(b) for each image b of the batch, images spread over the intra-op threads.
template <typename Fn>
void for_each_image(int64_t batch, const Fn& fn) {
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) fn(b);
  });
}

at::Tensor boundary_from_labels(const at::Tensor& labels) {
  check_shape(labels, "labels", 3, "(B, H, W)");
  check_dtype(labels, "labels", {at::kByte, at::kChar, at::kShort, at::kInt, at::kLong});
  const at::Tensor in = labels.contiguous();
  at::Tensor out = at::empty(in.sizes(), in.options().dtype(at::kBool));
  const int64_t H = in.size(1), W = in.size(2);
  AT_DISPATCH_INTEGRAL_TYPES(in.scalar_type(), "boundary_from_labels", [&] {
    const scalar_t* src = in.const_data_ptr<scalar_t>();
    bool* dst = out.data_ptr<bool>();
    for_each_image(in.size(0), [&](int64_t b) { boundary_from_labels_image(src + b * H * W, H, W, dst + b * H * W); });
  });
  return out;
}

// A bool (B, H, W) boundary through a per-image morphology kernel taking `iterations`.
using MorphologyKernel = void (*)(const bool*, int64_t, int64_t, int64_t, bool*);

at::Tensor apply_morphology(const at::Tensor& boundary, int64_t iterations, MorphologyKernel kernel) {
  check_shape(boundary, "boundary", 3, "(B, H, W)");
  check_dtype(boundary, "boundary", {at::kBool});
  check_count(iterations, "iterations");
  const at::Tensor in = boundary.contiguous();
  at::Tensor out = at::empty_like(in);
  const int64_t H = in.size(1), W = in.size(2);
  const bool* src = in.const_data_ptr<bool>();
  bool* dst = out.data_ptr<bool>();
  for_each_image(in.size(0), [&](int64_t b) { kernel(src + b * H * W, H, W, iterations, dst + b * H * W); });
  return out;
}

at::Tensor close_gaps(const at::Tensor& boundary, int64_t iterations) {
  return apply_morphology(boundary, iterations, close_gaps_image);
}

at::Tensor prepare_boundary(const at::Tensor& boundary, int64_t iterations) {
  return apply_morphology(boundary, iterations, prepare_boundary_image);
}

std::tuple<at::Tensor, at::Tensor> segment(const at::Tensor& boundary, int64_t min_size) {
  check_shape(boundary, "boundary", 3, "(B, H, W)");
  check_dtype(boundary, "boundary", {at::kBool});
  check_count(min_size, "min_size");
  const at::Tensor in = boundary.contiguous();
  at::Tensor regions = at::empty(in.sizes(), in.options().dtype(at::kInt));
  at::Tensor counts = at::empty({in.size(0)}, in.options().dtype(at::kLong));
  const int64_t H = in.size(1), W = in.size(2);
  const bool* src = in.const_data_ptr<bool>();
  int32_t* dst = regions.data_ptr<int32_t>();
  int64_t* count = counts.data_ptr<int64_t>();
  for_each_image(in.size(0), [&](int64_t b) { count[b] = segment_image(src + b * H * W, H, W, min_size, dst + b * H * W); });
  return {regions, counts};
}

BoundaryMethod boundary_method_named(c10::string_view name) {
  if (name == "paper") return BoundaryMethod::kPaper;
  if (name == "close_gaps") return BoundaryMethod::kCloseGaps;
  TORCH_CHECK_VALUE(false, "boundary_method: expected 'paper' or 'close_gaps', got '", name, "'");
}

at::Tensor boundary_regions(
    const at::Tensor& boundary_prob,
    double boundary_threshold,
    c10::string_view boundary_method,
    int64_t gap_iterations,
    int64_t min_size) {
  check_shape(boundary_prob, "boundary_prob", 3, "(B, H, W)");
  check_dtype(boundary_prob, "boundary_prob", {at::kFloat, at::kDouble});
  TORCH_CHECK_VALUE(std::isfinite(boundary_threshold), "boundary_threshold: expected a finite value, got ", boundary_threshold);
  const BoundaryMethod method = boundary_method_named(boundary_method);
  check_count(gap_iterations, "gap_iterations");
  check_count(min_size, "min_size");
  const at::Tensor in = boundary_prob.contiguous();
  at::Tensor regions = at::empty(in.sizes(), in.options().dtype(at::kInt));
  const int64_t H = in.size(1), W = in.size(2);
  AT_DISPATCH_FLOATING_TYPES(in.scalar_type(), "boundary_regions", [&] {
    const scalar_t* src = in.const_data_ptr<scalar_t>();
    int32_t* dst = regions.data_ptr<int32_t>();
    for_each_image(in.size(0), [&](int64_t b) {
      boundary_regions_image(src + b * H * W, H, W, boundary_threshold, method, gap_iterations, min_size, dst + b * H * W);
    });
  });
  return regions;
}

at::Tensor argmax_labels(const at::Tensor& probs) {
  check_probs(probs);
  const at::Tensor in = probs.contiguous();
  const int64_t B = in.size(0), L = in.size(1), HW = in.size(2) * in.size(3);
  at::Tensor out = at::empty({B, in.size(2), in.size(3)}, in.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(in.scalar_type(), "argmax_labels", [&] {
    const scalar_t* src = in.const_data_ptr<scalar_t>();
    int64_t* dst = out.data_ptr<int64_t>();
    for_each_image(B, [&](int64_t b) { argmax_image(src + b * L * HW, L, HW, dst + b * HW); });
  });
  return out;
}

// The largest region id + 1 of each image: the number of region statistics DUST_FILL keeps.
std::vector<int64_t> region_counts(const at::Tensor& regions) {
  const int64_t B = regions.size(0), HW = regions.size(1) * regions.size(2);
  const int32_t* ids = regions.const_data_ptr<int32_t>();
  std::vector<int64_t> counts(B);
  for (int64_t b = 0; b < B; ++b) counts[b] = HW == 0 ? 0 : int64_t(*std::max_element(ids + b * HW, ids + (b + 1) * HW)) + 1;
  return counts;
}

// DUST_FILL over the batch: the labels, and with `with_masks` each pixel's final mask and each
// image's (M + L, L) statistics (float64; both empty otherwise). `visits`, when not null, gets
// each image's count of relaxation visits (int64 (B,)).
std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> run_dust_fill(
    const at::Tensor& probs,
    const at::Tensor& regions,
    const at::Tensor& new_threshold,
    double join_threshold,
    double impatience,
    bool with_masks,
    at::Tensor* visits = nullptr) {
  check_probs(probs);
  check_image_map(regions, "regions", probs);
  check_dtype(regions, "regions", {at::kInt});
  check_dust_fill_parameters(new_threshold, probs.size(1), join_threshold, impatience);
  const at::Tensor p = probs.contiguous(), r = regions.contiguous(), thresholds = new_threshold.contiguous();
  const int64_t B = p.size(0), L = p.size(1), H = p.size(2), W = p.size(3);
  at::Tensor labels = at::empty({B, H, W}, p.options().dtype(at::kLong));
  at::Tensor masks = at::empty({with_masks ? B : 0, H, W}, p.options().dtype(at::kInt));
  std::vector<at::Tensor> statistics;
  if (with_masks) {
    for (const int64_t M : region_counts(r)) {
      TORCH_CHECK_VALUE(
          L <= kMaxStatistics && (M + L) * L <= kMaxStatistics, "dust_fill: return_masks: ", M, " regions + ", L,
          " labels x ", L, " labels of statistics are more than the ", kMaxStatistics, " supported");
      statistics.push_back(at::empty({M + L, L}, p.options().dtype(at::kDouble)));
    }
  }
  if (visits) *visits = at::empty({B}, p.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "dust_fill", [&] {
    const scalar_t* src = p.const_data_ptr<scalar_t>();
    const int32_t* reg = r.const_data_ptr<int32_t>();
    for_each_image(B, [&](int64_t b) {
      DustFillOutput out{labels.data_ptr<int64_t>() + b * H * W};
      if (with_masks) {
        out.masks = masks.data_ptr<int32_t>() + b * H * W;
        out.statistics = statistics[b].data_ptr<double>();
      }
      if (visits) out.visits = visits->data_ptr<int64_t>() + b;
      dust_fill_image(src + b * L * H * W, reg + b * H * W, L, H, W, thresholds.const_data_ptr<double>(),
                      join_threshold, impatience, out);
    });
  });
  return {labels, masks, statistics};
}

at::Tensor dust_fill(
    const at::Tensor& probs,
    const at::Tensor& regions,
    const at::Tensor& new_threshold,
    double join_threshold,
    double impatience) {
  return std::get<0>(run_dust_fill(probs, regions, new_threshold, join_threshold, impatience, false));
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> dust_fill_masks(
    const at::Tensor& probs,
    const at::Tensor& regions,
    const at::Tensor& new_threshold,
    double join_threshold,
    double impatience) {
  return run_dust_fill(probs, regions, new_threshold, join_threshold, impatience, true);
}

// For tests and measurements: how many visits DUST_FILL's relaxation makes on each image.
at::Tensor dust_fill_visits(
    const at::Tensor& probs,
    const at::Tensor& regions,
    const at::Tensor& new_threshold,
    double join_threshold,
    double impatience) {
  at::Tensor visits;
  run_dust_fill(probs, regions, new_threshold, join_threshold, impatience, false, &visits);
  return visits;
}

}  // namespace
}  // namespace unet_postprocess

TORCH_LIBRARY(unet, m) {
  m.def("boundary_from_labels(Tensor labels) -> Tensor");
  m.def("close_gaps(Tensor boundary, int iterations) -> Tensor");
  m.def("prepare_boundary(Tensor boundary, int iterations) -> Tensor");
  m.def("segment(Tensor boundary, int min_size) -> (Tensor regions, Tensor counts)");
  m.def(
      "boundary_regions(Tensor boundary_prob, float boundary_threshold, str boundary_method, int gap_iterations, "
      "int min_size) -> Tensor");
  m.def("argmax_labels(Tensor probs) -> Tensor");
  m.def(
      "dust_fill(Tensor probs, Tensor regions, Tensor new_threshold, float join_threshold, "
      "float impatience) -> Tensor");
  m.def(
      "dust_fill_masks(Tensor probs, Tensor regions, Tensor new_threshold, float join_threshold, "
      "float impatience) -> (Tensor labels, Tensor masks, Tensor[] statistics)");
  m.def(
      "_dust_fill_visits(Tensor probs, Tensor regions, Tensor new_threshold, float join_threshold, "
      "float impatience) -> Tensor");
}

TORCH_LIBRARY_IMPL(unet, CPU, m) {
  using namespace unet_postprocess;
  m.impl("boundary_from_labels", &boundary_from_labels);
  m.impl("close_gaps", &close_gaps);
  m.impl("prepare_boundary", &prepare_boundary);
  m.impl("segment", &segment);
  m.impl("boundary_regions", &boundary_regions);
  m.impl("argmax_labels", &argmax_labels);
  m.impl("dust_fill", &dust_fill);
  m.impl("dust_fill_masks", &dust_fill_masks);
  m.impl("_dust_fill_visits", &dust_fill_visits);
}
