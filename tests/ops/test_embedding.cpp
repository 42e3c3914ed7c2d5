#include "../support/gradcheck.hpp"

#include <entropy_probe/tape/ops/embedding.hpp>

#include <cstdint>
#include <vector>

using namespace entropy_probe;
using namespace ep_test;

namespace {}  // namespace

TEST_CASE("embedding: rows are gathered by id", "[ops][embedding]") {
  std::mt19937_64 rng(31);
  const index_t v = 7, d = 3;
  const TensorD table = random_tensor({v, d}, rng);
  const std::vector<std::int32_t> ids{4, 0, 6, 4};
  Tape<double> t;
  const TensorD y = t.value(embedding(t, t.input(table), ids));
  REQUIRE(y.shape() == Shape{4, d});
  for (index_t i = 0; i < 4; ++i)
    for (index_t j = 0; j < d; ++j) CHECK(y[i * d + j] == table[ids[static_cast<std::size_t>(i)] * d + j]);
}

TEST_CASE("embedding: VJP and JVP against finite differences (table differentiable, ids not)", "[ops][embedding]") {
  std::mt19937_64 rng(32);
  struct Case {
    index_t v, d;
    std::vector<std::int32_t> ids;
  };
  for (const Case& c : {Case{7, 3, {0, 3, 3, 6, 1, 3}}, Case{5, 4, {2}}, Case{6, 1, {5, 0, 5}}, Case{1, 3, {0, 0, 0}},
                        Case{4, 2, {3, 2, 1, 0}}}) {
    CAPTURE(c.v, c.d, c.ids);
    require_gradcheck({{random_tensor({c.v, c.d}, rng)}},
                      [&](Tape<double>& t, const std::vector<Var>& v) { return embedding(t, v[0], c.ids); });
  }
}

TEST_CASE("embedding: the table gradient scatter-adds repeated ids; the tangent is gathered", "[ops][embedding]") {
  std::mt19937_64 rng(33);
  const index_t v = 5, d = 2;
  const std::vector<std::int32_t> ids{1, 3, 1, 1, 4};
  Tape<double> t;
  Var table = t.input(random_tensor({v, d}, rng));
  Var y = embedding(t, table, ids);
  // cotangent row i = (i + 1) * [1, 10]
  TensorD cot({5, d});
  for (index_t i = 0; i < 5; ++i) {
    cot[i * d] = static_cast<double>(i + 1);
    cot[i * d + 1] = 10.0 * static_cast<double>(i + 1);
  }
  t.backward(y, cot);
  REQUIRE(t.grad(table) != nullptr);
  const TensorD& g = *t.grad(table);
  const double expect_row[5] = {0.0, 1 + 3 + 4, 0.0, 2, 5};  // sums of (i + 1) over the rows holding each id
  for (index_t r = 0; r < v; ++r) {
    CAPTURE(r);
    CHECK(g[r * d] == expect_row[r]);
    CHECK(g[r * d + 1] == 10.0 * expect_row[r]);
  }

  const TensorD tt = random_tensor({v, d}, rng);
  t.set_tangent(table, tt);
  t.jvp();
  REQUIRE(t.tangent(y) != nullptr);
  for (index_t i = 0; i < 5; ++i)
    for (index_t j = 0; j < d; ++j) CHECK((*t.tangent(y))[i * d + j] == tt[ids[static_cast<std::size_t>(i)] * d + j]);
}

TEST_CASE("embedding: a constant table records no gradient work; empty ids give an empty output", "[ops][embedding]") {
  std::mt19937_64 rng(34);
  Tape<double> t;
  Var table = t.constant(random_tensor({4, 3}, rng));
  Var y = embedding(t, table, std::vector<std::int32_t>{1, 2});
  CHECK_FALSE(t.requires_grad(y));
  Var e = embedding(t, t.input(random_tensor({4, 3}, rng)), std::span<const std::int32_t>{});
  CHECK(t.shape(e) == Shape{0, 3});
}

TEST_CASE("embedding: float forward agrees with double", "[ops][embedding][float]") {
  std::mt19937_64 rng(35);
  const std::vector<std::int32_t> ids{9, 0, 3, 3, 11, 5};
  CHECK(float_vs_double({random_tensor({12, 8}, rng)},
                        [&](auto& t, const std::vector<Var>& v) { return embedding(t, v[0], ids); }) < 1e-7);
}

TEST_CASE("embedding: out-of-range ids and a bad table shape are usage errors", "[ops][embedding][errors]") {
  Tape<double> t;
  Var table = t.input(TensorD({8192, 2}));
  std::vector<std::int32_t> ids(20, 5);
  ids[17] = 9000;
  REQUIRE_THROWS_AS(embedding(t, table, ids), UsageError);
  REQUIRE_THROWS_WITH(embedding(t, table, ids),
                      Catch::Contains("embedding: ids[17] = 9000 is outside the vocabulary [0, 8192)"));
  ids[17] = 8192;  // one past the end
  REQUIRE_THROWS_WITH(embedding(t, table, ids), Catch::Contains("ids[17] = 8192 is outside"));
  ids[17] = 8191;
  ids[3] = -1;
  REQUIRE_THROWS_WITH(embedding(t, table, ids), Catch::Contains("ids[3] = -1 is outside the vocabulary [0, 8192)"));
  Var flat = t.input(TensorD({16}));
  REQUIRE_THROWS_AS(embedding(t, flat, std::vector<std::int32_t>{0}), UsageError);
  REQUIRE_THROWS_WITH(embedding(t, flat, std::vector<std::int32_t>{0}),
                      Catch::Contains("embedding: table shape [16] is not [vocab, dim]"));
  CHECK(t.num_nodes() == 0);
}
