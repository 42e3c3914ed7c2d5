// Elementwise ops, forward / VJP / JVP side by side.
//
//   add:        y = a + b             dA += dy,        dB += dy         ty = ta + tb
//   mul:        y = a * b             dA += dy * b,    dB += dy * a     ty = ta * b + a * tb
//   gelu_tanh:  y = GeluTanh(x)       dX += dy * f'(x)                  ty = f'(x) * tx
//   silu:       y = Silu(x)           dX += dy * f'(x)                  ty = f'(x) * tx
//   gelu_erf:   y = GeluErf(x)        (likewise)
//   relu:       y = Relu(x)           (likewise; f'(0) = 0 as in PyTorch)
//   gated_activation<F>:  y = F(g) * u   (a gated MLP; SwiGLU for F = Silu)
//               dG += dy * u * f'(g),  dU += dy * f(g)          ty = f'(g) tg u + f(g) tu
//
// Operands of add and mul must have the same shape (no broadcasting: a bias
// add lives in linear). The scalar math is in tensor/functors.hpp, shared
// with the device backend. add(x, x) and mul(x, x) are fine: both input
// gradients accumulate into the same buffer.
#pragma once

#include "entropy_probe/tape/tape.hpp"
#include "entropy_probe/tensor/compositions.hpp"
#include "entropy_probe/tensor/functors.hpp"

