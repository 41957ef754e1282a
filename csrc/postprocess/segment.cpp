// FLOOD and SEGMENT (paper section 7.2, Algorithms 2-3), computed as connected components.
//
// FLOOD claims a cell's unclaimed 4-neighbour unless both are boundary cells (a boundary cell may
// be claimed, but never claims another boundary cell); the rule is symmetric. So a flood claims
// exactly the connected component of its seed in the graph whose edges join 4-neighbours that are
// not both boundary: nothing a flood claims can be reached by another, whatever the visiting
// order. SEGMENT seeds floods at the first unclaimed cell in scan order, so its masks are these
// components, numbered in scan order of their first cell, and those of min_size cells or fewer
// dropped (the author's code keeps masks of more than 10 cells; the pseudo-code writes mass >= T).
// We label them with a union-find over the rows' runs (below), each component's root being its
// first run, whose first pixel is the component's first: no recursion, no stack, memory linear in
// the image, the same masks as the pseudo-code (tests/postprocess_reference.py runs Algorithms 2-3
// literally to check).
#include "postprocess.h"

#include <algorithm>
#include <numeric>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace unet_postprocess {
namespace {

// The runs of an image: maximal row segments without two adjacent boundary pixels, in scan order.
// The graph joins each pixel of a run to the next, so a run lies in one component. Runs may leave
// out isolated pixels (boundary pixels whose 4-neighbours are all boundary): those have no edge,
// each is a component of one pixel, and where boundary is thick they are most runs.
class Runs {
 public:
  // The runs of the pixels in `members`, a subset of the image that holds every pixel with an edge.
  Runs(const BitImage& boundary, const BitImage& members);

  int32_t count() const { return static_cast<int32_t>(start_.size()); }
  int32_t start(int32_t run) const { return start_[run]; }
  int32_t end(int32_t run) const { return end_[run]; }  // one past the last column
  int32_t row_begin(int64_t y) const { return y < height_ ? rank_[y * words_] : count(); }  // row y: [row_begin(y), row_begin(y + 1))

  // The run holding column x of row y, a member: the runs that start before its word, and those
  // that start in its word up to x.
  int32_t at(int64_t y, int64_t x) const {
    const uint64_t up_to_x = (uint64_t(2) << (x & 63)) - 1;
    return rank_[y * words_ + (x >> 6)] + count_bits(first_.row(y)[x >> 6] & up_to_x) - 1;
  }

  const uint64_t* first_columns(int64_t y) const { return first_.row(y); }

