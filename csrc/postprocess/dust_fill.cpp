// DUST_FILL (paper section 7.3, Algorithm 4) and the plain argmax baseline.
//
// Masks 0..M-1 are the regions of SEGMENT; masks M..M+L-1 collect the promoted pixels of each
// label and keep one-hot statistics, which are never stored. (The pseudo-code's
// `mapping[s, t] <- label` for a promoted pixel is read as `M + label`, the mask it has just set.)
// All arithmetic is in double, in a fixed order (sums run over labels 0..L-1, statistics
// accumulate pixels in the order they join, a vector is normalized by multiplying with the
// reciprocal of its sum, or zero when the sum is zero), which tests/postprocess_reference.py
// reproduces exactly.
//
// The relaxation visits only the waiting pixels that border a mask, in the pseudo-code's order.
// Its stack holds the waiting pixels in scan order; a round pops them all and pushes those that
// stay onto the swap buffer, the next round's stack: so even rounds visit the waiting pixels in
// reverse scan order, odd rounds in scan order, and a pixel that joins a mask is seen by the
// pixels visited after it in the same round. A pixel that borders no mask goes back unchanged,
// so skipping it changes nothing. The pixels a round visits are those that bordered a mask when
// it began (a list sorted in the round's order) and those a join makes border one: the neighbour
// next in the same row (visited right after the join), the one in the row visited next (a queue
// that stays sorted, since joins come in order), and those already passed (the next round's).
// Each round costs the pixels it visits, so the whole relaxation is linear in the visits.
//
// A visit needs the distances only when they decide something. Between two visits of a pixel
// they change only as far as the bordering regions' normalized statistics drift (unless a new
// mask comes to border it), and a region's mass growth bounds that drift: adding mass s to mass
// T moves the normalized statistics at most 2s/(T+s) in L1. So a pixel remembers its last exact
// distances and the regions' masses then; a visit whose verdict these bounds settle (no mask
// close enough, or one mask surely the closest and close enough) takes it without computing a
// distance, and `sure_until` spares even the bounds while the threshold stays below them.
#include "postprocess.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

namespace unet_postprocess {
namespace {

constexpr int32_t kNoMatch = -1;    // bordering masks, none close enough
constexpr int32_t kUnsettled = -2;  // the bounds settle nothing: compute the distances

// Bounds on distances are widened by this much: far more than the rounding of distances (sums of
// L <= 2^28 terms below 2) and of masses (sums of at most 2^32 non-negative terms) can move them.
constexpr double kBoundMargin = 1e-5;

// A pixel remembers at most this many bordering masks (more are rare: it is evaluated each visit).
constexpr int kRemembered = 2;

// Scales `values` to sum 1, or to zeros when they sum to 0.
template <typename value_t>
void normalize(const value_t* values, int64_t n, double* out) {
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) total += static_cast<double>(values[i]);
  const double inverse = total > 0.0 ? 1.0 / total : 0.0;
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<double>(values[i]) * inverse;
}

// The L x L identity: the statistics of the promoted masks.
void write_one_hot_rows(int64_t num_labels, double* out) {
  std::fill(out, out + num_labels * num_labels, 0.0);
  for (int64_t l = 0; l < num_labels; ++l) out[l * num_labels + l] = 1.0;
}

// A pixel left unassigned by SEGMENT and not promoted: what each visit reads.
struct Waiting {
  int64_t visit_round = -1;  // the round whose visit list holds it, if any
  int64_t sure_until = 0;    // visits before this round fail while no region passes its wake mass
  double patience = 1.0;
  int32_t remembered = 0;  // masks remembered by the last exact visit; 0 until then, or after a new one borders
  int32_t mask[kRemembered];
  double wake_mass[kRemembered];  // sure_until holds while the region's mass stays at most this
};

// What an exact visit reads, and remembers for the visits after.
struct Remembered {
  double mass;     // sum of the pixel's probabilities
  double inverse;  // 1 / mass, or 0: normalizes them
  double distance[kRemembered];   // exact, at the last exact visit
  double mass_then[kRemembered];  // the region's mass at that visit
};

// Pixel positions in the order a round visits them, and the next round's list built from the
// three streams (each sorted in this round's order) that a round produces.
class RoundOrder {
 public:
  explicit RoundOrder(int64_t round) : descending_(round % 2 == 0) {}
  bool before(int64_t a, int64_t b) const { return descending_ ? a > b : a < b; }
  // Merges the streams into `out`, sorted for the next round (the opposite order).
  void next_round(const std::vector<int32_t>& a, const std::vector<int32_t>& b, const std::vector<int32_t>& c,
                  std::vector<int32_t>& scratch, std::vector<int32_t>& out) const {
    const auto order = [this](int32_t x, int32_t y) { return before(x, y); };
    scratch.resize(a.size() + b.size());
    std::merge(a.begin(), a.end(), b.begin(), b.end(), scratch.begin(), order);
    out.resize(scratch.size() + c.size());
    std::merge(scratch.begin(), scratch.end(), c.begin(), c.end(), out.begin(), order);
    std::reverse(out.begin(), out.end());
  }

