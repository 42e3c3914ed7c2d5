// Rows picked by index, and the transpose, forward / VJP / JVP side by side.
// A "row" is the last dimension of x (a scalar for a 1-d x); `index` is
// strictly increasing, so no two rows ever write the same output.
//
//   gather_rows:   y[k, :] = x[index[k], :]            x [..., D] (n rows) -> y [m, D]  (x [n] -> y [m])
//                  VJP: dx[index[k], :] += dy[k, :]    JVP: ty[k, :] = tx[index[k], :]
//   scatter_rows:  y[index[k], ...] = x[k, ...], 0 elsewhere    x [m, ...] -> y [n, ...]
//                  VJP: dx[k, ...] += dy[index[k], ...]         JVP: ty[index[k], ...] = tx[k, ...]
//
// The models use gather_rows to run lm_head (and what precedes it position
// by position) only on the positions whose logits score a token; the probe
// scatters the scored log-probabilities back to their [R*T] positions.
#pragma once

#include "entropy_probe/tape/tape.hpp"

#include <cstdint>
#include <memory>
#include <span>

namespace entropy_probe {

namespace detail {
template <class B>
std::shared_ptr<const Tensor<std::int32_t, B>> checked_row_index(std::span<const std::int32_t> index, index_t n_rows,
                                                                 const char* op) {
  for (std::size_t k = 0; k < index.size(); ++k) {
    if (index[k] < 0 || index[k] >= n_rows)
      fail<UsageError>("{}: index[{}] = {} is outside the {} rows", op, k, index[k], n_rows);
    if (k > 0 && index[k] <= index[k - 1])
      fail<UsageError>("{}: index must be strictly increasing, but index[{}] = {} follows {}", op, k, index[k],
                       index[k - 1]);
  }
  const auto m = static_cast<index_t>(index.size());
  return save_for_rules(Tensor<std::int32_t, B>::from_host({m}, index));  // the rules share it
}
}  // namespace detail

// y [m, D] = the rows index[0..m) of x, x [..., D] seen as n rows of D.
template <class T, class B>
Var gather_rows(Tape<T, B>& tape, Var x, std::span<const std::int32_t> index) {
  const Shape& xs = tape.shape(x);
  const index_t d = xs.size() <= 1 ? 1 : xs.back();
  const index_t n = d == 0 ? 0 : tape.value(x).numel() / d;
  auto idx = detail::checked_row_index<B>(index, n, "gather_rows");
  const index_t m = idx->numel();

  auto y = Tensor<T, B>::uninitialized(xs.size() <= 1 ? Shape{m} : Shape{m, d});
  {
    const T* xp = tape.value(x).data();
    const std::int32_t* ip = idx->data();
    T* yp = y.data();
    B::parallel_for_2d(m, d, [=] EP_HOST_DEVICE(index_t k, index_t j) { yp[k * d + j] = xp[ip[k] * d + j]; });
  }
  auto backward = [&tape, x, idx, m, d](Var self) {
    if (!tape.requires_grad(x)) return;
    const T* gy = tape.grad_data(self);
    const std::int32_t* ip = idx->data();
    T* gx = tape.grad_into(x).zeroed();  // a scatter: rows not in index stay 0
    B::parallel_for_2d(m, d, [=] EP_HOST_DEVICE(index_t k, index_t j) { gx[ip[k] * d + j] += gy[k * d + j]; });
  };
  auto jvp = [&tape, x, idx, m, d](Var self) {
    const T* tx = tape.tangent_data(x);
    if (!tx) return;
    const std::int32_t* ip = idx->data();
    T* ty = tape.tangent_into(self).data;  // every row gathered
    B::parallel_for_2d(m, d, [=] EP_HOST_DEVICE(index_t k, index_t j) { ty[k * d + j] = tx[ip[k] * d + j]; });
  };
  return tape.record("gather_rows", std::move(y), {x}, backward, jvp);
}

// y [n, ...] with y[index[k], ...] = x[k, ...] and zeros elsewhere; x [m, ...]
// with m = index.size().
template <class T, class B>
Var scatter_rows(Tape<T, B>& tape, Var x, std::span<const std::int32_t> index, index_t n) {
  const Shape& xs = tape.shape(x);
  if (n < 0) fail<UsageError>("scatter_rows: negative row count {}", n);
  if (xs.empty() || xs[0] != static_cast<index_t>(index.size()))
    fail<UsageError>("scatter_rows: x has shape {}, expected [{}, ...] (one row per index)", shape_str(xs),
                     index.size());
  auto idx = detail::checked_row_index<B>(index, n, "scatter_rows");
  const index_t m = idx->numel();
  const index_t d = m == 0 ? 0 : tape.value(x).numel() / m;  // elements per row
  Shape ys = xs;
  ys[0] = n;

  Tensor<T, B> y(ys);  // zeros where no row lands
  {
    const T* xp = tape.value(x).data();
    const std::int32_t* ip = idx->data();
    T* yp = y.data();
    B::parallel_for_2d(m, d, [=] EP_HOST_DEVICE(index_t k, index_t j) { yp[ip[k] * d + j] = xp[k * d + j]; });
  }
  auto backward = [&tape, x, idx, m, d](Var self) {
    if (!tape.requires_grad(x)) return;
    const T* gy = tape.grad_data(self);
    const std::int32_t* ip = idx->data();
    const OutRef<T, B> gx = tape.grad_into(x);  // every row of dx gathered: assigns when fresh
    B::parallel_for_2d(m, d, [=] EP_HOST_DEVICE(index_t k, index_t j) { gx.add(k * d + j, gy[ip[k] * d + j]); });
  };
  auto jvp = [&tape, x, idx, m, d](Var self) {
    const T* tx = tape.tangent_data(x);
    if (!tx) return;
    const std::int32_t* ip = idx->data();
    T* ty = tape.tangent_into(self).zeroed();  // a scatter: rows not in index stay 0
    B::parallel_for_2d(m, d, [=] EP_HOST_DEVICE(index_t k, index_t j) { ty[ip[k] * d + j] = tx[k * d + j]; });
  };
  return tape.record("scatter_rows", std::move(y), {x}, backward, jvp);
}

}  // namespace entropy_probe
