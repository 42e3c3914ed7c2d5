// Causal self-attention with a key padding mask and grouped KV heads,
// forward / VJP / JVP side by side.
//
//   q [R, T, Hq*Dh], k and v [R, T, Hkv*Dh]   (raw projection outputs; head h
//                                              owns columns h*Dh .. h*Dh+Dh-1)
//   S = scale Q_h K_g^T,  g = h / (Hq/Hkv),  scale = 1/sqrt(Dh) unless given
//   P = softmax over allowed keys (s <= t and key_mask[r, s] = 1), 0 elsewhere
//   O_h = P V_g                                 -> out [R, T, Hq*Dh]
//
// A query with no allowed key (a left-padding position) gets P = 0, hence
// output 0 and zero gradients and tangents, never NaN.
//
// The products run on the backend's batched gemm (tensor/batch_grid.hpp)
// with leading dimensions, so heads are read in place from the projection
// layout: one call covers every (row, KV group, head-in-group) item of a
// chunk of rows (one row on the CPU backend, all rows that fit the backend's
// scratch budget on a device), a KV head shared by its group through a zero
// stride. P [R, Hq, T, T] is saved for the backward and JVP rules; dP / dS and
// tS / tP live in one reused [chunk, Hq, T, T] scratch. Heads of one KV group
// accumulate into their shared dK / dV, so those products go one
// head-in-group after another (each call then writes disjoint blocks): no two
// products ever race on the same output.
#pragma once

#include "entropy_probe/tape/tape.hpp"
#include "entropy_probe/tensor/batch_grid.hpp"

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
// 0 elsewhere, for the T query rows of each of n_mats (row, head) blocks laid
// out like P ([rows, heads, T, T] from probs and from x; block b's key mask
// at key_mask + (b / heads) * T). This is the softmax VJP (x = dP gives dS)
// and equally the softmax JVP (x = tS gives tP). Masked and future entries of
// x are never read, so whatever the gemm left there cannot leak in.
template <class T, class B>
void attention_softmax_vjp_rows(index_t n_mats, index_t heads, index_t n_tok, const T* probs,
                                const std::uint8_t* key_mask, T* x) {
  const index_t q_rows = heads * n_tok;  // query rows per sequence
  B::row_sum_apply(
      n_mats * n_tok, n_tok, [=] EP_HOST_DEVICE(index_t i) { return i % n_tok + 1; },  // keys s <= t
      [=] EP_HOST_DEVICE(index_t i, index_t s) -> acc_t {
        return key_mask[i / q_rows * n_tok + s]
                   ? static_cast<acc_t>(probs[i * n_tok + s]) * static_cast<acc_t>(x[i * n_tok + s])
                   : 0.0;
      },
      [] EP_HOST_DEVICE(index_t, acc_t dot) { return dot; },
      [=] EP_HOST_DEVICE(index_t i, index_t s, acc_t dot) {
        T& v = x[i * n_tok + s];
        v = (s <= i % n_tok && key_mask[i / q_rows * n_tok + s])
                ? static_cast<T>(static_cast<acc_t>(probs[i * n_tok + s]) * (static_cast<acc_t>(v) - dot))
                : T(0);
      });
}

// The shapes of an attention op's operands, checked: q [R, T, Hq*Dh], k and
// v [R, T, Hkv*Dh], R*T key mask entries, Hkv dividing Hq. `op` names the
// op in the errors.
struct AttentionDims {
  index_t rows, tok, hq, hkv, dh, group, ldq, ldk;  // R, T, heads, KV heads, head dim, Hq/Hkv, row widths of q, k/v
};

template <class T, class B>
AttentionDims attention_dims(const char* op, const Tape<T, B>& tape, Var q, Var k, Var v,
                             std::span<const std::uint8_t> key_mask, index_t n_heads, index_t n_kv_heads) {
  const Shape& qs = tape.shape(q);
  if (qs.size() != 3) fail<UsageError>("{}: q has shape {}, expected [R, T, Hq*Dh]", op, shape_str(qs));
  if (n_heads < 1 || n_kv_heads < 1)
    fail<UsageError>("{}: n_heads ({}) and n_kv_heads ({}) must be positive", op, n_heads, n_kv_heads);
  if (n_heads % n_kv_heads != 0)
    fail<UsageError>("{}: n_heads {} is not a multiple of n_kv_heads {}", op, n_heads, n_kv_heads);
  const index_t n_rows = qs[0], n_tok = qs[1];
  if (qs[2] % n_heads != 0 || qs[2] == 0)
    fail<UsageError>("{}: q feature size {} is not a positive multiple of n_heads {}", op, qs[2], n_heads);
  const index_t dh = qs[2] / n_heads, ldk = n_kv_heads * dh;
  const Shape kv_shape{n_rows, n_tok, ldk};
  if (tape.shape(k) != kv_shape)
    fail<UsageError>("{}: k has shape {}, expected {} (n_kv_heads {} x head_dim {})", op, shape_str(tape.shape(k)),
                     shape_str(kv_shape), n_kv_heads, dh);
  if (tape.shape(v) != kv_shape)
    fail<UsageError>("{}: v has shape {}, expected {} (n_kv_heads {} x head_dim {})", op, shape_str(tape.shape(v)),
                     shape_str(kv_shape), n_kv_heads, dh);
  if (static_cast<index_t>(key_mask.size()) != n_rows * n_tok)
    fail<UsageError>("{}: key_mask has {} entries, expected R*T = {}*{} = {}", op, key_mask.size(), n_rows, n_tok,
                     n_rows * n_tok);
  return {n_rows, n_tok, n_heads, n_kv_heads, dh, n_heads / n_kv_heads, n_heads * dh, ldk};
}

