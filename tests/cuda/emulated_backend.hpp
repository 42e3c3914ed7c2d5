// A stand-in for a device backend that runs on the CPU, so the CUDA parity
// tests' harness and tolerances can be exercised on a machine without a GPU
// (test_backend_emulated). It differs from CpuBackend where CudaBackend does:
//   * host_memory is false: Tensor::operator[] does not compile on it, so an
//     op or probe phase that indexes a tensor on the host fails to build here
//     exactly as it would under nvcc;
//   * ops batch small products as on a device (batch_scratch_elements), so
//     attention runs all rows per strided-batched call;
//   * the compositions (unary and gated maps, the log-softmax passes) run
//     the generic forms of tensor/compositions.hpp over this backend's
//     primitives, as CudaBackend's do, not the CPU's SIMD overrides it
//     inherits (generic_compositions below);
//   * sums and row reductions add in a blocked order, like a GPU's block
//     reduction, and matrix products use Eigen instead of the CPU backend's
//     BLAS, so results differ from CpuBackend by rounding, as CUDA's do.
#pragma once

#include <entropy_probe/tensor/cpu_backend.hpp>

#include <cmath>
#include <limits>
#include <utility>

namespace ep_parity {

struct EmulatedDeviceBackend : entropy_probe::CpuBackend {
  using index_t = entropy_probe::index_t;
  using acc_t = entropy_probe::acc_t;

  static constexpr const char* name = "emulated";
  static constexpr bool host_memory = false;
  static constexpr index_t batch_scratch_elements = index_t(1) << 26;
  // The ops' dispatch skips the inherited overrides (unary_map, softmax_lse, ...).
  static constexpr bool generic_compositions = true;

  // 8 interleaved partial sums (like threads of a block), then added up.
  template <class F>
  static acc_t sum(index_t n, F&& f) {
    acc_t part[8] = {};
    for (index_t i = 0; i < n; ++i) part[i % 8] += static_cast<acc_t>(f(i));
    acc_t s = 0;
    for (acc_t p : part) s += p;
    return s;
  }
  template <class F>
  static void row_sum(index_t rows, index_t cols, F&& f, acc_t* out) {
    for (index_t r = 0; r < rows; ++r) out[r] = sum(cols, [&](index_t j) { return f(r, j); });
  }

  // The fused row passes with their reductions in the blocked order above.
  template <class L, class F, class Fin, class G>
  static void row_sum_apply(index_t rows, index_t cols, L&& len, F&& f, Fin&& fin, G&& g) {
    for (index_t r = 0; r < rows; ++r) {
      const acc_t a = fin(r, sum(len(r), [&](index_t j) { return f(r, j); }));
      for (index_t j = 0; j < cols; ++j) g(r, j, a);
    }
  }
  template <class L, class FM, class FS, class G>
  static void row_max_sum_apply(index_t rows, index_t cols, L&& len, FM&& fm, FS&& fs, G&& g) {
    for (index_t r = 0; r < rows; ++r) {
      const index_t n = len(r);
      acc_t m = -std::numeric_limits<acc_t>::infinity();
      for (index_t j = n; j-- > 0;) m = std::fmax(m, static_cast<acc_t>(fm(r, j)));
      const acc_t s = sum(n, [&](index_t j) { return fs(r, j, m); });
      for (index_t j = 0; j < cols; ++j) g(r, j, m, s);
    }
  }

  template <class T>
  static void gemm(bool trans_a, bool trans_b, index_t m, index_t n, index_t k, T alpha, const T* a, index_t lda,
                   const T* b, index_t ldb, T beta, T* c, index_t ldc) {
    if (m == 0 || n == 0) return;
    if (k == 0) {
      for (index_t i = 0; i < m; ++i)
        for (index_t j = 0; j < n; ++j) c[i * ldc + j] = beta == T(0) ? T(0) : beta * c[i * ldc + j];
      return;
    }
    eigen_gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }
  template <class T>
  static void gemm_batched(bool trans_a, bool trans_b, index_t m, index_t n, index_t k, T alpha, const T* a,
                           index_t lda, const T* b, index_t ldb, T beta, T* c, index_t ldc,
                           const entropy_probe::BatchGrid& grid) {
    for (index_t i = grid.count(); i-- > 0;) {  // last item first: no op may depend on the order
      index_t oa, ob, oc;
      grid.offsets(i, oa, ob, oc);
      gemm(trans_a, trans_b, m, n, k, alpha, a + oa, lda, b + ob, ldb, beta, c + oc, ldc);
    }
  }
};

}  // namespace ep_parity
