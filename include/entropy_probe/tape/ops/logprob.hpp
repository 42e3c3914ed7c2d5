// Token log-probabilities and their per-sequence sums, forward / VJP / JVP
// side by side.
//
//   log_softmax_gather:  out[i] = log_softmax(z[i, :] / tau)[target[i]]    z [..., V] -> [N]
//   masked_seq_sum:      out[r] = sum_t w[r, t] x[r, t]                    x [R, T]   -> [R]
//
// Together they give the probe's sequence log-probability (docs/math.md,
// Notation), with the causal shift done by the caller when building targets and
// weights: the logits at position t-1 score the token at position t. For
// logits z [R, T, V] of R = B*G responses with tokens seq[r, t]:
//
//   for t in 0 .. T-2:  targets[r*T + t] = gen(r, t+1) ? seq[r, t+1] : -1
//                       weights[r*T + t] = gen(r, t+1) ? 1 : 0
//   targets[r*T + T-1] = -1, weights[r*T + T-1] = 0   (the last logits score nothing)
//   Var lp = log_softmax_gather(tape, z, targets, tau);   // [R*T]
//   Var S  = masked_seq_sum(tape, lp, weights, R);        // [R], S[r] = S[b, g]
//
// where gen(r, t) = p[b] <= t and m[r, t] = 1. A target of -1 skips the row
// entirely (no softmax over V), so unscored prompt and padding positions cost
// nothing; the weights then only repeat that selection.
#pragma once

#include "entropy_probe/tape/tape.hpp"
#include "entropy_probe/tensor/compositions.hpp"

#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <span>
#include <vector>

