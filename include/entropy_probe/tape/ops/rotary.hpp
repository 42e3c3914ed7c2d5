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
// The cos/sin table is computed in double and cast once, so its only
// rounding is the final cast. Note that Hugging Face builds inv_freq and the angles in
// float32, so a float reference differs from this table at large positions by
// about pos * 1e-7 in the angle.
//
// Rope scaling (transformers' rope_type, modeling_rope_utils.py) only changes
// inv_freq and multiplies cos and sin by an attention factor m (so q.k scores
// scale by m^2); with d = Dh, b = theta, f = factor:
//   linear   inv_freq_i / f
//   dynamic  b' = b ((f L / M) - (f - 1))^(d / (d - 2)) when the forward's
//            sequence length L = max(position) + 1 exceeds
//            M = max_position_embeddings, else unchanged
//   yarn     per pair, a ramp between interpolation (inv_freq / f) and
//            extrapolation (inv_freq) over the correction range of beta_fast /
//            beta_slow rotations in original_max_position_embeddings;
//            m = attention_factor, or 0.1 ln f + 1 (with mscale / mscale_all_dim
//            their ratio)
//   llama3   wavelengths above original / low_freq_factor divided by f, below
//            original / high_freq_factor kept, smoothly blended between
#pragma once

#include "entropy_probe/tape/tape.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <numbers>
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

// The rotary settings of a config: rope_theta and the rope scaling
// (transformers' rope_parameters / rope_scaling). The defaults are plain
// rotary embeddings.
struct RopeParameters {
  enum class Type { plain, linear, dynamic, yarn, llama3 };
  Type type = Type::plain;
  double theta = 10000.0;
  double factor = 1.0;                                   // linear, dynamic, yarn, llama3
  index_t max_position_embeddings = 0;                   // dynamic
  index_t original_max_position_embeddings = 0;          // yarn, llama3
  double low_freq_factor = 1.0, high_freq_factor = 4.0;  // llama3
  double beta_fast = 32.0, beta_slow = 1.0;              // yarn
  double attention_factor = 0.0;                         // yarn: 0 = from factor, mscale and mscale_all_dim
  double mscale = 0.0, mscale_all_dim = 0.0;             // yarn (0 = absent)
  bool truncate = true;                                  // yarn: integer correction range

  static const char* type_name(Type t) {
    switch (t) {
      case Type::plain:
        return "default";
      case Type::linear:
        return "linear";
      case Type::dynamic:
        return "dynamic";
      case Type::yarn:
        return "yarn";
      case Type::llama3:
        return "llama3";
    }
    return "?";
  }
};

// inv_freq per pair and the cos/sin factor of a rope setting (see the file
// comment), for a forward whose largest position is seq_len - 1.
struct RotaryFrequencies {
  std::vector<double> inv_freq;
  double attention_factor = 1.0;
};

