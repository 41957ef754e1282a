// DUST_FILL (paper section 7.3, Algorithm 4) and the plain argmax baseline.
//
// Masks 0..M-1 are the regions of SEGMENT; masks M..M+L-1 collect the promoted pixels of each
// label and keep one-hot statistics, which are never stored. (The pseudo-code's
// `mapping[s, t] <- label` for a promoted pixel is read as `M + label`, the mask it has just set.)
// The result is exactly the pseudo-code's, with its arithmetic in double in a fixed order (sums
// run over labels 0..L-1; a region's first statistics add up its runs along the rows in scan
// order, each run summed in two lanes, its even and its odd pixels in order, then the lanes
// added; pixels that join later add in the order they join; a vector is normalized by
// multiplying with the reciprocal of its sum, or zero when the sum is zero), which
// tests/postprocess_reference.py reproduces. (The lanes let the read pass convert and add two
// values at once.)
//
// The read pass goes over the probabilities once, in chunks of rows. The image's runs of one id
// along its rows are found once, as the ids are validated; then, chunk by chunk and label block
// by label block, each run of a region adds to the region's sums (in two lanes per label, kept in
// registers along the run), and each run of unassigned pixels is copied, four pixels of a label
// at a time, to quads of a buffer (a quad: [labels][4 pixels]), its argmax going on. Then the
// chunk's unassigned pixels are promoted, or copied to their slots for the relaxation
// ("waiting").
//
// The relaxation. The pseudo-code's stack holds the waiting pixels in scan order; a round pops
// them all and pushes those that stay onto the swap buffer, the next round's stack: so even
// rounds visit the waiting pixels in reverse scan order, odd rounds in scan order, and a pixel
// that joins a mask is seen by the pixels visited after it in the same round. A visit changes
// something only where the pixel borders a mask, and then it borders one at every later visit:
// so from its first such visit (its activation round a) a pixel fails at every round until it
// joins, and its patience at round r is impatience^(r - a), multiplied up one round at a time.
// We visit a pixel only where it may join, and plan its visits from lower bounds of its
// distances: a pixel is planned for the first round whose threshold may pass the closest bound,
// and sleeps until then unless a bound drops first. Bounds come from its float distances, less
// twice their error bound: at its last visit, at its activation, and when a neighbour's join
// makes it border a mask it did not border. They drop as a bordering region's normalized
// statistics drift: a pixel of mass s that joins at distance d moves the statistics of a region
// of mass T by s d / (T + s) in L1, and each region keeps the sum of its moves (its path) and, in a heap,
// the paths at which the bounds of its sleepers reach the threshold they were planned past.
// There the sleeper is re-planned from its remaining bound. A pixel planned for a round is
// visited at its place in the pseudo-code's order: the pixels of a round are a bitset scanned
// in the round's order, so one planned ahead of the scan (during the round) is met in order;
// one whose place this round is passed is planned for the next. Every visit of the pseudo-code
// that could join a pixel is made, in its order, on its state, so the joins and the statistics
// are the pseudo-code's. Visits jump around the image, so the scan prefetches the next one's data.
//
// Distances are first computed in float, with a bound on their error; only a decision that the
// bound leaves open (a distance that close to the threshold, or two masks that close) is taken
// from the exact double distances, computed as the pseudo-code does. Planning takes the bounds
// with twice that error, and the paths with room for it.
//
// Pixels are indexed in the image framed by one pixel on each side (kOutside), so that the four
// neighbours of every pixel exist; the frame keeps scan order.
#include "postprocess.h"
#include "pixel_set.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace unet_postprocess {
namespace {

constexpr int kNoMatch = -1;  // bordering masks, none close enough
constexpr int kUnsure = -2;   // the float distances leave the decision open
constexpr int32_t kOutside = std::numeric_limits<int32_t>::max();  // the frame's mapping

// Float sums run in this many lanes; copies of probabilities and normalized statistics are
// padded with zeros to a multiple of it.
constexpr int64_t kLanes = 8;

// The read pass takes about this many bytes of label planes at a time.
constexpr int64_t kChunkBytes = 256 * 1024;

// The argmax goes over this many pixels at a time, so its running maxima stay in L1.
constexpr int64_t kArgmaxPixels = 512;

// Region sums are kept in registers for this many labels at a time.
constexpr int64_t kLabelBlock = 8;

// Pixels whose probabilities sum outside this range (where float reciprocals would overflow)
// always get exact distances.
constexpr double kMinFloatMass = 1e-30, kMaxFloatMass = 1e30;

// The thresholds are tabulated until they pass this, beyond any distance between two normalized
// vectors (at most 2): a pixel that borders a mask joins by then.
constexpr double kFarthest = 4.0;

// A region's path grows by its moves, scaled by this for the error of the masses' float sums.
constexpr double kPathRoom = 1.0 + 0x1p-16;

// A bound on |float distance - exact distance|. A float normalized value is off by at most
// (Lp / 8 + 5) float roundings (the lane sum of the pixel's mass, its reciprocal, the product;
// the double value's rounding), a term of the sum by one more, and each lane adds up Lp / 8
// terms of total at most 2: about (12 + 3 Lp / 8) * 2^-24 in all, and the exact double distance
// is within L * 2^-50 of the real one. We allow about three times that.
double float_distance_error(int64_t labels, int64_t padded_labels) {
  return (padded_labels / 4.0 + 32.0) * std::ldexp(1.0, -22) + labels * std::ldexp(1.0, -46);
}

// Scales `values` to sum 1, or to zeros when they sum to 0: the exact arithmetic.
template <typename value_t>
void normalize(const value_t* values, int64_t n, double* out) {
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) total += static_cast<double>(values[i]);
  const double inverse = total > 0.0 ? 1.0 / total : 0.0;
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<double>(values[i]) * inverse;
}

// The first of the n smallest of `values` (n >= 1), with selects rather than branches.
int first_smallest(const double* values, int n) {
  int smallest = 0;
  for (int k = 1; k < n; ++k) smallest = values[k] < values[smallest] ? k : smallest;
  return smallest;
}

