// Boundary maps: the training target from a label map, and the way from a predicted boundary
// probability to regions: threshold, close small gaps (the paper author's preparation, or a plain
// closing), SEGMENT (paper section 5.2).
#include "postprocess.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace unet_postprocess {

template <typename label_t>
void boundary_from_labels_image(const label_t* labels, int64_t height, int64_t width, bool* out) {
  for (int64_t y = 0; y < height; ++y) {
    const label_t* row = labels + y * width;
    const label_t* above = y > 0 ? row - width : nullptr;
    const label_t* below = y + 1 < height ? row + width : nullptr;
    for (int64_t x = 0; x < width; ++x) {
      const label_t v = row[x];
      out[y * width + x] = (x > 0 && row[x - 1] != v) || (x + 1 < width && row[x + 1] != v) ||
          (above && above[x] != v) || (below && below[x] != v);
    }
  }
}

namespace {

// The smallest prob_t value >= threshold: for every finite v of prob_t, double(v) >= threshold
// exactly when v >= it, so the comparisons run in prob_t (four floats at a time with SSE2).
template <typename prob_t>
prob_t threshold_as(double threshold) {
  if constexpr (std::is_same_v<prob_t, double>) {
    return threshold;
  } else {
    constexpr double largest = std::numeric_limits<float>::max();
    if (threshold > largest) return std::numeric_limits<float>::infinity();  // no finite value reaches it
    if (threshold < -largest) return -std::numeric_limits<float>::max();
    float rounded = static_cast<float>(threshold);
    if (static_cast<double>(rounded) < threshold) rounded = std::nextafter(rounded, std::numeric_limits<float>::infinity());
    return rounded;
  }
}

#if defined(__SSE2__)
// threshold_row's loop over whole words of float values; returns the first column it leaves to
// the scalar loop and clears `finite` when a value is NaN or infinite (v - v is NaN for those).
int64_t threshold_words_sse(const float* values, int64_t width, float threshold, uint64_t* row, bool& finite) {
  const __m128 bound = _mm_set1_ps(threshold), zero = _mm_setzero_ps();
  __m128 all_finite = _mm_cmpeq_ps(zero, zero);
  int64_t x = 0;
  for (; x + 64 <= width; x += 64) {
    uint64_t word = 0;
    for (int i = 0; i < 16; ++i) {
      const __m128 v = _mm_loadu_ps(values + x + 4 * i);
      word |= uint64_t(_mm_movemask_ps(_mm_cmpge_ps(v, bound))) << (4 * i);
      all_finite = _mm_and_ps(all_finite, _mm_cmpeq_ps(_mm_sub_ps(v, v), zero));
    }
    row[x >> 6] = word;
  }
  finite = finite && _mm_movemask_ps(all_finite) == 0xF;
  return x;
}
#endif

// Sets the bits of `row` (all 0) where values >= threshold; returns whether every value is finite.
template <typename prob_t>
bool threshold_row(const prob_t* values, int64_t width, prob_t threshold, uint64_t* row) {
  bool finite = true;
  int64_t x = 0;
#if defined(__SSE2__)
  if constexpr (std::is_same_v<prob_t, float>) x = threshold_words_sse(values, width, threshold, row, finite);
#endif
  for (; x < width; ++x) {
    const prob_t v = values[x];
    row[x >> 6] |= uint64_t(v >= threshold) << (x & 63);
    finite &= (v - v) == prob_t(0);
  }
  return finite;
}

// boundary_prob >= threshold as bits. Finiteness is checked per row without a branch per value;
// only a failed check looks for the value to name.
template <typename prob_t>
BitImage threshold_bits(const prob_t* boundary_prob, int64_t height, int64_t width, double threshold) {
  BitImage boundary(height, width);
  const prob_t bound = threshold_as<prob_t>(threshold);
  bool finite = true;
  for (int64_t y = 0; y < height; ++y) finite &= threshold_row(boundary_prob + y * width, width, bound, boundary.row(y));
  for (int64_t p = 0; !finite && p < height * width; ++p) {
    const double v = static_cast<double>(boundary_prob[p]);
    TORCH_CHECK_VALUE(std::isfinite(v), "boundary_prob: expected finite probabilities, got ", v);
  }
  return boundary;
}

// In place, along every row: distance to the nearest source (0) of the row, or `far`. Each sweep
// is a chain of dependent steps, so rows go in groups whose chains interleave.
void row_distance(int32_t* d, int64_t height, int64_t width) {
  constexpr int64_t kRows = 8;
  int64_t y = 0;
  auto sweep_rows = [&](auto rows) {
    constexpr int64_t n = decltype(rows)::value;
    int32_t* r[n];
    for (int64_t i = 0; i < n; ++i) r[i] = d + (y + i) * width;
    for (int64_t x = 1; x < width; ++x) {
      for (int64_t i = 0; i < n; ++i) r[i][x] = std::min(r[i][x], r[i][x - 1] + 1);
    }
    for (int64_t x = width - 2; x >= 0; --x) {
      for (int64_t i = 0; i < n; ++i) r[i][x] = std::min(r[i][x], r[i][x + 1] + 1);
    }
    y += n;
  };
  while (y + kRows <= height) sweep_rows(std::integral_constant<int64_t, kRows>{});
  while (y < height) sweep_rows(std::integral_constant<int64_t, 1>{});
}

// In place, along every column, sweeping whole rows at a time (which vectorizes).
void column_distance(int32_t* d, int64_t height, int64_t width) {
  for (int64_t y = 1; y < height; ++y) {
    int32_t* row = d + y * width;
    for (int64_t x = 0; x < width; ++x) row[x] = std::min(row[x], row[x - width] + 1);
  }
  for (int64_t y = height - 2; y >= 0; --y) {
    int32_t* row = d + y * width;
    for (int64_t x = 0; x < width; ++x) row[x] = std::min(row[x], row[x + width] + 1);
  }
}

// In place, on a map of 0 (sources) and `far` (> radius): 0 where within `radius` steps of a
// source in the 8-neighbourhood (Chebyshev distance: a square), `far` elsewhere. Separable.
void dilate_square(int32_t* map, int64_t height, int64_t width, int32_t radius, int32_t far) {
  const int64_t pixels = height * width;
  row_distance(map, height, width);
  for (int64_t p = 0; p < pixels; ++p) map[p] = map[p] <= radius ? 0 : far;
  column_distance(map, height, width);
  for (int64_t p = 0; p < pixels; ++p) map[p] = map[p] <= radius ? 0 : far;
}

// As dilate_square, in the 4-neighbourhood (city-block distance: a diamond).
void dilate_diamond(int32_t* map, int64_t height, int64_t width, int32_t radius, int32_t far) {
  const int64_t pixels = height * width;
  column_distance(map, height, width);
  row_distance(map, height, width);
  for (int64_t p = 0; p < pixels; ++p) map[p] = map[p] <= radius ? 0 : far;
}

// In place: pixels equal to `source` become 1 when within the octagon of `steps` dilations that
// alternate the 8- and the 4-neighbourhood of such a pixel, 0 otherwise. The octagon is the
// Minkowski sum of a square (the 8-neighbour steps) and a diamond (the 4-neighbour steps), so
// we dilate by each in turn.
void dilate_octagon(std::vector<int32_t>& map, int64_t height, int64_t width, int32_t steps, int32_t source) {
  const int32_t far = steps + 1;
  for (int32_t& v : map) v = v == source ? 0 : far;
  dilate_square(map.data(), height, width, (steps + 1) / 2, far);
  dilate_diamond(map.data(), height, width, steps / 2, far);
  for (int32_t& v : map) v = v == 0;
}

// The documented cap on both closings' iterations, which bounds their work: radii beyond
// max(height, width) change nothing (the dilation covers the image already).
int32_t capped_radius(int64_t iterations, int64_t height, int64_t width) {
  return static_cast<int32_t>(std::min<int64_t>(iterations, std::max(height, width)));
}

}  // namespace

