// Packing, and the row operations of more than one caller.
#include "bit_image.h"

namespace unet_postprocess {

BitImage pack_bits(const bool* pixels, int64_t height, int64_t width) {
  BitImage image(height, width);
  for (int64_t y = 0; y < height; ++y) {
    const bool* in = pixels + y * width;
    uint64_t* row = image.row(y);
    for (int64_t x = 0; x < width; ++x) row[x >> 6] |= uint64_t(in[x]) << (x & 63);
  }
  return image;
}

void unpack_bits(const BitImage& image, bool* pixels) {
  const int64_t width = image.width();
  for (int64_t y = 0; y < image.height(); ++y) {
    const uint64_t* row = image.row(y);
    bool* out = pixels + y * width;
    for (int64_t x = 0; x < width; ++x) out[x] = (row[x >> 6] >> (x & 63)) & 1;
  }
}

bool spread_cross(const BitImage& in, BitImage& out) {
  const int64_t height = in.height(), words = in.words_per_row();
  uint64_t changed = 0;
  for (int64_t y = 0; y < height; ++y) {
    const uint64_t* row = in.row(y);
    const uint64_t* above = y > 0 ? in.row(y - 1) : nullptr;
    const uint64_t* below = y + 1 < height ? in.row(y + 1) : nullptr;
    uint64_t* o = out.row(y);
    for (int64_t j = 0; j < words; ++j) {
      uint64_t word = row[j] | from_lower_columns(row, j, 1) | from_higher_columns(row, words, j, 1);
      if (above) word |= above[j];
      if (below) word |= below[j];
      if (j + 1 == words) word &= in.last_word_mask();
      o[j] = word;
      changed |= word ^ row[j];
    }
  }
  return changed != 0;
}

BitImage spread_cross(const BitImage& in) {
  BitImage out(in.height(), in.width());
  spread_cross(in, out);
  return out;
}

BitImage complement(BitImage image) {
  if (image.words_per_row() == 0) return image;
  for (int64_t y = 0; y < image.height(); ++y) {
    uint64_t* row = image.row(y);
    for (int64_t j = 0; j < image.words_per_row(); ++j) row[j] = ~row[j];
    row[image.words_per_row() - 1] &= image.last_word_mask();
  }
  return image;
}

}  // namespace unet_postprocess
