// The CPU backend's primitives against plain scalar references: the SIMD
// array forms of the shared functors, the softmax passes (and the generic
// compositions that CUDA runs instead), the threaded loops and the caching
// allocator.
#include <entropy_probe/tensor/compositions.hpp>
#include <entropy_probe/tensor/cpu_backend.hpp>
#include <entropy_probe/tensor/functors.hpp>
#include <entropy_probe/tensor/tensor.hpp>

#include <catch2/catch.hpp>

#include <climits>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

using namespace entropy_probe;

namespace {

template <class T>
std::vector<T> test_points() {
  std::vector<T> x{0, -0.0, 1e-30, -1e-30, 0.5, -0.5, 3, -3, 10, -10, 40, -40, 90, -90, 200, -200, 1e4, -1e4};
  std::mt19937_64 rng(5);
  std::normal_distribution<double> nd(0.0, 4.0);
  for (int i = 0; i < 5000; ++i) x.push_back(static_cast<T>(nd(rng)));
  return x;
}

// Max error of a against b, relative where |b| > 1, absolute below.
template <class T>
double max_err(const std::vector<T>& a, const std::vector<T>& b) {
  double e = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    REQUIRE(std::isfinite(static_cast<double>(a[i])));
    e = std::max(e, std::abs(double(a[i]) - double(b[i])) / std::max(1.0, std::abs(double(b[i]))));
  }
  return e;
}

// The array forms in T against the scalar forms evaluated in double.
template <class F, class T>
void check_functor_arrays(double tol) {
  const std::vector<T> x = test_points<T>();
  const auto n = static_cast<index_t>(x.size());
  std::vector<T> f_ref(x.size()), df_ref(x.size()), g(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) {
    f_ref[i] = static_cast<T>(F::f(static_cast<double>(x[i])));
    df_ref[i] = static_cast<T>(F::df(static_cast<double>(x[i])));
    g[i] = T(0.25) * static_cast<T>(i % 7) - T(0.5);
  }
  std::vector<T> gx_ref(x.size()), ty_ref(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) {
    gx_ref[i] = T(1) + g[i] * df_ref[i];
    ty_ref[i] = df_ref[i] * g[i];
  }
  for (const bool use_generic : {false, true}) {  // CpuBackend's overrides, then the generic compositions (CUDA's)
    CAPTURE(use_generic);
    std::vector<T> y(x.size()), gx(x.size(), T(1)), ty(x.size());  // gx: the VJP accumulates onto 1
    if (use_generic) {
      generic::unary_map<F, CpuBackend>(n, x.data(), y.data());
      generic::unary_vjp<F, CpuBackend>(n, x.data(), g.data(), gx.data(), false);
      generic::unary_jvp<F, CpuBackend>(n, x.data(), g.data(), ty.data());
    } else {
      CpuBackend::unary_map<F>(n, x.data(), y.data());
      CpuBackend::unary_vjp<F>(n, x.data(), g.data(), gx.data());
      CpuBackend::unary_jvp<F>(n, x.data(), g.data(), ty.data());
    }
    CHECK(max_err(y, f_ref) < tol);
    CHECK(max_err(gx, gx_ref) < tol);
    CHECK(max_err(ty, ty_ref) < tol);
  }
}

// The three softmax passes through CpuBackend's overrides or, with
// `use_generic`, the generic compositions (what CUDA runs).
template <class T>
void softmax_passes(bool use_generic, index_t m, index_t V, const T* z, const std::int32_t* rows,
                    const std::int32_t* targets, const T* g, const T* t, acc_t s, acc_t* lse, acc_t* dot, T* gz,
                    T* z_in_place) {
  if (use_generic) {
    generic::softmax_lse<CpuBackend>(m, V, z, rows, s, lse);
    generic::softmax_dot<CpuBackend>(m, V, z, rows, lse, s, t, dot);
    generic::softmax_vjp<CpuBackend>(m, V, z, rows, targets, lse, g, s, gz, false);
    generic::softmax_vjp<CpuBackend>(m, V, z_in_place, rows, targets, lse, g, s, z_in_place, true);
  } else {
    CpuBackend::softmax_lse(m, V, z, rows, s, lse);
    CpuBackend::softmax_dot(m, V, z, rows, lse, s, t, dot);
    CpuBackend::softmax_vjp(m, V, z, rows, targets, lse, g, s, gz, false);
    CpuBackend::softmax_vjp(m, V, z_in_place, rows, targets, lse, g, s, z_in_place, true);
  }
}

}  // namespace

