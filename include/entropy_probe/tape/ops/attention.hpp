// Causal self-attention with a key padding mask and grouped KV heads,
// forward / VJP / JVP side by side.
//
//   q [R, T, Hq*Dh], k and v [R, T, Hkv*Dh]   (raw projection outputs; head h
//                                              owns columns h*Dh .. h*Dh+Dh-1)
//   S = (1/sqrt(Dh)) Q_h K_g^T,  g = h / (Hq/Hkv)
//   P = softmax over allowed keys (s <= t and key_mask[r, s] = 1), 0 elsewhere
//   O_h = P V_g                                 -> out [R, T, Hq*Dh]
//
// A query with no allowed key (a left-padding position) gets P = 0, hence
// output 0 and zero gradients and tangents, never NaN.
//
// The products run per head on the backend's strided-batched gemm with
// leading dimensions, so heads are read in place from the projection layout;
// one call covers a chunk of rows (one row on the CPU backend, all rows that
// fit the backend's scratch budget on a device). P [R, Hq, T, T] is saved for
// the backward and JVP rules; the per-(row, head) intermediates there (dP, dS,
// tS, tP) live in one reused [chunk, T, T] scratch. Grouped heads accumulate
// into their shared dK / dV in successive calls, and rows of one call write
// disjoint blocks, so no two products ever race on the same output.
#pragma once

#include "entropy_probe/tape/tape.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <span>

