// FLOOD and SEGMENT (paper section 7.2, Algorithms 2-3).
//
// FLOOD claims the seed, then repeatedly claims the unclaimed 4-neighbours of claimed cells,
// except that a boundary cell never claims another boundary cell: only a boundary two cells thick
// stops the flood. The set a flood claims does not depend on the order it visits cells in (a
// cell is claimed as soon as any claimed neighbour may claim it), so instead of the paper's stack
// of (y, x, b) pushed for all four neighbours we keep a queue of claimed cells, each entered
// once: no recursion, memory proportional to the flood's front, same regions.
#include "postprocess.h"

#include <vector>

namespace unet_postprocess {
namespace {

constexpr int32_t kUnclaimed = -2;
constexpr int32_t kDropped = -1;

struct Cell {
  int32_t y, x;
};

// A FIFO of cells that reuses its storage: the consumed prefix is dropped once it is the larger
// half, so memory follows the flood's front rather than its area.
class CellQueue {
 public:
  void push(Cell cell) { cells_.push_back(cell); }
  bool empty() const { return head_ == cells_.size(); }
  Cell pop() {
    const Cell cell = cells_[head_++];
    if (head_ > 1024 && 2 * head_ > cells_.size()) {
      cells_.erase(cells_.begin(), cells_.begin() + head_);
      head_ = 0;
    }
    return cell;
  }

 private:
  std::vector<Cell> cells_;
  size_t head_ = 0;
};

class Flood {
 public:
  Flood(const bool* boundary, int64_t height, int64_t width, int32_t* regions)
      : boundary_(boundary), height_(height), width_(width), regions_(regions) {}

  // Claims for `id` everything FLOOD reaches from `seed`; returns the number of cells claimed.
  int64_t fill(Cell seed, int32_t id) {
    regions_[index(seed)] = id;
    queue_.push(seed);
    int64_t filled = 0;
    while (!queue_.empty()) {
      const Cell c = queue_.pop();
      ++filled;
      const bool from_cell = !boundary_[index(c)];
      if (c.y + 1 < height_) claim({c.y + 1, c.x}, from_cell, id);
      if (c.y > 0) claim({c.y - 1, c.x}, from_cell, id);
      if (c.x + 1 < width_) claim({c.y, c.x + 1}, from_cell, id);
      if (c.x > 0) claim({c.y, c.x - 1}, from_cell, id);
    }
    return filled;
  }

  // Marks the cells of region `id` (4-connected, all reached from `seed`) as dropped; they stay
  // claimed, as in SEGMENT, so no later flood takes them.
  void drop(Cell seed, int32_t id) {
    std::vector<Cell> stack{seed};
    regions_[index(seed)] = kDropped;
    while (!stack.empty()) {
      const Cell c = stack.back();
      stack.pop_back();
      const Cell next[4] = {{c.y + 1, c.x}, {c.y - 1, c.x}, {c.y, c.x + 1}, {c.y, c.x - 1}};
      for (const Cell& n : next) {
        if (n.y < 0 || n.y >= height_ || n.x < 0 || n.x >= width_ || regions_[index(n)] != id) continue;
        regions_[index(n)] = kDropped;
        stack.push_back(n);
      }
    }
  }

 private:
  int64_t index(Cell c) const { return static_cast<int64_t>(c.y) * width_ + c.x; }

  void claim(Cell c, bool from_cell, int32_t id) {
    const int64_t i = index(c);
    if (regions_[i] != kUnclaimed || (boundary_[i] && !from_cell)) return;
    regions_[i] = id;
    queue_.push(c);
  }

  const bool* boundary_;
  int64_t height_, width_;
  int32_t* regions_;
  CellQueue queue_;
};

}  // namespace

int32_t segment_image(const bool* boundary, int64_t height, int64_t width, int64_t min_size, int32_t* regions) {
  const int64_t pixels = height * width;
  for (int64_t p = 0; p < pixels; ++p) regions[p] = kUnclaimed;
  Flood flood(boundary, height, width, regions);
  int32_t count = 0;
  for (int64_t p = 0; p < pixels; ++p) {
    if (regions[p] != kUnclaimed) continue;
    const Cell seed{static_cast<int32_t>(p / width), static_cast<int32_t>(p % width)};
    if (flood.fill(seed, count) >= min_size) {
      ++count;
    } else {
      flood.drop(seed, count);
    }
  }
  return count;
}

}  // namespace unet_postprocess
