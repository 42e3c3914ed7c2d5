#include <entropy_probe/tape/ops/linear.hpp>
#include <entropy_probe/tape/ops/norm.hpp>

#include <cmath>

#include <catch2/catch.hpp>

using namespace entropy_probe;

TEST_CASE("tape: backward with an arbitrary cotangent, repeatable on one forward", "[tape]") {
  Tape<double> t;
  Var x = t.input(Tensor<double>::from_host({1, 2}, std::vector<double>{1, 2}));
  Var w = t.constant(Tensor<double>::from_host({2, 2}, std::vector<double>{1, 0, 0, 3}));
  Var y = linear(t, x, w);  // y = [1, 6]
  t.backward(y, Tensor<double>::from_host({1, 2}, std::vector<double>{2, 0}));
  CHECK((*t.grad(x))[0] == 2.0);
  CHECK((*t.grad(x))[1] == 0.0);
  t.backward(y, Tensor<double>::from_host({1, 2}, std::vector<double>{0, 1}));  // starts from zero again
  CHECK((*t.grad(x))[0] == 0.0);
  CHECK((*t.grad(x))[1] == 3.0);
  REQUIRE_THROWS_WITH(t.backward(y, Tensor<double>({2})), Catch::Contains("cotangent shape"));
}

TEST_CASE("tape: constants receive no gradient; jvp without tangents gives none", "[tape]") {
  Tape<double> t;
  Var x = t.constant(Tensor<double>::full({1, 2}, 1.0));
  Var w = t.input(Tensor<double>::full({3, 2}, 1.0));
  Var y = linear(t, x, w);
  t.backward(y, Tensor<double>::full({1, 3}, 1.0));
  CHECK(t.grad(x) == nullptr);
  REQUIRE(t.grad(w) != nullptr);
  t.jvp();
  CHECK(t.tangent(y) == nullptr);  // exactly zero, never materialised
  t.set_tangent(w, Tensor<double>::full({3, 2}, 1.0));
  t.jvp();
  REQUIRE(t.tangent(y) != nullptr);
  CHECK((*t.tangent(y))[2] == 2.0);
  REQUIRE_THROWS_WITH(t.set_tangent(y, Tensor<double>({1, 3})), Catch::Contains("not a leaf"));
  REQUIRE_THROWS_WITH(t.set_tangent(w, Tensor<double>({2, 3})), Catch::Contains("tangent shape"));
}

TEST_CASE("tape: a var from another tape is rejected", "[tape]") {
  Tape<double> a, b;
  Var x = a.input(Tensor<double>({1, 1}));
  (void)a.input(Tensor<double>({1, 1}));
  REQUIRE_THROWS_AS(b.value(x), UsageError);
}

TEST_CASE("tape: grad_into is fresh (unfilled) on first touch only; tangent_into is unfilled", "[tape]") {
  Tape<double> t;
  Var x = t.input(Tensor<double>({2, 3}));
  const OutRef<double> first = t.grad_into(x);
  CHECK(first.fresh);
  CHECK(first.beta() == 0.0);
  // Test builds poison unfilled storage (ENTROPY_PROBE_POISON_UNINITIALIZED),
  // which is what makes a missed element visible in the op tests.
  REQUIRE(kPoisonUninitialized);
  CHECK(std::isnan(first.data[0]));
  for (index_t i = 0; i < 6; ++i) first.data[i] = 1.0;
  const OutRef<double> second = t.grad_into(x);
  CHECK_FALSE(second.fresh);
  CHECK(second.beta() == 1.0);
  CHECK(second.data == first.data);
  CHECK(second.size == 6);
  OutRef<double> again = t.grad_into(x);
  CHECK(again.zeroed() == first.data);  // the same buffer, not refilled: it is no longer fresh
  CHECK(first.data[5] == 1.0);
  const OutRef<double> tan = t.tangent_into(x);
  CHECK(tan.fresh);
  CHECK(std::isnan(tan.data[0]));
}

TEST_CASE("tape: OutRef::zeroed fills a fresh buffer only; add assigns while fresh", "[tape]") {
  Tape<double> t;
  Var x = t.input(Tensor<double>({3}));
  OutRef<double> g = t.grad_into(x);
  REQUIRE(g.fresh);
  double* p = g.zeroed();
  CHECK_FALSE(g.fresh);
  for (index_t i = 0; i < 3; ++i) CHECK(p[i] == 0.0);
  g.add(1, 2.0);
  g.add(1, 3.0);
  CHECK(p[1] == 5.0);  // not fresh: adds
  Var y = t.input(Tensor<double>({2}));
  const OutRef<double> h = t.grad_into(y);
  h.add(0, 4.0);  // fresh: assigns over the unfilled (NaN-poisoned) storage
  h.add(1, -1.0);
  CHECK(h.data[0] == 4.0);
  CHECK(h.data[1] == -1.0);
}

TEST_CASE("tape: SumOut assigns with its first product and zero-fills when only adders run", "[tape]") {
  Tape<double> t;
  Var x = t.input(Tensor<double>({4}));
  SumOut<double, CpuBackend> s(t.tangent_into(x));
  CHECK(s.beta() == 0.0);
  CHECK(s.beta() == 1.0);  // later terms add
  CHECK_FALSE(s.term().fresh);
  Var w = t.input(Tensor<double>({4}));
  SumOut<double, CpuBackend> k(t.tangent_into(w));
  CHECK(k.term().fresh);  // a kernel term first: its add() assigns
  CHECK(k.beta() == 1.0);
  Var y = t.input(Tensor<double>({4}));
  SumOut<double, CpuBackend> z(t.tangent_into(y));
  double* p = z.zeroed();
  for (index_t i = 0; i < 4; ++i) CHECK(p[i] == 0.0);
  CHECK(z.beta() == 1.0);  // after zeroed() every term adds
}

// An op's saved state lives once on the tape (save_for_rules), shared by its
// backward and jvp closures: recording holds the output and the saved tensors
// and nothing more, where state captured by value was held once per closure.
TEST_CASE("tape: saved op state is held once, not copied into each rule", "[tape]") {
  using Cpu = CpuBackend;
  const index_t n = 64, in = 32, out = 48, r = 8;
  Tape<double> t;
  Var x = t.input(Tensor<double>::full({n, in}, 0.5));
  Var w = t.input(Tensor<double>::full({out, in}, 0.25));
  Var a = t.input(Tensor<double>::full({r, in}, 0.125));
  Var b = t.input(Tensor<double>::full({out, r}, 0.5));
  Var gamma = t.input(Tensor<double>::full({in}, 1.0));
  Var beta = t.input(Tensor<double>::full({in}, 0.0));
  // What the same tensors cost when allocated directly (block sizes included).
  auto cost = [](std::initializer_list<Shape> shapes) {
    const std::size_t before = Cpu::memory_in_use();
    std::vector<Tensor<double>> held;
    for (const Shape& s : shapes) held.emplace_back(s);
    return Cpu::memory_in_use() - before;
  };
  std::size_t before = Cpu::memory_in_use();
  (void)lora_linear(t, x, w, std::nullopt, a, b, 2.0);
  CHECK(Cpu::memory_in_use() - before == cost({{n, out}, {n, r}}));  // y and the saved u
  before = Cpu::memory_in_use();
  (void)layer_norm(t, x, gamma, beta, 1e-5);
  CHECK(Cpu::memory_in_use() - before == cost({{n, in}, {n}, {n}}));  // y, mean and rstd
}
