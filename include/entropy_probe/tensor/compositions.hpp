// The backends' compositions: elementwise maps of a functor, gated maps and
// the log-softmax passes, written once over the primitives of the backend
// contract (tensor/backend.hpp: parallel_for, parallel_for_2d, row_sum,
// row_max, allocate_uninitialized), with host/device lambdas so that nvcc
// compiles them for CudaBackend as it does every op.
//
// The ops call the free functions at the bottom (unary_map<F, B>(...),
// softmax_lse<B>(...), ...). Each uses B's own static member of the same
// name and signature when B declares one (CpuBackend's SIMD and Eigen-array
// forms: an optional override, faster on that backend) and the generic
// composition of namespace `generic` otherwise (CudaBackend declares none). A
// backend that must run the generic forms although it inherits overrides
// sets `static constexpr bool generic_compositions = true` (the tests'
// emulated device, tests/cuda/emulated_backend.hpp, which runs what CUDA
// runs on the CPU).
//
// The contracts, for F a functor of tensor/functors.hpp (value F::f,
// derivative F::df):
//   unary_map:    y[i]   = F::f(x[i])
//   unary_vjp:    gx[i] += gy[i] * F::df(x[i])   (= with `assign`: gx unfilled)
//   unary_jvp:    ty[i]  = F::df(x[i]) * tx[i]
//   gated_map:    y[i]   = F::f(g[i]) * u[i]     (a gated MLP: SwiGLU for Silu)
//   gated_vjp:    gg[i] += gy[i] * u[i] * F::df(g[i]),  gu[i] += gy[i] * F::f(g[i])
//                 (= with assign_g / assign_u: unfilled; a null gg or gu is not
//                 wanted; gg and gu must not overlap)
//   gated_jvp:    ty[i]  = F::df(g[i]) * tg[i] * u[i] + F::f(g[i]) * tu[i]  (null tg / tu: zero)
// and the passes of a log-softmax over rows of logits (log_softmax_gather,
// lm_head_logprob): for k in [0, m), row k is z[rows[k] * V .. + V) and
// p_kj = exp(z_kj s - lse[k]):
//   softmax_lse:  lse[k] = log sum_j exp(z_kj s)                (max-shifted)
//   softmax_vjp:  gz_kj += c_k (onehot(targets[k])_j - p_kj),  c_k = g[rows[k]] s
//                 (= with `assign`: gz unfilled, or gz = z, overwriting the logits in place)
//   softmax_dot:  out[k] = sum_j p_kj t_kj
// with sums and lse in double (acc_t).
#pragma once

#include "entropy_probe/core/config.hpp"

#include <cmath>
#include <cstdint>

