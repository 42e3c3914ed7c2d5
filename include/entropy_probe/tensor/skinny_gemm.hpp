// C = alpha X W^T + beta C in float for a few rows of X: the products of a
// decode step (one token per sampled row through every linear layer and the
// head), where W is a whole weight matrix and X holds 1 to 64 rows.
//
// There the BLAS spends most of its time packing W into its panel layout,
// a copy it then reads once (perf: 43% of a Qwen2.5-0.5B sampling run in
// sgemm_incopy, 27% in the kernel). This kernel reads W where it lies
// instead: a tile of 4 rows of W against 4 rows of X, 16 vector accumulators
// of dot products along k, summed across lanes at the end of the tile by one
// shuffle tree; the tile's W rows are re-read from L1 for the next 4 rows of
// X, so W streams from memory once, and the next tile's rows are prefetched
// while the first rows of X run. docs/performance.md, The sampler, has the
// measurements.
//
// Run-time dispatch as in tensor/simd.hpp (the build targets baseline
// x86-64): an AVX-512 body (16 floats per vector) and an AVX2 + FMA body
// (8), selected by what the CPU reports; on other CPUs, compilers and under
// nvcc, skinny_gemm_isa() is none and CpuBackend::gemm uses the BLAS.
// Sums run in a different order than the BLAS's, so results differ from it
// by float rounding (tests/tensor/test_skinny_gemm.cpp bounds the error).
#pragma once

#include "entropy_probe/core/config.hpp"

#if defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__) && defined(__x86_64__) && \
    !defined(ENTROPY_PROBE_NO_SIMD_DISPATCH)
#define EP_SKINNY_GEMM 1
#endif

namespace entropy_probe::simd {

enum class SkinnyIsa { none, avx2, avx512 };

// The widest body this CPU runs.
inline SkinnyIsa skinny_gemm_isa() {
#if defined(EP_SKINNY_GEMM)
  static const SkinnyIsa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq"))
      return SkinnyIsa::avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return SkinnyIsa::avx2;
    return SkinnyIsa::none;
  }();
  return isa;
#else
  return SkinnyIsa::none;
#endif
}

// X rows the kernel takes; above it the BLAS's packed panels pay off.
inline constexpr index_t kSkinnyMaxRows = 64;
// Rows of W per tile: CpuBackend::gemm splits n across threads in multiples of it.
inline constexpr index_t kSkinnyTileRows = 4;

#if defined(EP_SKINNY_GEMM)
namespace skinny_detail {

template <int V>
struct Lanes {
  typedef float vec __attribute__((vector_size(V * 4)));
  typedef float unaligned __attribute__((vector_size(V * 4), aligned(4)));
};

// Lane l of *out: the sum of the lanes of v[l] (V vectors of V lanes). Each
// level halves the partial sums per accumulator and doubles the accumulators
// per vector. (Vectors pass by pointer: these inline into the target bodies,
// and a vector by value would change the baseline ABI.)
[[gnu::always_inline]] inline void reduce_lanes(const Lanes<16>::vec* v, Lanes<16>::vec* out) {
  using vf = Lanes<16>::vec;
  vf a[8], b[4], c[2];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i)
    a[i] =
        __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
        __builtin_shufflevector(v[2 * i], v[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i)
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i)
    c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           __builtin_shufflevector(b[2 * i], b[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  *out = __builtin_shufflevector(c[0], c[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(c[0], c[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}
[[gnu::always_inline]] inline void reduce_lanes(const Lanes<8>::vec* v, Lanes<8>::vec* out) {
  using vf = Lanes<8>::vec;
  vf a[4], b[2];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i)
    a[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11) +
           __builtin_shufflevector(v[2 * i], v[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15);
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i)
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15);
  *out = __builtin_shufflevector(b[0], b[1], 0, 2, 4, 6, 8, 10, 12, 14) +
         __builtin_shufflevector(b[0], b[1], 1, 3, 5, 7, 9, 11, 13, 15);
}

// The rem < V elements at p in the low lanes of *out, zeros above (the k tail).
template <int V>
[[gnu::always_inline]] inline void load_tail(const float* p, index_t rem, typename Lanes<V>::vec* out) {
  *out = typename Lanes<V>::vec{};
  for (index_t l = 0; l < rem; ++l) (*out)[l] = p[l];
}

// C[i, j] for MB rows of X and NB rows of W (MB * NB <= V accumulators, the
// unused ones zero). Prefetch > 0: also fetch the W rows `Prefetch` tiles on.
template <int V, int MB, int NB, int Prefetch>
[[gnu::always_inline]] inline void tile(index_t k, float alpha, const float* x, index_t ldx, const float* w,
                                        index_t ldw, float beta, float* c, index_t ldc) {
  using vf = typename Lanes<V>::vec;
  using uf = typename Lanes<V>::unaligned;
  static_assert(MB * NB <= V);
  vf acc[V];
#pragma GCC unroll 16
  for (int a = 0; a < V; ++a) acc[a] = vf{};
  index_t kk = 0;
  for (; kk + V <= k; kk += V) {
    vf wv[NB];
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) wv[j] = *reinterpret_cast<const uf*>(w + j * ldw + kk);
    if constexpr (Prefetch > 0) {
#pragma GCC unroll 8
      for (int j = 0; j < NB; ++j) __builtin_prefetch(w + (NB * Prefetch + j) * ldw + kk, 0, 2);
    }
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) {
      const vf xv = *reinterpret_cast<const uf*>(x + i * ldx + kk);
#pragma GCC unroll 8
      for (int j = 0; j < NB; ++j) acc[i * NB + j] += xv * wv[j];
    }
  }
  if (kk < k) {
    vf wv[NB];
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) load_tail<V>(w + j * ldw + kk, k - kk, &wv[j]);
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) {
      vf xv;
      load_tail<V>(x + i * ldx + kk, k - kk, &xv);
#pragma GCC unroll 8
      for (int j = 0; j < NB; ++j) acc[i * NB + j] += xv * wv[j];
    }
  }
  vf s;
  reduce_lanes(acc, &s);
#pragma GCC unroll 8
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) {
      float& out = c[i * ldc + j];
      out = beta == 0.0f ? alpha * s[i * NB + j] : beta * out + alpha * s[i * NB + j];
    }
}

