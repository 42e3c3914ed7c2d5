// Rotary position embedding (RoPE), Hugging Face Llama/Qwen2 convention:
// rotate_half, non-interleaved, so pair i couples x_i with x_{i + Dh/2}.
// Forward / VJP / JVP side by side.
//
// x is N rows (one per position) of H heads of Dh features: [N, H, Dh], or
// [R, T, H*Dh] with N = R*T, or any shape whose leading dimensions multiply
// to N. For i in [0, Dh/2):
//   inv_freq_i = theta^(-2i/Dh),  a = pos * inv_freq_i,  c = cos a,  s = sin a
//   y_i        = x_i c - x_{i+Dh/2} s
//   y_{i+Dh/2} = x_{i+Dh/2} c + x_i s
// Each pair is rotated by angle a: a linear isometry, so
//   JVP: ty = R(a) tx        VJP: dx += R(a)^T dy = R(-a) dy
//
// The cos/sin table is computed in double and cast once (DESIGN.md: constant
// tables in double). Note that Hugging Face builds inv_freq and the angles in
// float32, so a float reference differs from this table at large positions by
// about pos * 1e-7 in the angle.
#pragma once

#include "entropy_probe/tape/tape.hpp"

#include <cmath>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

namespace entropy_probe {

// cos / sin of every (position, pair) angle: [rows, head_dim / 2] each.
// Immutable once built; ops share it through a shared_ptr, so a model builds
// one table per forward and uses it for q and k in every layer.
template <class T, class B = CpuBackend>
struct RotaryTable {
  index_t rows = 0;
  index_t head_dim = 0;
  Tensor<T, B> cos;
  Tensor<T, B> sin;
};

template <class T, class B = CpuBackend>
std::shared_ptr<const RotaryTable<T, B>> make_rotary_table(std::span<const std::int32_t> positions, index_t head_dim,
                                                           double theta) {
  if (head_dim < 2 || head_dim % 2 != 0)
    fail<UsageError>("rotary: head dimension {} must be even and at least 2 (rotate_half pairs i with i + Dh/2)",
                     head_dim);
  if (!(theta > 0.0) || !std::isfinite(theta))
    fail<UsageError>("rotary: theta = {} must be positive and finite", theta);
  const index_t rows = static_cast<index_t>(positions.size());
  const index_t half = head_dim / 2;
  std::vector<double> inv_freq(static_cast<std::size_t>(half));
  for (index_t i = 0; i < half; ++i)  // 1 / theta^(2i / Dh)
    inv_freq[static_cast<std::size_t>(i)] =
        1.0 / std::pow(theta, static_cast<double>(2 * i) / static_cast<double>(head_dim));
  std::vector<T> c(static_cast<std::size_t>(rows * half)), s(c.size());
  for (index_t r = 0; r < rows; ++r) {
    const double pos = positions[static_cast<std::size_t>(r)];
    for (index_t i = 0; i < half; ++i) {
      const double a = pos * inv_freq[static_cast<std::size_t>(i)];
      c[static_cast<std::size_t>(r * half + i)] = static_cast<T>(std::cos(a));
      s[static_cast<std::size_t>(r * half + i)] = static_cast<T>(std::sin(a));
    }
  }
  auto table = std::make_shared<RotaryTable<T, B>>();
  table->rows = rows;
  table->head_dim = head_dim;
  table->cos = Tensor<T, B>::from_host({rows, half}, c);
  table->sin = Tensor<T, B>::from_host({rows, half}, s);
  return table;
}

namespace detail {
// Width of one row when x's leading dimensions multiply to `rows`; fails when
// no prefix of the shape does (the positions do not match x).
inline index_t rotary_row_width(const Shape& s, index_t rows) {
  index_t prefix = 1;
  for (std::size_t k = 0; k <= s.size(); ++k) {
    if (prefix == rows) {
      index_t w = 1;
      for (std::size_t j = k; j < s.size(); ++j) w *= s[j];
      return w;
    }
    if (k < s.size()) prefix *= s[k];
  }
  fail<UsageError>(
      "rotary: x of shape {} does not split into {} rows (one per position): no leading dimensions "
      "multiply to {}",
      shape_str(s), rows, rows);
}

// dst = R(sign * a) src per pair (sign = +1 forward and JVP, -1 VJP);
// accumulate adds into dst instead of overwriting it.
template <class T, class B>
void rotary_apply(index_t rows, index_t heads, index_t head_dim, const T* cos, const T* sin, const T* src, T* dst,
                  T sign, bool accumulate) {
  const index_t half = head_dim / 2;
  const index_t per_row = heads * half;
  B::parallel_for(rows * per_row, [=] EP_HOST_DEVICE(index_t k) {
    const index_t r = k / per_row, rem = k - r * per_row;
    const index_t h = rem / half, i = rem - h * half;
    const index_t lo = r * heads * head_dim + h * head_dim + i, hi = lo + half;
    const T c = cos[r * half + i], s = sign * sin[r * half + i];
    const T y_lo = src[lo] * c - src[hi] * s;
    const T y_hi = src[hi] * c + src[lo] * s;
    if (accumulate) {
      dst[lo] += y_lo;
      dst[hi] += y_hi;
    } else {
      dst[lo] = y_lo;
      dst[hi] = y_hi;
    }
  });
}
}  // namespace detail

// Rotates x with a prebuilt table (rows = number of positions, head_dim = Dh).
template <class T, class B>
Var rotary(Tape<T, B>& tape, Var x, std::shared_ptr<const RotaryTable<T, B>> table, index_t n_heads) {
  if (!table) fail<UsageError>("rotary: null table");
  if (n_heads < 1) fail<UsageError>("rotary: n_heads = {} must be positive", n_heads);
  const index_t rows = table->rows, dh = table->head_dim;
  const index_t width = detail::rotary_row_width(tape.shape(x), rows);
  if (width != n_heads * dh)
    fail<UsageError>("rotary: x of shape {} has rows of {} features, expected {} heads x head_dim {} = {}",
                     shape_str(tape.shape(x)), width, n_heads, dh, n_heads * dh);

  // forward
  auto y = Tensor<T, B>::uninitialized(tape.shape(x));  // every pair written (head_dim is even)
  detail::rotary_apply<T, B>(rows, n_heads, dh, table->cos.data(), table->sin.data(), tape.value(x).data(), y.data(),
                             T(1), false);

  auto backward = [&tape, x, table, rows, n_heads, dh](Var self) {  // dx += R(-a) dy
    if (!tape.requires_grad(x)) return;
    const OutRef<T> gx = tape.grad_into(x);  // every pair written: assigns when fresh
    detail::rotary_apply<T, B>(rows, n_heads, dh, table->cos.data(), table->sin.data(), tape.grad_data(self), gx.data,
                               T(-1), !gx.fresh);
  };
  auto jvp = [&tape, x, table, rows, n_heads, dh](Var self) {  // ty = R(a) tx
    const T* tx = tape.tangent_data(x);
    if (!tx) return;
    detail::rotary_apply<T, B>(rows, n_heads, dh, table->cos.data(), table->sin.data(), tx,
                               tape.tangent_into(self).data, T(1), false);
  };
  return tape.record("rotary", std::move(y), {x}, std::move(backward), std::move(jvp));
}

// Rotates x, building the table from the positions (one per row of x);
// head_dim = (row width) / n_heads.
template <class T, class B>
Var rotary(Tape<T, B>& tape, Var x, std::span<const std::int32_t> positions, index_t n_heads, double theta) {
  if (n_heads < 1) fail<UsageError>("rotary: n_heads = {} must be positive", n_heads);
  const index_t width = detail::rotary_row_width(tape.shape(x), static_cast<index_t>(positions.size()));
  if (width % n_heads != 0)
    fail<UsageError>("rotary: rows of x (shape {}) have {} features, not divisible by n_heads = {}",
                     shape_str(tape.shape(x)), width, n_heads);
  return rotary(tape, x, make_rotary_table<T, B>(positions, width / n_heads, theta), n_heads);
}

}  // namespace entropy_probe