// The L x L identity: the statistics of the promoted masks.
void write_one_hot_rows(int64_t num_labels, double* out) {
  std::fill(out, out + num_labels * num_labels, 0.0);
  for (int64_t l = 0; l < num_labels; ++l) out[l * num_labels + l] = 1.0;
}

// For pixels [begin, end) of [labels, pixels] planes, in runs of kArgmaxPixels: the most probable
// label (the first on ties) and its probability. Returns whether every value read is a
// probability. The selects use masks as wide as the values (GCC does not vectorize `c ? a : b`).
template <typename prob_t, typename label_t>
bool argmax_pixels(const prob_t* probs, int64_t num_labels, int64_t pixels, int64_t begin, int64_t end,
                   prob_t* best, label_t* label) {
  static_assert(sizeof(label_t) == sizeof(prob_t), "labels as wide as the values");
  label_t valid = -1;
  for (int64_t start = begin; start < end; start += kArgmaxPixels) {
    const int64_t n = std::min(kArgmaxPixels, end - start);
    prob_t* b = best + (start - begin);
    label_t* index = label + (start - begin);
    std::copy(probs + start, probs + start + n, b);
    std::fill(index, index + n, 0);
    for (int64_t l = 0; l < num_labels; ++l) {
      const prob_t* plane = probs + l * pixels + start;
      for (int64_t i = 0; i < n; ++i) {
        const prob_t v = plane[i], old_best = b[i];
        const label_t better = -static_cast<label_t>(v > old_best);
        valid &= -static_cast<label_t>(is_probability(v));
        b[i] = std::max(old_best, v);
        index[i] = (static_cast<label_t>(l) & better) | (index[i] & ~better);
      }
    }
  }
  return valid != 0;
}

#if defined(__SSE2__)
// SSE2 versions of the read pass's loops for float probabilities and blocks of 8 labels (the
// copies four pixels at a time, returning the first pixel they leave to the scalar loop). The
// bits of the values read are ORed on the way: a sign bit shows negative values (and -0.0), bit
// 30 values of 2 or more, infinities and NaN.

// Whether the 8 labels of pixels [p, stop) are probabilities, given the OR of their bits: the
// exact check where a sign bit or bit 30 is set.
inline bool all_probabilities(const float* const* planes, int64_t p, int64_t stop, __m128 bits) {
  const __m128i suspect = _mm_or_si128(_mm_castps_si128(bits), _mm_slli_epi32(_mm_castps_si128(bits), 1));
  if (_mm_movemask_ps(_mm_castsi128_ps(suspect)) == 0) return true;
  bool valid = true;
  for (int64_t j = 0; j < 8; ++j) {
    for (int64_t q = p; q < stop; ++q) valid &= is_probability(planes[j][q]);
  }
  return valid;
}

// Adds a run of pixels to the sums of 8 labels, as DustFill::sum_run does.
void sum_run_sse(double* sums, const float* const* block_planes, int64_t p, int64_t stop, bool& valid) {
  const float* planes[8];  // in registers
  std::copy_n(block_planes, 8, planes);
  const int64_t start = p;
  __m128d acc[8];
  for (int j = 0; j < 8; ++j) acc[j] = _mm_setzero_pd();
  __m128 bits = _mm_setzero_ps();
  for (; p + 2 <= stop; p += 2) {
    __m128 two[8];
    for (int j = 0; j < 8; ++j) {
      two[j] = _mm_castsi128_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(planes[j] + p)));
      acc[j] = _mm_add_pd(acc[j], _mm_cvtps_pd(two[j]));
    }
    // a tree of ORs: one step of the chain through `bits` per iteration
    const __m128 low = _mm_or_ps(_mm_or_ps(two[0], two[1]), _mm_or_ps(two[2], two[3]));
    const __m128 high = _mm_or_ps(_mm_or_ps(two[4], two[5]), _mm_or_ps(two[6], two[7]));
    bits = _mm_or_ps(bits, _mm_or_ps(low, high));
  }
  if (p < stop) {
    for (int j = 0; j < 8; ++j) {
      const __m128 one = _mm_load_ss(planes[j] + p);
      bits = _mm_or_ps(bits, one);
      acc[j] = _mm_add_pd(acc[j], _mm_cvtps_pd(one));
    }
    ++p;
  }
  for (int j = 0; j < 8; ++j) sums[j] += _mm_cvtsd_f64(_mm_add_sd(acc[j], _mm_unpackhi_pd(acc[j], acc[j])));
  valid &= all_probabilities(planes, start, p, bits);
}

// Copies 8 labels of a run of unassigned pixels, four pixels at a time, to their quads (one
// every `quad_stride` floats, a quad holding 4 floats per label, the block's at `quads`), and
// goes on with their argmax. A last quad that passes `stop` is done whole where the planes have
// its pixels (before `readable_end`): its pixels past `stop` fill the quad's unused places.
// Returns the first pixel left to the scalar loop.
int64_t copy_run_sse(const float* const* block_planes, int64_t p, int64_t stop, int64_t readable_end,
                     int64_t first_label, float* quads, int64_t quad_stride, float* best, int32_t* label, bool& valid) {
  const float* planes[8];  // in registers: the stores below may alias anything
  std::copy_n(block_planes, 8, planes);
  const int64_t start = p;
  __m128 bits = _mm_setzero_ps();
  for (; p < stop && p + 4 <= readable_end; p += 4, quads += quad_stride, best += 4, label += 4) {
    __m128 best4 = first_label == 0 ? _mm_loadu_ps(planes[0] + p) : _mm_loadu_ps(best);
    __m128i label4 = first_label == 0 ? _mm_setzero_si128() : _mm_loadu_si128(reinterpret_cast<const __m128i*>(label));
    __m128 any = _mm_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      const __m128 a = _mm_loadu_ps(planes[2 * i] + p), b = _mm_loadu_ps(planes[2 * i + 1] + p);
      any = _mm_or_ps(any, _mm_or_ps(a, b));
      _mm_storeu_ps(quads + 8 * i, a);
      _mm_storeu_ps(quads + 8 * i + 4, b);
      // the pair's first maximum (label 2i + 1 only where b > a), then the running one's
      const __m128i b_wins = _mm_castps_si128(_mm_cmpgt_ps(b, a));
      const __m128 pair_best = _mm_max_ps(a, b);
      const __m128i pair_label = _mm_sub_epi32(_mm_set1_epi32(static_cast<int32_t>(first_label + 2 * i)), b_wins);
      const __m128i better = _mm_castps_si128(_mm_cmpgt_ps(pair_best, best4));
      best4 = _mm_max_ps(pair_best, best4);
      label4 = _mm_or_si128(_mm_and_si128(better, pair_label), _mm_andnot_si128(better, label4));
    }
    bits = _mm_or_ps(bits, any);
    _mm_storeu_ps(best, best4);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(label), label4);
  }
  // (values past `stop` are the image's, checked where they are read for their own use)
  valid &= all_probabilities(planes, start, std::min(p, stop), bits);
  return std::min(p, stop);
}
#endif

