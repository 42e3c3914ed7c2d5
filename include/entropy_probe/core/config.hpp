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

// Accumulator type for reductions that decide a result (dots, norms, row
// statistics): always double, whatever the storage type.
using acc_t = double;

}  // namespace entropy_probe
