// The lm_head and the token log-probability fused, over row chunks:
//
//   lm_head_logprob:  out[i] = log_softmax(h[i, :] W^T / tau)[target[i]]    h [..., d], W [V, d] -> [m]
//
// the same value as log_softmax_gather(linear(h, W), targets, tau)
// (tape/ops/logprob.hpp), without ever holding the [m, V] logits, their
// gradient or their tangent: every pass walks the rows in chunks of
// `chunk_rows`, so the vocabulary costs at most one [chunk_rows, V] buffer
// (two for a trained W) at a time.
//
// out[i] depends on h only through row i, so its derivative in h is one row
// per scored position, the Jacobian
//
//   J[i, :] = (onehot(target_i) - p_i) W / tau                              [m, d]
//
// which the forward computes from each chunk's logits while it has them
// (when h needs a gradient or carries a tangent), so neither rule recomputes
// the [chunk, V] logits for h:
//
//   VJP:  dh[i] = g_i J[i];  dW += dZ^T h_c,  dZ = g (onehot(target) - p) / tau  (recomputed, a trained W only)
//   JVP:  t_out[i] = th[i] . J[i] + (tZ[target] - sum_v p_v tZ_v) / tau,  tZ = h tW^T  (the second term: a W tangent)
//
// The row passes are the softmax compositions that log_softmax_gather uses
// (softmax_lse / softmax_vjp / softmax_dot of tensor/compositions.hpp), on the
// chunk's logits.
#pragma once

#include "entropy_probe/tape/ops/logprob.hpp"
#include "entropy_probe/tape/tape.hpp"
#include "entropy_probe/tensor/blas.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <optional>
#include <span>
#include <vector>

namespace entropy_probe {

// Default size of one [chunk_rows, V] logits buffer: large enough that each
// chunk's products run near the BLAS's rate (a chunk streams all of W: at
// 110 rows a single-threaded sgemm of Qwen2's head reached 110 GFLOP/s, at
// 441 rows 152, docs/performance.md), small next to the model (a Qwen2-sized
// vocabulary of 151936 in float gives 441 rows a chunk).
inline constexpr std::size_t kLmHeadChunkBytes = std::size_t{256} << 20;

// Rows of a chunk: `requested` when positive, else as many as fit in
// kLmHeadChunkBytes (at least one).
inline index_t lm_head_chunk_rows(index_t vocab, std::size_t element_bytes, index_t requested = 0) {
  if (requested > 0) return requested;
  const auto row_bytes = static_cast<std::size_t>(std::max<index_t>(vocab, 1)) * element_bytes;
  return std::max<index_t>(1, static_cast<index_t>(kLmHeadChunkBytes / row_bytes));
}

namespace detail {
// Saved by lm_head_logprob for the scored rows (target >= 0), in row order,
// on the backend. Chunk c holds rows [c * chunk, (c+1) * chunk) and the
// scored rows [first[c], first[c+1]) of these arrays.
template <class T, class B>
struct LmHeadLogprobSaved {
  Tensor<std::int32_t, B> rows;     // [s] row of h of each scored row
  Tensor<std::int32_t, B> local;    // [s] its row within its chunk
  Tensor<std::int32_t, B> targets;  // [s] its target
  Tensor<acc_t, B> lse;             // [s] logsumexp of its logits / tau
  Tensor<T, B> jac;                 // [m, d] J of the top of this file (unscored rows 0), when jac_kept
  bool jac_kept = false;
  std::vector<index_t> first;  // [chunks + 1], on the host
  index_t m = 0, chunk = 1;

