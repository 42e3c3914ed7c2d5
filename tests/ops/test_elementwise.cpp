#include "../support/gradcheck.hpp"

#include <entropy_probe/tape/ops/elementwise.hpp>
#include <entropy_probe/tensor/functors.hpp>

#include <cmath>
#include <limits>

using namespace entropy_probe;
using namespace ep_test;

namespace {

// The reference formulas, written independently of functors.hpp.
double gelu_ref(double x) {
  const double pi = 3.14159265358979323846;
  return 0.5 * x * (1.0 + std::tanh(std::sqrt(2.0 / pi) * (x + 0.044715 * x * x * x)));
}
double silu_ref(double x) { return x / (1.0 + std::exp(-x)); }
// x Phi(x) with Phi the integral of the normal density by Simpson's rule,
// independent of erf / erfc: the lower tail integrated directly (no
// cancellation), Phi(x) = 1 - Phi(-x) above 0. Good to about 1e-13.
double gelu_erf_ref(double x) {
  const double pi = 3.14159265358979323846;
  auto tail = [&](double b) {  // integral of phi over [b - 16, b], b <= 0
    const int n = 20000;
    const double a = b - 16.0, h = (b - a) / n;
    auto phi = [&](double u) { return std::exp(-0.5 * u * u) / std::sqrt(2.0 * pi); };
    double s = phi(a) + phi(b);
    for (int i = 1; i < n; ++i) s += (i % 2 ? 4.0 : 2.0) * phi(a + i * h);
    return s * h / 3.0;
  };
  return x * (x <= 0 ? tail(x) : 1.0 - tail(-x));
}
double relu_ref(double x) { return x > 0 ? x : 0.0; }

}  // namespace

TEST_CASE("functors: values at known points", "[ops][functors]") {
  CHECK(GeluTanh::f(1.0) == Approx(0.8411919906082768).epsilon(1e-15));
  CHECK(GeluTanh::f(0.0) == 0.0);
  // gelu(x) - gelu(-x) = x for any odd-argument tanh form
  for (double x : {-3.0, -0.7, 0.25, 2.5}) CHECK(GeluTanh::f(x) - GeluTanh::f(-x) == Approx(x).epsilon(1e-14));
  CHECK(GeluTanh::f(-1.0) == Approx(-0.15880800939172324).epsilon(1e-14));
  CHECK(Silu::f(1.0) == Approx(0.7310585786300049).epsilon(1e-15));
  CHECK(Silu::f(-1.0) == Approx(-0.2689414213699951).epsilon(1e-15));
  CHECK(Sigmoid::f(0.0) == 0.5);
  CHECK(Sigmoid::f(2.0) + Sigmoid::f(-2.0) == Approx(1.0).epsilon(1e-16));
  CHECK(Sigmoid::f(-40.0) == Approx(std::exp(-40.0)).epsilon(1e-14));  // relative accuracy in the tail
  CHECK(GeluTanh::f(1.0f) == Approx(0.8411919906082768).epsilon(1e-6));
  CHECK(Silu::f(1.0f) == Approx(0.7310585786300049).epsilon(1e-6));
}

TEST_CASE("functors: sigmoid and silu are finite far out in both directions", "[ops][functors]") {
  for (double x : {-1000.0, -750.0, 750.0, 1000.0}) {
    CAPTURE(x);
    CHECK(std::isfinite(Sigmoid::f(x)));
    CHECK(std::isfinite(Sigmoid::df(x)));
    CHECK(std::isfinite(Silu::f(x)));
    CHECK(std::isfinite(Silu::df(x)));
    CHECK(std::isfinite(Sigmoid::f(static_cast<float>(x))));
    CHECK(std::isfinite(Silu::df(static_cast<float>(x))));
  }
  CHECK(Sigmoid::f(-1000.0) == 0.0);
  CHECK(Sigmoid::f(1000.0) == 1.0);
  CHECK(Silu::f(-1000.0) == 0.0);
  CHECK(Silu::f(1000.0) == 1000.0);
  CHECK(GeluTanh::f(-30.0) == Approx(0.0).margin(1e-300));
  CHECK(GeluTanh::f(30.0) == 30.0);
}

