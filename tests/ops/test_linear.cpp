#include "../support/gradcheck.hpp"

#include <entropy_probe/tape/ops/elementwise.hpp>
#include <entropy_probe/tape/ops/linear.hpp>
#include <entropy_probe/tape/ops/rotary.hpp>
#include <entropy_probe/tape/ops/view.hpp>

using namespace entropy_probe;
using namespace ep_test;

TEST_CASE("linear: VJP and JVP against finite differences", "[ops][linear]") {
  std::mt19937_64 rng(1);
  struct Case {
    index_t n, in, out;
    bool bias;
  };
  for (Case c : {Case{5, 4, 3, true}, Case{1, 4, 3, true}, Case{5, 1, 3, false}, Case{5, 4, 1, true}}) {
    CAPTURE(c.n, c.in, c.out, c.bias);
    std::vector<GradcheckInput> in{{random_tensor({c.n, c.in}, rng)}, {random_tensor({c.out, c.in}, rng)}};
    if (c.bias) in.push_back({random_tensor({c.out}, rng)});
    require_gradcheck(in, [&](Tape<double>& t, const std::vector<Var>& v) {
      return c.bias ? linear(t, v[0], v[1], v[2]) : linear(t, v[0], v[1]);
    });
  }
}

TEST_CASE("linear: leading dimensions are flattened", "[ops][linear]") {
  std::mt19937_64 rng(2);
  require_gradcheck({{random_tensor({2, 3, 4}, rng)}, {random_tensor({5, 4}, rng)}},
                    [](Tape<double>& t, const std::vector<Var>& v) { return linear(t, v[0], v[1]); });
}

TEST_CASE("lora_linear: VJP and JVP against finite differences", "[ops][lora]") {
  std::mt19937_64 rng(3);
  struct Case {
    index_t n, in, out, r;
    bool bias;
    bool frozen_w;
  };
  for (Case c : {Case{6, 5, 4, 2, true, true}, Case{6, 5, 4, 1, false, true}, Case{1, 5, 4, 3, true, false},
                 Case{4, 1, 1, 1, true, false}}) {
    CAPTURE(c.n, c.in, c.out, c.r, c.bias, c.frozen_w);
    std::vector<GradcheckInput> in{{random_tensor({c.n, c.in}, rng)},
                                   {random_tensor({c.out, c.in}, rng), !c.frozen_w},
                                   {random_tensor({c.r, c.in}, rng)},
                                   {random_tensor({c.out, c.r}, rng)},
                                   {random_tensor({c.out}, rng)}};
    require_gradcheck(in, [&](Tape<double>& t, const std::vector<Var>& v) {
      return lora_linear(t, v[0], v[1], c.bias ? std::optional<Var>(v[4]) : std::nullopt, v[2], v[3], 0.75);
    });
  }
}

TEST_CASE("lora_linear equals base linear plus the scaled low-rank product", "[ops][lora]") {
  std::mt19937_64 rng(4);
  Tape<double> t;
  Var x = t.input(random_tensor({3, 4}, rng)), w = t.input(random_tensor({2, 4}, rng));
  Var a = t.input(random_tensor({2, 4}, rng)), b = t.input(random_tensor({2, 2}, rng));
  Var y = lora_linear(t, x, w, std::nullopt, a, b, 0.5);
  Var base = linear(t, x, w);
  Var u = linear(t, x, a);
  Var low = linear(t, u, b);
  for (index_t i = 0; i < 6; ++i)
    CHECK(t.value(y)[i] == Approx(t.value(base)[i] + 0.5 * t.value(low)[i]).epsilon(1e-14));
}

TEST_CASE("reshape: VJP and JVP against finite differences", "[ops][reshape]") {
  std::mt19937_64 rng(5);
  require_gradcheck({{random_tensor({2, 3, 4}, rng)}}, [](Tape<double>& t, const std::vector<Var>& v) {
    return reshape(t, v[0], {6, 4});
  });
  Tape<double> t;
  Var x = t.input(random_tensor({2, 3}, rng));
  REQUIRE_THROWS_WITH(reshape(t, x, {4, 2}), Catch::Contains("element counts differ"));
}

// One value with several consumers: the first rule to reach its gradient in
// the backward pass assigns (grad_into is fresh), the others add; the jvp
// rules assign their outputs. Every rule kind that does this takes part:
// products (linear, lora_linear), elementwise maps (add, mul, silu), reshape,
// rotary. With the test build's NaN poisoning, a missed element fails.
TEST_CASE("rules that assign on first touch and add afterwards: a shared input", "[ops][lora][tape]") {
  std::mt19937_64 rng(11);
  const std::vector<std::int32_t> pos{0, 1, 2, 3};
  auto table = make_rotary_table<double, CpuBackend>(pos, 2, 10000.0);
  auto build = [&](Tape<double>& t, const std::vector<Var>& v) {
    const Var x = v[0], w = v[1], a = v[2], b = v[3], bias = v[4];
    Var h = lora_linear(t, x, w, std::nullopt, a, b, 0.5);  // [4, 6]
    Var m = mul(t, h, silu(t, x));
    Var s = add(t, m, x);
    Var s2 = add(t, s, s);  // the same value twice
    Var r = rotary(t, reshape(t, s2, {4, 6}), table, 3);
    Var y = linear(t, r, w, bias);
    return add(t, y, mul(t, x, x));  // x's last consumer: first in the backward pass
  };
  for (bool x_diff : {true, false})
    for (bool w_diff : {true, false}) {
      CAPTURE(x_diff, w_diff);
      std::vector<GradcheckInput> in{{random_tensor({4, 6}, rng), x_diff},
                                     {random_tensor({6, 6}, rng, 0.5), w_diff},
                                     {random_tensor({2, 6}, rng)},
                                     {random_tensor({6, 2}, rng)},
                                     {random_tensor({6}, rng)}};
      require_gradcheck(in, build);
    }
  // Only the bias carries a tangent: the linear's output tangent is zero-filled, then the bias added.
  require_gradcheck(
      {{random_tensor({3, 4}, rng), false}, {random_tensor({2, 4}, rng), false}, {random_tensor({2}, rng)}},
      [](Tape<double>& t, const std::vector<Var>& v) { return linear(t, v[0], v[1], v[2]); });
}
