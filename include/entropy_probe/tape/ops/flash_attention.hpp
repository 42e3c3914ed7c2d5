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
// row passes as B::parallel_for over query rows and exp as unary_map<Exp, B>, so
// the op runs on CpuBackend and CudaBackend alike. Heads of a KV group accumulate into their shared
// dK / dV one head-in-group after another, so no two products race.
#pragma once

#include "entropy_probe/tape/ops/attention.hpp"
#include "entropy_probe/tape/tape.hpp"
#include "entropy_probe/tensor/batch_grid.hpp"
#include "entropy_probe/tensor/compositions.hpp"
#include "entropy_probe/tensor/cpu_backend.hpp"
#include "entropy_probe/tensor/functors.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <span>
#include <type_traits>
#include <vector>

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
// exp runs as one contiguous vectorised map (unary_map<Exp, B>); exp(-inf) may
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
  unary_map<Exp, B>(f.nb * f.hq * tile * tile, p, p);
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

// The CPU form of the op: tasks over (row, head, query tile) -- (row, KV
// head, key tile) for dK and dV -- each doing its tile products as
// single-threaded BLAS calls and its row passes (exp as Eigen array maps, so
// SIMD) in a per-thread scratch, one task per thread
// (CpuBackend::parallel_tasks). Per-tile batched calls on both threads spent
// most of the time waking OpenBLAS's threads (docs/performance.md). A task
// writes only its own output rows, so the VJP runs one task per (row, KV
// group) when there are enough of them, else two passes: dK and dV over key
// tiles, then dQ over query tiles, each recomputing P and dS.
template <class T>
struct FlashCpu {
  using Row = Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>>;
  using ConstRow = Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>>;
  index_t rows, tok, hq, group, dh, ldq, ldk, tile, n_tiles;
  T sc;
  const std::uint8_t* mask;         // [R, T]
  std::vector<std::uint8_t> dense;  // [R, n_tiles]: every key of the tile is kept

  FlashCpu(index_t rows_, index_t tok_, index_t hq_, index_t group_, index_t dh_, index_t ldq_, index_t ldk_,
           index_t tile_, T sc_, const std::uint8_t* mask_)
      : rows(rows_),
        tok(tok_),
        hq(hq_),
        group(group_),
        dh(dh_),
        ldq(ldq_),
        ldk(ldk_),
        tile(tile_),
        n_tiles((tok_ + tile_ - 1) / tile_),
        sc(sc_),
        mask(mask_),
        dense(static_cast<std::size_t>(rows_ * n_tiles)) {
    for (index_t r = 0; r < rows; ++r)
      for (index_t j = 0; j < n_tiles; ++j) {
        const std::uint8_t* m = mask + r * tok + j * tile;
        dense[r * n_tiles + j] = std::all_of(m, m + extent(j), [](std::uint8_t x) { return x != 0; });
      }
  }

  index_t extent(index_t t) const { return std::min(tile, tok - t * tile); }
  index_t q_off(index_t r, index_t h, index_t qi) const { return (r * tok + qi * tile) * ldq + h * dh; }
  index_t kv_off(index_t r, index_t g, index_t kj) const { return (r * tok + kj * tile) * ldk + g * dh; }
  index_t stat(index_t r, index_t h, index_t qi) const { return (r * hq + h) * tok + qi * tile; }

  // One (query tile, key tile) pair of a (row, head): the row passes over
  // its [bq, bk] scratch tiles (leading dimension tile).
  struct Pair {
    index_t q0, bq, k0, bk;
    const std::uint8_t* m;  // the key tile's mask
    bool dense;

