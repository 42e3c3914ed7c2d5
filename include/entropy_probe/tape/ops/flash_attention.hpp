// Causal self-attention in O(T) memory: the semantics of causal_attention
// (tape/ops/attention.hpp: key padding mask, grouped KV heads, a query with
// no allowed key gives 0 and zero gradients / tangents), computed a tile of
// queries against a tile of keys at a time, flash-attention style.
//
//   forward  online softmax over the key tiles of each query tile: running
//            row max m and sum l of exp(S - m); the output is rescaled by
//            exp(m_old - m_new) when the max grows and divided by l at the
//            end. Saved for the rules: lse = m + log l per (row, head, query).
//   VJP      (FlashAttention-2) P = exp(S - lse) recomputed per tile;
//            D = rowsum(dO o O), dS = P o (dP - D), dP = dO V^T;
//            dV += P^T dO, dQ += scale dS K, dK += scale dS^T Q.
//   JVP      P recomputed from lse as in the VJP, so no rescaling is needed:
//            tO = (P o tS) V + P tV - c o O with c = rowsum(P o tS) summed over
//            the key tiles, tS = scale (tQ K^T + Q tK^T).
//
// Memory: the output, lse [R, Hq, T] and per-(row, head, query) statistics,
// plus one [chunk, Hq, tile, tile] scratch (two in the rules); never a
// [T, T] block per head. Key tiles above the diagonal are skipped. The
// products run on the backend's batched gemm over (row, KV group,
// head-in-group) items exactly as in causal_attention (AttentionGrids), the
// row passes as B::parallel_for over query rows and exp as B::unary_map, so
// the op runs on CpuBackend and CudaBackend alike. Heads of a KV group accumulate into their shared
// dK / dV one head-in-group after another, so no two products race.
#pragma once

#include "entropy_probe/tape/ops/attention.hpp"
#include "entropy_probe/tape/tape.hpp"
#include "entropy_probe/tensor/batch_grid.hpp"
#include "entropy_probe/tensor/functors.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <span>

namespace entropy_probe {

// Query and key tile edge of flash_causal_attention: a [128, 128] score
// tile per head stays in L2 next to its Q, K and V tiles.
inline constexpr index_t kFlashAttentionTile = 128;

namespace detail {

// What the VJP and JVP rules share: the log-sum-exp of every query's scores
// over its allowed keys (+inf for a query with none, so exp(S - lse) = 0),
// and the key mask, on the backend.
template <class T, class B>
struct FlashAttentionSaved {
  Tensor<acc_t, B> lse;          // [R, Hq, T]
  Tensor<std::uint8_t, B> mask;  // [R, T]
};

// One (query tile, key tile) pair of a chunk of rows: the index maps of its
// row passes. Rows of a pass are i in [0, rows()): block b = i / bq (the
// chunk's local row times Hq plus the head), query q0 + i % bq; scratch
// blocks are [tile, tile] with leading dimension `tile`.
struct FlashTile {
  index_t tok, hq, dh, ldq, tile;  // T, Hq, head dim, q row width, tile edge
  index_t r0, nb;                  // first row of the chunk, rows in it
  index_t q0, bq, k0, bk;          // tile origins and extents

  index_t rows() const { return nb * hq * bq; }
  EP_HOST_DEVICE index_t query(index_t i) const { return q0 + i % bq; }
  // Element (query i, key k0 + s) of a scratch tile.
  EP_HOST_DEVICE index_t at(index_t i, index_t s) const { return (i / bq) * tile * tile + (i % bq) * tile + s; }
  // Entry of query i in [R, Hq, T] statistics.
  EP_HOST_DEVICE index_t stat(index_t i) const { return (r0 * hq + i / bq) * tok + query(i); }
  // Entry of key k0 + s of query i's row in the [R, T] key mask.
  EP_HOST_DEVICE index_t mask_at(index_t i, index_t s) const { return (r0 + i / bq / hq) * tok + k0 + s; }
  // Element d of query i's head in a q-layout tensor (out, dO, tO).
  EP_HOST_DEVICE index_t q_at(index_t i, index_t d) const {
    const index_t b = i / bq;
    return ((r0 + b / hq) * tok + query(i)) * ldq + (b % hq) * dh + d;
  }
  // Keys of this tile at or before query i (the causal part), >= 1 for the
  // diagonal and earlier tiles the op visits.
  EP_HOST_DEVICE index_t causal_keys(index_t i) const {
    const index_t n = query(i) - k0 + 1;
    return n < bk ? n : bk;
  }
  EP_HOST_DEVICE bool allowed(const std::uint8_t* mask, index_t i, index_t s) const {
    return s < causal_keys(i) && mask[mask_at(i, s)];
  }
};

// The tiled products, each over the chunk's (row, KV group, head-in-group)
// items; offsets into the q- and kv-layout operands are added here, so the
// callers pass whole tensors.
template <class T, class B>
struct FlashProducts {
  AttentionGrids grids;
  index_t ldq, ldk, group, dh, tt;  // row widths, heads per KV head, head dim, tile*tile