template <typename prob_t>
using label_like_t = std::conditional_t<sizeof(prob_t) == 4, int32_t, int64_t>;

// What the relaxation keeps of a waiting pixel (slot), half a cache line; its probabilities follow.
struct Slot {
  double mass;           // the sum of its probabilities, near enough for bounds
  int32_t pixel;         // in the framed image
  int32_t active_round;  // its first visit bordering a mask; -1 before
  int32_t next_round;    // its next visit, once active
  uint32_t plan;         // counts its failed visits: tells its drift wakes still due
  float inverse;         // 1 / its mass (float), 0 for zeros; -1: exact distances only
};
static_assert(sizeof(Slot) == 32, "a slot's header is half a cache line");

// A sleeping pixel to reconsider when its region's path (the L1 length its normalized statistics
// have moved along) passes `path`, unless it has been visited since (its plan is no longer
// `plan`). Its distance to the region is at least `reach` minus the path by then.
struct DriftWake {
  double path;
  double reach;
  int32_t pixel;
  uint32_t plan;
};

bool wakes_later(const DriftWake& a, const DriftWake& b) { return a.path > b.path; }

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};

template <typename prob_t>
class DustFill {
 public:
  DustFill(const prob_t* probs, const int32_t* regions, int64_t num_labels, int64_t height, int64_t width)
      : probs_(probs), regions_(regions), L_(num_labels), Lp_((num_labels + kLanes - 1) / kLanes * kLanes),
        H_(height), W_(width), HW_(height * width), W2_(width + 2), HW2_((height + 2) * (width + 2)),
        current_(HW2_), next_(HW2_) {
    find_runs();
    stats_.assign(M_ * L_, 0.0);
    float_normalized_.assign(M_ * Lp_, 0.0f);
    version_.assign(M_, 1);
    float_version_.assign(M_, 0);
    mass_.assign(M_, 0.0);
    path_.assign(M_, 0.0);
    drift_.resize(M_);
    zeros_.assign(L_, 0.0);
    exact_normalized_.resize(4 * L_);
    mapping_.assign(HW2_, kOutside);
    // Slots of a cache line's multiple, not zeroed (every value used is written), room for every
    // unassigned pixel: pages of the slots never used (promoted pixels) are never touched.
    stride_ = (static_cast<int64_t>(sizeof(Slot)) + Lp_ * static_cast<int64_t>(sizeof(prob_t)) + 63) / 64 * 64;
    slots_.reset(static_cast<char*>(std::aligned_alloc(64, std::max<int64_t>(unassigned_, 1) * stride_)));
    TORCH_CHECK(slots_, "dust_fill: out of memory for ", unassigned_, " unassigned pixels");
    float_error_ = float_distance_error(L_, Lp_);
    margin_ = 2.0 * float_error_;
  }

  // Returns false when nothing is mapped after promotion: no pixel could ever border a mask and
  // Algorithm 4 would not terminate.
  bool run(const double* new_threshold, double join_threshold, double impatience) {
    read_probabilities(new_threshold);
    remaining_ = waiting_;
    if (remaining_ == 0) return true;
    if (M_ == 0 && waiting_ == unassigned_) return false;  // no region, nothing promoted
    tabulate_limits(join_threshold, impatience);
    activate_bordering_pixels();
    relax();
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
    for (int64_t y = 0; y < H_; ++y) {
      const int32_t* row = &mapping_[(y + 1) * W2_ + 1];
      for (int64_t x = 0; x < W_; ++x) out[y * W_ + x] = mask_label[row[x]];
    }
  }

  void write_masks(int32_t* out) const {
    for (int64_t y = 0; y < H_; ++y) std::copy_n(&mapping_[(y + 1) * W2_ + 1], W_, out + y * W_);
  }

  int64_t visits() const { return visits_; }

  // [M + L, L]: the regions' statistics, then the promoted masks' one-hot rows.
  void write_statistics(double* out) const {
    std::copy(stats_.begin(), stats_.end(), out);
    write_one_hot_rows(L_, out + M_ * L_);
  }

 private:
  // The image as runs of one id along its rows (runs_); validates the ids and sets M_ and
  // unassigned_, before anything else is allocated.
  void find_runs() {
    int32_t largest = -1, smallest = -1;
    int64_t unassigned = 0;
    for (int64_t row = 0; row < HW_; row += W_) {
      const int32_t* const row_end = regions_ + row + W_;
      for (const int32_t* at = regions_ + row; at < row_end;) {
        const int32_t k = *at;
        const int32_t* stop = std::find_if(at + 1, row_end, [k](int32_t id) { return id != k; });
        // (pixel indices fit int32: H * W < 2^31, checked by the ops)
        runs_.push_back({static_cast<int32_t>(at - regions_), static_cast<int32_t>(stop - regions_), k});
        largest = std::max(largest, k);
        smallest = std::min(smallest, k);
        unassigned += k < 0 ? stop - at : 0;
        at = stop;
      }
    }
    TORCH_CHECK_VALUE(
        smallest >= -1 && largest < HW_, "regions: expected ids in [-1, H*W) (-1 = unassigned), got ids from ",
        smallest, " to ", largest);
    M_ = static_cast<int64_t>(largest) + 1;
    unassigned_ = unassigned;
    TORCH_CHECK_VALUE(L_ <= kMaxStatistics, "probs: expected at most ", kMaxStatistics, " labels, got ", L_);
    TORCH_CHECK_VALUE(
        M_ * L_ <= kMaxStatistics, "dust_fill: ", M_, " regions x ", L_, " labels need ", M_ * L_,
        " label statistics, more than the ", kMaxStatistics, " supported (a larger min_size keeps fewer regions)");
  }

