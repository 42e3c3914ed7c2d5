// The contract of a backend (docs/architecture.md, "Recipe: a new backend"),
// as a concept: ops, buffers, the Adam code and the probe call only these
// static members, so a type that satisfies it runs every layer above. Each
// backend header asserts it of its own type; the table in the docs says
// what each member must do.
//
// Only primitives are required. The compositions over them (unary and gated
// maps of a functor, the log-softmax passes) are written once in
// tensor/compositions.hpp; a backend may declare members of the same names
// and signatures as optional overrides (CpuBackend's SIMD forms), which the
// ops then run instead.
#pragma once

#include "entropy_probe/core/config.hpp"
#include "entropy_probe/core/error.hpp"
#include "entropy_probe/tensor/batch_grid.hpp"

#include <climits>
#include <concepts>
#include <cstddef>
#include <cstdint>

namespace entropy_probe {

namespace detail {
// Bodies of the probe expressions below: a host/device functor for each loop
// shape, so the concept checks the members' signatures without lambdas.
struct IndexProbe {
  EP_HOST_DEVICE void operator()(index_t) const {}
};
struct GridProbe {
  EP_HOST_DEVICE void operator()(index_t, index_t) const {}
};
struct TermProbe {
  EP_HOST_DEVICE acc_t operator()(index_t) const { return 0; }
};
struct RowTermProbe {
  EP_HOST_DEVICE acc_t operator()(index_t, index_t) const { return 0; }
};
}  // namespace detail

template <class B>
concept TensorBackend = requires(float* f, const float* cf, double* d, const double* cd, std::int32_t* i32, acc_t* acc,
                                 index_t n, const BatchGrid& grid) {
  { B::name } -> std::convertible_to<const char*>;
  { B::host_memory } -> std::convertible_to<bool>;
  { B::batch_scratch_elements } -> std::convertible_to<index_t>;
  { B::default_memory_share } -> std::convertible_to<double>;
  // storage of every element type a tensor or a buffer holds
  { B::template allocate<float>(n).data() } -> std::same_as<float*>;
  { B::template allocate<double>(n).data() } -> std::same_as<double*>;
  { B::template allocate<std::int32_t>(n).data() } -> std::same_as<std::int32_t*>;
  { B::template allocate<std::uint8_t>(n).data() } -> std::same_as<std::uint8_t*>;
  { B::template allocate_uninitialized<float>(n).size() } -> std::convertible_to<std::size_t>;
  B::fill(f, n, 0.0f);
  B::copy(d, cd, n);
  B::upload(i32, static_cast<const std::int32_t*>(i32), n);
  B::download(f, cf, n);
  // loops and reductions
  B::parallel_for(n, detail::IndexProbe{});
  B::parallel_for_2d(n, n, detail::GridProbe{});
  { B::sum(n, detail::TermProbe{}) } -> std::same_as<acc_t>;
  B::row_sum(n, n, detail::RowTermProbe{}, acc);
  B::row_max(n, n, detail::RowTermProbe{}, acc);
  // products
  B::gemm(false, true, n, n, n, 1.0f, cf, n, cf, n, 0.0f, f, n);
  B::gemm(true, false, n, n, n, 1.0, cd, n, cd, n, 1.0, d, n);
  B::gemm_batched(false, false, n, n, n, 1.0f, cf, n, cf, n, 0.0f, f, n, grid);
  // memory accounting (the automatic microbatch size)
  { B::memory_in_use() } -> std::convertible_to<std::size_t>;
  { B::peak_memory() } -> std::convertible_to<std::size_t>;
  B::reset_peak_memory();
  { B::memory_available() } -> std::convertible_to<std::size_t>;
  B::empty_cache();
};

namespace detail {
// The BLAS interfaces (cblas, cuBLAS) take int sizes: a product whose sizes
// or leading dimensions do not fit is a usage error naming them, never a
// silently truncated call.
inline void check_blas_sizes(const char* fn, index_t m, index_t n, index_t k, index_t lda, index_t ldb, index_t ldc,
                             index_t batch = 1) {
  for (index_t v : {m, n, k, lda, ldb, ldc, batch})
    if (v < 0 || v > INT_MAX)
      fail<UsageError>("{}(m={}, n={}, k={}, lda={}, ldb={}, ldc={}, batch={}): a size is outside [0, INT_MAX]", fn, m,
                       n, k, lda, ldb, ldc, batch);
}
}  // namespace detail

}  // namespace entropy_probe