// The gradient buffers of an attention op's q, k and v (a null OutRef where
// none is needed). The rules assign a region of a fresh buffer with its first
// term; one Var passed as two operands shares a buffer whose regions the
// rules reach in no fixed order, so then it is zero-filled and every term adds.
template <class T, class B>
struct AttentionGrads {
  OutRef<T, B> q, k, v;
};
template <class T, class B>
AttentionGrads<T, B> attention_grads(Tape<T, B>& tape, Var q, Var k, Var v) {
  const bool aliased = q.id == k.id || q.id == v.id || k.id == v.id;
  auto grad_ref = [&](Var x) {
    if (!tape.requires_grad(x)) return OutRef<T, B>{};
    OutRef<T, B> g = tape.grad_into(x);
    if (aliased) g.zeroed();
    return g;
  };
  AttentionGrads<T, B> g;
  g.q = grad_ref(q);  // in order: the first of aliased operands sees the buffer fresh
  g.k = grad_ref(k);
  g.v = grad_ref(v);
  return g;
}

// The factor on the scores: `scale` when positive, 0 for the usual
// 1/sqrt(head_dim); anything else is a caller's mistake.
inline acc_t attention_scale(const char* op, double scale, index_t dh) {
  if (!(scale >= 0.0) || !std::isfinite(scale))
    fail<UsageError>("{}: scale = {} must be finite and positive (0 for 1/sqrt(head_dim))", op, scale);
  return scale > 0.0 ? scale : 1.0 / std::sqrt(static_cast<acc_t>(dh));
}

// The batch layouts of attention's products over `rows` rows from a chunk's
// first row: all (row, KV group g, head-in-group k) items, or, for the
// products that accumulate into a KV head, the (row, g) items of one k.
struct AttentionGrids {
  index_t hkv, group, dh, tt, sq, skv, sp;  // KV heads, heads per KV head, head dim, T*T, row strides of q, k/v, P

  // q-layout operand (q, dQ, out), KV operand, P-layout operand (P, dS): the
  // strides of each over (row, g, k).
  BatchGrid all(index_t rows, char a, char b, char c) const {
    BatchGrid g;
    g.n[0] = rows, g.n[1] = hkv, g.n[2] = group;
    set(g.sa, a), set(g.sb, b), set(g.sc, c);
    return g;
  }
  BatchGrid per_head_in_group(index_t rows, char a, char b, char c) const {
    BatchGrid g = all(rows, a, b, c);
    g.n[2] = 1;
    return g;
  }

 private:
  void set(index_t* s, char layout) const {
    if (layout == 'q') s[0] = sq, s[1] = group * dh, s[2] = dh;
    if (layout == 'v') s[0] = skv, s[1] = dh, s[2] = 0;
    if (layout == 'p') s[0] = sp, s[1] = group * tt, s[2] = tt;
  }
};

}  // namespace detail

