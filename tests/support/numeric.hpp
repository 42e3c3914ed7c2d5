// Relative differences for the tests' comparisons (one definition, so the
// per-area test programs can be compiled as one unit each).
#pragma once

#include <algorithm>
#include <cmath>

namespace ep_test {

// |a - b| relative to the larger magnitude: for two computations of one value.
inline double rel_diff(double a, double b) { return std::abs(a - b) / std::max({std::abs(a), std::abs(b), 1e-300}); }
// |a - ref| relative to |ref|: for a value against its reference.
inline double rel_to(double a, double ref) { return std::abs(a - ref) / std::max(std::abs(ref), 1e-300); }

}  // namespace ep_test
