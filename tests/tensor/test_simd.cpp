// The dispatched float kernels of tensor/simd.hpp against the double exp.
#include <entropy_probe/tensor/cpu_backend.hpp>
#include <entropy_probe/tensor/functors.hpp>
#include <entropy_probe/tensor/simd.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <vector>

using namespace entropy_probe;

namespace {

// Distance in units in the last place of the float nearest to `want`.
double ulps(float got, double want) {
  const float w = static_cast<float>(want);
  const double ulp = std::nextafter(w, std::numeric_limits<float>::infinity()) - w;
  return std::abs(double(got) - want) / ulp;
}

}  // namespace

TEST_CASE("simd: exp_affine is within 2 ulp of exp on the softmax and attention range", "[tensor][simd]") {
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
  INFO("AVX-512F: " << __builtin_cpu_supports("avx512f") << ", AVX2: " << __builtin_cpu_supports("avx2"));
#endif
  // Every argument the callers pass is <= 0 (x - max, z s - lse); the
  // kernel's range reduction is exercised over the whole normal range.
  const index_t n = 200001;
  std::vector<float> x(static_cast<std::size_t>(n)), y(x.size());
  for (index_t i = 0; i < n; ++i) x[static_cast<std::size_t>(i)] = -87.0f + 87.0f * float(i) / float(n - 1);
  simd::exp_affine(n, x.data(), y.data(), 1.0f, 0.0f, 0.0f, 0.0f);
  double worst = 0;
  for (std::size_t i = 0; i < x.size(); ++i) worst = std::max(worst, ulps(y[i], std::exp(double(x[i]))));
  CAPTURE(worst);
  CHECK(worst <= 2.0);
  CHECK(y.back() == 1.0f);  // exp(0) exactly

  // The affine part is evaluated in float, (x - b) * a - c, with or without
  // FMA contraction depending on the ISA: its rounding, at most 2 ulp of the
  // argument, moves exp by up to |arg| 2^-22 relative on top of the 2 ulp.
  const float a = 0.7f, b = 3.25f, c = 1.5f;
  simd::exp_affine(n, x.data(), y.data(), a, b, c, 0.0f);
  double worst_excess = -1;
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double arg = (double(x[i]) - b) * a - c, want = std::exp(arg);
    const double allowed = (2.0 + 2.0 * std::abs(arg)) * std::ldexp(1.0, -24) * want;
    worst_excess = std::max(worst_excess, std::abs(double(y[i]) - want) / allowed - 1.0);
  }
  CAPTURE(worst_excess);
  CHECK(worst_excess <= 0.0);
}

TEST_CASE("simd: exp_affine in place equals out of place, and clamps and propagates as documented", "[tensor][simd]") {
  std::vector<float> x(1000);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = -50.0f + 0.1f * float(i) - 1e-3f * float(i % 7);
  std::vector<float> y(x.size()), z = x;
  simd::exp_affine(index_t(x.size()), x.data(), y.data(), 2.0f, 1.0f, 0.5f, 0.25f);
  simd::exp_affine_inplace(index_t(z.size()), z.data(), 2.0f, 1.0f, 0.5f, 0.25f);
  CHECK(y == z);
  // Through the backend, for both types (double is Eigen's exp).
  std::vector<float> w(x.size());
  CpuBackend::exp_affine(index_t(x.size()), x.data(), w.data(), 2.0f, 1.0f, 0.5f, 0.25f);
  CHECK(w == y);
  std::vector<double> xd(x.begin(), x.end()), yd(x.size());
  CpuBackend::exp_affine(index_t(xd.size()), xd.data(), yd.data(), 2.0, 1.0, 0.5, 0.25);
  for (std::size_t i = 0; i < xd.size(); ++i) {
    const double want = std::exp(((xd[i] - 1.0) * 2.0 - 0.5) - 0.25);
    CHECK(std::abs(yd[i] - want) <= 1e-15 * want);
  }

  float v[4] = {-1e30f, -std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN(), 0.0f};
  simd::exp_affine_inplace(4, v, 1.0f, 0.0f, 0.0f, 0.0f);
  // Below -87.3: exp(-87.3), about 1.04 times the smallest normal, not a denormal or 0.
  const double floor_value = std::exp(double(-87.3f));
  CHECK(std::abs(double(v[0]) - floor_value) <= 1e-6 * floor_value);
  CHECK(v[1] == v[0]);
  CHECK(std::isnan(v[2]));
  CHECK(v[3] == 1.0f);
}

