// Boundary maps: the training target from a label map, thresholding of the predicted boundary
// probability, and the expand-contract step that closes small gaps (paper section 5.2).
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

template <typename prob_t>
void threshold_image(const prob_t* boundary_prob, int64_t pixels, double threshold, bool* out) {
  for (int64_t p = 0; p < pixels; ++p) {
    const double v = static_cast<double>(boundary_prob[p]);
    TORCH_CHECK_VALUE(std::isfinite(v), "boundary_prob: expected finite probabilities, got ", v);
    out[p] = v >= threshold;
  }
}

namespace {

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

// In place: pixels equal to `source` become 1 when within the octagon of `steps` dilations that
// alternate the 8- and the 4-neighbourhood of such a pixel, 0 otherwise. The octagon is the
// Minkowski sum of a square (the 8-neighbour steps) and a diamond (the 4-neighbour steps), so
// we dilate by each in turn: by the square along rows then columns, then by the diamond with the
// city-block distance, both separable.
void dilate_octagon(std::vector<int32_t>& map, int64_t height, int64_t width, int32_t steps, int32_t source) {
  const int32_t square = (steps + 1) / 2, diamond = steps / 2, far = steps + 1;
  for (int32_t& v : map) v = v == source ? 0 : far;
  row_distance(map.data(), height, width);
  for (int32_t& v : map) v = v <= square ? 0 : far;
  column_distance(map.data(), height, width);
  for (int32_t& v : map) v = v <= square ? 0 : far;
  column_distance(map.data(), height, width);
  row_distance(map.data(), height, width);
  for (int32_t& v : map) v = v <= diamond;
}

}  // namespace

// Closing = erosion(dilation(boundary)) by the octagon, on a canvas with a margin of
// iterations + 1 non-boundary pixels: the dilation never reaches its edge, so the erosion sees
// the image as if surrounded by non-boundary pixels forever.
void close_gaps_image(const bool* boundary, int64_t height, int64_t width, int64_t iterations, bool* out) {
  if (height * width == 0) return;
  // Documented cap, which bounds the canvas: larger closings fill the image's inside anyway.
  const int32_t steps = static_cast<int32_t>(std::min<int64_t>(iterations, std::max(height, width)));
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

template void boundary_from_labels_image<uint8_t>(const uint8_t*, int64_t, int64_t, bool*);
template void boundary_from_labels_image<int8_t>(const int8_t*, int64_t, int64_t, bool*);
template void boundary_from_labels_image<int16_t>(const int16_t*, int64_t, int64_t, bool*);
template void boundary_from_labels_image<int32_t>(const int32_t*, int64_t, int64_t, bool*);
template void boundary_from_labels_image<int64_t>(const int64_t*, int64_t, int64_t, bool*);
template void threshold_image<float>(const float*, int64_t, double, bool*);
template void threshold_image<double>(const double*, int64_t, double, bool*);

}  // namespace unet_postprocess
