// Scalar math shared by the CPU and CUDA backends: each functor is a struct of
// static host/device functions templated on the element type, `f` the value
// and `df` the derivative, so an op's forward, VJP and JVP kernels call the
// same code on either backend (and the CPU tests exercise the device math):
// the generic compositions of tensor/compositions.hpp (unary and gated maps)
// call these scalar forms per element.
//
// std:: math functions are fine here: on the host they are the usual ones,
// and nvcc maps std::exp / std::tanh on float and double to device builtins.
//
// Each functor also has `f_array` / `df_array`, the same formula on an Eigen
// array expression, for the CPU backend's elementwise primitives: Eigen
// evaluates exp and tanh with SIMD where glibc's scalar calls cost ~17 ns an
// element (docs/performance.md); CpuBackend's overrides of the compositions
// run them. Host only; tests/tensor/test_cpu_backend.cpp checks them against
// the scalar forms. A functor may add `f_simd` / `df_simd` (float, host
// only): the CPU backend then uses those instead; likewise `gated_simd` /
// `gated_vjp_simd` / `gated_jvp_simd` for the gated maps act(gate) * up.
#pragma once

#include "entropy_probe/core/config.hpp"
#include "entropy_probe/tensor/simd.hpp"

#include <Eigen/Core>

#include <cmath>

namespace entropy_probe {

// sigma(x) = 1 / (1 + e^-x), evaluated so that exp never overflows:
// for x < 0 use e^x / (1 + e^x), where e^x <= 1.
struct Sigmoid {
  template <class T>
  static EP_HOST_DEVICE T f(T x) {
    if (x >= T(0)) return T(1) / (T(1) + std::exp(-x));
    const T e = std::exp(x);
    return e / (T(1) + e);
  }
  // sigma'(x) = sigma(x) (1 - sigma(x))
  template <class T>
  static EP_HOST_DEVICE T df(T x) {
    const T s = f(x);
    return s * (T(1) - s);
  }
  // 1 / (1 + e^-x): for very negative x, e^-x is huge or inf and the result
  // 0, never NaN.
  template <class A>
  static auto f_array(const Eigen::ArrayBase<A>& x) {
    using T = typename A::Scalar;
    return T(1) / (T(1) + (-x).exp());
  }
};

// e^x, for attention's probabilities exp(S - shift) (tape/ops/flash_attention.hpp).
struct Exp {
  template <class T>
  static EP_HOST_DEVICE T f(T x) {
    return std::exp(x);
  }
  template <class T>
  static EP_HOST_DEVICE T df(T x) {
    return std::exp(x);
  }
  template <class A>
  static auto f_array(const Eigen::ArrayBase<A>& x) {
    return x.exp();
  }
  template <class A>
  static auto df_array(const Eigen::ArrayBase<A>& x) {
    return x.exp();
  }
};

// GELU, tanh approximation (GPT-2's "gelu_new", PyTorch approximate="tanh"):
//   f(x)  = 0.5 x (1 + tanh(u)),  u = c (x + k x^3),  c = sqrt(2/pi), k = 0.044715
//   f'(x) = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) c (1 + 3 k x^2)
struct GeluTanh {
  static constexpr double kC = 0.7978845608028654;  // sqrt(2 / pi)
  static constexpr double kK = 0.044715;