TEST_CASE("functors: derivatives match central differences", "[ops][functors]") {
  const double h = 1e-5;
  for (double x = -6.0; x <= 6.0; x += 0.37) {
    CAPTURE(x);
    CHECK(GeluTanh::df(x) == Approx((GeluTanh::f(x + h) - GeluTanh::f(x - h)) / (2 * h)).margin(1e-9));
    CHECK(Silu::df(x) == Approx((Silu::f(x + h) - Silu::f(x - h)) / (2 * h)).margin(1e-9));
    CHECK(Sigmoid::df(x) == Approx((Sigmoid::f(x + h) - Sigmoid::f(x - h)) / (2 * h)).margin(1e-9));
  }
}

TEST_CASE("elementwise ops: values against plain formulas", "[ops][elementwise]") {
  std::mt19937_64 rng(11);
  const TensorD a = random_tensor({3, 4}, rng, 2.0), b = random_tensor({3, 4}, rng, 2.0);
  Tape<double> t;
  Var va = t.input(a), vb = t.input(b);
  // copies: a reference into the tape dangles once later ops add slots
  const TensorD s = t.value(add(t, va, vb));
  const TensorD p = t.value(mul(t, va, vb));
  const TensorD g = t.value(gelu_tanh(t, va));
  const TensorD si = t.value(silu(t, va));
  REQUIRE(s.shape() == Shape{3, 4});
  REQUIRE(g.shape() == Shape{3, 4});
  for (index_t i = 0; i < a.numel(); ++i) {
    CAPTURE(i, a[i], b[i]);
    CHECK(s[i] == a[i] + b[i]);
    CHECK(p[i] == a[i] * b[i]);
    CHECK(g[i] == Approx(gelu_ref(a[i])).epsilon(1e-14).margin(1e-300));
    CHECK(si[i] == Approx(silu_ref(a[i])).epsilon(1e-14).margin(1e-300));
  }
}

TEST_CASE("add and mul: VJP and JVP against finite differences", "[ops][elementwise]") {
  std::mt19937_64 rng(12);
  for (Shape s : {Shape{4, 5}, Shape{1, 1}, Shape{7}, Shape{1, 6}, Shape{6, 1}, Shape{2, 3, 4}}) {
    CAPTURE(shape_str(s));
    require_gradcheck({{random_tensor(s, rng)}, {random_tensor(s, rng)}},
                      [](Tape<double>& t, const std::vector<Var>& v) { return add(t, v[0], v[1]); });
    require_gradcheck({{random_tensor(s, rng)}, {random_tensor(s, rng)}},
                      [](Tape<double>& t, const std::vector<Var>& v) { return mul(t, v[0], v[1]); });
  }
}

TEST_CASE("add and mul: one operand constant (its tangent is null)", "[ops][elementwise]") {
  std::mt19937_64 rng(13);
  for (bool first_frozen : {true, false}) {
    CAPTURE(first_frozen);
    std::vector<GradcheckInput> in{{random_tensor({3, 4}, rng), !first_frozen},
                                   {random_tensor({3, 4}, rng), first_frozen}};
    require_gradcheck(in, [](Tape<double>& t, const std::vector<Var>& v) { return mul(t, v[0], v[1]); });
    require_gradcheck(in, [](Tape<double>& t, const std::vector<Var>& v) { return add(t, v[0], v[1]); });
  }
}

