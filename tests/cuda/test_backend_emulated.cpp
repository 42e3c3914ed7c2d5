// The CUDA parity tests' harness run against EmulatedDeviceBackend on the CPU:
// on a machine without a GPU this checks that every op and probe phase is
// written without host access to tensor data, that the device-shaped code
// paths (all-row batched attention, row reductions) agree with the CPU
// backend, and that the tolerances the GPU tests use hold under a change of
// summation order and GEMM implementation.
#include "backend_parity.hpp"
#include "checkpoint_parity.hpp"
#include "emulated_backend.hpp"

EP_PARITY_OP_TESTS(ep_parity::EmulatedDeviceBackend, "emulated: ")
EP_PARITY_PRIMITIVE_TESTS(ep_parity::EmulatedDeviceBackend, "emulated: ")
EP_PARITY_PROBE_TESTS(ep_parity::EmulatedDeviceBackend, "emulated: ")
EP_PARITY_CHECKPOINT_TESTS(ep_parity::EmulatedDeviceBackend, "emulated: ")
