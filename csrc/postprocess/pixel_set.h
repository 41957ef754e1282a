// A set of pixel indices as a bitset with a summary level, for DUST_FILL's rounds: insertion
// anywhere, and the next member at or after (before) a position, both cheap also when the set is
// sparse in a large image.
#pragma once

#include <cstdint>
#include <vector>

namespace unet_postprocess {

class PixelSet {
 public:
  explicit PixelSet(int64_t size) : bits_((size + 63) / 64 + 1, 0), summary_((bits_.size() + 63) / 64, 0) {}

  bool empty() const { return size_ == 0; }

  void insert(int64_t p) {
    uint64_t& word = bits_[p >> 6];
    const uint64_t bit = uint64_t(1) << (p & 63);
    size_ += !(word & bit);
    word |= bit;
    summary_[p >> 12] |= uint64_t(1) << ((p >> 6) & 63);
  }

  // `p` must be a member.
  void erase(int64_t p) {
    bits_[p >> 6] &= ~(uint64_t(1) << (p & 63));
    --size_;
  }

  // The smallest member >= p, or -1.
  int64_t first_from(int64_t p) {
    int64_t w = p >> 6;
    const uint64_t here = bits_[w] & (~uint64_t(0) << (p & 63));
    if (here) return (w << 6) + __builtin_ctzll(here);
    for (++w; w < static_cast<int64_t>(bits_.size());) {
      const int64_t s = w >> 6;
      const uint64_t marked = summary_[s] & (~uint64_t(0) << (w & 63));
      if (!marked) {
        w = (s + 1) << 6;
        continue;
      }
      w = (s << 6) + __builtin_ctzll(marked);
      if (bits_[w]) return (w << 6) + __builtin_ctzll(bits_[w]);
      summary_[s] &= ~(uint64_t(1) << (w & 63));  // emptied since marked
      ++w;
    }
    return -1;
  }

  // The largest member <= p, or -1.
  int64_t last_until(int64_t p) {
    if (p < 0) return -1;
    int64_t w = p >> 6;
    const uint64_t here = bits_[w] & (~uint64_t(0) >> (63 - (p & 63)));
    if (here) return (w << 6) + 63 - __builtin_clzll(here);
    for (--w; w >= 0;) {
      const int64_t s = w >> 6;
      const uint64_t marked = summary_[s] & (~uint64_t(0) >> (63 - (w & 63)));
      if (!marked) {
        w = (s << 6) - 1;
        continue;
      }
      w = (s << 6) + 63 - __builtin_clzll(marked);
      if (bits_[w]) return (w << 6) + 63 - __builtin_clzll(bits_[w]);
      summary_[s] &= ~(uint64_t(1) << (w & 63));
      --w;
    }
    return -1;
  }

 private:
  std::vector<uint64_t> bits_;     // bit p & 63 of word p >> 6: p is a member
  std::vector<uint64_t> summary_;  // bit w & 63 of word w >> 6: bits_[w] may be non-zero
  int64_t size_ = 0;
};

}  // namespace unet_postprocess