TEST_CASE("simd: silu and its derivative against double, and the backend uses them for float", "[tensor][simd]") {
  const index_t n = 40001;
  std::vector<float> x(static_cast<std::size_t>(n)), y(x.size()), d(x.size());
  for (index_t i = 0; i < n; ++i) x[static_cast<std::size_t>(i)] = -100.0f + 200.0f * float(i) / float(n - 1);
  simd::silu(n, x.data(), y.data());
  simd::silu_df(n, x.data(), d.data());
  double worst_y = 0, worst_d = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double v = x[i], s = 1.0 / (1.0 + std::exp(-v));
    const double want_y = v * s, want_d = s * (1.0 + v * (1.0 - s));
    // Relative to the size of the terms: d = s + v s (1 - s) cancels near v = -1.28.
    worst_y = std::max(worst_y, std::abs(y[i] - want_y) / (std::abs(want_y) + 1e-30));
    worst_d = std::max(worst_d, std::abs(d[i] - want_d) / (s + std::abs(v) * s * (1.0 - s) + 1e-30));
  }
  CAPTURE(worst_y, worst_d);
  CHECK(worst_y < 1e-6);
  CHECK(worst_d < 1e-6);

  // CpuBackend's elementwise primitives take the kernels for float.
  std::vector<float> g(x.size(), 0.5f), gx(x.size(), 1.0f), tx(x.size(), 2.0f), ty(x.size()), yb(x.size());
  CpuBackend::unary_map<Silu>(n, x.data(), yb.data());
  CHECK(yb == y);
  CpuBackend::unary_vjp<Silu>(n, x.data(), g.data(), gx.data());
  CpuBackend::unary_jvp<Silu>(n, x.data(), tx.data(), ty.data());
  for (std::size_t i = 0; i < x.size(); ++i) {
    CHECK(gx[i] == 1.0f + 0.5f * d[i]);
    CHECK(ty[i] == d[i] * 2.0f);
  }
}

TEST_CASE("simd: exp_scaled keeps p = exp(z s - lse) exact to float where z s and lse cancel", "[tensor][simd]") {
  // s = 1 / 0.7 is not a float: with s rounded to float, z s for z = 60 is
  // off by 2.6e-6 and so would p of the logit that holds all the mass.
  const double s = 1.0 / 0.7;
  std::vector<float> z{60.0f, 59.0f, 12.5f, -3.0f, 0.0f};
  const double lse = 60.0 * s + std::log1p(std::exp(-s) + std::exp((12.5 - 60.0) * s));
  std::vector<float> p(z.size());
  CpuBackend::exp_scaled(index_t(z.size()), z.data(), p.data(), s, lse);
  for (std::size_t i = 0; i < z.size(); ++i) {
    const double arg = double(z[i]) * s - lse, want = std::exp(arg);
    CAPTURE(i, p[i], want);
    if (arg > -1)  // the cancelling case: as exact as the exp itself
      CHECK(ulps(p[i], want) <= 2.0);
    else if (arg > -87)  // a float argument of size |arg|: relative |arg| 2^-22 on top
      CHECK(std::abs(p[i] - want) <= (2.0 + 2.0 * std::abs(arg)) * std::ldexp(1.0, -24) * want);
    else  // clamped
      CHECK(std::abs(p[i] - want) <= 2e-38);
  }
  std::vector<double> zd(z.begin(), z.end()), pd(z.size());
  CpuBackend::exp_scaled(index_t(zd.size()), zd.data(), pd.data(), s, lse);
  for (std::size_t i = 0; i < z.size(); ++i) CHECK(std::abs(pd[i] - std::exp(zd[i] * s - lse)) <= 1e-15);
}
