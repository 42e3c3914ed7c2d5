// detail::count_nonzero_entries, which decides the probe's "nonzero
// param.grads" check: exact counts per entry across the 4096-element rows it
// counts in, with absent and all-zero entries.
#include <entropy_probe/probe/components.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

using namespace entropy_probe;

namespace {
struct Sizes {
  using scalar_type = double;
  using backend_type = CpuBackend;
  Parameter<double> one{Tensor<double>({1})};
  Parameter<double> row{Tensor<double>({4096})};
  Parameter<double> two_rows{Tensor<double>({2, 4097})};
  Parameter<double> absent{Tensor<double>({3})};
  Parameter<double> zeros{Tensor<double>({5000})};
  void named_parameters(const ParameterVisitor<double>& v) {
    v("one", one);
    v("row", row);
    v("two_rows", two_rows);
    v("absent", absent);
    v("zeros", zeros);
  }
};
}  // namespace

TEST_CASE("count_nonzero_entries: exact per entry, across row boundaries", "[probe][components]") {
  Sizes m;
  auto reg = Registry<double>::build(m);
  auto buf = zeros_like_params<double>(reg);
  buf.erase(m.absent.id());
  buf.find(m.one.id())->data()[0] = 2.5;
  double* r = buf.find(m.row.id())->data();
  r[0] = 1.0;
  r[4095] = -1.0;
  double* t = buf.find(m.two_rows.id())->data();
  for (index_t i : {4095, 4096, 8193}) t[i] = 1e-300;  // the last of row 0, the first of row 1, the very last
  t[10] = std::numeric_limits<double>::quiet_NaN();    // not zero: counted
  buf.find(m.zeros.id())->data()[7] = -0.0;            // zero

  const std::vector<index_t> counts = detail::count_nonzero_entries(buf);
  CHECK(counts == std::vector<index_t>{1, 2, 4, 0, 0});
}

TEST_CASE("count_nonzero_entries: the one pass over the flat storage equals a count per entry", "[probe][components]") {
  Sizes m;
  auto reg = Registry<double>::build(m);
  auto buf = zeros_like_params<double>(reg);
  std::mt19937 rng(5);
  std::uniform_real_distribution<double> u(0, 1);
  for (index_t i = 0; i < buf.size(); ++i)
    for (index_t k = 0; k < buf.entry(i)->numel(); ++k) (*buf.entry(i))[k] = u(rng) < 0.3 ? u(rng) : 0.0;
  buf.erase(m.row.id());  // absent between present entries
  std::vector<index_t> want;
  for (index_t i = 0; i < buf.size(); ++i) {
    index_t n = 0;
    if (const auto* t = buf.entry(i))
      for (double v : t->to_host()) n += v != 0.0;
    want.push_back(n);
  }
  CHECK(want[1] == 0);
  CHECK(want[2] > 0);
  CHECK(detail::count_nonzero_entries(buf) == want);
}
