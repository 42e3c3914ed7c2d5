// Linear and fused LoRA linear, forward / VJP / JVP side by side.
//
//   linear:       y = x W^T + b                       x [..., in], W [out, in], b [out]
//   lora_linear:  y = x W^T + b + scale * (x A^T) B^T  A [r, in], B [out, r]
//
// The lm_head is a linear without bias (tied: W is the token embedding).
// Frozen operands (constants) get no gradient work: a frozen W costs no dW.
#pragma once

#include "entropy_probe/tape/tape.hpp"
#include "entropy_probe/tensor/blas.hpp"

#include <optional>

namespace entropy_probe {

namespace detail {
template <class T, class B>
index_t rows_for_features(const Tape<T, B>& tape, Var x, index_t in, const char* op) {
  const Shape& s = tape.shape(x);
  if (s.empty() || s.back() != in)
    fail<UsageError>("{}: input shape {} does not end in {} features", op, shape_str(s), in);
  return tape.value(x).numel() / in;
}
template <class T, class B>
void check_shape(const Tape<T, B>& tape, Var v, const Shape& expected, const char* op, const char* what) {
  if (tape.shape(v) != expected)
    fail<UsageError>("{}: {} has shape {}, expected {}", op, what, shape_str(tape.shape(v)), shape_str(expected));
}
template <class T, class B>
Shape with_last_dim(const Tape<T, B>& tape, Var x, index_t last) {
  Shape s = tape.shape(x);
  s.back() = last;
  return s;
}
}  // namespace detail

// y = x W^T + b (bias optional: pass std::nullopt).
template <class T, class B>
Var linear(Tape<T, B>& tape, Var x, Var w, std::optional<Var> bias = std::nullopt) {
  using blas::mm_nn;
  using blas::mm_nt;
  using blas::mm_tn;
  const index_t out = tape.shape(w).at(0);
  const index_t in = tape.shape(w).size() == 2 ? tape.shape(w)[1] : -1;
  if (in < 0) fail<UsageError>("linear: weight shape {} is not [out, in]", shape_str(tape.shape(w)));
  const index_t n = detail::rows_for_features(tape, x, in, "linear");
  if (bias) detail::check_shape(tape, *bias, {out}, "linear", "bias");

  // forward
  auto y = Tensor<T, B>::uninitialized(detail::with_last_dim(tape, x, out));  // beta = 0 writes all of it
  mm_nt<B>(n, out, in, T(1), tape.value(x).data(), tape.value(w).data(), T(0), y.data());
  if (bias) blas::add_row_vector<B>(n, out, tape.value(*bias).data(), y.data());

  auto backward = [&tape, x, w, bias, n, in, out](Var self) {
    const T* gy = tape.grad_data(self);
    if (tape.requires_grad(x)) {  // dx += dy W
      const OutRef<T, B> gx = tape.grad_into(x);
      mm_nn<B>(n, in, out, T(1), gy, tape.value(w).data(), gx.beta(), gx.data);
    }
    if (tape.requires_grad(w)) {  // dW += dy^T x
      const OutRef<T, B> gw = tape.grad_into(w);
      mm_tn<B>(out, in, n, T(1), gy, tape.value(x).data(), gw.beta(), gw.data);
    }
    if (bias && tape.requires_grad(*bias)) blas::add_column_sums<B>(n, out, T(1), gy, tape.grad_into(*bias).zeroed());
  };
  auto jvp = [&tape, x, w, bias, n, in, out](Var self) {
    SumOut<T, B> ty(tape.tangent_into(self));
    if (const T* tx = tape.tangent_data(x))  // tx W^T
      mm_nt<B>(n, out, in, T(1), tx, tape.value(w).data(), ty.beta(), ty.data());
    if (const T* tw = tape.tangent_data(w))  // x tW^T
      mm_nt<B>(n, out, in, T(1), tape.value(x).data(), tw, ty.beta(), ty.data());
    if (bias)
      if (const T* tb = tape.tangent_data(*bias)) blas::add_row_vector<B>(n, out, tb, ty.zeroed());
    ty.zeroed();  // no term: a zero tangent
  };
  if (bias) return tape.record("linear", std::move(y), {x, w, *bias}, backward, jvp);
  return tape.record("linear", std::move(y), {x, w}, backward, jvp);
}

// y = x W^T + b + scale * (x A^T) B^T, one node: the rank-r intermediate
// u = x A^T is kept for the backward pass instead of a separate tape value.
template <class T, class B>
Var lora_linear(Tape<T, B>& tape, Var x, Var w, std::optional<Var> bias, Var lora_a, Var lora_b, T scale) {
  using blas::mm_nn;
  using blas::mm_nt;
  using blas::mm_tn;
  const Shape& ws = tape.shape(w);
  if (ws.size() != 2) fail<UsageError>("lora_linear: weight shape {} is not [out, in]", shape_str(ws));
  const index_t out = ws[0], in = ws[1];
  const Shape& as = tape.shape(lora_a);
  if (as.size() != 2 || as[1] != in || as[0] < 1)
    fail<UsageError>("lora_linear: lora_A has shape {}, expected [r, {}]", shape_str(as), in);
  const index_t r = as[0];
  detail::check_shape(tape, lora_b, {out, r}, "lora_linear", "lora_B");
  if (bias) detail::check_shape(tape, *bias, {out}, "lora_linear", "bias");
  const index_t n = detail::rows_for_features(tape, x, in, "lora_linear");

  // forward
  const T* xp = tape.value(x).data();
  auto u_fwd = Tensor<T, B>::uninitialized({n, r});  // products with beta = 0 write all of u and y
  mm_nt<B>(n, r, in, T(1), xp, tape.value(lora_a).data(), T(0), u_fwd.data());
  auto y = Tensor<T, B>::uninitialized(detail::with_last_dim(tape, x, out));
  mm_nt<B>(n, out, in, T(1), xp, tape.value(w).data(), T(0), y.data());
  mm_nt<B>(n, out, r, scale, u_fwd.data(), tape.value(lora_b).data(), T(1), y.data());
  const auto u = save_for_rules(std::move(u_fwd));  // the rules share it
  if (bias) blas::add_row_vector<B>(n, out, tape.value(*bias).data(), y.data());

  auto backward = [&tape, x, w, bias, lora_a, lora_b, scale, n, in, out, r, u](Var self) {
    const T* gy = tape.grad_data(self);
    const T* xv = tape.value(x).data();
    const bool need_gu = tape.requires_grad(x) || tape.requires_grad(lora_a);
    Tensor<T, B> gu;
    if (need_gu) {  // gu = scale * dy B
      gu = Tensor<T, B>::uninitialized({n, r});
      mm_nn<B>(n, r, out, scale, gy, tape.value(lora_b).data(), T(0), gu.data());
    }
    if (tape.requires_grad(x)) {  // dx += dy W + gu A
      const OutRef<T, B> gx = tape.grad_into(x);
      mm_nn<B>(n, in, out, T(1), gy, tape.value(w).data(), gx.beta(), gx.data);
      mm_nn<B>(n, in, r, T(1), gu.data(), tape.value(lora_a).data(), T(1), gx.data);
    }
    if (tape.requires_grad(lora_a)) {  // dA += gu^T x
      const OutRef<T, B> ga = tape.grad_into(lora_a);
      mm_tn<B>(r, in, n, T(1), gu.data(), xv, ga.beta(), ga.data);
    }
    if (tape.requires_grad(lora_b)) {  // dB += scale * dy^T u
      const OutRef<T, B> gb = tape.grad_into(lora_b);
      mm_tn<B>(out, r, n, scale, gy, u->data(), gb.beta(), gb.data);
    }
    if (tape.requires_grad(w)) {
      const OutRef<T, B> gw = tape.grad_into(w);
      mm_tn<B>(out, in, n, T(1), gy, xv, gw.beta(), gw.data);
    }
    if (bias && tape.requires_grad(*bias)) blas::add_column_sums<B>(n, out, T(1), gy, tape.grad_into(*bias).zeroed());
  };
  auto jvp = [&tape, x, w, bias, lora_a, lora_b, scale, n, in, out, r, u](Var self) {
    SumOut<T, B> ty(tape.tangent_into(self));
    const T* xv = tape.value(x).data();
    const T* tx = tape.tangent_data(x);
    const T* ta = tape.tangent_data(lora_a);
    if (tx) mm_nt<B>(n, out, in, T(1), tx, tape.value(w).data(), ty.beta(), ty.data());
    if (const T* tw = tape.tangent_data(w)) mm_nt<B>(n, out, in, T(1), xv, tw, ty.beta(), ty.data());
    if (bias)
      if (const T* tb = tape.tangent_data(*bias)) blas::add_row_vector<B>(n, out, tb, ty.zeroed());
    if (tx || ta) {                                   // tu = tx A^T + x tA^T;  ty += scale * tu B^T
      auto tu = Tensor<T, B>::uninitialized({n, r});  // the first product has beta = 0
      if (tx) mm_nt<B>(n, r, in, T(1), tx, tape.value(lora_a).data(), T(0), tu.data());
      if (ta) mm_nt<B>(n, r, in, T(1), xv, ta, tx ? T(1) : T(0), tu.data());
      mm_nt<B>(n, out, r, scale, tu.data(), tape.value(lora_b).data(), ty.beta(), ty.data());
    }
    if (const T* tb = tape.tangent_data(lora_b))  // ty += scale * u tB^T
      mm_nt<B>(n, out, r, scale, u->data(), tb, ty.beta(), ty.data());
    ty.zeroed();  // no term: a zero tangent
  };
  if (bias) return tape.record("lora_linear", std::move(y), {x, w, *bias, lora_a, lora_b}, backward, jvp);
  return tape.record("lora_linear", std::move(y), {x, w, lora_a, lora_b}, backward, jvp);
}

}  // namespace entropy_probe