  // Scratch [bq, bk] = alpha A_q[q0..] B_kv[k0..]^T + beta scratch  (S, tS, dP)
  void scores(const FlashTile& f, T alpha, const T* a_q, const T* b_kv, T beta, T* scratch) const {
    B::gemm_batched(false, true, f.bq, f.bk, dh, alpha, a_q + q_row(f), ldq, b_kv + kv_row(f), ldk, beta, scratch,
                    f.tile, grids.all(f.nb, 'q', 'v', 'p'));
  }
  // C_q[q0..] = alpha scratch B_kv[k0..] + beta C_q  (O, tO, dQ)
  void apply(const FlashTile& f, T alpha, const T* scratch, const T* b_kv, T beta, T* c_q) const {
    B::gemm_batched(false, false, f.bq, dh, f.bk, alpha, scratch, f.tile, b_kv + kv_row(f), ldk, beta, c_q + q_row(f),
                    ldq, grids.all(f.nb, 'p', 'v', 'q'));
  }
  // C_kv[k0..] = alpha sum over the group's heads of scratch^T A_q[q0..] + beta C_kv  (dV, dK),
  // one head-in-group after another.
  void reduce_to_kv(const FlashTile& f, T alpha, const T* scratch, const T* a_q, T beta, T* c_kv) const {
    for (index_t h = 0; h < group; ++h)
      B::gemm_batched(true, false, f.bk, dh, f.bq, alpha, scratch + h * tt, f.tile, a_q + q_row(f) + h * dh, ldq,
                      h == 0 ? beta : T(1), c_kv + kv_row(f), ldk, grids.per_head_in_group(f.nb, 'p', 'q', 'v'));
  }