namespace entropy_probe {

namespace detail {
// Saved by log_softmax_gather for the m scored rows (target >= 0) only: their
// row index, target and logsumexp of z / tau (double), on the backend. p is
// recomputed from these and the logits, so nothing of size [N, V] is kept.
template <class B>
struct LogSoftmaxGatherSaved {
  Tensor<std::int32_t, B> rows;     // [m] row of each scored row
  Tensor<std::int32_t, B> targets;  // [m] its target
  Tensor<acc_t, B> lse;             // [m]
};

// The entropy of each scored row's tempered distribution p = softmax(z s),
//   H_k = -sum_j p_kj log p_kj = lse_k - s sum_j p_kj z_kj,
// from the row's logsumexp and softmax_dot with t = z (no [m, V] buffer):
// out[at[k]] = H_k, a value only (the probe's Rao-Blackwellised entropy,
// docs/math.md (k), is never differentiated). `mean` holds m doubles.
template <class T, class B>
void softmax_entropy(index_t m, index_t V, const T* z, const std::int32_t* rows, const acc_t* lse, acc_t s,
                     const std::int32_t* at, acc_t* mean, acc_t* out) {
  softmax_dot<B>(m, V, z, rows, lse, s, z, mean);
  B::parallel_for(m, [=] EP_HOST_DEVICE(index_t k) { out[at[k]] = lse[k] - s * mean[k]; });
}
}  // namespace detail

// out[i] = log_softmax(logits[i, :] / temperature)[targets[i]]; targets[i] < 0
// means "not scored": out[i] = 0 with no gradient or tangent. With `entropy`,
// also (*entropy)[i] = the entropy of row i's distribution softmax(logits[i, :]
// / temperature) for scored rows, 0 for the others: a value, not on the tape.
//
// Every pass runs over the scored rows only, through the softmax compositions
// (softmax_lse / softmax_vjp / softmax_dot of tensor/compositions.hpp): SIMD
// exp per row on the host, one thread per element on a device.
template <class T, class B>
Var log_softmax_gather(Tape<T, B>& tape, Var logits, std::span<const std::int32_t> targets, double temperature = 1.0,
                       Tensor<acc_t, B>* entropy = nullptr) {
  const Shape& zs = tape.shape(logits);
  if (zs.empty() || zs.back() < 1)
    fail<UsageError>("log_softmax_gather: logits have shape {}, expected [..., V] with V >= 1", shape_str(zs));
  if (!(temperature > 0) || !std::isfinite(temperature))
    fail<UsageError>("log_softmax_gather: temperature must be positive and finite, got {}", temperature);
  const index_t vocab = zs.back();
  const index_t n = tape.value(logits).numel() / vocab;
  if (static_cast<index_t>(targets.size()) != n)
    fail<UsageError>("log_softmax_gather: {} targets for {} rows of logits {}", targets.size(), n, shape_str(zs));
  if (n > std::numeric_limits<std::int32_t>::max())
    fail<UsageError>("log_softmax_gather: {} rows of logits exceed the int32 row index", n);
  std::vector<std::int32_t> rows, row_targets;
  for (std::size_t i = 0; i < targets.size(); ++i) {
    if (targets[i] >= vocab)
      fail<UsageError>("log_softmax_gather: target[{}] = {} is out of range for vocabulary size {}", i, targets[i],
                       vocab);
    if (targets[i] < 0) continue;
    rows.push_back(static_cast<std::int32_t>(i));
    row_targets.push_back(targets[i]);
  }
  const index_t m = static_cast<index_t>(rows.size());
  const acc_t inv_tau = 1.0 / temperature;

  // ---- forward: logsumexp per scored row, in double ----
  detail::LogSoftmaxGatherSaved<B> state{Tensor<std::int32_t, B>::from_host({m}, rows),
                                         Tensor<std::int32_t, B>::from_host({m}, row_targets),
                                         Tensor<acc_t, B>::uninitialized({m})};
  Tensor<T, B> out({n});
  {
    const T* z = tape.value(logits).data();
    const std::int32_t* rw = state.rows.data();
    const std::int32_t* tg = state.targets.data();
    acc_t* lse = state.lse.data();
    T* o = out.data();
    softmax_lse<B>(m, vocab, z, rw, inv_tau, lse);
    B::parallel_for(m, [=] EP_HOST_DEVICE(index_t k) {
      o[rw[k]] = static_cast<T>(static_cast<acc_t>(z[rw[k] * vocab + tg[k]]) * inv_tau - lse[k]);
    });
    if (entropy) {
      *entropy = Tensor<acc_t, B>({n});
      auto mean = Tensor<acc_t, B>::uninitialized({m});
      detail::softmax_entropy<T, B>(m, vocab, z, rw, lse, inv_tau, rw, mean.data(), entropy->data());
    }
  }
  const auto saved = save_for_rules(std::move(state));

  // dz[i, :] += (g_i / tau) (onehot(target_i) - p_i)
  auto backward = [&tape, logits, saved, m, vocab, inv_tau](Var self) {
    if (!tape.requires_grad(logits)) return;
    softmax_vjp<B>(m, vocab, tape.value(logits).data(), saved->rows.data(), saved->targets.data(), saved->lse.data(),
                   tape.grad_data(self), inv_tau, tape.grad_into(logits).zeroed());  // adds, on scored rows only
  };
  // tout_i = (tz[i, target_i] - sum_j p_ij tz[i, j]) / tau
  auto jvp = [&tape, logits, saved, m, vocab, inv_tau](Var self) {
    const T* tz = tape.tangent_data(logits);
    if (!tz) return;
    T* to = tape.tangent_into(self).zeroed();  // unscored rows stay 0
    const std::int32_t* rw = saved->rows.data();
    const std::int32_t* tg = saved->targets.data();
    auto mean = Tensor<acc_t, B>::uninitialized({m});
    acc_t* mp = mean.data();
    softmax_dot<B>(m, vocab, tape.value(logits).data(), rw, saved->lse.data(), inv_tau, tz, mp);
    B::parallel_for(m, [=] EP_HOST_DEVICE(index_t k) {
      to[rw[k]] = static_cast<T>((static_cast<acc_t>(tz[rw[k] * vocab + tg[k]]) - mp[k]) * inv_tau);
    });
  };
  return tape.record("log_softmax_gather", std::move(out), {logits}, backward, jvp);
}

// out[r] = sum_t weights[r*T + t] * x[r, t], x [rows, T] or [rows*T]; sums in
// double. The weights are 0/1 masks in the probe, but any real weight works.
template <class T, class B>
Var masked_seq_sum(Tape<T, B>& tape, Var x, std::span<const double> weights, index_t rows) {
  const Shape& xs = tape.shape(x);
  const index_t numel = tape.value(x).numel();
  if (rows < 1) fail<UsageError>("masked_seq_sum: rows must be positive, got {}", rows);
  if (xs.size() > 2 || xs.empty() || numel % rows != 0 || (xs.size() == 2 && xs[0] != rows))
    fail<UsageError>("masked_seq_sum: x has shape {}, expected [{}, T] or [{}*T]", shape_str(xs), rows, rows);
  if (static_cast<index_t>(weights.size()) != numel)
    fail<UsageError>("masked_seq_sum: {} weights for x of shape {} ({} entries)", weights.size(), shape_str(xs), numel);
  const index_t len = numel / rows;

  // forward
  const auto w_saved = save_for_rules(Tensor<acc_t, B>::from_host({numel}, weights));  // the rules share it
  Tensor<T, B> out({rows});
  {
    const T* xv = tape.value(x).data();
    const acc_t* w = w_saved->data();
    T* o = out.data();
    B::parallel_for(rows, [=] EP_HOST_DEVICE(index_t r) {
      acc_t s = 0;
      for (index_t t = 0; t < len; ++t) s += w[r * len + t] * static_cast<acc_t>(xv[r * len + t]);
      o[r] = static_cast<T>(s);
    });
  }

  // dx[r, t] += w[r, t] g[r]
  auto backward = [&tape, x, w_saved, numel, len](Var self) {
    if (!tape.requires_grad(x)) return;
    const T* g = tape.grad_data(self);
    const acc_t* w = w_saved->data();
    const OutRef<T, B> gx = tape.grad_into(x);  // each element written once: assigns when fresh
    B::parallel_for(
        numel, [=] EP_HOST_DEVICE(index_t i) { gx.add(i, static_cast<T>(w[i] * static_cast<acc_t>(g[i / len]))); });
  };
  // tout[r] = sum_t w[r, t] tx[r, t]
  auto jvp = [&tape, x, w_saved, rows, len](Var self) {
    const T* tx = tape.tangent_data(x);
    if (!tx) return;
    T* to = tape.tangent_into(self).data;  // every row assigned
    const acc_t* w = w_saved->data();
    B::parallel_for(rows, [=] EP_HOST_DEVICE(index_t r) {
      acc_t s = 0;
      for (index_t t = 0; t < len; ++t) s += w[r * len + t] * static_cast<acc_t>(tx[r * len + t]);
      to[r] = static_cast<T>(s);
    });
  };
  return tape.record("masked_seq_sum", std::move(out), {x}, backward, jvp);
}

}  // namespace entropy_probe
