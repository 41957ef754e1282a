// A binary image packed 64 pixels to a word, row by row: the boundary masks of boundary_regions
// between threshold, preparation and SEGMENT. Row operations then handle 64 pixels at once.
#pragma once

#include <cstdint>
#include <vector>

namespace unet_postprocess {

// Bit x % 64 of word x / 64 of a row is column x. Every row starts on a new word, and the bits of
// the last word beyond `width` stay 0 (every operation below keeps them so).
class BitImage {
 public:
  BitImage(int64_t height, int64_t width)
      : height_(height), width_(width), words_per_row_((width + 63) / 64), words_(height * words_per_row_, 0) {}

  int64_t height() const { return height_; }
  int64_t width() const { return width_; }
  int64_t words_per_row() const { return words_per_row_; }
  uint64_t* row(int64_t y) { return words_.data() + y * words_per_row_; }
  const uint64_t* row(int64_t y) const { return words_.data() + y * words_per_row_; }
  bool test(int64_t y, int64_t x) const { return (row(y)[x >> 6] >> (x & 63)) & 1; }

  // The bits of the last word of a row that lie inside the image.
  uint64_t last_word_mask() const { return width_ % 64 ? (uint64_t(1) << (width_ % 64)) - 1 : ~uint64_t(0); }

 private:
  int64_t height_, width_, words_per_row_;
  std::vector<uint64_t> words_;
};

// Word j of the row shifted `k` columns towards higher columns: its column x is column x - k of
// `row` (0 for x < k). Bits shifted past the row's last column land beyond `width`: mask them.
inline uint64_t from_lower_columns(const uint64_t* row, int64_t j, int64_t k) {
  const int64_t i = j - (k >> 6), s = k & 63;
  if (i < 0) return 0;
  uint64_t word = row[i] << s;
  if (s && i > 0) word |= row[i - 1] >> (64 - s);
  return word;
}

// Word j of the row shifted `k` columns towards lower columns: its column x is column x + k of
// `row` (0 beyond the row).
inline uint64_t from_higher_columns(const uint64_t* row, int64_t words, int64_t j, int64_t k) {
  const int64_t i = j + (k >> 6), s = k & 63;
  if (i >= words) return 0;
  uint64_t word = row[i] >> s;
  if (s && i + 1 < words) word |= row[i + 1] << (64 - s);
  return word;
}

// The set bits of `word`. Portable builds (no -mpopcnt) turn __builtin_popcountll into a library
// call; this stays inline.
inline int count_bits(uint64_t word) {
  word -= (word >> 1) & 0x5555555555555555ull;
  word = (word & 0x3333333333333333ull) + ((word >> 2) & 0x3333333333333333ull);
  word = (word + (word >> 4)) & 0x0f0f0f0f0f0f0f0full;
  return static_cast<int>((word * 0x0101010101010101ull) >> 56);
}

BitImage pack_bits(const bool* pixels, int64_t height, int64_t width);
void unpack_bits(const BitImage& image, bool* pixels);

// out = in, or'ed with its 4-neighbours (pixels outside the image are 0); `out` has in's shape.
// Returns whether out differs from in.
bool spread_cross(const BitImage& in, BitImage& out);
BitImage spread_cross(const BitImage& in);

// The pixels of the image not in `image`.
BitImage complement(BitImage image);

}  // namespace unet_postprocess
