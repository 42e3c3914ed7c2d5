// Dense products on contiguous row-major operands, with leading dimensions
// implied by the shapes. Thin wrappers over the backend's gemm so the op
// headers read like the math.
#pragma once

#include "entropy_probe/core/config.hpp"

namespace entropy_probe::blas {

// C[m,n] = alpha * A[m,k] * B[k,n] + beta * C
template <class B, class T>
void mm_nn(index_t m, index_t n, index_t k, T alpha, const T* a, const T* b, T beta, T* c) {
  B::gemm(false, false, m, n, k, alpha, a, k, b, n, beta, c, n);
}
// C[m,n] = alpha * A[m,k] * B[n,k]^T + beta * C
template <class B, class T>
void mm_nt(index_t m, index_t n, index_t k, T alpha, const T* a, const T* b, T beta, T* c) {
  B::gemm(false, true, m, n, k, alpha, a, k, b, k, beta, c, n);
}
// C[m,n] = alpha * A[k,m]^T * B[k,n] + beta * C
template <class B, class T>
void mm_tn(index_t m, index_t n, index_t k, T alpha, const T* a, const T* b, T beta, T* c) {
  B::gemm(true, false, m, n, k, alpha, a, m, b, n, beta, c, n);
}

// y[i] += alpha * x[i]
template <class B, class T>
void axpy(index_t n, T alpha, const T* x, T* y) {
  B::parallel_for(n, [=] EP_HOST_DEVICE(index_t i) { y[i] += alpha * x[i]; });
}

// sum_i x[i] * y[i], accumulated in double.
template <class B, class T, class U>
acc_t dot(index_t n, const T* x, const U* y) {
  return B::sum(n, [=] EP_HOST_DEVICE(index_t i) { return static_cast<acc_t>(x[i]) * static_cast<acc_t>(y[i]); });
}

// out[j] += alpha * sum_i x[i, j] over rows of x[rows, cols], in double.
template <class B, class T>
void add_column_sums(index_t rows, index_t cols, T alpha, const T* x, T* out) {
  B::parallel_for(cols, [=] EP_HOST_DEVICE(index_t j) {
    acc_t s = 0;
    for (index_t i = 0; i < rows; ++i) s += x[i * cols + j];
    out[j] += alpha * static_cast<T>(s);
  });
}

// y[i, j] += b[j] for rows of y[rows, cols]
template <class B, class T>
void add_row_vector(index_t rows, index_t cols, const T* b, T* y) {
  B::parallel_for_2d(rows, cols, [=] EP_HOST_DEVICE(index_t r, index_t j) { y[r * cols + j] += b[j]; });
}

}  // namespace entropy_probe::blas
