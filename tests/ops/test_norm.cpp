#include "../support/gradcheck.hpp"

#include <entropy_probe/tape/ops/norm.hpp>

#include <cmath>

using namespace entropy_probe;
using namespace ep_test;

namespace {

TensorD vec(std::vector<double> v) {
  const index_t n = static_cast<index_t>(v.size());
  return TensorD::from_host({n}, v);
}

}  // namespace

TEST_CASE("layer_norm: a hand-computed row", "[ops][norm]") {
  // x = [1, 2, 3, 4]: mean 2.5, biased variance 1.25, xhat = (x - 2.5) / sqrt(1.25 + eps)
  const double eps = 1e-5;
  Tape<double> t;
  Var x = t.input(TensorD::from_host({1, 4}, std::vector<double>{1, 2, 3, 4}));
  Var g = t.input(vec({1.0, 2.0, -1.0, 0.5}));
  Var b = t.input(vec({0.1, 0.0, 0.0, -0.2}));
  const TensorD y = t.value(layer_norm(t, x, g, b, eps));
  REQUIRE(y.shape() == Shape{1, 4});
  const double rs = 1.0 / std::sqrt(1.25 + eps);
  const double expect[4] = {-1.5 * rs * 1.0 + 0.1, -0.5 * rs * 2.0, 0.5 * rs * -1.0, 1.5 * rs * 0.5 - 0.2};
  for (index_t j = 0; j < 4; ++j) CHECK(y[j] == Approx(expect[j]).epsilon(1e-14));

  // eps = 0, unit gamma, zero beta: xhat = (x - 2.5) / sqrt(1.25), as literals
  Var y0 = layer_norm(t, x, t.input(TensorD::full({4}, 1.0)), t.input(TensorD({4})), 0.0);
  const double lit[4] = {-1.3416407864998738, -0.4472135954999579, 0.4472135954999579, 1.3416407864998738};
  for (index_t j = 0; j < 4; ++j) CHECK(t.value(y0)[j] == Approx(lit[j]).epsilon(1e-15));
}

TEST_CASE("layer_norm: rows have zero mean and (biased) variance var / (var + eps)", "[ops][norm]") {
  std::mt19937_64 rng(21);
  const index_t n = 6, d = 9;
  const double eps = 1e-3;
  TensorD xv = random_tensor({n, d}, rng, 3.0);
  for (index_t j = 0; j < d; ++j) xv[2 * d + j] += 1000.0;  // a row far from zero: the two-pass variance copes
  Tape<double> t;
  Var y = layer_norm(t, t.input(xv), t.input(TensorD::full({d}, 1.0)), t.input(TensorD({d})), eps);
  const TensorD yv = t.value(y);
  for (index_t r = 0; r < n; ++r) {
    CAPTURE(r);
    double m = 0, v = 0, ym = 0, yv2 = 0;
    for (index_t j = 0; j < d; ++j) m += xv[r * d + j] / d;
    for (index_t j = 0; j < d; ++j) v += (xv[r * d + j] - m) * (xv[r * d + j] - m) / d;
    for (index_t j = 0; j < d; ++j) ym += yv[r * d + j] / d;
    for (index_t j = 0; j < d; ++j) yv2 += (yv[r * d + j] - ym) * (yv[r * d + j] - ym) / d;
    CHECK(ym == Approx(0.0).margin(1e-13));
    CHECK(yv2 == Approx(v / (v + eps)).epsilon(1e-12));
  }
}

TEST_CASE("rms_norm: a hand-computed row", "[ops][norm]") {
  // x = [1, 2, 3, 4]: mean(x^2) = 7.5
  const double eps = 1e-6;
  Tape<double> t;
  Var x = t.input(TensorD::from_host({1, 4}, std::vector<double>{1, 2, 3, 4}));
  Var g = t.input(vec({1.0, 2.0, -1.0, 0.5}));
  const TensorD y = t.value(rms_norm(t, x, g, eps));
  REQUIRE(y.shape() == Shape{1, 4});
  const double rs = 1.0 / std::sqrt(7.5 + eps);
  const double expect[4] = {1 * rs * 1.0, 2 * rs * 2.0, 3 * rs * -1.0, 4 * rs * 0.5};
  for (index_t j = 0; j < 4; ++j) CHECK(y[j] == Approx(expect[j]).epsilon(1e-14));
  // eps = 0: x / sqrt(7.5) as literals
  Var y0 = rms_norm(t, x, t.input(TensorD::full({4}, 1.0)), 0.0);
  const double lit[4] = {0.3651483716701107, 0.7302967433402214, 1.0954451150103321, 1.4605934866804429};
  for (index_t j = 0; j < 4; ++j) CHECK(t.value(y0)[j] == Approx(lit[j]).epsilon(1e-15));
}

TEST_CASE("rms_norm: rows of the output have mean square ms / (ms + eps)", "[ops][norm]") {
  std::mt19937_64 rng(22);
  const index_t n = 5, d = 8;
  const double eps = 1e-2;
  const TensorD xv = random_tensor({n, d}, rng, 0.3);
  Tape<double> t;
  const TensorD yv = t.value(rms_norm(t, t.input(xv), t.input(TensorD::full({d}, 1.0)), eps));
  for (index_t r = 0; r < n; ++r) {
    double ms = 0, yms = 0;
    for (index_t j = 0; j < d; ++j) ms += xv[r * d + j] * xv[r * d + j] / d;
    for (index_t j = 0; j < d; ++j) yms += yv[r * d + j] * yv[r * d + j] / d;
    CHECK(yms == Approx(ms / (ms + eps)).epsilon(1e-13));
  }
}

