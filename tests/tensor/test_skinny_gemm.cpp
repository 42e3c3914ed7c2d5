// The decode-step product of tensor/skinny_gemm.hpp, every body this CPU
// runs, against a double reference: row and column remainders of the tiles,
// k tails, leading dimensions, alpha and beta; and CpuBackend::gemm's choice
// of it.
#include <entropy_probe/tensor/cpu_backend.hpp>
#include <entropy_probe/tensor/skinny_gemm.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

using namespace entropy_probe;

namespace {

std::vector<simd::SkinnyIsa> runnable_isas() {
  std::vector<simd::SkinnyIsa> out;
  const simd::SkinnyIsa best = simd::skinny_gemm_isa();
  if (best == simd::SkinnyIsa::avx512) out.push_back(simd::SkinnyIsa::avx512);
  if (best != simd::SkinnyIsa::none) out.push_back(simd::SkinnyIsa::avx2);  // AVX-512 CPUs run AVX2 too
  return out;
}

struct Case {
  index_t m, n, k, ldx, ldw, ldc;
  float alpha, beta;
};

// Largest |C - ref| / sum_k |alpha x w| over the entries (the scale float
// rounding of a k-term sum is relative to), with C computed by `run`.
template <class Run>
double worst_error(const Case& c, Run&& run) {
  std::mt19937 gen(static_cast<unsigned>(c.m * 7919 + c.n * 31 + c.k));
  std::normal_distribution<float> d;
  std::vector<float> x(static_cast<std::size_t>(c.m * c.ldx)), w(static_cast<std::size_t>(c.n * c.ldw));
  std::vector<float> out(static_cast<std::size_t>(c.m * c.ldc));
  for (auto& v : x) v = d(gen);
  for (auto& v : w) v = d(gen);
  for (auto& v : out) v = d(gen);
  const std::vector<float> before = out;
  // beta = 0 must assign: NaN in C (the backend's poisoned uninitialized storage) may not leak
  if (c.beta == 0.0f)
    for (index_t i = 0; i < c.m; ++i)
      for (index_t j = 0; j < c.n; ++j) out[static_cast<std::size_t>(i * c.ldc + j)] = std::nanf("");
  run(x.data(), w.data(), out.data());
  double worst = 0;
  for (index_t i = 0; i < c.m; ++i)
    for (index_t j = 0; j < c.ldc; ++j) {
      const auto at = static_cast<std::size_t>(i * c.ldc + j);
      if (j >= c.n) {  // past the n columns: untouched
        if (out[at] != before[at]) return std::numeric_limits<double>::infinity();
        continue;
      }
      double dot = 0, scale = 0;
      for (index_t t = 0; t < c.k; ++t) {
        const double p =
            double(x[static_cast<std::size_t>(i * c.ldx + t)]) * w[static_cast<std::size_t>(j * c.ldw + t)];
        dot += p;
        scale += std::abs(p);
      }
      const double want = double(c.alpha) * dot + (c.beta == 0.0f ? 0.0 : double(c.beta) * before[at]);
      const double err = std::abs(double(out[at]) - want) / (std::abs(double(c.alpha)) * scale + 1e-30);
      worst = std::isnan(err) ? std::numeric_limits<double>::infinity() : std::max(worst, err);
    }
  return worst;
}

const std::vector<Case> kCases = {
    {1, 1, 1, 1, 1, 1, 1.0f, 0.0f},           // a single product
    {16, 64, 896, 896, 896, 64, 1.0f, 0.0f},  // whole tiles, k a multiple of both widths
    {5, 7, 37, 37, 37, 7, 1.0f, 0.0f},        // row, column and k remainders everywhere
    {3, 130, 20, 24, 21, 133, 0.5f, 1.0f},    // leading dimensions past the sizes; C += 0.5 X W^T
    {64, 9, 300, 300, 301, 9, -2.0f, 0.25f},  // the most rows; beta neither 0 nor 1
    {17, 12, 15, 15, 15, 12, 1.0f, 0.0f},     // k below one vector
};

}  // namespace

TEST_CASE("skinny_gemm: every body equals the double product to float rounding", "[tensor][skinny_gemm]") {
  const auto isas = runnable_isas();
  if (isas.empty()) {
    WARN("no AVX2 or AVX-512 on this CPU (or not a GCC x86-64 build): CpuBackend::gemm uses the BLAS");
    return;
  }
  for (simd::SkinnyIsa isa : isas)
    for (const Case& c : kCases) {
      CAPTURE(int(isa), c.m, c.n, c.k, c.ldx, c.ldw, c.ldc, c.alpha, c.beta);
      // The whole range in one call, and split at a tile boundary and off it (the threads' parts).
      for (index_t split : {c.n, c.n / 2, index_t(4) * (c.n / 8)}) {
        CAPTURE(split);
        const double err = worst_error(c, [&](const float* x, const float* w, float* out) {
          simd::skinny_gemm(isa, c.m, 0, split, c.k, c.alpha, x, c.ldx, w, c.ldw, c.beta, out, c.ldc);
          simd::skinny_gemm(isa, c.m, split, c.n, c.k, c.alpha, x, c.ldx, w, c.ldw, c.beta, out, c.ldc);
        });
        // A k-term float sum is off by at most about k eps of sum |terms|; an
        // indexing error is off by the terms themselves (order 1 here).
        CHECK(err <= double(c.k) * std::numeric_limits<float>::epsilon());
      }
    }
}

TEST_CASE("skinny_gemm: CpuBackend::gemm takes it for few rows against a large W, and agrees with Eigen",
          "[tensor][skinny_gemm]") {
  // 16 rows against a [1000, 300] weight: the decode step's shape (over kSkinnyMinWeights),
  // split across the threads; the result must not depend on that split.
  const Case c{16, 1000, 300, 300, 300, 1000, 1.0f, 0.0f};
  REQUIRE(c.n * c.k >= (index_t{1} << 16));
  std::vector<float> by_threads, by_one;
  for (int threads : {CpuBackend::num_threads(), 1}) {
    const int saved = CpuBackend::num_threads();
    CpuBackend::set_num_threads(threads);
    const double err = worst_error(c, [&](const float* x, const float* w, float* out) {
      CpuBackend::gemm(false, true, c.m, c.n, c.k, c.alpha, x, c.ldx, w, c.ldw, c.beta, out, c.ldc);
      (threads == 1 ? by_one : by_threads).assign(out, out + c.m * c.ldc);
    });
    CpuBackend::set_num_threads(saved);
    CHECK(err <= double(c.k) * std::numeric_limits<float>::epsilon());
  }
  CHECK(by_threads == by_one);
}
