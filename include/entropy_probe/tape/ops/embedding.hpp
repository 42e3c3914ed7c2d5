// Token embedding lookup, forward / VJP / JVP side by side.
//
//   y[i, :] = table[ids[i], :]                     table [V, D], ids [N] -> y [N, D]
//   VJP: dtable[v, :] += sum_{i : ids[i] = v} dy[i, :]    (repeated ids accumulate)
//   JVP: ty[i, :] = ttable[ids[i], :]
//
// The ids are data, not a differentiable input. They are validated on the
// host (every id in [0, V)) and copied to the backend once, so the kernels
// never index outside the table.
#pragma once

#include "entropy_probe/tape/tape.hpp"

#include <cstdint>
#include <span>

namespace entropy_probe {

template <class T, class B>
Var embedding(Tape<T, B>& tape, Var table, std::span<const std::int32_t> ids) {
  const Shape& ts = tape.shape(table);
  if (ts.size() != 2) fail<UsageError>("embedding: table shape {} is not [vocab, dim]", shape_str(ts));
  const index_t vocab = ts[0], d = ts[1];
  const index_t n = static_cast<index_t>(ids.size());
  for (index_t i = 0; i < n; ++i) {
    const std::int32_t id = ids[static_cast<std::size_t>(i)];
    if (id < 0 || id >= vocab)
      fail<UsageError>("embedding: ids[{}] = {} is outside the vocabulary [0, {})", i, id, vocab);
  }
  const auto idt = save_for_rules(Tensor<std::int32_t, B>::from_host({n}, ids));  // the rules share it

  // forward: gather rows
  auto y = Tensor<T, B>::uninitialized({n, d});  // every row gathered below
  {
    const T* tp = tape.value(table).data();
    const std::int32_t* ip = idt->data();
    T* yp = y.data();
    B::parallel_for(n * d, [=] EP_HOST_DEVICE(index_t k) {
      const index_t i = k / d, j = k - i * d;
      yp[k] = tp[static_cast<index_t>(ip[i]) * d + j];
    });
  }

  // Scatter-add. One parallel index per feature column, the N rows summed in
  // order inside: repeated ids never race, so this needs no atomics and is
  // deterministic under any parallel_for. (A device version wanting more
  // parallelism than D would scatter per (row, column) with atomicAdd, or
  // sort the ids first.)
  auto backward = [&tape, table, n, d, idt](Var self) {
    if (!tape.requires_grad(table)) return;
    const T* gy = tape.grad_data(self);
    T* gt = tape.grad_into(table).zeroed();  // a scatter-add: rows no id picks stay 0
    const std::int32_t* ip = idt->data();
    B::parallel_for(d, [=] EP_HOST_DEVICE(index_t j) {
      for (index_t i = 0; i < n; ++i) gt[static_cast<index_t>(ip[i]) * d + j] += gy[i * d + j];
    });
  };
  auto jvp = [&tape, table, n, d, idt](Var self) {  // gather the table tangent
    const T* tt = tape.tangent_data(table);
    if (!tt) return;
    T* ty = tape.tangent_into(self).data;  // every row gathered
    const std::int32_t* ip = idt->data();
    B::parallel_for(n * d, [=] EP_HOST_DEVICE(index_t k) {
      const index_t i = k / d, j = k - i * d;
      ty[k] = tt[static_cast<index_t>(ip[i]) * d + j];
    });
  };
  return tape.record("embedding", std::move(y), {table}, std::move(backward), std::move(jvp));
}

}  // namespace entropy_probe