// Rows [n0, n1) of W against all m rows of X.
template <int V, int MB, int NB>
[[gnu::always_inline]] inline void body(index_t m, index_t n0, index_t n1, index_t k, float alpha, const float* x,
                                        index_t ldx, const float* w, index_t ldw, float beta, float* c, index_t ldc) {
  index_t n = n0;
  for (; n + NB <= n1; n += NB) {
    const float* wn = w + n * ldw;
    index_t i = 0;
    if (i + MB <= m && n + 2 * NB <= n1) {  // the first rows of X also fetch the next tile's W
      tile<V, MB, NB, 1>(k, alpha, x, ldx, wn, ldw, beta, c + n, ldc);
      i += MB;
    }
    for (; i + MB <= m; i += MB) tile<V, MB, NB, 0>(k, alpha, x + i * ldx, ldx, wn, ldw, beta, c + i * ldc + n, ldc);
    for (; i < m; ++i) tile<V, 1, NB, 0>(k, alpha, x + i * ldx, ldx, wn, ldw, beta, c + i * ldc + n, ldc);
  }
  for (; n < n1; ++n)
    for (index_t i = 0; i < m; ++i)
      tile<V, 1, 1, 0>(k, alpha, x + i * ldx, ldx, w + n * ldw, ldw, beta, c + i * ldc + n, ldc);
}

__attribute__((target("arch=x86-64-v4"))) inline void body_avx512(index_t m, index_t n0, index_t n1, index_t k,
                                                                  float alpha, const float* x, index_t ldx,
                                                                  const float* w, index_t ldw, float beta, float* c,
                                                                  index_t ldc) {
  body<16, 4, 4>(m, n0, n1, k, alpha, x, ldx, w, ldw, beta, c, ldc);
}
__attribute__((target("arch=x86-64-v3"))) inline void body_avx2(index_t m, index_t n0, index_t n1, index_t k,
                                                                float alpha, const float* x, index_t ldx,
                                                                const float* w, index_t ldw, float beta, float* c,
                                                                index_t ldc) {
  body<8, 4, 2>(m, n0, n1, k, alpha, x, ldx, w, ldw, beta, c, ldc);
}

}  // namespace skinny_detail
#endif

// Columns [n0, n1) of C = alpha X W^T + beta C (X [m, k], W [n, k], row
// major with leading dimensions) with the `isa` body; beta = 0 assigns.
// isa must be one this CPU runs (skinny_gemm_isa() or a narrower one).
inline void skinny_gemm(SkinnyIsa isa, index_t m, index_t n0, index_t n1, index_t k, float alpha, const float* x,
                        index_t ldx, const float* w, index_t ldw, float beta, float* c, index_t ldc) {
#if defined(EP_SKINNY_GEMM)
  if (isa == SkinnyIsa::avx512) return skinny_detail::body_avx512(m, n0, n1, k, alpha, x, ldx, w, ldw, beta, c, ldc);
  if (isa == SkinnyIsa::avx2) return skinny_detail::body_avx2(m, n0, n1, k, alpha, x, ldx, w, ldw, beta, c, ldc);
#endif
  (void)isa, (void)m, (void)n0, (void)n1, (void)k, (void)alpha, (void)x, (void)ldx, (void)w, (void)ldw, (void)beta,
      (void)c, (void)ldc;
}

}  // namespace entropy_probe::simd