TEST_CASE("functors: the SIMD array forms agree with the scalar forms", "[tensor][functors]") {
  check_functor_arrays<Silu, double>(1e-14);
  check_functor_arrays<GeluTanh, double>(1e-14);
  // float: the scalar float forms themselves are off by up to 7.9e-7 here
  // (Silu') on these points; the array forms measured 7.9e-7 and 1.7e-7.
  check_functor_arrays<Silu, float>(1e-6);
  check_functor_arrays<GeluTanh, float>(1e-6);
}

TEST_CASE("softmax passes match a scalar double reference", "[tensor][softmax]") {
  const index_t V = 5000, n_rows = 5;  // V spans several chunks
  std::mt19937_64 rng(9);
  std::normal_distribution<double> nd(0.0, 3.0);
  std::vector<double> zd(static_cast<std::size_t>(n_rows * V)), td(zd.size());
  for (auto& v : zd) v = nd(rng);
  for (auto& v : td) v = nd(rng);
  zd[3 * V + 17] = 60;  // one dominant logit
  const std::vector<std::int32_t> rows{4, 0, 3}, targets{2, 4999, 17};
  const std::vector<double> g{0.0, 0.0, 0.0, -1.5, 0.7};  // per row of z
  const double s = 1.0 / 0.7;
  const auto m = static_cast<index_t>(rows.size());

  std::vector<double> lse_ref(3), dot_ref(3), gz_ref(zd.size(), 0.5);
  std::vector<double> in_place_ref = zd;  // softmax_vjp with assign over z itself: listed rows overwritten
  for (std::size_t k = 0; k < 3; ++k) {
    const double* z = zd.data() + rows[k] * V;
    double mx = -INFINITY;
    for (index_t j = 0; j < V; ++j) mx = std::max(mx, z[j] * s);
    double sum = 0;
    for (index_t j = 0; j < V; ++j) sum += std::exp(z[j] * s - mx);
    lse_ref[k] = mx + std::log(sum);
    double dot = 0;
    for (index_t j = 0; j < V; ++j) {
      const double p = std::exp(z[j] * s - lse_ref[k]);
      dot += p * td[static_cast<std::size_t>(rows[k] * V + j)];
      const double v = g[static_cast<std::size_t>(rows[k])] * s * ((j == targets[k]) - p);
      gz_ref[static_cast<std::size_t>(rows[k] * V + j)] += v;
      in_place_ref[static_cast<std::size_t>(rows[k] * V + j)] = v;
    }
    dot_ref[k] = dot;
  }

  const bool use_generic = GENERATE(false, true);  // CpuBackend's overrides, then the generic compositions
  CAPTURE(use_generic);
  SECTION("double") {
    std::vector<double> lse(3), dot(3), gz(zd.size(), 0.5), in_place = zd;
    softmax_passes(use_generic, m, V, zd.data(), rows.data(), targets.data(), g.data(), td.data(), s, lse.data(),
                   dot.data(), gz.data(), in_place.data());
    CHECK(max_err(lse, lse_ref) < 1e-14);
    CHECK(max_err(dot, dot_ref) < 1e-13);
    CHECK(max_err(gz, gz_ref) < 1e-14);              // rows not listed stay at 0.5
    CHECK(max_err(in_place, in_place_ref) < 1e-14);  // rows not listed keep their logits
  }
  SECTION("float") {
    std::vector<float> zf(zd.begin(), zd.end()), tf(td.begin(), td.end()), gf(g.begin(), g.end());
    std::vector<float> gz(zd.size(), 0.5f), in_place = zf;
    std::vector<double> lse(3), dot(3);
    softmax_passes(use_generic, m, V, zf.data(), rows.data(), targets.data(), gf.data(), tf.data(), s, lse.data(),
                   dot.data(), gz.data(), in_place.data());
    CHECK(max_err(lse, lse_ref) < 1e-6);
    CHECK(max_err(dot, dot_ref) < 1e-5);
    CHECK(max_err(gz, std::vector<float>(gz_ref.begin(), gz_ref.end())) < 1e-6);
    CHECK(max_err(in_place, std::vector<float>(in_place_ref.begin(), in_place_ref.end())) < 1e-6);
  }
}

