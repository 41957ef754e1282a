// DUST_FILL (paper section 7.3, Algorithm 4) and the plain argmax baseline.
//
// Masks 0..M-1 are the regions of SEGMENT; masks M..M+L-1 collect the promoted pixels of each
// label and keep one-hot statistics. (The pseudo-code's `mapping[s, t] <- label` for a promoted
// pixel is read as `M + label`, the mask it has just set.) All arithmetic is in double, in a fixed
// order (sums run over labels 0..L-1, statistics accumulate pixels in the order they join, a
// vector is normalized by multiplying with the reciprocal of its sum, or zero when the sum is
// zero), which tests/postprocess_reference.py reproduces exactly.
#include "postprocess.h"

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

namespace unet_postprocess {
namespace {

constexpr int32_t kNoNeighbour = -2;  // no 4-neighbour belongs to a mask yet
constexpr int32_t kNoMatch = -1;      // neighbours in masks, none close enough

struct Pending {
  int32_t y, x;
  double patience;
};

// Scales `values` to sum 1, or to zeros when they sum to 0.
void normalize(const double* values, int64_t n, double* out) {
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) total += values[i];
  const double inverse = total > 0.0 ? 1.0 / total : 0.0;
  for (int64_t i = 0; i < n; ++i) out[i] = values[i] * inverse;
}

double l1_distance(const double* a, const double* b, int64_t n) {
  double d = 0.0;
  for (int64_t i = 0; i < n; ++i) d += std::abs(a[i] - b[i]);
  return d;
}

template <typename prob_t>
class DustFill {
 public:
  DustFill(const prob_t* probs, const int32_t* regions, int64_t num_labels, int64_t height, int64_t width)
      : probs_(probs), L_(num_labels), H_(height), W_(width), HW_(height * width),
        mapping_(regions, regions + height * width), pixel_(num_labels), pixel_raw_(num_labels) {
    M_ = count_masks(regions);
    stats_.assign((M_ + L_) * L_, 0.0);
    accumulate_region_stats(regions);
    for (int64_t l = 0; l < L_; ++l) stats_[(M_ + l) * L_ + l] = 1.0;
    normalized_.assign(stats_.size(), 0.0);
    fresh_.assign(M_ + L_, 0);
  }

  // Returns false when nothing is mapped after promotion: no pixel could ever border a mask and
  // Algorithm 4 would not terminate.
  bool run(const double* new_threshold, double join_threshold, double impatience) {
    std::vector<Pending> stack = promote_confident_pixels(new_threshold);
    if (!stack.empty() && M_ == 0 && promoted_ == 0) return false;
    std::vector<Pending> swap;
    while (!stack.empty()) {
      while (!stack.empty()) {
        const Pending item = stack.back();
        stack.pop_back();
        const int32_t mask = closest_mask(item, join_threshold);
        if (mask == kNoNeighbour) {
          swap.push_back(item);
        } else if (mask == kNoMatch) {
          swap.push_back({item.y, item.x, item.patience * impatience});
        } else {
          join(item, mask);
        }
      }
      std::swap(stack, swap);
    }
    return true;
  }

  // Each pixel gets the most probable label of its mask's statistics (the first one on ties).
  void write_labels(int64_t* out) const {
    std::vector<int64_t> mask_label(M_ + L_);
    for (int64_t k = 0; k < M_ + L_; ++k) {
      const double* s = &stats_[k * L_];
      int64_t best = 0;
      for (int64_t l = 1; l < L_; ++l) best = s[l] > s[best] ? l : best;
      mask_label[k] = best;
    }
    for (int64_t p = 0; p < HW_; ++p) out[p] = mask_label[mapping_[p]];
  }

 private:
  int64_t count_masks(const int32_t* regions) const {
    int32_t largest = -1;
    for (int64_t p = 0; p < HW_; ++p) {
      TORCH_CHECK_VALUE(
          regions[p] >= -1 && regions[p] < HW_,
          "regions: expected ids in [-1, H*W) (-1 = unassigned), got ", regions[p]);
      largest = std::max(largest, regions[p]);
    }
    return static_cast<int64_t>(largest) + 1;
  }

  // Per region, per label, the sum of probabilities over its pixels in scan order.
  void accumulate_region_stats(const int32_t* regions) {
    for (int64_t p = 0; p < HW_; ++p) {
      if (regions[p] < 0) continue;
      double* s = &stats_[regions[p] * L_];
      for (int64_t l = 0; l < L_; ++l) s[l] += checked_probability(probs_[l * HW_ + p]);
    }
  }