// Causal attention over q/k/v in projection layout; see the file comment.
// key_mask has R*T entries, nonzero = real token. `scale` multiplies the
// scores; 0 means the usual 1/sqrt(Dh) (GPT-2's scale_attn_weights = false
// passes 1, scale_attn_by_inverse_layer_idx divides by layer_idx + 1).
template <class T, class B>
Var causal_attention(Tape<T, B>& tape, Var q, Var k, Var v, std::span<const std::uint8_t> key_mask, index_t n_heads,
                     index_t n_kv_heads, double scale_value = 0.0) {
  const Shape& qs = tape.shape(q);
  const detail::AttentionDims dims =
      detail::attention_dims("causal_attention", tape, q, k, v, key_mask, n_heads, n_kv_heads);
  const index_t n_rows = dims.rows, n_tok = dims.tok, hq = dims.hq, hkv = dims.hkv, dh = dims.dh, group = dims.group;
  const index_t ldq = dims.ldq, ldk = dims.ldk;
  const T scale = static_cast<T>(detail::attention_scale("causal_attention", scale_value, dh));

  // Offsets of row r's head h (query side), of its KV head and of its P block.
  auto q_off = [=](index_t r, index_t h) { return r * n_tok * ldq + h * dh; };
  auto kv_off = [=](index_t r, index_t h) { return r * n_tok * ldk + (h / group) * dh; };
  auto p_off = [=](index_t r, index_t h) { return (r * hq + h) * n_tok * n_tok; };
  const index_t tt = n_tok * n_tok;
  const detail::AttentionGrids grids{hkv, group, dh, tt, n_tok * ldq, n_tok * ldk, hq * tt};
  // Rows per batched call: what the backend's scratch budget holds of
  // [Hq, T, T] blocks, at least 1 (the CPU backend's budget is 0: one row per call).
  const index_t chunk =
      std::clamp<index_t>(B::batch_scratch_elements / std::max<index_t>(hq * tt, 1), 1, std::max<index_t>(n_rows, 1));

  // ---- forward ----
  detail::AttentionSaved<T, B> state;
  state.mask = Tensor<std::uint8_t, B>::from_host({n_rows, n_tok}, key_mask);
  state.probs = Tensor<T, B>::uninitialized({n_rows, hq, n_tok, n_tok});  // S by gemm, then every entry by softmax
  const T* qv = tape.value(q).data();
  const T* kv = tape.value(k).data();
  const T* vv = tape.value(v).data();
  T* probs = state.probs.data();
  for (index_t r0 = 0; r0 < n_rows; r0 += chunk)  // S = scale Q K^T, written into the P buffer
    B::gemm_batched(false, true, n_tok, n_tok, dh, scale, qv + q_off(r0, 0), ldq, kv + kv_off(r0, 0), ldk, T(0),
                    probs + p_off(r0, 0), n_tok, grids.all(std::min(chunk, n_rows - r0), 'q', 'v', 'p'));
  {
    // Masked softmax in place, a query row at a time, statistics in double:
    // the max and the sum of exponentials over allowed keys (the exponentials
    // kept in the row), then the division; 0 at masked and future keys, and
    // a row with no allowed key is all 0.
    const std::uint8_t* mask = state.mask.data();
    const index_t q_rows = hq * n_tok;  // query rows per sequence: key mask row i / q_rows
    B::row_max_sum_apply(
        n_rows * hq * n_tok, n_tok, [=] EP_HOST_DEVICE(index_t i) { return i % n_tok + 1; },
        [=] EP_HOST_DEVICE(index_t i, index_t s) -> acc_t {
          return mask[i / q_rows * n_tok + s] ? static_cast<acc_t>(probs[i * n_tok + s]) : -HUGE_VAL;
        },
        [=] EP_HOST_DEVICE(index_t i, index_t s, acc_t mx) -> acc_t {
          if (!mask[i / q_rows * n_tok + s]) return 0.0;
          const acc_t e = std::exp(static_cast<acc_t>(probs[i * n_tok + s]) - mx);
          probs[i * n_tok + s] = static_cast<T>(e);
          return e;
        },
        [=] EP_HOST_DEVICE(index_t i, index_t s, acc_t, acc_t sum) {
          T& p = probs[i * n_tok + s];
          p = (s <= i % n_tok && mask[i / q_rows * n_tok + s]) ? static_cast<T>(static_cast<acc_t>(p) / sum) : T(0);
        });
  }
  auto out = Tensor<T, B>::uninitialized(qs);     // every head's columns written with beta = 0
  for (index_t r0 = 0; r0 < n_rows; r0 += chunk)  // O = P V
    B::gemm_batched(false, false, n_tok, dh, n_tok, T(1), probs + p_off(r0, 0), n_tok, vv + kv_off(r0, 0), ldk, T(0),
                    out.data() + q_off(r0, 0), ldq, grids.all(std::min(chunk, n_rows - r0), 'p', 'v', 'q'));
  const auto saved = save_for_rules(std::move(state));

  auto backward = [&tape, q, k, v, saved, n_rows, n_tok, hq, dh, group, ldq, ldk, scale, q_off, kv_off, p_off, grids,
                   chunk](Var self) {
    const T* go = tape.grad_data(self);
    const T* qd = tape.value(q).data();
    const T* kd = tape.value(k).data();
    const T* vd = tape.value(v).data();
    const T* p = saved->probs.data();
    const std::uint8_t* mask = saved->mask.data();
    const auto grads = detail::attention_grads(tape, q, k, v);  // each chunk's first term assigns when fresh
    const OutRef<T, B> gq = grads.q, gk = grads.k, gv = grads.v;
    Tensor<T, B> ds;
    if (gq.data || gk.data) ds = Tensor<T, B>::uninitialized({chunk, hq, n_tok, n_tok});  // dP by gemm (beta = 0)
    for (index_t r0 = 0; r0 < n_rows; r0 += chunk) {
      const index_t nb = std::min(chunk, n_rows - r0);
      if (gv.data)  // dV += P^T dO, the heads of a KV group one after another
        for (index_t h = 0; h < group; ++h)
          B::gemm_batched(true, false, n_tok, dh, n_tok, T(1), p + p_off(r0, h), n_tok, go + q_off(r0, h), ldq,
                          h == 0 ? gv.beta() : T(1), gv.data + kv_off(r0, 0), ldk,
                          grids.per_head_in_group(nb, 'p', 'q', 'v'));
      if (!gq.data && !gk.data) continue;
      // dP = dO V^T, then dS = P o (dP - rowsum(dP o P)) in place
      B::gemm_batched(false, true, n_tok, n_tok, dh, T(1), go + q_off(r0, 0), ldq, vd + kv_off(r0, 0), ldk, T(0),
                      ds.data(), n_tok, grids.all(nb, 'q', 'v', 'p'));
      detail::attention_softmax_vjp_rows<T, B>(nb * hq, hq, n_tok, p + p_off(r0, 0), mask + r0 * n_tok, ds.data());
      if (gq.data)  // dQ += scale dS K
        B::gemm_batched(false, false, n_tok, dh, n_tok, scale, ds.data(), n_tok, kd + kv_off(r0, 0), ldk, gq.beta(),
                        gq.data + q_off(r0, 0), ldq, grids.all(nb, 'p', 'v', 'q'));
      if (gk.data)  // dK += scale dS^T Q, the heads of a KV group one after another
        for (index_t h = 0; h < group; ++h)
          B::gemm_batched(true, false, n_tok, dh, n_tok, scale, ds.data() + h * n_tok * n_tok, n_tok, qd + q_off(r0, h),
                          ldq, h == 0 ? gk.beta() : T(1), gk.data + kv_off(r0, 0), ldk,
                          grids.per_head_in_group(nb, 'p', 'q', 'v'));
    }
  };

  auto jvp = [&tape, q, k, v, saved, n_rows, n_tok, hq, dh, ldq, ldk, scale, q_off, kv_off, p_off, grids,
              chunk](Var self) {
    const OutRef<T, B> to = tape.tangent_into(self);  // each chunk's first term assigns its rows when fresh
    const T* tq = tape.tangent_data(q);
    const T* tk = tape.tangent_data(k);
    const T* tv = tape.tangent_data(v);
    const T* qd = tape.value(q).data();
    const T* kd = tape.value(k).data();
    const T* vd = tape.value(v).data();
    const T* p = saved->probs.data();
    const std::uint8_t* mask = saved->mask.data();
    Tensor<T, B> ts;
    if (tq || tk) ts = Tensor<T, B>::uninitialized({chunk, hq, n_tok, n_tok});  // the first product has beta = 0
    for (index_t r0 = 0; r0 < n_rows; r0 += chunk) {
      const index_t nb = std::min(chunk, n_rows - r0);
      T* toh = to.data + q_off(r0, 0);
      T beta_o = to.beta();
      if (tv) {  // tO += P tV
        B::gemm_batched(false, false, n_tok, dh, n_tok, T(1), p + p_off(r0, 0), n_tok, tv + kv_off(r0, 0), ldk, beta_o,
                        toh, ldq, grids.all(nb, 'p', 'v', 'q'));
        beta_o = T(1);
      }
      if (!tq && !tk) continue;
      // tS = scale (tQ K^T + Q tK^T), then tP = P o (tS - rowsum(P o tS)) in place
      T beta(0);
      if (tq) {
        B::gemm_batched(false, true, n_tok, n_tok, dh, scale, tq + q_off(r0, 0), ldq, kd + kv_off(r0, 0), ldk, beta,
                        ts.data(), n_tok, grids.all(nb, 'q', 'v', 'p'));
        beta = T(1);
      }
      if (tk)
        B::gemm_batched(false, true, n_tok, n_tok, dh, scale, qd + q_off(r0, 0), ldq, tk + kv_off(r0, 0), ldk, beta,
                        ts.data(), n_tok, grids.all(nb, 'q', 'v', 'p'));
      detail::attention_softmax_vjp_rows<T, B>(nb * hq, hq, n_tok, p + p_off(r0, 0), mask + r0 * n_tok, ts.data());
      // tO += tP V
      B::gemm_batched(false, false, n_tok, dh, n_tok, T(1), ts.data(), n_tok, vd + kv_off(r0, 0), ldk, beta_o, toh, ldq,
                      grids.all(nb, 'p', 'v', 'q'));
    }
  };

  return tape.record("causal_attention", std::move(out), {q, k, v}, backward, jvp);
}

}  // namespace entropy_probe