TEST_CASE("add and mul: the same value on both sides accumulates both gradients", "[ops][elementwise]") {
  std::mt19937_64 rng(14);
  require_gradcheck({{random_tensor({3, 4}, rng)}},
                    [](Tape<double>& t, const std::vector<Var>& v) { return mul(t, v[0], v[0]); });
  require_gradcheck({{random_tensor({3, 4}, rng)}},
                    [](Tape<double>& t, const std::vector<Var>& v) { return add(t, v[0], v[0]); });
  // d(x*x)/dx = 2x exactly
  Tape<double> t;
  const TensorD x = random_tensor({5}, rng);
  Var vx = t.input(x);
  Var y = mul(t, vx, vx);
  t.backward(y, TensorD::full({5}, 1.0));
  REQUIRE(t.grad(vx) != nullptr);
  for (index_t i = 0; i < 5; ++i) CHECK((*t.grad(vx))[i] == 2 * x[i]);
}

TEST_CASE("gelu_tanh and silu: VJP and JVP against finite differences", "[ops][elementwise]") {
  std::mt19937_64 rng(15);
  for (Shape s : {Shape{4, 5}, Shape{1, 1}, Shape{9}, Shape{2, 3, 2}}) {
    CAPTURE(shape_str(s));
    require_gradcheck({{random_tensor(s, rng, 2.5)}},
                      [](Tape<double>& t, const std::vector<Var>& v) { return gelu_tanh(t, v[0]); });
    require_gradcheck({{random_tensor(s, rng, 2.5)}},
                      [](Tape<double>& t, const std::vector<Var>& v) { return silu(t, v[0]); });
  }
}

TEST_CASE("elementwise ops: composed chain (SwiGLU-style gate) passes gradcheck", "[ops][elementwise]") {
  std::mt19937_64 rng(16);
  require_gradcheck({{random_tensor({3, 4}, rng)}, {random_tensor({3, 4}, rng)}, {random_tensor({3, 4}, rng)}},
                    [](Tape<double>& t, const std::vector<Var>& v) {
                      return add(t, mul(t, silu(t, v[0]), v[1]), gelu_tanh(t, v[2]));
                    });
}

TEST_CASE("elementwise ops: float forward agrees with double", "[ops][elementwise][float]") {
  std::mt19937_64 rng(17);
  const TensorD a = random_tensor({6, 7}, rng, 2.0), b = random_tensor({6, 7}, rng, 2.0);
  CHECK(float_vs_double({a, b}, [](auto& t, const std::vector<Var>& v) { return add(t, v[0], v[1]); }) < 1e-6);
  CHECK(float_vs_double({a, b}, [](auto& t, const std::vector<Var>& v) { return mul(t, v[0], v[1]); }) < 1e-6);
  CHECK(float_vs_double({a}, [](auto& t, const std::vector<Var>& v) { return gelu_tanh(t, v[0]); }) < 1e-5);
  CHECK(float_vs_double({a}, [](auto& t, const std::vector<Var>& v) { return silu(t, v[0]); }) < 1e-5);
}

TEST_CASE("add and mul: shape mismatch is a usage error", "[ops][elementwise][errors]") {
  Tape<double> t;
  Var a = t.input(TensorD({2, 3})), b = t.input(TensorD({3, 2})), c = t.input(TensorD({6}));
  REQUIRE_THROWS_AS(add(t, a, b), UsageError);
  REQUIRE_THROWS_WITH(add(t, a, b), Catch::Contains("add: operand shapes [2, 3] and [3, 2] differ"));
  REQUIRE_THROWS_AS(mul(t, a, c), UsageError);
  REQUIRE_THROWS_WITH(mul(t, a, c), Catch::Contains("mul: operand shapes [2, 3] and [6] differ"));
  CHECK(t.num_nodes() == 0);  // nothing recorded by a failed op
}