// Closing = erosion(dilation(boundary)) by the octagon, on a canvas with a margin of
// iterations + 1 non-boundary pixels: the dilation never reaches its edge, so the erosion sees
// the image as if surrounded by non-boundary pixels forever.
void close_gaps_image(const bool* boundary, int64_t height, int64_t width, int64_t iterations, bool* out) {
  if (height * width == 0) return;
  const int32_t steps = capped_radius(iterations, height, width);  // which bounds the canvas too
  const int64_t margin = steps + 1, canvas_h = height + 2 * margin, canvas_w = width + 2 * margin;
  std::vector<int32_t> canvas(canvas_h * canvas_w, 0);
  for (int64_t y = 0; y < height; ++y) {
    std::copy(boundary + y * width, boundary + (y + 1) * width, canvas.begin() + (y + margin) * canvas_w + margin);
  }
  dilate_octagon(canvas, canvas_h, canvas_w, steps, 1);
  dilate_octagon(canvas, canvas_h, canvas_w, steps, 0);  // the erosion: dilate what was not dilated
  for (int64_t y = 0; y < height; ++y) {
    const int32_t* row = canvas.data() + (y + margin) * canvas_w + margin;
    for (int64_t x = 0; x < width; ++x) out[y * width + x] = row[x] == 0;
  }
}

