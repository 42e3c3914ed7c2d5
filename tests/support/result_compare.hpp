// Field-by-field comparison of two probe results (to_json), for the tests
// that run the same probe two ways (MPI ranks, NCCL on a GPU) against one
// process: 1e-12 relative, each field at the scale its rounding lives on,
// because the two runs sum in different orders:
//   - a difference of two entropies (deltaH_true, deltaH_true_tok) relative
//     to the entropy it is taken from (H_orig, H_orig_tok);
//   - a dot product (bars_dot, and deltaH1 = eta bars_dot) relative to
//     |mu_X| |mu_Y|, its rounding bound;
//   - an element of a per-prompt vector (s_values) relative to the vector's
//     largest magnitude;
//   - V_X, V_Y relative to V_X + V_Y, the variance SE_deltaH1 reports: with
//     B_U = 1, V_Y is zero but for rounding, which no relative rule compares.
// Timings and the microbatch sizes are skipped (the keys must still match):
// both describe how a run was executed, and each rank sizes its own shard.
#pragma once

#include <entropy_probe/comm/comm.hpp>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>

namespace ep_test {

inline void require_results_close(const nlohmann::json& a, const nlohmann::json& b, const std::string& path,
                                  double scale = 0) {
  if (a.is_number() && b.is_number()) {
    const double x = a.get<double>(), y = b.get<double>();
    INFO(path << ": compared " << x << " reference " << y << " (scale " << scale << ")");
    CHECK(std::abs(x - y) <= 1e-12 * std::max({std::abs(x), std::abs(y), scale, 1e-300}));
  } else if (a.is_array() && b.is_array()) {
    REQUIRE(a.size() == b.size());
    double vec_scale = scale;
    for (const auto& v : b)
      if (v.is_number()) vec_scale = std::max(vec_scale, std::abs(v.get<double>()));
    for (std::size_t i = 0; i < a.size(); ++i)
      require_results_close(a[i], b[i], path + "[" + std::to_string(i) + "]", vec_scale);
  } else if (a.is_object() && b.is_object()) {
    const double dot_scale = b.value("mu_X_norm", 0.0) * b.value("mu_Y_norm", 0.0);
    for (auto it = b.begin(); it != b.end(); ++it) {
      if (it.key() == "timing" || it.key() == "microbatch") continue;
      INFO(path << "." << it.key());
      REQUIRE(a.contains(it.key()));
      double sc = 0;
      if (it.key() == "deltaH_true") sc = std::abs(b.value("H_orig", 0.0));
      if (it.key() == "deltaH_true_tok") sc = std::abs(b.value("H_orig_tok", 0.0));
      if (it.key() == "bars_dot") sc = dot_scale;
      if (it.key() == "deltaH1") sc = std::abs(b.value("learning_rate", 0.0)) * dot_scale;
      if (it.key() == "V_X" || it.key() == "V_Y") sc = std::abs(b.value("V_X", 0.0) + b.value("V_Y", 0.0));
      require_results_close(a[it.key()], it.value(), path + "." + it.key(), sc);
    }
    CHECK(a.size() == b.size());
  } else {
    CHECK(a == b);
  }
}

// Rank 0's deltaH1 and SE_deltaH1, broadcast as bits, equal this rank's own:
// every rank reports the same result, not merely a close one.
inline void check_same_on_every_rank(entropy_probe::Communicator& comm, double deltaH1, double se_deltaH1) {
  double mine[2] = {deltaH1, se_deltaH1};
  std::int64_t bits[2];
  std::memcpy(bits, mine, sizeof bits);
  comm.broadcast(std::span<std::int64_t>(bits, 2), 0);
  double root[2];
  std::memcpy(root, bits, sizeof root);
  CHECK(root[0] == mine[0]);
  CHECK(root[1] == mine[1]);
}

}  // namespace ep_test
