#include "../support/gradcheck.hpp"

#include <entropy_probe/tape/ops/rotary.hpp>

#include <cmath>
#include <complex>
#include <cstdint>
#include <vector>

using namespace entropy_probe;
using namespace ep_test;

namespace {

// Rotate-half RoPE as complex multiplication, written independently of the
// op: z_i = x_i + i x_{i + Dh/2} is multiplied by exp(i pos theta^(-2i/Dh)).
TensorD rotary_ref(const TensorD& x, const std::vector<std::int32_t>& pos, index_t heads, double theta) {
  const index_t rows = static_cast<index_t>(pos.size());
  const index_t dh = x.numel() / rows / heads, half = dh / 2;
  TensorD y(x.shape());
  for (index_t r = 0; r < rows; ++r)
    for (index_t h = 0; h < heads; ++h)
      for (index_t i = 0; i < half; ++i) {
        const index_t base = (r * heads + h) * dh;
        const double freq = std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(dh));
        const std::complex<double> z(x[base + i], x[base + i + half]);
        const std::complex<double> w = z * std::polar(1.0, pos[static_cast<std::size_t>(r)] * freq);
        y[base + i] = w.real();
        y[base + i + half] = w.imag();
      }
  return y;
}

}  // namespace

TEST_CASE("rotary: position 0 is the identity", "[ops][rotary]") {
  std::mt19937_64 rng(41);
  const TensorD x = random_tensor({3, 2, 8}, rng);
  Tape<double> t;
  const TensorD y = t.value(rotary(t, t.input(x), std::vector<std::int32_t>{0, 0, 0}, 2, 10000.0));
  REQUIRE(y.shape() == x.shape());
  for (index_t i = 0; i < x.numel(); ++i) CHECK(y[i] == x[i]);
}

TEST_CASE("rotary: agrees with complex rotation and preserves per-pair norms", "[ops][rotary]") {
  std::mt19937_64 rng(42);
  const index_t heads = 3, dh = 8, half = dh / 2;
  const std::vector<std::int32_t> pos{0, 1, 7, 100, 2047};
  for (double theta : {10000.0, 1000000.0, 3.0}) {
    CAPTURE(theta);
    const TensorD x = random_tensor({5, heads, dh}, rng);
    Tape<double> t;
    const TensorD y = t.value(rotary(t, t.input(x), pos, heads, theta));
    const TensorD ref = rotary_ref(x, pos, heads, theta);
    for (index_t i = 0; i < x.numel(); ++i) CHECK(y[i] == Approx(ref[i]).margin(1e-14));
    for (index_t p = 0; p < 5 * heads; ++p)
      for (index_t i = 0; i < half; ++i) {
        const double a = x[p * dh + i], b = x[p * dh + i + half];
        const double c = y[p * dh + i], d = y[p * dh + i + half];
        CHECK(c * c + d * d == Approx(a * a + b * b).epsilon(1e-14));
      }
  }
}

TEST_CASE("rotary: known angles (Dh = 4, theta = 10000: frequencies 1 and 0.01)", "[ops][rotary]") {
  Tape<double> t;
  const TensorD x = TensorD::from_host({1, 1, 4}, std::vector<double>{1.0, 2.0, 3.0, 4.0});
  const TensorD y = t.value(rotary(t, t.input(x), std::vector<std::int32_t>{3}, 1, 10000.0));
  // pair 0 = (x0, x2) by angle 3, pair 1 = (x1, x3) by angle 0.03
  CHECK(y[0] == Approx(1.0 * std::cos(3.0) - 3.0 * std::sin(3.0)).epsilon(1e-15));
  CHECK(y[2] == Approx(3.0 * std::cos(3.0) + 1.0 * std::sin(3.0)).epsilon(1e-15));
  CHECK(y[1] == Approx(2.0 * std::cos(0.03) - 4.0 * std::sin(0.03)).epsilon(1e-15));
  CHECK(y[3] == Approx(4.0 * std::cos(0.03) + 2.0 * std::sin(0.03)).epsilon(1e-15));
}

TEST_CASE("rotary: [N, H, Dh] and [R, T, H*Dh] layouts and a shared table give the same result", "[ops][rotary]") {
  std::mt19937_64 rng(43);
  const index_t r = 2, tt = 3, heads = 2, dh = 6;
  const std::vector<std::int32_t> pos{0, 1, 2, 5, 6, 7};
  const TensorD x = random_tensor({r * tt, heads, dh}, rng);
  Tape<double> t;
  const TensorD a = t.value(rotary(t, t.input(x), pos, heads, 500.0));
  const TensorD b = t.value(rotary(t, t.input(x.reshaped({r, tt, heads * dh})), pos, heads, 500.0));
  auto table = make_rotary_table<double>(pos, dh, 500.0);
  REQUIRE(table->cos.shape() == Shape{6, 3});
  const TensorD c = t.value(rotary(t, t.input(x), table, heads));
  const TensorD d = t.value(rotary(t, t.input(x.reshaped({r, tt, heads, dh})), table, heads));
  CHECK(b.shape() == Shape{r, tt, heads * dh});
  for (index_t i = 0; i < x.numel(); ++i) {
    CHECK(a[i] == b[i]);
    CHECK(a[i] == c[i]);
    CHECK(a[i] == d[i]);
  }
}

