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
#include <type_traits>
#include <utility>
#include <vector>

namespace unet_postprocess {
namespace {

constexpr int32_t kNoNeighbour = -2;  // no 4-neighbour belongs to a mask yet
constexpr int32_t kNoMatch = -1;      // neighbours in masks, none close enough

// A pixel waiting for a mask: its position, where its probabilities were copied, its patience.
struct Pending {
  int32_t y, x;
  int64_t slot;
  double patience;
};

// Scales `values` to sum 1, or to zeros when they sum to 0.
template <typename value_t>
void normalize(const value_t* values, int64_t n, double* out) {
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) total += static_cast<double>(values[i]);
  const double inverse = total > 0.0 ? 1.0 / total : 0.0;
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<double>(values[i]) * inverse;
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
        mapping_(regions, regions + height * width), pixel_(num_labels) {
    M_ = count_masks(regions);
    stats_.assign((M_ + L_) * L_, 0.0);
    read_probabilities(regions);
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
        Pending item = stack.back();
        stack.pop_back();
        const int32_t mask = closest_mask(item, join_threshold);
        if (mask == kNoNeighbour) {
          swap.push_back(item);
        } else if (mask == kNoMatch) {
          item.patience *= impatience;
          swap.push_back(item);
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
  // Validates the ids, counts the regions and lists the unassigned pixels in scan order.
  int64_t count_masks(const int32_t* regions) {
    int32_t largest = -1, smallest = -1;
    for (int64_t p = 0; p < HW_; ++p) {
      largest = std::max(largest, regions[p]);
      smallest = std::min(smallest, regions[p]);
      if (regions[p] < 0) unassigned_.push_back(p);
    }
    TORCH_CHECK_VALUE(
        smallest >= -1 && largest < HW_, "regions: expected ids in [-1, H*W) (-1 = unassigned), got ids from ",
        smallest, " to ", largest);
    return static_cast<int64_t>(largest) + 1;
  }

  // One streaming pass over the label planes, in blocks of labels: sums each region's
  // probabilities per label in scan order, and copies the unassigned pixels' probabilities next
  // to each other (the only ones read again, and read whole: promotion validates them). Region
  // pixels are validated without a branch per value: NaN and infinities show in the sums,
  // negative values in the smallest value seen.
  void read_probabilities(const int32_t* regions) {
    constexpr int64_t kBlock = 8;
    unassigned_probs_.resize(unassigned_.size() * L_);
    prob_t lowest = 0;
    int64_t l = 0;
    for (; l + kBlock <= L_; l += kBlock) lowest = std::min(lowest, read_label_block<kBlock>(regions, l));
    for (; l < L_; ++l) lowest = std::min(lowest, read_label_block<1>(regions, l));
    bool valid = lowest >= 0;
    for (const double sum : stats_) valid &= std::isfinite(sum);
    check_probabilities(valid);
  }

  // Region sums stay in registers along each run of one region. Returns the smallest value read.
  template <int64_t kBlock>
  prob_t read_label_block(const int32_t* regions, int64_t first_label) {
    const prob_t* planes = probs_ + first_label * HW_;
    prob_t* copy = unassigned_probs_.data() + first_label;
    prob_t lowest[kBlock] = {};
    int64_t p = 0;
    while (p < HW_) {
      const int32_t k = regions[p];
      if (k < 0) {
        for (int64_t j = 0; j < kBlock; ++j) copy[j] = planes[j * HW_ + p];
        copy += L_;
        ++p;
        continue;
      }
      double* s = &stats_[k * L_ + first_label];
      double sum[kBlock];
      for (int64_t j = 0; j < kBlock; ++j) sum[j] = s[j];
      for (; p < HW_ && regions[p] == k; ++p) {
        for (int64_t j = 0; j < kBlock; ++j) {
          const prob_t v = planes[j * HW_ + p];
          lowest[j] = std::min(lowest[j], v);
          sum[j] += static_cast<double>(v);
        }
      }
      for (int64_t j = 0; j < kBlock; ++j) s[j] = sum[j];
    }
    return *std::min_element(lowest, lowest + kBlock);
  }

  const prob_t* unassigned_probs(int64_t slot) const { return unassigned_probs_.data() + slot * L_; }

  // First pass: unmapped pixels whose most probable label reaches its threshold join that label's
  // mask; the others are stacked, in scan order, with patience 1.
  std::vector<Pending> promote_confident_pixels(const double* new_threshold) {
    std::vector<Pending> stack;
    bool valid = true;
    for (const prob_t v : unassigned_probs_) valid &= is_probability(v);
    check_probabilities(valid);
    for (int64_t slot = 0; slot < static_cast<int64_t>(unassigned_.size()); ++slot) {
      const prob_t* v = unassigned_probs(slot);
      const int64_t label = std::max_element(v, v + L_) - v;  // the first maximum
      const int64_t p = unassigned_[slot];
      if (static_cast<double>(v[label]) >= new_threshold[label]) {
        mapping_[p] = static_cast<int32_t>(M_ + label);
        ++promoted_;
      } else {
        stack.push_back({static_cast<int32_t>(p / W_), static_cast<int32_t>(p % W_), slot, 1.0});
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
        normalize(unassigned_probs(item.slot), L_, pixel_.data());
        mask = kNoMatch;
      }
      seen[n_seen++] = m;
      const double d = l1_distance(pixel_.data(), normalized_stats(m), L_);
      if (d < join_threshold * item.patience && d < dist) dist = d, mask = m;
    }
    return mask;
  }

  void join(const Pending& item, int32_t mask) {
    mapping_[static_cast<int64_t>(item.y) * W_ + item.x] = mask;
    if (mask >= M_) return;  // promoted masks keep their one-hot statistics
    double* s = &stats_[mask * L_];
    const prob_t* v = unassigned_probs(item.slot);
    for (int64_t l = 0; l < L_; ++l) s[l] += static_cast<double>(v[l]);
    fresh_[mask] = 0;
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
  std::vector<int64_t> unassigned_;     // pixel index of each slot, in scan order
  std::vector<prob_t> unassigned_probs_;  // [slot][label]
  std::vector<double> stats_, normalized_;
  std::vector<uint8_t> fresh_;
  std::vector<double> pixel_;
};

}  // namespace

// In chunks of pixels small enough that the running maxima stay in L1 while the planes stream by.
// The inner loop selects with masks as wide as the values (GCC does not vectorize `c ? a : b`).
template <typename prob_t>
void argmax_image(const prob_t* probs, int64_t num_labels, int64_t pixels, int64_t* out) {
  using mask_t = std::conditional_t<sizeof(prob_t) == 4, int32_t, int64_t>;
  constexpr int64_t kChunk = 512;
  prob_t best[kChunk];
  mask_t label[kChunk];
  mask_t valid = -1;
  for (int64_t start = 0; start < pixels; start += kChunk) {
    const int64_t n = std::min(kChunk, pixels - start);
    std::copy(probs + start, probs + start + n, best);
    std::fill(label, label + n, 0);
    for (int64_t l = 0; l < num_labels; ++l) {
      const prob_t* plane = probs + l * pixels + start;
      for (int64_t i = 0; i < n; ++i) {
        const prob_t v = plane[i], b = best[i];
        const mask_t old = label[i];
        const mask_t better = -static_cast<mask_t>(v > b);
        valid &= -static_cast<mask_t>(is_probability(v));
        best[i] = std::max(b, v);
        label[i] = (static_cast<mask_t>(l) & better) | (old & ~better);
      }
    }
    std::copy(label, label + n, out + start);
  }
  check_probabilities(valid != 0);
}

template <typename prob_t>
void dust_fill_image(const prob_t* probs, const int32_t* regions, int64_t num_labels, int64_t height, int64_t width,
                     const double* new_threshold, double join_threshold, double impatience, int64_t* out) {
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