TEST_CASE("threaded loops give the serial results for every thread count", "[tensor][threads]") {
  const int before = CpuBackend::num_threads();
  const index_t n = 100003, rows = 37, cols = 2501;
  std::vector<std::vector<double>> results;
  for (int threads : {1, 2, 3, 8}) {
    CpuBackend::set_num_threads(threads);
    REQUIRE(CpuBackend::num_threads() == threads);
    std::vector<double> a(static_cast<std::size_t>(n)), b(static_cast<std::size_t>(rows * cols)), rs(rows), rm(rows);
    double* ap = a.data();
    double* bp = b.data();
    CpuBackend::parallel_for(n, [=](index_t i) { ap[i] = std::sin(0.001 * double(i)); });
    CpuBackend::parallel_for_2d(rows, cols,
                                [=](index_t r, index_t j) { bp[r * cols + j] = double(r) - 1e-3 * double(j); });
    CpuBackend::row_sum(
        rows, cols, [=](index_t r, index_t j) { return bp[r * cols + j]; }, rs.data());
    CpuBackend::row_max(
        rows, cols, [=](index_t r, index_t j) { return -bp[r * cols + j]; }, rm.data());
    std::vector<double> all = a;
    all.insert(all.end(), b.begin(), b.end());
    all.insert(all.end(), rs.begin(), rs.end());
    all.insert(all.end(), rm.begin(), rm.end());
    results.push_back(all);
  }
  for (std::size_t k = 1; k < results.size(); ++k) CHECK(results[k] == results[0]);  // bit-identical
  CHECK(results[0][5] == std::sin(0.005));
  CpuBackend::set_num_threads(before);
  REQUIRE_THROWS_WITH(CpuBackend::set_num_threads(0), Catch::Contains("need at least 1"));
}

TEST_CASE("host allocator: aligned, zero-filled, freed blocks reused and bounded", "[tensor][allocator]") {
  CpuBackend::empty_cache();
  CHECK(CpuBackend::cached_bytes() == 0);
  const void* first = nullptr;
  {
    Tensor<float> a({1000, 100});  // 400 kB: a cached size
    CHECK(reinterpret_cast<std::uintptr_t>(a.data()) % 64 == 0);
    for (index_t i = 0; i < a.numel(); ++i) a[i] = 3.0f;
    first = a.data();
  }
  CHECK(CpuBackend::cached_bytes() >= 400000);
  {
    Tensor<float> b({100, 1000});  // same size class: the same block, zeroed again
    CHECK(static_cast<const void*>(b.data()) == first);
    bool zero = true;
    for (index_t i = 0; i < b.numel(); ++i) zero = zero && b[i] == 0.0f;
    CHECK(zero);
    CHECK(CpuBackend::cached_bytes() == 0);
    Tensor<float> copy = b;  // deep copy
    copy[0] = 1.0f;
    CHECK(b[0] == 0.0f);
  }
  Tensor<double> small({3});
  CHECK(reinterpret_cast<std::uintptr_t>(small.data()) % 64 == 0);
  CpuBackend::set_cache_limit(0);  // caching off: freed blocks go straight back
  { Tensor<float> c({1000, 100}); }
  CHECK(CpuBackend::cached_bytes() == 0);
  CpuBackend::set_cache_limit(std::size_t(2) << 30);
  { Tensor<float> d({1000, 100}); }
  CHECK(CpuBackend::cached_bytes() > 0);
  CpuBackend::empty_cache();
  CHECK(CpuBackend::cached_bytes() == 0);
}

TEST_CASE("host allocator: bytes in use and their peak, cached blocks not in use", "[tensor][allocator][memory]") {
  detail::MemoryCounter counter;
  counter.allocated(10);
  counter.allocated(5);
  counter.released(10);
  CHECK(counter.in_use() == 5);
  CHECK(counter.peak() == 15);
  counter.reset_peak();
  CHECK(counter.peak() == 5);

  const std::size_t start = CpuBackend::memory_in_use();
  CpuBackend::reset_peak_memory();
  {
    Tensor<float> a({1024, 256});  // 1 MiB, a size class of its own
    CHECK(CpuBackend::memory_in_use() == start + (std::size_t(1) << 20));
  }
  // Freed into the cache: no longer in use; taken from the cache: in use again.
  CHECK(CpuBackend::cached_bytes() >= std::size_t(1) << 20);
  CHECK(CpuBackend::memory_in_use() == start);
  {
    Tensor<float> b({256, 1024});
    CHECK(CpuBackend::memory_in_use() == start + (std::size_t(1) << 20));
    CpuBackend::empty_cache();  // frees only the cached blocks
    CHECK(CpuBackend::memory_in_use() == start + (std::size_t(1) << 20));
  }
  CHECK(CpuBackend::memory_in_use() == start);
  CHECK(CpuBackend::peak_memory() == start + (std::size_t(1) << 20));
  CHECK(CpuBackend::memory_available() > 0);
}

