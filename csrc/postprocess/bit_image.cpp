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
    // At the top and bottom the row stands in for the missing one: or'ing it adds nothing.
    const uint64_t* above = in.row(y > 0 ? y - 1 : y);
    const uint64_t* below = in.row(y + 1 < height ? y + 1 : y);
    uint64_t* o = out.row(y);
    uint64_t before = 0;  // the word before word j
    for (int64_t j = 0; j < words; ++j) {
      const uint64_t after = j + 1 < words ? row[j + 1] : 0;
      o[j] = row[j] | row[j] << 1 | before >> 63 | row[j] >> 1 | after << 63 | above[j] | below[j];
      before = row[j];
    }
    o[words - 1] &= in.last_word_mask();
    for (int64_t j = 0; j < words; ++j) changed |= o[j] ^ row[j];
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