    // Keys [0, n) of the tile at or before query t.
    index_t causal_keys(index_t t) const { return std::min(q0 + t - k0 + 1, bk); }
    bool kept(index_t s) const { return dense || m[s]; }
    // Max of x over query t's allowed keys (-inf if none).
    acc_t row_max(const T* x, index_t t) const {
      const index_t n = causal_keys(t);
      if (dense) return n > 0 ? static_cast<acc_t>(ConstRow(x, n).maxCoeff()) : -HUGE_VAL;
      acc_t mx = -HUGE_VAL;
      for (index_t s = 0; s < n; ++s)
        if (m[s]) mx = std::fmax(mx, static_cast<acc_t>(x[s]));
      return mx;
    }
    // x <- exp(x - shift) at query t's allowed keys, exactly 0 elsewhere (all
    // of it for an infinite shift: no allowed key); returns its sum. The
    // shift is subtracted as hi + lo parts so that x - shift is as exact as
    // in acc_t.
    acc_t exp_row(T* x, index_t t, acc_t shift) const {
      const index_t n = std::isinf(shift) ? 0 : causal_keys(t);
      std::fill(x + n, x + bk, T(0));
      if (n == 0) return 0;
      const T hi = static_cast<T>(shift), lo = static_cast<T>(shift - static_cast<acc_t>(hi));
      Row a(x, n);
      CpuBackend::exp_affine(n, x, x, T(1), T(0), hi, lo);
      if (!dense)
        for (index_t s = 0; s < n; ++s)
          if (!m[s]) x[s] = T(0);
      return a.template cast<acc_t>().sum();
    }
    // dS = P o (dP - d) in place over dP (0 where P is).
    void ds_row(const T* p, T* x, acc_t d) const {
      const T hi = static_cast<T>(d), lo = static_cast<T>(d - static_cast<acc_t>(hi));
      Row(x, bk) = ConstRow(p, bk) * ((Row(x, bk) - hi) - lo);
    }
  };
  Pair pair(index_t r, index_t qi, index_t kj) const {
    return {qi * tile, extent(qi), kj * tile, extent(kj), mask + r * tok + kj * tile, dense[r * n_tiles + kj] != 0};
  }

  // s[bq, bk] = alpha A_q(tile qi) B_kv(tile kj)^T + beta s, A at a_q (offset applied), B at b_kv
  void scores(const Pair& f, T alpha, const T* a_q, const T* b_kv, T beta, T* s) const {
    CpuBackend::gemm(false, true, f.bq, f.bk, dh, alpha, a_q, ldq, b_kv, ldk, beta, s, tile);
  }
  // P = exp(S - lse) of a (row, head) pair tile, S computed here.
  void probs(const Pair& f, const T* q, const T* k, const acc_t* lse, T* p) const {
    scores(f, sc, q, k, T(0), p);
    for (index_t t = 0; t < f.bq; ++t) f.exp_row(p + t * tile, t, lse[t]);
  }
  // dS = P o (dO V^T - D) of a pair tile, from P.
  void dscores(const Pair& f, const T* p, const T* go, const T* v, const acc_t* d, T* ds) const {
    scores(f, T(1), go, v, T(0), ds);
    for (index_t t = 0; t < f.bq; ++t) f.ds_row(p + t * tile, ds + t * tile, d[t]);
  }

  // body(scratch, acc, r, h, qi) over every (row, head, query tile), the
  // longest (last) query tiles first so that the threads end together;
  // scratch holds two [tile, tile] tiles and acc two [tile] of the thread.
  template <class F>
  void query_tasks(F body) const {
    run_tasks(hq, [&](T* scratch, acc_t* acc, index_t a, index_t r, index_t h) {
      body(scratch, acc, r, h, n_tiles - 1 - a);
    });
  }
  // body(scratch, r, g, kj) over every (row, KV head, key tile), the longest
  // (first) key tiles first.
  template <class F>
  void key_tasks(F body) const {
    run_tasks(hq / group, [&](T* scratch, acc_t*, index_t a, index_t r, index_t g) { body(scratch, r, g, a); });
  }
  // body(scratch, r, g) over every (row, KV head): all of a KV group's tiles.
  template <class F>
  void group_tasks(F body) const {
    run_tasks(
        hq / group, [&](T* scratch, acc_t*, index_t, index_t r, index_t g) { body(scratch, r, g); }, 1);
  }