  // ------------------------------------------------------------------------- the read pass

  // Pixels [begin, end) of one row, all of region `region` (-1: unassigned).
  struct Run {
    int32_t begin, end;
    int32_t region;
  };

  // The runs of a chunk of rows.
  struct Runs {
    const Run* first;
    const Run* last;
    const Run* begin() const { return first; }
    const Run* end() const { return last; }
  };

  // Chunk by chunk of rows, label block by label block: each value is read once (a block's
  // planes stream side by side; more planes at once would collide in the caches' sets, as
  // planes are often a power of two apart), then the chunk's unassigned pixels are settled.
  void read_probabilities(const double* new_threshold) {
    const int64_t row_bytes = L_ * static_cast<int64_t>(sizeof(prob_t)) * std::max<int64_t>(W_, 1);
    const int64_t rows = std::max<int64_t>(1, kChunkBytes / row_bytes);
    const Run* const all_runs_end = runs_.data() + runs_.size();
    chunk_ = {runs_.data(), runs_.data()};
    for (int64_t y = 0; y < H_; y += rows) {
      const int64_t end = std::min(H_, y + rows) * W_;
      chunk_.first = chunk_.last;
      while (chunk_.last < all_runs_end && chunk_.last->begin < end) ++chunk_.last;
      make_room_for_copies();
      int64_t l = 0;
      for (; l + kLabelBlock <= L_; l += kLabelBlock) read_block<kLabelBlock>(l);
      for (; l < L_; ++l) read_block<1>(l);
      settle_unassigned(y, end, new_threshold);
    }
    for (int64_t k = 0; k < M_; ++k) {
      for (int64_t l = 0; l < L_; ++l) mass_[k] += stats_[k * L_ + l];
      valid_ &= std::isfinite(mass_[k]);  // NaN and infinities of region pixels show here
    }
    check_probabilities(valid_);
  }

  // The copies of the chunk's unassigned pixels go in quads of places, each run's from a new
  // quad: a quad holds [Lp][4] values, so that the read pass stores four pixels of a label at
  // once. Place u's quad and its place in it:
  prob_t* quad_of(int64_t u) { return copies_.data() + (u / 4) * Lp_ * 4; }
  static int64_t place_in_quad(int64_t u) { return u % 4; }
  static int64_t quads_for(const Run& run) { return (run.end - run.begin + 3) / 4; }

  // Sizes the chunk's copies (the padding labels are zero, never written), best and label.
  void make_room_for_copies() {
    int64_t quads = 0;
    for (const Run& run : chunk_) quads += run.region < 0 ? quads_for(run) : 0;
    if (quads * 4 <= static_cast<int64_t>(best_.size())) return;
    best_.resize(quads * 4);
    label_.resize(quads * 4);
    copies_.resize(quads * 4 * Lp_, prob_t(0));
  }

  // Labels first_label.. first_label + n - 1 of the chunk's runs: a region's run adds to its
  // sums, run by run in scan order; unassigned pixels are copied to the chunk's buffer, and their
  // running argmax (the first maximum) goes on.
  template <int64_t n>
  void read_block(int64_t first_label) {
    for (int64_t j = 0; j < n; ++j) block_planes_[j] = probs_ + (first_label + j) * HW_;
    int64_t u = 0;  // the place of the chunk's next unassigned run
    for (const Run& run : chunk_) {
      if (run.region < 0) {
        copy_run<n>(run.begin, run.end, first_label, u);
        u += 4 * quads_for(run);
      } else {
        sum_run<n>(&stats_[run.region * L_ + first_label], run.begin, run.end, first_label);
      }
    }
  }

  // Adds the run [p, stop) to the sums: per label, its even and its odd pixels in two lanes, in
  // order from 0, then the lanes' sum.
  template <int64_t n>
  void sum_run(double* sums, int64_t p, int64_t stop, int64_t first_label) {
#if defined(__SSE2__)
    if constexpr (std::is_same_v<prob_t, float> && n == 8) {
      sum_run_sse(sums, block_planes_, p, stop, valid_);
      return;
    }
#endif
    bool valid = true;
    for (int64_t j = 0; j < n; ++j) {
      const prob_t* plane = probs_ + (first_label + j) * HW_;
      double lane[2] = {0.0, 0.0};
      for (int64_t q = p; q < stop; ++q) {
        valid &= is_probability(plane[q]);
        lane[(q - p) & 1] += static_cast<double>(plane[q]);
      }
      sums[j] += lane[0] + lane[1];
    }
    valid_ &= valid;
  }

  // Unassigned pixels [p, stop), from place u on (the start of a quad).
  template <int64_t n>
  void copy_run(int64_t p, int64_t stop, int64_t first_label, int64_t u) {
    const prob_t* planes = probs_ + first_label * HW_;
#if defined(__SSE2__)
    if constexpr (std::is_same_v<prob_t, float> && n == 8) {
      const int64_t done = copy_run_sse(block_planes_, p, stop, HW_, first_label, quad_of(u) + 4 * first_label,
                                        4 * Lp_, best_.data() + u, label_.data() + u, valid_);
      u += done - p;
      p = done;
    }
#endif
    bool valid = true;
    for (; p < stop; ++p, ++u) {
      prob_t* copy = quad_of(u) + 4 * first_label + place_in_quad(u);
      prob_t best = first_label == 0 ? planes[p] : best_[u];
      label_like_t<prob_t> label = first_label == 0 ? 0 : label_[u];
      for (int64_t j = 0; j < n; ++j) {
        const prob_t v = planes[j * HW_ + p];
        valid &= is_probability(v);
        copy[4 * j] = v;
        label = v > best ? static_cast<label_like_t<prob_t>>(first_label + j) : label;
        best = std::max(best, v);
      }
      best_[u] = best;
      label_[u] = label;
    }
    valid_ &= valid;
  }

