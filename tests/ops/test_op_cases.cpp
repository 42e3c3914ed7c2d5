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
