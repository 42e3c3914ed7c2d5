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
  // s = 1 / 0.7 is not a float: with s rounded to float, or z s rounded to
  // float without FMA, the p of the logit that holds all the mass would be
  // off by up to 4e-6; the argument is formed in double.
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

TEST_CASE("simd: silu_mul, its VJP and JVP against double, every set of outputs", "[tensor][simd]") {
  // Gates over [-100, 100] (both saturations), ups, cotangents and tangents
  // of mixed sign; n not a multiple of any vector width.
  const index_t n = 20011;
  const auto N = static_cast<std::size_t>(n);
  std::vector<float> g(N), u(N), gy(N), tg(N), tu(N);
  for (std::size_t i = 0; i < N; ++i) {
    g[i] = -100.0f + 200.0f * float(i) / float(n - 1);
    u[i] = std::sin(0.37f * float(i)) * 2.0f;
    gy[i] = std::cos(0.11f * float(i));
    tg[i] = std::sin(0.05f * float(i) + 1.0f);
    tu[i] = std::cos(0.29f * float(i) + 2.0f);
  }
  // Reference terms in double, and the scale each is judged on (the sizes of
  // its factors: silu'(g) = s + g s (1 - s) cancels near g = -1.28).
  std::vector<double> y_ref(N), a_ref(N), b_ref(N), a_scale(N), b_scale(N);
  for (std::size_t i = 0; i < N; ++i) {
    const double x = g[i], s = 1.0 / (1.0 + std::exp(-x)), act = x * s;
    const double d_size = s + std::abs(x) * s * (1.0 - s);
    y_ref[i] = act * u[i];
    a_ref[i] = double(gy[i]) * u[i] * (s + x * s * (1.0 - s));
    b_ref[i] = double(gy[i]) * act;
    a_scale[i] = std::abs(double(gy[i]) * u[i]) * d_size + 1e-30;
    b_scale[i] = std::abs(double(gy[i]) * act) + 1e-30;
  }
  // A term carrying silu'(g) is judged on silu_df's bound above (1e-6 of the
  // size of its terms) plus up to 8 float roundings of the products and sums
  // around it (8 * 2^-24 < 5e-7); the others on silu's 1e-6.
  const double kWithDf = 1.5e-6;
  // Worst error relative to scale[i] + offset (offset: a value added onto).
  auto worst = [&](const std::vector<float>& got, auto want, const std::vector<double>& scale, double offset = 0) {
    double w = 0;
    for (std::size_t i = 0; i < N; ++i) w = std::max(w, std::abs(got[i] - want(i)) / (scale[i] + offset));
    return w;
  };
  std::vector<double> y_scale(N);
  for (std::size_t i = 0; i < N; ++i) y_scale[i] = std::abs(y_ref[i]) + 1e-30;

  std::vector<float> y(N);
  simd::silu_mul(n, g.data(), u.data(), y.data());
  CHECK(worst(
            y, [&](std::size_t i) { return y_ref[i]; }, y_scale) < 1e-6);

  // VJP: both outputs, one of them, assigning or adding onto 0.5.
  for (bool want_g : {true, false})
    for (bool want_u : {true, false})
      for (bool assign : {true, false}) {
        if (!want_g && !want_u) continue;
        CAPTURE(want_g, want_u, assign);
        const float base = assign ? std::numeric_limits<float>::quiet_NaN() : 0.5f;  // assign never reads
        std::vector<float> gg(N, base), gu(N, base);
        simd::silu_mul_vjp(n, g.data(), u.data(), gy.data(), want_g ? gg.data() : nullptr, assign,
                           want_u ? gu.data() : nullptr, assign);
        const double add = assign ? 0.0 : 0.5;
        const double wg = want_g ? worst(
                                       gg, [&](std::size_t i) { return add + a_ref[i]; }, a_scale, add)
                                 : 0.0;
        const double wu = want_u ? worst(
                                       gu, [&](std::size_t i) { return add + b_ref[i]; }, b_scale, add)
                                 : 0.0;
        CAPTURE(wg, wu);
        CHECK(wg < kWithDf);
        CHECK(wu < 1e-6);
      }

  // JVP with both tangents, or one (the other zero).
  for (int which = 0; which < 3; ++which) {
    CAPTURE(which);
    const bool with_g = which != 2, with_u = which != 1;
    std::vector<float> ty(N);
    simd::silu_mul_jvp(n, g.data(), u.data(), with_g ? tg.data() : nullptr, with_u ? tu.data() : nullptr, ty.data());
    double w = 0;
    for (std::size_t i = 0; i < N; ++i) {
      const double x = g[i], s = 1.0 / (1.0 + std::exp(-x));
      const double ta = with_g ? (s + x * s * (1.0 - s)) * double(tg[i]) * u[i] : 0.0,
                   tb = with_u ? x * s * tu[i] : 0.0;
      const double sc = (with_g ? (s + std::abs(x) * s * (1.0 - s)) * std::abs(tg[i] * u[i]) : 0.0) +
                        std::abs(x * s * (with_u ? tu[i] : 0.0f)) + 1e-30;
      w = std::max(w, std::abs(ty[i] - (ta + tb)) / sc);
    }
    CAPTURE(w);
    CHECK(w < kWithDf);
  }

  // CpuBackend's gated primitives take the kernels for float Silu.
  std::vector<float> yb(N), gg(N), gu(N), ty(N), ty_ref(N);
  CpuBackend::gated_map<Silu>(n, g.data(), u.data(), yb.data());
  CHECK(yb == y);
  std::vector<float> gg_ref(N), gu_ref(N);
  simd::silu_mul_vjp(n, g.data(), u.data(), gy.data(), gg_ref.data(), true, gu_ref.data(), true);
  CpuBackend::gated_vjp<Silu>(n, g.data(), u.data(), gy.data(), gg.data(), true, gu.data(), true);
  CHECK(gg == gg_ref);
  CHECK(gu == gu_ref);
  simd::silu_mul_jvp(n, g.data(), u.data(), tg.data(), tu.data(), ty_ref.data());
  CpuBackend::gated_jvp<Silu>(n, g.data(), u.data(), tg.data(), tu.data(), ty.data());
  CHECK(ty == ty_ref);
}