  // First pass: unmapped pixels whose most probable label reaches its threshold join that label's
  // mask; the others are stacked, in scan order, with patience 1.
  std::vector<Pending> promote_confident_pixels(const double* new_threshold) {
    std::vector<Pending> stack;
    for (int64_t p = 0; p < HW_; ++p) {
      if (mapping_[p] >= 0) continue;
      int64_t label = 0;
      double best = checked_probability(probs_[p]);
      for (int64_t l = 1; l < L_; ++l) {
        const double v = checked_probability(probs_[l * HW_ + p]);
        if (v > best) best = v, label = l;
      }
      if (best >= new_threshold[label]) {
        mapping_[p] = static_cast<int32_t>(M_ + label);
        ++promoted_;
      } else {
        stack.push_back({static_cast<int32_t>(p / W_), static_cast<int32_t>(p % W_), 1.0});
      }
    }
    return stack;
  }

  // Of the masks among the 4-neighbours, in the order (y+1,x), (y-1,x), (y,x+1), (y,x-1), the
  // first with the smallest distance below join_threshold * patience. A mask seen twice gives the
  // same distance, which can never win the second time, so it is evaluated once.
  int32_t closest_mask(const Pending& item, double join_threshold) {
    const int32_t ys[4] = {item.y + 1, item.y - 1, item.y, item.y};
    const int32_t xs[4] = {item.x, item.x, item.x + 1, item.x - 1};
    int32_t seen[4];
    int n_seen = 0;
    double dist = 1000.0;
    int32_t mask = kNoNeighbour;
    for (int i = 0; i < 4; ++i) {
      if (ys[i] < 0 || ys[i] >= H_ || xs[i] < 0 || xs[i] >= W_) continue;
      const int32_t m = mapping_[static_cast<int64_t>(ys[i]) * W_ + xs[i]];
      if (m < 0 || std::find(seen, seen + n_seen, m) != seen + n_seen) continue;
      if (n_seen == 0) {
        normalize_pixel(static_cast<int64_t>(item.y) * W_ + item.x);
        mask = kNoMatch;
      }
      seen[n_seen++] = m;
      const double d = l1_distance(pixel_.data(), normalized_stats(m), L_);
      if (d < join_threshold * item.patience && d < dist) dist = d, mask = m;
    }
    return mask;
  }

  void join(const Pending& item, int32_t mask) {
    const int64_t p = static_cast<int64_t>(item.y) * W_ + item.x;
    mapping_[p] = mask;
    if (mask >= M_) return;  // promoted masks keep their one-hot statistics
    double* s = &stats_[mask * L_];
    for (int64_t l = 0; l < L_; ++l) s[l] += static_cast<double>(probs_[l * HW_ + p]);
    fresh_[mask] = 0;
  }

  void normalize_pixel(int64_t p) {
    for (int64_t l = 0; l < L_; ++l) pixel_raw_[l] = static_cast<double>(probs_[l * HW_ + p]);
    normalize(pixel_raw_.data(), L_, pixel_.data());
  }

  // Normalized statistics of mask k, recomputed only after the mask has grown.
  const double* normalized_stats(int32_t k) {
    double* out = &normalized_[k * L_];
    if (!fresh_[k]) {
      normalize(&stats_[k * L_], L_, out);
      fresh_[k] = 1;
    }
    return out;
  }

  const prob_t* probs_;
  const int64_t L_, H_, W_, HW_;
  int64_t M_ = 0;
  int64_t promoted_ = 0;
  std::vector<int32_t> mapping_;
  std::vector<double> stats_, normalized_;
  std::vector<uint8_t> fresh_;
  std::vector<double> pixel_, pixel_raw_;
};

}  // namespace

template <typename prob_t>
void argmax_image(const prob_t* probs, int64_t num_labels, int64_t pixels, int64_t* out) {
  std::vector<double> best(pixels);
  for (int64_t p = 0; p < pixels; ++p) best[p] = checked_probability(probs[p]), out[p] = 0;
  for (int64_t l = 1; l < num_labels; ++l) {
    const prob_t* plane = probs + l * pixels;
    for (int64_t p = 0; p < pixels; ++p) {
      const double v = checked_probability(plane[p]);
      if (v > best[p]) best[p] = v, out[p] = l;
    }
  }
}

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
    int64_t* out) {
  DustFill<prob_t> fill(probs, regions, num_labels, height, width);
  if (fill.run(new_threshold, join_threshold, impatience)) {
    fill.write_labels(out);
  } else {
    argmax_image(probs, num_labels, height * width, out);
  }
}

template void argmax_image<float>(const float*, int64_t, int64_t, int64_t*);
template void argmax_image<double>(const double*, int64_t, int64_t, int64_t*);
template void dust_fill_image<float>(
    const float*, const int32_t*, int64_t, int64_t, int64_t, const double*, double, double, int64_t*);
template void dust_fill_image<double>(
    const double*, const int32_t*, int64_t, int64_t, int64_t, const double*, double, double, int64_t*);

}  // namespace unet_postprocess