 private:
  bool descending_;
};

template <typename prob_t>
class DustFill {
 public:
  DustFill(const prob_t* probs, const int32_t* regions, int64_t num_labels, int64_t height, int64_t width)
      : probs_(probs), L_(num_labels), H_(height), W_(width), HW_(height * width) {
    const int64_t unassigned = count_masks(regions);
    stats_.assign(M_ * L_, 0.0);
    normalized_.assign(M_ * L_, 0.0);
    fresh_.assign(M_, 0);
    mass_.assign(M_, 0.0);
    zeros_.assign(L_, 0.0);
    mapping_.assign(regions, regions + HW_);
    unassigned_.reserve(unassigned);
    for (int64_t p = 0; p < HW_; ++p) {
      if (regions[p] < 0) unassigned_.push_back(static_cast<int32_t>(p));
    }
    read_probabilities(regions);
    for (int64_t k = 0; k < M_; ++k) {
      for (int64_t l = 0; l < L_; ++l) mass_[k] += stats_[k * L_ + l];
    }
  }

  // Returns false when nothing is mapped after promotion: no pixel could ever border a mask and
  // Algorithm 4 would not terminate.
  bool run(const double* new_threshold, double join_threshold, double impatience) {
    promote_confident_pixels(new_threshold);
    if (waiting_.empty()) return true;
    if (M_ == 0 && promoted_ == 0) return false;
    std::vector<int32_t> visits = bordering_waiting_pixels();
    for (int64_t round = 0; !visits.empty(); ++round) relax(round, join_threshold, impatience, visits);
    return true;
  }

  // Each pixel gets the most probable label of its mask's statistics (the first one on ties).
  void write_labels(int64_t* out) const {
    std::vector<int64_t> mask_label(M_ + L_);
    for (int64_t k = 0; k < M_; ++k) {
      const double* s = &stats_[k * L_];
      mask_label[k] = std::max_element(s, s + L_) - s;
    }
    for (int64_t l = 0; l < L_; ++l) mask_label[M_ + l] = l;
    for (int64_t p = 0; p < HW_; ++p) out[p] = mask_label[mapping_[p]];
  }

  void write_masks(int32_t* out) const { std::copy(mapping_.begin(), mapping_.end(), out); }

  // [M + L, L]: the regions' statistics, then the promoted masks' one-hot rows.
  void write_statistics(double* out) const {
    std::copy(stats_.begin(), stats_.end(), out);
    write_one_hot_rows(L_, out + M_ * L_);
  }

 private:
  // Validates the ids and sets M_, before anything is allocated; returns the unassigned count.
  int64_t count_masks(const int32_t* regions) {
    int32_t largest = -1, smallest = -1;
    int64_t unassigned = 0;
    for (int64_t p = 0; p < HW_; ++p) {
      largest = std::max(largest, regions[p]);
      smallest = std::min(smallest, regions[p]);
      unassigned += regions[p] < 0;
    }
    TORCH_CHECK_VALUE(
        smallest >= -1 && largest < HW_, "regions: expected ids in [-1, H*W) (-1 = unassigned), got ids from ",
        smallest, " to ", largest);
    M_ = static_cast<int64_t>(largest) + 1;
    TORCH_CHECK_VALUE(L_ <= kMaxStatistics, "probs: expected at most ", kMaxStatistics, " labels, got ", L_);
    TORCH_CHECK_VALUE(
        M_ * L_ <= kMaxStatistics, "dust_fill: ", M_, " regions x ", L_, " labels need ", M_ * L_,
        " label statistics, more than the ", kMaxStatistics, " supported (a larger min_size keeps fewer regions)");
    return unassigned;
  }

