// Boundary maps: the training target from a label map, and the way from a predicted boundary
// probability to regions: threshold, close small gaps (the paper author's preparation, or a plain
// closing), SEGMENT (paper section 5.2).
#include "postprocess.h"

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

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

template <typename prob_t>
void threshold_image(const prob_t* boundary_prob, int64_t pixels, double threshold, bool* out) {
  for (int64_t p = 0; p < pixels; ++p) {
    const double v = static_cast<double>(boundary_prob[p]);
    TORCH_CHECK_VALUE(std::isfinite(v), "boundary_prob: expected finite probabilities, got ", v);
    out[p] = v >= threshold;
  }
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

// Boundary pixels that belong to a 2x2 block of boundary pixels, and the image's frame.
void keep_blocks_and_frame(const bool* boundary, int64_t height, int64_t width, uint8_t* kept) {
  std::fill(kept, kept + height * width, uint8_t(0));
  // Row y of the blocks whose top-left pixel is (y, x) or (y, x - 1): the blocks holding (y, x)
  // and (y + 1, x).
  std::vector<uint8_t> spread(width);
  for (int64_t y = 0; y + 1 < height; ++y) {
    const bool* top = boundary + y * width;
    const bool* bottom = top + width;
    uint8_t left = 0;  // the block whose top-left pixel is (y, x - 1)
    for (int64_t x = 0; x + 1 < width; ++x) {
      const uint8_t block = top[x] & top[x + 1] & bottom[x] & bottom[x + 1];
      spread[x] = block | left;
      left = block;
    }
    spread[width - 1] = left;
    uint8_t* row = kept + y * width;
    for (int64_t x = 0; x < width; ++x) {
      row[x] |= spread[x];
      row[x + width] |= spread[x];
    }
  }
  std::fill(kept, kept + width, uint8_t(1));
  std::fill(kept + (height - 1) * width, kept + height * width, uint8_t(1));
  for (int64_t y = 0; y < height; ++y) kept[y * width] = kept[y * width + width - 1] = 1;
}

// out = in, or'ed with its 4-neighbours (pixels outside the image are 0).
void spread_cross(const uint8_t* in, int64_t height, int64_t width, uint8_t* out) {
  for (int64_t y = 0; y < height; ++y) {
    const uint8_t* row = in + y * width;
    uint8_t* o = out + y * width;
    std::copy(row, row + width, o);
    for (int64_t x = 1; x < width; ++x) o[x] |= row[x - 1];
    for (int64_t x = 0; x + 1 < width; ++x) o[x] |= row[x + 1];
    if (y > 0) {
      for (int64_t x = 0; x < width; ++x) o[x] |= row[x - width];
    }
    if (y + 1 < height) {
      for (int64_t x = 0; x < width; ++x) o[x] |= row[x + width];
    }
  }
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

// The frame is boundary, so the square dilation covers every pixel outside the image that the
// diamond erosion of an image pixel reaches: both run on the image alone, the outside counting as
// dilated.
void prepare_boundary_image(const bool* boundary, int64_t height, int64_t width, int64_t iterations, bool* out) {
  const int64_t pixels = height * width;
  if (pixels == 0) return;
  const int32_t radius = capped_radius(iterations, height, width);
  const int32_t far = radius + 1;
  std::vector<uint8_t> kept(pixels), open(pixels), near_open(pixels), within_two(pixels);
  keep_blocks_and_frame(boundary, height, width, kept.data());

  std::vector<int32_t> map(pixels);
  for (int64_t p = 0; p < pixels; ++p) map[p] = kept[p] ? 0 : far;
  dilate_square(map.data(), height, width, radius, far);
  for (int64_t p = 0; p < pixels; ++p) map[p] = map[p] == 0 ? far : 0;  // sources: pixels not dilated
  dilate_diamond(map.data(), height, width, radius, far);
  for (int64_t p = 0; p < pixels; ++p) open[p] = map[p] == 0;  // the erosion took them: not closed

  // Re-open the closed blobs: a closed pixel stays only within city-block distance 2 of an open
  // one (two cross-shaped spreads), the outside counting as closed.
  spread_cross(open.data(), height, width, near_open.data());
  spread_cross(near_open.data(), height, width, within_two.data());
  for (int64_t p = 0; p < pixels; ++p) out[p] = kept[p] | (within_two[p] & !open[p]);
}

template <typename prob_t>
int32_t boundary_regions_image(
    const prob_t* boundary_prob, int64_t height, int64_t width, double threshold, BoundaryMethod method,
    int64_t gap_iterations, int64_t min_size, int32_t* regions) {
  const int64_t pixels = height * width;
  std::vector<uint8_t> raw(pixels), prepared(pixels);  // bool storage without std::vector<bool>'s packing
  bool* raw_boundary = reinterpret_cast<bool*>(raw.data());
  bool* boundary = reinterpret_cast<bool*>(prepared.data());
  threshold_image(boundary_prob, pixels, threshold, raw_boundary);
  if (method == BoundaryMethod::kPaper) {
    prepare_boundary_image(raw_boundary, height, width, gap_iterations, boundary);
  } else {
    close_gaps_image(raw_boundary, height, width, gap_iterations, boundary);
  }
  return segment_image(boundary, height, width, min_size, regions);
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
