// Float kernels with run-time ISA dispatch, for the CPU backend's hottest
// non-product passes: the vocabulary's log-softmax, flash attention's exp
// and the MLP's SiLU and SwiGLU.
//
// The build targets baseline x86-64 (no -march: the binary must run on any
// machine), so Eigen's packets there are SSE2, 4 floats. These loops are
// written so that GCC vectorizes them, and GCC's target_clones compiles each
// three times -- x86-64-v4 (AVX-512), x86-64-v3 (AVX2 + FMA) and the
// baseline -- with the loader picking the best the CPU has (an ifunc). On
// other compilers, nvcc and other architectures they are the plain loop.
//
// exp here is Cephes' single-precision polynomial (Cody-Waite range
// reduction, degree-6 minimax on [-ln2/2, ln2/2]), within 2 ulp of the true
// value on the range used (arguments <= 0): tests/tensor/test_simd.cpp.
// Results may differ in the last bit between ISAs (FMA contraction), never
// between runs or threads on one machine.
#pragma once

#include "entropy_probe/core/config.hpp"

#include <bit>
#include <cstdint>

#if defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__) && defined(__x86_64__) && \
    !defined(ENTROPY_PROBE_NO_SIMD_DISPATCH)
#define EP_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define EP_SIMD_CLONES
#endif

// The per-element helpers are always inlined: a loop vectorizes only with
// them inside, and in a large translation unit GCC's inliner may otherwise
// leave exp_lane a call in a kernel with several loops (silu_mul_vjp ran
// scalar that way).
#if defined(__GNUC__)
#define EP_SIMD_LANE [[gnu::always_inline]] inline
#else
#define EP_SIMD_LANE inline
#endif

