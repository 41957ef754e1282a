// Single-image kernels of the paper's post-processing (sections 5.2, 7.2, 7.3; Algorithms 2-4).
// Every kernel works on one contiguous row-major image; ops.cpp batches them with at::parallel_for.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>

#include "bit_image.h"

namespace unet_postprocess {

// A pixel is boundary where any 4-neighbour inside the image has another label (the paper's
// symmetric discrete gradient), so boundaries between two regions are two cells thick.
template <typename label_t>
void boundary_from_labels_image(const label_t* labels, int64_t height, int64_t width, bool* out);

// How a thresholded boundary is readied for SEGMENT.
enum class BoundaryMethod {
  kPaper,      // prepare_boundary_image
  kCloseGaps,  // close_gaps_image
};

// The paper author's preparation: keep boundary pixels that belong to a 2x2 block of boundary
// pixels, add a frame around the image, dilate by the square of radius `iterations` and erode by
// the diamond of that radius, clear the pixels whose 12 neighbours at city-block distance 1-2 are
// all set (re-opening filled blobs; outside counts as set), and OR with the 2x2-filtered, framed
// mask. Iterations beyond max(height, width) count as max(height, width).
void prepare_boundary_image(const bool* boundary, int64_t height, int64_t width, int64_t iterations, bool* out);

// Morphological closing: `iterations` dilations alternating the 8- and the 4-neighbourhood, then
// as many erosions, computed as if the image were surrounded by non-boundary pixels. Never
// removes a boundary pixel. Iterations beyond max(height, width) count as max(height, width).
void close_gaps_image(const bool* boundary, int64_t height, int64_t width, int64_t iterations, bool* out);

// FLOOD + SEGMENT (Algorithms 2-3). Writes region ids 0.. in scan order of their first pixel and
// -1 where a pixel belongs to no region of more than `min_size` pixels. Returns the region count.
int32_t segment_image(const bool* boundary, int64_t height, int64_t width, int64_t min_size, int32_t* regions);

// segment_image on a packed boundary.
int32_t segment_bits(const BitImage& boundary, int64_t min_size, int32_t* regions);

// boundary_prob >= threshold (rejecting NaN and infinities), readied by `method` with
// `gap_iterations`, then segment_image. Returns the region count.
template <typename prob_t>
int32_t boundary_regions_image(
    const prob_t* boundary_prob, int64_t height, int64_t width, double threshold, BoundaryMethod method,
    int64_t gap_iterations, int64_t min_size, int32_t* regions);

// DUST_FILL keeps regions x labels statistics (twice: sums and normalized); beyond this many, or
// this many labels, it refuses the image before allocating anything (also the (regions + labels)
// x labels statistics it returns on request). Also keeps mask ids (regions + labels) within int32.
constexpr int64_t kMaxStatistics = int64_t(1) << 28;

// Where dust_fill_image writes. `labels` [height, width] always; `masks` [height, width] and
// `statistics` [M + L, L] (M = the largest region id + 1) when not null: each pixel's final mask
// (region r < M, or M + l for label l's promoted pixels) and the statistics Algorithm 4 ends with
// (a region's pooled probability sums, in double; a promoted mask's one-hot row). `visits` when
// not null: how many visits the relaxation made (each computes a waiting pixel's distances to
// decide whether it joins a mask; every waiting pixel joins at one), a measure of its work.
struct DustFillOutput {
  int64_t* labels;
  int32_t* masks = nullptr;
  double* statistics = nullptr;
  int64_t* visits = nullptr;
};

// DUST_FILL (Algorithm 4). probs is [labels, height, width]; regions as written by segment_image.
// An image where nothing is mapped after promotion (no region, no confident pixel) gets the
// argmax, each pixel in its most probable label's promoted mask.
template <typename prob_t>
void dust_fill_image(
    const prob_t* probs,
    const int32_t* regions,
    int64_t num_labels,
    int64_t height,
    int64_t width,
    const double* new_threshold,
    double join_threshold,
    double impatience,
    const DustFillOutput& out);

// Label of highest probability per pixel (the first one on ties). probs is [labels, height, width].
template <typename prob_t>
void argmax_image(const prob_t* probs, int64_t num_labels, int64_t pixels, int64_t* out);

// Probabilities must be finite and non-negative. Kernels AND this over every value they read and
// check once, so the test costs no branch in their loops.
template <typename prob_t>
inline bool is_probability(prob_t value) {
  return (value >= prob_t(0)) & (value <= std::numeric_limits<prob_t>::max());
}

inline void check_probabilities(bool valid) {
  TORCH_CHECK_VALUE(valid, "probs: expected finite, non-negative probabilities, found NaN, infinite or negative values");
}

}  // namespace unet_postprocess
