// Boundary maps: the training target from a label map, thresholding of the predicted boundary
// probability, and the expand-contract step that closes small gaps (paper section 5.2).
#include "postprocess.h"

#include <algorithm>
#include <cmath>
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

// Exact city-block distance to the nearest source, in place: `dist` holds 0 at sources, a
// positive offset at pixels that see a source outside the image, `far` elsewhere. The metric is
// separable: sweep the columns down and up (whole rows at a time, which vectorizes), then each
// row right and left.
void city_block_distance(std::vector<int32_t>& dist, int64_t height, int64_t width) {
  int32_t* d = dist.data();
  for (int64_t y = 1; y < height; ++y) {
    int32_t* row = d + y * width;
    for (int64_t x = 0; x < width; ++x) row[x] = std::min(row[x], row[x - width] + 1);
  }
  for (int64_t y = height - 2; y >= 0; --y) {
    int32_t* row = d + y * width;
    for (int64_t x = 0; x < width; ++x) row[x] = std::min(row[x], row[x + width] + 1);
  }
  for (int64_t y = 0; y < height; ++y) {
    int32_t* row = d + y * width;
    for (int64_t x = 1; x < width; ++x) row[x] = std::min(row[x], row[x - 1] + 1);
    for (int64_t x = width - 2; x >= 0; --x) row[x] = std::min(row[x], row[x + 1] + 1);
  }
}

// Outside the image nothing is boundary, so just outside border pixel b the dilation reaches
// exactly (iterations - dist(b)) pixels further: the first non-dilated outside pixel straight
// beyond b is max(1, iterations + 1 - dist(b)) away. Pixels beyond the corners are never closer.
void seed_outside_gaps(
    const std::vector<int32_t>& to_boundary,
    std::vector<int32_t>& to_gap,
    int64_t height,
    int64_t width,
    int32_t iterations) {
  auto seed = [&](int64_t p) {
    const int32_t offset = std::max(1, iterations + 1 - to_boundary[p]);
    to_gap[p] = std::min(to_gap[p], offset);
  };
  for (int64_t x = 0; x < width; ++x) {
    seed(x);
    seed((height - 1) * width + x);
  }
  for (int64_t y = 0; y < height; ++y) {
    seed(y * width);
    seed(y * width + width - 1);
  }
}

}  // namespace

// closing = erosion(dilation(boundary)) with the diamond of radius `iterations` (the 4-neighbour
// step repeated): a pixel is dilated within that city-block distance of the boundary, and stays
// after the erosion when no non-dilated pixel, inside the image or beyond it, is that close.
void close_gaps_image(const bool* boundary, int64_t height, int64_t width, int64_t iterations, bool* out) {
  const int64_t pixels = height * width;
  if (pixels == 0) return;
  // Beyond height + width every result is the same, and distances stay far from overflow.
  const int32_t far = static_cast<int32_t>(height + width + 2);
  const int32_t radius = static_cast<int32_t>(std::min<int64_t>(iterations, height + width));
  std::vector<int32_t> to_boundary(pixels);
  for (int64_t p = 0; p < pixels; ++p) to_boundary[p] = boundary[p] ? 0 : far;
  city_block_distance(to_boundary, height, width);

  std::vector<int32_t> to_gap(pixels);
  for (int64_t p = 0; p < pixels; ++p) to_gap[p] = to_boundary[p] <= radius ? far : 0;
  seed_outside_gaps(to_boundary, to_gap, height, width, radius);
  city_block_distance(to_gap, height, width);
  for (int64_t p = 0; p < pixels; ++p) out[p] = to_gap[p] > radius;
}

template void boundary_from_labels_image<uint8_t>(const uint8_t*, int64_t, int64_t, bool*);
template void boundary_from_labels_image<int8_t>(const int8_t*, int64_t, int64_t, bool*);
template void boundary_from_labels_image<int16_t>(const int16_t*, int64_t, int64_t, bool*);
template void boundary_from_labels_image<int32_t>(const int32_t*, int64_t, int64_t, bool*);
template void boundary_from_labels_image<int64_t>(const int64_t*, int64_t, int64_t, bool*);
template void threshold_image<float>(const float*, int64_t, double, bool*);
template void threshold_image<double>(const double*, int64_t, double, bool*);

}  // namespace unet_postprocess