namespace entropy_probe {

namespace detail {
template <class T, class B>
void elementwise_same_shape(const Tape<T, B>& tape, Var a, Var b, const char* op) {
  if (tape.shape(a) != tape.shape(b))
    fail<UsageError>("{}: operand shapes {} and {} differ (no broadcasting)", op, shape_str(tape.shape(a)),
                     shape_str(tape.shape(b)));
}

// y = F::f(x) elementwise; the derivative F::df(x) is recomputed from the
// saved input in both directions (cheaper to store nothing than f'(x)).
template <class F, class T, class B>
Var unary_elementwise(Tape<T, B>& tape, Var x, const char* name) {
  const index_t n = tape.value(x).numel();
  auto y = Tensor<T, B>::uninitialized(tape.shape(x));
  unary_map<F, B>(n, tape.value(x).data(), y.data());
  auto backward = [&tape, x, n](Var self) {  // dX += dy * f'(x)
    if (!tape.requires_grad(x)) return;
    const OutRef<T, B> gx = tape.grad_into(x);
    unary_vjp<F, B>(n, tape.value(x).data(), tape.grad_data(self), gx.data, gx.fresh);
  };
  auto jvp = [&tape, x, n](Var self) {  // ty = f'(x) * tx (only called with tx present)
    const T* tx = tape.tangent_data(x);
    if (!tx) return;
    unary_jvp<F, B>(n, tape.value(x).data(), tx, tape.tangent_into(self).data);  // assigns all of ty
  };
  return tape.record(name, std::move(y), {x}, backward, jvp);
}
// g (+)= gy * other elementwise: assigns while g is fresh.
template <class T, class B>
void add_product_into(OutRef<T, B> g, const T* gy, const T* other) {
  B::parallel_for(g.size, [=] EP_HOST_DEVICE(index_t i) { g.add(i, gy[i] * other[i]); });
}
}  // namespace detail

// y = a + b (same shapes).
template <class T, class B>
Var add(Tape<T, B>& tape, Var a, Var b) {
  detail::elementwise_same_shape(tape, a, b, "add");
  const index_t n = tape.value(a).numel();
  auto y = Tensor<T, B>::uninitialized(tape.shape(a));  // written in full below
  {
    const T* ap = tape.value(a).data();
    const T* bp = tape.value(b).data();
    T* yp = y.data();
    B::parallel_for(n, [=] EP_HOST_DEVICE(index_t i) { yp[i] = ap[i] + bp[i]; });
  }
  auto backward = [&tape, a, b](Var self) {  // dA += dy, dB += dy
    const T* gy = tape.grad_data(self);
    for (Var v : {a, b}) {
      if (tape.requires_grad(v)) add_into(tape.grad_into(v), gy);
    }
  };
  auto jvp = [&tape, a, b, n](Var self) {  // ty = ta + tb; a null tangent is zero
    T* ty = tape.tangent_into(self).data;
    const T* ta = tape.tangent_data(a);
    const T* tb = tape.tangent_data(b);
    if (ta && tb)
      B::parallel_for(n, [=] EP_HOST_DEVICE(index_t i) { ty[i] = ta[i] + tb[i]; });
    else
      B::copy(ty, ta ? ta : tb, n);  // jvp runs only with a tangent present
  };
  return tape.record("add", std::move(y), {a, b}, backward, jvp);
}

// y = a * b elementwise (same shapes).
template <class T, class B>
Var mul(Tape<T, B>& tape, Var a, Var b) {
  detail::elementwise_same_shape(tape, a, b, "mul");
  const index_t n = tape.value(a).numel();
  auto y = Tensor<T, B>::uninitialized(tape.shape(a));  // written in full below
  {
    const T* ap = tape.value(a).data();
    const T* bp = tape.value(b).data();
    T* yp = y.data();
    B::parallel_for(n, [=] EP_HOST_DEVICE(index_t i) { yp[i] = ap[i] * bp[i]; });
  }
  auto backward = [&tape, a, b](Var self) {  // dA += dy * b, dB += dy * a
    const T* gy = tape.grad_data(self);
    const T* ap = tape.value(a).data();
    const T* bp = tape.value(b).data();
    if (tape.requires_grad(a)) detail::add_product_into(tape.grad_into(a), gy, bp);
    if (tape.requires_grad(b)) detail::add_product_into(tape.grad_into(b), gy, ap);
  };
  auto jvp = [&tape, a, b, n](Var self) {  // ty = ta * b + a * tb; a null tangent is zero
    T* ty = tape.tangent_into(self).data;  // assigned in full: jvp runs only with a tangent present
    const T* ap = tape.value(a).data();
    const T* bp = tape.value(b).data();
    const T* ta = tape.tangent_data(a);
    const T* tb = tape.tangent_data(b);
    B::parallel_for(n, [=] EP_HOST_DEVICE(index_t i) {
      T t(0);
      if (ta) t = ta[i] * bp[i];
      if (tb) t += ap[i] * tb[i];
      ty[i] = t;
    });
  };
  return tape.record("mul", std::move(y), {a, b}, backward, jvp);
}

// y = F(gate) * up elementwise (same shapes), F a functor of
// tensor/functors.hpp: the gated MLP of Llama / Qwen2 (SwiGLU, F = Silu) in
// one pass instead of an activation then a product, and without the
// activation's tensor. Both rules recompute f and f' from the inputs, which
// are tape values already, so nothing is saved. gated_activation(x, x) is
// fine: the two terms of its gradient go into the buffer one after the other.
template <class F, class T, class B>
Var gated_activation(Tape<T, B>& tape, Var gate, Var up) {
  detail::elementwise_same_shape(tape, gate, up, "gated_activation");
  const index_t n = tape.value(gate).numel();
  auto y = Tensor<T, B>::uninitialized(tape.shape(gate));  // written in full below
  gated_map<F, B>(n, tape.value(gate).data(), tape.value(up).data(), y.data());
  auto backward = [&tape, gate, up, n](Var self) {  // dG += dy * u * f'(g), dU += dy * f(g)
    const T* gy = tape.grad_data(self);
    const T* gp = tape.value(gate).data();
    const T* up_ = tape.value(up).data();
    if (gate.id == up.id) {  // one buffer: a term per call (the second one adds)
      if (!tape.requires_grad(gate)) return;
      const OutRef<T, B> first = tape.grad_into(gate);
      gated_vjp<F, B>(n, gp, up_, gy, first.data, first.fresh, static_cast<T*>(nullptr), false);
      const OutRef<T, B> second = tape.grad_into(up);
      gated_vjp<F, B>(n, gp, up_, gy, static_cast<T*>(nullptr), false, second.data, second.fresh);
      return;
    }
    const OutRef<T, B> gg = tape.requires_grad(gate) ? tape.grad_into(gate) : OutRef<T, B>{};
    const OutRef<T, B> gu = tape.requires_grad(up) ? tape.grad_into(up) : OutRef<T, B>{};
    gated_vjp<F, B>(n, gp, up_, gy, gg.data, gg.fresh, gu.data, gu.fresh);
  };
  auto jvp = [&tape, gate, up, n](Var self) {  // ty = f'(g) tg u + f(g) tu; a null tangent is zero
    gated_jvp<F, B>(n, tape.value(gate).data(), tape.value(up).data(), tape.tangent_data(gate), tape.tangent_data(up),
                    tape.tangent_into(self).data);  // assigns all of ty
  };
  return tape.record("gated_activation", std::move(y), {gate, up}, backward, jvp);
}

// y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), GPT-2's MLP activation.
template <class T, class B>
Var gelu_tanh(Tape<T, B>& tape, Var x) {
  return detail::unary_elementwise<GeluTanh>(tape, x, "gelu_tanh");
}

// y = x sigmoid(x), Llama/Qwen2's MLP activation.
template <class T, class B>
Var silu(Tape<T, B>& tape, Var x) {
  return detail::unary_elementwise<Silu>(tape, x, "silu");
}

// y = x Phi(x) (exact GELU: PyTorch's default, transformers' "gelu").
template <class T, class B>
Var gelu_erf(Tape<T, B>& tape, Var x) {
  return detail::unary_elementwise<GeluErf>(tape, x, "gelu_erf");
}

// y = max(x, 0).
template <class T, class B>
Var relu(Tape<T, B>& tape, Var x) {
  return detail::unary_elementwise<Relu>(tape, x, "relu");
}

}  // namespace entropy_probe
