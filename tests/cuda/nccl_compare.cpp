// check_same_result: the NCCL run's result against one CPU process through
// to_json, every field compared (timings excepted) by the rule shared with the
// MPI tests (tests/support/result_compare.hpp).
#include "nccl_test.hpp"

#include "../support/result_compare.hpp"

#include <entropy_probe/io/result_json.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>

namespace ep_nccl_test {

void check_same_result(const entropy_probe::ProbeResult& got, const entropy_probe::ProbeResult& want,
                       const std::string& tag) {
  ep_test::require_results_close(entropy_probe::to_json(got), entropy_probe::to_json(want), tag);
}

}  // namespace ep_nccl_test