TEST_CASE("gelu_erf and relu: values at known points and against plain formulas", "[ops][elementwise][functors]") {
  // torch.nn.functional.gelu(torch.tensor([1.0, -1.0, 2.5], dtype=torch.float64))
  CHECK(GeluErf::f(1.0) == Approx(0.841344746068543).epsilon(1e-15));
  CHECK(GeluErf::f(-1.0) == Approx(-0.15865525393145702).epsilon(1e-14));
  CHECK(GeluErf::f(2.5) == Approx(2.4844758366855597).epsilon(1e-15));
  CHECK(GeluErf::f(0.0) == 0.0);
  CHECK(GeluErf::f(-40.0) == Approx(0.0).margin(1e-300));
  CHECK(GeluErf::f(40.0) == 40.0);
  CHECK(Relu::f(-2.0) == 0.0);
  CHECK(Relu::f(3.0) == 3.0);
  CHECK(Relu::df(0.0) == 0.0);  // PyTorch's subgradient at 0
  CHECK(Relu::df(1e-300) == 1.0);
  std::mt19937_64 rng(18);
  const TensorD a = random_tensor({5, 7}, rng, 3.0);
  Tape<double> t;
  Var va = t.input(a);
  const TensorD g = t.value(gelu_erf(t, va));  // the CPU backend's array forms
  const TensorD r = t.value(relu(t, va));
  for (index_t i = 0; i < a.numel(); ++i) {
    CAPTURE(i, a[i]);
    CHECK(g[i] == Approx(gelu_erf_ref(a[i])).epsilon(1e-12).margin(1e-300));
    CHECK(r[i] == relu_ref(a[i]));
  }
  const double h = 1e-5;
  for (double x = -6.0; x <= 6.0; x += 0.37) {
    CAPTURE(x);
    CHECK(GeluErf::df(x) == Approx((GeluErf::f(x + h) - GeluErf::f(x - h)) / (2 * h)).margin(1e-9));
  }
}

TEST_CASE("gelu_erf and relu: VJP and JVP against finite differences", "[ops][elementwise]") {
  std::mt19937_64 rng(19);
  for (Shape s : {Shape{4, 5}, Shape{1, 1}, Shape{9}, Shape{2, 3, 2}}) {
    CAPTURE(shape_str(s));
    require_gradcheck({{random_tensor(s, rng, 2.5)}},
                      [](Tape<double>& t, const std::vector<Var>& v) { return gelu_erf(t, v[0]); });
    // relu is piecewise linear: central differences are exact away from 0, and
    // random points lie farther than h from it
    TensorD x = random_tensor(s, rng, 2.5);
    for (index_t i = 0; i < x.numel(); ++i)
      if (std::abs(x[i]) < 1e-3) x[i] = 0.5;
    require_gradcheck({{x}}, [](Tape<double>& t, const std::vector<Var>& v) { return relu(t, v[0]); });
  }
  CHECK(float_vs_double({random_tensor({6, 7}, rng, 2.0)},
                        [](auto& t, const std::vector<Var>& v) { return gelu_erf(t, v[0]); }) < 1e-5);
  CHECK(float_vs_double({random_tensor({6, 7}, rng, 2.0)},
                        [](auto& t, const std::vector<Var>& v) { return relu(t, v[0]); }) < 1e-6);
}