namespace entropy_probe {

namespace detail {

// What the backward and JVP rules share: P and the key mask, on the backend.
template <class T, class B>
struct AttentionSaved {
  Tensor<T, B> probs;            // [R, Hq, T, T], exactly 0 at masked / future keys
  Tensor<std::uint8_t, B> mask;  // [R, T]
};

// x[t, s] <- P[t, s] * (x[t, s] - sum_s' P[t, s'] x[t, s']) over allowed keys,
// 0 elsewhere, for the T rows of each of n_mats (row, head) blocks: block b
// has its probabilities at probs + b * probs_stride, its key mask at
// key_mask + b * T and x at x + b * T * T. This is the softmax VJP (x = dP
// gives dS) and equally the softmax JVP (x = tS gives tP). Masked and future
// entries of x are never read, so whatever the gemm left there cannot leak in.
template <class T, class B>
void attention_softmax_vjp_rows(index_t n_mats, index_t n_tok, const T* probs, index_t probs_stride,
                                const std::uint8_t* key_mask, T* x) {
  B::parallel_for(n_mats * n_tok, [=] EP_HOST_DEVICE(index_t i) {
    const index_t b = i / n_tok, t = i - b * n_tok;
    const T* p = probs + b * probs_stride + t * n_tok;
    const std::uint8_t* m = key_mask + b * n_tok;
    T* row = x + i * n_tok;
    acc_t dot = 0;
    for (index_t s = 0; s <= t; ++s)
      if (m[s]) dot += static_cast<acc_t>(p[s]) * static_cast<acc_t>(row[s]);
    for (index_t s = 0; s < n_tok; ++s)
      row[s] = (s <= t && m[s]) ? static_cast<T>(static_cast<acc_t>(p[s]) * (static_cast<acc_t>(row[s]) - dot)) : T(0);
  });
}

}  // namespace detail

// Causal attention over q/k/v in projection layout; see the file comment.
// key_mask has R*T entries, nonzero = real token.
template <class T, class B>
Var causal_attention(Tape<T, B>& tape, Var q, Var k, Var v, std::span<const std::uint8_t> key_mask, index_t n_heads,
                     index_t n_kv_heads) {
  const Shape& qs = tape.shape(q);
  if (qs.size() != 3) fail<UsageError>("causal_attention: q has shape {}, expected [R, T, Hq*Dh]", shape_str(qs));
  if (n_heads < 1 || n_kv_heads < 1)
    fail<UsageError>("causal_attention: n_heads ({}) and n_kv_heads ({}) must be positive", n_heads, n_kv_heads);
  if (n_heads % n_kv_heads != 0)
    fail<UsageError>("causal_attention: n_heads {} is not a multiple of n_kv_heads {}", n_heads, n_kv_heads);
  const index_t n_rows = qs[0], n_tok = qs[1];
  if (qs[2] % n_heads != 0 || qs[2] == 0)
    fail<UsageError>("causal_attention: q feature size {} is not a positive multiple of n_heads {}", qs[2], n_heads);
  const index_t hq = n_heads, hkv = n_kv_heads, dh = qs[2] / n_heads, group = hq / hkv;
  const index_t ldq = hq * dh, ldk = hkv * dh;
  const Shape kv_shape{n_rows, n_tok, ldk};
  if (tape.shape(k) != kv_shape)
    fail<UsageError>("causal_attention: k has shape {}, expected {} (n_kv_heads {} x head_dim {})",
                     shape_str(tape.shape(k)), shape_str(kv_shape), hkv, dh);
  if (tape.shape(v) != kv_shape)
    fail<UsageError>("causal_attention: v has shape {}, expected {} (n_kv_heads {} x head_dim {})",
                     shape_str(tape.shape(v)), shape_str(kv_shape), hkv, dh);
  if (static_cast<index_t>(key_mask.size()) != n_rows * n_tok)
    fail<UsageError>("causal_attention: key_mask has {} entries, expected R*T = {}*{} = {}", key_mask.size(), n_rows,
                     n_tok, n_rows * n_tok);
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<acc_t>(dh)));

  // Offsets of head h (query side) and its KV head (key/value side) in row r,
  // and the row strides of q, k / v and P for the batched products.
  auto q_off = [=](index_t r, index_t h) { return r * n_tok * ldq + h * dh; };
  auto kv_off = [=](index_t r, index_t h) { return r * n_tok * ldk + (h / group) * dh; };
  auto p_off = [=](index_t r, index_t h) { return (r * hq + h) * n_tok * n_tok; };
  const index_t sq = n_tok * ldq, skv = n_tok * ldk, sp = hq * n_tok * n_tok, sts = n_tok * n_tok;
  // Rows per batched call: what the backend's scratch budget holds of [T, T]
  // blocks, at least 1 (the CPU backend's budget is 0: one row per call).
  const index_t chunk =
      std::clamp<index_t>(B::batch_scratch_elements / std::max<index_t>(sts, 1), 1, std::max<index_t>(n_rows, 1));

  // ---- forward ----
  auto saved = std::make_shared<detail::AttentionSaved<T, B>>();
  saved->mask = Tensor<std::uint8_t, B>::from_host({n_rows, n_tok}, key_mask);
  saved->probs = Tensor<T, B>::uninitialized({n_rows, hq, n_tok, n_tok});  // S by gemm, then every entry by softmax
  const T* qv = tape.value(q).data();
  const T* kv = tape.value(k).data();
  const T* vv = tape.value(v).data();
  T* probs = saved->probs.data();
  for (index_t r0 = 0; r0 < n_rows; r0 += chunk)  // S = scale Q K^T, written into the P buffer
    for (index_t h = 0; h < hq; ++h)
      B::gemm_strided_batched(false, true, n_tok, n_tok, dh, scale, qv + q_off(r0, h), ldq, sq, kv + kv_off(r0, h), ldk,
                              skv, T(0), probs + p_off(r0, h), n_tok, sp, std::min(chunk, n_rows - r0));
  {
    // Masked softmax in place, one query row at a time; statistics in double.
    const std::uint8_t* mask = saved->mask.data();
    B::parallel_for(n_rows * hq * n_tok, [=] EP_HOST_DEVICE(index_t i) {
      const index_t r = i / (hq * n_tok), t = i % n_tok;
      const std::uint8_t* m = mask + r * n_tok;
      T* row = probs + i * n_tok;
      bool any = false;
      acc_t mx = 0;
      for (index_t s = 0; s <= t; ++s)
        if (m[s] && (!any || static_cast<acc_t>(row[s]) > mx)) {
          mx = static_cast<acc_t>(row[s]);
          any = true;
        }
      acc_t sum = 0;
      for (index_t s = 0; s < n_tok; ++s) {
        if (any && s <= t && m[s]) {
          const acc_t e = std::exp(static_cast<acc_t>(row[s]) - mx);
          sum += e;
          row[s] = static_cast<T>(e);
        } else {
          row[s] = T(0);
        }
      }
      if (any)
        for (index_t s = 0; s <= t; ++s) row[s] = static_cast<T>(static_cast<acc_t>(row[s]) / sum);
    });
  }
  auto out = Tensor<T, B>::uninitialized(qs);     // every head's columns written with beta = 0
  for (index_t r0 = 0; r0 < n_rows; r0 += chunk)  // O = P V
    for (index_t h = 0; h < hq; ++h)
      B::gemm_strided_batched(false, false, n_tok, dh, n_tok, T(1), probs + p_off(r0, h), n_tok, sp, vv + kv_off(r0, h),
                              ldk, skv, T(0), out.data() + q_off(r0, h), ldq, sq, std::min(chunk, n_rows - r0));

  auto backward = [&tape, q, k, v, saved, n_rows, n_tok, hq, dh, ldq, ldk, scale, q_off, kv_off, p_off, sq, skv, sp,
                   sts, chunk](Var self) {
    const T* go = tape.grad_data(self);
    const T* qd = tape.value(q).data();
    const T* kd = tape.value(k).data();
    const T* vd = tape.value(v).data();
    const T* p = saved->probs.data();
    const std::uint8_t* mask = saved->mask.data();
    const bool need_q = tape.requires_grad(q), need_k = tape.requires_grad(k), need_v = tape.requires_grad(v);
    T* gq = need_q ? tape.grad_accum(q) : nullptr;
    T* gk = need_k ? tape.grad_accum(k) : nullptr;
    T* gv = need_v ? tape.grad_accum(v) : nullptr;
    Tensor<T, B> ds;
    if (need_q || need_k) ds = Tensor<T, B>({chunk, n_tok, n_tok});
    for (index_t r0 = 0; r0 < n_rows; r0 += chunk) {
      const index_t nb = std::min(chunk, n_rows - r0);
      for (index_t h = 0; h < hq; ++h) {
        const T* ph = p + p_off(r0, h);
        const T* goh = go + q_off(r0, h);
        if (gv)  // dV += P^T dO (query heads of one KV group accumulate, one call after another)
          B::gemm_strided_batched(true, false, n_tok, dh, n_tok, T(1), ph, n_tok, sp, goh, ldq, sq, T(1),
                                  gv + kv_off(r0, h), ldk, skv, nb);
        if (!gq && !gk) continue;
        // dP = dO V^T, then dS = P o (dP - rowsum(dP o P)) in place
        B::gemm_strided_batched(false, true, n_tok, n_tok, dh, T(1), goh, ldq, sq, vd + kv_off(r0, h), ldk, skv, T(0),
                                ds.data(), n_tok, sts, nb);
        detail::attention_softmax_vjp_rows<T, B>(nb, n_tok, ph, sp, mask + r0 * n_tok, ds.data());
        if (gq)  // dQ += scale dS K
          B::gemm_strided_batched(false, false, n_tok, dh, n_tok, scale, ds.data(), n_tok, sts, kd + kv_off(r0, h), ldk,
                                  skv, T(1), gq + q_off(r0, h), ldq, sq, nb);
        if (gk)  // dK += scale dS^T Q
          B::gemm_strided_batched(true, false, n_tok, dh, n_tok, scale, ds.data(), n_tok, sts, qd + q_off(r0, h), ldq,
                                  sq, T(1), gk + kv_off(r0, h), ldk, skv, nb);
      }
    }
  };

  auto jvp = [&tape, q, k, v, saved, n_rows, n_tok, hq, dh, ldq, ldk, scale, q_off, kv_off, p_off, sq, skv, sp, sts,
              chunk](Var self) {
    T* to = tape.tangent_out(self);
    const T* tq = tape.tangent_data(q);
    const T* tk = tape.tangent_data(k);
    const T* tv = tape.tangent_data(v);
    const T* qd = tape.value(q).data();
    const T* kd = tape.value(k).data();
    const T* vd = tape.value(v).data();
    const T* p = saved->probs.data();
    const std::uint8_t* mask = saved->mask.data();
    Tensor<T, B> ts;
    if (tq || tk) ts = Tensor<T, B>({chunk, n_tok, n_tok});
    for (index_t r0 = 0; r0 < n_rows; r0 += chunk) {
      const index_t nb = std::min(chunk, n_rows - r0);
      for (index_t h = 0; h < hq; ++h) {
        const T* ph = p + p_off(r0, h);
        T* toh = to + q_off(r0, h);
        if (tv)  // tO += P tV
          B::gemm_strided_batched(false, false, n_tok, dh, n_tok, T(1), ph, n_tok, sp, tv + kv_off(r0, h), ldk, skv,
                                  T(1), toh, ldq, sq, nb);
        if (!tq && !tk) continue;
        // tS = scale (tQ K^T + Q tK^T), then tP = P o (tS - rowsum(P o tS)) in place
        T beta(0);
        if (tq) {
          B::gemm_strided_batched(false, true, n_tok, n_tok, dh, scale, tq + q_off(r0, h), ldq, sq, kd + kv_off(r0, h),
                                  ldk, skv, beta, ts.data(), n_tok, sts, nb);
          beta = T(1);
        }
        if (tk)
          B::gemm_strided_batched(false, true, n_tok, n_tok, dh, scale, qd + q_off(r0, h), ldq, sq, tk + kv_off(r0, h),
                                  ldk, skv, beta, ts.data(), n_tok, sts, nb);
        detail::attention_softmax_vjp_rows<T, B>(nb, n_tok, ph, sp, mask + r0 * n_tok, ts.data());
        // tO += tP V
        B::gemm_strided_batched(false, false, n_tok, dh, n_tok, T(1), ts.data(), n_tok, sts, vd + kv_off(r0, h), ldk,
                                skv, T(1), toh, ldq, sq, nb);
      }
    }
  };

  return tape.record("causal_attention", std::move(out), {q, k, v}, backward, jvp);
}

}  // namespace entropy_probe
