#include "../support/gradcheck.hpp"

#include <entropy_probe/tape/ops/elementwise.hpp>
#include <entropy_probe/tape/ops/gather.hpp>

using namespace entropy_probe;
using namespace ep_test;

TEST_CASE("gather_rows picks rows; scatter_rows puts them back with zeros elsewhere", "[ops][gather]") {
  std::mt19937_64 rng(61);
  const TensorD x = random_tensor({2, 3, 4}, rng);  // 6 rows of 4
  const std::vector<std::int32_t> idx{0, 2, 5};
  Tape<double> t;
  Var g = gather_rows(t, t.input(x), idx);
  REQUIRE(t.shape(g) == Shape{3, 4});
  for (index_t k = 0; k < 3; ++k)
    for (index_t j = 0; j < 4; ++j) CHECK(t.value(g)[k * 4 + j] == x[idx[static_cast<std::size_t>(k)] * 4 + j]);
  Var s = scatter_rows(t, g, idx, 6);
  REQUIRE(t.shape(s) == Shape{6, 4});
  for (index_t r = 0; r < 6; ++r)
    for (index_t j = 0; j < 4; ++j) {
      const bool kept = r == 0 || r == 2 || r == 5;
      CHECK(t.value(s)[r * 4 + j] == (kept ? x[r * 4 + j] : 0.0));
    }
  Var v = scatter_rows(t, t.input(TensorD::from_host({2}, std::vector<double>{1.5, -2.0})),
                       std::vector<std::int32_t>{1, 3}, 4);
  CHECK(t.value(v).to_host() == std::vector<double>{0.0, 1.5, 0.0, -2.0});
}

TEST_CASE("gather_rows and scatter_rows: VJP and JVP against finite differences", "[ops][gather]") {
  std::mt19937_64 rng(62);
  struct Case {
    Shape x;
    std::vector<std::int32_t> idx;
  };
  for (const Case& c : {Case{{5, 3}, {1, 4}}, Case{{2, 3, 2}, {0, 1, 2, 3, 4, 5}}, Case{{4, 1}, {3}}, Case{{7}, {0, 6}},
                        Case{{3, 4}, {}}}) {
    CAPTURE(shape_str(c.x), c.idx.size());
    require_gradcheck({{random_tensor(c.x, rng)}},
                      [&](Tape<double>& t, const std::vector<Var>& v) { return gather_rows(t, v[0], c.idx); });
    const index_t d = c.x.size() == 1 ? 1 : c.x.back();
    const index_t n = numel_of(c.x) / d;
    Shape small{static_cast<index_t>(c.idx.size())};
    if (c.x.size() > 1) small.push_back(d);
    require_gradcheck({{random_tensor(small, rng)}},
                      [&](Tape<double>& t, const std::vector<Var>& v) { return scatter_rows(t, v[0], c.idx, n); });
  }
}

TEST_CASE("gather_rows: a row gathered next to other uses of x accumulates its gradient", "[ops][gather]") {
  std::mt19937_64 rng(63);
  require_gradcheck({{random_tensor({4, 3}, rng)}}, [](Tape<double>& t, const std::vector<Var>& v) {
    return mul(t, gather_rows(t, v[0], std::vector<std::int32_t>{0, 1, 3}),
               gather_rows(t, v[0], std::vector<std::int32_t>{1, 2, 3}));
  });
}

TEST_CASE("gather_rows / scatter_rows: bad indices are usage errors naming the index", "[ops][gather][errors]") {
  Tape<double> t;
  Var x = t.input(TensorD({4, 2}));
  REQUIRE_THROWS_WITH(gather_rows(t, x, std::vector<std::int32_t>{0, 4}),
                      Catch::Contains("gather_rows: index[1] = 4 is outside the 4 rows"));
  REQUIRE_THROWS_WITH(gather_rows(t, x, std::vector<std::int32_t>{-1}),
                      Catch::Contains("gather_rows: index[0] = -1 is outside"));
  REQUIRE_THROWS_WITH(gather_rows(t, x, std::vector<std::int32_t>{2, 2}),
                      Catch::Contains("strictly increasing, but index[1] = 2 follows 2"));
  REQUIRE_THROWS_WITH(scatter_rows(t, x, std::vector<std::int32_t>{0, 1, 2}, 5),
                      Catch::Contains("scatter_rows: x has shape [4, 2], expected [3, ...]"));
  REQUIRE_THROWS_WITH(scatter_rows(t, x, std::vector<std::int32_t>{0, 1, 2, 9}, 5),
                      Catch::Contains("scatter_rows: index[3] = 9 is outside the 5 rows"));
  CHECK(t.num_nodes() == 0);
}