namespace entropy_probe::simd {

// exp(v) for one float, branch-free so that a loop over it vectorizes.
// Arguments are clamped to [-87.3, 88.3]: below, the result is the smallest
// normal float instead of a denormal or 0 (callers use it under a sum or a
// product with a probability, where 1e-38 and 0 are the same); NaN stays NaN.
EP_SIMD_LANE float exp_lane(float v) {
  v = v < -87.3f ? -87.3f : v;
  v = v > 88.3f ? 88.3f : v;
  // n = round(v / ln2) by the 1.5 * 2^23 trick (no rounding instruction in
  // baseline x86-64), r = v - n ln2 in two parts (Cody-Waite).
  const float fn = (v * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (v - fn * 0.693359375f) + fn * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const std::int32_t e = (static_cast<std::int32_t>(fn) + 127) << 23;
  return p * std::bit_cast<float>(e);
}

// y[i] = exp(((x[i] - b) * a - c) - d), i in [0, n), y not overlapping x;
// and the same in place (a separate loop: an aliasing check would send
// x == y to the scalar loop). c + d is a shift given in two parts, so that a
// double shift (a log-sum-exp) is subtracted as exactly as float allows.
EP_SIMD_CLONES inline void exp_affine(index_t n, const float* __restrict x, float* __restrict y, float a, float b,
                                      float c, float d) {
  for (index_t i = 0; i < n; ++i) y[i] = exp_lane(((x[i] - b) * a - c) - d);
}
EP_SIMD_CLONES inline void exp_affine_inplace(index_t n, float* x, float a, float b, float c, float d) {
  for (index_t i = 0; i < n; ++i) x[i] = exp_lane(((x[i] - b) * a - c) - d);
}

// y[i] = exp(x[i] a - c) with the argument formed in double: p = exp(z s -
// lse) of the softmax passes. s = 1 / temperature and lse are doubles; in
// float, z s alone is off by up to half an ulp of |z s| (2e-6 at 60 / 0.7),
// which moves the p of the logit that holds the mass by as much. In double
// the argument is exact to ~1e-14 with or without FMA.
EP_SIMD_CLONES inline void exp_scaled(index_t n, const float* __restrict x, float* __restrict y, double a, double c) {
  for (index_t i = 0; i < n; ++i) y[i] = exp_lane(static_cast<float>(static_cast<double>(x[i]) * a - c));
}

// sigmoid(v) = 1 / (1 + exp(-v)); the clamp in exp_lane saturates it to 0
// and 1 at the ends instead of overflowing.
EP_SIMD_LANE float sigmoid_lane(float v) { return 1.0f / (1.0f + exp_lane(-v)); }

// SiLU and its derivative (tensor/functors.hpp's Silu):
//   y = x sigmoid(x),  d = sigmoid(x) (1 + x (1 - sigmoid(x)))
EP_SIMD_CLONES inline void silu(index_t n, const float* __restrict x, float* __restrict y) {
  for (index_t i = 0; i < n; ++i) y[i] = x[i] * sigmoid_lane(x[i]);
}
EP_SIMD_CLONES inline void silu_df(index_t n, const float* __restrict x, float* __restrict d) {
  for (index_t i = 0; i < n; ++i) {
    const float s = sigmoid_lane(x[i]);
    d[i] = s * (1.0f + x[i] * (1.0f - s));
  }
}

// The gated MLP's SwiGLU, y = silu(g) u, in one pass, with its VJP and JVP
// (tape/ops/elementwise.hpp's gated_activation; d = silu'(g) as above):
//   silu_mul:      y = (g s) u
//   silu_mul_vjp:  gg (+)= (gy u) d,  gu (+)= gy (g s)   (either may be null: not needed;
//                  `assign` writes instead of adding; gg and gu must not overlap)
//   silu_mul_jvp:  ty = (d tg) u + (g s) tu             (a null tangent is zero)
// in the order of operations of silu followed by a product, so the fused op
// gives the composition's results.
EP_SIMD_CLONES inline void silu_mul(index_t n, const float* __restrict g, const float* __restrict u,
                                    float* __restrict y) {
  for (index_t i = 0; i < n; ++i) y[i] = g[i] * sigmoid_lane(g[i]) * u[i];
}
// The VJP loop for one choice of outputs (a null one is skipped) and of
// assign / add, so that the loop has no branch and vectorizes; inlined into
// each clone of silu_mul_vjp.
template <bool HasG, bool AssignG, bool HasU, bool AssignU>
EP_SIMD_LANE void silu_mul_vjp_loop(index_t n, const float* __restrict g, const float* __restrict u,
                                    const float* __restrict gy, float* __restrict gg, float* __restrict gu) {
  for (index_t i = 0; i < n; ++i) {
    const float s = sigmoid_lane(g[i]);
    if constexpr (HasG) {
      const float a = gy[i] * u[i] * (s * (1.0f + g[i] * (1.0f - s)));
      gg[i] = AssignG ? a : gg[i] + a;
    }
    if constexpr (HasU) {
      const float b = gy[i] * (g[i] * s);
      gu[i] = AssignU ? b : gu[i] + b;
    }
  }
}
EP_SIMD_CLONES inline void silu_mul_vjp(index_t n, const float* __restrict g, const float* __restrict u,
                                        const float* __restrict gy, float* __restrict gg, bool assign_g,
                                        float* __restrict gu, bool assign_u) {
  if (gg && gu) {
    if (assign_g && assign_u)
      silu_mul_vjp_loop<true, true, true, true>(n, g, u, gy, gg, gu);
    else if (assign_g)
      silu_mul_vjp_loop<true, true, true, false>(n, g, u, gy, gg, gu);
    else if (assign_u)
      silu_mul_vjp_loop<true, false, true, true>(n, g, u, gy, gg, gu);
    else
      silu_mul_vjp_loop<true, false, true, false>(n, g, u, gy, gg, gu);
  } else if (gg) {
    if (assign_g)
      silu_mul_vjp_loop<true, true, false, false>(n, g, u, gy, gg, gu);
    else
      silu_mul_vjp_loop<true, false, false, false>(n, g, u, gy, gg, gu);
  } else if (gu) {
    if (assign_u)
      silu_mul_vjp_loop<false, false, true, true>(n, g, u, gy, gg, gu);
    else
      silu_mul_vjp_loop<false, false, true, false>(n, g, u, gy, gg, gu);
  }
}
EP_SIMD_CLONES inline void silu_mul_jvp(index_t n, const float* __restrict g, const float* __restrict u,
                                        const float* tg, const float* tu, float* __restrict ty) {
  if (tg && tu) {
    for (index_t i = 0; i < n; ++i) {
      const float s = sigmoid_lane(g[i]);
      ty[i] = (s * (1.0f + g[i] * (1.0f - s))) * tg[i] * u[i] + g[i] * s * tu[i];
    }
  } else if (tg) {
    for (index_t i = 0; i < n; ++i) {
      const float s = sigmoid_lane(g[i]);
      ty[i] = (s * (1.0f + g[i] * (1.0f - s))) * tg[i] * u[i];
    }
  } else if (tu) {
    for (index_t i = 0; i < n; ++i) ty[i] = g[i] * sigmoid_lane(g[i]) * tu[i];
  }
}

}  // namespace entropy_probe::simd