TEST_CASE("layer_norm: VJP and JVP against finite differences", "[ops][norm]") {
  std::mt19937_64 rng(23);
  struct Case {
    Shape x;
    double eps;
    bool frozen_affine;
  };
  for (const Case& c :
       {Case{{5, 4}, 1e-5, false}, Case{{1, 6}, 1e-5, false}, Case{{3, 1}, 1e-5, false}, Case{{2, 3, 5}, 1e-5, false},
        Case{{4, 3}, 0.5, false}, Case{{4, 5}, 1e-5, true}, Case{{1, 1}, 1e-2, false}}) {
    CAPTURE(shape_str(c.x), c.eps, c.frozen_affine);
    const index_t d = c.x.back();
    std::vector<GradcheckInput> in{{random_tensor(c.x, rng)},
                                   {random_tensor({d}, rng), !c.frozen_affine},
                                   {random_tensor({d}, rng), !c.frozen_affine}};
    require_gradcheck(
        in, [&](Tape<double>& t, const std::vector<Var>& v) { return layer_norm(t, v[0], v[1], v[2], c.eps); });
  }
}

TEST_CASE("layer_norm: gradient reaches only the affine parameters when x is constant", "[ops][norm]") {
  std::mt19937_64 rng(24);
  std::vector<GradcheckInput> in{
      {random_tensor({3, 4}, rng), false}, {random_tensor({4}, rng)}, {random_tensor({4}, rng)}};
  require_gradcheck(in,
                    [](Tape<double>& t, const std::vector<Var>& v) { return layer_norm(t, v[0], v[1], v[2], 1e-5); });
}

TEST_CASE("rms_norm: VJP and JVP against finite differences", "[ops][norm]") {
  std::mt19937_64 rng(25);
  struct Case {
    Shape x;
    double eps;
    bool frozen_gamma;
    bool frozen_x;
  };
  for (const Case& c :
       {Case{{5, 4}, 1e-6, false, false}, Case{{1, 6}, 1e-6, false, false}, Case{{3, 1}, 1e-6, false, false},
        Case{{2, 3, 5}, 1e-6, false, false}, Case{{4, 3}, 0.5, false, false}, Case{{4, 5}, 1e-6, true, false},
        Case{{4, 5}, 1e-6, false, true}, Case{{1, 1}, 1e-2, false, false}}) {
    CAPTURE(shape_str(c.x), c.eps, c.frozen_gamma, c.frozen_x);
    const index_t d = c.x.back();
    std::vector<GradcheckInput> in{{random_tensor(c.x, rng), !c.frozen_x}, {random_tensor({d}, rng), !c.frozen_gamma}};
    require_gradcheck(in, [&](Tape<double>& t, const std::vector<Var>& v) { return rms_norm(t, v[0], v[1], c.eps); });
  }
}

TEST_CASE("norms: float forward agrees with double", "[ops][norm][float]") {
  std::mt19937_64 rng(26);
  TensorD x = random_tensor({7, 32}, rng, 2.0);
  for (index_t j = 0; j < 32; ++j) x[j] += 50.0;  // an offset row
  const TensorD g = random_tensor({32}, rng), b = random_tensor({32}, rng);
  CHECK(float_vs_double({x, g, b}, [](auto& t, const std::vector<Var>& v) {
          return layer_norm(t, v[0], v[1], v[2], 1e-5);
        }) < 1e-5);
  CHECK(float_vs_double({x, g}, [](auto& t, const std::vector<Var>& v) { return rms_norm(t, v[0], v[1], 1e-6); }) <
        1e-5);
}

TEST_CASE("norms: shape and eps errors are usage errors", "[ops][norm][errors]") {
  Tape<double> t;
  Var x = t.input(TensorD({2, 4})), g4 = t.input(TensorD({4})), g3 = t.input(TensorD({3}));
  Var g41 = t.input(TensorD({4, 1})), scalar = t.input(TensorD(Shape{}));
  REQUIRE_THROWS_AS(layer_norm(t, x, g3, g4, 1e-5), UsageError);
  REQUIRE_THROWS_WITH(layer_norm(t, x, g3, g4, 1e-5), Catch::Contains("layer_norm: gamma has shape [3], expected [4]"));
  REQUIRE_THROWS_WITH(layer_norm(t, x, g4, g41, 1e-5),
                      Catch::Contains("layer_norm: beta has shape [4, 1], expected [4]"));
  REQUIRE_THROWS_WITH(layer_norm(t, scalar, g4, g4, 1e-5), Catch::Contains("layer_norm: input shape []"));
  REQUIRE_THROWS_WITH(layer_norm(t, x, g4, g4, -1.0), Catch::Contains("layer_norm: eps = -1"));
  REQUIRE_THROWS_AS(rms_norm(t, x, g3, 1e-6), UsageError);
  REQUIRE_THROWS_WITH(rms_norm(t, x, g3, 1e-6), Catch::Contains("rms_norm: gamma has shape [3], expected [4]"));
  REQUIRE_THROWS_WITH(rms_norm(t, t.input(TensorD({2, 0})), t.input(TensorD({0})), 1e-6),
                      Catch::Contains("rms_norm: input shape [2, 0] has no feature dimension"));
  REQUIRE_THROWS_AS(rms_norm(t, x, g4, std::nan("")), UsageError);
  CHECK(t.num_nodes() == 0);
}
