// The CPU backend: host memory, Eigen for linear algebra, and a BLAS (cblas)
// for the large matrix products when ENTROPY_PROBE_USE_CBLAS is defined.
//
// A backend is a type with static primitives; ops are written once against
// them (gemm and its strided-batched form, parallel_for / parallel_for_2d
// over a host/device functor, double-accumulated sums and row reductions),
// so a second backend (CUDA, tensor/cuda_backend.hpp) only has to supply the
// same primitives.
#pragma once

#include "entropy_probe/core/config.hpp"

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(ENTROPY_PROBE_USE_CBLAS)
#include <cblas.h>
#endif

namespace entropy_probe {

struct CpuBackend {
  static constexpr const char* name = "cpu";
  // Tensor data is ordinary host memory (Tensor::operator[] works).
  static constexpr bool host_memory = true;
  // Elements of scratch an op may use to batch independent small products
  // into one call (attention's per-row products). 0: one at a time, which
  // keeps the scratch small and hot in cache.
  static constexpr index_t batch_scratch_elements = 0;

  template <class T>
  using Storage = std::vector<T>;

  // Zero-initialised storage of n elements.
  template <class T>
  static Storage<T> allocate(index_t n) {
    return Storage<T>(static_cast<std::size_t>(n), T(0));
  }

  template <class T>
  static void fill(T* dst, index_t n, T value) {
    std::fill(dst, dst + n, value);
  }

  template <class T>
  static void copy(T* dst, const T* src, index_t n) {
    if (n > 0) std::memcpy(dst, src, static_cast<std::size_t>(n) * sizeof(T));
  }

  template <class T>
  static void upload(T* dst, const T* host_src, index_t n) {
    copy(dst, host_src, n);
  }
  template <class T>
  static void download(T* host_dst, const T* src, index_t n) {
    copy(host_dst, src, n);
  }

  // f(i) for i in [0, n). The body is a host/device functor.
  template <class F>
  static void parallel_for(index_t n, F&& f) {
    for (index_t i = 0; i < n; ++i) f(i);
  }

  // f(r, j) for r in [0, rows), j in [0, cols): element-parallel work on
  // rows (no index division on either backend).
  template <class F>
  static void parallel_for_2d(index_t rows, index_t cols, F&& f) {
    for (index_t r = 0; r < rows; ++r)
      for (index_t j = 0; j < cols; ++j) f(r, j);
  }

  // sum of f(i) over [0, n), accumulated in double.
  template <class F>
  static acc_t sum(index_t n, F&& f) {
    acc_t s = 0;
    for (index_t i = 0; i < n; ++i) s += static_cast<acc_t>(f(i));
    return s;
  }

  // Row reductions in double into backend memory: out[r] = sum_j f(r, j) or
  // max_j f(r, j) (std::fmax, so NaN is skipped; -inf when cols == 0).
  template <class F>
  static void row_sum(index_t rows, index_t cols, F&& f, acc_t* out) {
    for (index_t r = 0; r < rows; ++r) {
      acc_t s = 0;
      for (index_t j = 0; j < cols; ++j) s += static_cast<acc_t>(f(r, j));
      out[r] = s;
    }
  }
  template <class F>
  static void row_max(index_t rows, index_t cols, F&& f, acc_t* out) {
    for (index_t r = 0; r < rows; ++r) {
      acc_t m = -std::numeric_limits<acc_t>::infinity();
      for (index_t j = 0; j < cols; ++j) m = std::fmax(m, static_cast<acc_t>(f(r, j)));
      out[r] = m;
    }
  }

  // Row-major C[m,n] = alpha * op(A)[m,k] * op(B)[k,n] + beta * C.
  // op(A) = A (A is [m,k], leading dim lda) or A^T (A is [k,m]).
  template <class T>
  static void gemm(bool trans_a, bool trans_b, index_t m, index_t n, index_t k, T alpha, const T* a, index_t lda,
                   const T* b, index_t ldb, T beta, T* c, index_t ldc) {
    if (m == 0 || n == 0) return;
    if (k == 0) {
      scale_matrix(m, n, beta, c, ldc);
      return;
    }
#if defined(ENTROPY_PROBE_USE_CBLAS)
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
      const auto ta = trans_a ? CblasTrans : CblasNoTrans;
      const auto tb = trans_b ? CblasTrans : CblasNoTrans;
      if constexpr (std::is_same_v<T, float>) {
        cblas_sgemm(CblasRowMajor, ta, tb, int(m), int(n), int(k), alpha, a, int(lda), b, int(ldb), beta, c, int(ldc));
      } else {
        cblas_dgemm(CblasRowMajor, ta, tb, int(m), int(n), int(k), alpha, a, int(lda), b, int(ldb), beta, c, int(ldc));
      }
      return;
    }
#endif
    eigen_gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }

  // `batch` independent products C_i = alpha op(A_i) op(B_i) + beta C_i with
  // X_i = x + i * stride_x (leading dimensions as in gemm).
  template <class T>
  static void gemm_strided_batched(bool trans_a, bool trans_b, index_t m, index_t n, index_t k, T alpha, const T* a,
                                   index_t lda, index_t stride_a, const T* b, index_t ldb, index_t stride_b, T beta,
                                   T* c, index_t ldc, index_t stride_c, index_t batch) {
    for (index_t i = 0; i < batch; ++i)
      gemm(trans_a, trans_b, m, n, k, alpha, a + i * stride_a, lda, b + i * stride_b, ldb, beta, c + i * stride_c, ldc);
  }

  // Eigen's own product, used when no BLAS is configured (and by the
  // benchmark that compares the two).
  template <class T>
  static void eigen_gemm(bool trans_a, bool trans_b, index_t m, index_t n, index_t k, T alpha, const T* a, index_t lda,
                         const T* b, index_t ldb, T beta, T* c, index_t ldc) {
    using Mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    using Stride = Eigen::OuterStride<>;
    using CMap = Eigen::Map<const Mat, 0, Stride>;
    using MMap = Eigen::Map<Mat, 0, Stride>;
    MMap C(c, m, n, Stride(ldc));
    if (beta == T(0)) {
      C.setZero();
    } else if (beta != T(1)) {
      C *= beta;
    }
    CMap A(a, trans_a ? k : m, trans_a ? m : k, Stride(lda));
    CMap Bm(b, trans_b ? n : k, trans_b ? k : n, Stride(ldb));
    if (!trans_a && !trans_b) {
      C.noalias() += alpha * (A * Bm);
    } else if (!trans_a && trans_b) {
      C.noalias() += alpha * (A * Bm.transpose());
    } else if (trans_a && !trans_b) {
      C.noalias() += alpha * (A.transpose() * Bm);
    } else {
      C.noalias() += alpha * (A.transpose() * Bm.transpose());
    }
  }

 private:
  template <class T>
  static void scale_matrix(index_t m, index_t n, T beta, T* c, index_t ldc) {
    for (index_t i = 0; i < m; ++i)
      for (index_t j = 0; j < n; ++j) c[i * ldc + j] = beta == T(0) ? T(0) : beta * c[i * ldc + j];
  }
};

}  // namespace entropy_probe
