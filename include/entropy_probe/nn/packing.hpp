// Which positions a causal LM's forward must compute when the caller reads
// only some logits (SequenceInput::logit_positions): the real tokens, which
// later positions attend to as keys, and the read positions themselves. A
// padding position is never a key, so dropping the others changes nothing,
// and every per-position layer (projections, MLP, norms, rotary) then runs
// on the kept rows only; attention scatters them back to its [R, T] grid.
#pragma once

#include "entropy_probe/module/module.hpp"
#include "entropy_probe/tape/ops/gather.hpp"
#include "entropy_probe/tape/ops/view.hpp"

#include <cstdint>
#include <optional>
#include <span>
#include <vector>

namespace entropy_probe::nn {

struct PackedPositions {
  index_t rows = 0, length = 0;
  std::vector<std::int32_t> keep;    // flattened r*T + t, increasing
  std::vector<std::int32_t> logits;  // index into keep of each logit position, in order

  // The kept entries of a per-position array ([R*T] -> [keep.size()]).
  template <class V>
  std::vector<V> select(const std::vector<V>& all) const {
    std::vector<V> out;
    out.reserve(keep.size());
    for (std::int32_t i : keep) out.push_back(all[static_cast<std::size_t>(i)]);
    return out;
  }
  // Kept rows [n, W] -> the [R, T, W] grid attention works on (zeros elsewhere).
  template <class T, class B>
  Var to_grid(Tape<T, B>& tape, Var x) const {
    const index_t w = tape.shape(x).back();
    return reshape(tape, scatter_rows(tape, x, std::span<const std::int32_t>(keep), rows * length), {rows, length, w});
  }
  // The grid [R, T, W] -> its kept rows [n, W].
  template <class T, class B>
  Var from_grid(Tape<T, B>& tape, Var x) const {
    return gather_rows(tape, x, std::span<const std::int32_t>(keep));
  }
};

// The packing for `in`, or nothing when every position must be computed (no
// logit_positions, or none to drop). A logit position may be a padding
// position; it is kept (its query still attends to the real keys before it).
inline std::optional<PackedPositions> pack_positions(const SequenceInput& in) {
  if (!in.logit_positions) return std::nullopt;
  const index_t n = in.rows * in.length;
  std::vector<std::uint8_t> needed(static_cast<std::size_t>(n), 0);
  for (index_t i = 0; i < n; ++i) needed[static_cast<std::size_t>(i)] = in.key_mask[static_cast<std::size_t>(i)] != 0;
  for (std::int32_t p : *in.logit_positions) {
    if (p < 0 || p >= n)
      fail<UsageError>("logit_positions: position {} is outside the {} x {} input", p, in.rows, in.length);
    needed[static_cast<std::size_t>(p)] = 1;
  }
  PackedPositions pk;
  pk.rows = in.rows;
  pk.length = in.length;
  std::vector<std::int32_t> slot(static_cast<std::size_t>(n), -1);
  for (index_t i = 0; i < n; ++i)
    if (needed[static_cast<std::size_t>(i)]) {
      slot[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(pk.keep.size());
      pk.keep.push_back(static_cast<std::int32_t>(i));
    }
  if (static_cast<index_t>(pk.keep.size()) == n) return std::nullopt;
  for (std::int32_t p : *in.logit_positions) pk.logits.push_back(slot[static_cast<std::size_t>(p)]);
  return pk;
}

}  // namespace entropy_probe::nn