namespace {

// Beyond this many cross-shaped steps, dilate_diamond_bits hands the rest of its radius to the
// distance transform, whose cost does not grow with the radius: a step costs a few operations
// per 64 pixels, the distance transform a few per pixel, so this bounds the worst case to about
// twice the transform's.
constexpr int64_t kMaxCrossSteps = 64;

// Sets every bit of the row that lies inside the image.
void fill_row(BitImage& image, int64_t y) {
  uint64_t* row = image.row(y);
  std::fill(row, row + image.words_per_row(), ~uint64_t(0));
  row[image.words_per_row() - 1] = image.last_word_mask();
}

// Boundary pixels that belong to a 2x2 block of boundary pixels, and the image's frame.
BitImage keep_blocks_and_frame(const BitImage& boundary) {
  const int64_t height = boundary.height(), width = boundary.width(), words = boundary.words_per_row();
  BitImage kept(height, width);
  std::vector<uint64_t> both(words), blocks(words);
  for (int64_t y = 0; y + 1 < height; ++y) {
    const uint64_t* top = boundary.row(y);
    const uint64_t* bottom = boundary.row(y + 1);
    for (int64_t j = 0; j < words; ++j) both[j] = top[j] & bottom[j];
    // Blocks marked at their top-left pixel: columns x and x + 1 boundary in both rows.
    for (int64_t j = 0; j < words; ++j) blocks[j] = both[j] & from_higher_columns(both.data(), words, j, 1);
    for (int64_t j = 0; j < words; ++j) {  // no block starts at the last column: nothing spills
      const uint64_t spread = blocks[j] | from_lower_columns(blocks.data(), j, 1);
      kept.row(y)[j] |= spread;
      kept.row(y + 1)[j] |= spread;
    }
  }
  fill_row(kept, 0);
  fill_row(kept, height - 1);
  for (int64_t y = 0; y < height; ++y) {
    uint64_t* row = kept.row(y);
    row[0] |= 1;
    row[(width - 1) >> 6] |= uint64_t(1) << ((width - 1) & 63);
  }
  return kept;
}

// Offsets s such that or'ing each pixel with its neighbours at -s and +s, for each offset in
// turn, or's it with all pixels within `radius`: 1, 2, 4, ... cover radius 2^m - 1, and one more
// offset of at most 2^m completes the radius without leaving a hole.
std::vector<int64_t> dilation_offsets(int64_t radius) {
  std::vector<int64_t> offsets;
  int64_t covered = 0;
  for (int64_t offset = 1; covered + offset <= radius; offset <<= 1) {
    offsets.push_back(offset);
    covered += offset;
  }
  if (covered < radius) offsets.push_back(radius - covered);
  return offsets;
}

// In place: the pixels within Chebyshev distance `radius` of a set pixel (a square), along the
// rows, then along the columns, in O(log radius) passes.
void dilate_square_bits(BitImage& image, int64_t radius) {
  const int64_t height = image.height(), words = image.words_per_row();
  const std::vector<int64_t> offsets = dilation_offsets(radius);
  std::vector<uint64_t> copy(words);
  for (const int64_t offset : offsets) {
    for (int64_t y = 0; y < height; ++y) {
      uint64_t* row = image.row(y);
      std::copy(row, row + words, copy.begin());
      for (int64_t j = 0; j < words; ++j) {
        row[j] = copy[j] | from_lower_columns(copy.data(), j, offset) | from_higher_columns(copy.data(), words, j, offset);
      }
      row[words - 1] &= image.last_word_mask();
    }
  }
  BitImage source(height, image.width());
  for (const int64_t offset : offsets) {
    std::swap(image, source);
    for (int64_t y = 0; y < height; ++y) {
      const uint64_t* above = y >= offset ? source.row(y - offset) : nullptr;
      const uint64_t* below = y + offset < height ? source.row(y + offset) : nullptr;
      const uint64_t* in = source.row(y);
      uint64_t* out = image.row(y);
      for (int64_t j = 0; j < words; ++j) out[j] = in[j] | (above ? above[j] : 0) | (below ? below[j] : 0);
    }
  }
}

// In place: the pixels within city-block distance `radius` of a set pixel (a diamond) through the
// image. Cross-shaped steps until a fixed point; past kMaxCrossSteps of them the distance
// transform does the rest of the radius (diamonds, like squares, add their radii).
void dilate_diamond_bits(BitImage& image, int64_t radius) {
  const int64_t height = image.height(), width = image.width();
  BitImage next(height, width);
  int64_t steps = 0;
  for (; steps < std::min(radius, kMaxCrossSteps); ++steps) {
    if (!spread_cross(image, next)) return;
    std::swap(image, next);
  }
  const int32_t rest = static_cast<int32_t>(radius - steps), far = rest + 1;
  if (rest == 0) return;
  std::vector<int32_t> map(height * width);
  for (int64_t y = 0; y < height; ++y) {
    for (int64_t x = 0; x < width; ++x) map[y * width + x] = image.test(y, x) ? 0 : far;
  }
  dilate_diamond(map.data(), height, width, rest, far);
  for (int64_t y = 0; y < height; ++y) {
    uint64_t* row = image.row(y);
    for (int64_t x = 0; x < width; ++x) row[x >> 6] |= uint64_t(map[y * width + x] == 0) << (x & 63);
  }
}

// The frame is boundary, so the square dilation covers every pixel outside the image that the
// diamond erosion of an image pixel reaches: both run on the image alone, the outside counting as
// dilated.
BitImage prepare_boundary_bits(const BitImage& boundary, int64_t iterations) {
  const int64_t height = boundary.height(), width = boundary.width(), words = boundary.words_per_row();
  if (height * width == 0) return BitImage(height, width);
  const int32_t radius = capped_radius(iterations, height, width);
  const BitImage kept = keep_blocks_and_frame(boundary);
  BitImage dilated = kept;
  dilate_square_bits(dilated, radius);
  BitImage open = complement(std::move(dilated));  // sources: pixels not dilated
  dilate_diamond_bits(open, radius);  // the erosion took them: not closed

  // Re-open the closed blobs: a closed pixel stays only within city-block distance 2 of an open
  // one (two cross-shaped spreads), the outside counting as closed.
  BitImage near_open(height, width), out(height, width);
  spread_cross(open, near_open);
  spread_cross(near_open, out);
  for (int64_t y = 0; y < height; ++y) {
    const uint64_t* k = kept.row(y);
    const uint64_t* o = open.row(y);
    uint64_t* row = out.row(y);
    for (int64_t j = 0; j < words; ++j) row[j] = k[j] | (row[j] & ~o[j]);
  }
  return out;
}

// close_gaps_image on bits.
BitImage close_gaps_bits(const BitImage& boundary, int64_t iterations) {
  const int64_t pixels = boundary.height() * boundary.width();
  std::vector<uint8_t> raw(pixels), closed(pixels);  // bool storage without std::vector<bool>'s packing
  unpack_bits(boundary, reinterpret_cast<bool*>(raw.data()));
  close_gaps_image(reinterpret_cast<bool*>(raw.data()), boundary.height(), boundary.width(), iterations,
                   reinterpret_cast<bool*>(closed.data()));
  return pack_bits(reinterpret_cast<bool*>(closed.data()), boundary.height(), boundary.width());
}

}  // namespace