 private:
  int64_t height_, words_;
  BitImage first_;                    // the first column of each run
  std::vector<int32_t> rank_;         // per word of first_: the runs that start before it
  std::vector<int32_t> start_, end_;  // in scan order
};

Runs::Runs(const BitImage& boundary, const BitImage& members)
    : height_(boundary.height()), words_(boundary.words_per_row()), first_(height_, boundary.width()),
      rank_(height_ * words_) {
  BitImage last(height_, boundary.width());
  int32_t total = 0;
  for (int64_t y = 0; y < height_; ++y) {
    const uint64_t* row = boundary.row(y);
    const uint64_t* member = members.row(y);
    for (int64_t j = 0; j < words_; ++j) {
      // A run does not go on from x - 1 to x where both are boundary.
      const uint64_t split = row[j] & from_lower_columns(row, j, 1);
      const uint64_t split_after = row[j] & from_higher_columns(row, words_, j, 1);
      first_.row(y)[j] = member[j] & (~from_lower_columns(member, j, 1) | split);
      last.row(y)[j] = member[j] & (~from_higher_columns(member, words_, j, 1) | split_after);
      rank_[y * words_ + j] = total;
      total += count_bits(first_.row(y)[j]);
    }
  }
  start_.resize(total);
  end_.resize(total);
  int32_t* start = start_.data();
  int32_t* end = end_.data();
  for (int64_t y = 0; y < height_; ++y) {
    for (int64_t j = 0; j < words_; ++j) {
      for (uint64_t bits = first_.row(y)[j]; bits; bits &= bits - 1) *start++ = static_cast<int32_t>(j * 64 + __builtin_ctzll(bits));
      for (uint64_t bits = last.row(y)[j]; bits; bits &= bits - 1) *end++ = static_cast<int32_t>(j * 64 + __builtin_ctzll(bits) + 1);
    }
  }
}

// Root of run r's component; halves the path as it goes. Every parent index is <= its child's.
int32_t find_root(std::vector<int32_t>& parent, int32_t r) {
  while (parent[r] != r) {
    parent[r] = parent[parent[r]];
    r = parent[r];
  }
  return r;
}

// Joins the components of runs a and b; the earlier run in scan order stays root.
void unite(std::vector<int32_t>& parent, int32_t a, int32_t b) {
  a = find_root(parent, a);
  b = find_root(parent, b);
  parent[std::max(a, b)] = std::min(a, b);
}

// Joins the runs of rows y - 1 and y that the graph joins: column x joins them unless both its
// pixels are boundary (where it does, both pixels have an edge, so both lie in runs). A pair of runs joined
// somewhere is joined at its first such column, which starts a stretch of such columns or a run of
// either row: only those columns are visited.
void link_to_row_above(const BitImage& boundary, const Runs& runs, int64_t y, std::vector<int32_t>& parent) {
  const int64_t words = boundary.words_per_row();
  const uint64_t* row = boundary.row(y);
  const uint64_t* above = boundary.row(y - 1);
  const uint64_t* first = runs.first_columns(y);
  const uint64_t* first_above = runs.first_columns(y - 1);
  uint64_t joined_before = 0;  // whether the previous word's last column joins
  for (int64_t j = 0; j < words; ++j) {
    uint64_t joins = ~(row[j] & above[j]);
    if (j + 1 == words) joins &= boundary.last_word_mask();
    uint64_t visit = joins & (~(joins << 1 | joined_before) | first[j] | first_above[j]);
    joined_before = joins >> 63;
    for (; visit; visit &= visit - 1) {
      const int64_t x = j * 64 + __builtin_ctzll(visit);
      unite(parent, runs.at(y - 1, x), runs.at(y, x));
    }
  }
}

// Writes `value` to [begin, end), eight at a time where it can: it may write up to seven pixels
// past `end` (the caller writes them afterwards), never at or past `limit`.
inline void fill_ahead(int32_t* begin, int32_t* end, int32_t value, const int32_t* limit) {
#if defined(__SSE2__)
  const __m128i v = _mm_set1_epi32(value);
  for (; begin < end && limit - begin >= 8; begin += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(begin), v);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(begin + 4), v);
  }
#endif
  for (; begin < end; ++begin) *begin = value;
}

}  // namespace

int32_t segment_bits(const BitImage& boundary, int64_t min_size, int32_t* regions) {
  const int64_t height = boundary.height(), width = boundary.width();
  if (height * width == 0) return 0;
  // Isolated pixels are components of one pixel: only min_size 0 keeps them, in scan order.
  const BitImage members = min_size == 0 ? complement(BitImage(height, width)) : spread_cross(complement(boundary));
  const Runs runs(boundary, members);
  const int32_t run_count = runs.count();
  std::vector<int32_t> parent(run_count);
  std::iota(parent.begin(), parent.end(), 0);
  for (int64_t y = 1; y < height; ++y) link_to_row_above(boundary, runs, y, parent);

  // Parents precede children, so one pass in scan order points every run at its root.
  std::vector<int32_t> size(run_count, 0);
  for (int32_t r = 0; r < run_count; ++r) {
    parent[r] = parent[parent[r]];
    size[parent[r]] += runs.end(r) - runs.start(r);
  }
  // A root is its component's first run: numbering roots as they come is scan order.
  // Runs and the isolated pixels between them are written left to right, image row after row:
  // what one fill writes past its end, the next overwrites.
  int32_t count = 0;
  const int32_t* limit = regions + height * width;
  for (int64_t y = 0; y < height; ++y) {
    int32_t* row = regions + y * width;
    int32_t done = 0;  // columns written
    for (int32_t r = runs.row_begin(y); r < runs.row_begin(y + 1); ++r) {
      const int32_t root = parent[r];
      if (root == r) size[r] = size[r] > min_size ? count++ : -1;  // size now holds the id
      fill_ahead(row + done, row + runs.start(r), -1, limit);  // isolated pixels
      fill_ahead(row + runs.start(r), row + runs.end(r), size[root], limit);
      done = runs.end(r);
    }
    fill_ahead(row + done, row + width, -1, limit);
  }
  return count;
}

int32_t segment_image(const bool* boundary, int64_t height, int64_t width, int64_t min_size, int32_t* regions) {
  return segment_bits(pack_bits(boundary, height, width), min_size, regions);
}

}  // namespace unet_postprocess