  // The framed mapping of the chunk's rows: regions as they are; unassigned pixels whose most
  // probable label reaches its threshold are promoted, the others wait, copied to their slots.
  void settle_unassigned(int64_t first_row, int64_t end, const double* new_threshold) {
    for (int64_t y = first_row; y * W_ < end; ++y) std::copy_n(regions_ + y * W_, W_, &mapping_[(y + 1) * W2_ + 1]);
    int64_t next_run = 0;
    for (const Run& run : chunk_) {
      if (run.region >= 0) continue;
      int64_t u = next_run;
      next_run += 4 * quads_for(run);
      const int64_t framed = run.begin + (run.begin / W_) * 2 + W2_ + 1;  // runs stay in their row
      for (int64_t p = run.begin; p < run.end; ++p, ++u) {
        const int64_t pixel = framed + (p - run.begin);
        if (static_cast<double>(best_[u]) >= new_threshold[label_[u]]) {
          mapping_[pixel] = static_cast<int32_t>(M_ + label_[u]);
        } else {
          make_waiting(pixel, quad_of(u) + place_in_quad(u));
        }
      }
    }
  }

  // Gives the pixel the next slot and its copy (`read`: its first value, in its quad).
  void make_waiting(int64_t pixel, const prob_t* read) {
    const int32_t slot = static_cast<int32_t>(waiting_++);
    mapping_[pixel] = ~slot;
    prob_t* copy = values(slot);
    for (int64_t l = 0; l < Lp_; ++l) copy[l] = read[4 * l];
    const double mass = mass_of(copy);
    const bool floats_will_do = mass == 0.0 || (mass >= kMinFloatMass && mass <= kMaxFloatMass);
    const float inverse = !floats_will_do ? -1.0f : mass > 0.0 ? static_cast<float>(1.0 / mass) : 0.0f;
    Slot& s = slot_at(slot);
    s = Slot{mass, static_cast<int32_t>(pixel), -1, 0, 0, inverse};
  }

  // The sum of a padded copy, in float lanes where their sum is in the range of float distances
  // (near enough for bounds), else in double (so that only a zero pixel sums to zero).
  double mass_of(const prob_t* copy) const {
    float lane[kLanes] = {};
    for (int64_t l = 0; l < Lp_; l += kLanes) {
      for (int64_t j = 0; j < kLanes; ++j) lane[j] += static_cast<float>(copy[l + j]);
    }
    const float mass = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
    if (mass >= kMinFloatMass && mass <= kMaxFloatMass) return mass;
    double total = 0.0;
    for (int64_t l = 0; l < L_; ++l) total += static_cast<double>(copy[l]);
    return total;
  }

  // ------------------------------------------------------------------------- the relaxation

  bool is_waiting(int64_t pixel) const { return mapping_[pixel] < 0; }
  int32_t slot_of(int64_t pixel) const { return ~mapping_[pixel]; }
  Slot& slot_at(int32_t slot) const { return *reinterpret_cast<Slot*>(slots_.get() + slot * stride_); }
  prob_t* values(int32_t slot) const {
    return reinterpret_cast<prob_t*>(slots_.get() + slot * stride_ + static_cast<int64_t>(sizeof(Slot)));
  }

  // The 4-neighbours in the pseudo-code's order (y+1,x), (y-1,x), (y,x+1), (y,x-1).
  void neighbours_of(int64_t pixel, int64_t* out) const {
    out[0] = pixel + W2_;
    out[1] = pixel - W2_;
    out[2] = pixel + 1;
    out[3] = pixel - 1;
  }

  static bool is_mask(int32_t m) { return (m >= 0) & (m != kOutside); }

  // The distinct masks among the pixel's neighbours, in neighbours_of's order. Without branches
  // (which neighbours are masks is hard to predict): each is written at the next place, which
  // moves on only if it is a new mask. `masks` has room for 4.
  int bordering_masks(int64_t pixel, int32_t* masks) const {
    const int32_t m[4] = {mapping_[pixel + W2_], mapping_[pixel - W2_], mapping_[pixel + 1], mapping_[pixel - 1]};
    int count = 0;
    for (int i = 0; i < 4; ++i) {
      bool is_new = is_mask(m[i]);
      for (int j = 0; j < i; ++j) is_new &= m[j] != m[i];
      masks[count] = m[i];
      count += is_new;
    }
    return count;
  }

  // limits_[f]: the threshold at a visit after f failed ones, join_threshold * patience, the
  // patience multiplied by impatience (> 1) once per failure, as the pseudo-code does: increasing.
  void tabulate_limits(double join_threshold, double impatience) {
    for (double patience = 1.0; limits_.empty() || !(limits_.back() > kFarthest); patience *= impatience) {
      limits_.push_back(join_threshold * patience);
    }
  }

  // Round 0 would visit the waiting pixels that border a mask from the start: each is planned
  // from the bounds of its distances (the slots are read in order).
  void activate_bordering_pixels() {
    for (int32_t slot = 0; slot < waiting_; ++slot) {
      if (slot + 8 < waiting_) __builtin_prefetch(&slot_at(slot + 8));
      Slot& s = slot_at(slot);
      int32_t masks[4];
      const int n = bordering_masks(s.pixel, masks);
      if (n == 0) continue;
      s.active_round = 0;
      double reach[4];
      reaches(slot, masks, n, reach);
      plan_from(s.pixel, s, 0, masks, n, reach);
    }
  }

  void relax() {
    for (round_ = 0; remaining_ > 0; ++round_) {
      // Everyone sleeps past the next round: skip the idle rounds.
      if (current_.empty() && next_.empty()) round_ = first_wake_round_from(round_);
      TORCH_CHECK(round_ < std::numeric_limits<int32_t>::max() - static_cast<int64_t>(limits_.size()),
                  "dust_fill: more relaxation rounds than supported");
      TORCH_INTERNAL_ASSERT(round_ < static_cast<int64_t>(wake_at_.size()) || !current_.empty() || !next_.empty());
      wake_sleepers();
      visit_round();
      std::swap(current_, next_);
    }
  }

