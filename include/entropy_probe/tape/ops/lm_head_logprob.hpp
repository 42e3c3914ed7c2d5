// The lm_head and the token log-probability fused, over row chunks:
//
//   lm_head_logprob:  out[i] = log_softmax(h[i, :] W^T / tau)[target[i]]    h [..., d], W [V, d] -> [m]
//
// the same value as log_softmax_gather(linear(h, W), targets, tau)
// (tape/ops/logprob.hpp), without ever holding the [m, V] logits, their
// gradient or their tangent: every pass walks the rows in chunks of
// `chunk_rows` and recomputes the chunk's logits Z = h_c W^T, so the
// vocabulary costs at most two [chunk_rows, V] buffers at a time. The forward
// saves only the per-row logsumexp (and borrows h and W from the tape).
//
//   VJP:  dZ = g (onehot(target) - p) / tau;  dh_c = dZ W,  dW += dZ^T h_c
//   JVP:  tZ = th W^T + h tW^T;               t_out = (tZ[target] - sum_v p_v tZ_v) / tau
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
// chunk's products stay efficient, small next to the model (a Qwen2-sized
// vocabulary of 151936 in float gives 110 rows a chunk).
inline constexpr std::size_t kLmHeadChunkBytes = std::size_t{64} << 20;

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
template <class B>
struct LmHeadLogprobSaved {
  Tensor<std::int32_t, B> rows;     // [s] row of h of each scored row
  Tensor<std::int32_t, B> local;    // [s] its row within its chunk
  Tensor<std::int32_t, B> targets;  // [s] its target
  Tensor<acc_t, B> lse;             // [s] logsumexp of its logits / tau
  std::vector<index_t> first;       // [chunks + 1], on the host
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

  detail::LmHeadLogprobSaved<B> state;
  state.m = m;
  state.chunk = chunk;
  {
    std::vector<std::int32_t> rows, local, row_targets;
    state.first.assign(1, 0);
    for (index_t c = 0; c * chunk < m; ++c) {
      for (index_t i = c * chunk; i < std::min(m, (c + 1) * chunk); ++i) {
        const std::int32_t tg = targets[static_cast<std::size_t>(i)];
        if (tg >= vocab)
          fail<UsageError>("lm_head_logprob: target[{}] = {} is out of range for vocabulary size {}", i, tg, vocab);
        if (tg < 0) continue;
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

  // ---- forward: the chunk's logits, then logsumexp and the target's entry ----
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
    for (index_t c = 0; c < state.chunks(); ++c) {
      const auto ch = state.at(c);
      if (ch.ks == 0) continue;
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
    }
  }
  const auto saved = save_for_rules(std::move(state));

  auto backward = [&tape, h, w, saved, vocab, d, chunk, inv_tau](Var self) {
    const bool need_h = tape.requires_grad(h), need_w = tape.requires_grad(w);
    if (!need_h && !need_w) return;
    const T* g = tape.grad_data(self);
    const T* hp = tape.value(h).data();
    const T* wp = tape.value(w).data();
    // Chunks write disjoint rows of dh (each assigns when dh is fresh); dW
    // sums over chunks, so only its first term assigns.
    const OutRef<T, B> gh = need_h ? tape.grad_into(h) : OutRef<T, B>{};
    std::optional<SumOut<T, B>> gw;
    if (need_w) gw.emplace(tape.grad_into(w));
    auto z = Tensor<T, B>::uninitialized({chunk, vocab});
    auto dz = Tensor<T, B>::uninitialized({chunk, vocab});
    for (index_t c = 0; c < saved->chunks(); ++c) {
      const auto ch = saved->at(c);
      if (ch.ks == 0) {  // dh = 0 on these rows, no dW term
        if (need_h && gh.fresh) B::fill(gh.data + ch.row0 * d, ch.rows * d, T(0));
        continue;
      }
      mm_nt<B>(ch.rows, vocab, d, T(1), hp + ch.row0 * d, wp, T(0), z.data());
      B::fill(dz.data(), ch.rows * vocab, T(0));  // softmax_vjp adds; unscored rows stay 0
      softmax_vjp<B>(ch.ks, vocab, z.data(), saved->local.data() + ch.k0, saved->targets.data() + ch.k0,
                     saved->lse.data() + ch.k0, g + ch.row0, inv_tau, dz.data());
      if (need_h) mm_nn<B>(ch.rows, d, vocab, T(1), dz.data(), wp, gh.beta(), gh.data + ch.row0 * d);
      if (need_w) mm_tn<B>(vocab, d, ch.rows, T(1), dz.data(), hp + ch.row0 * d, gw->beta(), gw->data());
    }
    if (need_w) gw->zeroed();  // no scored row: a zero gradient
  };

  auto jvp = [&tape, h, w, saved, vocab, d, chunk, inv_tau](Var self) {
    const T* th = tape.tangent_data(h);
    const T* tw = tape.tangent_data(w);
    if (!th && !tw) return;
    T* to = tape.tangent_into(self).zeroed();  // unscored rows stay 0
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
      if (th) mm_nt<B>(ch.rows, vocab, d, T(1), th + ch.row0 * d, wp, T(0), tzp);
      if (tw) mm_nt<B>(ch.rows, vocab, d, T(1), hp + ch.row0 * d, tw, th ? T(1) : T(0), tzp);
      const std::int32_t* rw = saved->rows.data() + ch.k0;
      const std::int32_t* lc = saved->local.data() + ch.k0;
      const std::int32_t* tg = saved->targets.data() + ch.k0;
      softmax_dot<B>(ch.ks, vocab, zp, lc, saved->lse.data() + ch.k0, inv_tau, tzp, mp);
      B::parallel_for(ch.ks, [=] EP_HOST_DEVICE(index_t k) {
        to[rw[k]] = static_cast<T>((static_cast<acc_t>(tzp[lc[k] * vocab + tg[k]]) - mp[k]) * inv_tau);
      });
    }
  };
  return tape.record("lm_head_logprob", std::move(out), {h, w}, backward, jvp);
}

}  // namespace entropy_probe