inline RotaryFrequencies rotary_frequencies(index_t head_dim, const RopeParameters& rope, index_t seq_len) {
  using Type = RopeParameters::Type;
  if (head_dim < 2 || head_dim % 2 != 0)
    fail<UsageError>("rotary: head dimension {} must be even and at least 2 (rotate_half pairs i with i + Dh/2)",
                     head_dim);
  auto require_positive = [&](double v, const char* what) {
    if (!(v > 0.0) || !std::isfinite(v))
      fail<UsageError>("rotary: {} = {} must be positive and finite (rope type {})", what, v,
                       RopeParameters::type_name(rope.type));
  };
  require_positive(rope.theta, "theta");
  if (rope.type != Type::plain) require_positive(rope.factor, "factor");
  const double d = static_cast<double>(head_dim), f = rope.factor;
  const index_t half = head_dim / 2;
  double base = rope.theta;
  if (rope.type == Type::dynamic) {
    require_positive(static_cast<double>(rope.max_position_embeddings), "max_position_embeddings");
    const double m = static_cast<double>(rope.max_position_embeddings);
    const double len = std::max(static_cast<double>(seq_len), m);
    base *= std::pow(f * len / m - (f - 1.0), d / (d - 2.0));
  }
  RotaryFrequencies out;
  out.inv_freq.resize(static_cast<std::size_t>(half));
  for (index_t i = 0; i < half; ++i)  // 1 / base^(2i / Dh)
    out.inv_freq[static_cast<std::size_t>(i)] = 1.0 / std::pow(base, static_cast<double>(2 * i) / d);
  if (rope.type == Type::linear) {
    for (double& x : out.inv_freq) x /= f;
  } else if (rope.type == Type::llama3) {
    const double orig = static_cast<double>(rope.original_max_position_embeddings);
    require_positive(orig, "original_max_position_embeddings");
    require_positive(rope.low_freq_factor, "low_freq_factor");
    if (!(rope.high_freq_factor > rope.low_freq_factor))
      fail<UsageError>("rotary: llama3 high_freq_factor {} must exceed low_freq_factor {}", rope.high_freq_factor,
                       rope.low_freq_factor);
    const double low_wavelen = orig / rope.low_freq_factor, high_wavelen = orig / rope.high_freq_factor;
    for (double& x : out.inv_freq) {
      const double wavelen = 2.0 * std::numbers::pi / x;
      if (wavelen > low_wavelen) {
        x /= f;
      } else if (wavelen >= high_wavelen) {  // between the two: blend
        const double smooth = (orig / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor);
        x = (1.0 - smooth) * x / f + smooth * x;
      }
    }
  } else if (rope.type == Type::yarn) {
    const double orig = static_cast<double>(rope.original_max_position_embeddings);
    require_positive(orig, "original_max_position_embeddings");
    auto mscale_of = [](double scale, double m) { return scale <= 1.0 ? 1.0 : 0.1 * m * std::log(scale) + 1.0; };
    if (rope.attention_factor > 0.0)
      out.attention_factor = rope.attention_factor;
    else if (rope.mscale != 0.0 && rope.mscale_all_dim != 0.0)
      out.attention_factor = mscale_of(f, rope.mscale) / mscale_of(f, rope.mscale_all_dim);
    else
      out.attention_factor = mscale_of(f, 1.0);
    // the pair index at which a wave makes `rotations` turns over the original context
    auto correction_dim = [&](double rotations) {
      return d * std::log(orig / (rotations * 2.0 * std::numbers::pi)) / (2.0 * std::log(rope.theta));
    };
    double low = correction_dim(rope.beta_fast), high = correction_dim(rope.beta_slow);
    if (rope.truncate) {
      low = std::floor(low);
      high = std::ceil(high);
    }
    low = std::max(low, 0.0);
    high = std::min(high, d - 1.0);
    if (low == high) high += 0.001;  // as transformers: no zero-width ramp
    for (index_t i = 0; i < half; ++i) {
      double& x = out.inv_freq[static_cast<std::size_t>(i)];
      const double ramp = std::clamp((static_cast<double>(i) - low) / (high - low), 0.0, 1.0);
      x = (x / f) * ramp + x * (1.0 - ramp);  // ramp 0: extrapolate (high frequencies kept)
    }
  }
  return out;
}

// The table for `positions` under `rope`. seq_len (dynamic scaling only) is
// the forward's sequence length as transformers counts it, max(position) + 1
// over every position of the batch, padding included; by default it is taken
// from `positions`.
template <class T, class B = CpuBackend>
std::shared_ptr<const RotaryTable<T, B>> make_rotary_table(std::span<const std::int32_t> positions, index_t head_dim,
                                                           const RopeParameters& rope, index_t seq_len = -1) {
  if (seq_len < 0) {
    seq_len = 0;
    for (std::int32_t p : positions) seq_len = std::max<index_t>(seq_len, index_t{p} + 1);
  }
  const RotaryFrequencies fr = rotary_frequencies(head_dim, rope, seq_len);
  const index_t rows = static_cast<index_t>(positions.size());
  const index_t half = head_dim / 2;
  std::vector<T> c(static_cast<std::size_t>(rows * half)), s(c.size());
  for (index_t r = 0; r < rows; ++r) {
    const double pos = positions[static_cast<std::size_t>(r)];
    for (index_t i = 0; i < half; ++i) {
      const double a = pos * fr.inv_freq[static_cast<std::size_t>(i)];
      c[static_cast<std::size_t>(r * half + i)] = static_cast<T>(fr.attention_factor * std::cos(a));
      s[static_cast<std::size_t>(r * half + i)] = static_cast<T>(fr.attention_factor * std::sin(a));
    }
  }
  auto table = std::make_shared<RotaryTable<T, B>>();
  table->rows = rows;
  table->head_dim = head_dim;
  table->cos = Tensor<T, B>::from_host({rows, half}, c);
  table->sin = Tensor<T, B>::from_host({rows, half}, s);
  return table;
}

// Plain rotary embeddings with base theta.
template <class T, class B = CpuBackend>
std::shared_ptr<const RotaryTable<T, B>> make_rotary_table(std::span<const std::int32_t> positions, index_t head_dim,
                                                           double theta) {
  RopeParameters rope;
  rope.theta = theta;
  return make_rotary_table<T, B>(positions, head_dim, rope);
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
    const OutRef<T, B> gx = tape.grad_into(x);  // every pair written: assigns when fresh
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