  int64_t first_wake_round_from(int64_t round) const {
    while (round < static_cast<int64_t>(wake_at_.size()) && wake_at_[round].empty()) ++round;
    return round;
  }

  void wake_sleepers() {
    if (round_ >= static_cast<int64_t>(wake_at_.size())) return;
    for (const int32_t pixel : wake_at_[round_]) {
      if (is_waiting(pixel) && slot_at(slot_of(pixel)).next_round == round_) current_.insert(pixel);
    }
    std::vector<int32_t>().swap(wake_at_[round_]);
  }

  // The round's pixels in its order (descending in even rounds), as pixels join and wake others.
  // A pixel that has joined, or been planned for another round, since it was put in the set is
  // passed over. While visiting one, the data of the next is on its way.
  void visit_round() {
    descending_ = round_ % 2 == 0;
    int64_t pixel = descending_ ? current_.last_until(HW2_ - 1) : current_.first_from(0);
    while (pixel >= 0) {
      current_.erase(pixel);
      const int64_t next = following(pixel);
      if (next >= 0) prefetch_slot(next);
      added_now_ = false;
      if (is_waiting(pixel) && slot_at(slot_of(pixel)).next_round == round_) visit(pixel);
      pixel = added_now_ ? following(pixel) : next;
    }
  }

  int64_t following(int64_t pixel) {
    return descending_ ? current_.last_until(pixel - 1) : current_.first_from(pixel + 1);
  }

  void prefetch_slot(int64_t pixel) const {
    if (!is_waiting(pixel)) return;
    const int32_t slot = slot_of(pixel);
    const char* at = reinterpret_cast<const char*>(&slot_at(slot));
    for (int64_t offset = 0; offset < stride_ && offset < 256; offset += 64) __builtin_prefetch(at + offset);
    __builtin_prefetch(&mapping_[pixel + W2_]);
    __builtin_prefetch(&mapping_[pixel - W2_]);
  }

  // Whether `pixel` comes after the pixel being visited in this round's order.
  bool ahead(int64_t pixel) const { return descending_ ? pixel < cursor_ : pixel > cursor_; }

  // The first round the pixel can be visited at from now: its next place in the order.
  int64_t earliest(int64_t pixel) const { return ahead(pixel) ? round_ : round_ + 1; }

  // Its next visit at `round` (this one, the next, or later).
  void plan(int64_t pixel, Slot& s, int64_t round) {
    s.next_round = static_cast<int32_t>(round);
    if (round == round_) {
      current_.insert(pixel);
      added_now_ = true;
    } else if (round == round_ + 1) {
      next_.insert(pixel);
    } else {
      if (static_cast<int64_t>(wake_at_.size()) <= round) wake_at_.resize(round + 1);
      wake_at_[round].push_back(static_cast<int32_t>(pixel));
    }
  }

  // The first round from `from` on whose threshold may pass a distance of at least `reach`.
  int64_t first_passing_round(const Slot& s, int64_t from, double reach) const {
    const auto passing = std::upper_bound(limits_.begin() + (from - s.active_round), limits_.end(), reach);
    TORCH_INTERNAL_ASSERT(passing != limits_.end(), "dust_fill: a distance beyond the tabulated thresholds");
    return s.active_round + (passing - limits_.begin());
  }

  // Plans the pixel's next visit, from round `from` on, where its distances to `masks` are at
  // least `reach` (lower bounds, margins taken): at `from` if a threshold then may pass one,
  // else at the first round whose threshold may, and the regions' drift may bring that forward.
  void plan_from(int64_t pixel, Slot& s, int64_t from, const int32_t* masks, int n, const double* reach) {
    const int64_t round = first_passing_round(s, from, reach[first_smallest(reach, n)]);
    plan(pixel, s, round);
    if (round == from) return;
    for (int k = 0; k < n; ++k) guard(pixel, s, masks[k], reach[k], round);
  }

  // Until its visit at `round`, the pixel fails as long as its distance to mask k, at least
  // `reach` now, stays above the threshold of the round before: it is reconsidered when region
  // k's path has grown by the difference.
  void guard(int64_t pixel, const Slot& s, int32_t k, double reach, int64_t round) {
    if (k >= M_) return;  // promoted masks never change
    const double slack = reach - limits_[round - 1 - s.active_round];
    if (slack >= 2.0) return;  // beyond any move of a normalized vector
    std::vector<DriftWake>& heap = drift_[k];
    heap.push_back({path_[k] + slack, reach + path_[k], static_cast<int32_t>(pixel), s.plan});
    std::push_heap(heap.begin(), heap.end(), wakes_later);
  }

  void visit(int64_t pixel) {
    ++visits_;
    cursor_ = pixel;
    const int32_t slot = slot_of(pixel);
    Slot& s = slot_at(slot);
    int32_t masks[4];
    const int n = bordering_masks(pixel, masks);
    TORCH_INTERNAL_ASSERT(n > 0, "dust_fill: visited a pixel that borders no mask");
    double distance[4];
    const int32_t chosen = decide(slot, masks, n, limits_[round_ - s.active_round], distance);
    if (chosen >= 0) {
      join(pixel, slot, masks[chosen], distance[chosen]);
      return;
    }
    // Failed: the drift wakes of its last plan are void, its distances known again.
    ++s.plan;
    for (int k = 0; k < n; ++k) distance[k] -= margin_;
    plan_from(pixel, s, round_ + 1, masks, n, distance);
  }

