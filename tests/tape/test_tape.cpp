#include <entropy_probe/tape/ops/linear.hpp>

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
