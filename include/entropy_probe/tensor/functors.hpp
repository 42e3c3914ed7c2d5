// Scalar math shared by the CPU and CUDA backends: each functor is a struct of
// static host/device functions templated on the element type, `f` the value
// and `df` the derivative, so an op's forward, VJP and JVP kernels call the
// same code on either backend (and the CPU tests exercise the device math).
//
// std:: math functions are fine here: on the host they are the usual ones,
// and nvcc maps std::exp / std::tanh on float and double to device builtins.
#pragma once

#include "entropy_probe/core/config.hpp"

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
};

}  // namespace entropy_probe