  // `distance`: the pixel's to `mask`, within the float error bound.
  void join(int64_t pixel, int32_t slot, int32_t mask, double distance) {
    mapping_[pixel] = mask;
    --remaining_;
    if (mask < M_) add_to_region(slot, mask, distance);
    int64_t neighbours[4];
    neighbours_of(pixel, neighbours);
    for (const int64_t q : neighbours) {
      if (!is_waiting(q)) continue;
      const int32_t neighbour = slot_of(q);
      Slot& s = slot_at(neighbour);
      const int64_t first = earliest(q);
      if (s.active_round < 0) {
        // Its first visit bordering a mask: `mask` is the only one.
        s.active_round = static_cast<int32_t>(first);
        double reach;
        reaches(neighbour, &mask, 1, &reach);
        plan_from(q, s, first, &mask, 1, &reach);
      } else if (s.next_round > first && !borders_besides(q, pixel, mask)) {
        // It sleeps, and has bordered the masks of its other neighbours since its plan (a join
        // into any of them would have come here): `mask` may be new.
        double reach;
        reaches(neighbour, &mask, 1, &reach);
        reconsider(q, s, first, mask, reach);
      }
    }
  }

  // A sleeping pixel whose distance to mask k is at least `reach` now: its visit comes forward
  // if a threshold from round `first` on may pass that, and k is guarded until its visit.
  void reconsider(int64_t pixel, Slot& s, int64_t first, int32_t k, double reach) {
    const int64_t round = first_passing_round(s, first, reach);
    if (round < s.next_round) plan(pixel, s, round);
    if (s.next_round > first) guard(pixel, s, k, reach, s.next_round);
  }

  // Whether a neighbour of `pixel` other than `except` is in `mask`.
  bool borders_besides(int64_t pixel, int64_t except, int32_t mask) const {
    int64_t neighbours[4];
    neighbours_of(pixel, neighbours);
    for (const int64_t q : neighbours) {
      if (q != except && mapping_[q] == mask) return true;
    }
    return false;
  }

  // Adding mass s at distance d to a region of mass T moves its normalized statistics by
  // s d / (T + s) in L1 (they move towards the pixel's): the region's path grows by that, with
  // room for the error of d and of the masses. Sleepers guarded against that path are reconsidered.
  void add_to_region(int32_t slot, int32_t k, double distance) {
    double* s = &stats_[k * L_];
    const prob_t* v = values(slot);
    for (int64_t l = 0; l < L_; ++l) s[l] += static_cast<double>(v[l]);
    const double added = slot_at(slot).mass, total = mass_[k] + added;
    if (total > 0.0) path_[k] += added / total * (distance + float_error_) * kPathRoom;
    mass_[k] = total;
    ++version_[k];
    std::vector<DriftWake>& heap = drift_[k];
    while (!heap.empty() && heap.front().path < path_[k]) {
      std::pop_heap(heap.begin(), heap.end(), wakes_later);
      const DriftWake due = heap.back();
      heap.pop_back();
      if (!is_waiting(due.pixel)) continue;
      Slot& sleeper = slot_at(slot_of(due.pixel));
      if (sleeper.plan != due.plan) continue;
      const int64_t first = earliest(due.pixel);
      if (sleeper.next_round <= first) continue;  // visited next anyway
      reconsider(due.pixel, sleeper, first, k, due.reach - path_[k]);
    }
  }

  // Lower bounds of the distances from the slot's pixel to the normalized statistics of `masks`,
  // margin taken: its float distances, or 0 where it needs exact ones.
  void reaches(int32_t slot, const int32_t* masks, int n, double* out) {
    if (slot_at(slot).inverse < 0.0f) {
      std::fill(out, out + n, 0.0);
      return;
    }
    float_distances(slot, masks, n, out);
    for (int k = 0; k < n; ++k) out[k] -= margin_;
  }

  // Which of `masks` the pixel joins at this visit (its index), or kNoMatch; `distance` gets the
  // distances to `masks`, within the float error bound.
  int decide(int32_t slot, const int32_t* masks, int n, double limit, double* distance) {
    if (slot_at(slot).inverse >= 0.0f) {
      float_distances(slot, masks, n, distance);
      const int verdict = sure_verdict(n, limit, distance);
      if (verdict != kUnsure) return verdict;
    }
    exact_distances(slot, masks, n, distance);
    double closest = 1000.0;
    int chosen = kNoMatch;
    for (int k = 0; k < n; ++k) {
      if (distance[k] < limit && distance[k] < closest) closest = distance[k], chosen = k;
    }
    return chosen;
  }

  // The pseudo-code's choice (the first mask of smallest distance below `limit`) where the float
  // distances settle it whatever their error: kNoMatch, its index, or kUnsure.
  int sure_verdict(int n, double limit, const double* distance) const {
    const int closest = first_smallest(distance, n);
    const double d = distance[closest];
    if (d >= limit + float_error_) return kNoMatch;
    bool unsure = !(d < limit - float_error_);
    for (int k = 0; k < n; ++k) unsure |= (k != closest) & !(distance[k] > d + 2.0 * float_error_);
    return unsure ? kUnsure : closest;
  }

