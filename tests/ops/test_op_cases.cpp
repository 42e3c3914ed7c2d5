// Every case of the op-case table (tests/support/op_cases.hpp) against finite
// differences in double: the same cases device parity runs, so an op added to
// the table is checked for its rules and for every backend at once.
#include "../support/op_cases.hpp"

#include <string>

using namespace ep_test;

TEST_CASE("op-case table: every case's VJP and JVP match finite differences", "[ops][op_cases]") {
  for (OpGroup group : kOpGroups) {
    std::size_t cases = 0;
    for_each_op_case(group, [&](const std::string& name, const std::vector<OpInput>& inputs, auto build) {
      INFO(to_string(group) << ": " << name);
      require_gradcheck(inputs, build);
      ++cases;
    });
    CAPTURE(to_string(group));
    CHECK(cases > 0);
  }
}

// The JVP rules run as ops are recorded (Tape(forward_tangents, ...)): the
// same values and tangents as the recorded tape's jvp() of the finite-
// difference check above, for every case.
TEST_CASE("op-case table: every case in forward-tangent mode equals the recorded tape's jvp", "[ops][op_cases]") {
  using entropy_probe::forward_tangents;
  for (OpGroup group : kOpGroups) {
    for_each_op_case(group, [&](const std::string& name, const std::vector<OpInput>& inputs, auto build) {
      INFO(to_string(group) << ": " << name);
      std::mt19937_64 rng(11);
      std::vector<TensorD> tangents;
      for (const OpInput& in : inputs) tangents.push_back(random_tensor(in.value.shape(), rng));
      Tape<double> rec;
      Tape<double> eager(forward_tangents, {});
      std::vector<Var> vr, ve;
      for (std::size_t i = 0; i < inputs.size(); ++i) {
        vr.push_back(rec.input(inputs[i].value, inputs[i].differentiable));
        ve.push_back(eager.input(inputs[i].value, inputs[i].differentiable));
        if (!inputs[i].differentiable) continue;
        rec.set_tangent(vr[i], tangents[i]);
        eager.set_tangent(ve[i], tangents[i]);
      }
      const Var yr = build(rec, vr), ye = build(eager, ve);
      rec.jvp();
      CHECK(eager.num_nodes() == 0);
      CHECK(eager.value(ye).to_host() == rec.value(yr).to_host());
      REQUIRE(rec.tangent(yr) != nullptr);
      REQUIRE(eager.tangent(ye) != nullptr);
      const auto a = rec.tangent(yr)->to_host(), b = eager.tangent(ye)->to_host();
      REQUIRE(a.size() == b.size());
      double worst = 0, scale = 1e-300;
      for (std::size_t i = 0; i < a.size(); ++i) {
        worst = std::max(worst, std::abs(a[i] - b[i]));
        scale = std::max(scale, std::abs(a[i]));
      }
      CAPTURE(worst / scale);
      CHECK(worst <= 1e-12 * scale);
    });
  }
}