  template <class T>
  static EP_HOST_DEVICE T f(T x) {
    const T u = T(kC) * (x + T(kK) * x * x * x);
    return T(0.5) * x * (T(1) + std::tanh(u));
  }
  template <class T>
  static EP_HOST_DEVICE T df(T x) {
    const T u = T(kC) * (x + T(kK) * x * x * x);
    const T t = std::tanh(u);
    return T(0.5) * (T(1) + t) + T(0.5) * x * (T(1) - t * t) * T(kC) * (T(1) + T(3 * kK) * x * x);
  }
  // The array forms use 1 + tanh u = 2 sigma(2u) and 1 - tanh u = 2 sigma(-2u):
  //   f = x sigma(2u),  f' = sigma(2u) + 2 x sigma(2u) sigma(-2u) c (1 + 3 k x^2)
  // exp-based, so float keeps a few ulps (Eigen's float tanh() is good to only
  // ~1e-6, which x (1 + 3 k x^2) amplifies in f'), and there is no cancellation.
  template <class A>
  static auto two_u_array(const Eigen::ArrayBase<A>& x) {
    using T = typename A::Scalar;
    return T(2 * kC) * (x + T(kK) * x.cube());
  }
  template <class A>
  static auto f_array(const Eigen::ArrayBase<A>& x) {
    return x * Sigmoid::f_array(two_u_array(x));
  }
  template <class A>
  static auto df_array(const Eigen::ArrayBase<A>& x) {
    using T = typename A::Scalar;
    const Eigen::Array<T, Eigen::Dynamic, 1> two_u = two_u_array(x);
    const Eigen::Array<T, Eigen::Dynamic, 1> s = Sigmoid::f_array(two_u), s_neg = Sigmoid::f_array(-two_u);
    return Eigen::Array<T, Eigen::Dynamic, 1>(s + T(2 * kC) * x * s * s_neg * (T(1) + T(3 * kK) * x.square()));
  }
};

// SiLU (swish), Llama/Qwen2's MLP activation:
//   f(x)  = x sigma(x)
//   f'(x) = sigma(x) + x sigma(x) (1 - sigma(x)) = sigma(x) (1 + x (1 - sigma(x)))
struct Silu {
  template <class T>
  static EP_HOST_DEVICE T f(T x) {
    return x * Sigmoid::f(x);
  }
  template <class T>
  static EP_HOST_DEVICE T df(T x) {
    const T s = Sigmoid::f(x);
    return s * (T(1) + x * (T(1) - s));
  }
  template <class A>
  static auto f_array(const Eigen::ArrayBase<A>& x) {
    return x * Sigmoid::f_array(x);
  }
  template <class A>
  static auto df_array(const Eigen::ArrayBase<A>& x) {
    using T = typename A::Scalar;
    const Eigen::Array<T, Eigen::Dynamic, 1> s = Sigmoid::f_array(x);  // once, used twice
    return Eigen::Array<T, Eigen::Dynamic, 1>(s * (T(1) + x * (T(1) - s)));
  }
  // Float forms for the CPU backend: the dispatched kernels of simd.hpp
  // (the MLP's activation is one of the largest non-product passes).
  static void f_simd(index_t n, const float* x, float* y) { simd::silu(n, x, y); }
  static void df_simd(index_t n, const float* x, float* d) { simd::silu_df(n, x, d); }
  // ... and of the gated MLP's silu(gate) * up (SwiGLU), one pass each.
  static void gated_simd(index_t n, const float* g, const float* u, float* y) { simd::silu_mul(n, g, u, y); }
  static void gated_vjp_simd(index_t n, const float* g, const float* u, const float* gy, float* gg, bool assign_g,
                             float* gu, bool assign_u) {
    simd::silu_mul_vjp(n, g, u, gy, gg, assign_g, gu, assign_u);
  }
  static void gated_jvp_simd(index_t n, const float* g, const float* u, const float* tg, const float* tu, float* ty) {
    simd::silu_mul_jvp(n, g, u, tg, tu, ty);
  }
};

// GELU, exact form (PyTorch's default, transformers' "gelu"):
//   f(x)  = x Phi(x),  Phi(x) = 0.5 (1 + erf(x / sqrt 2)) = 0.5 erfc(-x / sqrt 2)
//   f'(x) = Phi(x) + x phi(x),  phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
// Phi through erfc keeps relative accuracy in the left tail, where
// 1 + erf(.) cancels.
// Eigen's erf for arrays lives in an unsupported module, so the array forms
// evaluate the scalar formula per element.
struct GeluErf {
  static constexpr double kInvSqrt2 = 0.7071067811865476;    // 1 / sqrt(2)
  static constexpr double kInvSqrt2Pi = 0.3989422804014327;  // 1 / sqrt(2 pi)

  template <class T>
  static EP_HOST_DEVICE T f(T x) {
    return T(0.5) * x * std::erfc(-x * T(kInvSqrt2));
  }
  template <class T>
  static EP_HOST_DEVICE T df(T x) {
    return T(0.5) * std::erfc(-x * T(kInvSqrt2)) + x * T(kInvSqrt2Pi) * std::exp(T(-0.5) * x * x);
  }
  template <class A>
  static auto f_array(const Eigen::ArrayBase<A>& x) {
    using T = typename A::Scalar;
    return x.unaryExpr([](T v) { return f(v); });
  }
  template <class A>
  static auto df_array(const Eigen::ArrayBase<A>& x) {
    using T = typename A::Scalar;
    return x.unaryExpr([](T v) { return df(v); });
  }
};

// ReLU: f(x) = max(x, 0), f'(x) = 1 for x > 0 and 0 otherwise (PyTorch's
// choice at 0).
struct Relu {
  template <class T>
  static EP_HOST_DEVICE T f(T x) {
    return x > T(0) ? x : T(0);
  }
  template <class T>
  static EP_HOST_DEVICE T df(T x) {
    return x > T(0) ? T(1) : T(0);
  }
  template <class A>
  static auto f_array(const Eigen::ArrayBase<A>& x) {
    using T = typename A::Scalar;
    return x.max(T(0));
  }
  template <class A>
  static auto df_array(const Eigen::ArrayBase<A>& x) {
    using T = typename A::Scalar;
    return (x > T(0)).template cast<T>();
  }
};

}  // namespace entropy_probe