  // L1 distances in float from the pixel's normalized probabilities to the normalized statistics
  // of `masks`, in kLanes lanes. To a promoted mask (one-hot on label l) the distance is
  // 2 - 2 v[l] / sum(v), or 1 for an all-zero pixel.
  void float_distances(int32_t slot, const int32_t* masks, int n, double* out) {
    const prob_t* v = values(slot);
    const float inverse = slot_at(slot).inverse;
    for (int k = 0; k < n; ++k) {
      if (masks[k] >= M_) {
        const float share = static_cast<float>(v[masks[k] - M_]) * inverse;
        out[k] = inverse > 0.0f ? 2.0 - 2.0 * static_cast<double>(share) : 1.0;
        continue;
      }
      const float* stats = float_normalized(masks[k]);
      float lane[kLanes] = {};
      for (int64_t l = 0; l < Lp_; l += kLanes) {
        for (int64_t j = 0; j < kLanes; ++j) lane[j] += std::abs(static_cast<float>(v[l + j]) * inverse - stats[l + j]);
      }
      out[k] = static_cast<double>(((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7])));
    }
  }

  // Region k's normalized statistics in float, recomputed only after it has grown.
  const float* float_normalized(int32_t k) {
    float* out = &float_normalized_[k * Lp_];
    if (float_version_[k] != version_[k]) {
      const double* s = &stats_[k * L_];
      double total = 0.0;
      for (int64_t l = 0; l < L_; ++l) total += s[l];
      const double inverse = total > 0.0 ? 1.0 / total : 0.0;
      for (int64_t l = 0; l < L_; ++l) out[l] = static_cast<float>(s[l] * inverse);
      float_version_[k] = version_[k];
    }
    return out;
  }

  // The pseudo-code's distances: L1, summed over labels 0..L-1 in order (the sums run side by side).
  void exact_distances(int32_t slot, const int32_t* masks, int n, double* out) {
    const prob_t* v = values(slot);
    double total = 0.0;
    for (int64_t l = 0; l < L_; ++l) total += static_cast<double>(v[l]);
    const double inverse = total > 0.0 ? 1.0 / total : 0.0;
    const double* stats[4];
    int64_t hot[4];  // the label of a promoted mask's one-hot statistics, -1 for a region
    for (int k = 0; k < n; ++k) {
      const bool region = masks[k] < M_;
      if (region) normalize(&stats_[masks[k] * L_], L_, &exact_normalized_[k * L_]);
      stats[k] = region ? &exact_normalized_[k * L_] : zeros_.data();
      hot[k] = region ? -1 : masks[k] - M_;
      out[k] = 0.0;
    }
    for (int64_t l = 0; l < L_; ++l) {
      const double a = static_cast<double>(v[l]) * inverse;
      for (int k = 0; k < n; ++k) out[k] += std::abs(a - (l == hot[k] ? 1.0 : stats[k][l]));
    }
  }

  const prob_t* probs_;
  const int32_t* regions_;
  const int64_t L_, Lp_, H_, W_, HW_;
  const int64_t W2_, HW2_;  // the framed image
  int64_t M_ = 0;
  int64_t unassigned_ = 0;  // pixels of no region
  int64_t remaining_ = 0;  // waiting pixels not joined yet
  double float_error_ = 0.0, margin_ = 0.0;
  std::vector<double> limits_;    // by failed visits
  std::vector<int32_t> mapping_;  // framed: mask of each pixel; ~slot of a waiting pixel
  // The read pass: the image's runs in scan order, the chunk's; per place of the chunk's
  // unassigned pixels, the most probable label so far and its probability, and its copy (in
  // quads, padded with zeros to Lp labels); whether all values read are probabilities.
  std::vector<Run> runs_;
  Runs chunk_{};
  std::vector<prob_t> best_;
  std::vector<label_like_t<prob_t>> label_;
  std::vector<prob_t> copies_;
  const prob_t* block_planes_[kLabelBlock];  // the planes of the block being read
  bool valid_ = true;
  // Per waiting pixel (slot), in scan order: its Slot, then its probabilities (padded with
  // zeros to Lp), in strides of whole cache lines: the data of a visit is in one place.
  std::unique_ptr<char[], FreeDeleter> slots_;
  int64_t stride_ = 0;
  int64_t waiting_ = 0;
  // Per region.
  std::vector<double> stats_;             // [region][label]
  std::vector<double> mass_;              // statistics' sum (bounds their drift)
  std::vector<uint32_t> version_;         // counts its joins
  std::vector<float> float_normalized_;   // [region][Lp], as of float_version_
  std::vector<uint32_t> float_version_;
  std::vector<double> path_;              // the L1 length its normalized statistics have moved, at most
  std::vector<std::vector<DriftWake>> drift_;  // min-heaps on path
  std::vector<double> zeros_, exact_normalized_;  // scratch of exact_distances
  // The schedule.
  int64_t round_ = 0;
  bool descending_ = true;
  int64_t cursor_ = 0;                // the pixel being visited
  bool added_now_ = false;            // whether its visit added pixels to this round
  PixelSet current_, next_;           // pixels to visit this round, next round
  std::vector<std::vector<int32_t>> wake_at_;  // per round: pixels sleeping until then
  int64_t visits_ = 0;                         // pixels visited (their distances computed to decide)
};

}  // namespace

template <typename prob_t>
void argmax_image(const prob_t* probs, int64_t num_labels, int64_t pixels, int64_t* out) {
  prob_t best[kArgmaxPixels];
  label_like_t<prob_t> label[kArgmaxPixels];
  bool valid = true;
  for (int64_t start = 0; start < pixels; start += kArgmaxPixels) {
    const int64_t end = std::min(pixels, start + kArgmaxPixels);
    valid &= argmax_pixels(probs, num_labels, pixels, start, end, best, label);
    std::copy(label, label + (end - start), out + start);
  }
  check_probabilities(valid);
}

template <typename prob_t>
void dust_fill_image(const prob_t* probs, const int32_t* regions, int64_t num_labels, int64_t height, int64_t width,
                     const double* new_threshold, double join_threshold, double impatience, const DustFillOutput& out) {
  DustFill<prob_t> fill(probs, regions, num_labels, height, width);
  if (fill.run(new_threshold, join_threshold, impatience)) {
    fill.write_labels(out.labels);
    if (out.masks) fill.write_masks(out.masks);
    if (out.statistics) fill.write_statistics(out.statistics);
    if (out.visits) *out.visits = fill.visits();
    return;
  }
  // No region (M = 0): every pixel goes to its argmax label's promoted mask, whose id is the label.
  argmax_image(probs, num_labels, height * width, out.labels);
  if (out.masks) std::copy(out.labels, out.labels + height * width, out.masks);
  if (out.statistics) write_one_hot_rows(num_labels, out.statistics);
  if (out.visits) *out.visits = 0;
}

template void argmax_image<float>(const float*, int64_t, int64_t, int64_t*);
template void argmax_image<double>(const double*, int64_t, int64_t, int64_t*);
template void dust_fill_image<float>(
    const float*, const int32_t*, int64_t, int64_t, int64_t, const double*, double, double, const DustFillOutput&);
template void dust_fill_image<double>(
    const double*, const int32_t*, int64_t, int64_t, int64_t, const double*, double, double, const DustFillOutput&);

}  // namespace unet_postprocess