 private:
  index_t q_row(const FlashTile& f) const { return (f.r0 * f.tok + f.q0) * ldq; }
  index_t kv_row(const FlashTile& f) const { return (f.r0 * f.tok + f.k0) * ldk; }
};

// p <- exp(p - shift(i)) at the allowed keys of query i, exactly 0 elsewhere,
// over a score tile. The shifted scores are written over the whole
// [nb*Hq, tile, tile] scratch (-inf outside the tile's rows and keys) so that
// exp runs as one contiguous vectorised map (B::unary_map); exp(-inf) may
// come back as a tiny denormal there, so a last pass writes exact zeros.
// The row passes loop over a row's keys inside the body, so the row's index
// arithmetic is done once per row.
template <class T, class B, class Shift>
void flash_exp_tile(const FlashTile& f, const std::uint8_t* mask, Shift shift, T* p) {
  const index_t tile = f.tile, bq = f.bq, bk = f.bk;
  B::parallel_for(f.nb * f.hq * tile, [=] EP_HOST_DEVICE(index_t r) {
    const index_t t = r % tile, i = r / tile * bq + t;  // i: r's query in the tile's numbering, when t < bq
    const index_t n = t < bq ? f.causal_keys(i) : 0;    // allowed keys lie in [0, n)
    const std::uint8_t* m = mask + (n > 0 ? f.mask_at(i, 0) : 0);
    const acc_t sh = n > 0 ? shift(i) : 0.0;
    T* x = p + r * tile;
    for (index_t s = 0; s < tile; ++s)
      x[s] = s < n && m[s] ? static_cast<T>(static_cast<acc_t>(x[s]) - sh) : static_cast<T>(-HUGE_VAL);
  });
  B::template unary_map<Exp>(f.nb * f.hq * tile * tile, p, p);
  B::parallel_for(f.rows(), [=] EP_HOST_DEVICE(index_t i) {
    const index_t n = f.causal_keys(i);
    const std::uint8_t* m = mask + f.mask_at(i, 0);
    T* x = p + f.at(i, 0);
    for (index_t s = 0; s < bk; ++s)
      if (s >= n || !m[s]) x[s] = T(0);
  });
}

// P = exp(S - lse) over allowed keys, 0 elsewhere, in place over a score tile.
template <class T, class B>
void flash_recompute_probs(const FlashTile& f, const acc_t* lse, const std::uint8_t* mask, T* p) {
  flash_exp_tile<T, B>(
      f, mask, [=] EP_HOST_DEVICE(index_t i) { return lse[f.stat(i)]; }, p);
}

}  // namespace detail

// Causal attention over q/k/v in projection layout, tiled; see the file
// comment. key_mask has R*T entries, nonzero = real token. scale multiplies
// the scores (0: 1/sqrt(head_dim)); tile is the query and key tile edge.
template <class T, class B>
Var flash_causal_attention(Tape<T, B>& tape, Var q, Var k, Var v, std::span<const std::uint8_t> key_mask,
                           index_t n_heads, index_t n_kv_heads, double scale = 0, index_t tile = kFlashAttentionTile) {
  const Shape& qs = tape.shape(q);
  const detail::AttentionDims dims =
      detail::attention_dims("flash_causal_attention", tape, q, k, v, key_mask, n_heads, n_kv_heads);
  const index_t n_rows = dims.rows, n_tok = dims.tok, hq = dims.hq, hkv = dims.hkv, dh = dims.dh, group = dims.group;
  const index_t ldq = dims.ldq, ldk = dims.ldk;
  if (tile < 1) fail<UsageError>("flash_causal_attention: tile {} must be positive", tile);
  // A tile longer than the sequence is the sequence: the row passes and exp
  // run over whole [tile, tile] blocks, so a short sequence must not pay for
  // a long tile.
  tile = std::min(tile, std::max<index_t>(n_tok, 1));
  const T sc = static_cast<T>(detail::attention_scale("flash_causal_attention", scale, dh));

  const index_t tt = tile * tile, n_tiles = (n_tok + tile - 1) / tile, n_stats = n_rows * hq * n_tok;
  const detail::FlashProducts<T, B> prod{
      detail::AttentionGrids{hkv, group, dh, tt, n_tok * ldq, n_tok * ldk, hq * tt}, ldq, ldk, group, dh, tt};
  // Rows per batched call: what the backend's scratch budget holds of
  // [Hq, tile, tile] blocks, at least 1 (one row per call on the CPU backend).
  const index_t chunk =
      std::clamp<index_t>(B::batch_scratch_elements / std::max<index_t>(hq * tt, 1), 1, std::max<index_t>(n_rows, 1));
  const index_t scratch_elems = std::min(chunk, n_rows) * hq * tt;
  // The tile pair (query tile qi, key tile kj) of the chunk from row r0.
  auto tile_of = [=](index_t r0, index_t qi, index_t kj) {
    return detail::FlashTile{n_tok,
                             hq,
                             dh,
                             ldq,
                             tile,
                             r0,
                             std::min(chunk, n_rows - r0),
                             qi * tile,
                             std::min(tile, n_tok - qi * tile),
                             kj * tile,
                             std::min(tile, n_tok - kj * tile)};
  };

  // ---- forward ----
  auto saved = std::make_shared<detail::FlashAttentionSaved<T, B>>();
  saved->mask = Tensor<std::uint8_t, B>::from_host({n_rows, n_tok}, key_mask);
  saved->lse = Tensor<acc_t, B>::uninitialized({n_rows, hq, n_tok});  // written by the last pass of each query tile
  auto out = Tensor<T, B>::uninitialized(qs);                         // every query tile's first product has beta = 0
  {
    const T* qv = tape.value(q).data();
    const T* kv = tape.value(k).data();
    const T* vv = tape.value(v).data();
    const std::uint8_t* mask = saved->mask.data();
    acc_t* lse = saved->lse.data();
    // Running statistics of each query over the key tiles seen so far: the
    // max m and sum l of exp(S - m) over allowed keys (m = -inf, l = 0 before
    // any), and the factor exp(m_old - m_new) the output rescales by.
    auto run_max = Tensor<acc_t, B>::full({n_stats}, -HUGE_VAL);
    auto run_sum = Tensor<acc_t, B>::full({n_stats}, 0.0);
    auto rescale = Tensor<acc_t, B>::uninitialized({n_stats});  // written before read, per key tile
    acc_t* m_run = run_max.data();
    acc_t* l_run = run_sum.data();
    acc_t* corr = rescale.data();
    auto s_tile = Tensor<T, B>::uninitialized({scratch_elems});  // S by gemm, then P in place
    T* p = s_tile.data();
    // This tile's max of S over each query's allowed keys.
    auto tile_max = Tensor<acc_t, B>::uninitialized({scratch_elems / tile});  // chunk x Hq x tile
    acc_t* t_max = tile_max.data();
    T* o = out.data();
    for (index_t r0 = 0; r0 < n_rows; r0 += chunk)
      for (index_t qi = 0; qi < n_tiles; ++qi) {
        for (index_t kj = 0; kj <= qi; ++kj) {  // key tiles above the diagonal are all future keys
          const detail::FlashTile f = tile_of(r0, qi, kj);
          prod.scores(f, sc, qv, kv, T(0), p);
          // m_new = max(m_old, this tile's max); p = exp(S - m_new) over allowed
          // keys, 0 elsewhere; then l <- l exp(m_old - m_new) + sum p.
          B::parallel_for(f.rows(), [=] EP_HOST_DEVICE(index_t i) {
            const index_t n = f.causal_keys(i);
            const std::uint8_t* m = mask + f.mask_at(i, 0);
            const T* x = p + f.at(i, 0);
            acc_t mx = -HUGE_VAL;
            for (index_t s = 0; s < n; ++s)
              if (m[s]) mx = std::fmax(mx, static_cast<acc_t>(x[s]));
            t_max[i] = mx;
          });
          detail::flash_exp_tile<T, B>(
              f, mask, [=] EP_HOST_DEVICE(index_t i) { return std::fmax(t_max[i], m_run[f.stat(i)]); }, p);
          B::parallel_for(f.rows(), [=] EP_HOST_DEVICE(index_t i) {
            const T* x = p + f.at(i, 0);
            acc_t sum = 0;
            for (index_t s = 0; s < f.bk; ++s) sum += static_cast<acc_t>(x[s]);
            const index_t st = f.stat(i);
            const acc_t m_new = std::fmax(t_max[i], m_run[st]);
            // No allowed key yet: l stays 0 and the output (0 so far) keeps its scale.
            const acc_t c = m_new == -HUGE_VAL ? 1.0 : std::exp(m_run[st] - m_new);
            l_run[st] = l_run[st] * c + sum;
            m_run[st] = m_new;
            corr[st] = c;
          });
          if (kj > 0)
            B::parallel_for_2d(f.rows(), dh, [=] EP_HOST_DEVICE(index_t i, index_t d) {
              o[f.q_at(i, d)] *= static_cast<T>(corr[f.stat(i)]);
            });
          prod.apply(f, T(1), p, vv, kj == 0 ? T(0) : T(1), o);  // O = O exp(m_old - m_new) + P V
        }
        // O /= l and lse = m + log l; a query with no allowed key keeps O = 0
        // (every P it saw was 0) and gets lse = +inf.
        const detail::FlashTile f = tile_of(r0, qi, qi);
        B::parallel_for_2d(f.rows(), dh, [=] EP_HOST_DEVICE(index_t i, index_t d) {
          const index_t st = f.stat(i);
          const acc_t l = l_run[st];
          T& x = o[f.q_at(i, d)];
          x = l > 0 ? static_cast<T>(static_cast<acc_t>(x) / l) : T(0);
          if (d == 0) lse[st] = l > 0 ? m_run[st] + std::log(l) : HUGE_VAL;
        });
      }
  }

  auto backward = [&tape, q, k, v, saved, n_rows, n_tok, hq, dh, sc, n_tiles, n_stats, chunk, scratch_elems, prod,
                   tile_of](Var self) {
    const T* go = tape.grad_data(self);
    const T* o = tape.value(self).data();
    const T* qd = tape.value(q).data();
    const T* kd = tape.value(k).data();
    const T* vd = tape.value(v).data();
    const acc_t* lse = saved->lse.data();
    const std::uint8_t* mask = saved->mask.data();
    const bool need_s = tape.requires_grad(q) || tape.requires_grad(k);  // dS feeds dQ and dK
    // Each gradient is assigned tile by tile on first touch. When one Var is
    // passed as two operands both rules would share a buffer whose tiles are
    // first written in no fixed order, so then it is zero-filled and added to.
    const bool aliased = q.id == k.id || q.id == v.id || k.id == v.id;
    auto grad_ref = [&](Var x) {
      if (!tape.requires_grad(x)) return OutRef<T>{nullptr, false};
      return aliased ? OutRef<T>{tape.grad_accum(x), false} : tape.grad_into(x);
    };
    const OutRef<T> gq = grad_ref(q), gk = grad_ref(k), gv = grad_ref(v);
    // D = rowsum(dO o O) per (row, head, query): the softmax VJP's row term,
    // sum_s P dP, without P.
    Tensor<acc_t, B> d_row;
    if (need_s) {
      d_row = Tensor<acc_t, B>::uninitialized({n_stats});
      const index_t ldq = hq * dh;
      B::row_sum(
          n_stats, dh,
          [=] EP_HOST_DEVICE(index_t i, index_t d) {
            const index_t at = ((i / (hq * n_tok)) * n_tok + i % n_tok) * ldq + (i / n_tok) % hq * dh + d;
            return static_cast<acc_t>(go[at]) * static_cast<acc_t>(o[at]);
          },
          d_row.data());
    }
    const acc_t* dd = d_row.data();
    auto p_tile = Tensor<T, B>::uninitialized({scratch_elems});
    Tensor<T, B> ds_tile;
    if (need_s) ds_tile = Tensor<T, B>::uninitialized({scratch_elems});  // dP by gemm (beta = 0), then dS
    T* p = p_tile.data();
    T* ds = ds_tile.data();
    // Key tiles outer (FlashAttention-2's order): dK_j and dV_j take all their
    // terms in a row, first (beta 0 when fresh) at the diagonal tile; dQ_i
    // takes its first at key tile 0.
    for (index_t r0 = 0; r0 < n_rows; r0 += chunk)
      for (index_t kj = 0; kj < n_tiles; ++kj)
        for (index_t qi = kj; qi < n_tiles; ++qi) {
          const detail::FlashTile f = tile_of(r0, qi, kj);
          prod.scores(f, sc, qd, kd, T(0), p);
          detail::flash_recompute_probs<T, B>(f, lse, mask, p);
          if (gv.data)  // dV += P^T dO
            prod.reduce_to_kv(f, T(1), p, go, gv.fresh && qi == kj ? T(0) : T(1), gv.data);
          if (!need_s) continue;
          prod.scores(f, T(1), go, vd, T(0), ds);  // dP = dO V^T
          B::parallel_for(f.rows(), [=] EP_HOST_DEVICE(index_t i) {
            // dS = P o (dP - D), 0 at masked and future keys
            const index_t n = f.causal_keys(i);
            const std::uint8_t* m = mask + f.mask_at(i, 0);
            const T* pr = p + f.at(i, 0);
            T* x = ds + f.at(i, 0);
            const acc_t d = dd[f.stat(i)];
            for (index_t s = 0; s < f.bk; ++s)
              x[s] = s < n && m[s] ? static_cast<T>(static_cast<acc_t>(pr[s]) * (static_cast<acc_t>(x[s]) - d)) : T(0);
          });
          if (gq.data)  // dQ += scale dS K
            prod.apply(f, sc, ds, kd, gq.fresh && kj == 0 ? T(0) : T(1), gq.data);
          if (gk.data)  // dK += scale dS^T Q
            prod.reduce_to_kv(f, sc, ds, qd, gk.fresh && qi == kj ? T(0) : T(1), gk.data);
        }
  };

  auto jvp = [&tape, q, k, v, saved, n_rows, n_tok, hq, dh, sc, n_tiles, n_stats, chunk, scratch_elems, prod,
              tile_of](Var self) {
    const OutRef<T> to = tape.tangent_into(self);
    const T* tq = tape.tangent_data(q);
    const T* tk = tape.tangent_data(k);
    const T* tv = tape.tangent_data(v);
    const T* o = tape.value(self).data();
    const T* qd = tape.value(q).data();
    const T* kd = tape.value(k).data();
    const T* vd = tape.value(v).data();
    const acc_t* lse = saved->lse.data();
    const std::uint8_t* mask = saved->mask.data();
    const bool need_s = tq || tk;
    // c = rowsum(P o tS) per (row, head, query), summed over its key tiles.
    Tensor<acc_t, B> c_row;
    if (need_s) c_row = Tensor<acc_t, B>::uninitialized({n_stats});  // assigned at key tile 0
    acc_t* c = c_row.data();
    auto p_tile = Tensor<T, B>::uninitialized({scratch_elems});
    Tensor<T, B> ts_tile;
    if (need_s) ts_tile = Tensor<T, B>::uninitialized({scratch_elems});  // tS by gemm (beta = 0), then P o tS
    T* p = p_tile.data();
    T* ts = ts_tile.data();
    T* tod = to.data;
    for (index_t r0 = 0; r0 < n_rows; r0 += chunk)
      for (index_t qi = 0; qi < n_tiles; ++qi) {
        for (index_t kj = 0; kj <= qi; ++kj) {
          const detail::FlashTile f = tile_of(r0, qi, kj);
          prod.scores(f, sc, qd, kd, T(0), p);
          detail::flash_recompute_probs<T, B>(f, lse, mask, p);
          T beta = to.fresh && kj == 0 ? T(0) : T(1);  // the query tile's first term assigns
          if (tv) {                                    // tO += P tV
            prod.apply(f, T(1), p, tv, beta, tod);
            beta = T(1);
          }
          if (!need_s) continue;
          T beta_s(0);  // tS = scale (tQ K^T + Q tK^T)
          if (tq) {
            prod.scores(f, sc, tq, kd, beta_s, ts);
            beta_s = T(1);
          }
          if (tk) prod.scores(f, sc, qd, tk, beta_s, ts);
          const bool first = kj == 0;
          B::parallel_for(f.rows(), [=] EP_HOST_DEVICE(index_t i) {
            // ts <- P o tS (0 at masked and future keys); c += its row sum
            const index_t n = f.causal_keys(i);
            const std::uint8_t* m = mask + f.mask_at(i, 0);
            const T* pr = p + f.at(i, 0);
            T* x = ts + f.at(i, 0);
            acc_t sum = 0;
            for (index_t s = 0; s < f.bk; ++s) {
              const acc_t pt = s < n && m[s] ? static_cast<acc_t>(pr[s]) * static_cast<acc_t>(x[s]) : 0.0;
              x[s] = static_cast<T>(pt);
              sum += pt;
            }
            c[f.stat(i)] = first ? sum : c[f.stat(i)] + sum;
          });
          prod.apply(f, T(1), ts, vd, beta, tod);  // tO += (P o tS) V
        }
        if (!need_s) continue;
        const detail::FlashTile f = tile_of(r0, qi, qi);
        B::parallel_for_2d(f.rows(), dh, [=] EP_HOST_DEVICE(index_t i, index_t d) {  // tO -= c o O
          tod[f.q_at(i, d)] -= static_cast<T>(c[f.stat(i)] * static_cast<acc_t>(o[f.q_at(i, d)]));
        });
      }
  };

  return tape.record("flash_causal_attention", std::move(out), {q, k, v}, backward, jvp);
}

}  // namespace entropy_probe
