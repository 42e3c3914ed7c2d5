#include "../support/gradcheck.hpp"

#include <entropy_probe/tape/ops/elementwise.hpp>
#include <entropy_probe/tape/ops/slice.hpp>

#include <limits>

using namespace entropy_probe;
using namespace ep_test;

namespace {}  // namespace

TEST_CASE("slice_last: splitting a fused [.., 3C] into q, k, v recovers every element", "[ops][slice]") {
  std::mt19937_64 rng(51);
  const index_t b = 2, tt = 3, c = 4;
  const TensorD x = random_tensor({b, tt, 3 * c}, rng);
  Tape<double> t;
  Var vx = t.input(x);
  std::vector<TensorD> parts;
  for (index_t k = 0; k < 3; ++k) parts.push_back(t.value(slice_last(t, vx, k * c, c)));
  for (const TensorD& p : parts) CHECK(p.shape() == Shape{b, tt, c});
  for (index_t r = 0; r < b * tt; ++r)
    for (index_t k = 0; k < 3; ++k)
      for (index_t j = 0; j < c; ++j) CHECK(parts[static_cast<std::size_t>(k)][r * c + j] == x[r * 3 * c + k * c + j]);
}

TEST_CASE("slice_last: VJP scatters into the slice only; JVP slices the tangent", "[ops][slice]") {
  std::mt19937_64 rng(52);
  Tape<double> t;
  Var x = t.input(random_tensor({3, 5}, rng));
  Var y = slice_last(t, x, 1, 3);
  const TensorD cot = random_tensor({3, 3}, rng);
  t.backward(y, cot);
  REQUIRE(t.grad(x) != nullptr);
  for (index_t r = 0; r < 3; ++r)
    for (index_t j = 0; j < 5; ++j) {
      CAPTURE(r, j);
      CHECK((*t.grad(x))[r * 5 + j] == ((j >= 1 && j < 4) ? cot[r * 3 + j - 1] : 0.0));
    }
  const TensorD tx = random_tensor({3, 5}, rng);
  t.set_tangent(x, tx);
  t.jvp();
  REQUIRE(t.tangent(y) != nullptr);
  for (index_t r = 0; r < 3; ++r)
    for (index_t j = 0; j < 3; ++j) CHECK((*t.tangent(y))[r * 3 + j] == tx[r * 5 + j + 1]);
}

TEST_CASE("slice_last: VJP and JVP against finite differences", "[ops][slice]") {
  std::mt19937_64 rng(53);
  struct Case {
    Shape x;
    index_t offset, width;
  };
  for (const Case& c : {Case{{4, 9}, 3, 3}, Case{{4, 9}, 0, 9}, Case{{4, 9}, 8, 1}, Case{{2, 3, 6}, 2, 4},
                        Case{{1, 5}, 1, 2}, Case{{5, 1}, 0, 1}, Case{{7}, 2, 5}}) {
    CAPTURE(shape_str(c.x), c.offset, c.width);
    require_gradcheck({{random_tensor(c.x, rng)}}, [&](Tape<double>& t, const std::vector<Var>& v) {
      return slice_last(t, v[0], c.offset, c.width);
    });
  }
}

TEST_CASE("slice_last: overlapping slices of one input accumulate their gradients", "[ops][slice]") {
  std::mt19937_64 rng(54);
  require_gradcheck({{random_tensor({3, 6}, rng)}}, [](Tape<double>& t, const std::vector<Var>& v) {
    return mul(t, slice_last(t, v[0], 0, 4), slice_last(t, v[0], 2, 4));
  });
}

TEST_CASE("slice_last: float forward agrees with double", "[ops][slice][float]") {
  std::mt19937_64 rng(55);
  CHECK(float_vs_double({random_tensor({5, 12}, rng)},
                        [](auto& t, const std::vector<Var>& v) { return slice_last(t, v[0], 4, 4); }) < 1e-7);
}

TEST_CASE("slice_last: out-of-range slices are usage errors", "[ops][slice][errors]") {
  Tape<double> t;
  Var x = t.input(TensorD({2, 9}));
  REQUIRE_THROWS_AS(slice_last(t, x, 6, 4), UsageError);
  REQUIRE_THROWS_WITH(slice_last(t, x, 6, 4),
                      Catch::Contains("slice_last: [6, 6 + 4) is outside the last dimension [0, 9) of shape [2, 9]"));
  REQUIRE_THROWS_WITH(slice_last(t, x, -1, 2), Catch::Contains("[-1, -1 + 2) is outside"));
  REQUIRE_THROWS_WITH(slice_last(t, x, 2, -1), Catch::Contains("[2, 2 + -1) is outside"));
  REQUIRE_THROWS_WITH(slice_last(t, x, 10, 0), Catch::Contains("is outside the last dimension [0, 9)"));
  REQUIRE_THROWS_AS(slice_last(t, x, 1, std::numeric_limits<index_t>::max()), UsageError);
  REQUIRE_THROWS_WITH(slice_last(t, t.input(TensorD(Shape{})), 0, 1), Catch::Contains("cannot slice a scalar"));
  CHECK(t.num_nodes() == 0);
}