namespace {
// A backend missing one member of the contract (no gemm_batched).
struct IncompleteBackend {
  static constexpr const char* name = "incomplete";
};
}  // namespace

TEST_CASE("backend contract: CpuBackend meets it, an incomplete type does not", "[tensor][backend]") {
  STATIC_REQUIRE(TensorBackend<CpuBackend>);
  STATIC_REQUIRE_FALSE(TensorBackend<IncompleteBackend>);
  STATIC_REQUIRE_FALSE(TensorBackend<int>);
}

TEST_CASE("gemm: sizes beyond the BLAS's int are a usage error, not a truncated call", "[tensor][gemm]") {
  const index_t big = index_t(INT_MAX) + 1;
  CHECK_THROWS_WITH(
      detail::check_blas_sizes("cblas_sgemm", 2, 3, 4, big, 3, 3),
      Catch::Contains("cblas_sgemm(m=2, n=3, k=4, lda=2147483648") && Catch::Contains("outside [0, INT_MAX]"));
  CHECK_THROWS_AS(detail::check_blas_sizes("f", -1, 1, 1, 1, 1, 1), UsageError);
  CHECK_NOTHROW(detail::check_blas_sizes("f", 1, 1, 1, INT_MAX, 1, 1, INT_MAX));
#if defined(ENTROPY_PROBE_USE_CBLAS)
  // The check runs before the call reads any operand.
  float a = 1, b = 1, c = 0;
  CHECK_THROWS_AS(CpuBackend::gemm(false, false, 1, 1, 1, 1.0f, &a, big, &b, 1, 0.0f, &c, 1), UsageError);
#endif
}

TEST_CASE("gemm split across the threads gives the product for every thread count", "[tensor][threads][gemm]") {
  // Over kSplitFlops: C splits along its longer side (rows, then columns),
  // each part one BLAS call; every transpose, leading dimensions past the
  // sizes, beta != 0, against Eigen's product.
  const int before = CpuBackend::num_threads();
  struct Shape {
    index_t m, n, k;
  };
  for (const Shape s : {Shape{203, 150, 101}, Shape{40, 333, 200}})
    for (bool ta : {false, true})
      for (bool tb : {false, true})
        for (double beta : {0.0, 0.5}) {
          CAPTURE(s.m, s.n, s.k, ta, tb, beta);
          REQUIRE(2.0 * double(s.m) * double(s.n) * double(s.k) >= 4e6);
          const index_t lda = (ta ? s.m : s.k) + 3, ldb = (tb ? s.k : s.n) + 5, ldc = s.n + 7;
          std::mt19937 gen(7);
          std::normal_distribution<double> d;
          std::vector<double> a(static_cast<std::size_t>((ta ? s.k : s.m) * lda)),
              b(static_cast<std::size_t>((tb ? s.n : s.k) * ldb)), c0(static_cast<std::size_t>(s.m * ldc));
          for (auto* v : {&a, &b, &c0})
            for (double& x : *v) x = d(gen);
          std::vector<std::vector<double>> out;
          for (int threads : {1, 2, 3, 2}) {
            CpuBackend::set_num_threads(threads);
            std::vector<double> c = c0;
            CpuBackend::gemm(ta, tb, s.m, s.n, s.k, 1.5, a.data(), lda, b.data(), ldb, beta, c.data(), ldc);
            out.push_back(c);
          }
          std::vector<double> ref = c0;
          CpuBackend::eigen_gemm(ta, tb, s.m, s.n, s.k, 1.5, a.data(), lda, b.data(), ldb, beta, ref.data(), ldc);
          // Parts may take other BLAS kernels than the whole (OpenBLAS has
          // small-matrix ones), so thread counts agree to rounding; a wrong
          // offset or a part done twice is off by O(1). Run to run, one
          // thread count gives the same bits.
          for (std::size_t t = 0; t < out.size(); ++t) {
            double worst = 0;
            for (std::size_t i = 0; i < ref.size(); ++i) worst = std::max(worst, std::abs(out[t][i] - ref[i]));
            CAPTURE(t, worst);
            CHECK(worst < 1e-12);
          }
          CHECK(out[3] == out[1]);
        }
  CpuBackend::set_num_threads(before);
}
