// Compile-time configuration shared by every layer: the index type and the
// host/device annotation that lets one functor serve the CPU and CUDA backends.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define EP_HOST_DEVICE __host__ __device__
#else
#define EP_HOST_DEVICE
#endif

namespace entropy_probe {

using index_t = std::int64_t;

// Test builds define ENTROPY_PROBE_POISON_UNINITIALIZED (the test targets
// do): every allocate_uninitialized of floating-point storage is then filled
// with NaN, so a rule that reads an element it never wrote (a skipped zero
// fill, a product with beta = 1 on fresh memory) turns its result into NaN
// instead of silently reading a stale value. Off by default: it costs a fill.
#if defined(ENTROPY_PROBE_POISON_UNINITIALIZED)
inline constexpr bool kPoisonUninitialized = true;
#else
inline constexpr bool kPoisonUninitialized = false;
#endif

// Accumulator type for reductions that decide a result (dots, norms, row
// statistics): always double, whatever the storage type.
using acc_t = double;

}  // namespace entropy_probe