  struct Chunk {
    index_t row0, rows;  // rows [row0, row0 + rows) of h
    index_t k0, ks;      // scored rows [k0, k0 + ks) of the arrays above
  };
  index_t chunks() const { return static_cast<index_t>(first.size()) - 1; }
  Chunk at(index_t c) const {
    const auto i = static_cast<std::size_t>(c);
    return {c * chunk, std::min(chunk, m - c * chunk), first[i], first[i + 1] - first[i]};
  }
};
}  // namespace detail

// out[i] = log_softmax(h[i, :] W^T / temperature)[targets[i]]; targets[i] < 0
// means "not scored": out[i] = 0 with no gradient or tangent (its rows of a
// chunk still go through the chunk's product, so callers pass scored rows
// only where they can). chunk_rows <= 0 picks lm_head_chunk_rows' default.
// With `entropy`, also (*entropy)[i] = the entropy of row i's distribution,
// 0 for unscored rows, from each chunk's logits (log_softmax_gather's
// `entropy`): a value, not on the tape.
template <class T, class B>
Var lm_head_logprob(Tape<T, B>& tape, Var h, Var w, std::span<const std::int32_t> targets, double temperature = 1.0,
                    index_t chunk_rows = 0, Tensor<acc_t, B>* entropy = nullptr) {
  using blas::mm_nn;
  using blas::mm_nt;
  using blas::mm_tn;
  const Shape& ws = tape.shape(w);
  if (ws.size() != 2 || ws[0] < 1 || ws[1] < 1)
    fail<UsageError>("lm_head_logprob: weight has shape {}, expected [V, d] with V, d >= 1", shape_str(ws));
  const index_t vocab = ws[0], d = ws[1];
  const Shape& hs = tape.shape(h);
  if (hs.empty() || hs.back() != d)
    fail<UsageError>("lm_head_logprob: hidden states have shape {}, expected [..., {}] to match weight {}",
                     shape_str(hs), d, shape_str(ws));
  if (h.id == w.id) fail<UsageError>("lm_head_logprob: the hidden states and the weight are the same value");
  if (!(temperature > 0) || !std::isfinite(temperature))
    fail<UsageError>("lm_head_logprob: temperature must be positive and finite, got {}", temperature);
  const index_t m = tape.value(h).numel() / d;
  if (static_cast<index_t>(targets.size()) != m)
    fail<UsageError>("lm_head_logprob: {} targets for {} rows of hidden states {}", targets.size(), m, shape_str(hs));
  if (m > std::numeric_limits<std::int32_t>::max())
    fail<UsageError>("lm_head_logprob: {} rows exceed the int32 row index", m);
  const index_t chunk = std::min(lm_head_chunk_rows(vocab, sizeof(T), chunk_rows), std::max<index_t>(m, 1));

  detail::LmHeadLogprobSaved<T, B> state;
  state.m = m;
  state.chunk = chunk;
  std::vector<std::int32_t> unscored;  // rows whose J stays 0
  {
    std::vector<std::int32_t> rows, local, row_targets;
    state.first.assign(1, 0);
    for (index_t c = 0; c * chunk < m; ++c) {
      for (index_t i = c * chunk; i < std::min(m, (c + 1) * chunk); ++i) {
        const std::int32_t tg = targets[static_cast<std::size_t>(i)];
        if (tg >= vocab)
          fail<UsageError>("lm_head_logprob: target[{}] = {} is out of range for vocabulary size {}", i, tg, vocab);
        if (tg < 0) {
          unscored.push_back(static_cast<std::int32_t>(i));
          continue;
        }
        rows.push_back(static_cast<std::int32_t>(i));
        local.push_back(static_cast<std::int32_t>(i - c * chunk));
        row_targets.push_back(tg);
      }
      state.first.push_back(static_cast<index_t>(rows.size()));
    }
    const auto s = static_cast<index_t>(rows.size());
    state.rows = Tensor<std::int32_t, B>::from_host({s}, rows);
    state.local = Tensor<std::int32_t, B>::from_host({s}, local);
    state.targets = Tensor<std::int32_t, B>::from_host({s}, row_targets);
    state.lse = Tensor<acc_t, B>::uninitialized({s});
  }
  const acc_t inv_tau = 1.0 / temperature;
  // J when a rule will need it: a recording tape's backward or jvp (h needs a
  // gradient), or a forward-tangent tape's jvp, which runs as this returns.
  const bool want_jac = tape.forward_tangent_mode() ? tape.tangent_data(h) != nullptr : tape.requires_grad(h);

  // ---- forward: the chunk's logits, then logsumexp, the target's entry and
  // (want_jac) J's rows from the same logits, overwritten in place by
  // (onehot - p) / tau ----
  Tensor<T, B> out({m});  // unscored rows stay 0
  {
    const T* hp = tape.value(h).data();
    const T* wp = tape.value(w).data();
    auto z = Tensor<T, B>::uninitialized({chunk, vocab});  // each chunk's product assigns its rows
    T* zp = z.data();
    T* o = out.data();
    std::optional<Tensor<acc_t, B>> mean;
    if (entropy) {
      *entropy = Tensor<acc_t, B>({m});
      mean = Tensor<acc_t, B>::uninitialized({chunk});
    }
    std::optional<Tensor<T, B>> ones;  // softmax_vjp's cotangent: J is dZ W for g = 1
    if (want_jac) {
      state.jac = Tensor<T, B>::uninitialized({m, d});
      state.jac_kept = true;
      ones = Tensor<T, B>::uninitialized({chunk});
      B::fill(ones->data(), chunk, T(1));
    }
    for (index_t c = 0; c < state.chunks(); ++c) {
      const auto ch = state.at(c);
      if (ch.ks == 0) continue;  // J's rows are zeroed below with the other unscored rows
      mm_nt<B>(ch.rows, vocab, d, T(1), hp + ch.row0 * d, wp, T(0), zp);
      const std::int32_t* rw = state.rows.data() + ch.k0;
      const std::int32_t* lc = state.local.data() + ch.k0;
      const std::int32_t* tg = state.targets.data() + ch.k0;
      acc_t* lse = state.lse.data() + ch.k0;
      softmax_lse<B>(ch.ks, vocab, zp, lc, inv_tau, lse);
      B::parallel_for(ch.ks, [=] EP_HOST_DEVICE(index_t k) {
        o[rw[k]] = static_cast<T>(static_cast<acc_t>(zp[lc[k] * vocab + tg[k]]) * inv_tau - lse[k]);
      });
      if (entropy) detail::softmax_entropy<T, B>(ch.ks, vocab, zp, lc, lse, inv_tau, rw, mean->data(), entropy->data());
      if (want_jac) {
        softmax_vjp<B>(ch.ks, vocab, zp, lc, tg, lse, ones->data(), inv_tau, zp, /*assign=*/true);
        mm_nn<B>(ch.rows, d, vocab, T(1), zp, wp, T(0), state.jac.data() + ch.row0 * d);
      }
    }
    if (want_jac && !unscored.empty()) {  // their chunk rows held logits, not (onehot - p) / tau
      const auto un = Tensor<std::int32_t, B>::from_host({static_cast<index_t>(unscored.size())}, unscored);
      const std::int32_t* up = un.data();
      T* jp = state.jac.data();
      B::parallel_for_2d(un.numel(), d, [=] EP_HOST_DEVICE(index_t k, index_t j) { jp[up[k] * d + j] = T(0); });
    }
  }
  const auto saved = save_for_rules(std::move(state));

  auto backward = [&tape, h, w, saved, vocab, d, chunk, inv_tau](Var self) {
    const bool need_h = tape.requires_grad(h), need_w = tape.requires_grad(w);
    if (!need_h && !need_w) return;
    const T* g = tape.grad_data(self);
    const T* hp = tape.value(h).data();
    const T* wp = tape.value(w).data();
    if (need_h) {  // dh[i] = g_i J[i]
      if (!saved->jac_kept) fail<Error>("lm_head_logprob: internal: h needs a gradient but J was not kept");
      const OutRef<T, B> gh = tape.grad_into(h);
      const T* jp = saved->jac.data();
      T* dh = gh.data;
      const bool fresh = gh.fresh;
      B::parallel_for_2d(saved->m, d, [=] EP_HOST_DEVICE(index_t i, index_t j) {
        const T v = g[i] * jp[i * d + j];
        dh[i * d + j] = fresh ? v : dh[i * d + j] + v;
      });
    }
    if (!need_w) return;
    // dW sums over chunks, so only its first term assigns.
    SumOut<T, B> gw(tape.grad_into(w));
    auto z = Tensor<T, B>::uninitialized({chunk, vocab});
    auto dz = Tensor<T, B>::uninitialized({chunk, vocab});
    for (index_t c = 0; c < saved->chunks(); ++c) {
      const auto ch = saved->at(c);
      if (ch.ks == 0) continue;  // no dW term
      mm_nt<B>(ch.rows, vocab, d, T(1), hp + ch.row0 * d, wp, T(0), z.data());
      B::fill(dz.data(), ch.rows * vocab, T(0));  // softmax_vjp adds; unscored rows stay 0
      softmax_vjp<B>(ch.ks, vocab, z.data(), saved->local.data() + ch.k0, saved->targets.data() + ch.k0,
                     saved->lse.data() + ch.k0, g + ch.row0, inv_tau, dz.data());
      mm_tn<B>(vocab, d, ch.rows, T(1), dz.data(), hp + ch.row0 * d, gw.beta(), gw.data());
    }
    gw.zeroed();  // no scored row: a zero gradient
  };

  auto jvp = [&tape, h, w, saved, vocab, d, chunk, inv_tau](Var self) {
    const T* th = tape.tangent_data(h);
    const T* tw = tape.tangent_data(w);
    if (!th && !tw) return;
    T* to = tape.tangent_into(self).zeroed();  // unscored rows stay 0
    const index_t s = saved->rows.numel();
    auto dot = Tensor<acc_t, B>({s});  // th[i] . J[i] per scored row (0 without th)
    const acc_t* dp = dot.data();
    if (th) {
      if (!saved->jac_kept) fail<Error>("lm_head_logprob: internal: h carries a tangent but J was not kept");
      const std::int32_t* rw = saved->rows.data();
      const T* jp = saved->jac.data();
      B::row_sum(
          s, d,
          [=] EP_HOST_DEVICE(index_t k, index_t j) {
            return static_cast<acc_t>(th[rw[k] * d + j]) * static_cast<acc_t>(jp[rw[k] * d + j]);
          },
          dot.data());
    }
    if (!tw) {
      const std::int32_t* rw = saved->rows.data();
      B::parallel_for(s, [=] EP_HOST_DEVICE(index_t k) { to[rw[k]] = static_cast<T>(dp[k]); });
      return;
    }
    // tZ = h tW^T per chunk, from the chunk's logits recomputed for p.
    const T* hp = tape.value(h).data();
    const T* wp = tape.value(w).data();
    auto z = Tensor<T, B>::uninitialized({chunk, vocab});
    auto tz = Tensor<T, B>::uninitialized({chunk, vocab});
    auto mean = Tensor<acc_t, B>::uninitialized({chunk});
    T* zp = z.data();
    T* tzp = tz.data();
    acc_t* mp = mean.data();
    for (index_t c = 0; c < saved->chunks(); ++c) {
      const auto ch = saved->at(c);
      if (ch.ks == 0) continue;
      mm_nt<B>(ch.rows, vocab, d, T(1), hp + ch.row0 * d, wp, T(0), zp);
      mm_nt<B>(ch.rows, vocab, d, T(1), hp + ch.row0 * d, tw, T(0), tzp);
      const std::int32_t* rw = saved->rows.data() + ch.k0;
      const std::int32_t* lc = saved->local.data() + ch.k0;
      const std::int32_t* tg = saved->targets.data() + ch.k0;
      const acc_t* dc = dp + ch.k0;
      softmax_dot<B>(ch.ks, vocab, zp, lc, saved->lse.data() + ch.k0, inv_tau, tzp, mp);
      B::parallel_for(ch.ks, [=] EP_HOST_DEVICE(index_t k) {
        to[rw[k]] = static_cast<T>(dc[k] + (static_cast<acc_t>(tzp[lc[k] * vocab + tg[k]]) - mp[k]) * inv_tau);
      });
    }
  };
  return tape.record("lm_head_logprob", std::move(out), {h, w}, backward, jvp);
}

}  // namespace entropy_probe