namespace {

// Value, gradients (cotangent c) and tangent (tangents tg, tu) of
// build(tape, gate, up) in T, as doubles.
struct GatedRun {
  std::vector<double> y, g_gate, g_up, ty;
};
template <class T, class Build>
GatedRun run_gated(const TensorD& gate, const TensorD& up, const TensorD& c, const TensorD& tg, const TensorD& tu,
                   Build build) {
  auto to_doubles = [](const auto& x) {  // a tensor or a tangent view
    const std::vector<T> h = x.to_host();
    return std::vector<double>(h.begin(), h.end());
  };
  Tape<T> t;
  Var vg = t.input(gate.template cast<T>()), vu = t.input(up.template cast<T>());
  Var y = build(t, vg, vu);
  t.backward(y, c.template cast<T>());
  t.set_tangent(vg, tg.template cast<T>());
  t.set_tangent(vu, tu.template cast<T>());
  t.jvp();
  return {to_doubles(t.value(y)), to_doubles(*t.grad(vg)), to_doubles(*t.grad(vu)), to_doubles(*t.tangent(y))};
}

template <class F, class T>
void check_gated_equals_composition(double tol) {
  std::mt19937_64 rng(21);
  // 7500 elements: several of the CPU backend's chunks and a short tail.
  const Shape s{3, 2500};
  const TensorD gate = random_tensor(s, rng, 3.0), up = random_tensor(s, rng), c = random_tensor(s, rng),
                tg = random_tensor(s, rng), tu = random_tensor(s, rng);
  const GatedRun fused =
      run_gated<T>(gate, up, c, tg, tu, [](Tape<T>& t, Var g, Var u) { return gated_activation<F>(t, g, u); });
  const GatedRun composed = run_gated<T>(gate, up, c, tg, tu, [](Tape<T>& t, Var g, Var u) {
    return mul(t, detail::unary_elementwise<F>(t, g, "act"), u);
  });
  CHECK(rel_err(fused.y, composed.y) <= tol);
  CHECK(rel_err(fused.g_gate, composed.g_gate) <= tol);
  CHECK(rel_err(fused.g_up, composed.g_up) <= tol);
  CHECK(rel_err(fused.ty, composed.ty) <= tol);
}

}  // namespace

TEST_CASE("gated_activation: values against plain formulas", "[ops][elementwise]") {
  std::mt19937_64 rng(18);
  const TensorD g = random_tensor({5, 9}, rng, 3.0), u = random_tensor({5, 9}, rng);
  Tape<double> t;
  Var vg = t.input(g), vu = t.input(u);
  const TensorD si = t.value(gated_activation<Silu>(t, vg, vu));
  const TensorD ge = t.value(gated_activation<GeluTanh>(t, vg, vu));
  const TensorD gr = t.value(gated_activation<GeluErf>(t, vg, vu));
  const TensorD re = t.value(gated_activation<Relu>(t, vg, vu));
  for (index_t i = 0; i < g.numel(); ++i) {
    CAPTURE(i, g[i], u[i]);
    CHECK(si[i] == Approx(silu_ref(g[i]) * u[i]).epsilon(1e-14).margin(1e-300));
    // gelu_ref's 1 + tanh(u) cancels in the left tail: judged on the scale |g u|
    CHECK(std::abs(ge[i] - gelu_ref(g[i]) * u[i]) <= 1e-14 * std::abs(g[i] * u[i]));
    CHECK(gr[i] == Approx(gelu_erf_ref(g[i]) * u[i]).epsilon(1e-12).margin(1e-300));
    CHECK(re[i] == relu_ref(g[i]) * u[i]);
  }
}

// The decoder's MLP ran mul(activate(gate), up) before it ran the fused op:
// forward, VJP and JVP must be the same, to rounding in double and within a
// few float ulps of the scale in float (the SiLU kernels may contract into
// FMAs differently).
TEST_CASE("gated_activation: equals the composition mul(act(gate), up)", "[ops][elementwise]") {
  check_gated_equals_composition<Silu, double>(1e-12);
  check_gated_equals_composition<GeluTanh, double>(1e-12);
  check_gated_equals_composition<GeluErf, double>(1e-12);
  check_gated_equals_composition<Relu, double>(1e-12);
  check_gated_equals_composition<Silu, float>(1e-6);
  check_gated_equals_composition<GeluTanh, float>(1e-6);
  check_gated_equals_composition<GeluErf, float>(1e-6);
  check_gated_equals_composition<Relu, float>(1e-6);
}

TEST_CASE("gated_activation: shape mismatch is a usage error", "[ops][elementwise][errors]") {
  Tape<double> t;
  Var a = t.input(TensorD({2, 3})), b = t.input(TensorD({3, 2}));
  REQUIRE_THROWS_AS(gated_activation<Silu>(t, a, b), UsageError);
  REQUIRE_THROWS_WITH(gated_activation<Silu>(t, a, b),
                      Catch::Contains("gated_activation: operand shapes [2, 3] and [3, 2] differ"));
  CHECK(t.num_nodes() == 0);
}
