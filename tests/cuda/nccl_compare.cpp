// check_same_result: the NCCL run's result against one CPU process through
// to_json, so that every field is compared (timings excepted), with the rule
// of the MPI tests (tests/distributed/mpi_parity.cpp): 1e-12 relative, and a
// difference of two entropies (deltaH_true, deltaH_true_tok) relative to the
// entropy it is taken from. Two more scales, from the CUDA parity harness
// (backend_parity.hpp), because the device sums in another order than the
// CPU: a dot product (bars_dot, deltaH1 = eta bars_dot) relative to
// |mu_X| |mu_Y| (its rounding bound), and an element of a per-prompt vector
// (s_values) relative to the vector's largest magnitude. And V_X, V_Y relative
// to V_X + V_Y, the variance SE_deltaH1 reports: with B_U = 1, V_Y is zero but
// for rounding, which no relative rule can compare.
#include "nccl_test.hpp"

#include <entropy_probe/io/result_json.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>

namespace {

void require_close(const nlohmann::json& a, const nlohmann::json& b, const std::string& path, double scale) {
  if (a.is_number() && b.is_number()) {
    const double x = a.get<double>(), y = b.get<double>();
    INFO(path << ": NCCL/CUDA " << x << " one CPU process " << y << " (scale " << scale << ")");
    CHECK(std::abs(x - y) <= 1e-12 * std::max({std::abs(x), std::abs(y), scale, 1e-300}));
  } else if (a.is_array() && b.is_array()) {
    REQUIRE(a.size() == b.size());
    double vec_scale = scale;
    for (const auto& v : b)
      if (v.is_number()) vec_scale = std::max(vec_scale, std::abs(v.get<double>()));
    for (std::size_t i = 0; i < a.size(); ++i)
      require_close(a[i], b[i], path + "[" + std::to_string(i) + "]", vec_scale);
  } else if (a.is_object() && b.is_object()) {
    const double dot_scale = b.value("mu_X_norm", 0.0) * b.value("mu_Y_norm", 0.0);
    for (auto it = b.begin(); it != b.end(); ++it) {
      if (it.key() == "timing") continue;  // seconds differ, the keys must not
      INFO(path << "." << it.key());
      REQUIRE(a.contains(it.key()));
      double sc = 0;
      if (it.key() == "deltaH_true") sc = std::abs(b.value("H_orig", 0.0));
      if (it.key() == "deltaH_true_tok") sc = std::abs(b.value("H_orig_tok", 0.0));
      if (it.key() == "bars_dot") sc = dot_scale;
      if (it.key() == "deltaH1") sc = std::abs(b.value("learning_rate", 0.0)) * dot_scale;
      if (it.key() == "V_X" || it.key() == "V_Y") sc = std::abs(b.value("V_X", 0.0) + b.value("V_Y", 0.0));
      require_close(a[it.key()], it.value(), path + "." + it.key(), sc);
    }
    CHECK(a.size() == b.size());
  } else {
    CHECK(a == b);
  }
}

}  // namespace

namespace ep_nccl_test {

void check_same_result(const entropy_probe::ProbeResult& got, const entropy_probe::ProbeResult& want,
                       const std::string& tag) {
  require_close(entropy_probe::to_json(got), entropy_probe::to_json(want), tag, 0);
}

}  // namespace ep_nccl_test