TEST_CASE("rotary: the VJP is the rotation by the negated angle", "[ops][rotary]") {
  std::mt19937_64 rng(44);
  const std::vector<std::int32_t> pos{3, 11, 40}, neg{-3, -11, -40};
  Tape<double> t;
  Var x = t.input(random_tensor({3, 2, 4}, rng));
  Var y = rotary(t, x, pos, 2, 10000.0);
  const TensorD cot = random_tensor({3, 2, 4}, rng);
  t.backward(y, cot);
  REQUIRE(t.grad(x) != nullptr);
  const TensorD g = *t.grad(x);
  const TensorD back = rotary_ref(cot, neg, 2, 10000.0);
  for (index_t i = 0; i < cot.numel(); ++i) CHECK(g[i] == Approx(back[i]).margin(1e-14));
}

TEST_CASE("rotary: VJP and JVP against finite differences", "[ops][rotary]") {
  std::mt19937_64 rng(45);
  struct Case {
    Shape x;
    std::vector<std::int32_t> pos;
    index_t heads;
    double theta;
  };
  for (const Case& c : {Case{{3, 2, 4}, {0, 5, 17}, 2, 10000.0}, Case{{4, 1, 2}, {0, 1, 2, 3}, 1, 10000.0},
                        Case{{1, 3, 6}, {9}, 3, 10000.0}, Case{{2, 3, 12}, {0, 1, 2, 0, 1, 2}, 2, 100.0},
                        Case{{1, 1, 2}, {1}, 1, 10000.0}, Case{{2, 4, 2}, {1000, 2}, 4, 1e6}}) {
    CAPTURE(shape_str(c.x), c.pos, c.heads, c.theta);
    require_gradcheck({{random_tensor(c.x, rng)}}, [&](Tape<double>& t, const std::vector<Var>& v) {
      return rotary(t, v[0], c.pos, c.heads, c.theta);
    });
  }
}

TEST_CASE("rotary: float forward agrees with double", "[ops][rotary][float]") {
  std::mt19937_64 rng(46);
  std::vector<std::int32_t> pos(16);
  for (std::size_t i = 0; i < pos.size(); ++i) pos[i] = static_cast<std::int32_t>(7 * i);
  CHECK(float_vs_double({random_tensor({16, 4, 16}, rng)},
                        [&](auto& t, const std::vector<Var>& v) { return rotary(t, v[0], pos, 4, 10000.0); }) < 1e-5);
}

TEST_CASE("rotary: bad shapes, head counts and theta are usage errors", "[ops][rotary][errors]") {
  Tape<double> t;
  const std::vector<std::int32_t> pos3{0, 1, 2};
  Var x = t.input(TensorD({3, 2, 6}));
  Var odd = t.input(TensorD({3, 2, 5}));
  REQUIRE_THROWS_AS(rotary(t, odd, pos3, 2, 10000.0), UsageError);
  REQUIRE_THROWS_WITH(rotary(t, odd, pos3, 2, 10000.0), Catch::Contains("head dimension 5 must be even"));
  REQUIRE_THROWS_WITH(rotary(t, x, std::vector<std::int32_t>{0, 1}, 2, 1e4),
                      Catch::Contains("rotary: x of shape [3, 2, 6] does not split into 2 rows"));
  REQUIRE_THROWS_WITH(rotary(t, x, pos3, 5, 1e4), Catch::Contains("not divisible by n_heads = 5"));
  REQUIRE_THROWS_WITH(rotary(t, x, pos3, 0, 1e4), Catch::Contains("n_heads = 0 must be positive"));
  REQUIRE_THROWS_WITH(rotary(t, x, pos3, 2, 0.0), Catch::Contains("theta = 0 must be positive"));
  auto table = make_rotary_table<double>(pos3, 4, 1e4);
  REQUIRE_THROWS_AS(rotary(t, x, table, 2), UsageError);
  REQUIRE_THROWS_WITH(rotary(t, x, table, 2), Catch::Contains("expected 2 heads x head_dim 4 = 8"));
  auto short_table = make_rotary_table<double>(std::vector<std::int32_t>{0, 1}, 6, 1e4);
  REQUIRE_THROWS_WITH(rotary(t, x, short_table, 2), Catch::Contains("does not split into 2 rows"));
  REQUIRE_THROWS_WITH(make_rotary_table<double>(pos3, 3, 1e4), Catch::Contains("head dimension 3 must be even"));
  CHECK(t.num_nodes() == 0);
}