 private:
  // n elements of U rounded up to whole cache lines.
  template <class U>
  static index_t aligned_count(index_t n) {
    constexpr index_t line = 64 / sizeof(U);
    return (n + line - 1) / line * line;
  }
  template <class F>
  void run_tasks(index_t heads, F body, index_t tiles = 0) const {
    if (tiles == 0) tiles = n_tiles;
    // Each slot's scratch starts on a cache line, as the buffer does: Eigen's
    // reductions (the sums in exp_row) peel to the packet alignment, so an
    // offset that differed from slot to slot would make a task's rounding
    // depend on the thread that ran it.
    const index_t slots = CpuBackend::num_threads();
    const index_t s_stride = aligned_count<T>(2 * tile * tile), a_stride = aligned_count<acc_t>(2 * tile);
    auto scratch = Tensor<T, CpuBackend>::uninitialized({slots * s_stride});
    auto acc = Tensor<acc_t, CpuBackend>::uninitialized({slots * a_stride});
    T* sp = scratch.data();
    acc_t* ap = acc.data();
    const index_t per_tile = rows * heads;
    CpuBackend::parallel_tasks(per_tile * tiles, [&](index_t slot, index_t i) {
      const index_t rh = i % per_tile;
      body(sp + slot * s_stride, ap + slot * a_stride, i / per_tile, rh / heads, rh % heads);
    });
  }
};

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
  detail::FlashAttentionSaved<T, B> state;
  state.mask = Tensor<std::uint8_t, B>::from_host({n_rows, n_tok}, key_mask);
  state.lse = Tensor<acc_t, B>::uninitialized({n_rows, hq, n_tok});  // written by the last pass of each query tile
  auto out = Tensor<T, B>::uninitialized(qs);                        // every query tile's first product has beta = 0
  if constexpr (std::is_same_v<B, CpuBackend>) {
    using Row = typename detail::FlashCpu<T>::Row;
    const T* qv = tape.value(q).data();
    const T* kv = tape.value(k).data();
    const T* vv = tape.value(v).data();
    acc_t* lse = state.lse.data();
    T* o = out.data();
    const detail::FlashCpu<T> cpu(n_rows, n_tok, hq, group, dh, ldq, ldk, tile, sc, state.mask.data());
    cpu.query_tasks([&](T* p, acc_t* st, index_t r, index_t h, index_t qi) {
      // Running max m and sum l of exp(S - m) of each query over the key
      // tiles so far; O (in place in the output) rescales by exp(m_old - m_new).
      acc_t* m_run = st;
      acc_t* l_run = st + tile;
      std::fill(m_run, m_run + tile, -HUGE_VAL);
      std::fill(l_run, l_run + tile, 0.0);
      const index_t g = h / group, qo = cpu.q_off(r, h, qi);
      T* op = o + qo;
      for (index_t kj = 0; kj <= qi; ++kj) {
        const auto f = cpu.pair(r, qi, kj);
        const index_t ko = cpu.kv_off(r, g, kj);
        cpu.scores(f, sc, qv + qo, kv + ko, T(0), p);
        for (index_t t = 0; t < f.bq; ++t) {
          T* x = p + t * tile;
          const acc_t m_old = m_run[t], m_new = std::fmax(m_old, f.row_max(x, t));
          const acc_t sum = f.exp_row(x, t, m_new);
          // No allowed key yet: l stays 0 and the output (0 so far) keeps its scale.
          const acc_t c = m_new == -HUGE_VAL ? 1.0 : std::exp(m_old - m_new);
          l_run[t] = l_run[t] * c + sum;
          m_run[t] = m_new;
          if (kj > 0 && c != 1.0) Row(op + t * ldq, dh) *= static_cast<T>(c);
        }
        CpuBackend::gemm(false, false, f.bq, dh, f.bk, T(1), p, tile, vv + ko, ldk, kj == 0 ? T(0) : T(1), op, ldq);
      }
      // O /= l and lse = m + log l; a query with no allowed key keeps O = 0.
      acc_t* ls = lse + cpu.stat(r, h, qi);
      for (index_t t = 0, bq = cpu.extent(qi); t < bq; ++t) {
        const acc_t l = l_run[t];
        Row x(op + t * ldq, dh);
        if (l > 0)
          x = (x.template cast<acc_t>() / l).template cast<T>();
        else
          x.setZero();
        ls[t] = l > 0 ? m_run[t] + std::log(l) : HUGE_VAL;
      }
    });
  } else {
    const T* qv = tape.value(q).data();
    const T* kv = tape.value(k).data();
    const T* vv = tape.value(v).data();
    const std::uint8_t* mask = state.mask.data();
    acc_t* lse = state.lse.data();
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
  const auto saved = save_for_rules(std::move(state));

  auto backward = [&tape, q, k, v, saved, n_rows, n_tok, hq, dh, sc, n_tiles, n_stats, chunk, scratch_elems, prod,
                   tile_of, tile](Var self) {
    const T* go = tape.grad_data(self);
    const T* o = tape.value(self).data();
    const T* qd = tape.value(q).data();
    const T* kd = tape.value(k).data();
    const T* vd = tape.value(v).data();
    const acc_t* lse = saved->lse.data();
    const std::uint8_t* mask = saved->mask.data();
    const bool need_s = tape.requires_grad(q) || tape.requires_grad(k);  // dS feeds dQ and dK
    // Each gradient is assigned tile by tile on first touch (zero-filled
    // instead when operands alias, see attention_grads).
    const auto grads = detail::attention_grads(tape, q, k, v);
    const OutRef<T, B> gq = grads.q, gk = grads.k, gv = grads.v;
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
    if constexpr (std::is_same_v<B, CpuBackend>) {
      const index_t ldq = prod.ldq, ldk = prod.ldk, group = prod.group, tt = tile * tile;
      const detail::FlashCpu<T> cpu(n_rows, n_tok, hq, group, dh, ldq, ldk, tile, sc, mask);
      // The VJP terms of tile pair (qi, kj) of head h: dV_j and dK_j (kv),
      // dQ_i (dq), as asked; first_kv: the pair is dK_j / dV_j's first term.
      auto pair_vjp = [&](T* scratch, index_t r, index_t h, index_t qi, index_t kj, bool kv, bool first_kv, bool dq) {
        T* p = scratch;
        T* ds = scratch + tt;
        const auto f = cpu.pair(r, qi, kj);
        const index_t qo = cpu.q_off(r, h, qi), ko = cpu.kv_off(r, h / group, kj), st = cpu.stat(r, h, qi);
        cpu.probs(f, qd + qo, kd + ko, lse + st, p);
        if (kv && gv.data)  // dV_j += P^T dO
          CpuBackend::gemm(true, false, f.bk, dh, f.bq, T(1), p, tile, go + qo, ldq, gv.fresh && first_kv ? T(0) : T(1),
                           gv.data + ko, ldk);
        const bool dk = kv && gk.data, dqi = dq && gq.data;
        if (!dk && !dqi) return;
        cpu.dscores(f, p, go + qo, vd + ko, dd + st, ds);
        if (dk)  // dK_j += scale dS^T Q
          CpuBackend::gemm(true, false, f.bk, dh, f.bq, sc, ds, tile, qd + qo, ldq, gk.fresh && first_kv ? T(0) : T(1),
                           gk.data + ko, ldk);
        if (dqi)  // dQ_i += scale dS K
          CpuBackend::gemm(false, false, f.bq, dh, f.bk, sc, ds, tile, kd + ko, ldk, gq.fresh && kj == 0 ? T(0) : T(1),
                           gq.data + qo, ldq);
      };
      // One task per (row, KV group) takes every term with P and dS computed
      // once, but leaves threads idle when there are few groups; tasks over
      // key tiles (dK, dV) then query tiles (dQ) compute them twice (7 tile
      // products instead of 5). The first when its idle share costs less.
      const index_t n_groups = n_rows * (hq / group), threads = CpuBackend::num_threads();
      const bool by_group = (n_groups + threads - 1) / threads * threads * 5 <= 7 * n_groups;
      if (by_group && gq.data && (gk.data || gv.data)) {
        cpu.group_tasks([&](T* scratch, index_t r, index_t g) {
          for (index_t h = g * group; h < (g + 1) * group; ++h)
            for (index_t kj = 0; kj < n_tiles; ++kj)
              for (index_t qi = kj; qi < n_tiles; ++qi)
                pair_vjp(scratch, r, h, qi, kj, true, h == g * group && qi == kj, true);
        });
        return;
      }
      if (gk.data || gv.data)  // over the group's heads and query tiles
        cpu.key_tasks([&](T* scratch, index_t r, index_t g, index_t kj) {
          for (index_t h = g * group; h < (g + 1) * group; ++h)
            for (index_t qi = kj; qi < n_tiles; ++qi)
              pair_vjp(scratch, r, h, qi, kj, true, h == g * group && qi == kj, false);
        });
      if (gq.data)  // over the key tiles
        cpu.query_tasks([&](T* scratch, acc_t*, index_t r, index_t h, index_t qi) {
          for (index_t kj = 0; kj <= qi; ++kj) pair_vjp(scratch, r, h, qi, kj, false, false, true);
        });
      return;
    }
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

  auto jvp = [&tape, q, k, v, saved, n_rows, n_tok, hq, dh, sc, n_tiles, n_stats, chunk, scratch_elems, prod, tile_of,
              tile](Var self) {
    const OutRef<T, B> to = tape.tangent_into(self);
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
    if constexpr (std::is_same_v<B, CpuBackend>) {
      using Row = typename detail::FlashCpu<T>::Row;
      using ConstRow = typename detail::FlashCpu<T>::ConstRow;
      const index_t ldq = prod.ldq, ldk = prod.ldk, group = prod.group, tt = tile * tile;
      const detail::FlashCpu<T> cpu(n_rows, n_tok, hq, group, dh, ldq, ldk, tile, sc, mask);
      T* tod = to.data;
      cpu.query_tasks([&](T* scratch, acc_t* c_run, index_t r, index_t h, index_t qi) {
        T* p = scratch;
        T* ts = scratch + tt;
        const index_t qo = cpu.q_off(r, h, qi), bq = cpu.extent(qi);
        T* top = tod + qo;
        for (index_t kj = 0; kj <= qi; ++kj) {
          const auto f = cpu.pair(r, qi, kj);
          const index_t ko = cpu.kv_off(r, h / group, kj);
          cpu.probs(f, qd + qo, kd + ko, lse + cpu.stat(r, h, qi), p);
          T beta = to.fresh && kj == 0 ? T(0) : T(1);  // the query tile's first term assigns
          if (tv) {                                    // tO += P tV
            CpuBackend::gemm(false, false, f.bq, dh, f.bk, T(1), p, tile, tv + ko, ldk, beta, top, ldq);
            beta = T(1);
          }
          if (!need_s) continue;
          T beta_s(0);  // tS = scale (tQ K^T + Q tK^T)
          if (tq) {
            cpu.scores(f, sc, tq + qo, kd + ko, beta_s, ts);
            beta_s = T(1);
          }
          if (tk) cpu.scores(f, sc, qd + qo, tk + ko, beta_s, ts);
          for (index_t t = 0; t < bq; ++t) {  // ts <- P o tS (0 where P is); c += its row sum
            Row x(ts + t * tile, f.bk);
            x *= Row(p + t * tile, f.bk);
            const acc_t sum = x.template cast<acc_t>().sum();
            c_run[t] = kj == 0 ? sum : c_run[t] + sum;
          }
          CpuBackend::gemm(false, false, f.bq, dh, f.bk, T(1), ts, tile, vd + ko, ldk, beta, top,
                           ldq);  // tO += (P o tS) V
        }
        if (!need_s) return;
        for (index_t t = 0; t < bq; ++t) {  // tO -= c o O
          Row x(top + t * ldq, dh);
          x -= (c_run[t] * ConstRow(o + qo + t * ldq, dh).template cast<acc_t>()).template cast<T>();
        }
      });
      return;
    }
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