  // One streaming pass over the label planes, in blocks of labels: sums each region's
  // probabilities per label in scan order; copies the unassigned pixels' probabilities next to
  // each other (the waiting ones are read again at every exact visit; the copy is at most the
  // input's size and spares gathering them from every plane), and finds each one's most probable
  // label and mass. Values are validated without a branch per value: NaN and infinities of
  // region pixels show in the sums, negative values in the smallest value seen.
  void read_probabilities(const int32_t* regions) {
    constexpr int64_t kBlock = 8;
    const size_t unassigned = unassigned_.size();
    unassigned_probs_.reset(new prob_t[unassigned * L_]);  // not zeroed: every value is written
    best_label_.assign(unassigned, 0);
    unassigned_mass_.assign(unassigned, 0.0);
    bool valid = true;
    int64_t l = 0;
    for (; l + kBlock <= L_; l += kBlock) read_label_block<kBlock>(regions, l, valid);
    for (; l < L_; ++l) read_label_block<1>(regions, l, valid);
    for (const double sum : stats_) valid &= std::isfinite(sum);
    check_probabilities(valid);
  }

  // Region sums stay in registers along each run of one region. ANDs the values' validity into
  // `valid`.
  template <int64_t kBlock>
  void read_label_block(const int32_t* regions, int64_t first_label, bool& valid) {
    const prob_t* planes = probs_ + first_label * HW_;
    prob_t* copy = unassigned_probs_.get() + first_label;
    prob_t lowest[kBlock] = {};
    bool unassigned_valid = true;
    int64_t p = 0, u = 0;
    while (p < HW_) {
      const int32_t k = regions[p];
      if (k < 0) {
        const prob_t* row = copy - first_label;
        int32_t label = best_label_[u];
        double mass = unassigned_mass_[u];
        for (int64_t j = 0; j < kBlock; ++j) {
          const prob_t v = planes[j * HW_ + p];
          copy[j] = v;
          unassigned_valid &= is_probability(v);
          mass += static_cast<double>(v);
          label = v > row[label] ? static_cast<int32_t>(first_label + j) : label;  // the first maximum
        }
        best_label_[u] = label;
        unassigned_mass_[u] = mass;
        copy += L_;
        ++p, ++u;
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
    valid &= unassigned_valid && *std::min_element(lowest, lowest + kBlock) >= 0;
  }

  // First pass: unassigned pixels whose most probable label reaches its threshold join that
  // label's mask; the others wait, in scan order, their probabilities moved to the copy's front.
  // A waiting pixel's mapping is ~slot (negative).
  void promote_confident_pixels(const double* new_threshold) {
    waiting_.reserve(unassigned_.size());
    remembered_.reserve(unassigned_.size());
    waiting_pixels_.reserve(unassigned_.size());
    for (size_t u = 0; u < unassigned_.size(); ++u) {
      const prob_t* v = &unassigned_probs_[u * L_];
      const int32_t p = unassigned_[u], label = best_label_[u];
      if (static_cast<double>(v[label]) >= new_threshold[label]) {
        mapping_[p] = static_cast<int32_t>(M_ + label);
        ++promoted_;
        continue;
      }
      const int32_t slot = static_cast<int32_t>(waiting_.size());
      mapping_[p] = ~slot;
      std::copy(v, v + L_, &unassigned_probs_[slot * L_]);  // slot <= u: moves forward only
      const double mass = unassigned_mass_[u];
      waiting_.emplace_back();
      remembered_.push_back({mass, mass > 0.0 ? 1.0 / mass : 0.0});  // the inverse as normalize() computes it
      waiting_pixels_.push_back(p);
    }
  }

  bool is_waiting(int64_t p) const { return mapping_[p] < 0; }
  int32_t slot_of(int64_t p) const { return ~mapping_[p]; }
  const prob_t* probabilities(int32_t slot) const { return &unassigned_probs_[slot * L_]; }

  // Round 0's visits: the waiting pixels that border a mask, in reverse scan order.
  std::vector<int32_t> bordering_waiting_pixels() {
    std::vector<int32_t> visits;
    for (int64_t slot = static_cast<int64_t>(waiting_.size()) - 1; slot >= 0; --slot) {
      int32_t neighbours[4];
      const int n = neighbours_of(waiting_pixels_[slot], neighbours);
      bool borders = false;
      for (int i = 0; i < n; ++i) borders |= !is_waiting(neighbours[i]);
      if (borders) {
        waiting_[slot].visit_round = 0;
        visits.push_back(waiting_pixels_[slot]);
      }
    }
    return visits;
  }

  // The 4-neighbours inside the image, in the pseudo-code's order (y+1,x), (y-1,x), (y,x+1), (y,x-1).
  int neighbours_of(int64_t p, int32_t* out) const {
    const int64_t y = p / W_, x = p % W_;
    int n = 0;
    if (y + 1 < H_) out[n++] = static_cast<int32_t>(p + W_);
    if (y > 0) out[n++] = static_cast<int32_t>(p - W_);
    if (x + 1 < W_) out[n++] = static_cast<int32_t>(p + 1);
    if (x > 0) out[n++] = static_cast<int32_t>(p - 1);
    return n;
  }

  // One round: visits `visits` (sorted in the round's order) and the pixels joins make border a
  // mask ahead of the visit; leaves the next round's visits in `visits`.
  void relax(int64_t round, double join_threshold, double impatience, std::vector<int32_t>& visits) {
    const RoundOrder order(round);
    row_ahead_.clear();
    failed_.clear();
    side_behind_.clear();
    row_behind_.clear();
    size_t next_visit = 0, next_row_ahead = 0;
    int32_t side_ahead = -1;  // the neighbour in the same row just after a join, if it waits
    while (true) {
      int32_t p;
      if (side_ahead >= 0) {
        p = side_ahead;  // no other pixel comes between a pixel and its neighbour
        side_ahead = -1;
      } else if (next_visit < visits.size() &&
                 (next_row_ahead == row_ahead_.size() || order.before(visits[next_visit], row_ahead_[next_row_ahead]))) {
        p = visits[next_visit++];
      } else if (next_row_ahead < row_ahead_.size()) {
        p = row_ahead_[next_row_ahead++];
      } else {
        break;
      }
      const int32_t slot = slot_of(p);
      Waiting& w = waiting_[slot];
      const int32_t mask = decide(p, slot, round, join_threshold, impatience);
      if (mask == kNoMatch) {
        w.patience *= impatience;
        w.visit_round = round + 1;
        failed_.push_back(p);
        continue;
      }
      join(p, slot, mask);
      int32_t neighbours[4];
      const int n = neighbours_of(p, neighbours);
      for (int i = 0; i < n; ++i) {
        const int32_t q = neighbours[i];
        if (!is_waiting(q)) continue;
        Waiting& v = waiting_[slot_of(q)];
        if (std::find(v.mask, v.mask + v.remembered, mask) == v.mask + v.remembered) {
          v.remembered = 0;  // a new mask borders it: what it remembers no longer covers its masks
          v.sure_until = 0;
        }
        const bool same_row = q == p + 1 || q == p - 1;
        if (order.before(p, q)) {  // visited later in this round
          if (v.visit_round == round) continue;
          v.visit_round = round;
          if (same_row) {
            side_ahead = q;
          } else {
            row_ahead_.push_back(q);
          }
        } else if (v.visit_round != round + 1) {
          v.visit_round = round + 1;
          (same_row ? side_behind_ : row_behind_).push_back(q);
        }
      }
    }
    order.next_round(failed_, side_behind_, row_behind_, scratch_, visits);
  }

  // The mask the pixel joins at this visit, or kNoMatch: from what it remembers when that
  // settles it, from the exact distances otherwise.
  int32_t decide(int64_t p, int32_t slot, int64_t round, double join_threshold, double impatience) {
    Waiting& w = waiting_[slot];
    if (surely_fails(w, round)) return kNoMatch;
    const double limit = join_threshold * w.patience;
    const int32_t settled = w.remembered > 0 ? settle(w, remembered_[slot], limit) : kUnsettled;
    if (settled == kNoMatch) schedule(w, remembered_[slot], round, join_threshold, impatience);
    if (settled != kUnsettled) return settled;
    return closest_mask(p, slot, round, join_threshold, impatience);
  }

  bool surely_fails(const Waiting& w, int64_t round) const {
    if (round >= w.sure_until) return false;
    for (int k = 0; k < w.remembered; ++k) {
      if (w.mask[k] < M_ && mass_[w.mask[k]] > w.wake_mass[k]) return false;
    }
    return true;
  }

  // The exact visit's verdict where the remembered distances, widened by the drift since, settle
  // it: kNoMatch when every distance stays at or above `limit`, a mask when its distance stays
  // below `limit` and below every other, kUnsettled otherwise.
  int32_t settle(const Waiting& w, const Remembered& r, double limit) const {
    double low[kRemembered], high[kRemembered];
    for (int k = 0; k < w.remembered; ++k) {
      double drift = 0.0;
      if (w.mask[k] < M_) {
        const double mass = mass_[w.mask[k]];
        drift = mass > r.mass_then[k] ? 2.0 * (mass - r.mass_then[k]) / mass : 0.0;
      }
      low[k] = r.distance[k] - drift - kBoundMargin;
      high[k] = r.distance[k] + drift + kBoundMargin;
    }
    const int closest = static_cast<int>(std::min_element(high, high + w.remembered) - high);
    bool fails = true, closest_wins = high[closest] < limit;
    for (int k = 0; k < w.remembered; ++k) {
      fails &= low[k] >= limit;
      closest_wins &= k == closest || low[k] > high[closest];
    }
    return fails ? kNoMatch : closest_wins ? w.mask[closest] : kUnsettled;
  }

  // Of the masks among p's 4-neighbours, in neighbours_of's order, the first with the smallest
  // distance below join_threshold * patience, or kNoMatch (and the distances are remembered). A
  // mask seen twice gives the same distance, which can never win the second time, so it is
  // evaluated once.
  int32_t closest_mask(int64_t p, int32_t slot, int64_t round, double join_threshold, double impatience) {
    int32_t neighbours[4], masks[4];
    const int n = neighbours_of(p, neighbours);
    int n_masks = 0;
    for (int i = 0; i < n; ++i) {
      const int32_t m = mapping_[neighbours[i]];
      if (m >= 0 && std::find(masks, masks + n_masks, m) == masks + n_masks) masks[n_masks++] = m;
    }
    double d[4];
    distances(slot, masks, n_masks, d);
    Waiting& w = waiting_[slot];
    const double limit = join_threshold * w.patience;
    double dist = 1000.0;
    int32_t mask = kNoMatch;
    for (int k = 0; k < n_masks; ++k) {
      if (d[k] < limit && d[k] < dist) dist = d[k], mask = masks[k];
    }
    if (mask != kNoMatch) return mask;
    w.sure_until = round + 1;  // unless schedule() finds sure rounds
    w.remembered = n_masks <= kRemembered ? n_masks : 0;
    Remembered& r = remembered_[slot];
    for (int k = 0; k < w.remembered; ++k) {
      w.mask[k] = masks[k];
      r.distance[k] = d[k];
      r.mass_then[k] = masks[k] < M_ ? mass_[masks[k]] : 0.0;
    }
    if (w.remembered > 0) schedule(w, r, round, join_threshold, impatience);
    return kNoMatch;
  }

  // L1 distances from the pixel's normalized probabilities to the normalized statistics of
  // `masks`, each summed over labels 0..L-1 in order (the sums run side by side). One region,
  // the common case, has its own loop.
  void distances(int32_t slot, const int32_t* masks, int n, double* out) {
    const prob_t* v = probabilities(slot);
    const double inverse = remembered_[slot].inverse;
    if (n == 1 && masks[0] < M_) {
      const double* stats = normalized_stats(masks[0]);
      double d = 0.0;
      for (int64_t l = 0; l < L_; ++l) d += std::abs(static_cast<double>(v[l]) * inverse - stats[l]);
      out[0] = d;
      return;
    }
    const double* stats[4];
    int64_t hot[4];  // the label of a promoted mask's one-hot statistics, -1 for a region
    for (int k = 0; k < n; ++k) {
      const bool region = masks[k] < M_;
      stats[k] = region ? normalized_stats(masks[k]) : zeros_.data();
      hot[k] = region ? -1 : masks[k] - M_;
      out[k] = 0.0;
    }
    for (int64_t l = 0; l < L_; ++l) {
      const double a = static_cast<double>(v[l]) * inverse;
      for (int k = 0; k < n; ++k) out[k] += std::abs(a - (l == hot[k] ? 1.0 : stats[k][l]));
    }
  }

  // After a failed visit at `round`: the next rounds whose threshold stays below every remembered
  // distance by kBoundMargin fail too, while each region drifts less than the gap left at the
  // last of them: sure_until and the wake masses.
  void schedule(Waiting& w, const Remembered& r, int64_t round, double join_threshold, double impatience) const {
    const double reach = *std::min_element(r.distance, r.distance + w.remembered) - kBoundMargin;
    double patience = w.patience, last_limit = 0.0;
    w.sure_until = round + 1;
    while (true) {
      patience *= impatience;  // as the visits will
      const double limit = join_threshold * patience;
      if (!(limit <= reach)) break;
      last_limit = limit;
      ++w.sure_until;
    }
    for (int k = 0; k < w.remembered; ++k) {
      const double gap = r.distance[k] - kBoundMargin - last_limit;  // >= 0 when a round is sure
      // drift <= 2 (mass - mass_then) / mass <= gap  <=>  mass <= 2 mass_then / (2 - gap)
      const bool fixed = w.mask[k] >= M_ || gap >= 2.0;
      w.wake_mass[k] = fixed ? std::numeric_limits<double>::infinity() : 2.0 * r.mass_then[k] / (2.0 - gap);
    }
  }

  void join(int64_t p, int32_t slot, int32_t mask) {
    mapping_[p] = mask;
    if (mask >= M_) return;  // promoted masks keep their one-hot statistics
    double* s = &stats_[mask * L_];
    const prob_t* v = probabilities(slot);
    for (int64_t l = 0; l < L_; ++l) s[l] += static_cast<double>(v[l]);
    mass_[mask] += remembered_[slot].mass;
    fresh_[mask] = 0;
  }

  // Normalized statistics of region k, recomputed only after the region has grown.
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
  std::vector<int32_t> mapping_;     // mask of each pixel; ~slot of a waiting pixel
  std::vector<int32_t> unassigned_;  // pixels left unassigned by SEGMENT, in scan order
  std::unique_ptr<prob_t[]> unassigned_probs_;  // [unassigned pixel][label]; after promotion [slot][label]
  std::vector<int32_t> best_label_;       // per unassigned pixel: its most probable label (the first)
  std::vector<double> unassigned_mass_;   // and the sum of its probabilities
  std::vector<Waiting> waiting_;     // per slot, in scan order
  std::vector<Remembered> remembered_;
  std::vector<int32_t> waiting_pixels_;
  std::vector<double> stats_, normalized_;  // [region][label]
  std::vector<double> mass_;                // per region: its statistics' sum (bounds their drift)
  std::vector<uint8_t> fresh_;
  std::vector<double> zeros_;  // a promoted mask's one-hot statistics, but for its label
  // A round's streams, kept to reuse their memory.
  std::vector<int32_t> row_ahead_, failed_, side_behind_, row_behind_, scratch_;
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
                     const double* new_threshold, double join_threshold, double impatience, const DustFillOutput& out) {
  DustFill<prob_t> fill(probs, regions, num_labels, height, width);
  if (fill.run(new_threshold, join_threshold, impatience)) {
    fill.write_labels(out.labels);
    if (out.masks) fill.write_masks(out.masks);
    if (out.statistics) fill.write_statistics(out.statistics);
    return;
  }
  // No region (M = 0): every pixel goes to its argmax label's promoted mask, whose id is the label.
  argmax_image(probs, num_labels, height * width, out.labels);
  if (out.masks) std::copy(out.labels, out.labels + height * width, out.masks);
  if (out.statistics) write_one_hot_rows(num_labels, out.statistics);
}

template void argmax_image<float>(const float*, int64_t, int64_t, int64_t*);
template void argmax_image<double>(const double*, int64_t, int64_t, int64_t*);
template void dust_fill_image<float>(
    const float*, const int32_t*, int64_t, int64_t, int64_t, const double*, double, double, const DustFillOutput&);
template void dust_fill_image<double>(
    const double*, const int32_t*, int64_t, int64_t, int64_t, const double*, double, double, const DustFillOutput&);

}  // namespace unet_postprocess
