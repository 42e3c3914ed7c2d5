// The layout of a batch of equal-shaped matrix products, for the backends'
// gemm_batched: item (i0, i1, i2), i_l < n[l], reads A at
// a + i0 sa[0] + i1 sa[1] + i2 sa[2], B likewise, and writes C likewise.
// Items run in any order, possibly at once, so no two may write the same C
// block. Three levels cover attention's per-(row, KV group, head-in-group)
// products, where a KV head is shared by its group (stride 0), which a
// single stride cannot express.
#pragma once

#include "entropy_probe/core/config.hpp"

namespace entropy_probe {

struct BatchGrid {
  index_t n[3] = {1, 1, 1};
  index_t sa[3] = {0, 0, 0}, sb[3] = {0, 0, 0}, sc[3] = {0, 0, 0};

  // `batch` items at a single stride each (a strided batch).
  static BatchGrid strided(index_t batch, index_t stride_a, index_t stride_b, index_t stride_c) {
    BatchGrid g;
    g.n[0] = batch;
    g.sa[0] = stride_a, g.sb[0] = stride_b, g.sc[0] = stride_c;
    return g;
  }

  EP_HOST_DEVICE index_t count() const { return n[0] * n[1] * n[2]; }
  // Offsets of item i, the items numbered with i2 fastest.
  EP_HOST_DEVICE void offsets(index_t i, index_t& oa, index_t& ob, index_t& oc) const {
    const index_t i2 = i % n[2], i1 = (i / n[2]) % n[1], i0 = i / (n[2] * n[1]);
    oa = i0 * sa[0] + i1 * sa[1] + i2 * sa[2];
    ob = i0 * sb[0] + i1 * sb[1] + i2 * sb[2];
    oc = i0 * sc[0] + i1 * sc[1] + i2 * sc[2];
  }
  // The level with more than one item when at most one has (0 when none):
  // then the batch is a plain strided one.
  int single_level() const {
    int level = 0, levels = 0;
    for (int l = 0; l < 3; ++l)
      if (n[l] > 1) level = l, ++levels;
    return levels <= 1 ? level : -1;
  }
};

}  // namespace entropy_probe
