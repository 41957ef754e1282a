// FLOOD and SEGMENT (paper section 7.2, Algorithms 2-3), computed as connected components.
//
// FLOOD claims a cell's unclaimed 4-neighbour unless both are boundary cells (a boundary cell may
// be claimed, but never claims another boundary cell); the rule is symmetric. So a flood claims
// exactly the connected component of its seed in the graph whose edges join 4-neighbours that are
// not both boundary: nothing a flood claims can be reached by another, whatever the visiting
// order. SEGMENT seeds floods at the first unclaimed cell in scan order, so its masks are these
// components, numbered in scan order of their first cell, and those of min_size cells or fewer
// dropped (the author's code keeps masks of more than 10 cells; the pseudo-code writes mass >= T).
// We label them with a union-find in one raster pass, each component's root being its first
// cell: no recursion, no stack, memory linear in the image, the same masks as the pseudo-code
// (tests/postprocess_reference.py runs Algorithms 2-3 literally to check).
#include "postprocess.h"

#include <algorithm>
#include <vector>

namespace unet_postprocess {
namespace {

// Root of p's component; halves the path as it goes. Every parent index is <= its child's.
int32_t find_root(std::vector<int32_t>& parent, int32_t p) {
  while (parent[p] != p) {
    parent[p] = parent[parent[p]];
    p = parent[p];
  }
  return p;
}

// Joins the components of a and b (both roots); the earlier cell in scan order stays root.
int32_t unite(std::vector<int32_t>& parent, int32_t a, int32_t b) {
  if (a == b) return a;
  const int32_t first = std::min(a, b);
  parent[std::max(a, b)] = first;
  return first;
}

// parent[p] for every cell such that following parents reaches the first cell of p's component.
// The left neighbour's root is carried along the row: nothing merges between two cells.
void link_components(const bool* boundary, int64_t height, int64_t width, std::vector<int32_t>& parent) {
  for (int64_t y = 0; y < height; ++y) {
    const bool* row = boundary + y * width;
    int32_t left_root = -1;
    for (int64_t x = 0; x < width; ++x) {
      const int32_t p = static_cast<int32_t>(y * width + x);
      const bool b = row[x];
      int32_t root = x > 0 && !(b && row[x - 1]) ? left_root : p;
      parent[p] = root;
      if (y > 0 && !(b && row[x - width])) {
        const int32_t above = find_root(parent, static_cast<int32_t>(p - width));
        root = root == p ? above : unite(parent, root, above);
        parent[p] = root;
      }
      left_root = root;
    }
  }
}

}  // namespace

int32_t segment_image(const bool* boundary, int64_t height, int64_t width, int64_t min_size, int32_t* regions) {
  const int64_t pixels = height * width;
  std::vector<int32_t> parent(pixels);
  link_components(boundary, height, width, parent);

  // Parents precede children, so one pass in scan order points every cell at its root.
  std::vector<int32_t> size(pixels, 0);
  for (int64_t p = 0; p < pixels; ++p) {
    parent[p] = parent[parent[p]];
    ++size[parent[p]];
  }
  // A root is its component's first cell: numbering roots as they come is scan order.
  int32_t count = 0;
  for (int64_t p = 0; p < pixels; ++p) {
    const int32_t root = parent[p];
    if (root == p) size[p] = size[p] > min_size ? count++ : -1;  // size now holds the id
    regions[p] = size[root];
  }
  return count;
}

}  // namespace unet_postprocess