void prepare_boundary_image(const bool* boundary, int64_t height, int64_t width, int64_t iterations, bool* out) {
  unpack_bits(prepare_boundary_bits(pack_bits(boundary, height, width), iterations), out);
}

template <typename prob_t>
int32_t boundary_regions_image(
    const prob_t* boundary_prob, int64_t height, int64_t width, double threshold, BoundaryMethod method,
    int64_t gap_iterations, int64_t min_size, int32_t* regions) {
  const BitImage boundary = threshold_bits(boundary_prob, height, width, threshold);
  const BitImage ready = method == BoundaryMethod::kPaper ? prepare_boundary_bits(boundary, gap_iterations)
                                                          : close_gaps_bits(boundary, gap_iterations);
  return segment_bits(ready, min_size, regions);
}

template void boundary_from_labels_image<uint8_t>(const uint8_t*, int64_t, int64_t, bool*);
template void boundary_from_labels_image<int8_t>(const int8_t*, int64_t, int64_t, bool*);
template void boundary_from_labels_image<int16_t>(const int16_t*, int64_t, int64_t, bool*);
template void boundary_from_labels_image<int32_t>(const int32_t*, int64_t, int64_t, bool*);
template void boundary_from_labels_image<int64_t>(const int64_t*, int64_t, int64_t, bool*);
template int32_t boundary_regions_image<float>(
    const float*, int64_t, int64_t, double, BoundaryMethod, int64_t, int64_t, int32_t*);
template int32_t boundary_regions_image<double>(
    const double*, int64_t, int64_t, double, BoundaryMethod, int64_t, int64_t, int32_t*);

}  // namespace unet_postprocess