namespace entropy_probe {

// The generic compositions: one B::parallel_for (or row reduction) each, F's
// scalar forms per element, the softmax's exp and sums in double.
namespace generic {

template <class F, class B, class T>
void unary_map(index_t n, const T* x, T* y) {
  B::parallel_for(n, [=] EP_HOST_DEVICE(index_t i) { y[i] = F::f(x[i]); });
}
template <class F, class B, class T>
void unary_vjp(index_t n, const T* x, const T* gy, T* gx, bool assign) {
  B::parallel_for(n, [=] EP_HOST_DEVICE(index_t i) {
    const T g = gy[i] * F::df(x[i]);
    gx[i] = assign ? g : gx[i] + g;
  });
}
template <class F, class B, class T>
void unary_jvp(index_t n, const T* x, const T* tx, T* ty) {
  B::parallel_for(n, [=] EP_HOST_DEVICE(index_t i) { ty[i] = F::df(x[i]) * tx[i]; });
}

template <class F, class B, class T>
void gated_map(index_t n, const T* g, const T* u, T* y) {
  B::parallel_for(n, [=] EP_HOST_DEVICE(index_t i) { y[i] = F::f(g[i]) * u[i]; });
}
template <class F, class B, class T>
void gated_vjp(index_t n, const T* g, const T* u, const T* gy, T* gg, bool assign_g, T* gu, bool assign_u) {
  B::parallel_for(n, [=] EP_HOST_DEVICE(index_t i) {
    if (gg) {
      const T a = gy[i] * u[i] * F::df(g[i]);
      gg[i] = assign_g ? a : gg[i] + a;
    }
    if (gu) {
      const T b = gy[i] * F::f(g[i]);
      gu[i] = assign_u ? b : gu[i] + b;
    }
  });
}
template <class F, class B, class T>
void gated_jvp(index_t n, const T* g, const T* u, const T* tg, const T* tu, T* ty) {
  B::parallel_for(n, [=] EP_HOST_DEVICE(index_t i) {
    T t(0);
    if (tg) t = F::df(g[i]) * tg[i] * u[i];
    if (tu) t += F::f(g[i]) * tu[i];
    ty[i] = t;
  });
}

// Row reductions for the sums (a block per row on a device), one thread per
// element for the gradient.
template <class B, class T>
void softmax_lse(index_t m, index_t V, const T* z, const std::int32_t* rows, acc_t s, acc_t* lse) {
  B::row_max(  // lse holds the row max until the last step
      m, V, [=] EP_HOST_DEVICE(index_t k, index_t j) { return static_cast<acc_t>(z[rows[k] * V + j]) * s; }, lse);
  auto sum = B::template allocate_uninitialized<acc_t>(m);
  acc_t* sp = sum.data();
  B::row_sum(
      m, V,
      [=] EP_HOST_DEVICE(index_t k, index_t j) {
        return std::exp(static_cast<acc_t>(z[rows[k] * V + j]) * s - lse[k]);
      },
      sp);
  B::parallel_for(m, [=] EP_HOST_DEVICE(index_t k) { lse[k] += std::log(sp[k]); });
}
template <class B, class T>
void softmax_vjp(index_t m, index_t V, const T* z, const std::int32_t* rows, const std::int32_t* targets,
                 const acc_t* lse, const T* g, acc_t s, T* gz, bool assign) {
  B::parallel_for_2d(m, V, [=] EP_HOST_DEVICE(index_t k, index_t j) {
    const index_t at = rows[k] * V + j;
    const acc_t c = static_cast<acc_t>(g[rows[k]]) * s;
    const acc_t p = std::exp(static_cast<acc_t>(z[at]) * s - lse[k]);
    const T v = static_cast<T>(c * ((j == targets[k] ? 1.0 : 0.0) - p));
    gz[at] = assign ? v : gz[at] + v;
  });
}
template <class B, class T>
void softmax_dot(index_t m, index_t V, const T* z, const std::int32_t* rows, const acc_t* lse, acc_t s, const T* t,
                 acc_t* out) {
  B::row_sum(
      m, V,
      [=] EP_HOST_DEVICE(index_t k, index_t j) {
        const index_t at = rows[k] * V + j;
        return std::exp(static_cast<acc_t>(z[at]) * s - lse[k]) * static_cast<acc_t>(t[at]);
      },
      out);
}

}  // namespace generic

// Whether B's own members replace the generic compositions (where it has
// them): true unless B sets `generic_compositions = true`.
namespace detail {
template <class B>
constexpr bool uses_own_compositions() {
  if constexpr (requires { B::generic_compositions; })
    return !B::generic_compositions;
  else
    return true;
}
}  // namespace detail
template <class B>
inline constexpr bool uses_own_compositions = detail::uses_own_compositions<B>();

// The dispatch the ops call: B's own member when it declares one that takes
// these arguments (an override), else the generic composition.
template <class F, class B, class T>
void unary_map(index_t n, const T* x, T* y) {
  if constexpr (uses_own_compositions<B> && requires { B::template unary_map<F>(n, x, y); })
    B::template unary_map<F>(n, x, y);
  else
    generic::unary_map<F, B>(n, x, y);
}
template <class F, class B, class T>
void unary_vjp(index_t n, const T* x, const T* gy, T* gx, bool assign) {
  if constexpr (uses_own_compositions<B> && requires { B::template unary_vjp<F>(n, x, gy, gx, assign); })
    B::template unary_vjp<F>(n, x, gy, gx, assign);
  else
    generic::unary_vjp<F, B>(n, x, gy, gx, assign);
}
template <class F, class B, class T>
void unary_jvp(index_t n, const T* x, const T* tx, T* ty) {
  if constexpr (uses_own_compositions<B> && requires { B::template unary_jvp<F>(n, x, tx, ty); })
    B::template unary_jvp<F>(n, x, tx, ty);
  else
    generic::unary_jvp<F, B>(n, x, tx, ty);
}

template <class F, class B, class T>
void gated_map(index_t n, const T* g, const T* u, T* y) {
  if constexpr (uses_own_compositions<B> && requires { B::template gated_map<F>(n, g, u, y); })
    B::template gated_map<F>(n, g, u, y);
  else
    generic::gated_map<F, B>(n, g, u, y);
}
template <class F, class B, class T>
void gated_vjp(index_t n, const T* g, const T* u, const T* gy, T* gg, bool assign_g, T* gu, bool assign_u) {
  if constexpr (uses_own_compositions<B> &&
                requires { B::template gated_vjp<F>(n, g, u, gy, gg, assign_g, gu, assign_u); })
    B::template gated_vjp<F>(n, g, u, gy, gg, assign_g, gu, assign_u);
  else
    generic::gated_vjp<F, B>(n, g, u, gy, gg, assign_g, gu, assign_u);
}
template <class F, class B, class T>
void gated_jvp(index_t n, const T* g, const T* u, const T* tg, const T* tu, T* ty) {
  if constexpr (uses_own_compositions<B> && requires { B::template gated_jvp<F>(n, g, u, tg, tu, ty); })
    B::template gated_jvp<F>(n, g, u, tg, tu, ty);
  else
    generic::gated_jvp<F, B>(n, g, u, tg, tu, ty);
}

template <class B, class T>
void softmax_lse(index_t m, index_t V, const T* z, const std::int32_t* rows, acc_t s, acc_t* lse) {
  if constexpr (uses_own_compositions<B> && requires { B::softmax_lse(m, V, z, rows, s, lse); })
    B::softmax_lse(m, V, z, rows, s, lse);
  else
    generic::softmax_lse<B>(m, V, z, rows, s, lse);
}
template <class B, class T>
void softmax_vjp(index_t m, index_t V, const T* z, const std::int32_t* rows, const std::int32_t* targets,
                 const acc_t* lse, const T* g, acc_t s, T* gz, bool assign = false) {
  if constexpr (uses_own_compositions<B> && requires { B::softmax_vjp(m, V, z, rows, targets, lse, g, s, gz, assign); })
    B::softmax_vjp(m, V, z, rows, targets, lse, g, s, gz, assign);
  else
    generic::softmax_vjp<B>(m, V, z, rows, targets, lse, g, s, gz, assign);
}
template <class B, class T>
void softmax_dot(index_t m, index_t V, const T* z, const std::int32_t* rows, const acc_t* lse, acc_t s, const T* t,
                 acc_t* out) {
  if constexpr (uses_own_compositions<B> && requires { B::softmax_dot(m, V, z, rows, lse, s, t, out); })
    B::softmax_dot(m, V, z, rows, lse, s, t, out);
  else
    generic::softmax_dot<B>(m, V, z, rows, lse, s, t, out);
}

}  // namespace entropy_probe
